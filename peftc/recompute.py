"""Recompute planning: per-tensor save/recompute decisions that fit a training step into a byte budget.

1. Calibrate: cut each repeated block into regions at its residual points (schedule_recompute.block_regions) and
   measure two training steps on the example inputs with peftc.memory.measure_step, one with nothing recomputed
   and one with every region recomputed, marking each region boundary in forward and backward. The marks give,
   per region, the bytes it leaves alive and its peaks in forward and in backward; the recomputed regions report
   each op's output bytes and FLOPs, and which ops' outputs autograd saved (what backward recomputes).
2. Solve exactly: a mixed-integer program (scipy.optimize.milp, HiGHS) chooses per region whether backward
   recomputes it and, inside a recomputed region, which op outputs (matmuls, attention) forward keeps, minimizing
   the recomputed FLOPs subject to every forward and backward peak of the step fitting the budget.
3. Lower: schedule-recompute{regions=...}: each recomputed region runs as peftc.region_recompute.run_region,
   keeping exactly the chosen ops' outputs.
4. Close the loop: measure one real step; when it is over the budget, tighten by the excess and solve again.
"""

from __future__ import annotations

import gc
import re
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch.fx import GraphModule

import warnings

import numpy as np

from .errors import BudgetError, SpecError
from .instrument import Verify
from .memory import _fmt_bytes, _fmt_count, measure_step
from .pipeline import PassContext, Pipeline
from .region_recompute import rerun_ops

_MAX_ROUNDS = 4  # closed-loop re-plans before giving up
_DEFAULT_FLOPS = 0.02  # memory_budget="auto": recompute whatever lowers the peak within 2% more FLOPs

_UNITS = {"": 1, "b": 1, "k": 1000, "kb": 1000, "kib": 1024, "m": 1000 ** 2, "mb": 1000 ** 2, "mib": 1024 ** 2,
          "g": 1000 ** 3, "gb": 1000 ** 3, "gib": 1024 ** 3, "t": 1000 ** 4, "tb": 1000 ** 4, "tib": 1024 ** 4}


def parse_bytes(text: str | int, what: str = "memory budget") -> int:
    """`2GiB`, `512MiB`, `1.5GB`, `1048576` (or an int) ==> bytes (binary units with `i`, decimal without)."""
    if isinstance(text, int) and not isinstance(text, bool):
        value = text
    elif isinstance(text, str):
        m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", text)
        if m is None or m.group(2).lower() not in _UNITS:
            raise SpecError(f"{what} {text!r}: write a size such as 2GiB, 512MiB or 1000000 (bytes)")
        amount = float(m.group(1)) * _UNITS[m.group(2).lower()]
        if amount >= 2 ** 63:  # 400 nines is inf as a float; no budget is that large
            raise SpecError(f"{what} {text[:40]!r}{'...' if len(text) > 40 else ''}: too large; write a size "
                            f"such as 2GiB")
        value = int(amount)
    else:
        raise SpecError(f"{what} must be a number of bytes or a size such as '2GiB', got {type(text).__name__}")
    if value < 1:
        raise SpecError(f"{what} {text!r} must be at least one byte")
    return value


@dataclass(frozen=True)
class RegionPlan:
    """One region's decision: `recompute` in backward or keep what it saves; inside a recomputed region, forward
    keeps the outputs of `saved_ops` (`linear.3`: the region's 4th linear, schedule_recompute.op_keys) and backward
    recomputes what else it needs."""

    name: str
    recompute: bool
    kept_bytes: int
    """Bytes this region leaves alive from its forward until its backward (its output included)."""
    saved_ops: tuple[str, ...]
    recompute_flops: int
    """FLOPs backward spends running this region again (0 when it is not recomputed)."""
    why: str

    @property
    def spec(self) -> str:
        """The region as schedule-recompute{regions=...} writes it."""
        return self.name + (":" + "+".join(self.saved_ops) if self.saved_ops else "")


