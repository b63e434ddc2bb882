"""insert-mixed-lora: y = matmul(x, W)  ==>  y + bmm(bmm(x, A[i]ᵀ), (s·B)[i]ᵀ), i = each sample's adapter."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch.fx import GraphModule

from peftc.errors import AdapterError
from peftc.match import MatmulSite, matmul_sites
from peftc.params import ADAPTER, set_attr_path
from peftc.pipeline import Pass, PassContext, PassResult, register_pass
from peftc.rewrite import NodeBuilder, replace_uses
from peftc.spec import LoRA

from .insert_adapters import BANK, bank_name
from .insert_lora import adapter_dtype

aten = torch.ops.aten

MIXED_INDEX = "peftc_mixed_index"  # [batch] int64: sample k uses adapter index[k]; len(adapters) is the base model


@register_pass
@dataclass(frozen=True)
class InsertMixedLora(Pass):
    """insert-mixed-lora: y = matmul(x, W)  ==>  y + bmm(bmm(x, A[i]ᵀ), (s·B)[i]ᵀ), i = each sample's adapter.

    A mixed batch: sample k is computed with adapter `adapters[index[k]]` (index = the `peftc_mixed_index` tensor,
    [batch]), or with none when index[k] == len(adapters) ("__base__"). Per site, the adapters' A [r, in] and s·B
    [out, r] are stacked (zero-padded to the largest rank; zeros for an adapter that leaves the site alone, and for
    the base model), gathered per sample and applied as two batched matmuls over x viewed as [batch, rows, in] (so
    GPT-2's flattened [batch·seq, in] works too). HF PEFT's `adapter_names=`; plain LoRA on linear layers only.
    """

    name: ClassVar[str] = "insert-mixed-lora"
    adapters: tuple[str, ...] = ()
    rules: tuple[LoRA, ...] = ()

    def run(self, gm: GraphModule, ctx: PassContext) -> PassResult:
        modified = False
        for site in matmul_sites(gm, ctx.params, ctx.info):
            present = [j for j, adapter in enumerate(self.adapters)
                       if bank_name(adapter, f"{site.adapter_prefix}.lora_A.weight") in ctx.params]
            if not present:
                continue
            if site.form == "einsum":
                raise AdapterError(f"mixed batches (adapter_names=) need linear/addmm/mm/matmul sites; "
                                   f"`{site.module}` is an einsum ({site.equation})")
            self._insert(gm, ctx, site, present)
            modified = True
        read = {n.target for n in gm.graph.nodes if n.op == "get_attr"}
        unread = sorted(p.name for p in ctx.params if p.role == ADAPTER and p.name.startswith(BANK + ".")
                        and p.name not in read)
        if unread:
            raise AdapterError(f"mixed batches (adapter_names=) apply plain LoRA on linear layers; `{unread[0]}` is "
                               f"not such an adapter tensor (DoRA, lora_bias, slices and convolutions are not "
                               f"supported in a mixed batch)")
        return PassResult(gm, modified)

    def _insert(self, gm: GraphModule, ctx: PassContext, site: MatmulSite, present: list[int]) -> None:
        weight = ctx.params[site.weight].tensor
        dtype = adapter_dtype(weight.dtype)
        y = site.node
        stem = site.module.replace(".", "_")
        b = NodeBuilder(gm, y.next, self.name, "lora", like=y)
        x = site.x
        if dtype != weight.dtype:
            x = b.call(aten.to.dtype, x, dtype, name=f"{stem}_mixed_x")
        names = {j: (bank_name(self.adapters[j], f"{site.adapter_prefix}.lora_A.weight"),
                     bank_name(self.adapters[j], f"{site.adapter_prefix}.lora_B.weight")) for j in present}
        ranks = {j: ctx.params[a].tensor.shape[0] for j, (a, _) in names.items()}
        r = max(ranks.values())
        stack_a, stack_b = [], []
        for name in [MIXED_INDEX, *(n for j in present for n in names[j])]:
            set_attr_path(gm, name, ctx.params[name].tensor)
        for j in present:
            a_w, b_w = b.attr(names[j][0]), b.attr(names[j][1])
            s_b = b.call(aten.mul.Tensor, b_w, self.rules[j].scaling_for(site.module, None),
                         name=f"{stem}_mixed_sB_{j}")
            if ranks[j] < r:  # pad the rank: zero rows of A, zero columns of B add nothing
                a_w = b.call(aten.constant_pad_nd.default, a_w, [0, 0, 0, r - ranks[j]], name=f"{stem}_mixed_A_{j}")
                s_b = b.call(aten.constant_pad_nd.default, s_b, [0, r - ranks[j]], name=f"{stem}_mixed_B_{j}")
            stack_a.append((j, a_w))
            stack_b.append((j, s_b))
        zero_a = b.call(aten.zeros_like.default, stack_a[0][1], name=f"{stem}_mixed_A_zero")
        zero_b = b.call(aten.zeros_like.default, stack_b[0][1], name=f"{stem}_mixed_B_zero")
        by_a, by_b = dict(stack_a), dict(stack_b)
        slots = range(len(self.adapters) + 1)  # every adapter, then the base model
        a_all = b.call(aten.stack.default, [by_a.get(j, zero_a) for j in slots], 0, name=f"{stem}_mixed_A")
        b_all = b.call(aten.stack.default, [by_b.get(j, zero_b) for j in slots], 0, name=f"{stem}_mixed_B")
        index = b.attr(MIXED_INDEX)
        a_g = b.call(aten.index_select.default, a_all, 0, index, name=f"{stem}_mixed_A_gathered")
        b_g = b.call(aten.index_select.default, b_all, 0, index, name=f"{stem}_mixed_B_gathered")
        batch = b.call(aten.sym_size.int, index, 0, name=f"{stem}_mixed_batch")
        x3 = b.call(aten.reshape.default, x, [batch, -1, site.in_features], name=f"{stem}_mixed_x3")
        down = b.call(aten.bmm.default, x3, b.call(aten.transpose.int, a_g, 1, 2, name=f"{stem}_mixed_At"),
                      name=f"{stem}_mixed_down")
        up = b.call(aten.bmm.default, down, b.call(aten.transpose.int, b_g, 1, 2, name=f"{stem}_mixed_Bt"),
                    name=f"{stem}_mixed_up")
        rank = y.meta["val"].dim()
        shape = [b.call(aten.sym_size.int, y, d, name=f"{stem}_mixed_size_{d}") for d in range(rank - 1)]
        delta = b.call(aten.reshape.default, up, [*shape, site.out_features], name=f"{stem}_mixed_delta")
        out = b.call(aten.add.Tensor, y, delta, name=f"{stem}_mixed_out")
        if dtype != weight.dtype:
            out = b.call(aten.to.dtype, out, weight.dtype, name=f"{stem}_mixed_cast")
        replace_uses(y, out, keep=b.created)
