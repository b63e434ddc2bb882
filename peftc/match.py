"""Matching: find the matmuls whose weight is a parameter, in every form capture produces, and select them.

A site is one matmul node. It knows the module path adapters are named after, the weight it reads, and how the
weight is laid out, whatever the source wrote: `nn.Linear` and `F.linear(x, self.weight)` arrive as
`aten.linear(x, W)` with W (out, in); GPT-2's Conv1D as `aten.addmm(b, x, W)` with W (in, out); `x @ W` as `mm` /
`matmul`; `torch.einsum("bsi,oi->bso", x, W)` as `einsum` with the layout read off the equation.
"""

from __future__ import annotations

import difflib
import re
from dataclasses import dataclass
from typing import Iterable

import torch
from torch.fx import GraphModule, Node

from .capture import ModelInfo
from .errors import SpecError
from .params import BASE, ParamTable
from .spec import Target

aten = torch.ops.aten
REWRITTEN = "peftc.rewritten"  # node.meta of a method's W' = rewrite_weight(W): the base parameter W's name

# Ops that only re-lay a 2-d weight: walking through them flips (or keeps) the orientation.
_FLIPS = {aten.t.default, aten.numpy_T.default}
_KEEPS = {aten.to.dtype, aten.to.dtype_layout, aten._to_copy.default, aten.alias.default, aten.detach.default,
          aten.contiguous.default, aten.clone.default}


@dataclass(frozen=True)
class MatmulSite:
    node: Node  # the matmul
    x_path: tuple[int, ...]  # where the activation operand sits in node.args
    weight: str  # the parameter it reads (the get_attr target)
    module: str  # the module path targets match against
    in_features: int
    out_features: int
    form: str  # linear | addmm | mm | matmul | einsum
    # einsum only: the equation and the weight's subscripts (contracted index, output index)
    # Where adapter tensors live: `<module>.lora_A.weight`, as HF PEFT names them. A weight that is not a module's
    # `weight` (`mlp.w1`, read functionally) is itself a tensor, so its adapters go beside it (`mlp.w1_adapter`).
    adapter_prefix: str = ""
    equation: str | None = None
    weight_subscripts: tuple[str, str] | None = None
    weight_in_out: bool = False  # the parameter is stored (in, out), as GPT-2's Conv1D stores it

    @property
    def x(self) -> Node:
        """The activation operand as the graph has it now: an earlier rewrite may have replaced it."""
        arg = self.node.args
        for i in self.x_path:
            arg = arg[i]
        return arg


@dataclass(frozen=True)
class ConvSite:
    """One convolution whose weight is a base parameter: `aten.conv{1,2,3}d` (either overload) or a
    non-transposed `aten.convolution`. HF PEFT names its adapters after the module, as for a matmul."""

    node: Node
    weight: str
    module: str
    adapter_prefix: str
    in_features: int  # input channels
    out_features: int  # output channels
    kernel: tuple[int, ...]
    stride: list[int]
    padding: list[int] | str
    dilation: list[int]
    groups: int
    form: str = "conv"

    @property
    def x(self) -> Node:
        return self.node.args[0]


_CONVS = {aten.conv1d.default, aten.conv2d.default, aten.conv3d.default, aten.conv1d.padding,
          aten.conv2d.padding, aten.conv3d.padding}


def conv_sites(gm: GraphModule, table: ParamTable, info: ModelInfo) -> list[ConvSite]:
    """Every convolution of the captured model whose weight is a base parameter, in graph order."""
    sites = []
    for node in gm.graph.nodes:
        if node.op != "call_function" or "peftc.pass" in node.meta:
            continue
        if node.target in _CONVS:
            x, w, _b, stride, padding, dilation, groups = (*node.args, *[None] * 7)[:7]
        elif node.target == aten.convolution.default and not node.args[6]:
            x, w, _b, stride, padding, dilation, _t, _op, groups = node.args
        else:
            continue
        weight = w.target if w.op == "get_attr" else w.meta.get(REWRITTEN)  # OFT's W' is still W's site
        if weight not in table or table[weight].role != BASE:
            continue
        shape = table[weight].tensor.shape
        n = len(shape) - 2
        groups = groups or 1
        sites.append(ConvSite(node, weight, *_module_path(node, weight, info), in_features=shape[1] * groups,
                              out_features=shape[0], kernel=tuple(shape[2:]), stride=list(stride or [1] * n),
                              padding=padding if padding is not None else [0] * n,
                              dilation=list(dilation or [1] * n), groups=groups))
    return sites


