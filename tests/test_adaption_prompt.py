"""Adaption prompts (HF PEFT's `adaption_prompt`, LLaMA-Adapter) against HF PEFT on tiny Llama (GQA) given its
weights, and against the paper's formula on GPT-2's attention (fused c_attn, no rotary embedding)."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F

import peftc
from conftest import ids, tiny_gpt2, tiny_llama
from peftc.passes.insert_adaption_prompt import InsertAdaptionPrompt
from peftc.pipeline import PassContext

peft = pytest.importorskip("peft")


def batch():
    x = ids()
    mask = torch.ones_like(x)
    mask[1, :3] = 0
    return dict(input_ids=x, attention_mask=mask, labels=x)


@pytest.mark.parametrize("layers", [1, 2])
def test_llama_matches_hf_adaption_prompt(layers):
    torch.manual_seed(0)
    base = tiny_llama().eval()
    kwargs = batch()
    hf = peft.get_peft_model(copy.deepcopy(base), peft.AdaptionPromptConfig(
        task_type="CAUSAL_LM", adapter_len=4, adapter_layers=layers)).eval()
    cm = peftc.compile(base, peftc.AdaptionPrompt(adapter_len=4, adapter_layers=layers), kwargs=kwargs, dynamic=False)
    assert cm.parameter_counts()[0] == sum(p.numel() for p in hf.parameters() if p.requires_grad)
    with torch.no_grad():  # the gate starts at zero
        torch.testing.assert_close(cm(**kwargs).logits, base(**kwargs).logits, atol=0, rtol=0)
    theirs = peft.get_peft_model_state_dict(hf)
    ours = cm.adapter_state_dict()
    assert {f"base_model.model.{k}": tuple(v.shape) for k, v in ours.items()} == \
        {k: tuple(v.shape) for k, v in theirs.items()}
    torch.manual_seed(1)
    weights = {k: torch.randn_like(v) for k, v in ours.items()}
    cm.load_adapter_state_dict(weights)
    peft.set_peft_model_state_dict(hf, {f"base_model.model.{k}": v for k, v in weights.items()})
    y, y_hf = cm(**kwargs), hf(**kwargs)
    assert (y.logits - base(**kwargs).logits).abs().max() > 1e-3
    torch.testing.assert_close(y.logits, y_hf.logits, atol=1e-5, rtol=1e-5)
    y.loss.backward()
    y_hf.loss.backward()
    hf_params = dict(hf.named_parameters())
    for name in ours:
        torch.testing.assert_close(cm.get_parameter(name).grad, hf_params[f"base_model.model.{name}"].grad,
                                   atol=1e-5, rtol=1e-4)
    gm = cm.method_graph_for(**kwargs)  # before prune-grads, which swaps SDPA for its own causal kernel
    code = gm.code
    result = InsertAdaptionPrompt(cm.spec.rules[0]).run(gm, PassContext(cm.params, cm._info, training=False))
    assert not result.modified and gm.code == code


def test_gpt2_attention_gets_the_papers_adaption_prompt():
    """Non-Llama attention: GPT-2's K and V are thirds of the fused c_attn; the prompt's attention output is added
    before c_proj (the paper's placement; HF PEFT's GPT-2 variant adds it after c_proj, unprojected)."""
    torch.manual_seed(0)
    base = tiny_gpt2().eval()
    kwargs = batch()
    cm = peftc.compile(base, peftc.AdaptionPrompt(adapter_len=3, adapter_layers=1), kwargs=kwargs, dynamic=False)
    assert set(cm.adapter_state_dict()) == {"transformer.h.1.attn.adaption_prompt", "transformer.h.1.attn.adaption_gate"}
    torch.manual_seed(1)
    weights = {k: torch.randn_like(v) for k, v in cm.adapter_state_dict().items()}
    cm.load_adapter_state_dict(weights)

    ref = copy.deepcopy(base)
    attn = ref.transformer.h[1].attn
    P, g = weights["transformer.h.1.attn.adaption_prompt"], weights["transformer.h.1.attn.adaption_gate"]
    H, heads = 32, 4
    d = H // heads

    def hook(module, args, kw, out):
        x = args[0] if args else kw["hidden_states"]
        q = module.c_attn(x).split(H, dim=2)[0]
        _, k, v = module.c_attn(P).split(H, dim=2)
        split = lambda t: t.view(t.shape[0], t.shape[1], heads, d).transpose(1, 2)  # noqa: E731
        q, k, v = split(q), split(k), split(v)
        extra = (g * F.softmax(q @ k.transpose(2, 3) / math.sqrt(d), dim=-1)) @ v
        extra = extra.transpose(1, 2).reshape(x.shape[0], x.shape[1], H)
        return (out[0] + extra @ module.c_proj.weight, *out[1:])  # c_proj without its bias: the bias is added once
    attn.register_forward_hook(hook, with_kwargs=True)
    with torch.no_grad():
        torch.testing.assert_close(cm(**kwargs).logits, ref(**kwargs).logits, atol=1e-5, rtol=1e-5)
        assert (cm(**kwargs).logits - base(**kwargs).logits).abs().max() > 1e-3


def test_too_many_layers_is_a_spec_error():
    with pytest.raises(peftc.SpecError, match="adapter_layers=3"):
        peftc.compile(tiny_llama(), peftc.AdaptionPrompt(adapter_len=2, adapter_layers=3),
                      kwargs=dict(input_ids=ids()), dynamic=False)


def test_peft_format_both_ways(tmp_path):
    torch.manual_seed(0)
    base = tiny_llama().eval()
    kwargs = batch()
    cm = peftc.compile(base, peftc.AdaptionPrompt(adapter_len=4, adapter_layers=2), kwargs=kwargs, dynamic=False)
    torch.manual_seed(1)
    cm.load_adapter_state_dict({k: torch.randn_like(v) for k, v in cm.adapter_state_dict().items()})
    assert cm.save_pretrained(tmp_path / "ours") == "peft"
    hf = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path / "ours")).eval()
    with torch.no_grad():
        y = cm(**kwargs).logits
        torch.testing.assert_close(hf(**kwargs).logits, y, atol=1e-5, rtol=1e-5)
        hf.save_pretrained(str(tmp_path / "theirs"))
        again = peftc.compile(base, tmp_path / "theirs", kwargs=kwargs, dynamic=False)
        assert again.spec.rules == (peftc.AdaptionPrompt(adapter_len=4, adapter_layers=2, target="self_attn"),)
        torch.testing.assert_close(again(**kwargs).logits, y, atol=1e-5, rtol=1e-5)
