"""Eager lowering: the rewritten graphs as one trainable nn.Module, called like the original model."""

from __future__ import annotations

import threading
from typing import Any, Callable, Mapping, Sequence

import torch
from rich.console import Console, Group
from rich.table import Table
from rich.text import Text
from torch import nn
from torch.fx import GraphModule
from torch.utils import _pytree as pytree

from ..capture import ModelInfo, admits, call_kwargs, capture, export, input_guards
from ..distributed import check_capture, check_sharding, check_source, copy_full_into, whole_weights
from ..errors import ExportError, PassError, PeftcError
from ..hf import HFModelMixin, autocast_state, compiled_class, source_signature
from ..instrument import DiffIR, PassRecord, Verify
from ..method import with_hook
from ..params import ADAPTER, BUFFER, Param, ParamTable, get_attr_path, set_attr_path
from ..pipeline import Instrument, PassContext, Pipeline
from ..spec import Spec
from .modules import live_tensor, make_containers, runnable


# torch.export keeps its tracing state in process-global modes: two captures at once (two threads' first calls)
# corrupt each other ("ProxyTorchDispatchMode slot already occupied"). Captures take turns; graph calls do not.
_CAPTURE_LOCK = threading.RLock()


_ACTIVE = object()  # `config=` default: the model's active adapter configuration


def _is_guard_failure(e: Exception) -> bool:
    return isinstance(e, (AssertionError, RuntimeError)) and "Guard failed" in str(e)


class KeptExports:
    """The raw torch.export results of one source model, newest last under each key: a new adapter configuration
    or a merge rewrites one of them instead of exporting the model again. A CompiledModel shares its store with the
    MergedModels its merge() builds.

    Not copied: a deep copy (or an unpickled model) starts with an empty store, since its graphs read its own copy
    of the source model. Cleared once the model is sharded (peftc/distributed.py): kept exports read whole tensors.
    """

    def __init__(self) -> None:
        # key ==> [(export, the guards of a graph captured from it: capture.input_guards)]
        self._by_key: dict[Any, list[tuple[torch.export.ExportedProgram, Callable]]] = {}

    def fitting(self, key: Any, args: tuple, kwargs: dict[str, Any]) -> torch.export.ExportedProgram | None:
        """The newest export under `key` whose input sizes (capture.admits) and guards take these inputs, or None."""
        return next((ep for ep, guards in reversed(self._by_key.get(key, ()))
                     if admits(ep, args, kwargs) and guards(args, kwargs)), None)

    def add(self, key: Any, ep: torch.export.ExportedProgram, guards: Callable) -> None:
        self._by_key.setdefault(key, []).append((ep, guards))

    def clear(self) -> None:
        self._by_key.clear()

    def __len__(self) -> int:
        return sum(map(len, self._by_key.values()))

    def __reduce__(self):
        return KeptExports, ()


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


def _takes_sizes(gm: GraphModule, args: tuple, kwargs: dict[str, Any]) -> bool:
    """Whether every tensor input has the rank and the fixed (non-symbolic) sizes `gm` was captured with."""
    from torch.fx._pytree import tree_flatten_spec

    spec = getattr(gm, "_in_spec", None)
    if spec is None:
        return True
    try:
        leaves = tree_flatten_spec((args, kwargs), spec)
    except Exception:  # another structure: the caller's key already separates those
        return True
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    for node, x in zip(placeholders, leaves):
        val = node.meta.get("val")
        if isinstance(val, torch.Tensor) and isinstance(x, torch.Tensor):
            if val.dim() != x.dim() or any(isinstance(d, int) and d != n for d, n in zip(val.shape, x.shape)):
                return False
    return True


