"""cm.merge_and_unload(): the original model's class with the adapters merged in, nothing of peftc inside."""

from __future__ import annotations

import pytest
import torch

import peftc
from conftest import ids, tiny_gpt2, tiny_llama

CASES = {
    "llama-lora": (tiny_llama, peftc.LoRA(target="q_proj|v_proj", r=4, dropout=0.1)),
    "llama-dora": (tiny_llama, peftc.LoRA(target="all-linear", r=4, use_dora=True)),
    "llama-ia3": (tiny_llama, peftc.IA3(target="k_proj|v_proj|down_proj", feedforward="down_proj")),
    "gpt2-lora": (tiny_gpt2, peftc.LoRA(target=["c_attn", "c_fc"], r=4)),  # Conv1D stores W as (in, out)
}


def randomize(cm, seed: int = 1) -> None:
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, p in cm.named_parameters():
            if p.requires_grad:  # B = 0 and l = 1 at init would make any merge look right
                p.copy_(torch.randn_like(p) * 0.3 + (1.0 if name.endswith(("ia3_l", "magnitude_vector")) else 0.0))


def snapshot(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("case", list(CASES))
def test_merge_and_unload_is_the_original_class_with_merged_weights(case, tmp_path):
    make, rule = CASES[case]
    torch.manual_seed(0)
    source = make(**({"num_hidden_layers": 1} if make is tiny_llama else {"n_layer": 1})).eval()
    x, mask = ids(), torch.tensor([[0, 0, 1, 1, 1, 1, 1, 1], [1] * 8])
    cm = peftc.compile(source, rule, kwargs={"input_ids": x, "attention_mask": mask}, dynamic=False)
    randomize(cm)
    cm.eval()
    before = snapshot(source)

    model = cm.merge_and_unload()

    assert type(model) is type(source)
    assert not any(type(m).__module__.startswith("peftc") for m in model.modules())
    assert set(model.state_dict()) == set(source.state_dict())
    expected = cm(input_ids=x, attention_mask=mask).logits
    got = model(input_ids=x, attention_mask=mask).logits
    assert (got - expected).abs().max().item() <= 1e-5
    assert not torch.allclose(got, source(input_ids=x, attention_mask=mask).logits, atol=1e-3)  # it did merge
    # The source model and the compiled model are as they were.
    assert all(torch.equal(v, before[k]) for k, v in source.state_dict().items())
    assert cm.trainable_parameters() and all(p.requires_grad for p in cm.trainable_parameters())

    fresh = type(source)(source.config)
    fresh.load_state_dict(model.state_dict(), strict=True)
    model.save_pretrained(tmp_path)
    reloaded = type(source).from_pretrained(tmp_path).eval()
    torch.testing.assert_close(reloaded(input_ids=x, attention_mask=mask).logits, got, atol=1e-6, rtol=0)
    tokens = model.generate(input_ids=x, attention_mask=mask, max_new_tokens=4, do_sample=False)
    assert tokens.shape == (2, 12)


def test_merge_and_unload_refuses_prefix_tuning_with_the_reason():
    torch.manual_seed(0)
    cm = peftc.compile(tiny_llama(num_hidden_layers=1).eval(), peftc.Prefix(length=2), kwargs={"input_ids": ids()}, dynamic=False)
    with pytest.raises(peftc.PeftcError, match="prefix adds learned activations.*cm.merge"):
        cm.merge_and_unload()


def test_merge_and_unload_refuses_a_merged_weight_the_class_has_no_place_for():
    """LoRA on a tied LM head: the merged head would need its own tensor while the embedding stays as it is."""
    torch.manual_seed(0)
    cm = peftc.compile(tiny_llama(num_hidden_layers=1, tie_word_embeddings=True).eval(),
                       peftc.LoRA(target="lm_head", r=4), kwargs={"input_ids": ids()}, dynamic=False)
    randomize(cm)
    with pytest.raises(peftc.PeftcError, match="reads `peftc_folded_0`, which LlamaForCausalLM has no parameter"):
        cm.merge_and_unload()