@dataclass(frozen=True)
class RecomputePlan:
    """What the planner chose and what one training step on the example inputs then held. Peaks are device
    bytes: parameters, buffers, inputs, optimizer state and the activation peak (which includes the gradients)."""

    budget: int | None
    """The budget in bytes; None for memory_budget="auto" (whatever lowers the peak within 2% more FLOPs)."""
    regions: tuple[RegionPlan, ...]
    predicted_peak: int
    measured_peak: int
    extra_flops: int
    """FLOPs the recomputation adds, as planned (torch.utils.flop_counter's count)."""
    measured_extra_flops: int
    base_flops: int
    """FLOPs of one unscheduled training step (forward + backward)."""
    breakdown: dict[str, int] = field(default_factory=dict)
    """Bytes of the measured peak: params, buffers, inputs, optimizer state, activations (gradients included),
    and the gradients alone."""
    tokens: int = 0
    """The token count planned for (the largest example input's number of elements)."""
    rounds: int = 1
    """Steps measured after planning (more than 1 when the first plan was over the budget and was tightened)."""

    @property
    def recomputed(self) -> tuple[str, ...]:
        return tuple(r.name for r in self.regions if r.recompute)

    def table(self) -> str:
        lines = [f"{'region':<24} {'decision':<10} {'kept':>10} {'recompute':>10}  why"]
        for r in self.regions:
            lines.append(f"{r.name:<24} {'recompute' if r.recompute else 'save':<10} {_fmt_bytes(r.kept_bytes):>10} "
                         f"{_fmt_count(r.recompute_flops) + 'FLOP' if r.recompute else '-':>10}  {r.why}")
        return "\n".join(lines)

    def __str__(self) -> str:
        budget = (f"memory budget {_fmt_bytes(self.budget)} ({self.budget:,} bytes)" if self.budget is not None
                  else f"memory budget auto (lowest peak within {_DEFAULT_FLOPS:.0%} more FLOPs)")
        parts = ", ".join(f"{k} {_fmt_bytes(v)}" for k, v in self.breakdown.items())
        what = (f"recompute {len(self.recomputed)} of {len(self.regions)} regions in backward" if self.recomputed
                else "no recomputation needed")
        return (f"{budget}: {what}; peak of "
                f"one training step on {self.tokens:,} tokens predicted {_fmt_bytes(self.predicted_peak)}, measured "
                f"{_fmt_bytes(self.measured_peak)} ({parts}); extra FLOPs {_fmt_count(self.extra_flops)} "
                f"({self.extra_flops / max(self.base_flops, 1):+.1%}; measured "
                f"{_fmt_count(self.measured_extra_flops)})" + (f"\n{self.table()}" if self.regions else ""))


# ---- calibration: two measured steps with region boundaries marked ------------------------------------------------

_recorder = None  # the _Recorder of the calibration step running now


class _Recorder:
    """What the boundary marks and the recomputed regions' ops saw during one calibration step; it is
    peftc.region_recompute's observer."""

    def __init__(self):
        self.forward: dict[int, tuple[int, int, int]] = {}  # mark ==> (live bytes, peak since last mark, FLOPs)
        self.backward: dict[int, tuple[int, int, int]] = {}
        self.ops: dict[int, list[_Op]] = {}  # region index (1-based) ==> its forward ops, in order
        self.plans: dict[int, object] = {}  # region index ==> its region_recompute.RegionPlan
        self.dropped: dict[int, frozenset[str]] = {}  # region index ==> the ops whose outputs forward dropped
        self._region = 0
        self._flops = 0

    @staticmethod
    def _modes():
        from torch.utils._python_dispatch import _get_current_dispatch_mode_stack

        return _get_current_dispatch_mode_stack()

    def _counted(self) -> int:
        counters = [m.counter for m in self._modes() if hasattr(m, "counter")]
        return counters[-1].get_total_flops() if counters else 0

    def mark(self, phase: str, index: int) -> None:
        from .memory import LiveStorageTracker

        tracker = next(m for m in self._modes() if isinstance(m, LiveStorageTracker))
        (self.forward if phase == "forward" else self.backward)[index] = (tracker.live_bytes, tracker.peak_bytes,
                                                                          self._counted())
        tracker.reset_peak()
        if phase == "forward":
            self._region = index + 1

    def start(self, plan) -> None:
        from .passes.schedule_recompute import op_keys

        self._keys, self._nodes = op_keys(plan.region.nodes), {n.name: n for n in plan.region.nodes}
        self._flops = self._counted()

    def op(self, name: str, value) -> None:
        flops = self._counted()
        self.ops.setdefault(self._region, []).append(_Op.of(self._keys[name], self._nodes[name], value,
                                                            flops - self._flops))
        self._flops = flops

    def finish(self, plan, dropped: frozenset[str]) -> None:
        self.plans[self._region], self.dropped[self._region] = plan, dropped


