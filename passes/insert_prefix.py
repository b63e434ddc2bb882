"""insert-prefix: attention(q, k, v)  ==>  attention(q, [P_k; k], [P_v; v]), every query sees the prefix."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import ClassVar

import torch
from torch import nn
from torch.fx import GraphModule, Node

from peftc.attention import AttentionSite, attention_sites, select_attention
from peftc.errors import SpecError
from peftc.pipeline import Pass, PassContext, PassResult, register_pass
from peftc.rewrite import NodeBuilder, mark_adapted
from peftc.spec import Prefix

from .insert_lora import adapter_dtype

aten = torch.ops.aten

ENCODER = "prefix_encoder"  # the projection MLP's parameters: prefix_encoder.{embedding,transform.0,transform.2}.*


def prefix_names(module: str) -> tuple[str, str]:
    """The per-site prefix tensors ([kv_heads, length, head_dim] each) when projection is off."""
    stem = f"{module}." if module else ""
    return f"{stem}prefix_key", f"{stem}prefix_value"


@register_pass
@dataclass(frozen=True)
class InsertPrefix(Pass):
    """insert-prefix: attention(q, k, v, mask)  ==>  attention(q, [P_k; k], [P_v; v], [1; mask]).

    P_k, P_v are `length` learned positions per KV head (a grouped-query model repeats them with its K/V heads).
    Every query attends to every prefix position; the padding and causal masks among the real tokens are kept.
    SDPA: K/V get the prefix concatenated before the keys; `attn_mask` gets `length` leading "attend" columns, and
    `is_causal=True` (top-left aligned, wrong once keys outnumber queries) becomes an explicit mask.
    Written-out softmax: the prefix scores `q·P_k^T`, scaled as the real scores are, join the masked scores right
    before the softmax, and `P_v` is concatenated before the values.

    Parameters: `<attention module>.prefix_key` / `.prefix_value` [kv_heads, length, head_dim], N(0, 1) as HF PEFT's
    prefix embedding. With `projection=True`, one MLP for all sites, HF PEFT's `prefix_projection`:
    `prefix_encoder.embedding.weight` [length, kv_dim] → `prefix_encoder.transform.0` (Linear kv_dim → hidden)
    → tanh → `prefix_encoder.transform.2` (Linear hidden → sites·2·kv_dim); columns are laid out per site (graph
    order), keys then values, as HF PEFT lays out layers.
    """

    name: ClassVar[str] = "insert-prefix"
    rule_type: ClassVar[type] = Prefix
    rule: Prefix = field(default_factory=Prefix)

    def run(self, gm: GraphModule, ctx: PassContext) -> PassResult:
        where = repr(self.rule)
        every = attention_sites(gm)
        sites = select_attention(every, self.rule.target, where)
        others = {s.node.meta.get("peftc.adapted", {}).get("prefix") for s in every} - {None, self.rule}
        if self.rule.projection and any(o.projection for o in others):
            raise SpecError(f"{where}: the model already has a projected prefix ({ENCODER}.*) from another rule; "
                            f"use one projected prefix rule, or projection=false")
        todo = []
        for site in sites:
            done = site.node.meta.get("peftc.adapted", {}).get("prefix")
            if done is None:
                todo.append(site)
            elif done != self.rule:
                raise SpecError(f"{where} matches `{site.module}`, which {done!r} already adapts; narrow one "
                                f"`target`")
        if not todo:
            return PassResult(gm, False)
        modules = list(dict.fromkeys(s.module for s in sites))
        projected = self._projection(gm, ctx, sites, modules) if self.rule.projection else None
        for site in todo:
            b = NodeBuilder(gm, site.node, self.name, "prefix", like=site.node)
            stem = site.module.replace(".", "_") or "attn"
            pk, pv = self._prefix_tensors(gm, ctx, b, site, stem, projected, modules)
            if site.form == "sdpa":
                self._rewrite_sdpa(b, site, pk, pv, stem)
            else:
                self._rewrite_softmax(gm, b, site, pk, pv, stem)
            mark_adapted(site.node, "prefix", self.rule)
            ctx.count(f"insert-prefix.{site.form}")
        return PassResult(gm, True)

    # ---- parameters -----------------------------------------------------------------------------------------
    def _dtype(self, site: AttentionSite) -> tuple[torch.dtype, torch.device]:
        val = site.q.meta["val"]
        return adapter_dtype(val.dtype), val.device

    def _projection(self, gm: GraphModule, ctx: PassContext, sites: list[AttentionSite], modules: list[str]) -> Node:
        """Emit the shared MLP once, before the first site: [length, sites·2·kv_dim]."""
        widths = {(s.kv_heads * s.head_dim, s.kv_heads * s.value_dim) for s in sites}
        if len(widths) != 1 or len({w for pair in widths for w in pair}) != 1:
            raise SpecError(f"{self.rule!r}: projection=True needs every selected attention to have the same key "
                            f"and value width (kv_heads·head_dim); found {sorted(widths)}. Use projection=false")
        kv_dim = widths.pop()[0]
        hidden = self.rule.encoder_hidden_size or kv_dim
        out = len(modules) * 2 * kv_dim
        dtype, device = self._dtype(sites[0])

        def weight(n_out: int, n_in: int) -> torch.Tensor:  # nn.Linear's default init, as HF PEFT's MLP gets
            w = torch.empty(n_out, n_in, dtype=dtype, device=device)
            return nn.init.kaiming_uniform_(w, a=math.sqrt(5))

        def bias(n_out: int, n_in: int) -> torch.Tensor:
            bound = 1 / math.sqrt(n_in)
            return torch.empty(n_out, dtype=dtype, device=device).uniform_(-bound, bound)

        init = {
            f"{ENCODER}.embedding.weight": lambda: torch.randn(self.rule.length, kv_dim, dtype=dtype, device=device),
            f"{ENCODER}.transform.0.weight": lambda: weight(hidden, kv_dim),
            f"{ENCODER}.transform.0.bias": lambda: bias(hidden, kv_dim),
            f"{ENCODER}.transform.2.weight": lambda: weight(out, hidden),
            f"{ENCODER}.transform.2.bias": lambda: bias(out, hidden),
        }
        for name, make in init.items():
            ctx.params.add(gm, name, make, method="prefix", added_by=self.name)
        b = NodeBuilder(gm, sites[0].node, self.name, "prefix", like=None)
        emb = b.attr(f"{ENCODER}.embedding.weight")
        h = b.call(aten.linear.default, emb, b.attr(f"{ENCODER}.transform.0.weight"),
                   b.attr(f"{ENCODER}.transform.0.bias"), name="prefix_encoder_hidden")
        h = b.call(aten.tanh.default, h, name="prefix_encoder_tanh")
        return b.call(aten.linear.default, h, b.attr(f"{ENCODER}.transform.2.weight"),
                      b.attr(f"{ENCODER}.transform.2.bias"), name="prefix_encoder_out")

    def _prefix_tensors(self, gm: GraphModule, ctx: PassContext, b: NodeBuilder, site: AttentionSite, stem: str,
                        projected: Node | None, modules: list[str]) -> tuple[Node, Node]:
        """P_k [kv_heads, length, head_dim] and P_v [kv_heads, length, value_dim] as graph nodes."""
        length, kvh = self.rule.length, site.kv_heads
        if projected is None:
            dtype, device = self._dtype(site)
            k_name, v_name = prefix_names(site.module)
            for name, dim in ((k_name, site.head_dim), (v_name, site.value_dim)):
                ctx.params.add(gm, name, lambda dim=dim: torch.randn(kvh, length, dim, dtype=dtype, device=device),
                               method="prefix", added_by=self.name)
            return b.attr(k_name), b.attr(v_name)
        width = kvh * site.head_dim
        start = modules.index(site.module) * 2 * width
        out = []
        for i, (which, dim) in enumerate((("key", site.head_dim), ("value", site.value_dim))):
            cols = b.call(aten.slice.Tensor, projected, 1, start + i * width, start + (i + 1) * width,
                          name=f"{stem}_prefix_{which}_cols")
            heads = b.call(aten.view.default, cols, [length, kvh, dim], name=f"{stem}_prefix_{which}_heads")
            out.append(b.call(aten.permute.default, heads, [1, 0, 2], name=f"{stem}_prefix_{which}"))
        return out[0], out[1]

    # ---- rewrites -------------------------------------------------------------------------------------------
    def _batched(self, b: NodeBuilder, prefix: Node, like: Node, site: AttentionSite, name: str) -> Node:
        """[kv_heads, P, d] ==> like's layout: [batch, K/V heads at the op, P, d] (or [batch, P, d] if 3-d)."""
        val = like.meta["val"]
        if self._dtype(site)[0] != val.dtype:
            prefix = b.call(aten.to.dtype, prefix, val.dtype, name=f"{name}_cast")
        if site.k_heads_at_op != site.kv_heads:
            prefix = b.call(aten.repeat_interleave.self_int, prefix, site.k_heads_at_op // site.kv_heads, 0,
                            name=f"{name}_repeat")
        batch = b.call(aten.sym_size.int, like, 0, name=f"{name}_batch")
        if val.dim() == 4:
            prefix = b.call(aten.unsqueeze.default, prefix, 0, name=f"{name}_unsqueeze")
            return b.call(aten.expand.default, prefix, [batch, -1, -1, -1], name=f"{name}_expand")
        return b.call(aten.expand.default, prefix, [batch, -1, -1], name=f"{name}_expand")

    def _rewrite_sdpa(self, b: NodeBuilder, site: AttentionSite, pk: Node, pv: Node, stem: str) -> None:
        node = site.node
        schema = node.target._schema
        args = {a.name: v for a, v in zip(schema.arguments, node.args)}
        args.update(node.kwargs)
        k = b.call(aten.cat.default, [self._batched(b, pk, site.k, site, f"{stem}_prefix_k"), site.k], -2,
                   name=f"{stem}_prefix_keys")
        v = b.call(aten.cat.default, [self._batched(b, pv, site.v, site, f"{stem}_prefix_v"), site.v], -2,
                   name=f"{stem}_prefix_values")
        length = self.rule.length
        mask = site.mask
        if mask is not None:
            mval = mask.meta["val"]
            if mval.shape[-1] == 1:  # a mask broadcast over keys: spell it out before padding
                keys = b.call(aten.sym_size.int, site.k, -2, name=f"{stem}_prefix_nkeys")
                mask = b.call(aten.expand.default, mask, [-1] * (mval.dim() - 1) + [keys], name=f"{stem}_mask_keys")
            fill = 1 if mval.dtype == torch.bool else 0.0
            mask = b.call(aten.constant_pad_nd.default, mask, [length, 0], fill, name=f"{stem}_prefix_mask")
        elif site.is_causal:
            # SDPA's is_causal aligns top-left: with keys [P; k] it would hide the real keys. Build the mask.
            lq = b.call(aten.sym_size.int, site.q, -2, name=f"{stem}_prefix_nq")
            lk = b.call(aten.sym_size.int, site.k, -2, name=f"{stem}_prefix_nk")
            ones = b.call(aten.new_ones.default, site.q, [lq, lk], kwargs={"dtype": torch.bool},
                          name=f"{stem}_causal_ones")
            causal = b.call(aten.tril.default, ones, name=f"{stem}_causal")
            mask = b.call(aten.constant_pad_nd.default, causal, [length, 0], 1, name=f"{stem}_prefix_mask")
        kwargs = {key: value for key, value in args.items() if key not in ("query", "key", "value")}
        kwargs["attn_mask"] = mask
        kwargs["is_causal"] = False
        node.args = (site.q, k, v)
        node.kwargs = kwargs

    def _rewrite_softmax(self, gm: GraphModule, b: NodeBuilder, site: AttentionSite, pk: Node, pv: Node,
                         stem: str) -> None:
        q_val = site.q.meta["val"]
        if self._dtype(site)[0] != q_val.dtype:
            pk = b.call(aten.to.dtype, pk, q_val.dtype, name=f"{stem}_prefix_k_cast")
        if site.k_heads_at_op != site.kv_heads:
            pk = b.call(aten.repeat_interleave.self_int, pk, site.k_heads_at_op // site.kv_heads, 0,
                        name=f"{stem}_prefix_k_repeat")
        pkt = b.call(aten.transpose.int, pk, -1, -2, name=f"{stem}_prefix_kT")
        # [batch, heads, Lq, d] @ [heads, d, P] broadcasts over the batch
        scores = b.call(aten.matmul.default, site.q, pkt, name=f"{stem}_prefix_scores")
        for op in site.scale_ops:
            scores = b.call(op.target, scores, *op.args[1:], kwargs=dict(op.kwargs), name=f"{stem}_prefix_{op.name}")
        joined = b.call(aten.cat.default, [scores, site.scores], -1, name=f"{stem}_prefix_joined")
        site.node.replace_input_with(site.scores, joined)
        bv = NodeBuilder(gm, site.pv, self.name, "prefix", like=site.pv)
        values = bv.call(aten.cat.default, [self._batched(bv, pv, site.v, site, f"{stem}_prefix_v"), site.v], -2,
                         name=f"{stem}_prefix_values")
        site.pv.replace_input_with(site.v, values)

