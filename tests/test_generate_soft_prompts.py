"""cm.generate beyond LoRA-style adapters: prompt tuning and P-tuning (Llama, GPT-2, T5), prefix tuning on T5, adaption
prompts (Llama), beam search, and sampling with transformers' default options.

The virtual tokens belong to the prompt: the prefill graph (a T5's encoder graph) prepends them, the decode graph runs
one token against a KV cache that already holds them. Parity: the same tokens as HF PEFT's generate with the same
weights. For prompt tuning and P-tuning the reference is HF PEFT's generate with use_cache=False, which prepends the
prompt to the whole sequence at every step: with its cache (peft 0.21.2 on transformers 5.24) HF PEFT prepends the
virtual tokens to every new token as well (docs/huggingface.md). Prefix tuning on T5 is checked against a loop over
cm's own forward, as on decoder LMs in test_generate.py (peftc's prefix is not HF PEFT's there: docs/methods.md).
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch

import peftc
from conftest import ids, tiny_gpt2, tiny_llama
from test_generate import LEFT_PADDED, randomize, tiny_t5

peft = pytest.importorskip("peft")

LENGTH = 3
MAKE = {"llama": lambda: tiny_llama(num_hidden_layers=1), "gpt2": lambda: tiny_gpt2(n_layer=1)}
PROMPT_PASSES = ("insert-prompt-tuning", "insert-p-tuning")


def compiled(make, rule, **kwargs):
    torch.manual_seed(0)
    base = make().eval()
    mask = torch.ones(2, 8, dtype=torch.long)
    return base, peftc.compile(base, rule, kwargs={"input_ids": ids(), "attention_mask": mask, **kwargs})


def lively_t5():
    """A tiny T5 whose greedy tokens vary: at transformers' init it predicts token 0 whatever the input."""
    torch.manual_seed(0)
    model = tiny_t5().eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "relative_attention_bias" not in name:
                p.normal_(0, 0.3 if p.dim() > 1 else 1.0)
    return model


def hf_prompt_model(base, config, cm):
    """HF PEFT with cm's prompt: prompt tuning's table, or P-tuning's whole prompt encoder."""
    hf = peft.get_peft_model(copy.deepcopy(base), config).eval()
    weights = {("embedding.weight" if k == "prompt_embeddings" else k.removeprefix("prompt_encoder.")): v
               for k, v in cm.adapter_state_dict().items()}
    hf.prompt_encoder.default.load_state_dict(weights)
    return hf


def hf_generate(hf, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "Position ids are not supported for parameter efficient tuning"
        return hf.generate(**kwargs, do_sample=False, use_cache=False)


def graphs(cm, role):
    return cm._graphs[("generate", role)]


def reads_prompt(gm) -> bool:
    return any(n.meta.get("peftc.pass") in PROMPT_PASSES for n in gm.graph.nodes)


@pytest.fixture(scope="module")
def prompt_tuned():
    """On Llama; P-tuning's test is on GPT-2 (the two differ only in how the prefill graph computes the prompt)."""
    base, cm = compiled(MAKE["llama"], peftc.PromptTuning(length=LENGTH))
    config = peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=LENGTH)
    return base, cm, hf_prompt_model(base, config, cm)


def test_prompt_tuning_matches_hf_peft_with_left_padding(prompt_tuned):
    base, cm, hf = prompt_tuned
    x = ids()
    ours = cm.generate(input_ids=x, attention_mask=LEFT_PADDED, max_new_tokens=6)
    assert ours.shape == (2, 8 + 6)  # the virtual tokens are not part of the sequences, as in HF
    assert torch.equal(ours, hf_generate(hf, input_ids=x, attention_mask=LEFT_PADDED, max_new_tokens=6))
    assert not torch.equal(ours, base.generate(input_ids=x, attention_mask=LEFT_PADDED, max_new_tokens=6,
                                               do_sample=False))  # the prompt changed the tokens
    # Another batch size and length, no mask: the same graphs serve it.
    y = ids(batch=1, seq=5, seed=4)
    assert torch.equal(cm.generate(y, max_new_tokens=4), hf_generate(hf, input_ids=y, max_new_tokens=4))
    assert {role: len(graphs(cm, role)) for role in ("prefill", "decode")} == {"prefill": 1, "decode": 1}


