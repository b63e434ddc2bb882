"""The public method API (peftc.Method): a method defined here, outside the package, gets spec loading, the
pipeline, diffs, verification, prune-grads, merge and ONNX export."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import peftc
from peftc.errors import PassError, SpecError


@peftc.register_method
class RankGate(peftc.Method):
    """rank_gate (test): y = W x  ==>  y + B(g ⊙ A x)."""

    kind = "test_rank_gate"
    r: int = 2

    def params(self, site):
        return {"lora_A.weight": peftc.Param((self.r, site.in_features), init="kaiming_uniform"),
                "lora_B.weight": peftc.Param((site.out_features, self.r), init="zeros"),
                "gate": peftc.Param((self.r,), init=1.0)}

    def delta(self, p):
        return p["lora_B.weight"] @ (p.gate[:, None] * p["lora_A.weight"])

    def forward(self, site, x, y, p):
        return y + site.apply(x, self.delta(p))

    def merge(self, site, w, p):
        return w + self.delta(p)


class Tiny(nn.Module):
    """Linear layers, and a bare parameter read as `h @ w` (stored (in, out), adapters beside it as `w_adapter`)."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(32, 16)
        self.up = nn.Linear(16, 24)
        self.down = nn.Linear(24, 16)
        self.w = nn.Parameter(torch.randn(16, 16) * 0.2)
        self.head = nn.Linear(16, 32)

    def forward(self, ids):
        h = self.emb(ids)
        h = h + self.down(torch.relu(self.up(h)))
        return self.head(h @ self.w)


TARGET = ["up", "down", "w"]


def model():
    torch.manual_seed(0)
    return Tiny().eval()


def ids(seed=0):
    return torch.randint(0, 32, (2, 6), generator=torch.Generator().manual_seed(seed))


def perturbed(cm, seed=1):
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in cm.trainable_parameters():
            p.add_(torch.randn_like(p) * 0.3)
    return cm


def ops(gm) -> int:
    return sum(n.op == "call_function" for n in gm.graph.nodes)


def test_spec_file_and_pipeline_string(tmp_path):
    path = tmp_path / "spec.toml"
    path.write_text('[[test_rank_gate]]\nr = 3\ntarget = ["up", "down"]\n')
    spec = peftc.Spec.load(path)
    assert spec.rules == (RankGate(target=("up", "down"), r=3),)
    assert peftc.Spec.from_dict(spec.to_dict()) == spec
    cm = peftc.compile(model(), path, kwargs={"ids": ids()}, dynamic=False)
    assert cm.counters["insert-test-rank-gate.inserted"] == 2
    assert cm.params["up.gate"].tensor.shape == (3,)
    cm = peftc.compile(model(), None, pipeline="insert-test-rank-gate{r=4,target=up}", kwargs={"ids": ids()}, dynamic=False)
    assert cm.params["up.lora_A.weight"].tensor.shape == (4, 16)


def test_spec_errors_say_what_and_where(tmp_path):
    with pytest.raises(SpecError, match="unknown key `rank`"):
        peftc.Spec.from_dict({"test_rank_gate": [{"rank": 3}]})
    with pytest.raises(SpecError, match="`r` must be a int like its default 2, got '3'"):
        RankGate(r="3")
    with pytest.raises(SpecError, match="matches no matmul"):
        peftc.compile(model(), RankGate(target="nope"), kwargs={"ids": ids()}, dynamic=False)
    with pytest.raises(SpecError, match="which RankGate.*already adapts"):
        peftc.compile(model(), peftc.Spec(RankGate(target="up"), RankGate(target=["up", "down"], r=3)),
                      kwargs={"ids": ids()}, dynamic=False)


def test_identity_at_init_names_diff_and_idempotence():
    m, x = model(), ids()
    cm = peftc.compile(m, RankGate(target=TARGET), kwargs={"ids": x}, dynamic=False)
    torch.testing.assert_close(cm(x), m(x), atol=0, rtol=0)
    assert set(cm.adapter_state_dict()) == {f"{mod}.{k}" for mod in ("up", "down", "w_adapter")
                                            for k in ("lora_A.weight", "lora_B.weight", "gate")}
    assert cm.params["w_adapter.lora_B.weight"].tensor.shape == (16, 2)
    diff = cm.diff("insert-test-rank-gate")
    assert "+up.gate  [2] float32  trainable  adapter:test_rank_gate" in diff
    assert "torch._C._nn.linear" in diff and "self.up.lora_A.weight" in diff
    # running the pass again changes nothing
    gm = cm.graph_module
    before = gm.code
    p = cm.pipeline.passes[1]
    ctx = peftc.PassContext(cm.params, cm._info, training=False)
    assert not p.run(gm, ctx).modified and gm.code == before


