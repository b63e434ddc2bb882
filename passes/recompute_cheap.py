"""recompute-cheap: outs = region(x, W) ==> outs = run_region(plan, x, W)   (plan: which ops backward keeps)

The default schedule when there is no memory budget: backward recomputes what costs (almost) no FLOPs and keeps
what would. In every region of a repeated block (schedule_recompute.block_regions) that holds a low-rank product
(a matmul contracting over at most 1/4 of the region's largest contraction: LoRA's B(Ax)), forward keeps the outputs
of its full-size matmuls, attention and random ops (kept_in_backward) and the region inputs they are recomputed from;
backward recomputes everything else: norms, activations, rotary, casts and the low-rank products. What autograd
would have saved of those (a norm's output, SiLU(gate), SiLU(gate)·up, the rotated q and k) is then not held from
forward to backward. peftc/region_recompute.py is the runtime: saved-tensor hooks and a recompute graph, no dispatch
mode. Decided from the graph alone, at capture, with no measured step (tests/test_recompute_cheap.py and
benchmarks/recompute.py measure what it saves):

- a region with nothing that needs a gradient is left alone (backward keeps nothing of it), and so is the last
  region to run (backward needs it first: recomputing it would only add its rerun to the peak);
- a region without a low-rank product is left alone: keeping every matmul output there would hold the base output
  and the adapter's output where autograd holds one sum;
- the extra FLOPs (the low-rank products run again) are predicted from the graph's shapes against a lower bound of
  the step's FLOPs (every matmul of the graph, forward, plus a backward matmul per operand that needs a gradient);
  while they exceed `flops` (2%) of it, the region that costs most is left out.

Gradients are unchanged to the bit: autograd's graph is forward's own, and backward reruns the same cheap ops on the
same inputs under the same autocast state (random ops are kept, never rerun).
"""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch.fx import GraphModule, Node

from peftc.errors import SpecError
from peftc.params import get_attr_path
from peftc.pipeline import Pass, PassContext, PassResult, register_pass
from peftc.region_recompute import RegionPlan, run_region
from peftc.rewrite import call_in_place_of, interleaved_reader

from .schedule_recompute import BLOCK_KEY, REGION_KEY, SAVE_KEY, block_regions, never_rerun, submodule_name

NAME = "recompute-cheap"
MATMUL_RULE = "matmul>"  # a region's save rule `matmul>16`: keep the matmuls contracting over more than 16
_LOW_RANK = 4  # a matmul is low-rank when its contraction is at most 1/4 of the region's largest
_aten = torch.ops.aten
# graph op ==> (index of the argument whose last dim is contracted, index of the weight-like operand)
_MATMUL_NODES = {_aten.linear.default: (0, 1), _aten.mm.default: (0, 1), _aten.matmul.default: (0, 1),
                 _aten.bmm.default: (0, 1), _aten.addmm.default: (1, 2)}


@dataclass(frozen=True)
class _Matmul:
    node: Node
    k: int
    flops: int  # forward: 2 * (output elements) * k


def _size(n) -> int:
    """A dimension as an int: a SymInt by the size it was captured at (FLOP ratios do not depend on it)."""
    if isinstance(n, torch.SymInt):
        hint = n.node.hint
        return int(hint) if hint is not None else 2
    return int(n)


def _rows(node) -> int | None:
    """Elements of `node`'s value per last-dim entry (the tokens, for a [batch, seq, features] activation). Nodes a
    pass inserted carry no shape: a linear or pointwise op has its first input's rows."""
    while isinstance(node, Node):
        val = node.meta.get("val")
        if isinstance(val, torch.Tensor):
            return math.prod(_size(d) for d in val.shape[:-1])
        node = node.args[0] if node.op == "call_function" and node.args else None
    return None


def _matmul(gm: GraphModule, node: Node) -> _Matmul | None:
    if node.op != "call_function" or node.target not in _MATMUL_NODES:
        return None
    x, w = (node.args[i] for i in _MATMUL_NODES[node.target])
    out, xval = node.meta.get("val"), x.meta.get("val") if isinstance(x, Node) else None
    if isinstance(out, torch.Tensor) and isinstance(xval, torch.Tensor) and xval.dim():
        k = _size(xval.shape[-1])
        return _Matmul(node, k, 2 * k * math.prod(_size(d) for d in out.shape))
    rows = _rows(x)
    if node.target is not _aten.linear.default or not isinstance(w, Node) or w.op != "get_attr" or rows is None:
        return None
    weight = get_attr_path(gm, w.target)  # [out, in]
    return _Matmul(node, weight.shape[-1], 2 * rows * weight.numel())