def rewritten_weight(node: Node) -> str | None:
    """The base parameter W when `node` is a pass's W + delta (sparse-delta, bitfit, ...) or a method's
    W' = rewrite_weight(W) (OFT's rotation): its site is still W's, laid out as W, so a later rule on it (the next
    active adapter's, in insert-adapters) finds it."""
    delta = node.meta.get("peftc.delta")
    return delta["param"] if delta is not None else node.meta.get(REWRITTEN)


def _weight_source(node: Node, table: ParamTable) -> tuple[str, bool] | None:
    """(parameter name, flipped) when `node` is a 2-d base parameter, possibly transposed or cast."""
    flipped = False
    while node.op == "call_function":
        base = rewritten_weight(node)
        if base is not None:
            entry = table[base]
            return (base, flipped) if entry.role == BASE and entry.tensor.dim() == 2 else None
        if node.target in _FLIPS:
            flipped = not flipped
        elif node.target == aten.transpose.int and sorted(a % 2 for a in node.args[1:3]) == [0, 1]:
            flipped = not flipped
        elif node.target == aten.permute.default and list(node.args[1]) in ([1, 0], [-1, -2], [1, -2], [-1, 0]):
            flipped = not flipped
        elif node.target not in _KEEPS:
            return None
        node = node.args[0]
    if node.op != "get_attr" or node.target not in table:
        return None
    entry = table[node.target]
    if entry.role != BASE or entry.tensor.dim() != 2:
        return None
    return node.target, flipped


def _module_path(node: Node, weight: str, info: ModelInfo) -> tuple[str, str]:
    """(module path, adapter prefix) of an adapter on this weight, as HF PEFT names it.

    A tied weight is reachable under several names; pick the one owned by the module the op ran in.
    """
    stack = node.meta.get("nn_module_stack") or {}
    innermost = list(stack.values())[-1][0] if stack else ""
    # export may read a tied weight under a later alias (lm_head.weight) than the key aliases has
    names = info.aliases.get(weight) or next((v for v in info.aliases.values() if weight in v), (weight,))
    chosen = next((n for n in names if n.rpartition(".")[0] == innermost), names[0])
    owner, _, leaf = chosen.rpartition(".")
    return (owner, owner) if leaf == "weight" and owner else (chosen, chosen + "_adapter")


def _einsum_site(node: Node, table: ParamTable):
    equation, operands = node.args[0], node.args[1]
    if len(operands) != 2 or "..." in equation or "->" not in equation:
        return None
    inputs, output = equation.replace(" ", "").split("->")
    subs = inputs.split(",")
    for w_idx in (1, 0):
        source = _weight_source(operands[w_idx], table)
        if source is None or len(subs[w_idx]) != 2:
            continue
        x_subs, w_subs = subs[1 - w_idx], subs[w_idx]
        contracted = [c for c in w_subs if c in x_subs and c not in output]
        kept = [c for c in w_subs if c in output and c not in x_subs]
        if len(contracted) != 1 or len(kept) != 1:
            return None
        return (1, 1 - w_idx), source, (contracted[0], kept[0]), equation.replace(" ", ""), w_subs
    return None


