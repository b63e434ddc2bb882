"""Exact memory and FLOP measurement of one training step.

`LiveStorageTracker` is a `TorchDispatchMode` that sees every aten op run while it is active, forward and backward
alike, and keeps a weak reference to every tensor storage those ops create. The bytes of the storages still alive
are the step's activation memory; their maximum over the step is its peak. Parameters, buffers and inputs exist
before the step starts, so they are never counted as created; `measure_step` reports them separately.

`measure_step` runs one forward + backward of a module under the tracker and under
`torch.utils.flop_counter.FlopCounterMode`, and returns a `StepReport`. See docs/memory.md.
"""

from __future__ import annotations

import dataclasses
import gc
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from torch.utils.flop_counter import FlopCounterMode

from peftc.errors import PeftcError

__all__ = ["LiveStorageTracker", "MeasureError", "StepReport", "adamw_state_bytes", "default_loss", "measure_step",
           "storage_bytes"]


class MeasureError(PeftcError):
    """A training step could not be measured (no loss, a non-scalar loss, nothing requires grad, ...)."""


def _tensors(tree: Any) -> list[torch.Tensor]:
    """Every tensor in a nest of tuples, lists, dicts and dataclasses (HF ModelOutput included), in order."""
    if isinstance(tree, torch.Tensor):
        return [tree]
    if isinstance(tree, Mapping):
        items: Iterable[Any] = tree.values()
    elif isinstance(tree, (tuple, list)):
        items = tree
    elif dataclasses.is_dataclass(tree) and not isinstance(tree, type):
        items = (getattr(tree, f.name) for f in dataclasses.fields(tree))
    else:
        return []
    return [t for item in items for t in _tensors(item)]


def _storage_ref(t: torch.Tensor) -> StorageWeakRef | None:
    """A weak reference to the storage behind `t`, or None when `t` owns no real memory.

    Meta tensors and wrapper subclasses without a storage of their own hold no bytes; the tensors inside a wrapper
    subclass are created by ops this mode sees on their own.
    """
    if t.device.type == "meta":
        return None
    try:
        return StorageWeakRef(t.untyped_storage())
    except (RuntimeError, NotImplementedError):
        return None


def _storage_ids(leaves: Iterable[Any]) -> set[int]:
    """The `cdata` of the storages behind the tensors among `leaves`."""
    ids = set()
    for leaf in leaves:
        ref = _storage_ref(leaf) if isinstance(leaf, torch.Tensor) else None
        if ref is not None:
            ids.add(ref.cdata)
    return ids


def storage_bytes(tensors: Iterable[torch.Tensor]) -> int:
    """Bytes of the distinct storages behind `tensors`: views of one storage count once, and whole."""
    seen: dict[int, int] = {}
    for t in tensors:
        ref = _storage_ref(t)
        if ref is not None:
            seen[ref.cdata] = t.untyped_storage().nbytes()
    return sum(seen.values())


