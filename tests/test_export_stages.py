"""Exports read the method graph: a default-compiled model (prune-grads on) exports in every form, and no node a
training pass made reaches an export, whichever training passes the pipeline has."""

from __future__ import annotations

import pytest
import torch
from conftest import ids, tiny_bert, tiny_gpt2, tiny_llama
from test_onnx import _close, _session

import peftc
from peftc.capture import call_kwargs
from peftc.lower import onnx as lower_onnx

FORMS = [(True, None), (False, None), (False, "inputs")]


def _training_nodes(gm, pipeline) -> list[str]:
    """Nodes of `gm` made by one of the pipeline's training passes."""
    names = {p.name for p in pipeline.training.passes}
    return [n.name for n in gm.graph.nodes if n.meta.get("peftc.pass") in names]


def _llama():
    return tiny_llama(num_hidden_layers=1), "q_proj|v_proj", {"input_ids": ids(),
                                                              "attention_mask": torch.ones(2, 8, dtype=torch.long)}


def _gpt2():
    return tiny_gpt2(n_layer=1), "c_attn", {"input_ids": ids()}


def _bert():
    return tiny_bert(num_hidden_layers=1), "query|value", {"input_ids": ids(),
                                                           "attention_mask": torch.ones(2, 8, dtype=torch.long)}


@pytest.fixture(scope="module", params=[_llama, _gpt2, _bert], ids=["llama", "gpt2", "bert"])
def trained(request):
    """A model compiled with the default pipeline, in training mode, after one training step."""
    torch.manual_seed(0)
    model, target, kwargs = request.param()
    cm = peftc.compile(model.train(), peftc.LoRA(target=target, r=4, alpha=8, dropout=0.1), kwargs=kwargs)
    assert "prune-grads" in str(cm.pipeline.training)
    assert sum(v for k, v in cm.counters.items() if k.startswith("prune-grads.")) > 0  # it rewrote something
    args, _ = cm.example_inputs
    assert _training_nodes(cm.graph_for(*args, **kwargs), cm.pipeline)  # what the training step runs
    out = cm(**kwargs)
    out.logits.float().pow(2).mean().backward()
    torch.manual_seed(1)
    with torch.no_grad():
        for p in cm.trainable_parameters():
            p.uniform_(-0.3, 0.3)  # B = 0 would hide the adapter path from the verification
    return cm, kwargs


@pytest.mark.parametrize("merged,adapters", FORMS, ids=["merged", "unmerged", "adapters-as-inputs"])
def test_default_compiled_model_exports_in_every_form(trained, merged, adapters, tmp_path):
    cm, kwargs = trained
    path = tmp_path / "m.onnx"
    # Verified in onnxruntime against the compiled model. Static shapes: dynamic axes are test_onnx.py's subject.
    report = cm.export_onnx(path, merged=merged, adapters=adapters, dynamic=False)
    assert report.max_abs_diff <= report.tolerance and report.shapes_checked == ["2x8"]
    assert cm.training  # export put it in eval mode and back
    cm.eval()
    try:
        assert not _training_nodes(cm.method_graph_for(*cm.example_inputs[0], **kwargs), cm.pipeline)
        feeds = {k: v.numpy() for k, v in kwargs.items()}
        if adapters == "inputs":
            feeds.update(lower_onnx.adapter_tensors(cm))
        with torch.no_grad():
            _close(_session(path).run(None, feeds)[0], cm(**kwargs).logits)
    finally:
        cm.train()


def test_eval_mode_training_runs_training_passes_and_exports_without_them(tmp_path):
    """An eval-mode model still trains (frozen BatchNorm): its eval graph gets prune-grads, its export does not."""
    from test_prune_grads import patch_net

    model, kwargs = patch_net()
    cm = peftc.compile(model, peftc.LoRA(target="embed|head", r=2), kwargs=kwargs)
    assert not cm.training and cm.counters["prune-grads.frozen-batch-norm"] == 2
    assert cm.counters["prune-grads.frozen-conv"] == 2
    assert _training_nodes(cm.graph_module, cm.pipeline)
    report = cm.export_onnx(tmp_path / "unmerged.onnx", merged=False)
    assert report.max_abs_diff <= report.tolerance


def test_any_training_pass_stays_out_of_exports(tmp_path):
    """schedule-recompute (torch.utils.checkpoint) is as unexportable as prune-grads' autograd functions."""
    model, _, kwargs = _llama()
    cm = peftc.compile(model.eval(), None, kwargs=kwargs,
                       pipeline="insert-lora{r=4,target=q_proj|v_proj},prune-grads,schedule-recompute{blocks=1}")
    cm.train()
    served = cm.graph_for(**kwargs)
    assert any(n.target is torch.utils.checkpoint.checkpoint for n in served.graph.nodes)
    method = cm.method_graph_for(**kwargs)
    assert not _training_nodes(method, cm.pipeline) and str(cm.pipeline.training) == "prune-grads,schedule-recompute"
    torch.manual_seed(0)
    with torch.no_grad():  # method and training graphs compute the same thing
        assert torch.equal(cm(**kwargs).logits, method(**call_kwargs(model, kwargs)).logits)
    cm.eval()
    report = cm.export_onnx(tmp_path / "unmerged.onnx", merged=False)
    assert report.max_abs_diff <= report.tolerance