def kept_in_backward(gm: GraphModule, node: Node, max_cheap_k: int) -> bool:
    """Whether backward keeps `node`'s output rather than recomputing it: a matmul contracting over more than
    `max_cheap_k`, attention, another op FlopCounterMode counts (convolution), a random op (kept, so nothing is
    replayed), and any call that is not an aten op or getitem (its cost is not known)."""
    from torch.utils.flop_counter import flop_registry

    if never_rerun(node):
        return True
    if not isinstance(node.target, torch._ops.OpOverload):  # getitem, or prune-grads' causal SDPA: attention
        return node.target is not operator.getitem
    m = _matmul(gm, node)
    if m is not None:
        return m.k > max_cheap_k
    name = node.target.__name__
    return "attention" in name or node.target._overloadpacket in flop_registry


def _writes_in_place(node: Node) -> bool:
    schema = getattr(node.target, "_schema", None)
    return schema is not None and schema.is_mutable


def needs_grad(gm: GraphModule, ctx: PassContext) -> set[Node]:
    """The nodes whose value carries a gradient: those computed from a trainable parameter."""
    trainable = {p.name for p in ctx.params if p.trainable}
    out: set[Node] = set()
    for node in gm.graph.nodes:
        if node.op == "get_attr":
            if node.target in trainable:
                out.add(node)
        elif node.op == "call_function" and any(a in out for a in node.all_input_nodes):
            val = node.meta.get("val")
            if not isinstance(val, torch.Tensor) or val.is_floating_point():
                out.add(node)
    return out


def step_flops_lower_bound(gm: GraphModule, grad: set[Node]) -> int:
    """FLOPs one training step spends at least: every matmul of the graph in forward, and in backward once more for
    each of its two operands that needs a gradient."""
    total = 0
    for node in gm.graph.nodes:
        m = _matmul(gm, node)
        if m is not None:
            operands = [node.args[i] for i in _MATMUL_NODES[node.target]]
            total += m.flops * (1 + sum(isinstance(a, Node) and a in grad for a in operands))
    return total


@register_pass
@dataclass(frozen=True)
class RecomputeCheap(Pass):
    """recompute-cheap: outs = region(x, W) ==> outs = run_region(plan, x, W): norms, activations, rotary, casts
    and low-rank products recomputed in backward; full-size matmul, attention and random ops' outputs kept.

    `flops`: the most extra FLOPs it may add, as a fraction of the step's (predicted from the graph). Training graphs
    only. A graph that schedule-recompute (or this pass) already scheduled is left as it is.
    """

    name: ClassVar[str] = NAME
    stage: ClassVar[str] = "training"
    flops: float = 0.02

    def __post_init__(self):
        if isinstance(self.flops, bool) or not isinstance(self.flops, (int, float)) or not 0 <= self.flops < 1:
            raise SpecError(f"{NAME}: flops is the most extra FLOPs as a fraction of the step's, in [0, 1) "
                            f"(e.g. 0.02); got {self.flops!r}")

    def choose(self, gm: GraphModule, ctx: PassContext) -> tuple[str, ...]:
        """The regions to recompute, as schedule-recompute{regions=...} names them (`model.layers.1#0:matmul>4`)."""
        regions = block_regions(gm, ctx.info)
        grad = needs_grad(gm, ctx)
        chosen: list[tuple[str, int, int]] = []  # (region, max cheap contraction, extra FLOPs)
        for name, nodes in list(regions.items())[:-1]:
            if not any(n in grad for n in nodes) or any(_writes_in_place(n) for n in nodes) or \
                    interleaved_reader(gm.graph, nodes) is not None:
                continue  # nothing to save for backward; a rerun would apply an in-place write twice (T5); or an
                # op outside the region runs between its ops and reads their values (it cannot run as one call)
            matmuls = [m for m in (_matmul(gm, n) for n in nodes) if m is not None]
            largest = max((m.k for m in matmuls), default=0)
            cheap = [m for m in matmuls if m.k * _LOW_RANK <= largest]
            if cheap:
                chosen.append((name, max(m.k for m in cheap), sum(m.flops for m in cheap)))
        allowed = self.flops * step_flops_lower_bound(gm, grad)
        while chosen and sum(c[2] for c in chosen) > allowed:
            chosen.remove(max(chosen, key=lambda c: c[2]))
        return tuple(f"{name}:{MATMUL_RULE}{k}" for name, k, _ in chosen)

    def run(self, gm: GraphModule, ctx: PassContext) -> PassResult:
        if not ctx.training or any(BLOCK_KEY in n.meta for n in gm.graph.nodes):
            return PassResult(gm, False)
        chosen = self.choose(gm, ctx)
        if not chosen:
            return PassResult(gm, False)
        regions = block_regions(gm, ctx.info)
        for spec in chosen:
            name, _, rule = spec.partition(":")
            nodes = regions[name]
            kept = {n.name for n in nodes if kept_in_backward(gm, n, int(rule[len(MATMUL_RULE):]))}
            call = call_in_place_of(gm, nodes, submodule_name(name), lambda graph: RegionPlan(graph, kept),
                                    run_region, pass_name=NAME)
            call.meta.update({REGION_KEY: name, SAVE_KEY: (rule,), BLOCK_KEY: name.partition("#")[0]})
        ctx.count(f"{NAME}.regions", len(chosen))
        return PassResult(gm, True)
