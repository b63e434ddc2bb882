"""insert-lora: y = matmul(x, W)  ==>  y + s·B(A·dropout(x))."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import ClassVar

import torch
from torch import nn
from torch.fx import GraphModule, Node

from peftc.errors import SpecError
from peftc.match import MatmulSite, matmul_sites, select
from peftc.pipeline import Pass, PassContext, PassResult, register_pass
from peftc.rewrite import NodeBuilder, replace_uses
from peftc.spec import LoRA

aten = torch.ops.aten


def adapter_dtype(weight_dtype: torch.dtype) -> torch.dtype:
    """Adapters on half-precision bases train in float32, as HF PEFT's autocast_adapter_dtype does."""
    return torch.float32 if weight_dtype in (torch.float16, torch.bfloat16) else weight_dtype


def lora_init_a(r: int, in_features: int, like: torch.Tensor) -> torch.Tensor:
    a = torch.empty(r, in_features, dtype=adapter_dtype(like.dtype), device=like.device)
    nn.init.kaiming_uniform_(a, a=math.sqrt(5))  # HF PEFT's default init of lora_A
    return a


def _free_letter(used: str) -> str:
    return next(c for c in "zyxwvutsrqponmlkjihgfedcbaZYXWVUTSRQPONMLKJIHGFEDCBA" if c not in used)


@register_pass
@dataclass(frozen=True)
class InsertLora(Pass):
    """insert-lora: y = matmul(x, W)  ==>  y + s·B(A·dropout(x)),  s = alpha/r (alpha/√r with rsLoRA).

    A [r, in] is Kaiming-uniform and B [out, r] zeros, so at init the graph computes exactly what it did.
    Parameters are named as HF PEFT saves them: `<module>.lora_A.weight`, `<module>.lora_B.weight`, whatever the
    weight's layout (Conv1D's (in, out) included). A weight read by several matmuls gets one adapter, applied at
    every read, as a module-swapping library applies one adapter at every call of the module.
    """

    name: ClassVar[str] = "insert-lora"
    rule_type: ClassVar[type] = LoRA
    rule: LoRA = field(default_factory=LoRA)

    def run(self, gm: GraphModule, ctx: PassContext) -> PassResult:
        sites = select(matmul_sites(gm, ctx.params, ctx.info), self.rule.target, self.rule.exclude, ctx.info,
                       where=repr(self.rule))
        modified = False
        for site in sites:
            done = site.node.meta.get("peftc.adapted", {})
            if "lora" in done:
                if done["lora"] != self.rule:
                    raise SpecError(f"{self.rule!r} matches `{site.module}`, which {done['lora']!r} already adapts; "
                                    f"narrow one target or add an `exclude`")
                continue  # idempotent: this rule already adapted this matmul
            self._insert(gm, ctx, site)
            site.node.meta["peftc.adapted"] = {**done, "lora": self.rule}
            ctx.count("insert-lora.inserted")
            modified = True
        return PassResult(gm, modified)

    def _insert(self, gm: GraphModule, ctx: PassContext, site: MatmulSite) -> None:
        r = self.rule.r
        weight = ctx.params[site.weight].tensor
        dtype = adapter_dtype(weight.dtype)
        a_name, b_name = f"{site.adapter_prefix}.lora_A.weight", f"{site.adapter_prefix}.lora_B.weight"
        ctx.params.add(gm, a_name, lambda: lora_init_a(r, site.in_features, weight), method="lora",
                       added_by=self.name)
        ctx.params.add(gm, b_name, lambda: torch.zeros(site.out_features, r, dtype=dtype, device=weight.device),
                       method="lora", added_by=self.name)

        y = site.node
        stem = site.module.replace(".", "_")
        b = NodeBuilder(gm, y.next, self.name, "lora", like=y)
        x: Node = site.x
        if dtype != weight.dtype:
            x = b.call(aten.to.dtype, x, dtype, name=f"{stem}_lora_x")
        if self.rule.dropout > 0 and ctx.training:
            x = b.call(aten.dropout.default, x, float(self.rule.dropout), True, name=f"{stem}_lora_dropout")
        a_w, b_w = b.attr(a_name), b.attr(b_name)
        if site.form == "einsum":
            delta = self._einsum_delta(b, site, x, a_w, b_w, stem)
        else:
            down = b.call(aten.linear.default, x, a_w, name=f"{stem}_lora_A")
            delta = b.call(aten.linear.default, down, b_w, name=f"{stem}_lora_B")
        scaled = b.call(aten.mul.Tensor, delta, self.rule.scaling, name=f"{stem}_lora_scaled")
        added = out = b.call(aten.add.Tensor, y, scaled, name=f"{stem}_lora_out")
        if dtype != weight.dtype:
            out = b.call(aten.to.dtype, added, weight.dtype, name=f"{stem}_lora_cast")
        replace_uses(y, out, spare=(added,))

    def _einsum_delta(self, b: NodeBuilder, site: MatmulSite, x: Node, a_w: Node, b_w: Node, stem: str) -> Node:
        """Same equation with A in W's place (r where W had out), then contract r with B."""
        contracted, kept = site.weight_subscripts
        inputs, output = site.equation.split("->")
        subs = inputs.split(",")
        w_idx = 1 - site.x_path[1]
        w_subs = subs[w_idx]
        a_laid = a_w if w_subs.index(kept) == 0 else b.call(aten.t.default, a_w, name=f"{stem}_lora_A_t")
        operands = [x, a_laid] if w_idx == 1 else [a_laid, x]
        down = b.call(aten.einsum.default, site.equation, operands, name=f"{stem}_lora_A")
        fresh = _free_letter(site.equation)
        up_eq = f"{output},{fresh}{kept}->{output.replace(kept, fresh)}"
        return b.call(aten.einsum.default, up_eq, [down, b_w], name=f"{stem}_lora_B")
