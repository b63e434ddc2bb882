"""Passes and the pipeline that runs them.

A pass is a small frozen dataclass with a kebab-case `name` and its options as fields. It reads and writes one
IR: a GraphModule plus the parameter table in the PassContext. The pipeline is an explicit ordered list; there is
no ordering solver. Instruments (peftc.instrument) observe every pass: before, after, failed.

Two stages, in this order: method passes say what is fine-tuned (freeze-base, insert-*, merge-reparam, fold-params);
training passes change only how a training step runs (prune-grads, schedule-recompute, the fused loss). A pipeline
runs its method passes, keeps that graph for the lowerings (ONNX, merge), and runs its training passes on a copy,
which is what a training step calls (`Pipeline.run_stages`).
"""

from __future__ import annotations

import ast
import dataclasses
import difflib
import re
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, ClassVar, Iterable, NamedTuple, Protocol, Sequence

from torch.fx import Graph, GraphModule

from .capture import ModelInfo
from .errors import PassError, PeftcError, SpecError
from .params import ParamTable
from .spec import ModulesToSave, Rule, Spec


@dataclass
class PassContext:
    params: ParamTable
    info: ModelInfo
    training: bool  # the mode this graph was captured in: dropout exists only in training graphs
    counters: Counter = field(default_factory=Counter)
    base_frozen: bool = False
    notes: list[str] = field(default_factory=list)  # what passes want the user to know (cm.report() shows them)

    def count(self, key: str, n: int = 1) -> None:
        self.counters[key] += n

    def note(self, text: str) -> None:
        """Leave a note for the report: what a pass did that the code diff does not say, or why it declined."""
        self.notes.append(text)


@dataclass(frozen=True)
class PassResult:
    gm: GraphModule
    modified: bool


METHOD, TRAINING = "method", "training"


class Pass:
    """Base of every pass. Subclasses are frozen dataclasses registered with @register_pass."""

    name: ClassVar[str] = ""
    # The spec rule type this pass implements, when it is an adapter-inserting pass.
    rule_type: ClassVar[type[Rule] | None] = None
    # "method": says what is fine-tuned; every lowering (eager, merge, ONNX) sees it.
    # "training": changes only how a training step runs (what is saved, recomputed, fused); never exported.
    stage: ClassVar[str] = METHOD

    def run(self, gm: GraphModule, ctx: PassContext) -> PassResult:
        raise NotImplementedError

    @classmethod
    def from_options(cls, **options: Any) -> "Pass":
        """Build from CLI-style options; passes that carry a spec rule build the rule from them."""
        if cls.rule_type is not None:
            return cls(cls.rule_type.from_dict(options, f"pass `{cls.name}`"))
        known = {f.name for f in dataclasses.fields(cls)}
        for key in options:
            if key not in known:
                raise SpecError(f"pass `{cls.name}` has no option `{key}`; options: {', '.join(sorted(known)) or 'none'}")
        return cls(**options)

    @classmethod
    def options(cls) -> list[tuple[str, str, Any]]:
        """(name, type, default) of each option, for `peftc passes`."""
        owner = cls.rule_type if cls.rule_type is not None else cls
        out = []
        for f in dataclasses.fields(owner):
            default = f.default if f.default is not dataclasses.MISSING else None
            out.append((f.name, str(f.type), default))
        return out

    def __str__(self) -> str:
        return self.name


PASSES: dict[str, type[Pass]] = {}
RULE_PASSES: dict[type[Rule], type[Pass]] = {}


def register_pass(cls: type[Pass]) -> type[Pass]:
    if not re.fullmatch(r"[a-z][a-z0-9]*(-[a-z0-9]+)*", cls.name):
        raise ValueError(f"pass name {cls.name!r} is not kebab-case")
    if cls.stage not in (METHOD, TRAINING):
        raise ValueError(f"pass `{cls.name}` has stage {cls.stage!r}; use {METHOD!r} or {TRAINING!r}")
    PASSES[cls.name] = cls
    if cls.rule_type is not None:
        RULE_PASSES[cls.rule_type] = cls
    return cls


