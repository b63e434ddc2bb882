"""insert-trainable-tokens: W = get_attr(embedding table)  ==>  index_copy(W, 0, idx, rows), HF PEFT's trainable tokens."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch.fx import GraphModule

from peftc.errors import SpecError
from peftc.lora_embedding import embedding_sites
from peftc.match import select
from peftc.pipeline import Pass, PassContext, PassResult, register_pass
from peftc.rewrite import NodeBuilder, replace_uses
from peftc.spec import Rule, Target, register_rule

from .insert_lora import adapter_dtype

aten = torch.ops.aten
METHOD = "trainable_tokens"


@register_rule
@dataclass(frozen=True)
class TrainableTokens(Rule):
    """HF PEFT's trainable tokens (TrainableTokensConfig, LoraConfig.trainable_token_indices): only the embedding
    rows `indices` train. `target` selects embedding modules with LoRA's selector forms; None (the default) is the
    input embedding, the lookup of an input (input_ids), as HF's default."""

    kind: ClassVar[str] = METHOD
    hf_names: ClassVar[dict[str, str]] = {**Rule.hf_names, "token_indices": "indices",
                                          "trainable_token_indices": "indices"}

    indices: tuple[int, ...] = ()
    target: Target = None
    exclude: Target = None

    def __post_init__(self) -> None:
        where = self._where()
        self._check_targets(where)
        idx = self.indices
        if not isinstance(idx, (list, tuple)) or not idx or any(isinstance(i, bool) or not isinstance(i, int)
                                                                 or i < 0 for i in idx):
            raise SpecError(f"{where}: `indices` must be a non-empty list of token ids (integers >= 0), got {idx!r}")
        if len(set(idx)) != len(idx):
            raise SpecError(f"{where}: `indices` repeats a token id ({sorted(i for i in idx if idx.count(i) > 1)[0]}); "
                            f"give each token once")
        object.__setattr__(self, "indices", tuple(idx))


@register_pass
@dataclass(frozen=True)
class InsertTrainableTokens(Pass):
    """insert-trainable-tokens: W = get_attr(W)  ==>  index_copy(W, 0, idx, rows), before W's first use.

    `<module>.trainable_tokens_delta` [len(indices), dim] holds the chosen rows themselves, initialised to W[idx]
    (HF PEFT's name and meaning: at init nothing changes); `<module>.trainable_tokens_index` (int64, frozen) says
    which rows. Every read of W sees the new rows, so a tied lm_head reads them too, as HF ties the token adapter
    to the output embedding (tie_word_embeddings). Merged, the rows fold into W.
    """

    name: ClassVar[str] = "insert-trainable-tokens"
    rule_type: ClassVar[type] = TrainableTokens
    rule: TrainableTokens = field(default_factory=lambda: TrainableTokens(indices=(0,)))

    def run(self, gm: GraphModule, ctx: PassContext) -> PassResult:
        sites = embedding_sites(gm, ctx.params, ctx.info)
        if self.rule.target is None:
            chosen = [s for s in sites if s.ids.op == "placeholder"]
            if not chosen:
                raise SpecError(f"{self.rule!r}: the graph has no embedding lookup of an input; give `target`, the "
                                f"embedding module (lookups: {', '.join(s.module for s in sites) or 'none'})")
        else:
            chosen = select(sites, self.rule.target, self.rule.exclude, ctx.info, where=repr(self.rule))
        modified = False
        for site in {s.weight: s for s in chosen}.values():
            read = site.node.args[0]
            if read.op != "get_attr":  # a delta rewrote W already: this rule's (a rerun) or another's
                if read.meta["peftc.delta"]["method"] == METHOD:
                    continue
                raise SpecError(f"{self.rule!r} selects `{site.module}`, whose weight a "
                                f"{read.meta['peftc.delta']['method']} rule already adapts; narrow one target")
            self._insert(gm, ctx, site, read)
            ctx.count("insert-trainable-tokens.inserted")
            modified = True
        return PassResult(gm, modified)

    def _insert(self, gm: GraphModule, ctx: PassContext, site: Any, read) -> None:
        weight = ctx.params[site.weight].tensor
        if max(self.rule.indices) >= site.num_embeddings:
            raise SpecError(f"{self.rule!r} on `{site.module}`: token id {max(self.rule.indices)} is out of range "
                            f"for its {site.num_embeddings} embeddings")
        rows, index = f"{site.adapter_prefix}.trainable_tokens_delta", f"{site.adapter_prefix}.trainable_tokens_index"
        dtype = adapter_dtype(weight.dtype)
        idx = ctx.params.add(gm, index, lambda: torch.tensor(self.rule.indices, dtype=torch.int64,
                                                             device=weight.device),
                             method=METHOD, added_by=self.name, trainable=False)
        ctx.params.add(gm, rows, lambda: weight.detach()[idx].to(dtype).clone(), method=METHOD, added_by=self.name)
        order = {n: i for i, n in enumerate(gm.graph.nodes)}
        first = min(read.users, key=order.__getitem__)
        b = NodeBuilder(gm, first, self.name, METHOD, like=first)
        stem = site.module.replace(".", "_")
        values = b.attr(rows)
        if dtype != weight.dtype:
            values = b.call(aten.to.dtype, values, weight.dtype, name=f"{stem}_trainable_tokens_cast")
        eff = b.call(aten.index_copy.default, read, 0, b.attr(index), values, name=f"{stem}_trainable_tokens")
        # Still W to the matchers (a tied lm_head stays a LoRA site); merged, it folds into a tensor named W.
        eff.meta["peftc.delta"] = {"param": site.weight, "method": METHOD, "values": rows, "index": index, "dim": 0}
        eff.meta["peftc.replaces"] = (site.weight,)
        replace_uses(read, eff, keep=b.created)
