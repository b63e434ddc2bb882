"""LN tuning as HF PEFT defines it (passes/insert_ln_tuning.py): a trainable copy of any targeted module."""

import copy

import pytest
import torch

import peftc

from conftest import ids, tiny_llama

peft = pytest.importorskip("peft")

TARGET = ["input_layernorm", "o_proj"]  # a norm and a Linear: HF's ln_tuning copies both


def logits(out):
    return out.logits if hasattr(out, "logits") else out[0]


def close(a, b):
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_ln_tuning_on_any_module_matches_hf_both_ways(tmp_path):
    torch.manual_seed(0)
    model = tiny_llama().eval()
    x = ids()
    pm = peft.get_peft_model(copy.deepcopy(model), peft.LNTuningConfig(target_modules=TARGET)).eval()
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for p in pm.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * 0.1)
    theirs = logits(pm(input_ids=x))
    pm.save_pretrained(str(tmp_path / "theirs"))
    cm = peftc.compile(copy.deepcopy(model), tmp_path / "theirs", kwargs=dict(input_ids=x), dynamic=False)
    assert isinstance(cm.spec.rules[0], peftc.LNTuning)
    assert cm.parameter_counts()[0] == sum(p.numel() for p in pm.parameters() if p.requires_grad)
    assert any(".o_proj.ln_tuning.weight" in p.name for p in cm.params)
    close(logits(cm(input_ids=x)), theirs)
    close(logits(cm.merge()(input_ids=x)), theirs)
    assert cm.save_pretrained(tmp_path / "ours") == "peft"
    back = peft.PeftModel.from_pretrained(copy.deepcopy(model), str(tmp_path / "ours")).eval()
    close(logits(back(input_ids=x)), theirs)
    fresh = peftc.compile(copy.deepcopy(model), peftc.LNTuning(target=TARGET), kwargs=dict(input_ids=x), dynamic=False)
    close(logits(fresh(input_ids=x)), logits(model(input_ids=x)))  # a copy: unchanged at init
    assert fresh.parameter_counts()[0] == cm.parameter_counts()[0]
