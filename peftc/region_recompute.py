"""The runtime of recompute-cheap's regions: forward keeps the outputs of the costly ops and none of the tensors
autograd saves from the cheap ones; backward's first use of a dropped tensor recomputes the region's cheap ops.

    outs = region(x, W...)  ==>  outs = run_region(plan, x, W...)

The plan knows from the graph which ops are kept (full-size matmuls, attention, random ops, anything of unknown cost)
and which are cheap (norms, activations, rotary, casts, low-rank products). Its forward graph is the region's graph
with a bookkeeping call after each op, run under autograd's saved-tensor hooks:

- a saved tensor whose storage is a cheap op's output is dropped; the hook keeps only (op, view layout);
- anything else (a kept op's output, a region input, a parameter, an op's internal buffer) is kept as it is;
- at the region's end, forward keeps the region inputs and kept outputs that the dropped tensors are computed from.

Backward recomputes, without autograd and under the autocast state forward ran with, exactly the dropped ops' values
(a graph built once per set of dropped ops) and hands each saved tensor back in its own layout; autograd's graph is
the one forward built, so gradients are unchanged to the bit. Random ops are kept, never rerun, so no RNG replay is
needed. Unlike torch's selective checkpointing there is no dispatch mode: no Python runs per op, only per saved
tensor and per graph node.
"""

from __future__ import annotations

import contextlib
import weakref

import torch
from torch.fx import Graph, GraphModule, Node

_DEVICES = ("cpu", "cuda")

# The memory-budget planner's calibration step sets this to see each region's ops as they run: an object with
# start(plan), op(name, value) after each op, and finish(plan, dropped) with the ops whose outputs forward dropped.
observer = None


class RegionPlan(torch.nn.Module):
    """One region of a training graph: its forward graph with bookkeeping, and how to recompute its cheap ops."""

    def __init__(self, region: Graph, kept: set[str]):
        super().__init__()
        self.kept = frozenset(kept)
        self.region = region
        self.plain = GraphModule(torch.nn.Module(), region, class_name="Region")
        self.inputs = [n.name for n in region.nodes if n.op == "placeholder"]
        self.forward_graph = GraphModule(torch.nn.Module(), _with_bookkeeping(region, self.kept),
                                         class_name="RecomputeRegion")
        # cheap op ==> (indices of the region inputs, names of the kept ops) its value is computed from
        self.sources: dict[str, tuple[frozenset[int], frozenset[str]]] = {}
        index = {name: i for i, name in enumerate(self.inputs)}
        for node in region.nodes:
            if node.op != "call_function" or node.name in self.kept:
                continue
            ins, keeps = set(), set()
            for a in node.all_input_nodes:
                if a.op == "placeholder":
                    ins.add(index[a.name])
                elif a.name in self.kept:
                    keeps.add(a.name)
                else:
                    ins |= self.sources[a.name][0]
                    keeps |= self.sources[a.name][1]
            self.sources[node.name] = (frozenset(ins), frozenset(keeps))
        self._recompute: dict[frozenset[str], GraphModule] = {}

    def recompute_graph(self, wanted: frozenset[str]) -> GraphModule:
        """(the region inputs, then the kept values it needs, in plan order) ==> the values of the cheap ops `wanted`."""
        if wanted not in self._recompute:
            ins, keeps = _sources(self, wanted)
            rerun = rerun_ops(self.region, wanted, self.kept)
            graph = Graph()
            env = {name: graph.placeholder(name) for name in [self.inputs[i] for i in ins] + keeps}
            for node in self.region.nodes:
                if node.name in rerun:
                    env[node.name] = graph.node_copy(node, lambda a: env[a.name])
            graph.output(tuple(env[name] for name in sorted(wanted)))
            self._recompute[wanted] = GraphModule(torch.nn.Module(), graph, class_name="RecomputeCheapOps")
        return self._recompute[wanted]


def rerun_ops(region: Graph, wanted, kept) -> set[str]:
    """The ops backward runs again to recompute the values of `wanted`: they and their ancestors, up to the region
    inputs and the `kept` ops."""
    needed: set[str] = set(wanted)
    rerun: set[str] = set()
    for node in reversed(list(region.nodes)):
        if node.name in needed and node.name not in kept and node.op == "call_function":
            rerun.add(node.name)
            needed.update(a.name for a in node.all_input_nodes)
    return rerun


def _sources(plan: RegionPlan, wanted) -> tuple[list[int], list[str]]:
    ins, keeps = set(), set()
    for name in wanted:
        i, k = plan.sources[name]
        ins |= i
        keeps |= k
    return sorted(ins), sorted(keeps)


def _with_bookkeeping(region: Graph, kept: frozenset[str]) -> Graph:
    """The region's graph taking a frame first, with `_seen(frame, v, name)` after each cheap op and
    `_kept(frame, v, name)` after each kept one."""
    graph = Graph()
    frame = graph.placeholder("peftc_frame")
    env: dict[Node, Node] = {}
    for node in region.nodes:
        env[node] = graph.node_copy(node, env.__getitem__)
        if node.op == "call_function":
            graph.call_function(_kept if node.name in kept else _seen, (frame, env[node], node.name))
    return graph