@dataclass(frozen=True)
class _Op:
    key: str
    name: str  # the node's name in its region's graph
    bytes: int
    flops: int  # as FlopCounterMode counts them
    weight: int  # what recomputing it costs in the objective: its FLOPs, or attention's where the counter has none
    savable: bool

    @staticmethod
    def of(key: str, node, value, flops: int) -> "_Op":
        from torch.utils._pytree import tree_leaves
        from torch.utils.flop_counter import sdpa_flop_count

        from .passes.schedule_recompute import never_rerun

        outs = [t for t in tree_leaves(value) if isinstance(t, torch.Tensor)]
        weight = flops
        if not flops and ("attention" in key or "sdpa" in key):  # CPU attention: the counter has no formula
            q, k, v = (a.meta["val"].shape for a in node.args[:3])
            weight = int(sdpa_flop_count(*(tuple(int(d.node.hint) if isinstance(d, torch.SymInt) else int(d)
                                                 for d in shape) for shape in (q, k, v))))
        # Ops with FLOPs (matmuls, attention) make new tensors: keeping one holds exactly its output.
        return _Op(key, node.name, sum(t.untyped_storage().nbytes() for t in outs), flops, weight,
                   bool(weight) and bool(outs) and not never_rerun(node))


class _Mark(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, index):
        ctx.index = index
        _recorder.mark("forward", index)
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        _recorder.mark("backward", ctx.index)
        return grad, None


def mark_boundary(x: torch.Tensor, index: int) -> torch.Tensor:
    """Record the calibration step's live bytes, peak and FLOPs here, in forward and again in backward."""
    return _Mark.apply(x, index)


@dataclass
class _Calibration:
    names: list[str]
    recorder: _Recorder
    report: object

    @property
    def forward(self) -> dict[int, tuple[int, int, int]]:
        return self.recorder.forward

    @property
    def backward(self) -> dict[int, tuple[int, int, int]]:
        return self.recorder.backward


def _calibrate(cm, base: GraphModule, recompute: bool, optimizer_state_bytes) -> _Calibration:
    """One measured step of `base` with every region boundary marked; with `recompute`, every region is recomputed
    keeping nothing but its random ops, and reports its ops."""
    global _recorder
    from . import region_recompute
    from .passes import schedule_recompute as sr
    from .pipeline import copy_graph_module

    gm = copy_graph_module(base)
    regions = sr.block_regions(gm, cm._info)
    if not regions:
        raise SpecError("a memory budget needs repeated blocks (ModuleList children such as model.layers.0) to "
                        "recompute; this model has none")
    names = list(regions)
    first = regions[names[0]]
    inside = set(first)
    entry = [a for a in dict.fromkeys(a for n in first for a in n.all_input_nodes)
             if a not in inside and a.op == "call_function" and all(u in set(sr.repeated_blocks(gm, cm._info)[
                 names[0].partition("#")[0]]) for u in a.users)]
    boundaries = [*entry[:1], *(regions[n][-1] for n in names)]
    offset = 1 if entry else 0
    for k, b in enumerate(boundaries):
        with gm.graph.inserting_after(b):
            m = gm.graph.call_function(mark_boundary, (b, k + 1 - offset))
        b.replace_all_uses_with(m, delete_user_cb=lambda user: user is not m)
    if recompute:
        for name in names:
            sr.ScheduleRecompute()._checkpoint(gm, name.partition("#")[0], regions[name], (), region=name)
    gm.recompile()
    recorder = _recorder = region_recompute.observer = _Recorder()
    args, kwargs = cm.example_inputs
    cm._replace_graph(base, gm)
    try:
        with torch.random.fork_rng(devices=[]):
            report = measure_step(cm, args, kwargs, optimizer_state_bytes=optimizer_state_bytes)
    finally:
        _recorder = region_recompute.observer = None
        cm._replace_graph(gm, base)
        for p in cm.trainable_parameters():
            p.grad = None
    return _Calibration(names, recorder, report)


