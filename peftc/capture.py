"""Capture: model + example inputs ==> GraphModule whose `get_attr` nodes read the parameter table.

torch.export (non-strict) is the only front end: `torch.fx.symbolic_trace` fails on transformers models. The
exported module keeps parameters as `get_attr` nodes under their original qualified names and
`node.meta["nn_module_stack"]` names the module each op came from; that is all matching needs.
"""

from __future__ import annotations

import inspect
import re
import traceback
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import nn
from torch.export import Dim
from torch.fx import GraphModule
from torch.utils import _pytree as pytree

from .errors import CaptureError
from .params import BASE, BUFFER, ParamTable, get_attr_path


@dataclass(frozen=True)
class ModelInfo:
    """What the passes need to know about the source model that the graph does not say."""

    class_name: str
    # Every name a parameter is reachable under (tied weights have several), keyed by the name export uses.
    aliases: dict[str, tuple[str, ...]]
    # Module path of the output layer (HF's get_output_embeddings), excluded by "all-linear".
    output_layer: str | None
    module_types: dict[str, str]
    # HF PEFT's "all-linear" candidates: paths of nn.Linear / transformers Conv1D modules.
    linear_modules: frozenset[str] = frozenset()
    # The classifier head (`score` or `classifier` attribute of the model), which HF PEFT treats specially for
    # task_type="SEQ_CLS", and the spec's task type (HF PEFT's TaskType name).
    classifier_head: str | None = None
    task_type: str | None = None
    # Modules whose 3-d expert weights are stored (experts, in, out): transformers' `is_transposed` (GPT-OSS).
    transposed_experts: frozenset[str] = frozenset()

    @classmethod
    def of(cls, model: nn.Module, task_type: str | None = None) -> "ModelInfo":
        by_id: dict[int, list[str]] = {}
        for name, p in model.named_parameters(remove_duplicate=False):
            by_id.setdefault(id(p), []).append(name)
        aliases = {names[0]: tuple(names) for names in by_id.values()}
        output_layer = None
        get_out = getattr(model, "get_output_embeddings", None)
        if callable(get_out):
            try:
                out_mod = get_out()
            except Exception:  # models that do not implement it raise NotImplementedError and the like
                out_mod = None
            if out_mod is not None:
                output_layer = next((n for n, m in model.named_modules() if m is out_mod), None)
        types = {n: type(m).__name__ for n, m in model.named_modules()}
        linear_types: tuple[type, ...] = (nn.Linear,)
        try:
            from transformers.pytorch_utils import Conv1D
            linear_types += (Conv1D,)
        except ImportError:  # transformers is optional
            pass
        linear = frozenset(n for n, m in model.named_modules() if isinstance(m, linear_types))
        heads = (getattr(model, name, None) for name in ("score", "classifier"))  # HF PEFT's SEQ_CLS_HEAD_NAMES
        head = next((h for h in heads if isinstance(h, nn.Module)), None)
        head_path = next((n for n, m in model.named_modules() if m is head), None) if head is not None else None
        transposed = frozenset(n for n, m in model.named_modules() if getattr(m, "is_transposed", False) is True)
        return cls(type(model).__name__, aliases, output_layer, types, linear, head_path, task_type, transposed)


def call_kwargs(model: nn.Module, kwargs: dict[str, Any]) -> dict[str, Any]:
    """The kwargs peftc captures and calls with: decoders run without a KV cache unless asked for one.

    A KV cache is for generation; fine-tuning never reads it, and transformers' cache objects are not pytrees.
    """
    kwargs = dict(kwargs)
    try:
        params = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return kwargs
    if "use_cache" in params and "use_cache" not in kwargs:
        kwargs["use_cache"] = False
    return kwargs


