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
from typing import Any

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
        return cls(type(model).__name__, aliases, output_layer, types, linear, head_path, task_type)


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


def capture(model: nn.Module, args: tuple, kwargs: dict[str, Any], table: ParamTable, *,
            dynamic: bool = True) -> GraphModule:
    """Export `model(*args, **kwargs)` and bind every tensor the graph reads to the shared parameter table.

    The model is captured in its current train/eval mode; the caller sets the mode.
    """
    try:
        ep = torch.export.export(model, tuple(args), dict(kwargs), strict=False,
                                 dynamic_shapes=_dynamic_shapes(model, tuple(args), dict(kwargs), dynamic))
    except Exception as e:
        raise CaptureError(_explain(model, kwargs, e)) from e
    exported = ep.module()
    root: dict[str, Any] = {}
    for node in exported.graph.nodes:
        if node.op == "get_attr":
            obj = get_attr_path(exported, node.target)
            if isinstance(obj, torch.Tensor):
                obj = table.adopt(node.target, obj, BASE if isinstance(obj, nn.Parameter) else BUFFER)
            root[node.target] = obj
        elif node.op == "call_module":
            root[node.target] = get_attr_path(exported, node.target)
    # A plain GraphModule: the exported one refuses .train()/.eval(), and peftc owns the mode (one graph per mode).
    return GraphModule(root, exported.graph, class_name=f"{type(model).__name__}Graph")
