"""LoRA on embedding lookups (peftc/lora_embedding.py) against HF PEFT's lora.Embedding, tied lm_head included."""

import copy

import pytest
import torch

import peftc
from peftc.errors import SpecError

from conftest import ids, tiny_llama

peft = pytest.importorskip("peft")


def logits(out):
    return out.logits if hasattr(out, "logits") else out[0]


def hf_key(name):
    return name.removeprefix("base_model.model.").replace(".default", "")


def peft_pair(model, **config):
    """HF PEFT's model with random non-zero adapters, and its adapter tensors under peftc's names."""
    pm = peft.get_peft_model(copy.deepcopy(model), peft.LoraConfig(**config)).eval()
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for p in pm.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * 0.1)
    return pm, {hf_key(n): p.detach().clone() for n, p in pm.named_parameters() if p.requires_grad}


def close(a, b):
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


@pytest.mark.filterwarnings("ignore")
def test_embedding_lora_matches_hf_peft_outputs_merge_and_format(tmp_path):
    torch.manual_seed(0)
    model = tiny_llama().eval()
    x, x2 = ids(), ids(seed=4)
    plain = logits(model(input_ids=x2))
    cm = peftc.compile(copy.deepcopy(model), peftc.LoRA(target=["embed_tokens", "q_proj"], r=4, alpha=8),
                       kwargs=dict(input_ids=x), dynamic=False)
    params = {p.name: p.tensor for p in cm.params if p.role == "adapter"}
    a, b = params["model.embed_tokens.lora_embedding_A"], params["model.embed_tokens.lora_embedding_B"]
    assert a.shape == (4, 64) and not a.any() and b.shape == (32, 4) and b.std() > 0.5  # HF's init
    close(logits(cm(input_ids=x2)), plain)  # A = 0: unchanged at init
    pm, theirs = peft_pair(model, target_modules=["embed_tokens", "q_proj"], r=4, lora_alpha=8)
    assert sorted(theirs) == sorted(params)
    assert cm.parameter_counts()[0] == sum(t.numel() for t in theirs.values())
    cm.load_adapter_state_dict(theirs)
    ours = logits(cm(input_ids=x2))
    assert not torch.allclose(ours, plain, atol=1e-3)
    close(ours, logits(pm(input_ids=x2)))
    # gradients reach both embedding factors
    logits(cm(input_ids=x2)).square().sum().backward()
    assert a.grad is not None and a.grad.abs().sum() > 0 and b.grad.abs().sum() > 0
    # merge: the lookup reads W + s·(BA)^T, as HF's merge_and_unload computes it
    merged = cm.merge()
    assert merged.counters.get("merge-reparam.tag-lora-embedding", 0) >= 1
    close(logits(merged(input_ids=x2)), ours)
    hf_merged = copy.deepcopy(pm).merge_and_unload()
    close(merged.state_dict()["model.embed_tokens.weight"], hf_merged.state_dict()["model.embed_tokens.weight"])
    # PEFT format both ways
    assert cm.save_pretrained(tmp_path / "ours") == "peft"
    back = peft.PeftModel.from_pretrained(copy.deepcopy(model), str(tmp_path / "ours")).eval()
    close(logits(back(input_ids=x2)), ours)
    pm.save_pretrained(str(tmp_path / "theirs"))  # also writes the embedding's base weight (save_embedding_layers)
    loaded = peftc.compile(copy.deepcopy(model), tmp_path / "theirs", kwargs=dict(input_ids=x), dynamic=False)
    close(logits(loaded(input_ids=x2)), ours)


@pytest.mark.filterwarnings("ignore")
def test_tied_lm_head_gets_its_own_adapter_as_in_hf_peft():
    torch.manual_seed(0)
    model = tiny_llama(tie_word_embeddings=True).eval()
    assert model.lm_head.weight is model.model.embed_tokens.weight
    x, x2 = ids(), ids(seed=4)
    cm = peftc.compile(copy.deepcopy(model), peftc.LoRA(target=["embed_tokens", "lm_head"], r=4, alpha=8),
                       kwargs=dict(input_ids=x), dynamic=False)
    pm, theirs = peft_pair(model, target_modules=["embed_tokens", "lm_head"], r=4, lora_alpha=8)
    assert sorted(theirs) == sorted(p.name for p in cm.params if p.role == "adapter") == [
        "lm_head.lora_A.weight", "lm_head.lora_B.weight", "model.embed_tokens.lora_embedding_A",
        "model.embed_tokens.lora_embedding_B"]
    cm.load_adapter_state_dict(theirs)
    ours = logits(cm(input_ids=x2))
    close(ours, logits(pm(input_ids=x2)))
    # peftc's merge computes what the unmerged model does: the lookup and lm_head each fold their own delta
    close(logits(cm.merge()(input_ids=x2)), ours)


def test_embedding_lora_refuses_variants_hf_refuses_or_that_train_nothing():
    torch.manual_seed(0)
    for option in (dict(lora_bias=True), dict(freeze_a=True), dict(use_dora=True)):
        with pytest.raises(SpecError, match="embedding lookup"):
            peftc.compile(tiny_llama(), peftc.LoRA(target=["embed_tokens"], r=2, **option),
                          kwargs=dict(input_ids=ids()), dynamic=False)


def test_all_linear_leaves_embeddings_alone():
    torch.manual_seed(0)
    cm = peftc.compile(tiny_llama(), peftc.LoRA(target="all-linear", r=2), kwargs=dict(input_ids=ids()), dynamic=False)
    assert not any("lora_embedding" in p.name for p in cm.params)
