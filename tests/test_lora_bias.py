"""LoRA with `lora_bias=True` (HF PEFT's trainable bias on lora_B, scaled with B, merged into the base bias)."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import peftc
from conftest import ids, tiny_bert, tiny_gpt2
from peftc.errors import PassError, SpecError

peft = pytest.importorskip("peft")


def parity(base, rule, config, kwargs, out, prune_grads=False):
    base = base.eval()
    cm = peftc.compile(base, rule, kwargs=kwargs, prune_grads=prune_grads, dynamic=False)
    hf = peft.get_peft_model(copy.deepcopy(base), config).eval()
    assert cm.parameter_counts()[0] == sum(p.numel() for p in hf.parameters() if p.requires_grad)
    torch.testing.assert_close(out(cm(**kwargs)), out(base(**kwargs)), atol=0, rtol=0)  # zeros at init
    hf_state = peft.get_peft_model_state_dict(hf)
    assert {f"base_model.model.{k}" for k in cm.adapter_state_dict()} == set(hf_state)
    torch.manual_seed(1)
    weights = {k: torch.randn_like(v) * 0.3 for k, v in cm.adapter_state_dict().items()}
    cm.load_adapter_state_dict(weights)
    peft.set_peft_model_state_dict(hf, {f"base_model.model.{k}": v for k, v in weights.items()})
    ours, theirs = out(cm(**kwargs)), out(hf(**kwargs))
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)
    ours.square().mean().backward()
    theirs.square().mean().backward()
    hf_params = dict(hf.named_parameters())
    for name in weights:
        head, _, leaf = name.rpartition(".")
        torch.testing.assert_close(cm.get_parameter(name).grad, hf_params[f"base_model.model.{head}.default.{leaf}"].grad,
                                   atol=1e-5, rtol=1e-4)
    merged = cm.merge()
    with torch.no_grad():
        torch.testing.assert_close(out(merged(**kwargs)), out(hf.merge_and_unload()(**kwargs)), atol=1e-5, rtol=1e-5)
    assert {n for n, _ in merged.named_parameters()} == {n for n, _ in base.named_parameters()}
    return cm


def test_lora_bias_on_bert_linear_matches_hf():
    torch.manual_seed(0)
    parity(tiny_bert(num_hidden_layers=1), peftc.LoRA(target=["query", "value"], r=4, alpha=8, lora_bias=True),
           peft.LoraConfig(target_modules=["query", "value"], r=4, lora_alpha=8, lora_bias=True),
           {"input_ids": ids()}, lambda o: o.logits)


def test_lora_bias_round_trips_through_peft_s_format(tmp_path):
    torch.manual_seed(0)
    base = tiny_bert(num_hidden_layers=1).eval()
    kwargs = dict(input_ids=ids())
    cm = peftc.compile(copy.deepcopy(base), peftc.LoRA(target=["query", "value"], r=4, lora_bias=True), kwargs=kwargs,
                       dynamic=False)
    torch.manual_seed(1)
    cm.load_adapter_state_dict({k: torch.randn_like(v) * 0.3 for k, v in cm.adapter_state_dict().items()})
    assert cm.save_pretrained(tmp_path) == "peft"
    hf = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path)).eval()
    assert hf.peft_config["default"].lora_bias
    with torch.no_grad():
        torch.testing.assert_close(hf(**kwargs).logits, cm(**kwargs).logits, atol=1e-5, rtol=1e-5)
    assert peftc.Spec.from_peft(tmp_path).rules[0].lora_bias
    again = peftc.compile(copy.deepcopy(base), tmp_path, kwargs=kwargs, dynamic=False)
    torch.testing.assert_close(again(**kwargs).logits, cm(**kwargs).logits, atol=1e-6, rtol=1e-6)


def test_lora_bias_on_gpt2_conv1d_matches_hf_with_prune_grads():
    torch.manual_seed(0)
    cm = parity(tiny_gpt2(n_layer=1), peftc.LoRA(target=["c_attn"], r=4, alpha=8, lora_bias=True),
                peft.LoraConfig(target_modules=["c_attn"], r=4, lora_alpha=8, lora_bias=True, fan_in_fan_out=True),
                {"input_ids": ids()}, lambda o: o.logits, prune_grads=True)
    assert cm.params["transformer.h.0.attn.c_attn.lora_B.bias"].tensor.shape == (96,)


def test_lora_bias_on_a_conv_matches_hf():
    torch.manual_seed(0)
    base = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.ReLU(), nn.Conv2d(6, 4, 1))
    parity(base, peftc.LoRA(target=["0", "2"], r=2, alpha=4, lora_bias=True),
           peft.LoraConfig(target_modules=["0", "2"], r=2, lora_alpha=4, lora_bias=True),
           {"input": torch.randn(2, 3, 5, 5)}, lambda o: o)


def test_lora_bias_needs_a_base_bias_to_merge_and_refuses_dora():
    torch.manual_seed(0)
    base, x = nn.Sequential(nn.Linear(4, 4, bias=False)), torch.randn(2, 4)
    cm = peftc.compile(base, peftc.LoRA(target=["0"], r=2, lora_bias=True), args=(x,), dynamic=False)
    with pytest.raises(PassError, match="no merge rule matched how `0.lora_"):
        cm.merge()
    with pytest.raises(SpecError, match="does not combine with use_dora"):
        peftc.LoRA(target=["0"], lora_bias=True, use_dora=True)
