"""insert-bitfit: b = get_attr(bias)  ==>  b + delta (dense, zero at init)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

from torch.fx import GraphModule

from peftc.pipeline import Pass, PassContext, PassResult, register_pass
from peftc.spec import BitFit

from .insert_norm_tuning import insert_dense_deltas


@register_pass
@dataclass(frozen=True)
class InsertBitfit(Pass):
    """insert-bitfit: b = get_attr(<module>.bias)  ==>  b + delta, delta `<module>.bitfit.bias` (zeros).

    Every parameter named `bias` (narrowed by `target`/`exclude`) trains through an additive delta, so the base
    stays frozen and a merge folds `b + delta` back into b.
    """

    name: ClassVar[str] = "insert-bitfit"
    rule_type: ClassVar[type] = BitFit
    rule: BitFit = field(default_factory=BitFit)

    def run(self, gm: GraphModule, ctx: PassContext) -> PassResult:
        return insert_dense_deltas(gm, ctx, self, "bitfit", lambda name: name.rpartition(".")[2] == "bias",
                                   what="bias")
