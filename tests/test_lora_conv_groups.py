"""LoRA on grouped and dilated convolutions: HF PEFT's grouped layout (B a grouped 1x1 conv), and dilation kept."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import peftc
from peftc.errors import PassError, SpecError

peft = pytest.importorskip("peft")


class Grouped(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(4, 8, 3, padding=1, groups=2)
        self.c2 = nn.Conv1d(8, 6, 3, groups=2, stride=2)

    def forward(self, x):
        return self.c2(torch.relu(self.c1(x)).flatten(2))


class Dilated(nn.Module):
    def __init__(self):
        super().__init__()
        self.c = nn.Conv2d(3, 5, 3, padding=2, dilation=2)

    def forward(self, x):
        return self.c(x)


def randomized(cm, seed=1):
    torch.manual_seed(seed)
    weights = {k: torch.randn_like(v) * 0.3 for k, v in cm.adapter_state_dict().items()}
    cm.load_adapter_state_dict(weights)
    return weights


def test_grouped_conv_matches_hf_peft_and_refuses_to_merge():
    torch.manual_seed(0)
    base, x = Grouped().eval(), torch.randn(2, 4, 5, 5)
    cm = peftc.compile(base, peftc.LoRA(target=["c1", "c2"], r=4, alpha=6), args=(x,), dynamic=False)
    hf = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(target_modules=["c1", "c2"], r=4, lora_alpha=6))
    assert cm.parameter_counts()[0] == sum(p.numel() for p in hf.parameters() if p.requires_grad)
    assert cm.params["c1.lora_B.weight"].tensor.shape == (8, 2, 1, 1)  # r / groups input channels
    weights = randomized(cm)
    peft.set_peft_model_state_dict(hf, {f"base_model.model.{k}": v for k, v in weights.items()})
    ours, theirs = cm(x), hf(x)
    assert (ours - base(x)).abs().max() > 1e-3
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)
    ours.square().sum().backward()
    theirs.square().sum().backward()
    hf_params = dict(hf.named_parameters())
    for name in weights:
        torch.testing.assert_close(cm.get_parameter(name).grad,
                                   hf_params["base_model.model." + name.replace(".weight", ".default.weight")].grad,
                                   atol=1e-5, rtol=1e-4)
    with pytest.raises(PassError, match="no merge rule matched how `c1.lora_"):
        cm.merge()
    with pytest.raises(SpecError, match="rank divisible by the groups"):
        peftc.compile(base, peftc.LoRA(target=["c1"], r=3), args=(x,), dynamic=False)


@pytest.mark.parametrize("prune_grads", [False, True])
def test_dilated_conv_keeps_the_dilation_and_merges(prune_grads):
    torch.manual_seed(0)
    base, x = Dilated().eval(), torch.randn(2, 3, 7, 7)
    cm = peftc.compile(base, peftc.LoRA(target=["c"], r=2, alpha=4), args=(x,), prune_grads=prune_grads, dynamic=False)
    w = randomized(cm)
    a, b = w["c.lora_A.weight"], w["c.lora_B.weight"]
    reference = base(x) + F.conv2d(F.conv2d(x, a, padding=2, dilation=2), b) * 2.0
    torch.testing.assert_close(cm(x), reference, atol=1e-5, rtol=1e-5)
    merged = cm.merge()
    torch.testing.assert_close(merged(x), reference, atol=1e-5, rtol=1e-5)
    assert {n for n, _ in merged.named_parameters()} == {"c.weight", "c.bias"}


def test_dilated_conv_dora_equals_the_reweighted_kernel():
    torch.manual_seed(0)
    base, x = Dilated().eval(), torch.randn(2, 3, 7, 7)
    cm = peftc.compile(base, peftc.LoRA(target=["c"], r=2, alpha=4, use_dora=True), args=(x,), dynamic=False)
    w = randomized(cm)
    full = base.c.weight + (w["c.lora_B.weight"].flatten(1) @ w["c.lora_A.weight"].flatten(1)).view(5, 3, 3, 3) * 2
    kernel = full * (w["c.lora_magnitude_vector"].view(-1, 1, 1, 1) / full.flatten(1).norm(dim=1).view(-1, 1, 1, 1))
    reference = F.conv2d(x, kernel, base.c.bias, padding=2, dilation=2)
    torch.testing.assert_close(cm(x), reference, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(cm.merge()(x), reference, atol=1e-5, rtol=1e-5)