class _EntryPoint(nn.Module):
    """`model` seen by torch.export with the call's keywords as named parameters, optionally entering through
    its submodule `entry` (e.g. "model", the backbone of a causal LM) instead of `model.forward`.

    It shares the model's parameters, buffers and submodules, so the graph names them exactly as the model does.
    Named parameters work around torch.export 2.13, which cannot match dynamic shapes to keywords that land in a
    `**kwargs` parameter ("Must provide a tree_name when there might be a mismatch").
    """

    def __init__(self, model: nn.Module, entry: str | None, args: tuple, kwargs: dict[str, Any]):
        super().__init__()
        for state in ("_parameters", "_buffers", "_non_persistent_buffers_set", "_modules"):
            self.__dict__[state] = model.__dict__[state]
        self.training = model.training
        run = model.forward if entry is None else get_attr_path(model, entry)
        P = inspect.Parameter
        try:  # positional inputs keep their names: passes look for placeholders such as `input_ids`
            declared = [p.name for p in inspect.signature(run).parameters.values()
                        if p.kind in (P.POSITIONAL_ONLY, P.POSITIONAL_OR_KEYWORD)]
        except (TypeError, ValueError):
            declared = []
        names = [declared[i] if i < len(declared) else f"arg{i}" for i in range(len(args))]
        signature = inspect.Signature([P(n, P.POSITIONAL_ONLY) for n in names]
                                      + [P(name, P.KEYWORD_ONLY) for name in kwargs])

        def forward(*args: Any, **kwargs: Any) -> Any:
            return run(*args, **kwargs)

        forward.__signature__ = signature
        self.forward = forward