class LiveStorageTracker(TorchDispatchMode):
    """Counts the bytes of tensor storages created while the tracker is active and still alive.

    Use it as a context manager around any code, a whole training step included::

        with LiveStorageTracker() as tracker:
            loss = model(x).sum()
            at_end_of_forward = tracker.live_bytes
            loss.backward()
        print(tracker.peak_bytes)

    A storage counts as created by an op when the op returns it and it is not the storage of one of the op's tensor
    arguments (views, in-place ops and `out=` return their argument's storage). Storages that existed before the
    tracker started (parameters, buffers, inputs) are therefore never counted, nor are views of them. Each storage
    counts once however many views share it, with its full `nbytes()`.

    A storage is alive until its `StorageWeakRef` expires. The weak reference also keeps the C++ `StorageImpl`
    from being freed, so its address (`cdata`) cannot be reused by a new storage while we still track the old one.
    Liveness is checked after every op, while the op's inputs are still referenced by its arguments, so
    `peak_bytes` is the exact maximum of live bytes at op granularity. Memory that a kernel allocates and frees
    internally (workspaces), allocator rounding and caching are not storages and are not counted.
    """

    def __init__(self) -> None:
        super().__init__()
        self._live: dict[int, tuple[StorageWeakRef, int]] = {}
        self._live_bytes = 0
        self.peak_bytes = 0
        """The most bytes alive at once since the tracker started, or since the last `reset_peak()`."""

    def __enter__(self) -> LiveStorageTracker:
        # Under a dispatch mode the first call of some ops imports torch._dynamo, and that import leaves reference
        # cycles holding the frames of the running forward, with its activations, until the next garbage
        # collection: the first step measured in a process would read too high. Import it before tracking starts.
        import torch._dynamo  # noqa: F401

        return super().__enter__()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        # torch.tensor() builds its tensor outside the dispatcher and hands it to lift_fresh, so that argument is
        # new memory, not a pre-existing storage being aliased.
        if func is torch.ops.aten.lift_fresh.default:
            arg_storages: set[int] = set()
        else:
            arg_storages = _storage_ids(tree_leaves((args, kwargs)))
        self._sweep()
        for t in tree_leaves(out):
            ref = _storage_ref(t) if isinstance(t, torch.Tensor) else None
            if ref is None:
                continue
            # A new storage, or a tracked one that resize_ or out= may have grown; else an alias of an argument.
            if ref.cdata not in arg_storages or ref.cdata in self._live:
                self._set(ref, t.untyped_storage().nbytes())
        self.peak_bytes = max(self.peak_bytes, self._live_bytes)
        return out

    def _set(self, ref: StorageWeakRef, nbytes: int) -> None:
        _, old = self._live.get(ref.cdata, (ref, 0))
        self._live[ref.cdata] = (ref, nbytes)
        self._live_bytes += nbytes - old

    def _sweep(self) -> None:
        """Forget the storages that have died since the last op."""
        dead = [cdata for cdata, (ref, _) in self._live.items() if ref.expired()]
        for cdata in dead:
            self._live_bytes -= self._live.pop(cdata)[1]

    @property
    def live_bytes(self) -> int:
        """Bytes of the tracked storages alive now."""
        self._sweep()
        return self._live_bytes

    def tracked_bytes(self, tensors: Iterable[torch.Tensor]) -> int:
        """Bytes of the live tracked storages behind `tensors`, each storage once (e.g. the new `.grad`s)."""
        self._sweep()
        seen: set[int] = set()
        for t in tensors:
            ref = _storage_ref(t)
            if ref is not None and ref.cdata in self._live:
                seen.add(ref.cdata)
        return sum(self._live[cdata][1] for cdata in seen)

    def reset_peak(self) -> None:
        """Restart the peak from the bytes alive now, e.g. to measure the backward pass on its own."""
        self.peak_bytes = self.live_bytes


@dataclass(frozen=True)
class StepReport:
    """What one forward + backward step used. Bytes are storage bytes; FLOPs are as counted by FlopCounterMode."""

    peak_bytes: int
    """Most bytes alive at once during forward + backward, of storages the step created: activations, outputs,
    autograd temporaries and gradients. Parameters, buffers and inputs are not included."""
    forward_peak_bytes: int
    """Most bytes alive at once during the forward pass (loss included)."""
    saved_bytes: int
    """Bytes alive at the end of the forward pass that it created: what autograd saved for backward, plus the
    outputs and the loss."""
    grad_bytes: int
    """Bytes of the parameters' `.grad`s allocated during backward (part of `peak_bytes` too)."""
    param_bytes: int
    """Bytes of all parameters of the module."""
    trainable_param_bytes: int
    """Bytes of the parameters with `requires_grad`."""
    buffer_bytes: int
    """Bytes of the module's buffers."""
    input_bytes: int
    """Bytes of the tensors passed in `args` and `kwargs` that are not parameters or buffers."""
    forward_flops: int
    backward_flops: int
    optimizer_state_bytes: int = 0
    """Bytes an optimizer keeps per trainable parameter: AdamW's two fp32 moments unless told otherwise."""

    @property
    def device_peak_bytes(self) -> int:
        """What the device holds at the step's peak: parameters, buffers, inputs, optimizer state and the step's
        peak (activations, temporaries and the trainable parameters' gradients). A memory budget counts this."""
        return (self.param_bytes + self.buffer_bytes + self.input_bytes + self.optimizer_state_bytes
                + self.peak_bytes)

    def as_dict(self) -> dict[str, int]:
        return dataclasses.asdict(self)

    def __str__(self) -> str:
        return "\n".join([
            f"peak        {_fmt_bytes(self.peak_bytes)} (forward {_fmt_bytes(self.forward_peak_bytes)})",
            f"saved       {_fmt_bytes(self.saved_bytes)}",
            f"grads       {_fmt_bytes(self.grad_bytes)}",
            f"params      {_fmt_bytes(self.param_bytes)} (trainable {_fmt_bytes(self.trainable_param_bytes)})",
            f"buffers     {_fmt_bytes(self.buffer_bytes)}",
            f"inputs      {_fmt_bytes(self.input_bytes)}",
            f"optimizer   {_fmt_bytes(self.optimizer_state_bytes)} (state)",
            f"device peak {_fmt_bytes(self.device_peak_bytes)} (all of the above but saved and grads, which the "
            f"peak includes)",
            f"FLOPs       forward {_fmt_count(self.forward_flops)}, backward {_fmt_count(self.backward_flops)}",
        ])


def _fmt_bytes(n: int) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n} B"


