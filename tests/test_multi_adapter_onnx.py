"""Several loaded adapters ==> one adapters-as-inputs ONNX file plus one `.onnx_adapter` file per adapter, each
checked in onnxruntime against eager PyTorch with that adapter active (and against HF PEFT)."""

import numpy as np
import pytest
import torch

from peftc.errors import AdapterError
from peftc.lower import onnx as lower_onnx

from conftest import ids
from test_multi_adapter import Pair, logits

ort = pytest.importorskip("onnxruntime")


def test_one_onnx_file_serves_every_loaded_adapter(tmp_path):
    pair = Pair("llama", tmp_path, dynamic=True)
    cm = pair.cm
    cm.set_adapter(["x", "y"])  # whatever is active, the export is the compiled graph with its adapter inputs
    path = tmp_path / "model.onnx"
    report = cm.export_onnx(path, merged=False, adapters="inputs")
    assert cm.active_adapters == ["x", "y"]
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    x = ids(batch=3, seq=6, seed=5)  # another shape than the example inputs
    feeds = {"input_ids": x.numpy()}
    outputs = {}
    for name in ("default", "x", "y", "x"):  # "y" has a smaller rank: zero-padded to the inputs
        file = tmp_path / f"{name}.onnx_adapter"
        cm.export_onnx_adapter(file, onnx_model=path, name=name)
        got = sess.run(None, feeds, lower_onnx.run_options([file], path))[0]
        pair.set_adapter(name)
        with torch.no_grad():
            want = logits(cm(input_ids=x))
            hf = logits(pair.hf(input_ids=x))
        np.testing.assert_allclose(got, want.numpy(), atol=1e-4, rtol=1e-4)
        np.testing.assert_allclose(got, hf.numpy(), atol=1e-4, rtol=1e-4)
        outputs[name] = got
    assert sorted(report.adapter_inputs) == sorted(cm.adapter_state_dict())
    assert np.abs(outputs["x"] - outputs["y"]).max() > 1e-3 and np.abs(outputs["x"] - outputs["default"]).max() > 1e-3


def test_an_adapter_wider_than_the_inputs_is_refused(tmp_path):
    pair = Pair("llama", tmp_path, dynamic=True)
    big = {k: torch.zeros(v.shape[0] * (2 if ".lora_A." in k else 1), *v.shape[1:]) if ".lora_A." in k
           else torch.zeros(v.shape[0], v.shape[1] * 2) for k, v in pair.cm.adapter_state_dict().items()}
    import peftc.adapters as adapters

    adapters.register_adapter(pair.cm, "wide", pair.cm._adapter_bank.adapters["y"].spec, big)
    with pytest.raises(AdapterError, match="larger than the compiled input"):
        pair.cm.export_onnx_adapter(tmp_path / "wide.onnx_adapter", name="wide")