def matmul_sites(gm: GraphModule, table: ParamTable, info: ModelInfo) -> list[MatmulSite]:
    """Every matmul of the captured model whose weight is a base parameter, in graph order.

    Nodes added by peftc passes are skipped: an adapter's own matmuls are not sites.
    """
    sites = []
    for node in gm.graph.nodes:
        if node.op != "call_function" or "peftc.pass" in node.meta:
            continue
        form = x_path = source = None
        equation = subscripts = None
        if node.target == aten.linear.default:
            form, x_path, source = "linear", (0,), _weight_source(node.args[1], table)
            transposed = False
        elif node.target in (aten.addmm.default, aten.mm.default, aten.matmul.default):
            form = str(node.target).split(".")[1]
            x_path = (1,) if form == "addmm" else (0,)
            source, transposed = _weight_source(node.args[x_path[0] + 1], table), True
        elif node.target == aten.einsum.default:
            found = _einsum_site(node, table)
            if found:
                x_path, source, subscripts, equation, w_subs = found
                form, transposed = "einsum", w_subs.index(subscripts[0]) == 0
        if form is None or source is None:
            continue
        weight, flipped = source
        rows, cols = table[weight].tensor.shape
        if transposed != flipped:  # weight laid out (in, out)
            rows, cols = cols, rows
        module, prefix = _module_path(node, weight, info)
        sites.append(MatmulSite(node, x_path, weight, module, in_features=cols, out_features=rows, form=form,
                                adapter_prefix=prefix, equation=equation, weight_subscripts=subscripts,
                                weight_in_out=transposed != flipped))
    return sites


def _suffixes(path: str) -> list[str]:
    parts = path.split(".")
    return [".".join(parts[i:]) for i in range(len(parts))]


def _matches(target: str | tuple[str, ...], path: str) -> bool:
    """A regex full-matches the path or one of its dotted suffixes (so `q_proj|v_proj` works, and every path
    HF PEFT's full match selects is still selected), or, when it starts with `^`, the whole path only (HF PEFT's
    rule); a list matches names exactly or as a dotted suffix."""
    if isinstance(target, str):
        if target.startswith("^"):
            return re.fullmatch(target, path) is not None
        return any(re.fullmatch(target, suffix) for suffix in _suffixes(path))
    return any(path == t or path.endswith("." + t) for t in target)


def all_linear_modules(info: ModelInfo) -> set[str]:
    """HF PEFT's "all-linear": every nn.Linear / Conv1D module except the output layer (get_output_embeddings), and
    except the classifier head (`score` / `classifier`) only when the task type is "SEQ_CLS"."""
    if info.output_layer is not None:
        excluded = {info.output_layer}
    elif info.task_type == "SEQ_CLS" and info.classifier_head is not None:
        excluded = {info.classifier_head}
    else:
        excluded = set()
    return set(info.linear_modules) - excluded


def select(sites: Iterable[MatmulSite], target: Target, exclude: Target, info: ModelInfo,
           where: str) -> list[MatmulSite]:
    """Apply HF PEFT's `target_modules` semantics (plus `exclude`) to module paths; raise if nothing matches."""
    sites = list(sites)
    paths = list(dict.fromkeys(s.module for s in sites))
    if target == "all-linear":
        chosen = {p for p in paths if p in all_linear_modules(info)}
    else:
        chosen = {p for p in paths if _matches(target, p)}
    if exclude is not None:
        chosen = {p for p in chosen if not _matches(exclude, p)}
    head = info.classifier_head
    if info.task_type == "SEQ_CLS" and head is not None:  # trained in full (modules_to_save), so never adapted
        chosen = {p for p in chosen if p != head and not p.startswith(head + ".")}
    if not chosen:
        raise SpecError(no_match_message(where, target, exclude, paths))
    return [s for s in sites if s.module in chosen]


def no_match_message(where: str, target: Target, exclude: Target, paths: list[str]) -> str:
    wanted = [target] if isinstance(target, str) else list(target or [])

    def score(path: str) -> float:
        leaf = path.rpartition(".")[2]
        return max(max(difflib.SequenceMatcher(None, t, path).ratio(),
                       difflib.SequenceMatcher(None, t.rpartition(".")[2], leaf).ratio()) for t in wanted)

    close = sorted(paths, key=score, reverse=True)[:5]
    leaves = sorted({p.rpartition(".")[2] for p in paths})
    excluded = f" after exclude={exclude!r}" if exclude is not None else ""
    return (f"{where}: target={target!r} matches no matmul{excluded}. Closest module paths: "
            f"{', '.join(close) if close else '(the model has no matmul with a parameter weight)'}"
            f" ({len(paths)} candidates; leaf names: {', '.join(leaves[:12])})")
