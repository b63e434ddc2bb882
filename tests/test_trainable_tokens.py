"""Trainable tokens (passes/insert_trainable_tokens.py) against HF PEFT's TrainableTokens, tied lm_head included."""

import copy

import pytest
import torch

import peftc
from peftc.errors import SpecError

from conftest import ids, tiny_llama

peft = pytest.importorskip("peft")

INDICES = [1, 5, 7, 30]


def logits(out):
    return out.logits if hasattr(out, "logits") else out[0]


def close(a, b):
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def hf_rows(pm):
    return next(p for n, p in pm.named_parameters() if "trainable_tokens_delta" in n)


@pytest.mark.filterwarnings("ignore")
@pytest.mark.parametrize("tied", [False, True])
def test_rows_train_as_in_hf_peft_with_merge_and_format(tied, tmp_path):
    torch.manual_seed(0)
    model = tiny_llama(tie_word_embeddings=tied).eval()
    x = torch.tensor([[1, 5, 2, 7, 30, 3, 4, 5]] * 2)
    plain = logits(model(input_ids=x))
    cm = peftc.compile(copy.deepcopy(model), peftc.TrainableTokens(indices=INDICES), kwargs=dict(input_ids=x), dynamic=False)
    rows = cm.params["model.embed_tokens.trainable_tokens_delta"].tensor
    assert cm.parameter_counts()[0] == len(INDICES) * 32 == rows.numel()
    close(rows, model.model.embed_tokens.weight[INDICES])  # HF's init: the rows themselves
    close(logits(cm(input_ids=x)), plain)
    pm = peft.get_peft_model(copy.deepcopy(model), peft.TrainableTokensConfig(token_indices=INDICES)).eval()
    assert sum(p.numel() for p in pm.parameters() if p.requires_grad) == rows.numel()
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        rows.add_(torch.randn(rows.shape, generator=g))
        hf_rows(pm).copy_(rows)
    ours = logits(cm(input_ids=x))
    assert not torch.allclose(ours, plain, atol=1e-3)
    close(ours, logits(pm(input_ids=x)))  # tied: lm_head reads the new rows too, as in HF
    ours.square().sum().backward()
    untouched = [i for i in range(64) if i not in INDICES]
    assert rows.grad.abs().sum() > 0 and cm.parameter_counts()[0] == rows.numel()
    merged = cm.merge()
    close(logits(merged(input_ids=x)), ours)
    w = merged.state_dict()["lm_head.weight" if tied and "lm_head.weight" in merged.state_dict()
                            else "model.embed_tokens.weight"]
    close(w[untouched], model.model.embed_tokens.weight[untouched])
    assert cm.save_pretrained(tmp_path / "ours") == "peft"
    back = peft.PeftModel.from_pretrained(copy.deepcopy(model), str(tmp_path / "ours")).eval()
    close(logits(back(input_ids=x)), ours)
    pm.save_pretrained(str(tmp_path / "theirs"))
    again = peftc.compile(copy.deepcopy(model), tmp_path / "theirs", kwargs=dict(input_ids=x), dynamic=False)
    close(logits(again(input_ids=x)), ours)


def test_bad_indices_are_refused():
    for bad in ([], [1, 1], [-1], [1.5]):
        with pytest.raises(SpecError, match="indices"):
            peftc.TrainableTokens(indices=bad)
    torch.manual_seed(0)
    with pytest.raises(SpecError, match="out of range"):
        peftc.compile(tiny_llama(), peftc.TrainableTokens(indices=[64]), kwargs=dict(input_ids=ids()), dynamic=False)


@pytest.mark.filterwarnings("ignore")
def test_lora_with_trainable_token_indices_round_trips_hf_s_lora_config(tmp_path):
    torch.manual_seed(0)
    model = tiny_llama().eval()
    x = torch.tensor([[1, 5, 2, 7, 30, 3, 4, 5]] * 2)
    pm = peft.get_peft_model(copy.deepcopy(model), peft.LoraConfig(target_modules=["q_proj"], r=2,
                                                                   trainable_token_indices=INDICES)).eval()
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for p in pm.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * 0.1)
    theirs = logits(pm(input_ids=x))
    pm.save_pretrained(str(tmp_path / "theirs"))
    cm = peftc.compile(copy.deepcopy(model), tmp_path / "theirs", kwargs=dict(input_ids=x), dynamic=False)
    assert [type(r).__name__ for r in cm.spec.rules] == ["LoRA", "TrainableTokens"]
    assert cm.parameter_counts()[0] == sum(p.numel() for p in pm.parameters() if p.requires_grad)
    close(logits(cm(input_ids=x)), theirs)
    assert cm.save_pretrained(tmp_path / "ours") == "peft"
    back = peft.PeftModel.from_pretrained(copy.deepcopy(model), str(tmp_path / "ours")).eval()
    close(logits(back(input_ids=x)), theirs)
