"""insert-adaption-prompt: o = attention(q, k, v)  ==>  o + g · softmax(q K_P^T / √d) V_P (LLaMA-Adapter)."""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch.fx import GraphModule, Node, Proxy
from torch.fx.proxy import GraphAppendingTracer

from peftc.attention import AttentionSite, attention_sites, select_attention
from peftc.errors import PassError, SpecError
from peftc.match import matmul_sites
from peftc.pipeline import Pass, PassContext, PassResult, register_pass
from peftc.rewrite import NodeBuilder, adapted, mark_adapted
from peftc.soft_prompts import AdaptionPrompt

from .insert_lora import adapter_dtype

aten = torch.ops.aten

# From an attention's K (or V) operand back to its projection: head splits and repeats, casts, and RoPE
# (x·cos + rotate(x)·sin: the first operand of each add / mul is x itself), which the prompt's keys do not get.
_BACK = {aten.view.default, aten.reshape.default, aten._unsafe_view.default, aten.transpose.int, aten.permute.default,
         aten.expand.default, aten.unsqueeze.default, aten.clone.default, aten.contiguous.default, aten.to.dtype,
         aten._to_copy.default, aten.alias.default, aten.add.Tensor, aten.mul.Tensor, aten.repeat_interleave.self_int}
_CACHE_LAYOUT = {aten.detach.default, aten.detach_.default, aten.lift_fresh_copy.default}
_SPLITS = {aten.split.Tensor, aten.split_with_sizes.default}


def _is_cache_input(node: Node) -> bool:
    """An input of the graph (a KV cache passed in) or a constant (the empty cache a prefill starts from)."""
    while node.op == "call_function" and node.target in _BACK | _CACHE_LAYOUT:
        node = node.args[0]
    if node.op == "call_function" and node.target == aten.cat.default:  # a cache built from the tensors passed in
        return all(_is_cache_input(n) for n in node.args[0])
    return node.op in ("placeholder", "get_attr")


def _projection(start: Node, sites: dict, where: str):
    """(the matmul site that computes `start`, the output columns it reads), e.g. the K third of GPT-2's c_attn."""
    node, columns = start, None  # columns: (begin, end) of the projection's output, innermost split last
    for _ in range(40):
        if node in sites:
            return sites[node], columns
        if not isinstance(node, Node) or node.op != "call_function":
            break
        if node.target is operator.getitem and isinstance(node.args[0], Node) and node.args[0].target in _SPLITS:
            split, index = node.args
            size, dim = split.args[1], (split.args[2] if len(split.args) > 2 else 0)
            ndim = split.args[0].meta["val"].dim()
            if dim % ndim != ndim - 1:
                break
            total = int(split.args[0].meta["val"].shape[-1])
            sizes = [size] * math.ceil(total / size) if isinstance(size, int) else list(size)
            begin = sum(sizes[:index])
            inner = (begin, begin + sizes[index])
            columns = inner if columns is None else (begin + columns[0], begin + columns[1])
            node = split.args[0]
        elif node.target == aten.slice.Tensor and node.args[1] % node.args[0].meta["val"].dim() == \
                node.args[0].meta["val"].dim() - 1:
            begin, end = node.args[2], min(node.args[3], int(node.args[0].meta["val"].shape[-1]))
            columns = (begin, end) if columns is None else (begin + columns[0], begin + columns[1])
            node = node.args[0]
        elif node.target == aten.slice.Tensor and node.args[2:4] in ((0, 2 ** 63 - 1), (None, None), ()):
            node = node.args[0]  # a full slice on another dim (repeat_kv's x[:, :, None])
        elif node.target in _BACK:
            node = node.args[0]
        elif node.target == aten.cat.default and len(node.args[0]) == 2 and _is_cache_input(node.args[0][0]):
            node = node.args[0][1]  # a KV cache's cat([cached, new]): the projection computed the cached ones too
        else:
            break
    raise SpecError(f"{where}: cannot trace the attention's keys/values back to a projection with a base weight "
                    f"(stopped at `{getattr(node, 'name', node)}`); adaption prompts need K = x W_k (+ b) and "
                    f"V = x W_v, possibly fused, split into heads and rotated")


