"""OFT's and BOFT's remaining HF PEFT options against HF PEFT 0.21 with identical weights: COFT (coft, eps) in the
forward, in training and in the merge; BOFT's block dropout (eval parity, the train-time mask's support and
distribution, a merge without it); module_dropout as HF applies it; the config keys both ways; and the unmerged
ONNX export of the exact Cayley transform (a solve) in onnxruntime."""

from __future__ import annotations

import copy
import dataclasses
import itertools
import json
import warnings
from collections import Counter

import pytest
import torch
from torch import nn

import peftc
from conftest import ids, tiny_llama
from test_methods_hf import _ops, plain_ops
from test_methods_oft_hf import check_weight_rewrite, hf_boft_butterfly, load_same_weights  # noqa: F401 (fixture)

peft = pytest.importorskip("peft")

TARGETS = ["q_proj", "v_proj"]


def test_coft_matches_hf_forward_gradients_and_merge():
    """Weights outside COFT's ball: HF's forward projects them in place and rotates by the projection."""
    torch.manual_seed(0)
    options = dict(oft_block_size=8, coft=True, eps=0.5)
    cm = check_weight_rewrite(tiny_llama(num_hidden_layers=1), peftc.OFT(target=TARGETS, **options),
                              peft.OFTConfig(target_modules=TARGETS, r=0, **options), {"input_ids": ids()},
                              lambda o: o.logits, scale=0.3)
    for name, rows in cm.adapter_state_dict().items():  # each block's ‖Q‖_F = √2‖row‖ is now eps/√blocks
        norms = rows.norm(dim=1) * 2 ** 0.5
        torch.testing.assert_close(norms, torch.full_like(norms, 0.5 / rows.shape[0] ** 0.5))


def test_coft_trains_from_the_projected_weights_as_hf_does():
    """HF's forward writes the projection into the parameter, so each optimizer step starts from it; peftc
    projects in place before each call (Method.before_call), so three SGD steps leave HF's tensors."""
    torch.manual_seed(0)
    base = tiny_llama(num_hidden_layers=1).eval()
    options = dict(oft_block_size=8, coft=True, eps=0.05)
    cm = peftc.compile(copy.deepcopy(base), peftc.OFT(target=TARGETS, **options), kwargs={"input_ids": ids()}, dynamic=False)
    hf = peft.get_peft_model(copy.deepcopy(base), peft.OFTConfig(target_modules=TARGETS, r=0, **options))
    load_same_weights(cm, hf, scale=0.3)
    cm.train(), hf.train()
    models = [(cm, torch.optim.SGD([p for p in cm.parameters() if p.requires_grad], lr=0.5)),
              (hf, torch.optim.SGD([p for p in hf.parameters() if p.requires_grad], lr=0.5))]
    for _ in range(3):
        for model, optimizer in models:
            optimizer.zero_grad()
            model(input_ids=ids()).logits.square().mean().backward()
            optimizer.step()
    theirs = peft.get_peft_model_state_dict(hf)
    ours = cm.adapter_state_dict()
    for name, tensor in ours.items():
        torch.testing.assert_close(tensor, theirs["base_model.model." + name], atol=1e-6, rtol=1e-5)
    assert max(t.abs().max() for t in ours.values()) < 0.05  # projected, far from the initial 0.3·N(0, 1)


