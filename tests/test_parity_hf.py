"""Parity with HF PEFT: same targets, same parameter names and counts, same math given the same adapter weights."""

import copy

import pytest
import torch

import peftc

from conftest import ids, tiny_bert, tiny_gpt2, tiny_llama

peft = pytest.importorskip("peft")  # in the dev extra; the skip only protects a bare install


def assert_parity(a: torch.Tensor, b: torch.Tensor, rtol: float) -> None:
    """One tolerance helper for outputs and gradients: relative error in norm, per dtype."""
    a, b = a.detach().double(), b.detach().double()
    err = ((a - b).norm() / b.norm().clamp_min(1e-12)).item()
    assert err <= rtol, f"relative error {err:.2e} > {rtol:.0e}"


CASES = {
    # name: (factory, HF target_modules, peftc target, inputs)
    "llama": (tiny_llama, ["q_proj", "v_proj"], "q_proj|v_proj",
              lambda: {"input_ids": ids(), "labels": ids(seed=1)}),
    "gpt2-conv1d": (tiny_gpt2, ["c_attn", "c_fc"], ["c_attn", "c_fc"],
                    lambda: {"input_ids": ids(), "labels": ids(seed=1)}),
    "bert-padded": (tiny_bert, ["query", "value"], "query|value",
                    lambda: {"input_ids": ids(), "attention_mask": torch.tensor([[1] * 8, [1] * 5 + [0] * 3]),
                             "labels": torch.tensor([0, 2])}),
}


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("use_rslora", [False, True])
def test_lora_matches_hf_peft(case, use_rslora):
    factory, hf_targets, targets, make_inputs = CASES[case]
    torch.manual_seed(0)
    base = factory().eval()  # eval: the models' own dropout would make the two runs differ
    hf_model = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(
        target_modules=hf_targets, r=4, lora_alpha=8, use_rslora=use_rslora,
        fan_in_fan_out=case.startswith("gpt2")))
    inputs = make_inputs()
    cm = peftc.compile(base, peftc.LoRA(target=targets, r=4, alpha=8, use_rslora=use_rslora), kwargs=inputs, dynamic=False)

    hf_trainable = sum(p.numel() for p in hf_model.parameters() if p.requires_grad)
    assert cm.parameter_counts()[0] == hf_trainable

    # Same non-zero adapter weights in both: HF's saved keys are ours behind `base_model.model.`.
    torch.manual_seed(1)
    weights = {k: torch.randn_like(v) * 0.1 for k, v in cm.adapter_state_dict().items()}
    cm.load_adapter_state_dict(weights)
    hf_keys = set(peft.get_peft_model_state_dict(hf_model))
    assert hf_keys == {f"base_model.model.{k}" for k in weights}
    peft.set_peft_model_state_dict(hf_model, {f"base_model.model.{k}": v for k, v in weights.items()})

    ours, theirs = cm(**inputs), hf_model(**inputs)
    assert_parity(ours.logits, theirs.logits, 1e-5)
    assert_parity(ours.loss, theirs.loss, 1e-5)
    ours.loss.backward()
    theirs.loss.backward()
    hf_params = dict(hf_model.named_parameters())
    for name in weights:
        hf_name = "base_model.model." + name.replace(".weight", ".default.weight")
        assert_parity(cm.get_parameter(name).grad, hf_params[hf_name].grad, 1e-4)


def test_hf_peft_misses_functional_linear_but_peftc_does_not():
    from torch import nn
    import torch.nn.functional as F

    class Head(nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = nn.Linear(4, 4)
            self.out = nn.Linear(4, 3)

        def forward(self, x):
            return self.out(F.linear(x, self.proj.weight, self.proj.bias).relu())

    torch.manual_seed(0)
    model, x = Head().eval(), torch.randn(2, 4)
    hf = peft.get_peft_model(copy.deepcopy(model), peft.LoraConfig(target_modules=["proj"], r=2))
    cm = peftc.compile(model, peftc.LoRA(target=["proj"], r=2), args=(x,), dynamic=False)
    for adapters in ({k: v for k, v in hf.named_parameters() if "lora_B" in k}.values(),
                     [cm.get_parameter("proj.lora_B.weight")]):
        with torch.no_grad():
            for p in adapters:
                p.normal_()
    assert torch.equal(hf(x), model(x))  # HF PEFT swapped the module, but forward never calls it
    assert not torch.allclose(cm(x), model(x))  # peftc adapted the matmul itself
