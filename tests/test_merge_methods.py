"""cm.merge() folds every weight-space method into the base weights (tag-driven merges in peftc/merge.py): LoRA on
every matmul form and on convolutions, LoRA-FA, rank patterns, DoRA, per-slice LoRA, IA3, stacked adapters; the
merged graph has the plain capture's ops, ONNX included. Prefixes stay as frozen constants."""

from __future__ import annotations

import copy
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn
from torch.nn import functional as F

import peftc
from peftc.capture import call_kwargs, capture
from peftc.errors import PassError
from peftc.lower.onnx import export_module
from peftc.params import ParamTable
from peftc.passes.fold_params import FoldParams
from peftc.passes.merge_reparam import MergeReparam
from peftc.pipeline import PassContext
from variants_helpers import ids, tiny_gpt2, tiny_llama

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
from tiny_models import tiny_mlp  # noqa: E402



def op_count(gm) -> int:
    return sum(n.op == "call_function" for n in gm.graph.nodes)


def plain_ops(model: nn.Module, args=(), kwargs=None, training=False) -> int:
    model = copy.deepcopy(model).train(training)
    return op_count(capture(model, args, call_kwargs(model, kwargs or {}), ParamTable(), dynamic=False))


def randomize(cm, seed=1, scale=0.3):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in cm.params:
            # every float adapter tensor, LoRA-FA's frozen A too: each one the merge reads must matter
            if p.role == "adapter" and p.tensor.is_floating_point():
                p.tensor.add_((torch.rand(p.tensor.shape, generator=gen) * 2 - 1).to(p.tensor.dtype) * scale)


def tag_hits(merged) -> dict[str, int]:
    return {k.rpartition(".")[2]: v for k, v in merged.counters.items() if k.startswith("merge-reparam.tag-")}


class Forms(nn.Module):
    """One matmul of every form capture produces, each on its own non-square weight (a layout slip shows)."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(6, 8)
        self.functional = nn.Module()
        self.functional.weight = nn.Parameter(torch.randn(7, 8) * 0.3)  # F.linear, no bias
        self.w_in_out = nn.Parameter(torch.randn(7, 9) * 0.3)  # x @ W, W stored (in, out)
        self.w_t = nn.Parameter(torch.randn(5, 9) * 0.3)  # x @ W.t(): a layout op between W and the matmul
        self.eins = nn.Parameter(torch.randn(4, 5) * 0.3)  # einsum reading (out, in)
        self.eins_t = nn.Parameter(torch.randn(4, 3) * 0.3)  # einsum reading (in, out)

    def forward(self, x):
        h = F.linear(torch.tanh(self.lin(x)), self.functional.weight)
        h = torch.tanh(h @ self.w_in_out) @ self.w_t.t()
        h = torch.einsum("bsi,oi->bso", torch.tanh(h), self.eins)
        return torch.einsum("bsi,io->bso", h, self.eins_t)


ALL = ["lin", "functional", "w_in_out", "w_t", "eins", "eins_t"]
NOT_EINSUM = ALL[:4]


def merged_checks(cm, args=(), kwargs=None, model=None, training=False, atol=1e-5):
    """Merge everything; parity with the unmerged model, the plain capture's op count, base names, all frozen."""
    kwargs = kwargs or {}
    merged = cm.merge()
    assert op_count(merged.graph_module) == plain_ops(model, args, kwargs, training)
    assert {n for n, _ in merged.named_parameters()} <= {n for n, _ in model.named_parameters()}
    assert not any(p.requires_grad for p in merged.parameters())
    was = cm.training
    cm.eval(), merged.eval()
    with torch.no_grad():
        ref, out = cm(*args, **kwargs), merged(*args, **kwargs)
    ref, out = getattr(ref, "logits", ref), getattr(out, "logits", out)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=atol)
    cm.train(was)
    return merged


