"""Eager lowering: the rewritten graphs as one trainable nn.Module, called like the original model."""

from __future__ import annotations

from typing import Any, Sequence

import torch
from rich.console import Console, Group
from rich.table import Table
from rich.text import Text
from torch import nn
from torch.fx import GraphModule
from torch.utils import _pytree as pytree

from ..capture import ModelInfo, call_kwargs, capture
from ..errors import AdapterError, PassError, PeftcError
from ..instrument import DiffIR, PassRecord, Verify
from ..params import ADAPTER, BUFFER, Param, ParamTable, get_attr_path, set_attr_path
from ..pipeline import Instrument, PassContext, Pipeline
from ..spec import Spec


def _is_guard_failure(e: Exception) -> bool:
    return isinstance(e, (AssertionError, RuntimeError)) and "Guard failed" in str(e)


def hunks_mentioning(diff: str, module: str) -> str:
    """The hunks of a unified diff whose changed lines name `module` (dotted, or as code spells it).

    For display, not for `patch`: in the parameter table, rows of other modules are dropped from a kept hunk.
    """
    needles = (module + ".", module.replace(".", "_") + "_")
    out: list[str] = []
    header: list[str] = []  # the current file's header, until one of its hunks is kept
    hunk: list[str] = []
    table = False  # the current file is the parameter table

    def mentions(line: str) -> bool:
        return any(n in line for n in needles)

    def flush() -> None:
        if not any(line[:1] in "+-" and mentions(line) for line in hunk[1:]):
            return
        out.extend(header)
        header.clear()
        out.extend(line for line in hunk if not (table and line[:1] in "+-" and not mentions(line)))

    for line in diff.splitlines(True):
        if line.startswith("--- "):
            flush()
            hunk, header, table = [], [line], line.rstrip().endswith("params.txt")
        elif line.startswith("+++ "):
            header.append(line)
        elif line.startswith("@@"):
            flush()
            hunk = [line]
        else:
            hunk.append(line)
    flush()
    return "".join(out)


class PassReport:
    """What each pass did: nodes added/removed, parameters added, trainable count. `str()` renders a table."""

    def __init__(self, records: Sequence[PassRecord]):
        self.records = list(records)

    def table(self) -> Table:
        t = Table(title="peftc passes")
        for col in ("#", "pass", "changed", "+nodes", "-nodes", "+params", "trainable", "ms"):
            t.add_column(col, justify="left" if col in ("pass", "changed") else "right")
        for r in self.records:
            t.add_row(str(r.index + 1), r.name, "yes" if r.modified else "no", str(r.nodes_added),
                      str(r.nodes_removed), str(r.params_added), f"{r.trainable:,}", f"{r.seconds * 1e3:.1f}")
        return t

    def notes(self) -> list[str]:
        """`#N pass: note` for each note a pass left (what it gave up, or why it declined)."""
        return [f"#{r.index + 1} {r.name}: {note}" for r in self.records for note in r.notes]

    def __str__(self) -> str:
        console = Console(width=100, record=True, file=None, force_terminal=False)
        with console.capture() as cap:
            console.print(self.table())
        return cap.get() + "".join(f"{line}\n" for line in self.notes())

    def __rich__(self) -> Table | Group:
        notes = self.notes()
        return Group(self.table(), *(Text(line) for line in notes)) if notes else self.table()


