"""cm.generate: transformers' greedy loop on a prefill graph and a one-token decode graph, adapters in the graphs.

Parity: the same tokens as HF PEFT's generate with the same adapter weights (LoRA on Llama, GPT-2, T5; IA3), with left
padding. Prefix tuning is checked against a loop over cm's own forward (HF PEFT numbers positions after its prefix,
peftc does not: docs/methods.md). Cost: FLOPs of a decode step are one token's forward (exact, FlopCounterMode).
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

import peftc
from peftc.params import get_attr_path
from conftest import ids, tiny_gpt2, tiny_llama

peft = pytest.importorskip("peft")

LAYERS = {tiny_llama: {"num_hidden_layers": 1}, tiny_gpt2: {"n_layer": 1}}
LEFT_PADDED = torch.tensor([[0, 0, 0, 1, 1, 1, 1, 1], [1] * 8])


def tiny_t5():
    from transformers import T5Config, T5ForConditionalGeneration

    return T5ForConditionalGeneration(T5Config(vocab_size=64, d_model=32, d_ff=64, d_kv=8, num_layers=1,
                                               num_heads=4, decoder_start_token_id=0, dropout_rate=0.0))


def randomize(cm, seed: int) -> dict[str, torch.Tensor]:
    """Non-trivial adapter weights (B = 0 and l = 1 at init would make any generate look right)."""
    torch.manual_seed(seed)
    weights = {k: torch.randn_like(v) * 0.5 + (1.0 if k.endswith("ia3_l") else 0.0)
               for k, v in cm.adapter_state_dict().items()}
    cm.load_adapter_state_dict(weights)
    return weights


def hf_peft(base, config, weights):
    model = peft.get_peft_model(copy.deepcopy(base), config)
    result = peft.set_peft_model_state_dict(model, {f"base_model.model.{k}": v for k, v in weights.items()})
    assert not result.unexpected_keys
    return model.eval()


def compiled(make, rule, **kwargs):
    torch.manual_seed(0)
    base = make(**LAYERS.get(make, {})).eval()  # one layer: capture time grows with depth
    return base, peftc.compile(base, rule, kwargs={"input_ids": ids(), **kwargs})


@pytest.fixture(scope="module")
def llama():
    base, cm = compiled(tiny_llama, peftc.LoRA(target="q_proj|v_proj", r=4))
    randomize(cm, 1)
    return base, cm


LLAMA_LORA = dict(target_modules=["q_proj", "v_proj"], r=4, lora_alpha=8)


def test_llama_lora_matches_hf_peft_with_left_padding(llama):
    base, cm = llama
    hf = hf_peft(base, peft.LoraConfig(**LLAMA_LORA), cm.adapter_state_dict())  # a test may have changed them
    x = ids()
    ours = cm.generate(input_ids=x, attention_mask=LEFT_PADDED, max_new_tokens=10, do_sample=False)
    theirs = hf.generate(input_ids=x, attention_mask=LEFT_PADDED, max_new_tokens=10, do_sample=False)
    assert ours.shape == (2, 18)
    assert torch.equal(ours, theirs)
    # Another batch size and prompt length, without a mask: the same graphs serve it.
    y = ids(batch=1, seq=5, seed=4)
    assert torch.equal(cm.generate(y, max_new_tokens=6), hf.generate(y, max_new_tokens=6, do_sample=False))
    assert {role: len(cm._graphs[("generate", role)]) for role in ("prefill", "decode")} == {"prefill": 1, "decode": 1}


def test_llama_stops_at_eos_and_pads_finished_rows(llama):
    base, cm = llama
    hf = hf_peft(base, peft.LoraConfig(**LLAMA_LORA), cm.adapter_state_dict())  # a test may have changed them
    x = ids()
    free = cm.generate(input_ids=x, attention_mask=LEFT_PADDED, max_new_tokens=10)
    eos = int(free[1, 8 + 2])  # row 1 ends after its third new token
    options = dict(max_new_tokens=10, eos_token_id=eos, pad_token_id=63, do_sample=False)
    ours = cm.generate(input_ids=x, attention_mask=LEFT_PADDED, **options)
    assert torch.equal(ours, hf.generate(input_ids=x, attention_mask=LEFT_PADDED, **options))
    assert (ours[1, 8 + 3:] == 63).all()


def test_decode_graph_carries_the_adapters_and_reads_the_trained_weights(llama):
    base, cm = llama
    cm.generate(input_ids=ids(), max_new_tokens=2)
    decode = cm._graphs[("generate", "decode")][0]
    lora_nodes = [n for n in decode.graph.nodes if n.meta.get("peftc.pass") == "insert-lora"]
    assert lora_nodes
    for node in decode.graph.nodes:
        if node.op == "get_attr" and "lora_" in node.target:
            assert get_attr_path(decode, node.target) is cm.get_parameter(node.target)
    # New adapter weights after the graphs exist (as training would leave them) are the ones generate uses.
    weights = randomize(cm, 2)
    hf = hf_peft(base, peft.LoraConfig(**LLAMA_LORA), weights)
    x = ids(seed=5)
    assert torch.equal(cm.generate(x, max_new_tokens=8), hf.generate(x, max_new_tokens=8, do_sample=False))


def test_decode_step_costs_one_token_of_matmul_flops(llama):
    """Exact count: the decode step's matmuls (projections, adapters, LM head) are the forward's for one token,
    whatever the cache length; only attention (bmm) grows with it."""
    _, cm = llama
    x = ids(seq=8)
    cm.generate(x, max_new_tokens=2)
    decode = cm._graphs[("generate", "decode")][0]

    def matmul_flops(fn) -> tuple[int, int]:
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            fn()
        counts = {str(op): n for op, n in counter.get_flop_counts()["Global"].items()}
        return sum(n for op, n in counts.items() if op in ("aten.mm", "aten.addmm")), counter.get_total_flops()

    def step(past: int):
        cache = [(torch.randn(2, 2, past, 8), torch.randn(2, 2, past, 8))]
        return lambda: decode(input_ids=x[:, :1], attention_mask=torch.ones(2, past + 1, dtype=torch.long),
                              position_ids=torch.full((2, 1), past), cache=cache)

    full_matmuls, full_total = matmul_flops(lambda: cm(input_ids=x))  # every position, logits for each
    per_token = full_matmuls // 8
    short, short_total = matmul_flops(step(10))
    long, long_total = matmul_flops(step(40))
    assert short == long == per_token
    assert long_total < full_total / 4  # recomputing 41 positions would cost > 41 tokens' matmuls


def test_gpt2_lora_matches_hf_peft_with_left_padding():
    base, cm = compiled(tiny_gpt2, peftc.LoRA(target=["c_attn", "c_fc"], r=4))
    weights = randomize(cm, 1)
    hf = hf_peft(base, peft.LoraConfig(target_modules=["c_attn", "c_fc"], r=4, lora_alpha=8, fan_in_fan_out=True),
                 weights)
    x = ids()
    cm.train()  # mid-training: generation still runs without dropout (GPT-2's is 0.1), and leaves the modes alone
    ours = cm.generate(input_ids=x, attention_mask=LEFT_PADDED, max_new_tokens=10)
    assert torch.equal(ours, hf.generate(input_ids=x, attention_mask=LEFT_PADDED, max_new_tokens=10,
                                         do_sample=False))
    assert cm.training and not base.training


def test_t5_lora_matches_hf_peft_with_encoder_padding():
    base, cm = compiled(tiny_t5, peftc.LoRA(target="q|v", r=4), decoder_input_ids=ids(seed=3))
    weights = randomize(cm, 1)
    hf = hf_peft(base, peft.LoraConfig(target_modules=["q", "v"], r=4, lora_alpha=8), weights)
    x, mask = ids(), torch.tensor([[1] * 5 + [0] * 3, [1] * 8])
    ours = cm.generate(input_ids=x, attention_mask=mask, max_new_tokens=10)
    assert ours.shape == (2, 11) and (ours[:, 0] == 0).all()  # the decoder start token, then new tokens
    assert torch.equal(ours, hf.generate(input_ids=x, attention_mask=mask, max_new_tokens=10, do_sample=False))
    # encoder, first decoder step, decode steps (a one-token cache is captured apart from longer ones)
    assert {role: len(cm._graphs[("generate", role)]) for role in ("encode", "prefill", "decode")} \
        == {"encode": 1, "prefill": 1, "decode": 2}


def test_llama_ia3_matches_hf_peft():
    base, cm = compiled(tiny_llama, peftc.IA3(target="k_proj|v_proj|down_proj", feedforward="down_proj"))
    weights = randomize(cm, 1)
    hf = hf_peft(base, peft.IA3Config(target_modules=["k_proj", "v_proj", "down_proj"],
                                      feedforward_modules=["down_proj"]), weights)
    x = ids()
    ours = cm.generate(input_ids=x, attention_mask=LEFT_PADDED, max_new_tokens=8)
    assert torch.equal(ours, hf.generate(input_ids=x, attention_mask=LEFT_PADDED, max_new_tokens=8, do_sample=False))


def test_llama_prefix_tuning_generates_what_its_forward_predicts():
    """The decode graph prepends the prefix to the cached keys; a loop over cm's own forward (no cache) agrees."""
    _, cm = compiled(tiny_llama, peftc.Prefix(length=3), attention_mask=torch.ones(2, 8, dtype=torch.long))
    randomize(cm, 1)
    cm.eval()
    x = ids()
    ours = cm.generate(input_ids=x, attention_mask=LEFT_PADDED, max_new_tokens=6, eos_token_id=None)
    assert torch.equal(ours, greedy_by_forward(cm, x, LEFT_PADDED, 6))


