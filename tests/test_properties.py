"""Hypothesis properties of insert-lora over random MLPs and small attention models."""

import math

import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

import peftc
from peftc.capture import ModelInfo, capture
from peftc.params import ParamTable
from peftc.pipeline import PassContext, Pipeline

SETTINGS = settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.too_slow])


class RandomMLP(nn.Module):
    def __init__(self, widths, bias, act):
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(a, b, bias=bias) for a, b in zip(widths, widths[1:]))
        self.act = act

    def forward(self, x):
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i < len(self.layers) - 1:
                x = getattr(torch, self.act)(x)
        return x


class TinyAttention(nn.Module):
    """Hand-written attention: fused or separate projections, SDPA or the written-out softmax form."""

    def __init__(self, dim, heads, fused, sdpa):
        super().__init__()
        self.heads, self.fused, self.sdpa = heads, fused, sdpa
        if fused:
            self.qkv = nn.Linear(dim, 3 * dim)
        else:
            self.q, self.k, self.v = (nn.Linear(dim, dim) for _ in range(3))
        self.o = nn.Linear(dim, dim)

    def forward(self, x):
        b, s, d = x.shape
        q, k, v = self.qkv(x).chunk(3, -1) if self.fused else (self.q(x), self.k(x), self.v(x))
        q, k, v = (t.view(b, s, self.heads, -1).transpose(1, 2) for t in (q, k, v))
        if self.sdpa:
            h = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
            h = scores.softmax(-1) @ v
        return self.o(h.transpose(1, 2).reshape(b, s, d))


@st.composite
def mlp_case(draw):
    widths = draw(st.lists(st.integers(2, 8), min_size=2, max_size=4))
    model = RandomMLP(widths, draw(st.booleans()), draw(st.sampled_from(["relu", "tanh", "sigmoid"])))
    names = [f"layers.{i}" for i in range(len(widths) - 1)]
    targets = draw(st.lists(st.sampled_from(names), min_size=1, unique=True))
    x = torch.randn(draw(st.integers(2, 4)), widths[0])
    return model, targets, (x,)


@st.composite
def attention_case(draw):
    heads = draw(st.sampled_from([1, 2]))
    dim = heads * draw(st.sampled_from([2, 4]))
    fused = draw(st.booleans())
    model = TinyAttention(dim, heads, fused, draw(st.booleans()))
    names = ["qkv", "o"] if fused else ["q", "k", "v", "o"]
    targets = draw(st.lists(st.sampled_from(names), min_size=1, unique=True))
    x = torch.randn(2, draw(st.integers(2, 5)), dim)
    return model, targets, (x,)


cases = st.one_of(mlp_case(), attention_case())
rules = st.builds(lambda r, alpha, rs: dict(r=r, alpha=alpha, use_rslora=rs),
                  st.integers(1, 4), st.sampled_from([1.0, 8.0, 16.0]), st.booleans())


@SETTINGS
@given(cases, rules, st.integers(0, 2**16))
def test_identity_at_init(case, rule, seed):
    torch.manual_seed(seed)
    model, targets, args = case
    model.eval()
    cm = peftc.compile(model, peftc.LoRA(target=targets, **rule), args=args, dynamic=False)
    assert torch.equal(cm(*args), model(*args))


@SETTINGS
@given(cases, rules, st.integers(0, 2**16))
def test_gradients_exist_exactly_for_the_spec_trainable_set(case, rule, seed):
    torch.manual_seed(seed)
    model, targets, args = case
    model.eval()
    cm = peftc.compile(model, peftc.LoRA(target=targets, **rule), args=args, dynamic=False)
    with torch.no_grad():  # non-zero B so that A receives a gradient too
        for name, p in cm.named_parameters():
            if "lora_B" in name:
                p.normal_()
    cm(*args).square().sum().backward()
    expected = {f"{t}.lora_{ab}.weight" for t in targets for ab in "AB"}
    assert {n for n, p in cm.named_parameters() if p.grad is not None} == expected
    assert {n for n, p in cm.named_parameters() if p.requires_grad} == expected


@SETTINGS
@given(cases, rules)
def test_insert_lora_is_idempotent(case, rule):
    model, targets, args = case
    table = ParamTable()
    gm = capture(model.eval(), args, {}, table)
    ctx = PassContext(table, ModelInfo.of(model), training=False)
    pipeline = Pipeline.for_spec(peftc.Spec(peftc.LoRA(target=targets, **rule)))
    gm = pipeline.run(gm, ctx)
    code, params = gm.code, table.render()
    assert not any(p.run(gm, ctx).modified for p in pipeline.passes)
    assert gm.code == code and table.render() == params
