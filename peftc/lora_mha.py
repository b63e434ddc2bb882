"""LoRA on nn.MultiheadAttention as HF PEFT's lora.MultiheadAttention puts it.

MultiheadAttention reads its fused `in_proj_weight` [3·E, E] and `out_proj.weight` functionally, so capture shows
two `linear` sites inside the module. Targeting the module (`target=["attn"]`) adapts both, named as HF PEFT saves
them: `<mha>.lora_A.weight` [r, E] / `<mha>.lora_B.weight` [3·E, r] on the fused in-projection, and
`<mha>.base_layer.out_proj.lora_A/B.weight` on the out-projection. HF applies both by merging them into the weights
for each call, so its MHA adapters see no dropout; peftc's do not either. Targeting `out_proj` alone adapts the
out-projection (it changes the output, where HF PEFT's swapped out_proj is never called).
"""

from __future__ import annotations

import dataclasses

MHA = "MultiheadAttention"


def _mha_of(site, info) -> str | None:
    owner, _, leaf = site.weight.rpartition(".")
    if leaf == "in_proj_weight" and info.module_types.get(owner) == MHA:
        return owner
    return None


def as_hf(sites: list, info) -> list:
    """The fused in-projection's site belongs to the MHA module itself (HF's `<mha>.lora_A`)."""
    out = []
    for s in sites:
        mha = _mha_of(s, info)
        out.append(dataclasses.replace(s, module=mha, adapter_prefix=mha) if mha else s)
    return out


def with_out_proj(chosen: list, sites: list, info) -> list:
    """A chosen MHA brings its out-projection, named `<mha>.base_layer.out_proj` as HF PEFT names it."""
    mhas = {s.module for s in chosen if _mha_of(s, info)}
    if not mhas:
        return chosen
    extra = {s.node: dataclasses.replace(s, adapter_prefix=f"{s.module.rpartition('.')[0]}.base_layer.out_proj")
             for s in sites if s.module.rpartition(".")[0] in mhas and s.module.endswith(".out_proj")
             and s.weight == f"{s.module}.weight"}
    return [extra.pop(s.node, s) for s in chosen] + list(extra.values())


def undropped(site, info) -> bool:
    """Sites whose LoRA HF applies by merging (no dropout): an MHA's in- and out-projections."""
    owner = site.module if _mha_of(site, info) else site.module.rpartition(".")[0]
    return info.module_types.get(owner) == MHA and site.adapter_prefix.endswith(("base_layer.out_proj", owner))