class CompiledModel(nn.Module):
    """A compiled PEFT model: call it like the original, train its adapters, read what the compiler did.

    Parameters are registered under the original model's names plus the adapters' HF PEFT names, so
    `named_parameters()` and `state_dict()` read like the original model's. Each call signature (the set of
    keyword arguments, their non-tensor values, train/eval) is captured on first use; all graphs share one
    parameter table, so every signature trains the same adapters.
    """

    def __init__(self, model: nn.Module, spec: Spec | None, pipeline: Pipeline, args: tuple,
                 kwargs: dict[str, Any], *, dynamic: bool = True, verify: bool = True,
                 instruments: Sequence[Instrument] = (), params: ParamTable | None = None):
        super().__init__()
        self.spec, self.pipeline, self.dynamic, self.verify = spec, pipeline, dynamic, verify
        self.params = params if params is not None else ParamTable()
        self._example = (tuple(args), dict(kwargs))  # merge() captures the model again on these
        self.counters = None
        self.diff_ir = DiffIR()
        self.recompute_plan = None  # a peftc.recompute.RecomputePlan when compiled with a memory budget
        # The source model is kept to capture new signatures, but not registered: its parameters are ours.
        object.__setattr__(self, "_source", model)
        self._info = ModelInfo.of(model)
        self._graphs: dict[Any, list[GraphModule]] = {}  # what calls run: the training stage's graphs
        self._method_graphs: dict[Any, list[GraphModule]] = {}  # the same captures before it: what lowerings read
        self.train(model.training)
        first = self._lower(tuple(args), call_kwargs(model, kwargs),
                            instruments=[*([Verify()] if verify else []), self.diff_ir, *instruments])
        object.__setattr__(self, "graph_module", first)  # not a submodule: its tensors are registered below
        for p in self._exposed():
            try:
                set_attr_path(self, p.name, p.tensor)
            except KeyError as e:  # a top-level module name that clashes with a CompiledModel attribute
                raise PeftcError(f"cannot expose `{p.name}` on CompiledModel: {e}") from None

    def _exposed(self) -> list[Param]:
        """The table entries registered on the module (named_parameters / state_dict)."""
        return list(self.params)

    # ---- calling -------------------------------------------------------------------------------------------
    def _key(self, args: tuple, kwargs: dict[str, Any]):
        leaves, spec = pytree.tree_flatten((args, kwargs))
        desc = tuple((x.dim(), x.dtype, x.device.type) if isinstance(x, torch.Tensor)
                     else (type(x).__name__, x if isinstance(x, (bool, int, float, str, type(None))) else id(x))
                     for x in leaves)
        return self.training, str(spec), desc

    def _lower(self, args: tuple, kwargs: dict[str, Any], instruments: Sequence[Instrument] = ()) -> GraphModule:
        source = self._source
        was_training = source.training
        source.train(self.training)
        try:
            gm = capture(source, args, kwargs, self.params, dynamic=self.dynamic)
        finally:
            source.train(was_training)
        if not instruments and self.verify:
            instruments = [Verify()]
        ctx = PassContext(self.params, self._info, training=self.training)
        stages = self.pipeline.run_stages(gm, ctx, instruments)
        if self.counters is None:
            self.counters = ctx.counters
        key = self._key(args, kwargs)
        self._graphs.setdefault(key, []).append(stages.training)
        self._method_graphs.setdefault(key, []).append(stages.method)
        return stages.training

    def _replace_graph(self, old: GraphModule, new: GraphModule) -> None:
        """Serve `new` wherever `old` served (the recompute planner swaps in scheduled graphs)."""
        for graphs in self._graphs.values():
            graphs[:] = [new if gm is old else gm for gm in graphs]
        if self.graph_module is old:
            object.__setattr__(self, "graph_module", new)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        kwargs = call_kwargs(self._source, kwargs)
        for gm in self._graphs.get(self._key(args, kwargs), []):
            try:
                return gm(*args, **kwargs)
            except Exception as e:
                if not _is_guard_failure(e):
                    raise
        # A new signature, or shapes that an earlier capture specialized: capture these inputs too.
        return self._lower(args, kwargs)(*args, **kwargs)

    def _apply(self, fn, recurse=True):
        super()._apply(fn, recurse)
        # Parameters change in place, but buffers are replaced: rebind every graph to the new tensors.
        for p in self.params:
            if p.role == BUFFER:
                p.tensor = get_attr_path(self, p.name)
                for graphs in (*self._graphs.values(), *self._method_graphs.values()):
                    for gm in graphs:
                        set_attr_path(gm, p.name, p.tensor)
        return self

    # ---- adapters ------------------------------------------------------------------------------------------
    def adapter_state_dict(self) -> dict[str, torch.Tensor]:
        """Every adapter tensor, keyed as HF PEFT saves them without `base_model.model.`."""
        return {p.name: p.tensor.detach() for p in self.params if p.role == ADAPTER}

    def load_adapter_state_dict(self, state_dict: dict[str, torch.Tensor]) -> None:
        """Load adapter tensors; strict: unknown, missing or mis-shaped keys raise AdapterError."""
        ours = {p.name: p for p in self.params if p.role == ADAPTER}
        for key, value in state_dict.items():
            if key not in ours:
                import difflib
                close = difflib.get_close_matches(key, list(ours), n=1)
                hint = f"; did you mean `{close[0]}`?" if close else ""
                raise AdapterError(f"adapter state dict has unknown key `{key}`{hint}")
            if not isinstance(value, torch.Tensor) or tuple(value.shape) != tuple(ours[key].tensor.shape):
                got = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
                raise AdapterError(f"adapter `{key}` has shape {got}; the model expects "
                                   f"{tuple(ours[key].tensor.shape)}")
        missing = [k for k in ours if k not in state_dict]
        if missing:
            raise AdapterError(f"adapter state dict is missing `{missing[0]}`"
                               + (f" and {len(missing) - 1} more" if len(missing) > 1 else ""))
        with torch.no_grad():
            for key, value in state_dict.items():
                ours[key].tensor.copy_(value)

    def merge(self, adapters: str | Sequence[str] | None = None) -> "MergedModel":
        """A new module with the adapters folded into the base weights; this model stays as it is, trainable.

        `adapters` picks some (module paths such as "model.layers.0.self_attn.q_proj", tensor names, or method
        names such as "lora"); the others stay trainable in the new module. The new module is called like the
        original model, and its parameters carry the base model's names (plus those of the adapters left).
        Half-precision weights are merged in fp32 and cast once.
        """
        from ..merge import KEPT_AS_CONSTANTS, unmerged_tags
        from ..passes.fold_params import FoldParams
        from ..passes.merge_reparam import MergeReparam, select_adapters

        chosen = select_adapters(self.params, adapters)
        table = self.params.copy()
        for p in table:
            if p.role == ADAPTER:  # copies: training this model later must not move the merged weights
                keep = p.trainable and p.name not in chosen
                p.tensor, p.trainable = nn.Parameter(p.tensor.detach().clone(), requires_grad=keep), keep
        # Merge right after the adapter passes (method stage), before optimizations that fuse adapter ops: the
        # training passes (prune-grads) then see the merged graph.
        passes = list(self.pipeline.passes)
        last_adapter = max((i for i, q in enumerate(passes) if q.rule_type is not None), default=0)
        passes[last_adapter + 1:last_adapter + 1] = [MergeReparam(tuple(sorted(chosen))), FoldParams()]
        merged = MergedModel(self._source, self.spec, Pipeline(tuple(passes)), *self._example,
                             training=self.training, dynamic=self.dynamic, verify=self.verify, params=table)
        # Prefixes and prompts are activations, not weights: they stay, frozen, as constants (peftc/merge.py).
        read = {n.target for n in merged.graph_module.graph.nodes if n.op == "get_attr"}
        unmerged = sorted({n for n in chosen & read if table[n].method not in KEPT_AS_CONSTANTS}
                          | set(unmerged_tags(merged.graph_module, chosen)))
        if unmerged:
            raise PassError(f"merge: no merge rule matched how `{unmerged[0]}` is applied"
                            + (f" (and {len(unmerged) - 1} more)" if len(unmerged) > 1 else "")
                            + "; leave its module out of adapters=[...] or add a rule to MERGE_RULES")
        return merged

    # ---- what the compiler did ----------------------------------------------------------------------------
    def diff(self, pass_name: str | None = None, module: str | None = None) -> str:
        """Unified diffs of code and parameter table for each pass that changed something.

        `pass_name` keeps one pass's diffs; `module` keeps the hunks that mention that module path.
        """
        records = [r for r in self.diff_ir.records if pass_name is None or r.name == pass_name]
        if pass_name is not None and not records:
            names = ", ".join(dict.fromkeys(r.name for r in self.diff_ir.records))
            raise PeftcError(f"no pass named `{pass_name}` ran; passes: {names}")
        text = "".join(r.diff for r in records)
        return text if module is None else hunks_mentioning(text, module)

    def report(self) -> PassReport:
        return PassReport(self.diff_ir.records)

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p.tensor for p in self.params if p.trainable]

    def parameter_counts(self) -> tuple[int, int]:
        """(trainable, total) parameter counts; total counts the base model plus adapters."""
        return self.params.count(trainable=True), self.params.count()

    def print_trainable_parameters(self) -> str:
        trainable, total = self.parameter_counts()
        line = f"trainable params: {trainable:,} || all params: {total:,} || trainable%: {100 * trainable / total:.4f}"
        print(line)
        return line

    # ---- ONNX ------------------------------------------------------------------------------------------------
    @property
    def example_inputs(self) -> tuple[tuple, dict[str, Any]]:
        """The (args, kwargs) the model was compiled with, as peftc calls it (what ONNX export traces on)."""
        args, kwargs = self._example
        return args, call_kwargs(self._source, kwargs)

    def graph_for(self, *args: Any, **kwargs: Any) -> GraphModule:
        """The graph that serves this call signature in the current train/eval mode, captured if it is new."""
        kwargs = call_kwargs(self._source, kwargs)
        graphs = self._graphs.get(self._key(args, kwargs))
        return graphs[0] if graphs else self._lower(args, kwargs)

    def method_graph_for(self, *args: Any, **kwargs: Any) -> GraphModule:
        """graph_for's capture before the training passes: what lowerings read (ONNX, adapter files). It computes
        what the served graph computes, without prune-grads' autograd functions, recomputation or a fused loss."""
        self.graph_for(*args, **kwargs)
        return self._method_graphs[self._key(args, call_kwargs(self._source, kwargs))][0]

    def export_onnx(self, path, merged: bool = True, dynamic: bool = True, opset: int | None = None,
                    verify: bool = True, adapters: str | None = None, progress=None):
        """Lower to an optimized ONNX file at `path`, checked against this model in onnxruntime.

        merged=True folds the adapters into the base weights (same graph as the base model). merged=False with
        adapters="inputs" makes every LoRA A / scaled B a graph input (default zero) for onnxruntime's multi-LoRA;
        adapters=None keeps them as initializers. Batch and sequence axes are dynamic unless dynamic=False.
        verify=True runs onnxruntime on the example inputs and a second shape and raises ExportError past
        1e-4 * max(1, max|reference|) (fp32). The file appears only when everything succeeded.
        Returns an ExportReport (node counts, max difference, file size).
        """
        from .onnx import export_compiled

        return export_compiled(self, path, merged=merged, adapters=adapters, dynamic=dynamic, opset=opset,
                               verify=verify, progress=progress)

    def export_onnx_adapter(self, path, onnx_model=None) -> int:
        """Write the current adapter as an onnxruntime `.onnx_adapter` file (LoRA scaling folded into B).

        With `onnx_model` (a file from export_onnx(merged=False, adapters="inputs")), names, shapes and dtypes are
        checked against its adapter inputs first; onnxruntime checks none of them. Returns the file size.
        """
        from .onnx import export_compiled_adapter

        return export_compiled_adapter(self, path, onnx_model)

class MergedModel(CompiledModel):
    """What CompiledModel.merge() returns: the same pipeline plus merge-reparam and fold-params, on its own copy
    of the parameter table. Only the tensors its graphs read are registered, so parameter names are the base
    model's (merged weights included) plus those of the adapters left unmerged."""

    def __init__(self, model: nn.Module, spec: Spec | None, pipeline: Pipeline, args: tuple,
                 kwargs: dict[str, Any], *, training: bool, **options: Any):
        was_training = model.training
        model.train(training)
        try:
            super().__init__(model, spec, pipeline, args, kwargs, **options)
        finally:
            model.train(was_training)

    def _exposed(self) -> list[Param]:
        read = {n.target for n in self.graph_module.graph.nodes if n.op == "get_attr"}
        return [p for p in self.params if p.name in read or p.trainable]
