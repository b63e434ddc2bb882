"""peftc.compile(): capture ==> pipeline of passes ==> CompiledModel."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

from torch import nn

from .errors import PeftcError, SpecError
from .lower.eager import CompiledModel
from .pipeline import Instrument, Pipeline
from .recompute import parse_bytes, plan_recompute
from .spec import Rule, Spec


def compile(model: nn.Module, spec: Spec | Rule | str | Path | None, args: tuple = (),
            kwargs: dict[str, Any] | None = None, *, dynamic: bool = True, prune_grads: bool = True,
            fuse_loss: bool = True, recompute: bool = True, pipeline: Pipeline | str | None = None,
            verify: bool = True, instruments: Sequence[Instrument] = (),
            memory_budget: int | str | None = None, optimizer_state_bytes: int | None = None) -> CompiledModel:
    """Compile `model` for parameter-efficient fine-tuning as `spec` says.

    `args`/`kwargs` are example inputs: the model is captured with torch.export (non-strict) on them, with every
    dimension dynamic unless `dynamic=False` (sizes 1 specialize; give batch and sequence sizes >= 2). Other
    keyword sets and train/eval are captured on first use. `spec` is a Spec, a single rule, a .toml/.json
    path, or a saved adapter directory (HF PEFT's or peftc's; its weights are loaded). The spec's pipeline is its method passes (freeze-base, one pass per rule), then the training passes
    that change only how a training step runs (docs/optimize.md): prune-grads (nothing saved only for frozen
    weights, dropout masks replayed, not stored; `prune_grads=False` leaves it out) and fuse-linear-cross-entropy
    (a training step's cross-entropy loss computed in chunks of tokens without keeping the [tokens, vocab] logits,
    so `.logits` of a training call with labels raises PeftcError; `fuse_loss=False` computes them), then
    recompute-cheap (backward recomputes norms, activations, rotary and LoRA's low-rank products and keeps the
    full-size matmul and attention outputs, within 2% more FLOPs, decided from the graph; `recompute=False` leaves
    it out; a `memory_budget` replaces it with a planned schedule). Exports and
    merges never see training passes. `pipeline` overrides the spec's default pipeline
    (`"insert-lora{r=8,target=q_proj},prune-grads"`). `memory_budget` (bytes, or a size such as "2GiB"; default: the
    spec's `[memory] budget`, and `optimizer_state_bytes` likewise) is what the
    device may hold during one training step on the example inputs: parameters, buffers, inputs, optimizer state
    (AdamW's two fp32 moments per trainable parameter unless `optimizer_state_bytes=`) and the activation peak.
    The planner decides per region of each repeated block, and per matmul/attention output inside it, what
    backward recomputes, at the fewest extra FLOPs (an exact mixed-integer program over measured costs), checks
    one measured step against the budget, and appends the chosen `schedule-recompute{regions=...}`; the plan is
    `cm.recompute_plan`, a budget nothing fits raises BudgetError with the smallest that does. "auto" lowers the
    peak as far as 2% more FLOPs allow (docs/optimize.md).
    """
    if not isinstance(model, nn.Module):
        raise PeftcError(f"peftc.compile needs an nn.Module, got {type(model).__name__}")
    adapter = None  # a saved adapter directory: its spec, then its weights
    if isinstance(spec, (str, Path)):
        from .peft_format import adapter_dir, read_adapter

        adapter = adapter_dir(spec)
        spec = read_adapter(adapter)[0] if adapter is not None else Spec.load(spec)
    elif isinstance(spec, Rule):
        spec = Spec(spec)
    elif spec is not None and not isinstance(spec, Spec):
        raise SpecError(f"spec must be a peftc.Spec, a rule such as peftc.LoRA(...) or a spec file path, "
                        f"got {type(spec).__name__}")
    if spec is not None and spec.memory is not None:  # the spec's [memory] table; the keywords win
        memory_budget = spec.memory.budget if memory_budget is None else memory_budget
        if optimizer_state_bytes is None:
            optimizer_state_bytes = spec.memory.optimizer_state_bytes
    if isinstance(pipeline, str):
        pipeline = Pipeline.parse(pipeline)
    elif pipeline is None:
        if spec is None:
            raise SpecError("give a spec (e.g. peftc.LoRA(target='q_proj|v_proj')) or a pipeline")
        pipeline = Pipeline.for_spec(spec, prune_grads=prune_grads, fuse_loss=fuse_loss,
                                     recompute=recompute and memory_budget is None)
    if memory_budget is not None and memory_budget != "auto":
        memory_budget = parse_bytes(memory_budget)  # a bad budget fails before minutes of compiling
    if not isinstance(args, tuple):
        args = (args,)
    if not args and not kwargs:
        raise PeftcError("peftc.compile needs example inputs to capture the model: pass args=(...) or kwargs={...}")
    from .distributed import compile_sharded

    cm = compile_sharded(model, lambda: CompiledModel(model, spec, pipeline, args, dict(kwargs or {}),
                                                      dynamic=dynamic, verify=verify, instruments=instruments))
    if adapter is not None:
        cm.load_adapter(adapter)
    if memory_budget is not None:
        plan_recompute(cm, memory_budget, optimizer_state_bytes)
    return cm
