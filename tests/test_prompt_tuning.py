"""insert-prompt-tuning: virtual tokens after the embedding lookup, inputs lengthened exactly as HF PEFT does.

Prompt tuning changes outputs by design (and their length: L + length positions, the first `length` virtual), so
there is no identity-at-init property; parity with HF PEFT given the same prompt is the check.
"""

from __future__ import annotations

import warnings

import pytest
import torch

import peftc
from attention_models import HandLM, check_golden, ids, tiny_bert, tiny_gpt2, tiny_llama, train_steps
from peftc.pipeline import PassContext
from peftc.passes.insert_prompt_tuning import InsertPromptTuning

LENGTH = 3


def hf_prompt_model(model, task_type: str, prompt: torch.Tensor):
    from peft import PromptTuningConfig, get_peft_model

    pm = get_peft_model(model, PromptTuningConfig(task_type=task_type, num_virtual_tokens=LENGTH)).eval()
    with torch.no_grad():
        pm.prompt_encoder.default.embedding.weight.copy_(prompt)
    return pm


def hf_call(pm, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "Position ids are not supported ..."
        return pm(**kwargs)


@pytest.fixture(scope="module")
def llama():
    x = ids()
    mask = torch.ones_like(x)
    mask[1, :2] = 0
    batch = dict(input_ids=x, attention_mask=mask, labels=x)
    cm = peftc.compile(tiny_llama(), peftc.PromptTuning(length=LENGTH), kwargs=batch)
    return cm, batch, hf_prompt_model(tiny_llama(), "CAUSAL_LM", cm.params["prompt_embeddings"].tensor)


def test_llama_matches_hf_with_mask_and_labels(llama):
    cm, batch, pm = llama
    ours, theirs = cm(**batch), hf_call(pm, **batch)
    assert ours.logits.shape == (2, 8 + LENGTH, 64)  # the virtual positions are part of the output
    torch.testing.assert_close(ours.logits, theirs.logits, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ours.loss, theirs.loss, atol=1e-5, rtol=1e-5)


def test_llama_without_mask_and_labels_and_with_inputs_embeds(llama):
    cm, batch, pm = llama
    x = batch["input_ids"]
    torch.testing.assert_close(cm(input_ids=x).logits, hf_call(pm, input_ids=x).logits, atol=1e-5, rtol=1e-5)
    embeds = cm._source.get_input_embeddings()(x).detach()
    torch.testing.assert_close(cm(inputs_embeds=embeds).logits, hf_call(pm, inputs_embeds=embeds).logits,
                               atol=1e-5, rtol=1e-5)


def test_llama_trains_only_the_prompt_and_counts_match_hf(llama):
    cm, batch, pm = llama
    assert cm.parameter_counts()[0] == sum(p.numel() for p in pm.parameters() if p.requires_grad) == LENGTH * 32
    batch = {**batch, "labels": torch.full_like(batch["input_ids"], 7)}
    first, last = train_steps(cm, batch, lambda o: o.loss, steps=10, lr=0.3)
    assert {n for n, p in cm.named_parameters() if p.grad is not None} == {"prompt_embeddings"}
    assert last < first - 0.1


def test_bert_matches_hf_with_token_type_ids_and_padding():
    x = ids()
    mask = torch.ones_like(x)
    mask[0, -3:] = 0
    types = torch.zeros_like(x)
    types[:, 4:] = 1
    batch = dict(input_ids=x, attention_mask=mask, token_type_ids=types)
    cm = peftc.compile(tiny_bert(), peftc.PromptTuning(length=LENGTH), kwargs=batch)
    pm = hf_prompt_model(tiny_bert(), "SEQ_CLS", cm.params["prompt_embeddings"].tensor)
    torch.testing.assert_close(cm(**batch).logits, hf_call(pm, **batch).logits, atol=1e-5, rtol=1e-5)


def test_gpt2_position_ids_are_recomputed_as_hf_does():
    x = ids()
    positions = torch.arange(8).expand(2, -1)
    cm = peftc.compile(tiny_gpt2(), peftc.PromptTuning(length=LENGTH), kwargs=dict(input_ids=x, position_ids=positions))
    pm = hf_prompt_model(tiny_gpt2(), "CAUSAL_LM", cm.params["prompt_embeddings"].tensor)
    ours = cm(input_ids=x, position_ids=positions).logits
    torch.testing.assert_close(ours, hf_call(pm, input_ids=x, position_ids=positions).logits, atol=1e-5, rtol=1e-5)


@pytest.fixture(scope="module")
def hand():
    return peftc.compile(HandLM(), peftc.PromptTuning(length=LENGTH), kwargs=dict(input_ids=ids()))


def test_hand_written_prepends_the_prompt(hand):
    x = ids()
    prompt = hand.params["prompt_embeddings"].tensor
    model = hand._source
    h = torch.cat([prompt.expand(2, -1, -1), model.embed(x)], 1)
    expected = model.head(h + model.blocks[0](h))
    torch.testing.assert_close(hand(input_ids=x), expected, atol=1e-5, rtol=1e-5)


def test_golden_diff_and_idempotent(hand):
    check_golden("insert-prompt-tuning.diff", hand.diff("insert-prompt-tuning"))
    gm = hand.graph_module
    code = gm.code
    rule = peftc.PromptTuning(length=LENGTH)
    result = InsertPromptTuning(rule).run(gm, PassContext(hand.params, hand._info, training=False))
    assert not result.modified and gm.code == code


def test_fixed_length_capture_is_refused_with_a_fix():
    with pytest.raises(peftc.PassError, match="dynamic=True"):
        peftc.compile(HandLM(), peftc.PromptTuning(length=LENGTH), kwargs=dict(input_ids=ids()), dynamic=False)