# ---- the model and the mixed-integer program --------------------------------------------------------------------

class _Model:
    """Predicted activation peak and recomputed FLOPs of any choice, linear in the decision variables:
    x = [c_1..c_n (recompute region i), y_o (keep op o's output; o in a recomputed region)]."""

    def __init__(self, full: _Calibration, ckpt: _Calibration):
        self.names = full.names
        n = len(self.names)
        if 0 not in full.forward or any(i not in full.forward for i in range(1, n + 1)):
            raise SpecError("the memory-budget planner could not follow this model's blocks as one chain of "
                            "regions (a region boundary was not reached in forward)")
        lf = [full.forward[k][0] for k in range(n + 1)]
        lc = [ckpt.forward[k][0] for k in range(n + 1)]
        pf = [full.forward[k][1] for k in range(n + 1)]
        pc = [ckpt.forward[k][1] for k in range(n + 1)]
        self.lf, self.df = lf, [lf[i] - lf[i - 1] for i in range(1, n + 1)]
        self.dc = [lc[i] - lc[i - 1] for i in range(1, n + 1)]
        self.tf = [pf[i] - lf[i - 1] for i in range(1, n + 1)]
        self.tc = [pc[i] - lc[i - 1] for i in range(1, n + 1)]
        # Backward: the mark at boundary i-1 fires when region i's backward is done (inputs that need no grad
        # never fire: those regions are never recomputed).
        self.qf = [full.backward[i - 1][1] - lf[i - 1] if i - 1 in full.backward else None for i in range(1, n + 1)]
        self.qc = [ckpt.backward[i - 1][1] - lc[i - 1] if i - 1 in ckpt.backward else None for i in range(1, n + 1)]
        self.tail = max(full.backward[n][1] - lf[n], ckpt.backward[n][1] - lc[n]) if n in full.backward \
            else 0
        end = full.report.peak_bytes  # the peak after the last boundary backward reaches
        # The first region with trainable parameters takes an input that needs no grad: its backward runs after
        # the last mark, so its peak is the end's.
        first = next((i for i in range(1, n + 1) if i - 1 not in full.backward and i in full.backward), None)
        if first is not None and first - 1 not in ckpt.backward and first in ckpt.backward:
            self.qf[first - 1] = end - lf[first - 1]
            self.qc[first - 1] = ckpt.report.peak_bytes - lc[first - 1]
            end = None
        self.constants = [full.forward[0][1], *([end] if end is not None else []),
                          *([] if n in full.backward else [full.report.forward_peak_bytes])]
        self.base_flops = full.report.forward_flops + full.report.backward_flops
        self.fixed = full.report.device_peak_bytes - full.report.peak_bytes  # params, buffers, optimizer, inputs
        self.recompute_flops, self.ops, self.choosable = [], [], []
        recorder = ckpt.recorder
        self._rerun = []  # region ==> (its plan, what forward dropped, FLOPs of each op), for exact FLOPs
        for i in range(1, n + 1):
            ops, plan = recorder.ops.get(i, []), recorder.plans.get(i)
            dropped = recorder.dropped.get(i, frozenset())
            self._rerun.append((plan, dropped, {op.name: op.flops for op in ops}))
            # Backward reruns only what the dropped outputs are computed from: only those ops cost anything.
            rerun = rerun_ops(plan.region, dropped, plan.kept) \
                if plan is not None and i in full.backward and i in ckpt.backward else set()
            ops = [op for op in ops if op.name in rerun]
            self.recompute_flops.append((sum(op.flops for op in ops), sum(op.weight for op in ops)))
            self.ops.append([op for op in ops if op.savable])
            self.choosable.append(self.qf[i - 1] is not None and self.qc[i - 1] is not None
                                  and self.dc[i - 1] < self.df[i - 1])
        self.offsets = np.cumsum([0, n, *(len(o) for o in self.ops)])
        self.size = int(self.offsets[-1])

    def _y(self, i: int) -> range:  # variable indices of region i's ops (0-based i)
        return range(int(self.offsets[i + 1]), int(self.offsets[i + 2]))

    def rows(self) -> tuple[np.ndarray, np.ndarray]:
        """(A, k): every peak of the step is k + A @ x."""
        n, rows, consts = len(self.names), [], []
        prefix, base = np.zeros(self.size), float(self.lf[0])
        for i in range(n):
            own = np.zeros(self.size)
            own[i] = self.tc[i] - self.tf[i]
            for j, op in zip(self._y(i), self.ops[i]):
                own[j] = op.bytes
            rows.append(prefix + own), consts.append(base + self.tf[i])
            if self.qf[i] is not None:
                own = np.zeros(self.size)
                own[i] = self.qc[i] - self.qf[i]
                for j, op in zip(self._y(i), self.ops[i]):  # kept from forward on, not rerun where backward needs it
                    own[j] = op.bytes
                rows.append(prefix + own), consts.append(base + self.qf[i])
            prefix = prefix.copy()
            prefix[i] += self.dc[i] - self.df[i]
            for j, op in zip(self._y(i), self.ops[i]):
                prefix[j] += op.bytes
            base += self.df[i]
        rows.append(prefix), consts.append(base + self.tail)
        for c in self.constants:
            rows.append(np.zeros(self.size)), consts.append(float(c))
        return np.array(rows), np.array(consts)

    def costs(self) -> tuple[np.ndarray, np.ndarray]:
        """(objective weights, counted FLOPs) of x: what recomputing costs."""
        weight, flops = np.zeros(self.size), np.zeros(self.size)
        for i, (counted, weighted) in enumerate(self.recompute_flops):
            weight[i], flops[i] = weighted, counted
            for j, op in zip(self._y(i), self.ops[i]):
                weight[j], flops[j] = -op.weight, -op.flops
        return weight, flops

    def peak(self, x: np.ndarray) -> int:
        a, k = self.rows()
        return int(round(float(np.max(k + a @ x))))

    def solve(self, activation_budget: float | None, max_extra_flops: float | None = None) -> np.ndarray | None:
        """The cheapest choice whose every peak fits `activation_budget`; with None, the lowest peak (cheapest
        among those), within `max_extra_flops` when given. None when nothing fits."""
        from scipy.optimize import Bounds, LinearConstraint, milp

        a, k = self.rows()
        weight, flops = self.costs()
        n = len(self.names)
        upper = np.ones(self.size)
        upper[:n] = [1.0 if c else 0.0 for c in self.choosable]
        link = np.zeros((self.size - n, self.size))  # y_o <= c_region(o)
        for i in range(n):
            for j in self._y(i):
                link[j - n, j], link[j - n, i] = 1.0, -1.0
        scale = max(float(np.abs(weight).max()), 1.0)
        if activation_budget is not None:
            constraints = [LinearConstraint(a, -np.inf, activation_budget - k)]
            if len(link):
                constraints.append(LinearConstraint(link, -np.inf, 0.0))
            res = milp(weight / scale, integrality=np.ones(self.size), bounds=Bounds(0, upper),
                       constraints=constraints)
            return None if res.x is None else np.round(res.x)
        # Lowest peak: x plus the peak P; minimize P, then cost (a small weight that cannot outbid a byte).
        big = np.hstack([a, -np.ones((len(a), 1))])
        constraints = [LinearConstraint(big, -np.inf, -k)]
        if len(link):
            constraints.append(LinearConstraint(np.hstack([link, np.zeros((len(link), 1))]), -np.inf, 0.0))
        if max_extra_flops is not None:
            constraints.append(LinearConstraint(np.append(flops, 0.0)[None, :], -np.inf, max_extra_flops))
        objective = np.append(weight * (0.5 / max(float(np.abs(weight).sum()), 1.0)), 1.0)
        res = milp(objective, integrality=np.append(np.ones(self.size), 0), bounds=Bounds(0, np.append(upper, np.inf)),
                   constraints=constraints)
        return None if res.x is None else np.round(res.x[:-1])

    def rerun_flops(self, i: int, x: np.ndarray) -> int:
        """What backward spends running region i again, keeping the ops `x` chooses: exact, where the objective's
        sum counts every op a kept one is computed from as still rerun."""
        plan, dropped, flops = self._rerun[i]
        if x[i] < 0.5 or plan is None:
            return 0
        kept = {op.name for j, op in zip(self._y(i), self.ops[i]) if x[j] > 0.5}
        return sum(flops.get(name, 0) for name in rerun_ops(plan.region, dropped - kept, plan.kept | kept))

    def regions(self, x: np.ndarray) -> tuple[RegionPlan, ...]:
        out = []
        for i, name in enumerate(self.names):
            saved = tuple(op.key for j, op in zip(self._y(i), self.ops[i]) if x[j] > 0.5)
            saved_bytes = sum(op.bytes for j, op in zip(self._y(i), self.ops[i]) if x[j] > 0.5)
            if x[i] > 0.5:
                why = (f"saves {_fmt_bytes(self.df[i] - self.dc[i] - saved_bytes)}"
                       + (f"; keeps {len(saved)} matmul/attention outputs ({_fmt_bytes(saved_bytes)}) rather "
                          f"than recompute them" if saved else ""))
                out.append(RegionPlan(name, True, self.dc[i] + saved_bytes, saved, self.rerun_flops(i, x), why))
            else:
                why = ("no trainable parameter in or below it: backward keeps nothing of it to recompute"
                       if self.qf[i] is None else "recomputing it saves nothing" if not self.choosable[i] else
                       "fits the budget as it is")
                out.append(RegionPlan(name, False, self.df[i], (), 0, why))
        return tuple(out)

    def extra_flops(self, x: np.ndarray) -> int:
        return sum(self.rerun_flops(i, x) for i in range(len(self.names)))