class OneLinear(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(8, 6, bias=False)

    def forward(self, x):
        return self.lin(x)


class FixedMask(nn.Module):
    """HF's dropout blend (1 - mask)·R + mask·I, with the mask given."""

    def __init__(self, mask):
        super().__init__()
        self.mask = mask

    def forward(self, r):
        return (1 - self.mask) * r + self.mask * torch.eye(r.shape[-1]).expand_as(r)


def test_boft_dropout_in_training_is_hf_block_dropout(hf_boft_butterfly):  # noqa: F811
    """2 factors of 4 blocks, p = 0.5: every training call sets int(0.5·4) = 2 blocks of one factor to the
    identity. The 12 masks give 12 weights (computed with HF's layer); each of peftc's training calls must be one
    of them (as each of HF's is), all 12 must occur, about equally often; eval calls use no mask."""
    torch.manual_seed(0)
    model = OneLinear()
    x = torch.eye(8)  # the output is the rotated weight
    options = dict(boft_block_size=2, boft_n_butterfly_factor=2, boft_dropout=0.5)
    cm = peftc.compile(copy.deepcopy(model), peftc.BOFT(target=["lin"], **options), kwargs={"x": x}, dynamic=False)
    hf = peft.get_peft_model(copy.deepcopy(model), peft.BOFTConfig(target_modules=["lin"], **options))
    load_same_weights(cm, hf, scale=0.5)
    layer = hf.base_model.model.lin
    candidates = []
    with torch.no_grad():
        for factor, blocks in itertools.product(range(2), itertools.combinations(range(4), 2)):
            mask = torch.zeros(2, 4, 1, 1)
            mask[factor, list(blocks)] = 1
            layer.boft_dropout["default"], dropout = FixedMask(mask), layer.boft_dropout["default"]
            candidates.append(hf(x))
            layer.boft_dropout["default"] = dropout
        candidates = torch.stack(candidates)
        undropped = hf.eval()(x)
        torch.testing.assert_close(cm.eval()(x=x), undropped, atol=1e-6, rtol=1e-6)
        assert (candidates - undropped).abs().flatten(1).amax(1).min() > 1e-3  # masks show in the output

        def which(y):
            distance = (candidates - y).abs().flatten(1).amax(1)
            assert (distance < 1e-5).sum() == 1, f"not one of HF's 12 dropout masks (closest {distance.min():.2e})"
            return int(distance.argmin())

        hf.train()
        for _ in range(24):
            which(hf(x))
        cm.train()
        counts = Counter(which(cm(x=x)) for _ in range(240))
    assert len(counts) == 12 and min(counts.values()) >= 5 and max(counts.values()) <= 40, counts


@pytest.mark.parametrize("case", ["oft", "boft"])
def test_peft_format_round_trips_the_options(case, tmp_path):
    """coft/eps/module_dropout and boft_dropout reach HF's adapter_config.json (HF loads ours to our outputs) and
    come back from HF's. OFT with module_dropout (which HF 0.21 never applies): a training call computes what HF's
    does. BOFT with dropout: eval is HF's, and a merge in training mode re-traces the rewrite without the dropout
    (not folding one random mask into the weights), to HF's merge."""
    torch.manual_seed(0)
    if case == "oft":
        options = dict(oft_block_size=8, coft=True, eps=0.25, module_dropout=0.1)
        with pytest.warns(UserWarning, match="module_dropout=0.1 has no effect"):
            rule = peftc.OFT(target=TARGETS, **options)
        config = peft.OFTConfig(target_modules=TARGETS, r=0, **options)
    else:
        options = dict(boft_block_size=4, boft_dropout=0.25)
        rule, config = peftc.BOFT(target=TARGETS, **options), peft.BOFTConfig(target_modules=TARGETS, **options)
    model = tiny_llama(num_hidden_layers=1).eval()
    x = ids()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # module_dropout's warning, again on every load
        cm = peftc.compile(copy.deepcopy(model), rule, kwargs={"input_ids": x}, dynamic=False)
        hf = peft.get_peft_model(copy.deepcopy(model), config).eval()
        load_same_weights(cm, hf)
        assert cm.save_pretrained(tmp_path / "ours") == "peft"
        saved = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
        assert {k: saved[k] for k in options} == options
        loaded = peft.PeftModel.from_pretrained(copy.deepcopy(model), str(tmp_path / "ours")).eval()
        assert {k: getattr(loaded.peft_config["default"], k) for k in options} == options
        hf.save_pretrained(str(tmp_path / "hf"))
        again = peftc.Spec.from_peft(tmp_path / "hf").rules[0]
    assert again == dataclasses.replace(rule, target=again.target)
    with torch.no_grad():
        expected = hf(input_ids=x).logits
        assert (expected - model(input_ids=x).logits).abs().max() > 1e-3
        torch.testing.assert_close(cm(input_ids=x).logits, expected, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(loaded(input_ids=x).logits, expected, atol=1e-5, rtol=1e-5)
        if case == "oft":
            torch.testing.assert_close(cm.train()(input_ids=x).logits, hf.train()(input_ids=x).logits,
                                       atol=1e-5, rtol=1e-5)
            return
        merged = cm.train().merge()
        assert merged.counters["merge-reparam.untrained-boft"] == 2
        torch.testing.assert_close(merged(input_ids=x).logits, hf.merge_and_unload()(input_ids=x).logits,
                                   atol=1e-5, rtol=1e-5)
    assert _ops(merged.graph_module) == plain_ops(model, {"input_ids": x})


def test_solve_by_elimination_is_linalg_solve():
    from peftc.lower.onnx_solve import solve_by_elimination, solve_ex

    torch.manual_seed(0)
    q = torch.randn(6, 16, 16)
    q = q - q.mT
    eye = torch.eye(16).expand_as(q)
    torch.testing.assert_close(solve_ex(eye + q, eye - q, left=False)[0],
                               torch.linalg.solve(eye + q, eye - q, left=False), atol=1e-5, rtol=1e-5)
    a, b = torch.linalg.qr(torch.randn(3, 5, 5))[0], torch.randn(3, 5, 2)  # orthogonal: pivots, well conditioned
    torch.testing.assert_close(solve_by_elimination(a, b), torch.linalg.solve(a, b), atol=1e-5, rtol=1e-5)
    swap = torch.tensor([[0.0, 2.0], [1.0, 0.0]])  # a zero first pivot: only row pivoting solves it
    torch.testing.assert_close(solve_by_elimination(swap, torch.eye(2)), torch.linalg.inv(swap))


class TwoLinears(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(8, 8), nn.Linear(8, 6)

    def forward(self, x):
        return self.b(torch.tanh(self.a(x)))


@pytest.fixture(scope="module")
def exact_cayley_model():
    """Exact-Cayley OFT with COFT on `a`, two-factor BOFT with block dropout on `b`: both solve."""
    torch.manual_seed(0)
    model, x = TwoLinears().eval(), torch.randn(2, 5, 8)
    cm = peftc.compile(copy.deepcopy(model), peftc.Spec(
        peftc.OFT(target=["a"], oft_block_size=4, use_cayley_neumann=False, coft=True, eps=0.5),
        peftc.BOFT(target=["b"], boft_block_size=2, boft_n_butterfly_factor=2, boft_dropout=0.5)), kwargs={"x": x})
    cm.load_adapter_state_dict({k: torch.randn_like(v) * 0.5 + k.endswith("boft_s")
                                for k, v in cm.adapter_state_dict().items()})
    with torch.no_grad():
        assert (cm(x=x) - model(x)).abs().max() > 1e-2
    assert {n.target for n in cm.method_graph_for(x=x).graph.nodes} >= {torch.ops.aten._linalg_solve_ex.default}
    return cm


@pytest.mark.parametrize("merged", [False, True])
def test_exact_cayley_exports_to_onnx(exact_cayley_model, merged, tmp_path):
    """Unmerged: the solves lower as an unrolled elimination in standard ONNX ops (no contrib op); export_onnx
    verifies the file in onnxruntime against eager on two shapes and raises past its tolerance."""
    pytest.importorskip("onnxruntime")
    import onnx

    report = exact_cayley_model.export_onnx(tmp_path / "m.onnx", merged=merged)
    assert report.max_abs_diff <= 1e-5
    domains = {n.domain for n in onnx.load(str(tmp_path / "m.onnx")).graph.node}
    assert domains <= {"", "ai.onnx"}, domains
    if not merged:
        with pytest.raises(peftc.ExportError, match="LoRA A/B only"):
            exact_cayley_model.export_onnx(tmp_path / "inputs.onnx", merged=False, adapters="inputs")


def test_only_coft_runs_a_hook_before_each_call():
    """The projection is decided at compile time: OFT without coft adds no per-call work."""
    model, x = tiny_llama(num_hidden_layers=1), {"input_ids": ids()}
    plain = peftc.compile(copy.deepcopy(model), peftc.OFT(target=TARGETS, oft_block_size=8), kwargs=x, dynamic=False)
    coft = peftc.compile(copy.deepcopy(model), peftc.OFT(target=TARGETS, oft_block_size=8, coft=True), kwargs=x,
                         dynamic=False)
    assert plain._before_call == () and [type(r) for r in coft._before_call] == [peftc.OFT]