class _Saved:
    """What the pack hook returns: the tensor itself, or (once resolved) the cheap op it is a view of."""

    __slots__ = ("tensor", "name", "item", "size", "stride", "offset")

    def __init__(self, tensor):
        self.tensor = tensor
        self.name = None


def _storage(t: torch.Tensor) -> int:
    return t.untyped_storage().data_ptr()


class _Frame:
    """One call of a region: what forward keeps, and the recomputed values while backward needs them."""

    def __init__(self, plan: RegionPlan, inputs: tuple):
        self.plan = plan
        self.inputs = inputs
        self.kept: dict[str, object] = {}
        # storage ==> (cheap op, item, the output's storage offset, a weak reference to the output)
        self.where: dict[int, tuple] = {}
        self.pending: list[_Saved] = []
        self.dropped: list[_Saved] = []
        self.values: dict[str, object] | None = None
        self.left: dict[str, int] = {}
        self.autocast = [(d, torch.is_autocast_enabled(d), torch.get_autocast_dtype(d)) for d in _DEVICES]

    def pack(self, t):
        if not isinstance(t, torch.Tensor) or t.layout != torch.strided or t.numel() == 0:
            return t
        s = _Saved(t)
        where = self._where(t)
        if where is not None:
            self._drop(s, where)
        else:
            self.pending.append(s)  # maybe the output of the op running now: resolved when it returns
        return s

    def _where(self, t: torch.Tensor):
        """(cheap op, item, offset) whose output `t`'s storage is; None when none is, or when that output is gone
        (its memory may hold another tensor now)."""
        where = self.where.get(_storage(t))
        return where if where is not None and where[3]() is not None else None

    def _drop(self, s: _Saved, where) -> None:
        t = s.tensor
        s.name, s.item, base_offset, _ = where
        s.size, s.stride, s.offset = tuple(t.shape), tuple(t.stride()), t.storage_offset() - base_offset
        s.tensor = None
        self.dropped.append(s)

    def seen(self, value, name: str) -> None:
        several = isinstance(value, (tuple, list))
        for j, v in enumerate(value if several else (value,)):
            if isinstance(v, torch.Tensor) and v.layout == torch.strided and v.numel():
                self.where[_storage(v)] = (name, j if several else None, v.storage_offset(), weakref.ref(v))
        if self.pending:
            for s in self.pending:
                where = self._where(s.tensor)
                if where is not None and where[0] == name:
                    self._drop(s, where)
            self.pending.clear()

    def finish(self) -> None:
        """Keep what the dropped tensors are recomputed from, and nothing else."""
        self.where, self.pending = {}, []
        if not self.dropped:
            self.inputs, self.kept = (), {}
            return
        self.wanted = frozenset(s.name for s in self.dropped)
        ins, keeps = _sources(self.plan, self.wanted)
        self.inputs = [*(self.inputs[i] for i in ins), *(self.kept[k] for k in keeps)]  # what recompute reads
        self.kept = {}

    def unpack(self, s):
        if not isinstance(s, _Saved):
            return s
        if s.tensor is not None:
            return s.tensor
        if self.values is None or s.name not in self.values:  # first use, or used again after being freed
            self._recompute()
        value = self.values[s.name]
        if s.item is not None:
            value = value[s.item]
        self.left[s.name] -= 1
        if not self.left[s.name]:
            del self.values[s.name]
            if not self.values:
                self.values = None
        if s.size == tuple(value.shape) and s.stride == tuple(value.stride()) and not s.offset:
            return value
        return value.as_strided(s.size, s.stride, value.storage_offset() + s.offset)

    def _recompute(self) -> None:
        graph = self.plan.recompute_graph(self.wanted)
        with torch.no_grad(), contextlib.ExitStack() as autocast:
            for device, enabled, dtype in self.autocast:  # forward's state, where it differs from backward's
                if enabled or torch.is_autocast_enabled(device):
                    autocast.enter_context(torch.autocast(device, dtype=dtype, enabled=enabled))
            outs = graph.forward(*self.inputs)  # not __call__: module hooks see no call in backward
        self.values = dict(zip(sorted(self.wanted), outs))
        self.left = {}
        for s in self.dropped:
            self.left[s.name] = self.left.get(s.name, 0) + 1


def _seen(frame: _Frame, value, name: str) -> None:
    frame.seen(value, name)
    if observer is not None:
        observer.op(name, value)


def _kept(frame: _Frame, value, name: str) -> None:
    if observer is not None:
        observer.op(name, value)
    frame.kept[name] = value
    frame.pending.clear()  # what it saved is its own output or its inputs' kept data: kept as it is


def run_region(plan: RegionPlan, *inputs):
    """The region's outputs, keeping for backward only what `plan` says (module docstring)."""
    if not torch.is_grad_enabled():
        return plan.plain(*inputs)
    frame = _Frame(plan, inputs)
    if observer is not None:
        observer.start(plan)
    with torch.autograd.graph.saved_tensors_hooks(frame.pack, frame.unpack):
        outs = plan.forward_graph(frame, *inputs)
    frame.finish()
    if observer is not None:
        observer.finish(plan, frame.wanted if frame.dropped else frozenset())
    return outs

