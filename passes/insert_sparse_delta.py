"""insert-sparse-delta: W = get_attr(p)  ==>  W + scatter(idx, delta), delta holding only the selected entries."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import torch
from torch.fx import GraphModule

from peftc.delta import (aliases_of, already_adapted, delta_shape, insert_delta, mark_adapted, owner, parameter_reads,
                         sparse_index, _structured_dim)
from peftc.pipeline import Pass, PassContext, PassResult, register_pass
from peftc.spec import SparseDelta

from .insert_lora import adapter_dtype


@register_pass
@dataclass(frozen=True)
class InsertSparseDelta(Pass):
    """insert-sparse-delta: W = get_attr(p)  ==>  view(index_add(view(W, -1), 0, idx, delta), W.shape).

    With structure="rows"/"columns": `index_add(W, dim, idx, delta)` over whole slices. `idx` (int64, frozen) is
    chosen once, from the weights as captured (or the given masks), and `delta` (trainable) starts at zero, so at
    init the graph computes exactly what it did. Adapters: `<module>.sparse_delta.<leaf>` and
    `<module>.sparse_delta.<leaf>_index`.
    """

    name: ClassVar[str] = "insert-sparse-delta"
    rule_type: ClassVar[type] = SparseDelta
    rule: SparseDelta = field(default_factory=lambda: SparseDelta(target=".*"))

    def run(self, gm: GraphModule, ctx: PassContext) -> PassResult:
        reads = parameter_reads(gm, ctx.params, ctx.info, self.rule.target, self.rule.exclude, lambda name: True,
                                where=repr(self.rule), what="parameter")
        modified = False
        for read in reads:
            if already_adapted(read, self.rule, "sparse_delta"):
                continue
            weight = ctx.params[read.param].tensor
            aliases = aliases_of(ctx.info, read.param)
            module, leaf = owner(read.name)
            stem = f"{module}.sparse_delta.{leaf}" if module else f"sparse_delta.{leaf}"
            dim = _structured_dim(self.rule.structure, weight.shape, read.name)
            idx = ctx.params.add(gm, f"{stem}_index", lambda: sparse_index(self.rule, weight, read.name, aliases),
                                 method="sparse_delta", added_by=self.name, trainable=False)
            ctx.params.add(gm, stem, lambda: torch.zeros(delta_shape(weight.shape, idx.numel(), dim),
                                                         dtype=adapter_dtype(weight.dtype), device=weight.device),
                           method="sparse_delta", added_by=self.name)
            insert_delta(gm, read, weight, pass_name=self.name, method="sparse_delta", values=stem,
                         index=f"{stem}_index", dim=dim)
            mark_adapted(read, self.rule, "sparse_delta")
            ctx.count("insert-sparse-delta.inserted")
            modified = True
        return PassResult(gm, modified)