def test_unsupported_requests_raise_generation_error(llama):
    _, cm = llama
    with pytest.raises(peftc.GenerationError, match="supported options"):
        cm.generate(ids(), max_new_tokens=2, not_an_option=1)
    with pytest.raises(peftc.GenerationError, match="input_ids"):
        cm.generate(max_new_tokens=2)



def test_sampling_matches_hf_peft_given_the_same_seed(llama):
    base, cm = llama
    hf = hf_peft(base, peft.LoraConfig(**LLAMA_LORA), cm.adapter_state_dict())  # a test may have changed them
    x = ids(seed=6)
    options = dict(max_new_tokens=8, do_sample=True, temperature=0.7, top_k=20, top_p=0.9, min_new_tokens=8)
    torch.manual_seed(3)
    ours = cm.generate(input_ids=x, **options)
    torch.manual_seed(3)
    assert torch.equal(ours, hf.generate(input_ids=x, **options))
    torch.manual_seed(4)
    assert not torch.equal(ours, cm.generate(input_ids=x, **options))  # it did sample


def greedy_by_forward(cm, x: torch.Tensor, mask: torch.Tensor, n: int) -> torch.Tensor:
    """The reference without a cache: cm's own forward over the whole sequence for every token."""
    seq = x
    with torch.no_grad():
        for _ in range(n):
            full = torch.cat([mask, torch.ones(x.shape[0], seq.shape[1] - x.shape[1], dtype=torch.long)], 1)
            positions = (full.cumsum(-1) - 1).clamp_min(0)
            logits = cm(input_ids=seq, attention_mask=full, position_ids=positions).logits
            seq = torch.cat([seq, logits[:, -1].argmax(-1, keepdim=True)], 1)
    return seq


def test_dora_bitfit_norm_tuning_and_sparse_delta_generate_what_their_forward_predicts():
    spec = peftc.Spec(peftc.LoRA(target="c_attn", r=4, use_dora=True), peftc.BitFit(target=".*c_proj"),
                      peftc.NormTuning(),
                      peftc.SparseDelta(target="c_fc", density=0.2))
    _, cm = compiled(tiny_gpt2, spec, attention_mask=torch.ones(2, 8, dtype=torch.long))
    torch.manual_seed(1)
    with torch.no_grad():
        for p in cm.trainable_parameters():
            p.add_(torch.randn_like(p) * 0.3)
    cm.eval()
    x = ids()
    ours = cm.generate(input_ids=x, attention_mask=LEFT_PADDED, max_new_tokens=6)
    assert torch.equal(ours, greedy_by_forward(cm, x, LEFT_PADDED, 6))