@pytest.mark.parametrize("prune_grads", [False, True])
def test_trains_exactly_its_parameters(prune_grads):
    m, x = model(), ids()
    cms = [peftc.compile(m, RankGate(target=TARGET), kwargs={"ids": x}, prune_grads=flag, dynamic=False).train()
           for flag in (False, prune_grads)]
    cms[1].load_adapter_state_dict(perturbed(cms[0]).adapter_state_dict())
    for cm in cms:
        cm(x).square().mean().backward()
    trained = {n for n, p in cms[1].named_parameters() if p.grad is not None}
    assert trained == {p.name for p in cms[1].params if p.trainable} == set(cms[1].adapter_state_dict())
    for name in trained:
        torch.testing.assert_close(cms[1].get_parameter(name).grad, cms[0].get_parameter(name).grad)


@pytest.mark.parametrize("prune_grads", [False, True])
def test_merge_folds_into_the_base_weights(prune_grads):
    m, x = model(), ids()
    cm = perturbed(peftc.compile(m, RankGate(target=TARGET), kwargs={"ids": x}, prune_grads=prune_grads, dynamic=False))
    merged = cm.merge()
    torch.testing.assert_close(merged(x), cm(x), atol=1e-5, rtol=1e-5)
    assert merged.counters["merge-reparam.method-test_rank_gate"] == 3
    assert ops(merged.graph_module) == ops(peftc.compile(m, None, pipeline="freeze-base",
                                                         kwargs={"ids": x}, dynamic=False).graph_module)
    assert {n for n, _ in merged.named_parameters()} == {n for n, _ in m.named_parameters()}
    some = cm.merge(adapters=["up"])  # the others stay, trainable
    torch.testing.assert_close(some(x), cm(x), atol=1e-5, rtol=1e-5)
    assert {p.name for p in some.params if p.trainable} == \
        {n for n in cm.adapter_state_dict() if not n.startswith("up.")}


def test_half_precision_base_trains_float32_adapters_and_merges():
    m, x = model().to(torch.bfloat16), ids()
    cm = perturbed(peftc.compile(m, RankGate(target=TARGET), kwargs={"ids": x}, dynamic=False))
    assert cm.params["up.gate"].tensor.dtype == torch.float32
    out = cm(x)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(cm.merge()(x), out, atol=3e-2, rtol=3e-2)


def test_onnx_export_unmerged(tmp_path):
    """The traced forward lowers to ONNX as it is (merged export: tests/test_custom_method_example.py)."""
    cm = perturbed(peftc.compile(model(), RankGate(target=TARGET), kwargs={"ids": ids()}))
    report = cm.export_onnx(tmp_path / "unmerged.onnx", merged=False)
    assert report.max_abs_diff <= report.tolerance


def test_method_without_merge_says_so():
    @peftc.register_method
    class ScaleOut(peftc.Method):
        """scale_out (test): y ==> y · (1 + tanh(s)), not a weight merge."""
        kind = "test_scale_out"

        def params(self, site):
            return {"s": peftc.Param((site.out_features,), init="zeros")}

        def forward(self, site, x, y, p):
            return y * (1 + torch.tanh(p.s))

    cm = perturbed(peftc.compile(model(), ScaleOut(target="up"), kwargs={"ids": ids()}, dynamic=False))
    with pytest.raises(PassError, match="no merge rule matched how `up.s` is applied"):
        cm.merge()


def _broken(forward=None, merge=None, kind="test_broken"):
    body = {"__doc__": "broken (test)", "kind": kind,
            "params": lambda self, site: {"b": peftc.Param((site.out_features, 2))},
            "forward": forward or (lambda self, site, x, y, p: y + site.apply(x, p.b @ p.b.T[:, :site.in_features]))}
    if merge is not None:
        body["merge"] = merge
    return peftc.register_method(type("Broken", (peftc.Method,), body))


def test_user_errors_are_peftc_errors():
    x = ids()
    const = _broken(forward=lambda self, site, x, y, p: y + torch.ones(site.out_features) * p.b.sum())
    with pytest.raises(PassError, match="uses a tensor it did not get"):
        peftc.compile(model(), const(target="up"), kwargs={"ids": x}, dynamic=False)
    same = _broken(forward=lambda self, site, x, y, p: y)
    with pytest.raises(PassError, match="must return a new tensor"):
        peftc.compile(model(), same(target="up"), kwargs={"ids": x}, dynamic=False)
    shape = _broken(forward=lambda self, site, x, y, p: y + p.b.sum(), merge=lambda self, site, w, p: p.b)
    with pytest.raises(PassError, match=r"returned \(24, 2\); it must return W' shaped like W, \(24, 16\)"):
        peftc.compile(model(), shape(target="up"), kwargs={"ids": x}, dynamic=False).merge()
    with pytest.raises(SpecError, match="set a snake_case name"):
        _broken(kind="Bad-Kind")


