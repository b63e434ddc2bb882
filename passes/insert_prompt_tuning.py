"""insert-prompt-tuning: embed(ids)  ==>  [prompt; embed(ids)], with every sequence input lengthened to match."""

from __future__ import annotations

import operator
from dataclasses import dataclass, field
from typing import ClassVar

import torch
from torch.fx import GraphModule, Node

from peftc.errors import PassError, SpecError
from peftc.pipeline import Pass, PassContext, PassResult, register_pass
from peftc.rewrite import NodeBuilder, mark_adapted
from peftc.spec import PromptTuning

from .insert_lora import adapter_dtype

aten = torch.ops.aten

PROMPT = "prompt_embeddings"  # [length, hidden], the key HF PEFT saves a prompt-tuning adapter under
# What HF PEFT prepends to each sequence input of the base model (position ids are dropped and recomputed).
_PAD = {"input_ids": 0, "attention_mask": 1, "labels": -100, "token_type_ids": 0}
_INDEX_LAYOUT = {aten.view.default, aten.reshape.default, aten._unsafe_view.default, aten.to.dtype,
                 aten._to_copy.default, aten.contiguous.default, aten.clone.default}


def _same_symbol(a, b) -> bool:
    return isinstance(a, torch.SymInt) and isinstance(b, torch.SymInt) and str(a) == str(b)


def _placeholder_of(node) -> Node | None:
    while isinstance(node, Node) and node.op == "call_function" and node.target in _INDEX_LAYOUT:
        node = node.args[0]
    return node if isinstance(node, Node) and node.op == "placeholder" else None