@pytest.mark.parametrize("spec,hits", [
    (peftc.LoRA(target=ALL, r=2, alpha=3), {"tag-lora": 4}),  # linear sites go to the pattern rules
    (peftc.LoRA(target=ALL, r=3, freeze_a=True, use_rslora=True, rank_pattern={"w_t": 1, "eins": 2},
                alpha_pattern={"eins_t": 5.0}), {"tag-lora": 4}),
    (peftc.LoRA(target=NOT_EINSUM, r=2, use_dora=True), {"tag-dora": 4}),
    # lin (output) and functional (feed-forward) are linear sites: the IA3 pattern rules take them
    (peftc.IA3(target=ALL, feedforward=["functional", "w_t", "eins_t"]), {"tag-ia3": 2, "tag-ia3-feedforward": 2}),
], ids=["lora", "lora-fa-patterns", "dora", "ia3"])
def test_every_matmul_form_merges_with_the_plain_op_count(spec, hits):
    torch.manual_seed(0)
    model, x = Forms().eval(), torch.randn(2, 3, 6)
    cm = peftc.compile(copy.deepcopy(model), spec, args=(x,), dynamic=False)
    randomize(cm)
    merged = merged_checks(cm, (x,), model=model)
    assert tag_hits(merged) == hits
    assert {n for n, _ in merged.named_parameters()} == {n for n, _ in model.named_parameters()}
    # idempotent: nothing tagged is left to merge, nothing left to fold
    gm, ctx = merged.graph_module, PassContext(merged.params, merged._info, training=False)
    code = gm.code
    assert not MergeReparam().run(gm, ctx).modified and not FoldParams().run(gm, ctx).modified
    assert gm.code == code


class TinyCNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv1d(3, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 6, 3, stride=2, padding=1)
        self.head = nn.Linear(6, 4)

    def forward(self, x):
        h = torch.relu(self.conv1(x))
        h = self.conv2(h.unsqueeze(-1).expand(-1, -1, -1, 4))
        return self.head(h.mean((2, 3)))


@pytest.mark.parametrize("use_dora", [False, True])
def test_conv_and_dora_merges_equal_hf_peft_merge_and_unload(use_dora):
    from peft import LoraConfig, get_peft_model, set_peft_model_state_dict

    torch.manual_seed(0)
    model, x = TinyCNN().eval(), torch.randn(2, 3, 8)
    target = ["conv1", "conv2", "head"]
    cm = peftc.compile(copy.deepcopy(model), peftc.LoRA(target=target, r=2, alpha=4, use_dora=use_dora),
                       args=(x,), dynamic=False)
    randomize(cm, scale=0.2)
    merged = merged_checks(cm, (x,), model=model)
    # conv2d and the head are pattern hits (lora-conv2d, lora-linear); DoRA has no pattern
    assert tag_hits(merged) == ({"tag-dora": 3} if use_dora else {"tag-lora": 1})

    hf = get_peft_model(copy.deepcopy(model), LoraConfig(target_modules=target, r=2, lora_alpha=4,
                                                         use_dora=use_dora))
    set_peft_model_state_dict(hf, {f"base_model.model.{k}": v for k, v in cm.adapter_state_dict().items()})
    hf_merged = dict(hf.merge_and_unload().named_parameters())
    for name, p in merged.named_parameters():
        torch.testing.assert_close(p, hf_merged[name], rtol=1e-5, atol=1e-6)


