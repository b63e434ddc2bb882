"""Recompute planning: the fewest checkpointed blocks whose measured training-step peak fits a memory budget.

The planner measures, not models: it runs one training step (peftc.memory.measure_step) on the example inputs
with 0, 1, 2, ... of the model's repeated blocks under schedule-recompute and keeps the first count that fits.
"""

from __future__ import annotations

import re
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch.fx import GraphModule

from .errors import PeftcError, SpecError
from .instrument import Verify
from .memory import _fmt_bytes, measure_step
from .pipeline import PassContext, Pipeline

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
class RecomputePlan:
    """What the planner chose: `blocks` run again in backward; `peaks[k]` is the measured peak with the first k
    blocks recomputed (measured up to the chosen count, or for every count when none fit)."""

    budget: int
    blocks: tuple[str, ...]
    available: tuple[str, ...]
    peaks: tuple[int, ...]

    @property
    def peak(self) -> int:
        return self.peaks[len(self.blocks)]

    def __str__(self) -> str:
        measured = ", ".join(f"{k} blocks: {_fmt_bytes(p)}" for k, p in enumerate(self.peaks))
        what = (f"recompute {len(self.blocks)} of {len(self.available)} blocks in backward "
                f"({', '.join(self.blocks)})" if self.blocks else
                f"no recomputation needed ({len(self.available)} blocks available)")
        return (f"memory budget {_fmt_bytes(self.budget)} ({self.budget:,} bytes): {what}; peak of one training "
                f"step {_fmt_bytes(self.peak)} (measured: {measured})")


def plan_recompute(cm, budget: int | str) -> RecomputePlan:
    """Schedule recomputation on a CompiledModel so that one training step on its example inputs peaks within
    `budget` bytes; append the chosen `schedule-recompute{blocks=k}` to its pipeline and record the plan on
    `cm.recompute_plan`. Raises PeftcError when even recomputing every block does not fit."""
    from .passes.schedule_recompute import ScheduleRecompute

    budget = parse_bytes(budget)
    if any(isinstance(p, ScheduleRecompute) for p in cm.pipeline.passes):
        raise SpecError("the pipeline already has schedule-recompute; give either it or a memory budget")
    available = repeated_block_paths(cm)
    peaks: list[int] = []
    for k in range(len(available) + 1):
        peaks.append(peak_with_blocks(cm, k))
        if peaks[-1] <= budget:
            break
    else:
        best = min(range(len(peaks)), key=peaks.__getitem__)
        raise PeftcError(f"memory budget {_fmt_bytes(budget)} ({budget:,} bytes) is too small: the smallest peak of "
                         f"one training step on the example inputs is {_fmt_bytes(peaks[best])} ({peaks[best]:,} "
                         f"bytes, recomputing {best} of {len(available)} repeated blocks); raise the budget or shrink "
                         f"the batch or sequence")
    k = len(peaks) - 1
    if k:
        chosen = ScheduleRecompute(blocks=k)
        with _training(cm) as base:  # recorded like every other pass: cm.report() and cm.diff() show it
            scheduled = _scheduled(base, chosen, cm, [cm.diff_ir], start=len(cm.pipeline.passes))
            cm._replace_graph(base, scheduled)
        cm.pipeline = Pipeline((*cm.pipeline.passes, chosen))  # graphs captured from now on get it too
    plan = RecomputePlan(budget, available[:k], available, tuple(peaks))
    cm.recompute_plan = plan
    return plan


def repeated_block_paths(cm) -> tuple[str, ...]:
    """The repeated blocks (ModuleList children) of a CompiledModel's training graph, in the order they run."""
    from .passes.schedule_recompute import repeated_blocks

    with _training(cm) as base:
        return tuple(repeated_blocks(base, cm._info))


def peak_with_blocks(cm, k: int) -> int:
    """The measured peak bytes of one training step on the example inputs with the first `k` repeated blocks
    recomputed (peftc.memory.measure_step). `cm` is left as it was, its gradients None."""
    from .passes.schedule_recompute import ScheduleRecompute

    args, kwargs = cm.example_inputs
    with _training(cm) as base:
        trial = base if k == 0 else _scheduled(base, ScheduleRecompute(blocks=k), cm)
        cm._replace_graph(base, trial)
        try:
            with torch.random.fork_rng(devices=[]):  # the caller's RNG stream is not the planner's to advance
                return measure_step(cm, args, kwargs).peak_bytes
        finally:
            cm._replace_graph(trial, base)
            for p in cm.trainable_parameters():
                p.grad = None


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
