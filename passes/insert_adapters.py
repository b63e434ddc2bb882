"""insert-adapters: y = matmul(x, W)  ==>  y + Σ_i s_i·B_i(A_i·dropout_i(x)), one term per active adapter i."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import ClassVar

from torch.fx import GraphModule

from peftc.errors import AdapterError
from peftc.params import ADAPTER, set_attr_path
from peftc.pipeline import Pass, PassContext, PassResult, register_pass
from peftc.spec import LoRA

from .insert_lora import InsertLora

BANK = "peftc_adapters"  # a loaded adapter's tensors: `peftc_adapters.<adapter>.<module>.lora_A.weight`


def bank_name(adapter: str, slot: str) -> str:
    return f"{BANK}.{adapter}.{slot}"


@register_pass
@dataclass(frozen=True)
class InsertAdapters(Pass):
    """insert-adapters: y = matmul(x, W)  ==>  y + Σ_i s_i·B_i(A_i·dropout_i(x)), one term per active adapter i.

    Each adapter is inserted by insert-lora with its own rule, on the tensors the parameter table already holds for
    it under `peftc_adapters.<adapter>.<HF PEFT name>` (the CompiledModel's bank of loaded adapters): nothing is
    initialized here. A term reads its adapter's own tensors, so one graph serves that set of adapters whatever is
    bound in the compiled graph's slots. Terms are added in the order given; HF PEFT sums active adapters the same
    way. An adapter whose tensors do not fit what its rule inserts is an AdapterError.
    """

    name: ClassVar[str] = "insert-adapters"
    adapters: tuple[str, ...] = ()
    rules: tuple[LoRA, ...] = ()

    def run(self, gm: GraphModule, ctx: PassContext) -> PassResult:
        modified = False
        for adapter, rule in zip(self.adapters, self.rules):
            modified |= self._insert_one(gm, ctx, adapter, rule)
        return PassResult(gm, modified)

    def _insert_one(self, gm: GraphModule, ctx: PassContext, adapter: str, rule: LoRA) -> bool:
        prefix = bank_name(adapter, "")
        slots = {p.name[len(prefix):]: p for p in ctx.params if p.name.startswith(prefix)}
        # insert-lora finds the adapter's tensors under their HF names and reuses them; then they are renamed back.
        for slot, p in slots.items():
            ctx.params.insert(dataclasses.replace(p, name=slot))
        before = set(ctx.params.names(ADAPTER))
        result = InsertLora(rule).run(gm, ctx)
        created = sorted(set(ctx.params.names(ADAPTER)) - before)
        for slot in [*slots, *created]:
            ctx.params.pop(slot)
        if created:
            raise AdapterError(f"adapter `{adapter}` has no `{created[0]}`, which its LoRA rule {rule!r} puts on this "
                               f"model; it was saved for another model or another spec")
        read = {n.target for n in gm.graph.nodes if n.op == "get_attr"}
        unread = sorted(s for s in slots if s not in read)
        if unread:
            raise AdapterError(f"adapter `{adapter}` has `{unread[0]}`, which its LoRA rule {rule!r} does not put on "
                               f"this model; it was saved for another model or another spec")
        for node in gm.graph.nodes:
            if node.op == "get_attr" and node.target in slots:
                node.target = prefix + node.target
                set_attr_path(gm, node.target, slots[node.target[len(prefix):]].tensor)
            if node.meta.get("peftc.adapted", {}).get("lora") is not None:
                # the next adapter's insert-lora adapts the same sites: its term adds to this one
                node.meta["peftc.adapted"] = {k: v for k, v in node.meta["peftc.adapted"].items() if k != "lora"}
            lora = node.meta.get("peftc.lora")
            if lora is not None and not lora.get("bank"):
                lora["adapters"] = {k: (prefix + a, prefix + b, s, span) for k, (a, b, s, span) in
                                    lora["adapters"].items()}
                for key in ("magnitude", "bias"):
                    if lora.get(key):
                        lora[key] = prefix + lora[key]
                lora["bank"] = adapter
        return result.modified
