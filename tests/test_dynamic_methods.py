"""Every method under the default dynamic capture: one graph serves a new batch and sequence size, and computes
what a graph captured for exactly that size computes (loss and every gradient).

Most method tests compile with dynamic=False, since a static capture costs a fifth of a dynamic one and the
method's math does not depend on it. This file is where each method meets symbolic shapes: a pass that bakes the
example's batch or length into the graph (a reshape, an expand, a prompt's batch) fails here.
"""

from __future__ import annotations

import copy

import pytest
import torch

import peftc
from conftest import ids, tiny_llama

PROJ = ["q_proj", "v_proj", "down_proj"]
METHODS = {
    "lora": lambda: peftc.LoRA(target="q_proj|v_proj", r=4),
    "dora": lambda: peftc.LoRA(target="q_proj|v_proj", r=4, use_dora=True),
    "lora-embedding": lambda: peftc.LoRA(target="embed_tokens", r=4),
    "ia3": lambda: peftc.IA3(target="k_proj|v_proj|down_proj", feedforward="down_proj"),
    "prefix": lambda: peftc.Prefix(length=3),
    "prompt": lambda: peftc.PromptTuning(length=2),
    "p-tuning": lambda: peftc.PTuning(length=3),
    "adaption-prompt": lambda: peftc.AdaptionPrompt(adapter_len=4, adapter_layers=1),
    "loha": lambda: peftc.LoHa(target=PROJ, r=4, alpha=8),
    "lokr": lambda: peftc.LoKr(target=PROJ, r=1, alpha=2, decompose_both=True),
    "vera": lambda: peftc.VeRA(target=["q_proj", "v_proj"], r=4),
    "oft": lambda: peftc.OFT(target=PROJ, oft_block_size=8),
    "boft": lambda: peftc.BOFT(target=PROJ, boft_block_size=4),
    "adalora": lambda: peftc.AdaLoRA(target=PROJ, init_r=4, target_r=2, total_step=10),
    "bottleneck": lambda: peftc.Adapter(config="par_bn"),
    "sparse-delta": lambda: peftc.SparseDelta(target="model.layers.0.mlp.down_proj.weight", density=0.5),
    "bitfit": lambda: peftc.Spec(peftc.LoRA(target="q_proj", r=2), peftc.BitFit(target=".*q_proj")),
    "norm-tuning": lambda: peftc.NormTuning(),
    "ln-tuning": lambda: peftc.LNTuning(target="post_attention_layernorm"),
    "trainable-tokens": lambda: peftc.TrainableTokens(indices=[1, 5]),
    "modules-to-save": lambda: peftc.Spec(peftc.LoRA(target="q_proj", r=2), peftc.ModulesToSave(target="lm_head")),
}
# These lengthen the sequence, which a static capture refuses: their reference is a dynamic capture of `large`.
LENGTHENING = {"prompt", "p-tuning"}


def perturbed(cm) -> None:
    """Every trainable tensor set to seeded values, so a zero-initialized adapter is not a no-op."""
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for _, p in cm.named_parameters():
            if p.requires_grad:
                p.copy_(p + 0.1 * torch.randn(p.shape, generator=g, dtype=p.dtype))


def loss_and_grads(cm, inputs):
    cm.zero_grad(set_to_none=True)
    loss = cm(**inputs).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in cm.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("method", list(METHODS))
def test_one_dynamic_graph_serves_new_sizes_as_a_static_capture_would(method):
    torch.manual_seed(0)
    model = tiny_llama(num_hidden_layers=1, attention_bias=True)
    small = dict(input_ids=ids(2, 8), labels=ids(2, 8, seed=1))
    large = dict(input_ids=ids(3, 11, seed=2), labels=ids(3, 11, seed=3))
    torch.manual_seed(1)
    dynamic = peftc.compile(copy.deepcopy(model), METHODS[method](), kwargs=small)
    torch.manual_seed(1)
    static = peftc.compile(copy.deepcopy(model), METHODS[method](), kwargs=large, dynamic=method in LENGTHENING)
    perturbed(dynamic)
    perturbed(static)
    dynamic.train()
    static.train()

    loss_and_grads(dynamic, small)
    loss, grads = loss_and_grads(dynamic, large)
    assert len(dynamic._graphs) == 1 and len(next(iter(dynamic._graphs.values()))) == 1, \
        "the new sizes were captured again: the graph is not dynamic"
    want_loss, want_grads = loss_and_grads(static, large)
    torch.testing.assert_close(loss, want_loss, rtol=1e-5, atol=1e-6)
    assert grads.keys() == want_grads.keys() and grads
    for name, grad in grads.items():
        torch.testing.assert_close(grad, want_grads[name], rtol=1e-4, atol=1e-6, msg=name)