def test_a_one_token_prompt_is_refused_with_what_works(prompt_tuned):
    _, cm, _ = prompt_tuned
    with pytest.raises(peftc.GenerationError, match="at least 2 tokens.*prepend the BOS token"):
        cm.generate(ids(seq=1), max_new_tokens=2)


def test_only_the_prefill_graph_prepends_the_prompt(prompt_tuned):
    _, cm, _ = prompt_tuned
    cm.generate(ids(), max_new_tokens=2)
    assert reads_prompt(graphs(cm, "prefill")[0]) and not reads_prompt(graphs(cm, "decode")[0])


def test_p_tuning_matches_hf_peft():
    """P-tuning is prompt tuning with a computed prompt: the LSTM encoder runs in the prefill graph only."""
    base, cm = compiled(MAKE["gpt2"], peftc.PTuning(length=LENGTH, encoder="LSTM", encoder_hidden_size=16))
    hf = hf_prompt_model(base, peft.PromptEncoderConfig(task_type="CAUSAL_LM", num_virtual_tokens=LENGTH,
                                                        encoder_reparameterization_type="LSTM",
                                                        encoder_hidden_size=16), cm)
    x = ids(seed=2)
    ours = cm.generate(input_ids=x, attention_mask=LEFT_PADDED, max_new_tokens=6)
    assert torch.equal(ours, hf_generate(hf, input_ids=x, attention_mask=LEFT_PADDED, max_new_tokens=6))
    assert not reads_prompt(graphs(cm, "decode")[0])


def test_t5_prompt_tuning_prompts_the_encoder_as_hf_peft():
    base, cm = compiled(lively_t5, peftc.PromptTuning(length=LENGTH), decoder_input_ids=ids(seed=3))
    config = peft.PromptTuningConfig(task_type="SEQ_2_SEQ_LM", num_virtual_tokens=LENGTH,
                                     num_transformer_submodules=1)
    hf = hf_prompt_model(base, config, cm)
    x, mask = ids(), torch.tensor([[1] * 5 + [0] * 3, [1] * 8])
    for options in (dict(max_new_tokens=6), dict(max_new_tokens=6, num_beams=3, num_return_sequences=2)):
        ours = cm.generate(input_ids=x, attention_mask=mask, **options)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            theirs = hf.generate(input_ids=x, attention_mask=mask, do_sample=False, **options)
        assert torch.equal(ours, theirs)  # greedy, then beam search on an encoder-decoder
        assert not torch.equal(ours, base.generate(input_ids=x, attention_mask=mask, do_sample=False, **options))
    assert reads_prompt(graphs(cm, "encode")[0])
    assert not any(reads_prompt(gm) for role in ("prefill", "decode") for gm in graphs(cm, role))


def test_llama_adaption_prompt_matches_hf_peft():
    base, cm = compiled(MAKE["llama"], peftc.AdaptionPrompt(adapter_len=LENGTH, adapter_layers=1))
    weights = {k: v * 8 if k.endswith("gate") else v for k, v in randomize(cm, 1).items()}  # the gate starts at 0
    cm.load_adapter_state_dict(weights)
    hf = peft.get_peft_model(copy.deepcopy(base), peft.AdaptionPromptConfig(
        task_type="CAUSAL_LM", adapter_len=LENGTH, adapter_layers=1)).eval()
    peft.set_peft_model_state_dict(hf, {f"base_model.model.{k}": v for k, v in weights.items()})
    x = ids(seed=1)
    ours = cm.generate(input_ids=x, attention_mask=LEFT_PADDED, max_new_tokens=6)
    assert torch.equal(ours, hf.generate(input_ids=x, attention_mask=LEFT_PADDED, max_new_tokens=6,
                                         do_sample=False))
    assert not torch.equal(ours, base.generate(input_ids=x, attention_mask=LEFT_PADDED, max_new_tokens=6,
                                               do_sample=False))
    decode = graphs(cm, "decode")[0]
    assert any(n.meta.get("peftc.pass") == "insert-adaption-prompt" for n in decode.graph.nodes)


