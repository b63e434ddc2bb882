"""Attention matching: every form capture produces is found, with its module path and head layout."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from attention_models import HandLM, ids, tiny_bert, tiny_gpt2, tiny_llama
from peftc.attention import attention_sites, select_attention
from peftc.capture import call_kwargs, capture
from peftc.errors import SpecError
from peftc.params import ParamTable


def sites_of(model, **kwargs):
    gm = capture(model, (), call_kwargs(model, kwargs), ParamTable())
    return attention_sites(gm)


def layout(sites):
    return [(s.form, s.module, s.heads, s.kv_heads, s.head_dim) for s in sites]


@pytest.mark.parametrize("impl,form", [("sdpa", "sdpa"), ("eager", "softmax")])
def test_llama_grouped_query_attention_through_repeat_kv(impl, form):
    x = ids()
    sites = sites_of(tiny_llama(impl, layers=2), input_ids=x, attention_mask=torch.ones_like(x))
    assert layout(sites) == [(form, f"model.layers.{i}.self_attn", 4, 2, 8) for i in range(2)]
    assert all(not s.enable_gqa for s in sites)  # transformers repeats K/V before the op


@pytest.mark.parametrize("impl,form", [("sdpa", "sdpa"), ("eager", "softmax")])
def test_gpt2_and_bert(impl, form):
    assert layout(sites_of(tiny_gpt2(impl), input_ids=ids())) == [(form, "transformer.h.0.attn", 4, 4, 8)]
    x = ids()
    mask = torch.ones_like(x)
    mask[1, -3:] = 0
    sites = sites_of(tiny_bert(impl), input_ids=x, attention_mask=mask)
    assert layout(sites) == [(form, "bert.encoder.layer.0.attention.self", 4, 4, 8)]
    if form == "sdpa":
        assert sites[0].mask is not None  # the padding mask rides on attn_mask
    else:
        assert [op.target for op in sites[0].scale_ops] == [torch.ops.aten.mul.Tensor]


def test_hand_written_softmax_and_sdpa_with_is_causal_and_enable_gqa():
    sites = sites_of(HandLM(("softmax", "sdpa")), input_ids=ids())
    assert layout(sites) == [("softmax", "blocks.0", 4, 2, 4), ("sdpa", "blocks.1", 4, 2, 4)]
    soft, sdpa = sites
    assert [op.target for op in soft.scale_ops] == [torch.ops.aten.div.Tensor]
    assert sdpa.is_causal and sdpa.enable_gqa and sdpa.mask is None
    assert sdpa.k_heads_at_op == 2 and soft.k_heads_at_op == 4


def test_selector_is_loras():
    sites = sites_of(tiny_llama(layers=2), input_ids=ids())
    assert [s.module for s in select_attention(sites, r".*\.1\.self_attn", "t")] == ["model.layers.1.self_attn"]
    assert len(select_attention(sites, ("self_attn",), "t")) == 2  # list: dotted suffix
    assert len(select_attention(sites, None, "t")) == 2
    with pytest.raises(SpecError, match=r"matches no attention.*model\.layers\.0\.self_attn"):
        select_attention(sites, "self_atn", "Prefix()")


class SoftmaxOverWeights(nn.Module):
    """softmax(x @ W) @ x: a softmax between matmuls that is not attention (W is a parameter)."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(8, 8))

    def forward(self, x):
        return (x @ self.w).softmax(-1) @ x.transpose(-1, -2)


def test_no_false_match_and_clear_error_without_attention():
    assert sites_of(SoftmaxOverWeights(), x=torch.randn(2, 8, 8)) == []
    with pytest.raises(SpecError, match="no attention peftc can match"):
        select_attention([], None, "Prefix()")
