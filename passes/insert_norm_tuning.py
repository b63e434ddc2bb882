"""insert-norm-tuning: g = get_attr(<norm>.weight)  ==>  g + delta (dense, zero at init), for every norm module."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, ClassVar

import torch
from torch.fx import GraphModule

from peftc.delta import already_adapted, insert_delta, is_norm_module, mark_adapted, owner, parameter_reads
from peftc.pipeline import Pass, PassContext, PassResult, register_pass
from peftc.spec import NormTuning

from .insert_lora import adapter_dtype


def insert_dense_deltas(gm: GraphModule, ctx: PassContext, p: Pass, method: str, keep: Callable[[str], bool],
                        what: str, *, by_rule: bool = True) -> PassResult:
    """`W ==> W + delta` for every parameter `p.rule` selects among those `keep` accepts (every one `keep` accepts
    when not `by_rule`); delta `<module>.<method>.<leaf>` is shaped like W and zero at init."""
    rule = p.rule
    target, exclude = (rule.target, rule.exclude) if by_rule else (None, None)
    reads = parameter_reads(gm, ctx.params, ctx.info, target, exclude, keep, where=repr(rule), what=what)
    modified = False
    for read in reads:
        if already_adapted(read, rule, method):
            continue
        weight = ctx.params[read.param].tensor
        module, leaf = owner(read.name)
        stem = f"{module}.{method}.{leaf}" if module else f"{method}.{leaf}"
        ctx.params.add(gm, stem, lambda: torch.zeros(weight.shape, dtype=adapter_dtype(weight.dtype),
                                                     device=weight.device), method=method, added_by=p.name)
        insert_delta(gm, read, weight, pass_name=p.name, method=method, values=stem)
        mark_adapted(read, rule, method)
        ctx.count(f"{p.name}.inserted")
        modified = True
    return PassResult(gm, modified)


@register_pass
@dataclass(frozen=True)
class InsertNormTuning(Pass):
    """insert-norm-tuning: g = get_attr(<norm>.weight|bias)  ==>  g + delta, delta `<norm>.norm_tuning.<leaf>`.

    Selects the parameters of every module whose class name contains "Norm" (LayerNorm, LlamaRMSNorm,
    GroupNorm, BatchNorm2d, ...), narrowed by `target`/`exclude`.
    """

    name: ClassVar[str] = "insert-norm-tuning"
    rule_type: ClassVar[type] = NormTuning
    rule: NormTuning = field(default_factory=NormTuning)

    def run(self, gm: GraphModule, ctx: PassContext) -> PassResult:
        return insert_dense_deltas(gm, ctx, self, "norm_tuning",
                                   lambda name: is_norm_module(owner(name)[0], ctx.info), what="norm parameter")