# ---- the planner ------------------------------------------------------------------------------------------------

def plan_recompute(cm, budget: int | str | None, optimizer_state_bytes: int | None = None) -> RecomputePlan:
    """Schedule recomputation on a CompiledModel so that one training step on its example inputs fits `budget`
    bytes of device memory (parameters, buffers, inputs, optimizer state, activation peak), at the fewest extra
    FLOPs; budget "auto" (or None) lowers the peak as far as 2% more FLOPs allow. Appends the chosen
    `schedule-recompute{regions=...}` to its pipeline and records the plan on `cm.recompute_plan`. Raises
    BudgetError, with the smallest feasible budget, when nothing fits."""
    from .passes.recompute_cheap import RecomputeCheap
    from .passes.schedule_recompute import ScheduleRecompute

    if budget == "auto":
        budget = None
    budget = parse_bytes(budget) if budget is not None else None
    scheduled = next((p for p in cm.pipeline.passes if isinstance(p, (ScheduleRecompute, RecomputeCheap))), None)
    if scheduled is not None:
        raise SpecError(f"the pipeline already has {scheduled.name}; give either it or a memory budget (compile with "
                        f"memory_budget=..., which leaves recompute-cheap out)")
    # Each measured step collects garbage first; the compiler's own objects are many and live on, so keep them out
    # of those collections.
    gc.collect()
    gc.freeze()
    try:
        return _plan(cm, budget, optimizer_state_bytes)
    finally:
        gc.unfreeze()


