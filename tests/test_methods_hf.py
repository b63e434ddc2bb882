"""LoHa and VeRA, written with the public method API (peftc/methods/), against HF PEFT with identical weights:
same trainable count, same keys, outputs and gradients, merge, and a merged graph with the plain capture's ops."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import peftc
from conftest import ids, tiny_gpt2, tiny_llama

peft = pytest.importorskip("peft")


class TinyCNN(nn.Module):
    """A plain, a grouped + dilated, and a 1-d convolution, then a linear head."""

    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(4, 8, 3, padding=1)
        self.c2 = nn.Conv2d(8, 8, 3, padding=2, dilation=2, groups=2)
        self.c3 = nn.Conv1d(8, 6, 3, stride=2)
        self.head = nn.Linear(6, 5)

    def forward(self, x):
        h = self.c2(torch.relu(self.c1(x))).flatten(2)  # [b, 8, h·w]
        return self.head(self.c3(h).mean(-1))


def plain_ops(model, kwargs) -> int:
    """call_function nodes of the model's own capture (no method), the count a merged graph must have."""
    key = (type(model).__name__, tuple((k, tuple(v.shape)) for k, v in kwargs.items()))
    if key not in _PLAIN:
        _PLAIN[key] = _ops(peftc.compile(model, None, pipeline="freeze-base", kwargs=kwargs, dynamic=False).graph_module)
    return _PLAIN[key]


_PLAIN: dict = {}


def _ops(gm) -> int:
    return sum(n.op == "call_function" for n in gm.graph.nodes)


def hf_key(name: str, hf_state: dict) -> str:
    """Our key is HF PEFT's saved key behind `base_model.model.` (per module) or `base_model.` (VeRA's shared)."""
    return next(k for k in (f"base_model.model.{name}", f"base_model.{name}") if k in hf_state)


def check_parity(base, rule, config, kwargs, out, prune_grads: bool):
    base = base.eval()
    cm = peftc.compile(base, rule, kwargs=kwargs, prune_grads=prune_grads, dynamic=False)
    hf = peft.get_peft_model(copy.deepcopy(base), config).eval()
    assert cm.parameter_counts()[0] == sum(p.numel() for p in hf.parameters() if p.requires_grad)

    with torch.no_grad():  # HF PEFT's init leaves the model unchanged: one factor (or λ_b) starts at zero
        torch.testing.assert_close(out(cm(**kwargs)), out(base(**kwargs)), atol=0, rtol=0)
    hf_state = peft.get_peft_model_state_dict(hf)
    ours = cm.adapter_state_dict()
    assert {hf_key(k, hf_state): tuple(v.shape) for k, v in ours.items()} == \
        {k: tuple(v.shape) for k, v in hf_state.items()}
    torch.manual_seed(1)
    weights = {k: torch.randn_like(v) * 0.3 for k, v in ours.items()}  # non-zero everywhere, B and λ_b included
    cm.load_adapter_state_dict(weights)
    peft.set_peft_model_state_dict(hf, {hf_key(k, hf_state): v for k, v in weights.items()})

    y_ours, y_hf = out(cm(**kwargs)), out(hf(**kwargs))
    assert (y_ours - out(base(**kwargs))).abs().max() > 1e-3  # the adapter changes the outputs
    torch.testing.assert_close(y_ours, y_hf, atol=1e-5, rtol=1e-5)
    y_ours.square().mean().backward()
    y_hf.square().mean().backward()
    hf_params = dict(hf.named_parameters())
    trained = [p.name for p in cm.params if p.trainable]
    assert {n for n, p in cm.named_parameters() if p.grad is not None} == set(trained)
    for name in trained:
        theirs = hf_params[hf_key(name, hf_state) + ".default"].grad
        torch.testing.assert_close(cm.get_parameter(name).grad, theirs, atol=1e-5, rtol=1e-4)

    merged = cm.merge()
    with torch.no_grad():
        y_merged = out(merged(**kwargs))
        y_hf_merged = out(hf.merge_and_unload()(**kwargs))
    torch.testing.assert_close(y_merged, y_hf_merged, atol=1e-5, rtol=1e-5)
    assert merged.counters[f"merge-reparam.method-{rule.kind}"] > 0
    assert _ops(merged.graph_module) == plain_ops(base, kwargs)
    assert {n for n, _ in merged.named_parameters()} == {n for n, _ in base.named_parameters()}
    return cm


def test_loha_llama_matches_hf():
    torch.manual_seed(0)
    check_parity(tiny_llama(num_hidden_layers=1), peftc.LoHa(target=["q_proj", "v_proj", "down_proj"], r=4, alpha=8),
                 peft.LoHaConfig(target_modules=["q_proj", "v_proj", "down_proj"], r=4, alpha=8),
                 {"input_ids": ids()}, lambda o: o.logits, prune_grads=False)