def _fmt_count(n: int) -> str:
    for unit, scale in (("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.2f} {unit}"
    return str(n)


def default_loss(output: Any) -> torch.Tensor:
    """`output.loss` when there is one (HF ModelOutput), else the sum of the output or of its first tensor."""
    loss = getattr(output, "loss", None)
    if isinstance(loss, torch.Tensor):
        return loss
    tensors = _tensors(output)
    if not tensors:
        raise MeasureError(f"the module returned no tensor ({type(output).__name__}); pass loss_fn=")
    return tensors[0].sum()


def measure_step(
    module: torch.nn.Module,
    args: tuple = (),
    kwargs: dict[str, Any] | None = None,
    loss_fn: Callable[[Any], torch.Tensor] | None = None,
    optimizer_state_bytes: int | None = None,
) -> StepReport:
    """Run `loss_fn(module(*args, **kwargs)).backward()` once and report its memory and FLOPs.

    Side effects, none of them undone: every parameter's `.grad` (and that of every input tensor that requires
    grad) is set to None before the step, so that backward allocates them afresh and they can be measured; after
    the step they hold this step's gradients. The module is run in whatever train/eval mode it is in.

    Garbage collection runs before the step and at the end of forward, and is disabled otherwise, so that a
    collection at a random moment cannot change the numbers from one run to the next: `saved_bytes` counts only
    what is reachable, while the peaks include any cyclic garbage the step creates (an upper bound).

    The output and the loss stay referenced during backward, as in an ordinary training loop, so they count in
    `peak_bytes`. `loss_fn` runs inside the measured forward pass. `optimizer_state_bytes` (default: AdamW's, two
    fp32 values per trainable parameter) is counted in `device_peak_bytes`, as a memory budget counts it.
    """
    if not isinstance(module, torch.nn.Module):
        raise MeasureError(f"measure_step needs an nn.Module, got {type(module).__name__}")
    kwargs = kwargs or {}
    loss_fn = loss_fn or default_loss
    # A peftc CompiledModel captures a call signature on first use: capture before measuring, or the modes below
    # would trace torch.export's own work (and count symbolic FLOPs).
    capture = getattr(module, "graph_for", None)
    if callable(capture):
        capture(*args, **kwargs)
    params = list(module.parameters())
    buffers = list(module.buffers())
    state_storages = _storage_ids(params + buffers)
    inputs = [t for t in _tensors((args, kwargs)) if not _storage_ids([t]) <= state_storages]

    for t in params + inputs:
        if t.is_leaf and t.grad is not None:
            t.grad = None

    gc.collect()
    # Freeze what exists now, so that the collection after forward scans only what the step made (a full
    # collection of the heap torch and transformers leave costs ~0.3 s); a caller that froze the heap keeps it so.
    freeze = gc.get_freeze_count() == 0
    if freeze:
        gc.freeze()
    gc_was_enabled = gc.isenabled()
    gc.disable()
    try:
        with LiveStorageTracker() as tracker:
            with FlopCounterMode(display=False) as forward_counter:
                output = module(*args, **kwargs)
                loss = loss_fn(output)
            _check_loss(loss)
            # Count what forward keeps reachable, not cyclic garbage it left behind for a later collection.
            gc.collect()
            saved_bytes = tracker.live_bytes
            forward_peak_bytes = tracker.peak_bytes
            with FlopCounterMode(display=False) as backward_counter:
                loss.backward()
            grad_bytes = tracker.tracked_bytes(p.grad for p in params if p.grad is not None)
            peak_bytes = tracker.peak_bytes
    finally:
        if gc_was_enabled:
            gc.enable()
        if freeze:
            gc.unfreeze()

    return StepReport(
        peak_bytes=peak_bytes,
        forward_peak_bytes=forward_peak_bytes,
        saved_bytes=saved_bytes,
        grad_bytes=grad_bytes,
        param_bytes=storage_bytes(params),
        trainable_param_bytes=storage_bytes(p for p in params if p.requires_grad),
        buffer_bytes=storage_bytes(buffers),
        input_bytes=storage_bytes(inputs),
        forward_flops=forward_counter.get_total_flops(),
        backward_flops=backward_counter.get_total_flops(),
        optimizer_state_bytes=adamw_state_bytes(params) if optimizer_state_bytes is None else optimizer_state_bytes,
    )


def adamw_state_bytes(params: Iterable[torch.Tensor]) -> int:
    """AdamW's state: two fp32 moments per trainable parameter element."""
    return sum(8 * p.numel() for p in params if p.requires_grad)


def _check_loss(loss: Any) -> None:
    if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
        shape = tuple(loss.shape) if isinstance(loss, torch.Tensor) else type(loss).__name__
        raise MeasureError(f"loss_fn must return a one-element tensor, got {shape}")
    if not loss.requires_grad:
        raise MeasureError(
            "the loss does not require grad: no parameter or input of the step is trainable, so there is no "
            "backward pass to measure; mark a parameter trainable (requires_grad=True)")