@register_pass
@dataclass(frozen=True)
class InsertAdaptionPrompt(Pass):
    """insert-adaption-prompt: o = attention(q, k, v)  ==>  o + g · softmax(q K_P^T / √d) V_P, as LLaMA-Adapter.

    On the last `adapter_layers` selected attentions: P [1, adapter_len, hidden] (`<attention>.adaption_prompt`,
    N(0, 1)) goes through the attention's own, frozen K and V projections (their bias included; the columns a fused
    QKV projection gives K and V; no rotary embedding), split into KV heads and repeated to the query heads. Every
    query (after its rotary embedding) attends to the prompt with its own softmax, no mask, in float32; the result
    times the gate g (`<attention>.adaption_gate`, zeros: identity at init) is added to the attention output,
    before the output projection. HF PEFT's names; on Llama/Mistral the same function as HF PEFT's (which applies
    o_proj to it separately: the same without an o_proj bias). HF's GPT-2 variant adds it after c_proj, without
    projecting it; here it is projected like the attention's own output, on every architecture.
    """

    name: ClassVar[str] = "insert-adaption-prompt"
    rule_type: ClassVar[type] = AdaptionPrompt
    rule: AdaptionPrompt

    def run(self, gm: GraphModule, ctx: PassContext) -> PassResult:
        rule, where = self.rule, repr(self.rule)
        chosen = select_attention(attention_sites(gm), rule.target, where=where)
        if rule.adapter_layers > len(chosen):
            raise SpecError(f"{where}: adapter_layers={rule.adapter_layers} but the model has {len(chosen)} "
                            f"selected attention(s); lower adapter_layers")
        sites = {s.node: s for s in matmul_sites(gm, ctx.params, ctx.info)}
        modified = False
        for a in chosen[-rule.adapter_layers:]:
            y = a.node if a.form == "sdpa" else a.pv
            if adapted(y, "adaption_prompt", rule, a.module):
                continue
            self._insert(gm, ctx, a, y, sites)
            mark_adapted(y, "adaption_prompt", rule)
            ctx.count("insert-adaption-prompt.inserted")
            modified = True
        return PassResult(gm, modified)

    def _insert(self, gm: GraphModule, ctx: PassContext, a: AttentionSite, y: Node, sites: dict) -> None:
        where = f"{self.rule!r} on `{a.module}`"
        k_site, k_cols = _projection(a.k, sites, where)
        v_site, v_cols = _projection(a.v, sites, where)
        hidden = k_site.in_features
        base = y.meta["val"].dtype
        dtype = adapter_dtype(base)
        device = y.meta["val"].device
        prompt, gate = f"{a.module}.adaption_prompt", f"{a.module}.adaption_gate"
        ctx.params.add(gm, prompt, lambda: torch.randn(1, self.rule.adapter_len, hidden, dtype=dtype, device=device),
                       method="adaption_prompt", added_by=self.name)
        ctx.params.add(gm, gate, lambda: torch.zeros(1, dtype=dtype, device=device), method="adaption_prompt",
                       added_by=self.name)
        anchor = y.next
        b = NodeBuilder(gm, anchor, self.name, "adaption_prompt", like=y)
        p = b.attr(prompt)
        p_base = p if dtype == base else b.call(aten.to.dtype, p, base)
        p2d = b.call(aten.squeeze.dim, p_base, 0)  # [adapter_len, hidden]: addmm (GPT-2's Conv1D) takes 2-d

        def heads(site, columns, count: int) -> Node:
            """The projection of the prompt, its columns, as [1, count, adapter_len, head_dim]."""
            with gm.graph.inserting_before(anchor):
                out = b._tag(gm.graph.node_copy(site.node, lambda n: p2d if n is site.x else n))
            width = count * a.head_dim
            begin, end = columns or (0, site.out_features)
            if end - begin != width:
                raise PassError(f"{where}: the projection `{site.module}` gives {end - begin} columns to K/V, "
                                f"expected kv_heads·head_dim = {width}")
            if columns is not None:
                out = b.call(aten.slice.Tensor, out, 1, begin, end)
            out = b.call(aten.view.default, out, [self.rule.adapter_len, count, a.head_dim])
            return b.call(aten.unsqueeze.default, b.call(aten.permute.default, out, [1, 0, 2]), 0)

        k = heads(k_site, k_cols, a.kv_heads)
        v = heads(v_site, v_cols, a.kv_heads)
        tracer = GraphAppendingTracer(gm.graph)
        before = set(gm.graph.nodes)
        with gm.graph.inserting_before(anchor):
            q, kp, vp, g = (Proxy(n, tracer) for n in (a.q, k, v, b.attr(gate)))
            if a.heads != a.kv_heads:
                kp = kp.repeat_interleave(a.heads // a.kv_heads, dim=1)
                vp = vp.repeat_interleave(a.heads // a.kv_heads, dim=1)
            scores = torch.matmul(q, kp.transpose(2, 3)) / math.sqrt(a.head_dim)
            scores = g.to(base) * F.softmax(scores, dim=-1, dtype=torch.float32).to(base)
            out = Proxy(y, tracer) + torch.matmul(scores, vp)
        for node in gm.graph.nodes:
            if node not in before:
                b._tag(node)
        made = set(b.created)
        y.replace_all_uses_with(out.node, delete_user_cb=lambda u: u not in made)
