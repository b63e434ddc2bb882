"""A model compiled with dynamic=False: each shape gets a graph of its own, graph_for/method_graph_for pick the graph
of the shapes asked for, and ONNX export follows the compile (fixed shapes unless the model has dynamic ones)."""

import pytest
import torch
from torch import nn

import peftc
from tests.conftest import ids, tiny_llama


def test_graph_for_another_shape_is_the_graph_of_that_shape():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 4))
    cm = peftc.compile(model, peftc.LoRA(target="0", r=2), args=(torch.randn(2, 8),), dynamic=False)
    x2, x4 = torch.randn(2, 8), torch.randn(4, 8)
    two = cm.graph_for(x2)
    four = cm.graph_for(x4)
    assert four is not two and cm.graph_for(x2) is two and cm.graph_for(x4) is four
    torch.testing.assert_close(four(x4), cm(x4))
    assert cm.method_graph_for(x4) is not cm.method_graph_for(x2)
    torch.testing.assert_close(cm.method_graph_for(x4)(x4), model(x4))  # B = 0 at init: the base model


def test_export_follows_the_compile_and_refuses_dynamic_axes_it_cannot_give(tmp_path):
    torch.manual_seed(0)
    cm = peftc.compile(tiny_llama(num_hidden_layers=1).eval(), peftc.LoRA(target="q_proj|v_proj", r=2),
                       kwargs={"input_ids": ids()}, dynamic=False).eval()
    report = cm.export_onnx(tmp_path / "static.onnx", merged=False)
    assert report.max_abs_diff < 1e-4
    import onnx

    dims = onnx.load(str(tmp_path / "static.onnx")).graph.input[0].type.tensor_type.shape.dim
    assert [d.dim_value for d in dims] == list(ids().shape)  # the example's shape, no symbolic axis
    with pytest.raises(peftc.ExportError, match="compiled with dynamic=False"):
        cm.export_onnx(tmp_path / "dynamic.onnx", dynamic=True)
    assert not (tmp_path / "dynamic.onnx").exists()
