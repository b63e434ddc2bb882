"""insert-ln-tuning: p = get_attr(<module>.<leaf>)  ==>  p + delta, for each parameter of the targeted modules."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from torch.fx import GraphModule

from peftc.errors import SpecError
from peftc.pipeline import PassContext, PassResult, register_pass
from peftc.spec import _DenseDelta, register_rule

from .insert_modules_to_save import InsertModulesToSave
from .insert_norm_tuning import insert_dense_deltas


@register_rule
@dataclass(frozen=True)
class LNTuning(_DenseDelta):
    """HF PEFT's LN tuning (`ln_tuning`): a trainable copy of every parameter of each `target` module, whatever its
    type (a norm, a Linear, a block), `p  ==>  p + delta`. peftc's NormTuning is the same for norms only."""

    kind: ClassVar[str] = "ln_tuning"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.target is None or self.target == "all-linear":
            raise SpecError(f"{self._where()}: `target` names the modules to tune, e.g. "
                            f"LNTuning(target=['input_layernorm', 'post_attention_layernorm'])")


@register_pass
@dataclass(frozen=True)
class InsertLNTuning(InsertModulesToSave):
    """insert-ln-tuning: p = get_attr(<module>.<leaf>)  ==>  p + delta, delta `<module>.ln_tuning.<leaf>` (zero at
    init). Saved in HF PEFT's format as LN_TUNING: the trained copy under `<module>.ln_tuning_layers.<leaf>`."""

    name: ClassVar[str] = "insert-ln-tuning"
    rule_type: ClassVar[type] = LNTuning
    rule: LNTuning

    def run(self, gm: GraphModule, ctx: PassContext) -> PassResult:
        names = [alias for aliases in ctx.info.aliases.values() for alias in aliases]
        if not any(self.selects(n) for n in names):
            raise SpecError(f"{self.rule!r}: target={self.rule.target!r} selects no module with parameters")
        return insert_dense_deltas(gm, ctx, self, "ln_tuning", self.selects, what="module parameter", by_rule=False)
