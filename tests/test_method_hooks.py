"""The optional peftc.Method hooks OFT, BOFT and AdaLoRA use, on a method written here: rewrite_weight (the site
computes op(x, W'), merge is fold-params) and the checks around it."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import peftc


@peftc.register_method
class ColumnGate(peftc.Method):
    """column_gate: y = x W^T  ==>  y = x (W diag(g))^T, g [in] (ones)"""

    kind = "column_gate"

    def params(self, site):
        return {"gate": peftc.Param((site.in_features,), init="ones")}

    def rewrite_weight(self, site, w, p):
        return w * p.gate[None, :]


class TwoLayers(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(6, 5), nn.Linear(5, 3, bias=False)

    def forward(self, x):
        return self.b(torch.relu(self.a(x)))


def test_rewrite_weight_trains_merges_and_folds():
    torch.manual_seed(0)
    model = TwoLayers().eval()
    x = torch.randn(4, 6)
    cm = peftc.compile(model, ColumnGate(target=["a", "b"]), kwargs={"x": x}, dynamic=False)
    torch.testing.assert_close(cm(x=x), model(x), atol=0, rtol=0)
    ga, gb = torch.rand(6) + 0.5, torch.rand(5) + 0.5
    cm.load_adapter_state_dict({"a.gate": ga, "b.gate": gb})
    expected = torch.relu(x @ (model.a.weight * ga).T + model.a.bias) @ (model.b.weight * gb).T
    y = cm(x=x)
    torch.testing.assert_close(y, expected)
    y.sum().backward()
    assert cm.get_parameter("a.gate").grad is not None and cm.get_parameter("b.gate").grad is not None
    assert all(p.grad is None for n, p in cm.named_parameters() if not n.endswith("gate"))
    merged = cm.merge(adapters=["a"])  # one site folded, the other still trains
    torch.testing.assert_close(merged(x=x), expected)
    assert merged.counters["fold-params.folded"] == 1
    assert {n for n, p in merged.named_parameters() if p.requires_grad} == {"b.gate"}
    full = cm.merge()
    assert {n for n, _ in full.named_parameters()} == {n for n, _ in model.named_parameters()}
    plain = peftc.compile(model, None, pipeline="freeze-base", kwargs={"x": x}, dynamic=False).graph_module
    assert [n.target for n in full.graph_module.graph.nodes if n.op == "call_function"] == \
        [n.target for n in plain.graph.nodes if n.op == "call_function"]


def test_rewrite_weight_needs_a_weight_site():
    class OnNorms(peftc.Method):
        kind = "on_norms"
        sites = ("norm",)

        def rewrite_weight(self, site, w, p):
            return w

    with pytest.raises(peftc.SpecError, match="rewrite_weight, which needs a weight"):
        peftc.register_method(OnNorms)


def test_rewrite_weight_of_the_wrong_shape_is_a_pass_error():
    @peftc.register_method
    class Wrong(peftc.Method):
        kind = "wrong_shape"

        def params(self, site):
            return {"g": peftc.Param((1,), init="ones")}

        def rewrite_weight(self, site, w, p):
            return w.t() * p.g

    with pytest.raises(peftc.PassError, match="must return W' shaped like W"):
        peftc.compile(TwoLayers(), Wrong(target=["a"]), kwargs={"x": torch.randn(2, 6)}, dynamic=False)


def test_rewrite_weight_on_a_bfloat16_base_computes_in_float32():
    torch.manual_seed(0)
    model = TwoLayers().to(torch.bfloat16).eval()
    x = torch.randn(4, 6, dtype=torch.bfloat16)
    cm = peftc.compile(model, ColumnGate(target=["a"]), kwargs={"x": x}, dynamic=False)
    assert cm.params["a.gate"].tensor.dtype == torch.float32
    g = torch.rand(6) + 0.5
    cm.load_adapter_state_dict({"a.gate": g})
    w = (model.a.weight.float() * g).to(torch.bfloat16)  # W' in float32, cast once
    expected = model.b(torch.relu(torch.nn.functional.linear(x, w, model.a.bias)))
    y = cm(x=x)
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y, expected, atol=0, rtol=0)
    y.float().sum().backward()
    assert cm.get_parameter("a.gate").grad.dtype == torch.float32