class CompiledModel(HFModelMixin, nn.Module):
    """A compiled PEFT model: call it like the original, train its adapters, read what the compiler did.

    Parameters are registered under the original model's names plus the adapters' HF PEFT names, so
    `named_parameters()` and `state_dict()` read like the original model's. Each call signature (the set of
    keyword arguments, their non-tensor values, train/eval, the autocast state) is captured on first use; all graphs
    share one parameter table, so every signature trains the same adapters. The Hugging Face model surface that
    Trainer and TRL read is peftc.hf.HFModelMixin's.
    """

    # The active adapter configuration when it is not the compiled one's slots (peftc/adapters.py): part of every
    # graph key, so a configuration selects the graphs compiled for it.
    _adapter_config = None

    def __new__(cls, model: nn.Module | None = None, *args: Any, **kwargs: Any):
        # An instance of the class made for the source model's class (peftc.hf.compiled_class): what Trainer reads
        # off the class. copy/deepcopy call __new__ on that class itself, without arguments.
        return super().__new__(cls if model is None else compiled_class(cls, type(model)))

    def __init__(self, model: nn.Module, spec: Spec | None, pipeline: Pipeline, args: tuple,
                 kwargs: dict[str, Any], *, dynamic: bool = True, verify: bool = True,
                 instruments: Sequence[Instrument] = (), params: ParamTable | None = None,
                 exports: KeptExports | None = None):
        nn.Module.__init__(self)  # not super(): the class may also be a peft.PeftModel, whose __init__ wraps a model
        self.spec, self.pipeline, self.dynamic, self.verify = spec, pipeline, dynamic, verify
        self.params = params if params is not None else ParamTable()
        self._example = (tuple(args), dict(kwargs))  # merge() captures the model again on these
        self._exports = exports if exports is not None else KeptExports()
        self.counters = None
        self.diff_ir = DiffIR()
        self.recompute_plan = None  # a peftc.recompute.RecomputePlan when compiled with a memory budget
        # The source model is kept to capture new signatures, but not registered: its parameters are ours.
        check_source(model)
        object.__setattr__(self, "_source", model)
        self._info = ModelInfo.of(model, task_type=getattr(spec, "task_type", None))
        self._graphs: dict[Any, list[GraphModule]] = {}  # what calls run: the training stage's graphs
        self._method_graphs: dict[Any, list[GraphModule]] = {}  # the same captures before it: what lowerings read
        rules = spec.rules if spec is not None else ()
        self._regularizers = with_hook(rules, "regularizer")  # loss terms a call adds
        self._before_call = with_hook(rules, "before_call")  # in-place updates before a call
        self.train(model.training)
        first = self._lower(tuple(args), call_kwargs(model, kwargs),
                            instruments=[*([Verify()] if verify else []), self.diff_ir, *instruments])
        object.__setattr__(self, "graph_module", first)  # not a submodule: its tensors are registered below
        make_containers(self, self._info)
        for p in self._exposed():
            try:
                set_attr_path(self, p.name, p.tensor)
            except KeyError as e:  # a top-level module name that clashes with a CompiledModel attribute
                raise PeftcError(f"cannot expose `{p.name}` on CompiledModel: {e}") from None

    def _exposed(self) -> list[Param]:
        """The table entries registered on the module (named_parameters / state_dict)."""
        return list(self.params)

    # ---- calling -------------------------------------------------------------------------------------------
    def _key(self, args: tuple, kwargs: dict[str, Any], entry: str | None = None, config: Any = _ACTIVE):
        leaves, spec = pytree.tree_flatten((args, kwargs))
        desc = tuple((x.dim(), x.dtype, x.device.type) if isinstance(x, torch.Tensor)
                     else (type(x).__name__, x if isinstance(x, (bool, int, float, str, type(None))) else id(x))
                     for x in leaves)
        return (self.training, str(spec), desc, autocast_state(args, kwargs), entry,
                self._adapter_config if config is _ACTIVE else config)

    def _lower(self, args: tuple, kwargs: dict[str, Any], instruments: Sequence[Instrument] = (),
               entry: str | None = None, config: Any = _ACTIVE, reuse: bool = True) -> GraphModule:
        """Capture and compile one call signature; `entry` is a submodule to enter through (cm.base_model),
        `config` an adapter configuration (peftc/adapters.py; the active one by default). With `reuse`, the newest
        kept export whose sizes and guards take these inputs is rewritten instead of exporting again."""
        with _CAPTURE_LOCK:
            return self._capture_and_compile(args, kwargs, instruments, entry, config, reuse)

    def _export_key(self, args: tuple, kwargs: dict[str, Any], entry: str | None) -> tuple:
        """What a raw export depends on: the graph key without the adapter configuration, `dynamic`, and the dtype
        and device of every source tensor (a model cast to float64 bakes other dtypes into its graph)."""
        source = self._source
        tensors = tuple((t.dtype, str(t.device)) for t in (*source.parameters(), *source.buffers()))
        return (*self._key(args, kwargs, entry, config=None), self.dynamic, tensors)

    def _capture_and_compile(self, args: tuple, kwargs: dict[str, Any], instruments: Sequence[Instrument],
                             entry: str | None, config: Any = _ACTIVE, reuse: bool = True) -> GraphModule:
        config = self._adapter_config if config is _ACTIVE else config
        pipeline, params = self.pipeline, self.params
        if config is not None:
            from ..adapters import config_stage

            pipeline, params = config_stage(self, config)
        source = self._source
        raw_key = self._export_key(args, kwargs, entry)
        ep = self._exports.fitting(raw_key, args, kwargs) if reuse else None
        fresh = ep is None
        if fresh:
            was_training = source.training
            source.train(self.training)
            try:
                ep = export(source, args, kwargs, dynamic=self.dynamic, entry=entry)
            finally:
                source.train(was_training)
        gm = capture(source, args, kwargs, params, dynamic=self.dynamic, entry=entry, exported=ep)
        if fresh:
            self._exports.add(raw_key, ep, input_guards(gm))  # read before the passes rewrite gm
        if not instruments and self.verify:
            instruments = [Verify()]
        ctx = PassContext(params, self._info, training=self.training)
        stages = pipeline.run_stages(gm, ctx, instruments)
        if self.counters is None:
            self.counters = ctx.counters
        key = self._key(args, kwargs, entry, config)
        self._graphs.setdefault(key, []).append(stages.training)
        self._method_graphs.setdefault(key, []).append(stages.method)
        return stages.training

    def _replace_graph(self, old: GraphModule, new: GraphModule) -> None:
        """Serve `new` wherever `old` served (the recompute planner swaps in scheduled graphs)."""
        for graphs in self._graphs.values():
            graphs[:] = [new if gm is old else gm for gm in graphs]
        if self.graph_module is old:
            object.__setattr__(self, "graph_module", new)

    @source_signature
    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if "adapter_names" in kwargs:  # a mixed batch: one adapter per sample (peftc/adapters.py)
            from ..adapters import mixed_call

            return mixed_call(self, kwargs.pop("adapter_names"), None, args, kwargs)
        out = self._call(None, args, kwargs)
        if self._regularizers:
            from ..method import add_regularizers

            return add_regularizers(self, out, self._regularizers)
        return out

    def _call(self, entry: str | None, args: tuple, kwargs: dict[str, Any], config: Any = _ACTIVE) -> Any:
        """Run the graph of this call signature (entering through submodule `entry`, for cm.base_model) for the
        adapter configuration `config` (the active one by default)."""
        if self._before_call:
            from ..method import run_before_call

            run_before_call(self, self._before_call)
        kwargs = call_kwargs(self._source if entry is None else get_attr_path(self._source, entry), kwargs)
        if self.recompute_plan is not None and self.training:
            from ..recompute import check_tokens

            check_tokens(self, args, kwargs)
        key, tried = self._key(args, kwargs, entry, config), 0
        while True:
            graphs = list(self._graphs.get(key, []))
            for gm in graphs[tried:]:
                try:
                    return self._run(gm, args, kwargs)
                except Exception as e:
                    if not _is_guard_failure(e):
                        raise
            tried = len(graphs)
            # A new signature, or shapes that an earlier capture specialized: capture these inputs too, unless
            # another thread captured this signature while we looked (then try its graph first). Only a new
            # signature starts from a kept export: a graph of this one already failed these sizes.
            with _CAPTURE_LOCK:
                if len(self._graphs.get(key, [])) == tried:
                    check_capture(self)
                    gm = self._lower(args, kwargs, entry=entry, config=config, reuse=tried == 0)
                    return self._run(gm, args, kwargs)

    def _run(self, gm: GraphModule, args: tuple, kwargs: dict[str, Any]) -> Any:
        # The graph as it runs: tensors read from this module's tree, each repeated block a module call
        # (peftc/lower/modules.py), so whatever swaps a registered tensor (FSDP2, assign=True) is seen.
        run = runnable(self, gm, self._info)
        check_sharding(self, run)
        return run(*args, **kwargs)

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
        return {p.name: live_tensor(self, p).detach() for p in self.params if p.role == ADAPTER}

    def load_adapter_state_dict(self, state_dict: Mapping[str, torch.Tensor]) -> None:
        """Load adapter tensors, all or nothing: every key and tensor is checked before any is copied.

        Strict: unknown, missing or mis-shaped keys, non-tensors, meta tensors, non-floating dtypes (bool, int,
        complex) and NaN/inf values raise AdapterError naming the key. Other floating dtypes are cast to each
        adapter's own dtype (float32 for half-precision bases) and devices are moved, as Tensor.copy_ does.
        Integer adapter tensors (SparseDelta's indices) take integer values.
        """
        from ..adapter_check import check_adapter_state_dict

        ours = {p.name: live_tensor(self, p) for p in self.params if p.role == ADAPTER}
        check_adapter_state_dict(state_dict, ours)
        for key, value in state_dict.items():
            copy_full_into(ours[key], value)  # a sharded (FSDP2) adapter takes the full tensor

    def save_pretrained(self, directory, format: str | None = None, *, state_dict: Mapping[str, torch.Tensor] |
                        None = None, is_main_process: bool = True, **peft_options: Any) -> str:
        """Save the adapter to `directory` in HF PEFT's format (adapter_config.json + adapter_model.safetensors),
        which `peft.PeftModel.from_pretrained(base, directory)` loads, or in peftc's layout (peftc_spec.json +
        peftc_adapter.safetensors) for specs PEFT has no format for. format="peft" / "peftc" insists on one.
        `state_dict` (this model's state_dict(), e.g. gathered by a trainer) supplies the adapter tensors; on a
        sharded model every rank must call it (the adapters are gathered whole) and only `is_main_process` writes.
        PEFT's `path_initial_model_for_weight_conversion` writes a PiSSA/OLoRA adapter as the rank-2r LoRA of the
        original base (docs/methods.md). With several adapters loaded, HF PEFT's layout: "default" in `directory`,
        each other adapter (or those in `selected_adapters=[...]`) in `directory/<name>/` (docs/adapters.md).
        Returns the format written (docs/huggingface.md)."""
        from ..adapters import save_pretrained

        return save_pretrained(self, directory, format, state_dict=state_dict, is_main_process=is_main_process,
                               **peft_options)

    def load_adapter(self, directory, adapter_name: str | None = None, is_trainable: bool | None = None, *,
                     name: str | None = None) -> None:
        """Load a saved adapter (HF PEFT's format or peftc's layout): strict, and nothing changes when it does not
        fit (AdapterError naming the first bad key). Without a name, or with the name of the adapter in the compiled
        slots ("default" until set_adapter binds another), its weights replace that adapter's: how Trainer resumes
        (`load_adapter(dir, "default", is_trainable=True)`). Another name (`name=`, or PEFT's positional
        `adapter_name`) loads one more adapter, inactive and frozen until `set_adapter(name)` (docs/adapters.md)."""
        from ..adapters import load_adapter

        load_adapter(self, directory, name if name is not None else adapter_name, is_trainable)

    @property
    def adapter_names(self) -> list[str]:
        """The loaded adapters; the compiled one is "default", as HF PEFT names it."""
        from ..adapters import adapter_names

        return adapter_names(self)

    @property
    def active_adapters(self) -> list[str]:
        from ..adapters import active_adapters

        return active_adapters(self)

    @property
    def active_adapter(self) -> str:
        """The first active adapter (PEFT's `active_adapter`; Trainer resumes it)."""
        return self.active_adapters[0]

    def set_adapter(self, names: str | Sequence[str]) -> None:
        """Activate one adapter or several (their outputs summed, as HF PEFT does); only active adapters train.
        A switch selects tensors or a graph compiled for that configuration, never a per-call branch."""
        from ..adapters import set_adapter

        set_adapter(self, names)

    def delete_adapter(self, name: str) -> None:
        from ..adapters import delete_adapter

        delete_adapter(self, name)

    def add_weighted_adapter(self, adapters: Sequence[str], weights: Sequence[float], combination_type: str = "svd",
                             *, name: str, **options: Any) -> None:
        """HF PEFT's add_weighted_adapter: loaded LoRA adapters combined into a new adapter `name` (linear, cat, svd,
        ties, dare_linear, ...; options svd_rank, svd_clamp, density, ... as HF PEFT's). docs/adapters.md."""
        from ..adapters import add_weighted_adapter

        add_weighted_adapter(self, adapters, weights, combination_type, name=name, **options)

    def disable_adapters(self):
        """`with cm.disable_adapters(): ...` runs the base model (every adapter off) inside the block."""
        from ..adapters import disable_adapters

        return disable_adapters(self)

    disable_adapter = disable_adapters  # PEFT's name (TRL's DPO computes its reference outputs inside it)

    @classmethod
    def from_pretrained(cls, model: nn.Module, directory, args: tuple = (), kwargs: dict[str, Any] | None = None,
                        **options: Any) -> "CompiledModel":
        """Compile `model` with the spec of a saved adapter (HF PEFT's format or peftc's layout) and load its
        weights: `peftc.compile(model, directory, args, kwargs, **options)`."""
        from ..api import compile

        return compile(model, directory, args, kwargs, **options)

    def merge(self, adapters: str | Sequence[str] | None = None) -> "MergedModel":
        """A new module with the adapters folded into the base weights; this model stays as it is, trainable.

        `adapters` picks some (module paths such as "model.layers.0.self_attn.q_proj", tensor names, or method
        names such as "lora"); the others stay trainable in the new module. The new module is called like the
        original model, and its parameters carry the base model's names (plus those of the adapters left).
        Half-precision weights are merged in fp32 and cast once.
        """
        from ..adapters import require_slots
        from ..merge import KEPT_AS_CONSTANTS, unmerged_tags
        from ..passes.fold_params import FoldParams
        from ..passes.merge_reparam import MergeReparam, select_adapters

        whole_weights(self, "cm.merge()")
        require_slots(self, "cm.merge()")
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
                             training=self.training, dynamic=self.dynamic, verify=self.verify, params=table,
                             exports=self._exports)  # same source model: it rewrites this model's kept export
        # Prefixes and prompts are activations, not weights: they stay, frozen, as constants (peftc/merge.py).
        read = {n.target for n in merged.graph_module.graph.nodes if n.op == "get_attr"}
        unmerged = sorted({n for n in chosen & read if table[n].method not in KEPT_AS_CONSTANTS}
                          | set(unmerged_tags(merged.graph_module, chosen)))
        if unmerged:
            raise PassError(f"merge: no merge rule matched how `{unmerged[0]}` is applied"
                            + (f" (and {len(unmerged) - 1} more)" if len(unmerged) > 1 else "")
                            + "; leave its module out of adapters=[...] or add a rule to MERGE_RULES")
        return merged

    def update_and_allocate(self, global_step: int):
        """AdaLoRA's rank-budget step, as HF PEFT's `model.base_model.update_and_allocate(step)`: call it after
        loss.backward() and before zero_grad() (peftc/methods/adalora.py). Returns the RankAllocator."""
        from ..methods.adalora import update_and_allocate

        return update_and_allocate(self, global_step)

    def merge_and_unload(self) -> nn.Module:
        """A copy of the original model (its own class, e.g. LlamaForCausalLM) with every adapter merged into its
        weights and nothing of peftc inside; the original model and this one stay as they are. Prefix and prompt
        tuning cannot be merged into weights and raise PeftcError (docs/huggingface.md)."""
        from ..unload import merge_and_unload

        return merge_and_unload(self)

    def generate(self, input_ids: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
                 **options: Any) -> torch.Tensor:
        """transformers' `generate` (greedy, sampling or beam search) on the compiled graphs, adapters active and
        unmerged; soft prompts' virtual tokens go in the prefill (or encoder) graph only.

        A prefill graph and a one-token decode graph with the KV cache as tensors are captured on first use through
        this model's pipeline; each new token costs one token's forward (peftc/generate.py, docs/huggingface.md).
        Returns the token ids as transformers does: prompt + new tokens (decoders), start token + new tokens
        (encoder-decoders).
        """
        from ..generate import generate

        return generate(self, input_ids, attention_mask, options)

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
        from ..adapters import extra_trainable

        return [live_tensor(self, p) for p in self.params if p.trainable] + extra_trainable(self)

    def parameter_counts(self) -> tuple[int, int]:
        """(trainable, total) parameter counts; total counts the base model plus adapters."""
        return self.params.count(trainable=True), self.params.count()

    def print_trainable_parameters(self) -> None:
        """Print the trainable and total parameter counts as HF PEFT does (parameter_counts() returns them)."""
        trainable, total = self.parameter_counts()
        print(f"trainable params: {trainable:,} || all params: {total:,} || trainable%: {100 * trainable / total:.4f}")

    # ---- ONNX ------------------------------------------------------------------------------------------------
    @property
    def example_inputs(self) -> tuple[tuple, dict[str, Any]]:
        """The (args, kwargs) the model was compiled with, as peftc calls it (what ONNX export traces on)."""
        args, kwargs = self._example
        return args, call_kwargs(self._source, kwargs)

    def graph_for(self, *args: Any, **kwargs: Any) -> GraphModule:
        """The graph that serves this call signature and these shapes in the current train/eval mode, captured if
        it is new."""
        return self._graph_and_method_graph(args, kwargs)[0]

    def method_graph_for(self, *args: Any, **kwargs: Any) -> GraphModule:
        """graph_for's capture before the training passes: what lowerings read (ONNX, adapter files). It computes
        what the served graph computes, without prune-grads' autograd functions, recomputation or a fused loss."""
        return self._graph_and_method_graph(args, kwargs)[1]

    def _graph_and_method_graph(self, args: tuple, kwargs: dict[str, Any]) -> tuple[GraphModule, GraphModule]:
        kwargs = call_kwargs(self._source, kwargs)
        key = self._key(args, kwargs)
        with _CAPTURE_LOCK:
            graphs = self._graphs.get(key, [])
            # The key has no sizes: a graph captured with dynamic=False (or specialized) holds only its own.
            i = next((i for i, gm in enumerate(graphs) if _takes_sizes(gm, args, kwargs)), None)
            if i is None:
                self._lower(args, kwargs, reuse=not graphs)
                i = len(self._graphs[key]) - 1
            return self._graphs[key][i], self._method_graphs[key][i]

    def export_onnx(self, path, merged: bool = True, dynamic: bool | None = None, opset: int | None = None,
                    verify: bool = True, adapters: str | None = None, progress=None):
        """Lower to an optimized ONNX file at `path`, checked against this model in onnxruntime.

        merged=True folds the adapters into the base weights (same graph as the base model). merged=False with
        adapters="inputs" makes every LoRA A / scaled B a graph input (default zero) for onnxruntime's multi-LoRA;
        adapters=None keeps them as initializers. Batch and sequence axes are dynamic when the model was compiled
        with dynamic shapes (the default; dynamic=False exports the example's shapes).
        verify=True runs onnxruntime on the example inputs and a second shape and raises ExportError past
        1e-4 * max(1, max|reference|) (fp32). The file appears only when everything succeeded.
        Returns an ExportReport (node counts, max difference, file size).
        """
        from ..adapters import require_slots, serving_slots
        from .onnx import export_compiled

        whole_weights(self, "cm.export_onnx()")
        if dynamic is None:
            dynamic = self.dynamic
        elif dynamic and not self.dynamic:
            raise ExportError("cm.export_onnx(dynamic=True): this model was compiled with dynamic=False, so its graphs "
                              "hold the example inputs' shapes; export with dynamic=False, or compile with "
                              "dynamic=True for dynamic batch and sequence axes")
        if adapters != "inputs":
            require_slots(self, "cm.export_onnx()")  # the adapter is baked in: it must be what cm computes
        with serving_slots(self):  # several adapters loaded: the compiled graphs, with the adapter in the slots
            return export_compiled(self, path, merged=merged, adapters=adapters, dynamic=dynamic, opset=opset,
                                   verify=verify, progress=progress)

    def export_onnx_adapter(self, path, onnx_model=None, name: str | None = None) -> int:
        """Write the current adapter (or loaded adapter `name`) as an onnxruntime `.onnx_adapter` file (LoRA
        scaling folded into B; a LoRA adapter of smaller rank or fewer targets zero-padded to the inputs).

        With `onnx_model` (a file from export_onnx(merged=False, adapters="inputs")), names, shapes and dtypes are
        checked against its adapter inputs first; onnxruntime checks none of them. Returns the file size.
        """
        if name is not None:
            from ..adapters import export_onnx_adapter

            return export_onnx_adapter(self, path, name, onnx_model)
        from ..adapters import serving_slots
        from .onnx import export_compiled_adapter

        with serving_slots(self):
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
