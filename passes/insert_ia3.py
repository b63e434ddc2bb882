"""insert-ia3: y = matmul(x, W)  ==>  y · l   (feed-forward: y = matmul(x · l, W))."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch.fx import GraphModule

from peftc.errors import SpecError
from peftc.match import ConvSite, MatmulSite, conv_sites, matmul_sites, select
from peftc.pipeline import Pass, PassContext, PassResult, register_pass
from peftc.rewrite import NodeBuilder, adapted, mark_adapted, replace_uses
from peftc.spec import IA3

from .insert_lora import adapter_dtype

aten = torch.ops.aten


@register_pass
@dataclass(frozen=True)
class InsertIA3(Pass):
    """insert-ia3: y = matmul(x, W)  ==>  y · l,  and on feed-forward sites  y = matmul(x · l, W).

    l starts at ones, so at init the graph computes exactly what it did. The vector is named and shaped as HF PEFT
    saves it: `<module>.ia3_l`, [out, 1] on an output, [1, in] on a feed-forward input (flattened in the graph), for
    any weight layout (GPT-2's Conv1D included). An einsum site must keep W's output index last (and, feed-forward,
    x's contracted index last), as a Linear does.
    """

    name: ClassVar[str] = "insert-ia3"
    rule_type: ClassVar[type] = IA3
    rule: IA3

    def run(self, gm: GraphModule, ctx: PassContext) -> PassResult:
        where = repr(self.rule)
        all_sites = matmul_sites(gm, ctx.params, ctx.info)
        if self.rule.target != "all-linear":  # HF's IA3 takes Conv2d/Conv3d too (l: [1, C, 1, 1(, 1)])
            all_sites += conv_sites(gm, ctx.params, ctx.info)
        sites = select(all_sites, self.rule.target, self.rule.exclude, ctx.info, where=where)
        feedforward: set[str] = set()
        if self.rule.feedforward is not None:
            feedforward = {s.module for s in select(all_sites, self.rule.feedforward, None, ctx.info, where=where)}
            outside = sorted(feedforward - {s.module for s in sites})
            if outside:
                raise SpecError(f"{where}: `feedforward` must be a subset of `target` (as in HF PEFT); "
                                f"{', '.join(outside[:3])} {'is' if len(outside) == 1 else 'are'} not targeted")
        modified = False
        for site in sites:
            if adapted(site.node, "ia3", self.rule, site.module):
                continue
            self._insert(gm, ctx, site, site.module in feedforward)
            mark_adapted(site.node, "ia3", self.rule)
            ctx.count("insert-ia3.feedforward" if site.module in feedforward else "insert-ia3.output")
            modified = True
        return PassResult(gm, modified)

    def _insert(self, gm: GraphModule, ctx: PassContext, site: MatmulSite | ConvSite, is_ff: bool) -> None:
        conv = isinstance(site, ConvSite)
        if conv and len(site.kernel) not in (2, 3):
            raise SpecError(f"{self.rule!r}: `{site.module}` is a {len(site.kernel)}-d convolution; HF PEFT's IA3 "
                            f"takes Linear, Conv1D, Conv2d and Conv3d. Exclude `{site.module}`")
        if site.form == "einsum":
            inputs, output = site.equation.split("->")
            contracted, kept = site.weight_subscripts
            x_subs = next(s for s in inputs.split(",") if kept not in s)
            if output[-1] != kept or (is_ff and x_subs[-1] != contracted):
                raise SpecError(f"{self.rule!r}: einsum `{site.equation}` at `{site.module}` does not keep the "
                                f"feature index last; IA3 scales the last dimension. Exclude `{site.module}`")
        weight = ctx.params[site.weight].tensor
        dtype = adapter_dtype(weight.dtype)
        if conv:
            shape = (1, site.in_features if is_ff else site.out_features, *[1] * len(site.kernel))
        else:
            shape = (1, site.in_features) if is_ff else (site.out_features, 1)
        name = f"{site.adapter_prefix}.ia3_l"  # beside a bare parameter (`w1` -> `w1_adapter.ia3_l`), as for LoRA
        ctx.params.add(gm, name, lambda: torch.ones(shape, dtype=dtype, device=weight.device), method="ia3",
                       added_by=self.name)
        stem = site.module.replace(".", "_")
        y = site.node
        b = NodeBuilder(gm, y if is_ff else y.next, self.name, "ia3", like=y)
        # a channel scale broadcasts over a convolution's spatial dims ([N,] C, *spatial)
        flat = [-1, *[1] * len(site.kernel)] if conv else [-1]
        scale = b.call(aten.view.default, b.attr(name), flat, name=f"{stem}_ia3_scale")
        if is_ff:
            x = site.x
            if dtype != weight.dtype:
                x = b.call(aten.to.dtype, x, dtype, name=f"{stem}_ia3_x")
            scaled = b.call(aten.mul.Tensor, x, scale, name=f"{stem}_ia3_in")
            if dtype != weight.dtype:
                scaled = b.call(aten.to.dtype, scaled, weight.dtype, name=f"{stem}_ia3_cast")
            scaled.meta["peftc.ia3"] = self._tag(site, name, True)
            y.replace_input_with(site.x, scaled)
            return
        out = b.call(aten.mul.Tensor, y, scale, name=f"{stem}_ia3_out")
        if dtype != weight.dtype:
            out = b.call(aten.to.dtype, out, weight.dtype, name=f"{stem}_ia3_cast")
        out.meta["peftc.ia3"] = self._tag(site, name, False)
        replace_uses(y, out)

    @staticmethod
    def _tag(site: MatmulSite | ConvSite, vector: str, feedforward: bool) -> dict:
        """What a merge needs to fold l into W (peftc/merge.py): which weight, its layout, which side l scales."""
        return {"weight": site.weight, "vector": vector, "feedforward": feedforward, "form": site.form,
                "weight_in_out": getattr(site, "weight_in_out", False), "conv_groups": getattr(site, "groups", None)}
