"""P-tuning (HF PEFT's `p_tuning`) against HF PEFT given its prompt-encoder weights, MLP and LSTM, Llama and BERT."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch

import peftc
from conftest import ids, tiny_bert, tiny_llama

peft = pytest.importorskip("peft")

LENGTH = 3


def hf_call(pm, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "Position ids are not supported ..."
        return pm(**kwargs)


def check_parity(make, task_type, batch, encoder, **options):
    torch.manual_seed(0)
    base = make()
    config = peft.PromptEncoderConfig(task_type=task_type, num_virtual_tokens=LENGTH,
                                      encoder_reparameterization_type=encoder, **options)
    hf = peft.get_peft_model(copy.deepcopy(base), config)
    spec = peftc.Spec(peftc.PTuning(length=LENGTH, encoder=encoder, **options),
                      task_type="SEQ_CLS" if task_type == "SEQ_CLS" else None)
    cm = peftc.compile(base, spec, kwargs=batch)
    assert cm.parameter_counts()[0] == sum(p.numel() for p in hf.parameters() if p.requires_grad)
    theirs = hf.prompt_encoder.default.state_dict()
    ours = {k: v for k, v in cm.adapter_state_dict().items() if k.startswith("prompt_encoder.")}
    assert {k: tuple(v.shape) for k, v in ours.items()} == \
        {f"prompt_encoder.{k}": tuple(v.shape) for k, v in theirs.items()}
    head = {k: v for k, v in cm.adapter_state_dict().items() if not k.startswith("prompt_encoder.")}
    cm.load_adapter_state_dict({**head, **{f"prompt_encoder.{k}": v for k, v in theirs.items()}})
    hf.eval(), cm.eval()
    y, y_hf = cm(**batch), hf_call(hf, **batch)
    torch.testing.assert_close(y.logits, y_hf.logits, atol=1e-5, rtol=1e-5)
    y.loss.backward()
    y_hf.loss.backward()
    hf_params = dict(hf.prompt_encoder.default.named_parameters())
    for name in theirs:
        torch.testing.assert_close(cm.get_parameter(f"prompt_encoder.{name}").grad, hf_params[name].grad,
                                   atol=1e-5, rtol=1e-4)
    return cm


def llama_batch():
    x = ids()
    mask = torch.ones_like(x)
    mask[1, :2] = 0
    return dict(input_ids=x, attention_mask=mask, labels=x)


def bert_batch():
    x = ids()
    return dict(input_ids=x, attention_mask=torch.ones_like(x), token_type_ids=torch.zeros_like(x),
                labels=torch.tensor([0, 2]))


@pytest.mark.parametrize("encoder,options", [("MLP", dict(encoder_hidden_size=16)),
                                             ("LSTM", dict(encoder_hidden_size=8, encoder_num_layers=2))])
def test_llama_matches_hf_p_tuning(encoder, options):
    cm = check_parity(tiny_llama, "CAUSAL_LM", llama_batch(), encoder, **options)
    assert cm(**llama_batch()).logits.shape == (2, 8 + LENGTH, 64)


@pytest.mark.parametrize("encoder", ["MLP", "LSTM"])
def test_bert_sequence_classification_matches_hf_p_tuning(encoder):
    check_parity(tiny_bert, "SEQ_CLS", bert_batch(), encoder)


def test_peft_format_saves_the_encoded_prompt_and_loads_it_as_prompt_tuning(tmp_path):
    """HF PEFT saves a P-tuning adapter as its encoder's output and loads it (inference mode) as that prompt."""
    torch.manual_seed(0)
    base = tiny_llama().eval()
    kwargs = llama_batch()
    cm = peftc.compile(base, peftc.PTuning(length=LENGTH, encoder="LSTM", encoder_hidden_size=8), kwargs=kwargs)
    cm.eval()
    assert cm.save_pretrained(tmp_path / "ours") == "peft"
    hf = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path / "ours")).eval()
    with torch.no_grad():
        y = cm(**kwargs).logits
        torch.testing.assert_close(hf_call(hf, **kwargs).logits, y, atol=1e-5, rtol=1e-5)
        again = peftc.compile(base, tmp_path / "ours", kwargs=kwargs)
        assert again.spec.rules == (peftc.PromptTuning(length=LENGTH),)
        torch.testing.assert_close(again(**kwargs).logits, y, atol=1e-5, rtol=1e-5)