def _plan(cm, budget: int | None, optimizer_state_bytes: int | None) -> RecomputePlan:
    from .passes.schedule_recompute import ScheduleRecompute

    from .passes.schedule_recompute import block_regions

    with _training(cm) as base:
        if budget is not None or not block_regions(base, cm._info):
            report = _measure(cm, base, base, optimizer_state_bytes)
            if budget is None or report.device_peak_bytes <= budget:  # fits as it is: nothing to plan
                return _record(cm, budget, (), report.device_peak_bytes, report, 0, report.forward_flops
                               + report.backward_flops, 1)
            if not block_regions(base, cm._info):
                raise BudgetError(
                    f"memory budget {_fmt_bytes(budget)} ({budget:,} bytes) is too small for one training step on "
                    f"the example inputs, which needs {report.device_peak_bytes:,} bytes "
                    f"({_fmt_bytes(report.device_peak_bytes)}), and the model has no repeated blocks (ModuleList "
                    f"children) to recompute; raise the budget to at least that, or shrink the batch or sequence",
                    report.device_peak_bytes)
        model = _Model(_calibrate(cm, base, False, optimizer_state_bytes),
                       _calibrate(cm, base, True, optimizer_state_bytes))
        fixed = model.fixed
        target = None if budget is None else budget - fixed
        rounds = 0
        while True:
            x = model.solve(target, None if target is not None else _DEFAULT_FLOPS * model.base_flops)
            lowest = x is None and rounds > 0  # tightened past every plan: the lowest-peak one may fit as measured
            if lowest:
                x = model.solve(None)
            if x is None:
                raise _budget_error(cm, base, model, budget, fixed, optimizer_state_bytes)
            regions = model.regions(x)
            chosen = ScheduleRecompute(regions=tuple(r.spec for r in regions if r.recompute)) \
                if any(r.recompute for r in regions) else None
            trial = base if chosen is None else _scheduled(base, chosen, cm)
            report = _measure(cm, base, trial, optimizer_state_bytes)
            rounds += 1
            if budget is None or report.device_peak_bytes <= budget or rounds >= _MAX_ROUNDS or lowest:
                break
            target -= report.device_peak_bytes - budget  # the model was optimistic by this much here
        if budget is not None and report.device_peak_bytes > budget:
            raise _budget_error(cm, base, model, budget, fixed, optimizer_state_bytes)
        if chosen is not None:  # recorded like every other pass: cm.report() and cm.diff() show it
            scheduled = _scheduled(base, chosen, cm, [cm.diff_ir], start=len(cm.pipeline.passes))
            cm._replace_graph(base, scheduled)
            cm.pipeline = Pipeline((*cm.pipeline.passes, chosen))  # graphs captured from now on get it too
    return _record(cm, budget, regions, fixed + model.peak(x), report, model.extra_flops(x), model.base_flops,
                   rounds)