@register_pass
@dataclass(frozen=True)
class InsertPromptTuning(Pass):
    """insert-prompt-tuning: e = embedding(W, ids)  ==>  e = [prompt; embedding(W, ids)], as HF PEFT's prompt tuning.

    The graph's sequence inputs grow by `length` positions at the front, as HF PEFT builds them before calling the
    base model: `input_ids` gets placeholder ids whose embeddings the prompt replaces, `attention_mask` ones,
    `labels` -100, `token_type_ids` zeros, and `position_ids` are replaced by 0..L+length-1 (HF PEFT drops them).
    Everything downstream reads the longer sequence, so outputs (logits, hidden states) have L + length positions,
    the first `length` of them virtual. With `inputs_embeds` instead of `input_ids`, the prompt is prepended to it.
    Parameter: `prompt_embeddings` [length, hidden], N(0, 1) as HF PEFT's random init. The sequence length must be
    a dynamic dimension of the capture (compile with dynamic=True, the default, and sequences of length >= 2).
    """

    name: ClassVar[str] = "insert-prompt-tuning"
    rule_type: ClassVar[type] = PromptTuning
    rule: PromptTuning = field(default_factory=PromptTuning)

    def run(self, gm: GraphModule, ctx: PassContext) -> PassResult:
        placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
        for ph in placeholders:
            done = ph.meta.get("peftc.adapted", {}).get("prompt_tuning")
            if done is not None:
                if done != self.rule:
                    raise SpecError(f"{self.rule!r}: the model already has a prompt from {done!r}; use one "
                                    f"prompt_tuning rule")
                return PassResult(gm, False)
        source, lookup = self._find_input(gm, placeholders)
        seq = source.meta["val"].shape[1]
        if not isinstance(seq, torch.SymInt):
            raise PassError(f"prompt tuning lengthens the sequence, but `{source.target}` was captured with a fixed "
                            f"length {seq}; compile with dynamic=True and example sequences of length >= 2")
        length = self.rule.length
        like = lookup.meta["val"] if lookup is not None else source.meta["val"]
        hidden = like.shape[-1]
        dtype = adapter_dtype(like.dtype)
        self._add_params(gm, ctx, hidden, dtype, like.device)

        anchor = placeholders[-1].next
        b = NodeBuilder(gm, anchor, self.name, self.rule.kind)
        made: set[Node] = set()
        batch = self._track(made, b.call(aten.sym_size.int, source, 0, name="prompt_batch"))
        for ph in placeholders:
            val = ph.meta.get("val")
            # Capture gives each input its own symbols: `labels` has the sequence length by HF's meaning, even
            # where the graph never ties its size to the ids'.
            if not isinstance(val, torch.Tensor) or val.dim() < 2 or \
                    not (_same_symbol(val.shape[1], seq) or ph.target == "labels"):
                continue
            if ph is source and lookup is None:  # inputs_embeds
                new = b.call(aten.cat.default, [self._prompt(b, made, batch, val.dtype), ph], 1,
                             name="inputs_embeds_with_prompt")
            elif ph.target == "position_ids":
                new = self._positions(b, made, ph, batch, val)
            elif ph.target in _PAD or ph is source:
                if val.dim() != 2:
                    raise PassError(f"prompt tuning: `{ph.target}` has shape {tuple(val.shape)}; expected "
                                    f"[batch, seq]")
                new = b.call(aten.constant_pad_nd.default, ph, [length, 0], _PAD.get(ph.target, 0),
                             name=f"{ph.target}_with_prompt")
            else:
                raise PassError(f"prompt tuning: input `{ph.target}` has the sequence length but peftc does not "
                                f"know what HF PEFT prepends to it (it knows {', '.join(_PAD)}, position_ids and "
                                f"inputs_embeds); drop it from the call or rename it")
            made.add(new)
            ph.replace_all_uses_with(new, delete_user_cb=lambda u: u not in made and u.op != "call_module")
        if lookup is not None:
            after = NodeBuilder(gm, lookup.next, self.name, self.rule.kind, like=lookup)
            real = after.call(aten.slice.Tensor, lookup, 1, length, torch.iinfo(torch.int64).max,
                              name="embeds_real")
            with_prompt = after.call(aten.cat.default, [self._prompt(after, made, batch, like.dtype), real], 1,
                                     name="embeds_with_prompt")
            lookup.replace_all_uses_with(with_prompt, delete_user_cb=lambda u: u is not real)
        mark_adapted(source, "prompt_tuning", self.rule)
        ctx.count(f"{self.name}.inserted")
        return PassResult(gm, True)

    @staticmethod
    def _track(made: set[Node], node: Node) -> Node:
        made.add(node)
        return node

    def _add_params(self, gm: GraphModule, ctx: PassContext, hidden: int, dtype: torch.dtype, device) -> None:
        ctx.params.add(gm, PROMPT, lambda: torch.randn(self.rule.length, hidden, dtype=dtype, device=device),
                       method="prompt_tuning", added_by=self.name)

    def _prompt_table(self, b: NodeBuilder) -> Node:
        """The [P, H] prompt the graph prepends (P-tuning computes it from its prompt encoder)."""
        return b.attr(PROMPT)

    def _prompt(self, b: NodeBuilder, made: set[Node], batch: Node, dtype: torch.dtype) -> Node:
        """prompt_embeddings [P, H] ==> [batch, P, H] in the embeddings' dtype."""
        prompt = self._prompt_table(b)
        if adapter_dtype(dtype) != dtype:  # the prompt trains in float32 on a half-precision model
            prompt = b.call(aten.to.dtype, prompt, dtype, name="prompt_cast")
        prompt = b.call(aten.unsqueeze.default, prompt, 0, name="prompt_unsqueeze")
        return self._track(made, b.call(aten.expand.default, prompt, [batch, -1, -1], name="prompt_expand"))

    def _positions(self, b: NodeBuilder, made: set[Node], ph: Node, batch: Node, val: torch.Tensor) -> Node:
        """HF PEFT drops position ids; the model's default is 0..L+P-1 for every row."""
        seq = self._track(made, b.call(aten.sym_size.int, ph, 1, name="position_ids_len"))
        total = b.call(operator.add, seq, self.rule.length, name="position_ids_total")
        pos = b.call(aten.arange.default, total, kwargs={"dtype": val.dtype, "device": val.device},
                     name="position_ids_default")
        pos = b.call(aten.unsqueeze.default, pos, 0, name="position_ids_row")
        return b.call(aten.expand.default, pos, [batch, -1], name="position_ids_with_prompt")

    def _find_input(self, gm: GraphModule, placeholders: list[Node]) -> tuple[Node, Node | None]:
        """(the placeholder the prompt goes in front of, the embedding lookup that reads it, or None for
        inputs_embeds)."""
        by_name = {ph.target: ph for ph in placeholders}
        embeds = by_name.get("inputs_embeds")
        if embeds is not None and isinstance(embeds.meta.get("val"), torch.Tensor) and embeds.users:
            return embeds, None
        lookups = [n for n in gm.graph.nodes if n.op == "call_function" and n.target == aten.embedding.default
                   and _placeholder_of(n.args[1]) is not None]
        preferred = [n for n in lookups if _placeholder_of(n.args[1]).target == "input_ids"]
        if preferred:
            return _placeholder_of(preferred[0].args[1]), preferred[0]
        if len(lookups) == 1:
            return _placeholder_of(lookups[0].args[1]), lookups[0]
        found = ", ".join(sorted({_placeholder_of(n.args[1]).target for n in lookups})) or "none"
        raise PassError(f"prompt tuning needs one embedding lookup of an input (input_ids) or an inputs_embeds "
                        f"input; embedding lookups of inputs found: {found}")