def test_t5_prefix_tuning_generates_what_its_forward_predicts():
    """Prefixes on the encoder's and the decoder's self-attention and on the cross-attention; the decode graph prepends
    them to the cached keys. cm's own forward over the whole generated sequence (no cache; its decoder is causal)
    predicts every generated token."""
    base, cm = compiled(lively_t5, peftc.Prefix(length=LENGTH), decoder_input_ids=ids(seed=3))
    randomize(cm, 1)
    x, mask = ids(), torch.tensor([[1] * 5 + [0] * 3, [1] * 8])
    ours = cm.generate(input_ids=x, attention_mask=mask, max_new_tokens=4, eos_token_id=None)
    with torch.no_grad():
        logits = cm(input_ids=x, attention_mask=mask, decoder_input_ids=ours[:, :-1]).logits
    assert torch.equal(logits.argmax(-1), ours[:, 1:])
    assert not torch.equal(ours, base.generate(input_ids=x, attention_mask=mask, max_new_tokens=4, do_sample=False))


@pytest.fixture(scope="module")
def llama_lora():
    base, cm = compiled(MAKE["llama"], peftc.LoRA(target="q_proj|v_proj", r=4))
    weights = randomize(cm, 1)
    hf = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(target_modules=["q_proj", "v_proj"], r=4,
                                                                  lora_alpha=8))
    peft.set_peft_model_state_dict(hf, {f"base_model.model.{k}": v for k, v in weights.items()})
    return cm, hf.eval()


@pytest.mark.parametrize("options", [dict(num_beams=3), dict(num_beams=4, num_return_sequences=2, length_penalty=0.5),
                                     dict(num_beams=2, early_stopping=True)], ids=["3", "4-return-2", "early"])
def test_beam_search_matches_hf_peft(llama_lora, options):
    cm, hf = llama_lora
    x = ids()
    ours = cm.generate(input_ids=x, attention_mask=LEFT_PADDED, max_new_tokens=6, **options)
    assert ours.shape == (2 * options.get("num_return_sequences", 1), 8 + 6)
    assert torch.equal(ours, hf.generate(input_ids=x, attention_mask=LEFT_PADDED, max_new_tokens=6,
                                         do_sample=False, **options))
    assert {role: len(graphs(cm, role)) for role in ("prefill", "decode")} == {"prefill": 1, "decode": 1}


def test_beam_search_with_eos_matches_hf_peft(llama_lora):
    """Beams that end early: finished hypotheses ranked by length penalty, PAD after them, and a search that beats
    greedy decoding somewhere (else the beams would not matter)."""
    cm, hf = llama_lora
    x = ids()
    free = cm.generate(input_ids=x, attention_mask=LEFT_PADDED, max_new_tokens=8, num_beams=3)
    eos = int(free[1, 8 + 2])
    for early_stopping in (False, True, "never"):
        options = dict(max_new_tokens=8, num_beams=3, eos_token_id=eos, pad_token_id=63, early_stopping=early_stopping)
        ours = cm.generate(input_ids=x, attention_mask=LEFT_PADDED, **options)
        assert torch.equal(ours, hf.generate(input_ids=x, attention_mask=LEFT_PADDED, do_sample=False, **options))
    assert (ours[1, 8 + 3:] == 63).all()
    assert not torch.equal(free, cm.generate(input_ids=x, attention_mask=LEFT_PADDED, max_new_tokens=8))


def test_what_generate_still_refuses_names_what_works(llama_lora):
    cm, _ = llama_lora
    with pytest.raises(peftc.GenerationError, match="without sampling only.*do_sample=False"):
        cm.generate(ids(), max_new_tokens=2, num_beams=2, do_sample=True)
    with pytest.raises(peftc.GenerationError, match="num_return_sequences=3 needs at least as many beams"):
        cm.generate(ids(), max_new_tokens=2, num_beams=2, num_return_sequences=3)
    with pytest.raises(peftc.GenerationError, match="num_return_sequences=2 needs beam search"):
        cm.generate(ids(), max_new_tokens=2, num_return_sequences=2)
    with pytest.raises(peftc.GenerationError, match="repetition_penalty.*beam search with"):
        cm.generate(ids(), max_new_tokens=2, repetition_penalty=1.2)


def test_sampling_with_transformers_defaults_matches_hf_peft(llama_lora):
    """Unset sampling options take transformers' defaults (top_k=50 of these 64 tokens), as HF's generate does."""
    cm, hf = llama_lora
    x, mask = ids(seed=6), torch.ones(2, 8, dtype=torch.long)
    for seed in range(3):
        torch.manual_seed(seed)
        ours = cm.generate(input_ids=x, attention_mask=mask, max_new_tokens=8, do_sample=True)
        torch.manual_seed(seed)
        assert torch.equal(ours, hf.generate(input_ids=x, attention_mask=mask, max_new_tokens=8, do_sample=True))