def _record(cm, budget, regions, predicted: int, report, extra_flops: int, base_flops: int,
            rounds: int) -> RecomputePlan:
    plan = RecomputePlan(
        budget, regions, predicted_peak=predicted, measured_peak=report.device_peak_bytes, extra_flops=extra_flops,
        measured_extra_flops=report.forward_flops + report.backward_flops - base_flops, base_flops=base_flops,
        breakdown={"params": report.param_bytes, "buffers": report.buffer_bytes, "inputs": report.input_bytes,
                   "optimizer state": report.optimizer_state_bytes, "activations": report.peak_bytes,
                   "of which grads": report.grad_bytes},
        tokens=planned_tokens(*cm.example_inputs), rounds=rounds)
    cm.recompute_plan = plan
    return plan


def _measure(cm, base: GraphModule, trial: GraphModule, optimizer_state_bytes):
    """measure_step of `trial` served in place of `base`; `cm` is left as it was, its gradients None."""
    args, kwargs = cm.example_inputs
    cm._replace_graph(base, trial)
    try:
        with torch.random.fork_rng(devices=[]):  # the caller's RNG stream is not the planner's to advance
            return measure_step(cm, args, kwargs, optimizer_state_bytes=optimizer_state_bytes)
    finally:
        cm._replace_graph(trial, base)
        for p in cm.trainable_parameters():
            p.grad = None