def test_gpt2_slices_dora_ia3_merge_from_a_training_graph():
    """Conv1D layout (addmm, W stored (in, out), bias), dropout in the graph, four methods in one spec."""
    torch.manual_seed(0)
    model = tiny_gpt2(n_layer=1, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    kwargs = dict(input_ids=ids())
    spec = peftc.Spec(peftc.LoRA(target="c_attn", r=2, slices={"q": (0, 32), "v": (64, 96)}, dropout=0.1),
                      peftc.LoRA(target="c_fc", r=2, use_dora=True, dropout=0.1),
                      peftc.IA3(target="c_proj", feedforward="mlp.c_proj"))
    cm = peftc.compile(copy.deepcopy(model).train(), spec, kwargs=kwargs, dynamic=False)
    randomize(cm, scale=0.1)
    merged = merged_checks(cm, kwargs=kwargs, model=model, training=True)  # op count of the training capture
    assert tag_hits(merged) == {"tag-lora-slices": 1, "tag-dora": 1, "tag-ia3": 1, "tag-ia3-feedforward": 1}
    assert not any(k.endswith(("lora_A.q.weight", "ia3_l", "lora_magnitude_vector"))
                   for k in merged.state_dict())
    cm.train()  # cm is untouched by the merge and still trains every adapter
    cm(**kwargs).logits.sum().backward()
    assert all(p.grad is not None for p in cm.trainable_parameters())


@pytest.mark.parametrize("lora_first", [True, False])
def test_stacked_adapters_on_one_weight_merge_in_order(lora_first):
    """LoRA + IA3 on one linear (either order: (Wx)·l + s·BAx or (Wx + s·BAx)·l), and LoRA + IA3 on a weight that
    also carries a sparse delta: each merge builds on the weight the one before left, pattern rule or tag."""
    torch.manual_seed(0)
    model, (x,) = tiny_mlp()
    lora, ia3 = peftc.LoRA(target=["up", "down"], r=2), peftc.IA3(target=["up", "down"], feedforward="down")
    spec = peftc.Spec(*((lora, ia3) if lora_first else (ia3, lora)),
                      peftc.SparseDelta(target=r"down\.weight", density=0.2))
    cm = peftc.compile(copy.deepcopy(model), spec, args=(x,), dynamic=False)
    randomize(cm)
    merged = merged_checks(cm, (x,), model=model)
    hits = {k.rpartition(".")[2]: v for k, v in merged.counters.items() if k.startswith("merge-reparam.")}
    assert sum(hits.values()) == 4, hits
    assert {n for n, _ in merged.named_parameters()} == {n for n, _ in model.named_parameters()}


def test_subset_merge_of_dora_and_ia3_leaves_the_rest_trainable():
    torch.manual_seed(0)
    model, x = Forms().eval(), torch.randn(2, 3, 6)
    spec = peftc.Spec(peftc.LoRA(target=["lin", "w_t"], r=2, use_dora=True),
                      peftc.IA3(target=["functional", "w_in_out"], feedforward="w_in_out"))
    cm = peftc.compile(copy.deepcopy(model), spec, args=(x,), dynamic=False)
    randomize(cm)
    merged = cm.merge(adapters=["lin", "w_in_out_adapter"])
    assert tag_hits(merged) == {"tag-dora": 1, "tag-ia3-feedforward": 1}
    left = {n for n, p in merged.named_parameters() if p.requires_grad}
    assert left == {"w_t_adapter.lora_A.weight", "w_t_adapter.lora_B.weight", "w_t_adapter.lora_magnitude_vector",
                    "functional.ia3_l"}
    with torch.no_grad():
        torch.testing.assert_close(merged(x), cm(x), rtol=1e-5, atol=1e-5)
    merged(x).sum().backward()
    assert all(p.grad is not None for n, p in merged.named_parameters() if n in left)
    assert all(p.grad is None for p in cm.trainable_parameters())  # merged trains its own copies

    by_method = cm.merge(adapters="ia3")
    assert by_method.counters["merge-reparam.ia3-output"] == 1 and tag_hits(by_method) == {"tag-ia3-feedforward": 1}
    with pytest.raises(PassError, match="no merge rule matched how `lin.lora_magnitude_vector`"):
        cm.merge(adapters=["lin.lora_magnitude_vector"])  # DoRA without its A and B cannot fold


def test_bf16_base_merges_in_fp32_and_casts_once():
    torch.manual_seed(0)
    model, (x,) = tiny_mlp()
    model, x = model.to(torch.bfloat16), x.to(torch.bfloat16)
    spec = peftc.Spec(peftc.LoRA(target="up", r=4, alpha=8, use_dora=True), peftc.IA3(target="down"))
    cm = peftc.compile(copy.deepcopy(model), spec, args=(x,), dynamic=False)
    randomize(cm, scale=0.05)
    a = cm.adapter_state_dict()
    assert all(t.dtype == torch.float32 for t in a.values())
    merged = cm.merge()
    assert op_count(merged.graph_module) == plain_ops(model, (x,))
    got = dict(merged.named_parameters())
    assert all(p.dtype == torch.bfloat16 for p in got.values())

    w = model.up.weight.float() + 2.0 * a["up.lora_B.weight"] @ a["up.lora_A.weight"]
    up = (a["up.lora_magnitude_vector"] / w.norm(dim=1))[:, None] * w
    l = a["down.ia3_l"]
    expected = {"up.weight": up, "up.bias": model.up.bias.float(), "down.weight": model.down.weight.float() * l,
                "down.bias": model.down.bias.float() * l[:, 0]}
    for name, value in expected.items():
        assert torch.equal(got[name], value.to(torch.bfloat16)), name


def test_prefix_projection_folds_and_plain_prefixes_stay_as_constants():
    torch.manual_seed(0)
    model, kwargs = tiny_llama(num_hidden_layers=1), dict(input_ids=ids())
    cm = peftc.compile(copy.deepcopy(model), peftc.Prefix(length=3, projection=True), kwargs=kwargs, dynamic=False)
    randomize(cm, scale=0.1)
    merged = merged_checks_prefix(cm, kwargs)
    assert merged.counters["fold-params.folded"] == 2  # the MLP's output, sliced to P_k and P_v, one constant each
    assert torch.ops.aten.tanh.default not in {n.target for n in merged.graph_module.graph.nodes}
    assert not any("prefix_encoder" in n for n in merged.state_dict())

    plain = peftc.compile(copy.deepcopy(model), peftc.Prefix(length=3), kwargs=kwargs, dynamic=False)
    randomize(plain, scale=0.1)
    merged = merged_checks_prefix(plain, kwargs)
    assert op_count(merged.graph_module) > plain_ops(model, kwargs=kwargs)  # the prefix is attention input


def merged_checks_prefix(cm, kwargs):
    merged = cm.merge()
    assert not any(p.requires_grad for p in merged.parameters())
    with torch.no_grad():
        torch.testing.assert_close(merged(**kwargs).logits, cm(**kwargs).logits, rtol=1e-5, atol=1e-5)
    return merged


def test_prompt_tuning_merges_as_a_frozen_constant():
    torch.manual_seed(0)
    model, kwargs = tiny_llama(num_hidden_layers=1), dict(input_ids=ids())
    cm = peftc.compile(copy.deepcopy(model), peftc.PromptTuning(length=2), kwargs=kwargs)
    randomize(cm, scale=0.1)
    merged_checks_prefix(cm, kwargs)


@pytest.mark.parametrize("spec", [
    peftc.IA3(target=["up", "down"], feedforward="down"),
    peftc.LoRA(target=["up", "down"], r=4, use_dora=True),
    peftc.Spec(peftc.SparseDelta(target=r"up\.weight", density=0.1), peftc.BitFit(target="down")),
], ids=["ia3", "dora", "sparse-delta"])
def test_merged_onnx_has_the_base_models_nodes(spec, tmp_path):
    torch.manual_seed(0)
    model, (x,) = tiny_mlp()
    base = export_module(capture(copy.deepcopy(model), (x,), {}, ParamTable()), (x,), {}, tmp_path / "base.onnx",
                         reference=model)
    cm = peftc.compile(copy.deepcopy(model), spec, args=(x,))
    randomize(cm, scale=0.1)
    unmerged = cm.export_onnx(tmp_path / "unmerged.onnx", merged=False, verify=False)
    report = cm.export_onnx(tmp_path / "merged.onnx", merged=True)  # verified against cm in onnxruntime
    assert (report.nodes_exported, report.nodes_optimized) == (base.nodes_exported, base.nodes_optimized)
    assert unmerged.nodes_optimized > base.nodes_optimized  # so the count can tell a merge from none


class SharedLayout(nn.Module):
    """One transpose of W read by two matmuls: merging one read would change the other."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(5, 4))

    def forward(self, x):
        wt = self.w.t()
        return torch.tanh(x @ wt) + (2 * x) @ wt


def test_merge_names_an_adapter_it_could_not_fold_even_when_fold_params_folded_part_of_it():
    x = torch.randn(2, 3, 4)
    cm = peftc.compile(SharedLayout(), peftc.IA3(target="w"), args=(x,), dynamic=False)
    with pytest.raises(PassError, match="no merge rule matched how `w_adapter.ia3_l`"):
        cm.merge()  # view(l) alone is parameter-only and folds; the scaling itself is still there


class MLP(nn.Module):
    def __init__(self, widths, bias):
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(i, o, bias=bias) for i, o in zip(widths, widths[1:]))

    def forward(self, x):
        for layer in self.layers:
            x = torch.tanh(layer(x))
        return x


@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(widths=st.lists(st.integers(2, 9), min_size=2, max_size=4), bias=st.booleans(), data=st.data())
def test_merge_parity_property_across_methods(widths, bias, data):
    """Any mix of DoRA, per-slice LoRA and IA3 on any layers merges to the plain op count with the same outputs."""
    torch.manual_seed(0)
    model, x = MLP(widths, bias).eval(), torch.randn(3, widths[0])
    n = len(widths) - 1
    layers = data.draw(st.lists(st.integers(0, n - 1), min_size=1, max_size=n, unique=True))
    rules = []
    for i in layers:
        method = data.draw(st.sampled_from(["dora", "slices", "ia3", "ia3-ff"]))
        out = widths[i + 1]
        if method == "dora":
            rules.append(peftc.LoRA(target=[f"layers.{i}"], r=data.draw(st.integers(1, 3)), use_dora=True))
        elif method == "slices":
            cut = data.draw(st.integers(1, out))
            slices = {"a": (0, cut)} if cut == out else {"a": (0, cut), "b": (cut, out)}
            rules.append(peftc.LoRA(target=[f"layers.{i}"], r=2, slices=slices))
        else:
            ff = [f"layers.{i}"] if method == "ia3-ff" else None
            rules.append(peftc.IA3(target=[f"layers.{i}"], feedforward=ff))
    cm = peftc.compile(copy.deepcopy(model), peftc.Spec(*rules), args=(x,), dynamic=False)
    randomize(cm, seed=len(widths))
    merged_checks(cm, (x,), model=model)