class Instrument(Protocol):
    def before(self, index: int, p: Pass, gm: GraphModule, ctx: PassContext) -> None: ...

    def after(self, index: int, p: Pass, result: PassResult, ctx: PassContext) -> None: ...

    def failed(self, index: int, p: Pass, gm: GraphModule, ctx: PassContext, error: BaseException) -> None: ...


def copy_graph_module(gm: GraphModule) -> GraphModule:
    """A GraphModule over a copy of `gm`'s graph that reads the same tensors (node meta copied shallowly)."""
    graph = Graph()
    graph.output(graph.graph_copy(gm.graph, {}))
    graph._codegen = gm.graph._codegen  # the calling convention (pytree specs), shared, never edited by passes
    return GraphModule(gm, graph, class_name=type(gm).__name__)


class Stages(NamedTuple):
    """One capture through a pipeline: `method` is what lowerings read (ONNX, merge, adapter files), `training` is
    what a call runs (the method graph plus the training passes; the same graph when there are none)."""

    method: GraphModule
    training: GraphModule


@dataclass(frozen=True)
class Pipeline:
    passes: tuple[Pass, ...]

    def __post_init__(self):
        stages = [p.stage for p in self.passes]
        if TRAINING in stages and METHOD in stages[stages.index(TRAINING):]:
            first = self.passes[stages.index(TRAINING)]
            late = next(p for p in self.passes[stages.index(TRAINING):] if p.stage == METHOD)
            raise SpecError(f"pipeline {self}: method pass `{late.name}` comes after training pass `{first.name}`; "
                            f"training passes change only how a training step runs and go last, after every "
                            f"method pass (the graph before them is the one exported)")

    @property
    def method(self) -> "Pipeline":
        """The method passes: what is fine-tuned, seen by every lowering."""
        return Pipeline(tuple(p for p in self.passes if p.stage == METHOD))

    @property
    def training(self) -> "Pipeline":
        """The training passes: how a training step runs; never seen by an export."""
        return Pipeline(tuple(p for p in self.passes if p.stage == TRAINING))

    @classmethod
    def for_spec(cls, spec: Spec, *, prune_grads: bool = True, fuse_loss: bool = True,
                 recompute: bool = True) -> "Pipeline":
        """Method stage: freeze-base, one pass per rule. Training stage: prune-grads, fuse-linear-cross-entropy, then
        recompute-cheap (each unless turned off)."""
        from .passes.freeze_base import FreezeBase
        from .passes.fuse_linear_cross_entropy import FuseLinearCrossEntropy
        from .passes.prune_grads import PruneGrads
        from .passes.recompute_cheap import RecomputeCheap

        # Freeze first, so adapter passes mark as trainable exactly what they add. Adapter rules run in spec
        # order: a later rule sees the earlier rules' adapters and leaves them alone.
        passes: list[Pass] = [FreezeBase()]
        for rule in spec.rules:
            pass_cls = RULE_PASSES.get(type(rule))
            if pass_cls is None:
                raise SpecError(f"no pass implements {type(rule).__name__} rules")
            passes.append(pass_cls(rule))
        # HF PEFT trains the classifier head in full for sequence classification, unless the spec says which modules.
        if spec.task_type == "SEQ_CLS" and not any(isinstance(r, ModulesToSave) for r in spec.rules):
            from .passes.insert_modules_to_save import InsertModulesToSave

            passes.append(InsertModulesToSave(ModulesToSave(target="^(?:classifier|score)")))
        # Training stage. Pruning needs the final trainable set to know which values carry gradients.
        if prune_grads:
            passes.append(PruneGrads())
        # The fused loss after pruning: it moves the head's final form (adapters, pruned dropout) into its chunks.
        if fuse_loss:
            passes.append(FuseLinearCrossEntropy())
        # Recomputation last: it decides on the graph the step will run, and keeps what the others left to keep.
        if recompute:
            passes.append(RecomputeCheap())
        return cls(tuple(passes))

    @classmethod
    def parse(cls, text: str) -> "Pipeline":
        """`"insert-lora{r=8,target=q_proj|v_proj},prune-grads"` ==> Pipeline. freeze-base is implied first."""
        from .passes.freeze_base import FreezeBase

        passes: list[Pass] = []
        for name, opts in _split_pipeline(text):
            if name not in PASSES:
                close = difflib.get_close_matches(name, list(PASSES), n=3)
                hint = f"; did you mean {', '.join(close)}?" if close else f"; known: {', '.join(sorted(PASSES))}"
                raise SpecError(f"pipeline {text!r}: unknown pass `{name}`{hint}")
            passes.append(PASSES[name].from_options(**opts))
        if not any(isinstance(p, FreezeBase) for p in passes):
            passes.insert(0, FreezeBase())
        return cls(tuple(passes))

    def __str__(self) -> str:
        return ",".join(p.name for p in self.passes)

    def run(self, gm: GraphModule, ctx: PassContext, instruments: Sequence[Instrument] = (),
            start: int = 0) -> GraphModule:
        """Run the passes in order; `start` numbers them after passes that already ran (for diffs and errors).
        Returns the last graph (the training graph); `run_stages` also returns the method graph."""
        return self.run_stages(gm, ctx, instruments, start).training

    def run_stages(self, gm: GraphModule, ctx: PassContext, instruments: Sequence[Instrument] = (),
                   start: int = 0) -> Stages:
        """Run the passes in order; before the first training pass, keep the method graph and go on with a copy."""
        method = None
        for i, p in enumerate(self.passes, start):
            if method is None and p.stage == TRAINING:
                method, gm = gm, copy_graph_module(gm)
            for inst in instruments:
                inst.before(i, p, gm, ctx)
            try:
                result = p.run(gm, ctx)
                if result.modified:
                    result.gm.recompile()
                for inst in instruments:
                    inst.after(i, p, result, ctx)
            except Exception as e:
                for inst in instruments:
                    inst.failed(i, p, gm, ctx, e)
                ran = [q.name for q in self.passes[:i - start]] or ["earlier passes" if start else "none"]
                before = ", ".join(ran)
                if isinstance(e, SpecError):  # a spec problem found while matching: the user's to fix
                    raise
                kind = PassError if not isinstance(e, PeftcError) or isinstance(e, PassError) else type(e)
                raise kind(f"pass #{i + 1} `{p.name}` failed: {e} (passes run before it: {before})") from e
            gm = result.gm
        return Stages(gm if method is None else method, gm)


_PASS_ITEM = re.compile(r"\s*([a-z][a-z0-9-]*)\s*(?:\{([^{}]*)\})?\s*(,|$)")


def _split_pipeline(text: str) -> Iterable[tuple[str, dict[str, Any]]]:
    pos = 0
    while pos < len(text):
        m = _PASS_ITEM.match(text, pos)
        if m is None:
            raise SpecError(f"pipeline {text!r}: cannot parse at column {pos + 1}; write "
                            f"`pass-name{{key=value,...}},next-pass`")
        opts: dict[str, Any] = {}
        for item in filter(None, (s.strip() for s in (m.group(2) or "").split(","))):
            key, sep, value = item.partition("=")
            if not sep:
                raise SpecError(f"pipeline option `{item}` in {text!r} must be key=value")
            opts[key.strip()] = _literal(value.strip())
        yield m.group(1), opts
        pos = m.end() if m.end() > pos else len(text)


def _literal(value: str) -> Any:
    lowered = value.lower()
    if lowered in ("true", "false"):
        return lowered == "true"
    try:
        return ast.literal_eval(value)
    except (ValueError, SyntaxError):
        return value
