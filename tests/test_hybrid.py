"""Hybrid specs: several rules in one spec, each seeing the graph the earlier ones left.

MAM adapter (He et al.): prefix tuning on the attention plus a scaled parallel adapter on the feed-forward block.
UniPELT (Mao et al., AdapterHub's `unipelt`): LoRA, prefix tuning and a Pfeiffer adapter, LoRA and the adapter each
scaled by a learned gate sigmoid(W_g x + b_g) averaged over the sequence (AdapterHub's `use_gating`). The gated LoRA
is written with the public method API. Both are checked against the composition of independent references: the
AdapterHub-math adapter hooks of test_adapter.py and a gated LoRA hooked onto the HF modules, compiled with the
same prefix.
"""

from __future__ import annotations


import pytest
import torch
import torch.nn.functional as F

import peftc
from conftest import ids, tiny_gpt2, tiny_llama
from test_adapter import with_reference_adapters


@peftc.register_method
class GatedLoRA(peftc.Method):
    """gated_lora: y = W x  ==>  y + s·B(A x)·mean_seq(sigmoid(W_g x + b_g)) (UniPELT's LoRA gate)"""

    kind = "test_unipelt_lora"
    r: int = 4
    alpha: float = 8.0

    def params(self, site):
        return {"lora_A.weight": peftc.Param((self.r, site.in_features), init="kaiming_uniform"),
                "lora_B.weight": peftc.Param((site.out_features, self.r), init="zeros"),
                "gate.weight": peftc.Param((1, site.in_features), init="normal"),
                "gate.bias": peftc.Param((1,), init="zeros")}

    def forward(self, site, x, y, p):
        gate = torch.sigmoid(F.linear(x, p["gate.weight"], p["gate.bias"])).mean(dim=1).unsqueeze(-1)
        delta = F.linear(F.linear(x, p["lora_A.weight"]), p["lora_B.weight"]) * (self.alpha / self.r)
        return y + delta * gate


def randomized(cm, seed=1):
    torch.manual_seed(seed)
    state = {k: torch.randn_like(v) * 0.3 for k, v in cm.adapter_state_dict().items()}
    cm.load_adapter_state_dict(state)
    return state


def prefix_state(state):
    return {k: v for k, v in state.items() if ".prefix_" in k}


def check_composition(base, spec, adapter, state, kwargs, extra_hooks=lambda model: None):
    """The hybrid equals prefix tuning compiled on the base model with the other methods hooked in by hand."""
    ref = with_reference_adapters(base, adapter, state)
    extra_hooks(ref)
    prefix = next(r for r in spec.rules if isinstance(r, peftc.Prefix))
    ref_cm = peftc.compile(ref, prefix, kwargs=kwargs, dynamic=False)
    ref_cm.load_adapter_state_dict(prefix_state(state))
    return ref_cm


@pytest.mark.parametrize("make", [tiny_llama, tiny_gpt2], ids=["llama", "gpt2"])
def test_mam_adapter_is_prefix_plus_parallel_adapter(make):
    torch.manual_seed(0)
    base = make().eval()
    kwargs = dict(input_ids=ids(), attention_mask=torch.tensor([[1] * 8, [0] * 2 + [1] * 6]))
    adapter = peftc.Adapter(config="par_bn", reduction_factor=4)
    spec = peftc.Spec(peftc.Prefix(length=3), adapter)
    cm = peftc.compile(base, spec, kwargs=kwargs, dynamic=False)
    methods = {p.method for p in cm.params if p.trainable}
    assert methods == {"prefix", "adapter"}
    state = randomized(cm)
    ref = check_composition(base, spec, adapter, state, kwargs)
    with torch.no_grad():
        torch.testing.assert_close(cm(**kwargs).logits, ref(**kwargs).logits, atol=1e-5, rtol=1e-5)
    with pytest.raises(peftc.PassError, match="adapter"):  # the bottleneck does not fold into weights
        cm.merge()


def test_unipelt_gated_lora_prefix_and_gated_adapter():
    torch.manual_seed(0)
    base = tiny_llama().eval()
    x = ids()
    kwargs = dict(input_ids=x, labels=x)
    lora = GatedLoRA(target=["q_proj", "v_proj"])
    adapter = peftc.Adapter(config="seq_bn", use_gating=True)
    spec = peftc.Spec(lora, peftc.Prefix(length=3), adapter)
    cm = peftc.compile(base, spec, kwargs=kwargs, dynamic=False)
    trainable = {p.name for p in cm.params if p.trainable}
    assert {p.method for p in cm.params if p.trainable} == {"test_unipelt_lora", "prefix", "adapter"}
    assert "model.layers.0.self_attn.q_proj.gate.weight" in trainable
    assert "model.layers.0.output_adapters.adapters.default.gate.weight" in trainable
    state = randomized(cm)

    def gated_lora_hooks(model):
        for name, module in model.named_modules():
            if name.split(".")[-1] in ("q_proj", "v_proj"):
                w = {k[len(name) + 1:]: v for k, v in state.items() if k.startswith(name + ".")}

                def hook(m, args, out, w=w):
                    x = args[0]
                    gate = torch.sigmoid(F.linear(x, w["gate.weight"], w["gate.bias"])).mean(dim=1).unsqueeze(-1)
                    return out + (x @ w["lora_A.weight"].T @ w["lora_B.weight"].T) * 2.0 * gate
                module.register_forward_hook(hook)

    ref = check_composition(base, spec, adapter, state, kwargs, gated_lora_hooks)
    with torch.no_grad():
        torch.testing.assert_close(cm(**kwargs).logits, ref(**kwargs).logits, atol=1e-5, rtol=1e-5)
    cm.train()
    cm(**kwargs).loss.backward()
    assert {n for n, p in cm.named_parameters() if p.grad is not None} == trainable
    assert all(cm.get_parameter(n).grad.abs().sum() > 0 for n in trainable if n.endswith("gate.weight"))


def test_bf16_base_trains_float32_adapter_prompt_encoder_and_adaption_prompt():
    torch.manual_seed(0)
    base = tiny_llama().to(torch.bfloat16)
    x = ids()
    kwargs = dict(input_ids=x, labels=x)
    spec = peftc.Spec(peftc.PTuning(length=3), peftc.AdaptionPrompt(adapter_len=2, adapter_layers=1),
                      peftc.Adapter(config="seq_bn"))
    cm = peftc.compile(base, spec, kwargs=kwargs)
    trainable = [p for p in cm.params if p.trainable]
    assert {p.method for p in trainable} == {"p_tuning", "adaption_prompt", "adapter"}
    assert {p.tensor.dtype for p in trainable} == {torch.float32}
    cm.train()
    loss = cm(**kwargs).loss
    assert torch.isfinite(loss)
    loss.backward()
    assert {n for n, p in cm.named_parameters() if p.grad is not None} == {p.name for p in trainable}
