"""OFT and BOFT (peftc/methods/), against HF PEFT with identical weights: same trainable count, same keys, outputs
and gradients, merge, and a merged graph with the plain capture's ops."""

from __future__ import annotations

import copy
import dataclasses
import json

import pytest
import torch

import peftc
from conftest import ids, tiny_gpt2, tiny_llama
from test_methods_hf import TinyCNN, _ops, hf_key, plain_ops

peft = pytest.importorskip("peft")


def load_same_weights(cm, hf, scale=0.3):
    """Random non-zero adapter weights into both models; returns HF's saved state (for key checks)."""
    hf_state = peft.get_peft_model_state_dict(hf)
    ours = cm.adapter_state_dict()
    assert {hf_key(k, hf_state): tuple(v.shape) for k, v in ours.items()} == \
        {k: tuple(v.shape) for k, v in hf_state.items()}
    torch.manual_seed(1)
    weights = {k: torch.randn_like(v) * scale for k, v in ours.items()}
    cm.load_adapter_state_dict(weights)
    peft.set_peft_model_state_dict(hf, {hf_key(k, hf_state): v for k, v in weights.items()})
    return hf_state


def check_weight_rewrite(base, rule, config, kwargs, out, prune_grads=False, hf_forward=True, scale=0.3):
    """A rewrite_weight method: identity at init, HF's outputs/grads (when HF's unmerged forward is its own
    merge: `hf_forward`), HF's merge, and merge = fold-params to the plain op count."""
    base = base.eval()
    cm = peftc.compile(base, rule, kwargs=kwargs, prune_grads=prune_grads, dynamic=False)
    hf = peft.get_peft_model(copy.deepcopy(base), config).eval()
    assert cm.parameter_counts()[0] == sum(p.numel() for p in hf.parameters() if p.requires_grad)
    with torch.no_grad():
        torch.testing.assert_close(out(cm(**kwargs)), out(base(**kwargs)), atol=1e-6, rtol=1e-6)
    hf_state = load_same_weights(cm, hf, scale)

    y_ours = out(cm(**kwargs))
    assert (y_ours - out(base(**kwargs))).abs().max() > 1e-3  # the adapter changes the outputs
    trained = [p.name for p in cm.params if p.trainable]
    y_ours.square().mean().backward()
    assert {n for n, p in cm.named_parameters() if p.grad is not None} == set(trained)
    if hf_forward:
        y_hf = out(hf(**kwargs))
        torch.testing.assert_close(y_ours, y_hf, atol=1e-5, rtol=1e-5)
        y_hf.square().mean().backward()
        hf_params = dict(hf.named_parameters())
        for name in trained:
            key = hf_key(name, hf_state)
            live = key.replace(".weight", ".default.weight") if key.endswith(".weight") else key + ".default"
            theirs = hf_params[live].grad
            torch.testing.assert_close(cm.get_parameter(name).grad, theirs, atol=1e-5, rtol=1e-4)

    merged = cm.merge()
    with torch.no_grad():
        y_merged = out(merged(**kwargs))
        y_hf_merged = out(hf.merge_and_unload()(**kwargs))
        torch.testing.assert_close(y_merged, y_hf_merged, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(y_merged, y_ours.detach(), atol=1e-5, rtol=1e-5)
    assert merged.counters["fold-params.folded"] > 0
    assert _ops(merged.graph_module) == plain_ops(base, kwargs)
    assert {n for n, _ in merged.named_parameters()} == {n for n, _ in base.named_parameters()}
    return cm


@pytest.mark.parametrize("options", [dict(oft_block_size=8),
                                     dict(r=2, oft_block_size=0, block_share=True, num_cayley_neumann_terms=3),
                                     dict(oft_block_size=4, use_cayley_neumann=False)])
def test_oft_llama_matches_hf(options):
    torch.manual_seed(0)
    targets = ["q_proj", "v_proj", "down_proj"]
    check_weight_rewrite(tiny_llama(num_hidden_layers=1), peftc.OFT(target=targets, **options),
                         peft.OFTConfig(target_modules=targets, **{"r": 0, **options}), {"input_ids": ids()},
                         lambda o: o.logits, prune_grads="block_share" in options)


def test_oft_block_size_is_adjusted_as_hf_adjusts_it():
    """in = 32 (q_proj), 64 (down_proj): block size 7 becomes 8 in both (the nearest divisor; 6 would tie and
    become 4, the lower one)."""
    torch.manual_seed(0)
    with pytest.warns(UserWarning, match="using 8"):
        cm = check_weight_rewrite(tiny_llama(num_hidden_layers=1), peftc.OFT(target=["q_proj", "down_proj"],
                                                                             oft_block_size=7),
                                  peft.OFTConfig(target_modules=["q_proj", "down_proj"], r=0, oft_block_size=7),
                                  {"input_ids": ids()}, lambda o: o.logits)
    assert cm.params["model.layers.0.self_attn.q_proj.oft_R.weight"].tensor.shape == (4, 28)


def test_oft_conv2d_matches_hf_merge():
    """HF PEFT 0.21's unmerged Conv2d OFT forward unfolds and refolds x (F.fold sums overlapping patches), which is
    not the identity at init and not its own merge; peftc computes what HF's merge computes, conv(x, W·BD(R)^T)."""
    torch.manual_seed(0)
    model = TinyCNN()
    model.c2 = torch.nn.Conv2d(8, 8, 3, padding=1)  # HF's OFT refuses dilation and groups
    check_weight_rewrite(model, peftc.OFT(target=["c1", "c2", "head"], oft_block_size=4),
                         peft.OFTConfig(target_modules=["c1", "c2", "head"], r=0, oft_block_size=4),
                         {"x": torch.randn(2, 4, 6, 6)}, lambda o: o, hf_forward=False)


def test_oft_rotation_is_orthogonal_with_exact_cayley():
    torch.manual_seed(0)
    cm = peftc.compile(tiny_llama(num_hidden_layers=1), peftc.OFT(target=["q_proj"], oft_block_size=8,
                                                                  use_cayley_neumann=False),
                       kwargs={"input_ids": ids()}, dynamic=False)
    rule = cm.spec.rules[0]
    name = "model.layers.0.self_attn.q_proj.oft_R.weight"
    site = peftc.Site("matmul", "q", "w", (32, 32), 32, 32, False, torch.float32)
    with torch.no_grad():
        cm.get_parameter(name).normal_()
        r = rule.rotations(site, {"oft_R.weight": cm.get_parameter(name)})
    torch.testing.assert_close(r @ r.transpose(1, 2), torch.eye(8).expand(4, 8, 8), atol=1e-5, rtol=0)


@pytest.mark.parametrize("options, message", [(dict(r=4, oft_block_size=8), "exactly one of"),
                                               (dict(coft=True, eps=0.0), "eps"),
                                               (dict(module_dropout=1.5), "module_dropout"),
                                               (dict(num_cayley_neumann_terms=0), "num_cayley_neumann_terms")])
def test_oft_refuses_what_it_cannot_do(options, message):
    with pytest.raises(peftc.SpecError, match=message):
        peftc.OFT(target=["q_proj"], **options)


def test_oft_refuses_grouped_convolutions():
    with pytest.raises(peftc.PeftcError, match="grouped"):
        peftc.compile(TinyCNN(), peftc.OFT(target=["c2"], oft_block_size=4), kwargs={"x": torch.randn(2, 4, 6, 6)}, dynamic=False)


@pytest.fixture
def hf_boft_butterfly(monkeypatch):
    """HF PEFT's BOFT on CPU drops to one butterfly factor (its block-diagonal kernel is a CUDA extension); this
    runs HF's own CUDA-path code with torch.block_diag standing in for the kernel, so factors > 1 are HF's too."""
    from peft.tuners.boft import layer

    class BlockDiag:
        @staticmethod
        def apply(r):
            return torch.stack([torch.block_diag(*blocks) for blocks in r])

    monkeypatch.setattr(layer, "get_fbd_cuda", lambda: True)
    monkeypatch.setattr(layer, "FastBlockDiag", BlockDiag)


@pytest.mark.parametrize("options", [dict(boft_block_size=4),
                                     dict(boft_block_num=4, boft_block_size=0, boft_n_butterfly_factor=2),
                                     dict(boft_block_size=2, boft_n_butterfly_factor=3)])
def test_boft_llama_matches_hf(options, hf_boft_butterfly):
    torch.manual_seed(0)
    targets = ["q_proj", "v_proj", "down_proj"]
    check_weight_rewrite(tiny_llama(num_hidden_layers=1), peftc.BOFT(target=targets, **options),
                         peft.BOFTConfig(target_modules=targets, **options), {"input_ids": ids()},
                         lambda o: o.logits, prune_grads=len(options) > 1)


def test_boft_butterfly_permutation_is_hf_peft_permutation():
    from peft.tuners.boft.layer import BOFTLayer

    from peftc.methods.boft import butterfly_gather

    for n, blocks, size, factors in [(32, 8, 4, 3), (64, 16, 4, 4), (48, 12, 4, 2), (64, 4, 16, 2)]:
        w = torch.arange(float(n))[None]
        for i in range(factors):
            perm = BOFTLayer.block_butterfly_perm(None, n, blocks // 2 ** i, size // 2, factors - 1)
            chunk = n // (blocks // 2 ** i)
            assert butterfly_gather(w, chunk, size // 2)[0].tolist() == w[0, perm].tolist()
            assert butterfly_gather(butterfly_gather(w, chunk, size // 2), chunk, size // 2, inverse=True).equal(w)


def test_boft_conv2d_matches_hf(hf_boft_butterfly):
    torch.manual_seed(0)
    model = TinyCNN()
    model.c2 = torch.nn.Conv2d(8, 8, 3, padding=1, stride=2)
    check_weight_rewrite(model, peftc.BOFT(target=["c1", "c2"], boft_block_size=2,
                                           boft_n_butterfly_factor=2),
                         peft.BOFTConfig(target_modules=["c1", "c2"], boft_block_size=2,
                                         boft_n_butterfly_factor=2),
                         {"x": torch.randn(2, 4, 6, 6)}, lambda o: o)


@pytest.mark.parametrize("options, message", [(dict(boft_block_num=4), "exactly one of"),
                                               (dict(boft_dropout=1.0), "boft_dropout"),
                                               (dict(boft_n_butterfly_factor=0), "positive")])
def test_boft_refuses_what_it_cannot_do(options, message):
    with pytest.raises(peftc.SpecError, match=message):
        peftc.BOFT(target=["q_proj"], **options)


def test_boft_refuses_a_layout_hf_refuses():
    with pytest.raises(peftc.SpecError, match="does not split"):
        peftc.compile(tiny_llama(num_hidden_layers=1), peftc.BOFT(target=["q_proj"], boft_block_size=8,
                                                                  boft_n_butterfly_factor=4),
                      kwargs={"input_ids": ids()}, dynamic=False)


FORMAT_CASES = {"oft": (peftc.OFT(target=["q_proj", "v_proj"], oft_block_size=8),
                        peft.OFTConfig(target_modules=["q_proj", "v_proj"], r=0, oft_block_size=8)),
                "boft": (peftc.BOFT(target="q_proj|down_proj", boft_block_size=4),
                         peft.BOFTConfig(target_modules=r".*\.(q_proj|down_proj)", boft_block_size=4))}


@pytest.mark.parametrize("case", list(FORMAT_CASES))
def test_peft_format_both_ways(case, tmp_path):
    """save_pretrained writes HF PEFT's format (PeftModel.from_pretrained reads it), and an adapter HF PEFT saved
    compiles (Spec.from_peft + load_adapter) to HF's outputs."""
    rule, config = FORMAT_CASES[case]
    torch.manual_seed(0)
    model = tiny_llama(num_hidden_layers=1).eval()
    x, x2 = ids(), ids(seed=3)
    cm = peftc.compile(copy.deepcopy(model), rule, kwargs={"input_ids": x}, dynamic=False)
    hf = peft.get_peft_model(copy.deepcopy(model), config).eval()
    load_same_weights(cm, hf)
    with torch.no_grad():
        ours = cm(input_ids=x2).logits
        assert cm.save_pretrained(tmp_path / "ours") == "peft"
        saved = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
        assert saved["peft_type"] == case.upper()
        torch.testing.assert_close(peft.PeftModel.from_pretrained(copy.deepcopy(model), str(tmp_path / "ours"))
                                   .eval()(input_ids=x2).logits, ours, atol=1e-5, rtol=1e-5)
        hf.save_pretrained(str(tmp_path / "hf"))
        again = peftc.compile(copy.deepcopy(model), tmp_path / "hf", kwargs={"input_ids": x}, dynamic=False)
        assert again.spec.rules[0] == dataclasses.replace(rule, target=again.spec.rules[0].target)
        torch.testing.assert_close(again(input_ids=x2).logits, hf(input_ids=x2).logits, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(again(input_ids=x2).logits, ours, atol=1e-5, rtol=1e-5)


def test_from_peft_refuses_what_the_method_does_not_read():
    with pytest.raises(peftc.SpecError, match="PEFT key `bias` = 'all' is not supported.*supported keys: .*coft"):
        peftc.Spec.from_peft(peft.OFTConfig(target_modules=["q_proj"], bias="all"))
    with pytest.raises(peftc.SpecError, match="target_modules is not set"):
        peftc.Spec.from_peft(peft.BOFTConfig())


@pytest.fixture(scope="module")
def oft_llama_with_weights():
    """One compile for both exports (export_onnx leaves the model as it was)."""
    pytest.importorskip("onnxruntime")
    torch.manual_seed(0)
    cm = peftc.compile(tiny_llama(num_hidden_layers=1).eval(), peftc.OFT(target=["q_proj", "v_proj"],
                                                                         oft_block_size=8),
                       kwargs={"input_ids": ids()})
    load_same_weights(cm, peft.get_peft_model(tiny_llama(num_hidden_layers=1),
                                              peft.OFTConfig(target_modules=["q_proj", "v_proj"], r=0,
                                                             oft_block_size=8)))
    return cm


@pytest.mark.parametrize("merged", [True, False])
def test_oft_exports_to_onnx(merged, oft_llama_with_weights, tmp_path):
    """Merged: the plain graph; unmerged: the rotation's slices, pads and Neumann series lower as they are."""
    oft_llama_with_weights.export_onnx(tmp_path / "m.onnx", merged=merged)  # verify=True: against cm in onnxruntime


def test_oft_on_gpt2_conv1d_rotates_the_input_side_of_its_in_out_weight():
    """HF PEFT's OFT refuses Conv1D; peftc rewrites GPT-2's (in, out) weight in its own layout: the result equals
    the model with W^T := (W^T BD(R)^T) written in, unmerged and merged."""
    from peftc.methods.oft import cayley, rotate_input_side, skew_symmetric

    torch.manual_seed(0)
    model = tiny_gpt2(n_layer=1).eval()
    x = ids()
    cm = peftc.compile(copy.deepcopy(model), peftc.OFT(target=["c_attn", "c_fc"], oft_block_size=8),
                       kwargs={"input_ids": x}, dynamic=False)
    torch.manual_seed(1)
    weights = {k: torch.randn_like(v) * 0.3 for k, v in cm.adapter_state_dict().items()}
    cm.load_adapter_state_dict(weights)
    reference = copy.deepcopy(model)
    with torch.no_grad():
        for name in ("transformer.h.0.attn.c_attn", "transformer.h.0.mlp.c_fc"):
            conv1d = reference.get_submodule(name)
            r = cayley(skew_symmetric(weights[f"{name}.oft_R.weight"], 8), True, 5)
            conv1d.weight.copy_(rotate_input_side(conv1d.weight.T, r).T)
        expected = reference(input_ids=x).logits
        torch.testing.assert_close(cm(input_ids=x).logits, expected, atol=1e-5, rtol=1e-5)
        merged = cm.merge()
        torch.testing.assert_close(merged(input_ids=x).logits, expected, atol=1e-5, rtol=1e-5)
    assert _ops(merged.graph_module) == plain_ops(model, {"input_ids": x})
