"""freeze-base: every captured weight  ==>  frozen (requires_grad=False)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from torch.fx import GraphModule

from peftc.params import ADAPTER
from peftc.pipeline import Pass, PassContext, PassResult, register_pass


@register_pass
@dataclass(frozen=True)
class FreezeBase(Pass):
    """freeze-base: W (trainable)  ==>  W (frozen), for every tensor of the captured model.

    Changes only the parameter table, never the code. It runs first, so adapter passes mark as trainable exactly
    the tensors they add, and the verifier can then hold the trainable set to the spec's.
    """

    name: ClassVar[str] = "freeze-base"

    def run(self, gm: GraphModule, ctx: PassContext) -> PassResult:
        modified = False
        for p in ctx.params:
            if p.role != ADAPTER and ctx.params.set_trainable(p.name, False):
                ctx.count("freeze-base.frozen")
                modified = True
        ctx.base_frozen = True
        return PassResult(gm, modified)
