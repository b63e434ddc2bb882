"""insert-prefix: learned key/value prefixes on every attention form, with masks and causality kept.

Prefix tuning changes outputs by design (its prefixes start random, as HF PEFT's do), so there is no identity-at-init
property here; the tests check the rewrite against a plain-PyTorch reference instead.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import peftc
from attention_models import HandLM, check_golden, ids, logits, tiny_bert, tiny_gpt2, tiny_llama, train_steps
from peftc.attention import attention_sites
from peftc.pipeline import PassContext
from peftc.passes.insert_prefix import InsertPrefix

LENGTH = 3


def grad_names(cm) -> set[str]:
    return {n for n, p in cm.named_parameters() if p.grad is not None}


def hf_prefix(model, **config):
    from peft import PrefixTuningConfig, get_peft_model

    return get_peft_model(model, PrefixTuningConfig(num_virtual_tokens=LENGTH, **config)).eval()


def hf_trainable(model, **config) -> int:
    return sum(p.numel() for p in hf_prefix(model, **config).parameters() if p.requires_grad)


def hf_positions(x: torch.Tensor) -> torch.Tensor:
    """HF PEFT keeps the prefix in the KV cache, so transformers numbers the real tokens from LENGTH on."""
    return torch.arange(LENGTH, LENGTH + x.shape[1]).expand(x.shape[0], -1)


@pytest.fixture(scope="module")
def llama():
    x = ids()
    mask = torch.ones_like(x)
    mask[1, :2] = 0  # left padding
    cm = peftc.compile(tiny_llama(), peftc.Prefix(length=LENGTH), kwargs=dict(input_ids=x, attention_mask=mask), dynamic=False)
    return cm, x, mask


def test_llama_prefix_keeps_causality_and_padding(llama):
    cm, x, mask = llama
    out = logits(cm(input_ids=x, attention_mask=mask))
    base = logits(cm._source(input_ids=x, attention_mask=mask))
    assert not torch.allclose(out, base, atol=1e-3)  # the prefix is read
    t = 4
    later = x.clone()
    later[:, t + 1:] = (later[:, t + 1:] + 7) % 64
    changed = logits(cm(input_ids=later, attention_mask=mask))
    torch.testing.assert_close(changed[:, :t + 1], out[:, :t + 1], atol=1e-5, rtol=0)
    assert not torch.allclose(changed[:, t + 1:], out[:, t + 1:], atol=1e-3)
    padded = x.clone()
    padded[1, :2] = (padded[1, :2] + 5) % 64
    repad = logits(cm(input_ids=padded, attention_mask=mask))
    torch.testing.assert_close(repad[1, 2:], out[1, 2:], atol=1e-5, rtol=0)
    torch.testing.assert_close(repad[0], out[0], atol=1e-5, rtol=0)


def test_llama_prefix_trains_only_prefix_and_counts_match_hf(llama):
    cm, x, mask = llama
    names = {f"model.layers.0.self_attn.prefix_{w}" for w in ("key", "value")}
    assert {p.name for p in cm.params if p.trainable} == names
    assert tuple(cm.params["model.layers.0.self_attn.prefix_key"].tensor.shape) == (2, LENGTH, 8)  # per KV head
    assert cm.parameter_counts()[0] == hf_trainable(tiny_llama(), task_type="CAUSAL_LM")
    first, last = train_steps(cm, dict(input_ids=x, attention_mask=mask, labels=torch.full_like(x, 7)),
                              lambda o: o.loss)
    assert grad_names(cm) == names
    assert last < first - 0.1


def test_llama_matches_hf_prefix_tuning_given_its_positions(llama):
    cm, x, mask = llama
    pm = hf_prefix(tiny_llama(), task_type="CAUSAL_LM")
    # HF PEFT's flat prefix: [length, layers·(key, value)·kv_heads·head_dim]
    flat = torch.cat([cm.params[f"model.layers.0.self_attn.prefix_{w}"].tensor.permute(1, 0, 2).reshape(LENGTH, -1)
                      for w in ("key", "value")], 1)
    with torch.no_grad():
        pm.prompt_encoder.default.embedding.weight.copy_(flat)
    ours = logits(cm(input_ids=x, attention_mask=mask, position_ids=hf_positions(x)))
    theirs = logits(pm(input_ids=x, attention_mask=mask))
    torch.testing.assert_close(ours[mask.bool()], theirs[mask.bool()], atol=1e-5, rtol=1e-5)


def test_sdpa_and_written_out_forms_agree(llama):
    cm, x, mask = llama
    eager = peftc.compile(tiny_llama("eager"), peftc.Prefix(length=LENGTH),
                          kwargs=dict(input_ids=x, attention_mask=mask), dynamic=False)
    assert eager.counters["insert-prefix.softmax"] == 1
    eager.load_adapter_state_dict(cm.adapter_state_dict())
    torch.testing.assert_close(logits(eager(input_ids=x, attention_mask=mask))[mask.bool()],
                               logits(cm(input_ids=x, attention_mask=mask))[mask.bool()], atol=1e-5, rtol=1e-5)


def test_gpt2_eager_with_projection_is_causal_and_counts_match_hf():
    x = ids()
    cm = peftc.compile(tiny_gpt2("eager"), peftc.Prefix(length=LENGTH, projection=True, encoder_hidden_size=24),
                       kwargs=dict(input_ids=x), dynamic=False)
    assert cm.parameter_counts()[0] == hf_trainable(tiny_gpt2(), task_type="CAUSAL_LM", prefix_projection=True,
                                                    encoder_hidden_size=24)
    assert {p.name for p in cm.params if p.trainable} == {
        "prefix_encoder.embedding.weight", "prefix_encoder.transform.0.weight", "prefix_encoder.transform.0.bias",
        "prefix_encoder.transform.2.weight", "prefix_encoder.transform.2.bias"}
    out = logits(cm(input_ids=x))
    later = x.clone()
    later[:, 5:] = (later[:, 5:] + 3) % 64
    torch.testing.assert_close(logits(cm(input_ids=later))[:, :5], out[:, :5], atol=1e-5, rtol=0)
    pm = hf_prefix(tiny_gpt2(), task_type="CAUSAL_LM", prefix_projection=True, encoder_hidden_size=24)
    hf_names = {n.replace("prompt_encoder.default.", "prefix_encoder."): p for n, p in pm.named_parameters()
                if n.startswith("prompt_encoder.")}
    assert set(hf_names) == {p.name for p in cm.params if p.trainable}
    with torch.no_grad():  # the MLP's parameters map 1:1 onto HF PEFT's prompt encoder
        for name in hf_names:
            hf_names[name].copy_(cm.params[name].tensor)
    torch.testing.assert_close(logits(cm(input_ids=x, position_ids=hf_positions(x))), logits(pm(input_ids=x)),
                               atol=1e-5, rtol=1e-5)


def test_bert_padding_is_kept_and_counts_match_hf():
    x = ids()
    mask = torch.ones_like(x)
    mask[0, -3:] = 0
    cm = peftc.compile(tiny_bert(head="base"), peftc.Prefix(length=LENGTH),
                       kwargs=dict(input_ids=x, attention_mask=mask), dynamic=False)
    assert cm.parameter_counts()[0] == hf_trainable(tiny_bert(head="base"), task_type="FEATURE_EXTRACTION")
    out = cm(input_ids=x, attention_mask=mask).last_hidden_state
    other = x.clone()
    other[0, -3:] = (other[0, -3:] + 9) % 64
    again = cm(input_ids=other, attention_mask=mask).last_hidden_state
    torch.testing.assert_close(again[mask.bool()], out[mask.bool()], atol=1e-5, rtol=0)
    base = cm._source(input_ids=x, attention_mask=mask).last_hidden_state
    assert not torch.allclose(out, base, atol=1e-3)


@pytest.fixture(scope="module")
def hand():
    x = ids()
    return peftc.compile(HandLM(("softmax", "sdpa")), peftc.Prefix(length=LENGTH), kwargs=dict(input_ids=x)), x


def test_hand_written_matches_reference(hand):
    cm, x = hand
    prefixes = [(cm.params[f"blocks.{i}.prefix_key"].tensor, cm.params[f"blocks.{i}.prefix_value"].tensor)
                for i in range(2)]
    assert cm.counters["insert-prefix.softmax"] == 1 and cm.counters["insert-prefix.sdpa"] == 1
    torch.testing.assert_close(cm(input_ids=x), cm._source(x, prefixes=prefixes), atol=1e-5, rtol=1e-5)
    other = ids(3, 5, seed=4)
    torch.testing.assert_close(cm(input_ids=other), cm._source(other, prefixes=prefixes), atol=1e-5, rtol=1e-5)


def test_multi_query_broadcast_and_float_mask_match_reference():
    x = ids()
    cm = peftc.compile(HandLM(("broadcast", "sdpa_float")), peftc.Prefix(length=LENGTH), kwargs=dict(input_ids=x), dynamic=False)
    prefixes = [tuple(cm.params[f"blocks.{i}.prefix_{w}"].tensor for w in ("key", "value")) for i in range(2)]
    assert prefixes[0][0].shape == (1, LENGTH, 4) and prefixes[1][0].shape == (2, LENGTH, 4)
    other = ids(3, 5, seed=4)  # another batch and length through the same dynamic graph
    for inp in (x, other):
        torch.testing.assert_close(cm(input_ids=inp), cm._source(inp, prefixes=prefixes), atol=1e-5, rtol=1e-5)


def test_hand_written_trains(hand):
    cm, x = hand
    target = torch.full_like(x, 7)
    first, last = train_steps(cm, dict(input_ids=x), lambda o: F.cross_entropy(o.flatten(0, 1), target.flatten()))
    assert grad_names(cm) == {f"blocks.{i}.prefix_{w}" for i in range(2) for w in ("key", "value")}
    assert last < first - 0.1


def test_golden_diff_and_idempotent(hand):
    cm, _ = hand
    check_golden("insert-prefix.diff", cm.diff("insert-prefix"))
    gm = cm.graph_module
    code = gm.code
    assert [(s.form, s.module) for s in attention_sites(gm)] == [("softmax", "blocks.0"), ("sdpa", "blocks.1")]
    result = InsertPrefix(peftc.Prefix(length=LENGTH)).run(gm, PassContext(cm.params, cm._info, training=False))
    assert not result.modified and gm.code == code


def test_projection_matches_reference():
    x = ids()
    cm = peftc.compile(HandLM(("softmax", "sdpa")), peftc.Prefix(length=LENGTH, projection=True),
                       kwargs=dict(input_ids=x), dynamic=False)
    p = {name.removeprefix("prefix_encoder."): cm.params[name].tensor for name in cm.params.names()
         if name.startswith("prefix_encoder.")}
    assert tuple(p["transform.2.weight"].shape) == (2 * 2 * 8, 8)  # sites · (key, value) · kv_heads·head_dim
    kv = F.linear(torch.tanh(F.linear(p["embedding.weight"], p["transform.0.weight"], p["transform.0.bias"])),
                  p["transform.2.weight"], p["transform.2.bias"])
    per_site = [[c.view(LENGTH, 2, 4).permute(1, 0, 2) for c in kv[:, 16 * i:16 * (i + 1)].split(8, 1)]
                for i in range(2)]
    torch.testing.assert_close(cm(input_ids=x), cm._source(x, prefixes=per_site), atol=1e-5, rtol=1e-5)


def test_two_projected_prefix_rules_are_refused():
    spec = peftc.Spec(peftc.Prefix(length=2, target="blocks.0", projection=True),
                      peftc.Prefix(length=2, target="blocks.1", projection=True))
    with pytest.raises(peftc.SpecError, match="one projected prefix"):
        peftc.compile(HandLM(("softmax", "sdpa")), spec, kwargs=dict(input_ids=ids()), dynamic=False)


def test_spec_validation():
    with pytest.raises(peftc.SpecError, match="length"):
        peftc.Prefix(length=0)
    with pytest.raises(peftc.SpecError, match="projection"):
        peftc.Prefix(encoder_hidden_size=8)
    with pytest.raises(peftc.SpecError, match="all-linear"):
        peftc.Prefix(target="all-linear")


def test_train_mode_capture_reuses_the_prefix(hand):
    cm, x = hand
    before = cm.params.names()
    cm.train()
    try:
        out = cm(input_ids=x)
    finally:
        cm.eval()
    assert cm.params.names() == before  # the training graph reads the same prefix tensors
    torch.testing.assert_close(out, cm(input_ids=x), atol=1e-5, rtol=1e-5)  # HandLM has no dropout


def test_bfloat16_base_trains_float32_prefix():
    x = ids()
    cm = peftc.compile(HandLM(("softmax", "sdpa")).to(torch.bfloat16), peftc.Prefix(length=LENGTH),
                       kwargs=dict(input_ids=x), dynamic=False)
    assert {cm.params[n].tensor.dtype for n in cm.params.names("adapter")} == {torch.float32}
    out = cm(input_ids=x)
    assert out.dtype == torch.bfloat16
    out.float().square().mean().backward()
    assert all(cm.params[n].tensor.grad is not None for n in cm.params.names("adapter"))


def test_methods_compose_on_one_model():
    x = ids()
    spec = peftc.Spec(peftc.PromptTuning(length=2), peftc.Prefix(length=LENGTH),
                      peftc.IA3(target=("k_proj", "v_proj", "down_proj"), feedforward=("down_proj",)),
                      peftc.LoRA(target="q_proj", r=2))
    cm = peftc.compile(tiny_llama(), spec, kwargs=dict(input_ids=x, labels=x))
    out = cm(input_ids=x, labels=x)
    assert out.logits.shape == (2, 8 + 2, 64)
    out.loss.backward()
    assert grad_names(cm) == {p.name for p in cm.params if p.trainable} == {
        "prompt_embeddings", "model.layers.0.self_attn.prefix_key", "model.layers.0.self_attn.prefix_value",
        "model.layers.0.self_attn.k_proj.ia3_l", "model.layers.0.self_attn.v_proj.ia3_l",
        "model.layers.0.mlp.down_proj.ia3_l", "model.layers.0.self_attn.q_proj.lora_A.weight",
        "model.layers.0.self_attn.q_proj.lora_B.weight"}
