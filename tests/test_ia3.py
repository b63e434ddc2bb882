"""insert-ia3: HF PEFT's (IA)³ scaling vectors on matched matmuls, identity at init."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import peftc
from attention_models import VOCAB, HandLM, check_golden, ids, tiny_bert, tiny_gpt2, tiny_llama, train_steps
from peftc.pipeline import PassContext
from peftc.passes.insert_ia3 import InsertIA3


def hf_ia3(model, task_type: str, target: list[str], feedforward: list[str]):
    from peft import IA3Config, get_peft_model

    torch.manual_seed(3)
    pm = get_peft_model(model, IA3Config(task_type=task_type, target_modules=target, feedforward_modules=feedforward))
    with torch.no_grad():  # learned values, not the all-ones init, so the parity check sees every vector
        for name, p in pm.named_parameters():
            if "ia3_l" in name:
                p.copy_(torch.rand_like(p) + 0.5)
    return pm.eval()


def hf_state(pm) -> dict[str, torch.Tensor]:
    from peft import get_peft_model_state_dict

    return {k.removeprefix("base_model.model."): v for k, v in get_peft_model_state_dict(pm).items()}


def check_parity(model_fn, task_type, target, feedforward, batch, out):
    cm = peftc.compile(model_fn(), peftc.IA3(target=target, feedforward=feedforward), kwargs=batch, dynamic=False)
    pm = hf_ia3(model_fn(), task_type, list(target), list(feedforward))
    state = hf_state(pm)
    assert {k: tuple(v.shape) for k, v in cm.adapter_state_dict().items()} == \
        {k: tuple(v.shape) for k, v in state.items()}  # same names, same shapes
    cm.load_adapter_state_dict(state)
    torch.testing.assert_close(out(cm(**batch)), out(pm(**batch)), atol=1e-5, rtol=1e-5)
    assert cm.parameter_counts()[0] == sum(p.numel() for p in pm.parameters() if p.requires_grad)
    return cm


@pytest.fixture(scope="module")
def llama():
    x = ids()
    mask = torch.ones_like(x)
    mask[1, :2] = 0
    batch = dict(input_ids=x, attention_mask=mask)
    cm = check_parity(tiny_llama, "CAUSAL_LM", ("k_proj", "v_proj", "down_proj"), ("down_proj",), batch,
                      lambda o: o.logits)
    return cm, batch


def test_llama_matches_hf(llama):
    cm, _ = llama
    assert cm.counters["insert-ia3.output"] == 2 and cm.counters["insert-ia3.feedforward"] == 1


def test_llama_trains_only_ia3(llama):
    cm, batch = llama
    first, last = train_steps(cm, {**batch, "labels": torch.full_like(batch["input_ids"], 7)}, lambda o: o.loss,
                              steps=10, lr=1.0)  # scalings of a random tiny model move the logits slowly
    assert {n for n, p in cm.named_parameters() if p.grad is not None} == {
        f"model.layers.0.{m}.ia3_l" for m in ("self_attn.k_proj", "self_attn.v_proj", "mlp.down_proj")}
    assert last < first - 0.1


def test_bert_matches_hf():
    x = ids()
    mask = torch.ones_like(x)
    mask[0, -3:] = 0
    check_parity(lambda: tiny_bert(head="base"), "FEATURE_EXTRACTION", ("key", "value", "output.dense"),
                 ("output.dense",), dict(input_ids=x, attention_mask=mask), lambda o: o.last_hidden_state)


def test_gpt2_conv1d_matches_hf():
    check_parity(tiny_gpt2, "CAUSAL_LM", ("c_attn", "mlp.c_proj"), ("mlp.c_proj",), dict(input_ids=ids()),
                 lambda o: o.logits)


@pytest.fixture(scope="module")
def hand():
    rule = peftc.IA3(target=("k", "v", "o"), feedforward=("o",))
    return peftc.compile(HandLM(), rule, kwargs=dict(input_ids=ids())), rule


@settings(max_examples=12, deadline=None)
@given(batch=st.integers(1, 3), seq=st.integers(2, 10), seed=st.integers(0, 2**16))
def test_identity_at_init(hand, batch, seq, seed):
    cm, _ = hand
    x = torch.randint(0, VOCAB, (batch, seq), generator=torch.Generator().manual_seed(seed))
    torch.testing.assert_close(cm(input_ids=x), cm._source(x), atol=0, rtol=0)


def test_golden_diff_and_idempotent(hand):
    cm, rule = hand
    check_golden("insert-ia3.diff", cm.diff("insert-ia3"))
    gm = cm.graph_module
    code = gm.code
    assert not InsertIA3(rule).run(gm, PassContext(cm.params, cm._info, training=False)).modified
    assert gm.code == code


def test_feedforward_must_be_targeted():
    with pytest.raises(peftc.SpecError, match="subset of `target`"):
        peftc.compile(HandLM(), peftc.IA3(target=("k", "v"), feedforward=("o",)), kwargs=dict(input_ids=ids()), dynamic=False)
    with pytest.raises(peftc.SpecError, match="target` is required"):
        peftc.IA3()


def test_spec_files_load_all_three_methods(tmp_path):
    path = tmp_path / "spec.toml"
    path.write_text('[[prefix]]\nlength = 4\ntarget = "self_attn"\n\n[[prompt_tuning]]\nlength = 2\n\n'
                    '[[ia3]]\ntarget = ["k_proj", "v_proj", "down_proj"]\nfeedforward = ["down_proj"]\n')
    spec = peftc.Spec.load(path)
    assert spec.rules == (peftc.Prefix(length=4, target="self_attn"), peftc.PromptTuning(length=2),
                          peftc.IA3(target=("k_proj", "v_proj", "down_proj"), feedforward=("down_proj",)))
    assert peftc.Spec.from_dict(spec.to_dict()) == spec
    with pytest.raises(peftc.SpecError, match="did you mean length"):
        peftc.Spec.from_dict({"prompt_tuning": [{"lenght": 2}]})


def test_bfloat16_base_is_unchanged_at_init_with_float32_vectors():
    x = ids()
    model = HandLM().to(torch.bfloat16)
    cm = peftc.compile(model, peftc.IA3(target=("k", "v", "o"), feedforward=("o",)), kwargs=dict(input_ids=x), dynamic=False)
    assert {cm.params[n].tensor.dtype for n in cm.params.names("adapter")} == {torch.float32}
    out = cm(input_ids=x)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out, model(x), atol=0, rtol=0)


def test_cast_chains_after_a_matmul_rewire_cleanly_for_lora_too():
    """rewrite.replace_uses keeps every inserted node between y and its replacement reading y (bf16 adds casts)."""
    x = ids()
    model = HandLM().to(torch.bfloat16)
    spec = peftc.Spec(peftc.IA3(target=("k", "v")), peftc.LoRA(target=("q", "k"), r=2))
    cm = peftc.compile(model, spec, kwargs=dict(input_ids=x), dynamic=False)
    torch.testing.assert_close(cm(input_ids=x), model(x), atol=0, rtol=0)  # both identity at init
