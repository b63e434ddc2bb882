"""LoRA on embedding lookups: e = embedding(W, ids)  ==>  e + s·(embedding(Aᵀ, ids) Bᵀ), HF PEFT's lora.Embedding.

A site is an `aten.embedding(W, ids, padding_idx, ...)` whose table W is a base parameter (nn.Embedding and
`F.embedding(ids, self.weight)` both arrive so). HF PEFT's names, shapes and init: `<module>.lora_embedding_A`
[r, num_embeddings] zeros and `<module>.lora_embedding_B` [dim, r] N(0, 1), so at init the lookup is unchanged. The
lookup of Aᵀ takes the base's padding_idx (its row gets no gradient, as in HF). HF applies no dropout to an
embedding adapter, and neither does peftc. A scale the model applies after the lookup (Gemma's scaled embeddings)
scales the adapter's output too, as HF's embed_scale does.

A tied output layer (lm_head reading the same W) is a separate matmul site: targeted too, it gets its own
`lm_head.lora_A/B` adapter, as HF PEFT gives it (without `ensure_weight_tying`). Merge: W' = W + s·(BA)ᵀ for the
lookup only; a tied lm_head keeps reading W (HF's in-place merge changes the tied lm_head too, so its merged model
no longer computes what its unmerged one did; peftc's does).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch.fx import GraphModule, Node

from .errors import SpecError
from .merge import adapter_nodes
from .params import BASE
from .rewrite import NodeBuilder, erase_dead, replace_uses

aten = torch.ops.aten

TAG = "peftc.lora_embedding"  # on the adapter's output node: {weight, A, B, scaling}


@dataclass(frozen=True)
class EmbeddingSite:
    node: Node  # the aten.embedding
    weight: str
    module: str
    adapter_prefix: str
    num_embeddings: int
    embedding_dim: int
    form: str = "embedding"

    @property
    def ids(self) -> Node:
        return self.node.args[1]


def embedding_sites(gm: GraphModule, table, info) -> list[EmbeddingSite]:
    """Every embedding lookup of a base parameter table, in graph order (peftc's own lookups excluded)."""
    from .match import _module_path

    sites = []
    for node in gm.graph.nodes:
        if node.op != "call_function" or node.target != aten.embedding.default or "peftc.pass" in node.meta:
            continue
        w = node.args[0]
        delta = w.meta.get("peftc.delta") if isinstance(w, Node) else None
        name = delta["param"] if delta else w.target if isinstance(w, Node) and w.op == "get_attr" else None
        if name not in table or table[name].role != BASE or table[name].tensor.dim() != 2:
            continue
        shape = table[name].tensor.shape
        module, prefix = _module_path(node, name, info)
        sites.append(EmbeddingSite(node, name, module, prefix, shape[0], shape[1]))
    return sites


def check_rule(rule, site: EmbeddingSite) -> None:
    where = f"{rule!r} on `{site.module}`"
    for key in ("use_dora", "lora_bias", "slices", "freeze_a"):
        if getattr(rule, key):
            why = "HF PEFT refuses it" if key == "lora_bias" else \
                "A starts at zero, so a frozen A trains nothing" if key == "freeze_a" else "not supported"
            raise SpecError(f"{where}: `{key}` on an embedding lookup is {why}; exclude embeddings from this rule "
                            f"or drop `{key}`")


def insert(pass_name: str, rule, gm: GraphModule, ctx, site: EmbeddingSite) -> None:
    """e ==> e + s·linear(embedding(t(A), ids, padding_idx), B), in the adapters' dtype, cast back."""
    from .passes.insert_lora import adapter_dtype

    weight = ctx.params[site.weight].tensor
    dtype = adapter_dtype(weight.dtype)
    r, scaling = rule.rank_for(site.module), rule.scaling_for(site.module)
    a_name, b_name = f"{site.adapter_prefix}.lora_embedding_A", f"{site.adapter_prefix}.lora_embedding_B"
    # HF's lora.Embedding: A = 0, B ~ N(0, 1) for every truthy init_lora_weights; False leaves both N(0, 1)
    a_init = torch.randn if rule.init is False else torch.zeros
    ctx.params.add(gm, a_name, lambda: a_init(r, site.num_embeddings, dtype=dtype, device=weight.device),
                   method="lora", added_by=pass_name)
    ctx.params.add(gm, b_name, lambda: torch.randn(site.embedding_dim, r, dtype=dtype, device=weight.device),
                   method="lora", added_by=pass_name)
    y = site.node
    stem = site.module.replace(".", "_")
    b = NodeBuilder(gm, y.next, pass_name, "lora", like=y)
    padding_idx = y.args[2] if len(y.args) > 2 else -1
    a_t = b.call(aten.t.default, b.attr(a_name), name=f"{stem}_lora_embedding_A_t")
    down = b.call(aten.embedding.default, a_t, site.ids, padding_idx, name=f"{stem}_lora_embedding_A")
    up = b.call(aten.linear.default, down, b.attr(b_name), name=f"{stem}_lora_embedding_B")
    scaled = b.call(aten.mul.Tensor, up, scaling, name=f"{stem}_lora_scaled")
    out = b.call(aten.add.Tensor, y, scaled, name=f"{stem}_lora_out")
    if dtype != weight.dtype:
        out = b.call(aten.to.dtype, out, weight.dtype, name=f"{stem}_lora_cast")
    out.meta[TAG] = {"weight": site.weight, "module": site.module, "A": a_name, "B": b_name, "scaling": scaling}
    replace_uses(y, out, keep=b.created)


def merge(gm: GraphModule, scope: Any, pass_name: str) -> int:
    """e + s·(embedding(Aᵀ, ids) Bᵀ)  ==>  embedding(W + s·(BA)ᵀ, ids): HF PEFT's Embedding merge, for the lookup
    only (a tied lm_head keeps W)."""
    table, hits = scope.ctx.params, 0
    for out in list(gm.graph.nodes):
        tag = out.meta.get(TAG)
        if tag is None or out._erased or not {tag["A"], tag["B"]} <= scope.adapters:
            continue
        dying = adapter_nodes(out, out.meta["peftc.pass"])
        sites = [i for n in dying for i in n.all_input_nodes if i not in dying
                 and i.target == aten.embedding.default and i.args[0].op == "get_attr"
                 and i.args[0].target == tag["weight"]]
        if len(sites) != 1 or any(u not in dying for u in sites[0].users) or not scope.frozen_base(sites[0].args[0]):
            continue
        site = sites[0]
        leaf = site.args[0]
        w_dtype, compute = table[tag["weight"]].tensor.dtype, table[tag["A"]].tensor.dtype
        b = NodeBuilder(gm, site, pass_name, "merge-lora-embedding", like=site)
        delta = b.call(aten.mul.Tensor, b.call(aten.t.default, b.call(aten.mm.default, b.attr(tag["B"]),
                                                                     b.attr(tag["A"]))), tag["scaling"])
        w = leaf if w_dtype == compute else b.call(aten.to.dtype, leaf, compute)
        merged = b.call(aten.add.Tensor, w, delta)
        if w_dtype != compute:
            merged = b.call(aten.to.dtype, merged, w_dtype)
        merged.meta["peftc.replaces"] = (leaf.target,)
        site.replace_input_with(leaf, merged)
        out.replace_all_uses_with(site)
        erase_dead(gm, [out, *dying])
        scope.count(f"{pass_name}.tag-lora-embedding")
        hits += 1
    return hits
