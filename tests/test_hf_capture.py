"""Capture of every keyword set the model accepts (`**kwargs` included), and calls under torch.autocast."""

import copy

import pytest
import torch

import peftc

from conftest import ids, tiny_llama

peft = pytest.importorskip("peft")


def lora_pair(seed=0, **config):
    """(cm, HF PEFT model) with the same base and the same non-zero adapter weights; both in training mode."""
    torch.manual_seed(seed)
    base = tiny_llama(num_hidden_layers=1, **config).train()
    hf = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(target_modules=["q_proj", "v_proj"], r=4,
                                                                  lora_alpha=8, lora_dropout=0.0))
    cm = peftc.compile(base, peftc.LoRA(target="q_proj|v_proj", r=4, alpha=8), kwargs={"input_ids": ids()})
    cm.train()
    torch.manual_seed(seed + 1)
    weights = {k: torch.randn_like(v) * 0.1 for k, v in cm.adapter_state_dict().items()}
    cm.load_adapter_state_dict(weights)
    peft.set_peft_model_state_dict(hf, {f"base_model.model.{k}": v for k, v in weights.items()})
    return cm, hf


def test_keywords_that_land_in_var_kwargs_are_captured():
    cm, hf = lora_pair()
    x, y = ids(), ids(seed=1)
    n = (y[:, 1:] != -100).sum()
    cases = [dict(labels=y, num_items_in_batch=n), dict(output_hidden_states=True), dict(return_dict=False)]
    for kw in cases:
        ours, theirs = cm(input_ids=x, **kw), hf(input_ids=x, **kw)
        if kw.get("return_dict") is False:
            assert isinstance(ours, tuple)
            torch.testing.assert_close(ours[0], theirs[0])
        elif "labels" in kw:  # a fused loss need not compute a training call's logits: compare the loss
            torch.testing.assert_close(ours.loss, theirs.loss)
        else:
            torch.testing.assert_close(ours.logits, theirs.logits)
    # num_items_in_batch changes what the loss divides by, as in the original model.
    half = cm(input_ids=x, labels=y, num_items_in_batch=n // 2).loss
    torch.testing.assert_close(half, hf(input_ids=x, labels=y, num_items_in_batch=n // 2).loss)
    torch.testing.assert_close(half, cm(input_ids=x, labels=y).loss * n / (n // 2))
    hidden = cm(input_ids=x, output_hidden_states=True).hidden_states
    assert len(hidden) == 2 and hidden[0].shape == (2, 8, 32)
    # Dynamic shapes survive: another batch and sequence size reuses the same graph.
    graphs = sum(len(g) for g in cm._graphs.values())
    x2 = ids(batch=3, seq=12)
    torch.testing.assert_close(cm(input_ids=x2, output_hidden_states=True).logits,
                               hf(input_ids=x2, output_hidden_states=True).logits)
    assert sum(len(g) for g in cm._graphs.values()) == graphs


def test_positional_inputs_with_var_kwargs_keep_their_names():
    from peftc.capture import capture
    from peftc.params import ParamTable

    model = tiny_llama(num_hidden_layers=1).eval()
    gm = capture(model, (ids(),), {"output_hidden_states": True, "use_cache": False}, ParamTable())
    assert [n.target for n in gm.graph.nodes if n.op == "placeholder"][0] == "input_ids"


def _autocast():
    return torch.autocast("cpu", dtype=torch.bfloat16)


def test_autocast_computes_what_the_original_computes_under_autocast():
    cm, hf = lora_pair()
    x, y = ids(), ids(seed=1)
    fp32 = hf(input_ids=x).logits
    with _autocast():
        theirs_logits = hf(input_ids=x).logits
        theirs = hf(input_ids=x, labels=y)
    own_tolerance = (theirs_logits.float() - fp32).abs().max().item()
    assert own_tolerance > 0  # autocast really ran in bf16

    outside_first = cm(input_ids=x).logits
    with _autocast():
        ours_logits = cm(input_ids=x).logits
        ours = cm(input_ids=x, labels=y)
    assert ours_logits.dtype == theirs_logits.dtype == torch.bfloat16
    assert (ours_logits.float() - theirs_logits.float()).abs().max().item() <= own_tolerance
    torch.testing.assert_close(ours.loss, theirs.loss, atol=own_tolerance, rtol=0)

    # Training under autocast: the adapters' gradients agree with the original's within its bf16 tolerance.
    ours.loss.backward()
    theirs.loss.backward()
    hf_grads = {n.removeprefix("base_model.model.").replace(".default", ""): p.grad
                for n, p in hf.named_parameters() if p.requires_grad}
    ours_grads = {n: p.grad for n, p in cm.named_parameters() if p.requires_grad}
    assert set(ours_grads) == set(hf_grads)
    for name, grad in ours_grads.items():
        err = ((grad - hf_grads[name]).norm() / hf_grads[name].norm()).item()
        assert err < 2e-2, name

    # Outside autocast, in the same process, calls still compute fp32, before and after the autocast capture.
    outside = cm(input_ids=x).logits
    assert outside.dtype == torch.float32
    torch.testing.assert_close(outside, fp32)
    torch.testing.assert_close(outside_first, fp32)
    torch.testing.assert_close(cm(input_ids=x, labels=y).loss, hf(input_ids=x, labels=y).loss)


def test_compiled_inside_autocast_still_computes_fp32_outside():
    torch.manual_seed(0)
    model = tiny_llama(num_hidden_layers=1).eval()
    reference = copy.deepcopy(model)
    with _autocast():
        cm = peftc.compile(model, peftc.LoRA(target="q_proj|v_proj", r=4), kwargs={"input_ids": ids()})
        inside = cm(input_ids=ids()).logits
        with torch.no_grad():
            torch.testing.assert_close(inside, reference(input_ids=ids()).logits)  # B = 0: the base model
    out = cm(input_ids=ids()).logits
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, reference(input_ids=ids()).logits)