@pytest.mark.parametrize("prune_grads", [False, True])
def test_loha_grouped_dilated_conv_matches_hf(prune_grads):
    torch.manual_seed(0)
    cm = check_parity(TinyCNN(), peftc.LoHa(target=["c1", "c2", "c3", "head"], r=2, alpha=3),
                      peft.LoHaConfig(target_modules=["c1", "c2", "c3", "head"], r=2, alpha=3),
                      {"x": torch.randn(2, 4, 6, 6)}, lambda o: o, prune_grads)
    # in = in_channels / groups · kernel, as HF PEFT shapes it
    assert cm.params["c2.hada_w1_b"].tensor.shape == (2, 4 * 3 * 3)
    assert cm.params["c3.hada_w1_b"].tensor.shape == (2, 8 * 3)


def test_vera_llama_matches_hf_with_prune_grads():
    torch.manual_seed(0)
    targets = ["q_proj", "v_proj", "down_proj"]  # different in/out sizes: the shared A/B are sliced per site
    cm = check_parity(tiny_llama(num_hidden_layers=1), peftc.VeRA(target=targets, r=4),
                      peft.VeraConfig(target_modules=targets, r=4), {"input_ids": ids()}, lambda o: o.logits,
                      prune_grads=True)
    assert cm.params["vera_A"].tensor.shape == (4, 64) and cm.params["vera_B"].tensor.shape == (32, 4)
    assert not cm.params["vera_A"].trainable


def test_vera_gpt2_conv1d_matches_hf():
    torch.manual_seed(0)
    check_parity(tiny_gpt2(n_layer=1), peftc.VeRA(target=["c_attn", "c_fc"], r=4),
                 peft.VeraConfig(target_modules=["c_attn", "c_fc"], r=4, fan_in_fan_out=True),
                 {"input_ids": ids()}, lambda o: o.logits, prune_grads=False)


def test_vera_init_is_hf_peft_init():
    """Same projection_prng_key, same shared projections; λ_d = d_initial and λ_b = 0, so identity at init."""
    torch.manual_seed(0)
    base = tiny_llama(num_hidden_layers=1).eval()
    kwargs = {"input_ids": ids()}
    cm = peftc.compile(base, peftc.VeRA(target=["q_proj", "v_proj"], r=4, d_initial=0.2), kwargs=kwargs, dynamic=False)
    hf = peft.get_peft_model(copy.deepcopy(base), peft.VeraConfig(target_modules=["q_proj", "v_proj"], r=4,
                                                                   d_initial=0.2))
    hf_state = peft.get_peft_model_state_dict(hf)
    for name, value in cm.adapter_state_dict().items():
        torch.testing.assert_close(value, hf_state[hf_key(name, hf_state)], atol=0, rtol=0)
    torch.testing.assert_close(cm(**kwargs).logits, base(**kwargs).logits, atol=0, rtol=0)


def test_lokr_llama_decomposed_matches_hf_with_prune_grads():
    torch.manual_seed(0)
    targets = ["q_proj", "v_proj", "down_proj"]
    cm = check_parity(tiny_llama(num_hidden_layers=1), peftc.LoKr(target=targets, r=1, alpha=2, decompose_both=True),
                      peft.LoKrConfig(target_modules=targets, r=1, alpha=2, decompose_both=True),
                      {"input_ids": ids()}, lambda o: o.logits, prune_grads=True)
    assert {k.rpartition(".")[2] for k in cm.adapter_state_dict()} == {"lokr_w1_a", "lokr_w1_b", "lokr_w2_a",
                                                                       "lokr_w2_b"}


@pytest.mark.parametrize("r", [1, 4])  # r=1: W2 factored (kernel in W2_b); r=4: full W2 (kernel in W2)
def test_lokr_convolutions_match_hf(r):
    torch.manual_seed(0)
    check_parity(TinyCNN(), peftc.LoKr(target=["c1", "c2", "c3", "head"], r=r, alpha=3),
                 peft.LoKrConfig(target_modules=["c1", "c2", "c3", "head"], r=r, alpha=3),
                 {"x": torch.randn(2, 4, 6, 6)}, lambda o: o, prune_grads=False)


def test_lokr_factorization_is_hf_peft_factorization():
    from peft.tuners.lokr.layer import factorization as hf_factorization

    from peftc.methods.lokr import factorization

    for n in range(1, 200):
        for factor in (-1, 1, 2, 3, 4, 8, 16):
            assert factorization(n, factor) == hf_factorization(n, factor), (n, factor)