def _budget_error(cm, base, model: _Model, budget, fixed: int, optimizer_state_bytes) -> BudgetError:
    """The error for a budget nothing fits, with the smallest budget that does: the lowest-peak plan, measured."""
    from .passes.schedule_recompute import ScheduleRecompute

    x = model.solve(None)
    regions = model.regions(x)
    recomputed = tuple(r.spec for r in regions if r.recompute)
    trial = _scheduled(base, ScheduleRecompute(regions=recomputed), cm) if recomputed else base
    smallest = max(_measure(cm, base, trial, optimizer_state_bytes).device_peak_bytes, fixed + model.peak(x))
    return BudgetError(
        f"memory budget {_fmt_bytes(budget)} ({budget:,} bytes) is too small for one training step on the example "
        f"inputs: the smallest feasible budget is {smallest:,} bytes ({_fmt_bytes(smallest)}), recomputing "
        f"{len(recomputed)} of {len(regions)} regions, of which parameters, buffers, inputs and optimizer state "
        f"are {_fmt_bytes(fixed)}; raise the budget to at least that, or shrink the batch or sequence",
        smallest)


def planned_tokens(args: tuple, kwargs: dict) -> int:
    """How many tokens a call carries, for the planner: the element count of its largest tensor input."""
    from .memory import _tensors

    return max((t.numel() for t in _tensors((args, kwargs))), default=0)


def check_tokens(cm, args: tuple, kwargs: dict) -> None:
    """Warn once when a training call carries more tokens than the recompute plan was made for."""
    plan = cm.recompute_plan
    if plan is None or getattr(cm, "_warned_tokens", False) or planned_tokens(args, kwargs) <= plan.tokens:
        return
    object.__setattr__(cm, "_warned_tokens", True)
    warnings.warn(f"this call has {planned_tokens(args, kwargs):,} tokens but the recompute plan was made for "
                  f"{plan.tokens:,} (predicted peak {_fmt_bytes(plan.predicted_peak)} at that size): activations grow "
                  f"with the tokens, so the step may exceed the memory budget; compile with the largest inputs you "
                  f"train on", stacklevel=3)


def recomputed_regions(cm) -> tuple[str, ...]:
    """The regions the training graph of a CompiledModel's example inputs recomputes in backward, as
    schedule-recompute{regions=...} names them (`model.layers.0#1:matmul>16`)."""
    from .passes.schedule_recompute import REGION_KEY, SAVE_KEY

    with _training(cm) as base:
        return tuple(n.meta[REGION_KEY] + (":" + "+".join(n.meta[SAVE_KEY]) if n.meta[SAVE_KEY] else "")
                     for n in base.graph.nodes if REGION_KEY in n.meta)


def repeated_block_paths(cm) -> tuple[str, ...]:
    """The repeated blocks (ModuleList children) of a CompiledModel's training graph, in the order they run."""
    from .passes.schedule_recompute import repeated_blocks

    with _training(cm) as base:
        return tuple(repeated_blocks(base, cm._info))


def peak_with_blocks(cm, blocks: int | tuple[str, ...]) -> int:
    """The measured activation peak bytes of one training step on the example inputs with the first `blocks`
    repeated blocks (or those named) recomputed whole (peftc.memory.measure_step). `cm` is left as it was."""
    from .passes.schedule_recompute import ScheduleRecompute

    with _training(cm) as base:
        trial = base if blocks in (0, ()) else _scheduled(base, ScheduleRecompute(blocks=blocks), cm)
        return _measure(cm, base, trial, None).peak_bytes


@contextmanager
def _training(cm):
    """`cm` in training mode, yielding the training graph of its example inputs (captured if new)."""
    was_training = cm.training
    cm.train()
    try:
        args, kwargs = cm.example_inputs
        yield cm.graph_for(*args, **kwargs)  # captured here, outside the meter: torch.export must not be measured
    finally:
        cm.train(was_training)


def _scheduled(base: GraphModule, p, cm, instruments=(), start: int = 0) -> GraphModule:
    """`base` with training pass `p` run on a copy of its graph (run_stages leaves `base` as it is); the copy reads
    the same tensors."""
    ctx = PassContext(cm.params, cm._info, training=True)
    return Pipeline((p,)).run_stages(base, ctx, [*([Verify()] if cm.verify else []), *instruments],
                                     start=start).training
