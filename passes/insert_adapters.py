"""insert-adapters: y = op(x, W)  ==>  the adapter passes of each active adapter i in turn, on adapter i's own tensors
(LoRA, LoHa, LoKr, VeRA: y + Σ_i Δ_i(x); IA3: y · Π_i l_i; OFT, BOFT: op(x, rw_i(···W)), nested in HF PEFT's order)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import ClassVar

from torch.fx import GraphModule

from peftc.errors import AdapterError
from peftc.params import ADAPTER, set_attr_path
from peftc.pipeline import RULE_PASSES, Pass, PassContext, PassResult, register_pass
from peftc.spec import Rule

BANK = "peftc_adapters"  # a loaded adapter's tensors: `peftc_adapters.<adapter>.<module>.lora_A.weight`


def bank_name(adapter: str, slot: str) -> str:
    return f"{BANK}.{adapter}.{slot}"


@register_pass
@dataclass(frozen=True)
class InsertAdapters(Pass):
    """insert-adapters: y = op(x, W)  ==>  each active adapter's passes in turn, each on that adapter's tensors.

    Adapter i is inserted by the passes of its own rules (insert-lora, insert-ia3, insert-loha, ...), on the tensors
    the parameter table already holds for it under `peftc_adapters.<adapter>.<HF PEFT name>` (the CompiledModel's
    bank of loaded adapters): nothing is initialized here. A term reads its adapter's own tensors, so one graph serves
    that set of adapters whatever is bound in the compiled graph's slots. Adapters are inserted in the order given,
    each on the output of the previous one: additive methods sum y + Δ_1(x) + Δ_2(x) and IA3 multiplies its
    scalings, as HF PEFT's layers loop over their active adapters. A weight rewrite (OFT, BOFT) rewrites the
    previous adapter's W', in the order its method's `rewrite_order` says HF PEFT composes them (BOFT: given,
    W' = rw_2(rw_1(W)); OFT: reversed, rw_1(rw_2(W)), since HF rotates x by R_1 first). An adapter whose tensors
    do not fit what its rules insert is an AdapterError.
    """

    name: ClassVar[str] = "insert-adapters"
    adapters: tuple[str, ...] = ()
    rules: tuple[tuple[Rule, ...], ...] = ()  # each adapter's rules, in its spec's order

    def run(self, gm: GraphModule, ctx: PassContext) -> PassResult:
        modified = False
        order = list(zip(self.adapters, self.rules))
        if order and order[0][1] and getattr(type(order[0][1][0]), "rewrite_order", "active") == "reversed":
            order.reverse()
        for adapter, rules in order:
            modified |= self._insert_one(gm, ctx, adapter, rules)
        return PassResult(gm, modified)

    def _insert_one(self, gm: GraphModule, ctx: PassContext, adapter: str, rules: tuple[Rule, ...]) -> bool:
        from peftc.method import TAG

        prefix = bank_name(adapter, "")
        slots = {p.name[len(prefix):]: p for p in ctx.params if p.name.startswith(prefix)}
        # The passes find the adapter's tensors under their HF names and reuse them; then they are renamed back.
        for slot, p in slots.items():
            ctx.params.insert(dataclasses.replace(p, name=slot))
        before = set(ctx.params.names(ADAPTER))
        modified = False
        for rule in rules:
            modified |= RULE_PASSES[type(rule)](rule).run(gm, ctx).modified
        created = sorted(set(ctx.params.names(ADAPTER)) - before)
        for slot in [*slots, *created]:
            ctx.params.pop(slot)
        described = " + ".join(repr(r) for r in rules)
        if created:
            raise AdapterError(f"adapter `{adapter}` has no `{created[0]}`, which its rules {described} put on this "
                               f"model; it was saved for another model or another spec")
        read = {n.target for n in gm.graph.nodes if n.op == "get_attr"}
        unread = sorted(s for s in slots if s not in read)
        if unread:
            raise AdapterError(f"adapter `{adapter}` has `{unread[0]}`, which its rules {described} do not put on "
                               f"this model; it was saved for another model or another spec")
        kinds = {r.kind for r in rules}
        for node in gm.graph.nodes:
            if node.op == "get_attr" and node.target in slots:
                node.target = prefix + node.target
                set_attr_path(gm, node.target, slots[node.target[len(prefix):]].tensor)
            done = node.meta.get("peftc.adapted", {})
            if kinds & done.keys():
                # the next adapter's passes adapt the same sites: its term adds to (or scales) this one
                node.meta["peftc.adapted"] = {k: v for k, v in done.items() if k not in kinds}
            tag = node.meta.get(TAG)
            if tag is not None and not tag.get("bank"):
                tag["params"] = {k: prefix + v if v in slots else v for k, v in tag["params"].items()}
                tag["bank"] = adapter
            lora = node.meta.get("peftc.lora")
            if lora is not None and not lora.get("bank"):
                lora["adapters"] = {k: (prefix + a, prefix + b, s, span) for k, (a, b, s, span) in
                                    lora["adapters"].items()}
                for key in ("magnitude", "bias"):
                    if lora.get(key):
                        lora[key] = prefix + lora[key]
                lora["bank"] = adapter
        return modified