def _lands_in_var_keyword(model: nn.Module, kwargs: dict[str, Any]) -> bool:
    try:
        params = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return False
    named = {n for n, p in params.items() if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
    return any(k not in named for k in kwargs)


def _dynamic_shapes(model: nn.Module, args: tuple, kwargs: dict[str, Any], dynamic: bool):
    """Every dimension of every tensor input is Dim.AUTO: export keeps what the model lets vary, specializes
    the rest (hidden sizes, and any size-1 dim)."""
    if not dynamic:
        return None

    def spec(x):
        return {i: Dim.AUTO for i in range(x.dim())} if isinstance(x, torch.Tensor) else None

    try:
        bound = inspect.signature(model.forward).bind(*args, **kwargs).arguments
    except TypeError as e:
        raise CaptureError(f"the example inputs do not fit {type(model).__name__}.forward: {e}") from None
    return {name: pytree.tree_map(spec, value) for name, value in bound.items()}


def _explain(model: nn.Module, kwargs: dict[str, Any], err: Exception) -> str:
    """Turn an export failure into: which model, which operation, and the likely fix."""
    msg = str(err).strip()
    first = next((line for line in msg.splitlines() if line.strip()), type(err).__name__)
    frames = traceback.extract_tb(err.__traceback__)
    user = [f for f in frames if "site-packages/torch" not in f.filename and "/peftc/" not in f.filename
            and not f.filename.startswith("<")]
    where = f" at {user[-1].filename}:{user[-1].lineno} (`{user[-1].line}`)" if user else ""
    fix = "check that the model runs eagerly on the example inputs"
    if re.search(r"Cache|past_key_values", msg):
        fix = "pass use_cache=False (decoder models return a KV cache that cannot be captured)"
    elif re.search(r"data.dependent|GuardOnDataDependent|Could not guard", msg):
        fix = ("the model branches on tensor values; make the branch static or pass the value as a Python "
               "constant")
    elif re.search(r"Constraints violated|specializ", msg):
        fix = "give example inputs whose batch and sequence sizes are >= 2, or pass dynamic=False"
    elif re.search(r"pytree|not a known type", msg):
        fix = "return tensors, tuples, lists, dicts or ModelOutputs from forward"
    return (f"could not capture {type(model).__name__} with torch.export: {type(err).__name__}: {first[:300]}"
            f"{where}. Likely fix: {fix}.")


def _distinct_inputs(args: tuple, kwargs: dict[str, Any]) -> tuple[tuple, dict[str, Any]]:
    """Copies for input tensors that share storage with an earlier input (`input_ids=ids, labels=ids`).

    torch.export bakes input aliasing into the graph: captured with one tensor for both, the graph would keep
    reading `input_ids` where later calls pass other `labels`, and compute a silently wrong loss.
    """
    seen: set[int] = set()

    def distinct(x):
        if not isinstance(x, torch.Tensor) or x.device.type == "meta":
            return x
        ptr = x.untyped_storage().data_ptr()
        if ptr in seen:
            return x.clone()
        seen.add(ptr)
        return x

    return pytree.tree_map(distinct, (tuple(args), dict(kwargs)))


def export(model: nn.Module, args: tuple, kwargs: dict[str, Any], *, dynamic: bool = True,
           entry: str | None = None) -> torch.export.ExportedProgram:
    """model(*args, **kwargs) ==> torch.export's ExportedProgram, as torch.export made it: what capture() rewrites.

    Kept, it lets capture(..., exported=...) build the graph of another adapter configuration or a merge without
    exporting again; capture never changes it. The model is exported in its current train/eval mode and under the
    caller's autocast. `entry` names a submodule to run instead (the backbone), its parameters still named from
    `model`.
    """
    args, kwargs = _distinct_inputs(args, kwargs)
    target = model
    if entry is not None or _lands_in_var_keyword(model, kwargs):
        target = _EntryPoint(model, entry, tuple(args), kwargs)
    try:
        return torch.export.export(target, tuple(args), dict(kwargs), strict=False,
                                   dynamic_shapes=_dynamic_shapes(target, tuple(args), dict(kwargs), dynamic))
    except Exception as e:
        raise CaptureError(_explain(model, kwargs, e)) from e


def admits(exported: torch.export.ExportedProgram, args: tuple, kwargs: dict[str, Any]) -> bool:
    """Whether the input sizes of `exported` take these inputs: each static size equal, each dynamic one in its range
    and equal to the sizes export found equal to it. The guards beyond ranges (a size's parity, say) are
    input_guards'."""
    from torch.export._tree_utils import reorder_kwargs

    try:
        spec = exported.call_spec.in_spec
        kwargs = reorder_kwargs(dict(kwargs), spec) if spec is not None else dict(kwargs)
        flat, _ = pytree.tree_flatten_with_path((tuple(args), kwargs))
        # ExportedProgram.__call__'s own input check (private in torch 2.13): raises when the sizes do not fit
        exported._check_input_constraints(flat)
    except Exception:  # any other structure, or a torch without the check: export anew rather than guess
        return False
    return True


def input_guards(gm: GraphModule) -> Callable[[tuple, dict[str, Any]], bool]:
    """The guards torch.export put in a captured graph (its `_guards_fn` call, the first thing it runs), as a check
    of a call's inputs that needs neither the graph nor a run of it: True when they pass."""
    from torch.fx._pytree import tree_flatten_spec

    node = next(iter(gm.graph.find_nodes(op="call_module", target="_guards_fn")), None)
    if node is None:
        return lambda args, kwargs: True
    guards, spec = get_attr_path(gm, node.target), gm._in_spec
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    picks = [(placeholders.index(a), None) if isinstance(a, torch.fx.Node) else (None, a) for a in node.args]

    def check(args: tuple, kwargs: dict[str, Any]) -> bool:
        try:
            leaves = tree_flatten_spec((list(args), dict(kwargs)), spec)  # as the exported module's forward does
            guards(*(leaves[i] if i is not None else value for i, value in picks))
        except Exception:  # AssertionError("Guard failed: ..."), or inputs of another structure
            return False
        return True

    return check


def capture(model: nn.Module, args: tuple, kwargs: dict[str, Any], table: ParamTable, *,
            dynamic: bool = True, entry: str | None = None,
            exported: torch.export.ExportedProgram | None = None) -> GraphModule:
    """Export `model(*args, **kwargs)` and bind every tensor the graph reads to the shared parameter table.

    The model is captured in its current train/eval mode and under the caller's autocast, which the graph then
    needs at every call; the caller sets both. `entry` names a submodule to run instead (the backbone), its
    parameters still named from `model`. `exported` (export()'s result for this model, mode and call form, whose
    sizes and guards take these inputs: admits, input_guards) is used instead of exporting again; the graph is a
    copy of its graph, so `exported` stays as it was.
    """
    ep = exported if exported is not None else export(model, args, kwargs, dynamic=dynamic, entry=entry)
    exported_module = ep.module()  # a deep copy of ep's graph, reading ep's tensors
    root: dict[str, Any] = {}
    for node in exported_module.graph.nodes:
        if node.op == "get_attr":
            obj = get_attr_path(exported_module, node.target)
            if isinstance(obj, torch.Tensor):
                obj = table.adopt(node.target, obj, BASE if isinstance(obj, nn.Parameter) else BUFFER)
            root[node.target] = obj
        elif node.op == "call_module":
            root[node.target] = get_attr_path(exported_module, node.target)
    # A plain GraphModule: the exported one refuses .train()/.eval(), and peftc owns the mode (one graph per mode).
    return GraphModule(root, exported_module.graph, class_name=f"{type(model).__name__}Graph")