# ---- sites without a weight: module outputs, norms, attention ---------------------------------------------------

@peftc.register_method
class ParallelAdapter(peftc.Method):
    """parallel adapter (test): y = block(x)  ==>  y + U relu(D x)."""

    kind = "test_parallel_adapter"
    sites = ("module",)
    bottleneck: int = 4

    def params(self, site):
        return {"down.weight": peftc.Param((self.bottleneck, site.in_features), init="kaiming_uniform"),
                "up.weight": peftc.Param((site.out_features, self.bottleneck), init="zeros")}

    def forward(self, site, x, y, p):
        return y + torch.nn.functional.linear(torch.relu(torch.nn.functional.linear(x, p["down.weight"])),
                                              p["up.weight"])


@peftc.register_method
class NormScale(peftc.Method):
    """norm scale (test): y = norm(x)  ==>  y · (1 + s)."""

    kind = "test_norm_scale"
    sites = ("norm",)

    def params(self, site):
        return {"norm_scale": peftc.Param((site.out_features,), init="zeros")}

    def forward(self, site, x, y, p):
        return y * (1 + p.norm_scale)


@peftc.register_method
class HeadGate(peftc.Method):
    """head gate (test): o = attention(q, k, v)  ==>  o · g[head]."""

    kind = "test_head_gate"
    sites = ("attention",)

    def params(self, site):
        return {"head_gate": peftc.Param((site.heads,), init="ones")}

    def forward(self, site, x, y, p):
        q, k, v = x  # an attention site's input is its (q, k, v)
        return y * p.head_gate[None, :, None, None]


def test_module_and_norm_sites_match_hooked_reference():
    import copy

    from conftest import tiny_llama

    torch.manual_seed(0)
    base = tiny_llama(num_hidden_layers=1).eval()
    x = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(0))
    cm = perturbed(peftc.compile(base, peftc.Spec(ParallelAdapter(target=r"layers\.\d+\.mlp"), NormScale()),
                                 kwargs={"input_ids": x}, dynamic=False))
    assert cm.counters["insert-test-parallel-adapter.inserted"] == 1
    assert cm.counters["insert-test-norm-scale.inserted"] == 3  # input, post-attention and final norms

    ref = copy.deepcopy(base)
    p = {k: v.detach() for k, v in cm.adapter_state_dict().items()}
    mlp = ref.model.layers[0].mlp
    mlp.register_forward_hook(lambda m, i, o: o + torch.nn.functional.linear(
        torch.relu(torch.nn.functional.linear(i[0], p["model.layers.0.mlp.down.weight"])),
        p["model.layers.0.mlp.up.weight"]))
    for name, module in ref.named_modules():
        if "Norm" in type(module).__name__:
            module.register_forward_hook(lambda m, i, o, n=name: o * (1 + p[f"{n}.norm_scale"]))
    torch.testing.assert_close(cm(input_ids=x).logits, ref(input_ids=x).logits, atol=1e-5, rtol=1e-5)
    with pytest.raises(PassError, match="no merge rule matched"):  # no weight, no merge
        cm.merge()


def test_attention_sites_in_both_forms_match_a_reweighted_output_projection():
    import copy

    from attention_models import HandLM

    base = HandLM(forms=("softmax", "sdpa")).eval()
    x = torch.randint(1, 64, (2, 8), generator=torch.Generator().manual_seed(0))
    cm = peftc.compile(base, HeadGate(), kwargs={"input_ids": x}, dynamic=False)
    assert cm.counters["insert-test-head-gate.inserted"] == 2
    torch.testing.assert_close(cm(x), base(x), atol=0, rtol=0)
    gates = {f"blocks.{i}": torch.tensor([1.0, 0.0, 2.0, -0.5]) for i in range(2)}
    cm.load_adapter_state_dict({f"{m}.head_gate": g for m, g in gates.items()})
    ref = copy.deepcopy(base)
    with torch.no_grad():  # gating head h scales the output projection's columns of head h
        for i, block in enumerate(ref.blocks):
            block.o.weight.mul_(gates[f"blocks.{i}"].repeat_interleave(block.d))
    torch.testing.assert_close(cm(x), ref(x), atol=1e-6, rtol=1e-5)


def test_output_sites_need_module_paths():
    with pytest.raises(SpecError, match="'all-linear' selects matmuls"):
        NormScale(target="all-linear")
    with pytest.raises(SpecError, match="`target` is required"):
        ParallelAdapter()
    with pytest.raises(SpecError, match="matches no norm module"):
        peftc.compile(model(), NormScale(), kwargs={"ids": ids()}, dynamic=False)
