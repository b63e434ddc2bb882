"""ONNX lowering: adapters as inputs switched per call in one onnxruntime session, verification, atomic writes."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

import peftc
from peftc.lower import onnx as lower_onnx

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
from tiny_models import tiny_llama, tiny_mlp  # noqa: E402

TOL = 1e-4


def _session(path) -> ort.InferenceSession:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    opts.log_severity_level = 3
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def _close(got: np.ndarray, ref: torch.Tensor) -> float:
    ref = ref.detach().numpy()
    diff = float(np.abs(got - ref).max())
    assert diff <= TOL * max(1.0, float(np.abs(ref).max())), diff
    return diff


def _train(cm, kwargs, seed: int, steps: int = 3) -> dict[str, torch.Tensor]:
    """A few SGD steps on random next-token targets; returns the trained adapter."""
    gen = torch.Generator().manual_seed(seed)
    ids = kwargs["input_ids"]
    targets = torch.randint(0, 64, ids.shape, generator=gen)
    opt = torch.optim.SGD(cm.trainable_parameters(), lr=0.5)
    cm.train()
    for _ in range(steps):
        logits = cm(**kwargs).logits
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
    cm.eval()
    return {k: v.clone() for k, v in cm.adapter_state_dict().items()}


@pytest.fixture(scope="module")
def llama():
    model, kwargs = tiny_llama()
    cm = peftc.compile(model, peftc.LoRA(target="q_proj|v_proj", r=4, alpha=8), kwargs=kwargs)
    gen = torch.Generator().manual_seed(0)
    # B != 0, so the export's own verification (ORT fed this adapter vs eager) checks the LoRA path.
    cm.load_adapter_state_dict({k: torch.randn(v.shape, generator=gen) * 0.2
                                for k, v in cm.adapter_state_dict().items()})
    return model, kwargs, cm


@pytest.fixture(scope="module")
def adapter_inputs_onnx(llama, tmp_path_factory):
    """The tiny Llama exported once with LoRA A / scaled B as graph inputs."""
    _, _, cm = llama
    path = tmp_path_factory.mktemp("onnx") / "base.onnx"
    report = cm.export_onnx(path, merged=False, adapters="inputs")
    return path, report


def test_one_session_serves_two_trained_adapters(llama, adapter_inputs_onnx, tmp_path):
    model, kwargs, cm = llama
    path, report = adapter_inputs_onnx
    init = {k: v.clone() for k, v in cm.adapter_state_dict().items()}
    first = _train(cm, kwargs, seed=1)
    cm.load_adapter_state_dict(init)
    second = _train(cm, kwargs, seed=2)
    assert any(not torch.equal(first[k], second[k]) for k in first)
    assert sorted(report.adapter_inputs) == sorted(first)
    assert report.max_abs_diff is not None and len(report.shapes_checked) == 2

    sess = _session(path)
    ids = kwargs["input_ids"].numpy()
    outputs = {}
    for name, adapter in (("first", first), ("second", second)):
        cm.load_adapter_state_dict(adapter)
        cm.export_onnx_adapter(tmp_path / f"{name}.onnx_adapter", onnx_model=path)
    for name, adapter in (("second", second), ("first", first), ("second", second)):  # switch back and forth
        lora = ort.LoraAdapter()
        lora.Load(str(tmp_path / f"{name}.onnx_adapter"))
        options = ort.RunOptions()
        options.add_active_adapter(lora)
        got = sess.run(None, {"input_ids": ids}, options)[0]
        cm.load_adapter_state_dict(adapter)
        with torch.no_grad():
            _close(got, cm(**kwargs).logits)
        outputs[name] = got
    assert np.abs(outputs["first"] - outputs["second"]).max() > 1e-3  # the adapters really differ

    # No adapter active: the zero defaults make it the base model.
    with torch.no_grad():
        base = model(**kwargs).logits
    got = sess.run(None, {"input_ids": ids})[0]
    _close(got, base)
    assert np.abs(got - outputs["first"]).max() > 1e-3


def test_adapter_file_is_checked_against_the_model(llama, adapter_inputs_onnx, tmp_path):
    _, _, cm = llama
    path, _ = adapter_inputs_onnx
    mlp, (x,) = tiny_mlp()
    mlp_cm = peftc.compile(mlp, peftc.LoRA(target="up", r=2), (x,))
    mlp_path = tmp_path / "mlp.onnx"
    mlp_cm.export_onnx(mlp_path, merged=False, adapters="inputs", verify=False)
    with pytest.raises(peftc.AdapterError, match="is not an adapter input of .*mlp.onnx"):
        cm.export_onnx_adapter(tmp_path / "bad.onnx_adapter", onnx_model=mlp_path)
    assert not (tmp_path / "bad.onnx_adapter").exists()

    expected = lower_onnx.read_adapter_inputs(path)
    tensors = lower_onnx.adapter_tensors(cm)
    lower_onnx.check_adapter(tensors, expected, "base.onnx")  # the model's own adapter fits
    name = "model.layers.0.self_attn.q_proj.lora_A.weight"
    with pytest.raises(peftc.AdapterError, match=r"lora_A.weight` is \(2, 32\) float32; .* expects \(4, 32\)"):
        lower_onnx.check_adapter({**tensors, name: tensors[name][:2]}, expected, "base.onnx")
    with pytest.raises(peftc.AdapterError, match="lacks"):
        lower_onnx.check_adapter({k: v for k, v in tensors.items() if "q_proj" not in k}, expected, "base.onnx")


def test_initializers_keep_parameter_names_and_values(llama, adapter_inputs_onnx):
    model, kwargs, cm = llama
    path, report = adapter_inputs_onnx
    proto = onnx.load(str(path))
    inits = {t.name: onnx.numpy_helper.to_array(t) for t in proto.graph.initializer}
    params = {p.name for p in cm.params if p.role != "buffer"}
    assert params <= set(inits), params - set(inits)  # every weight survives, under its own name
    for p in cm.params:
        if p.role == "base":
            np.testing.assert_array_equal(inits[p.name], p.tensor.detach().numpy())
        elif p.role == "adapter":  # overridable, zero by default
            assert p.name in {i.name for i in proto.graph.input} and not inits[p.name].any()
    assert report.nodes_optimized < report.nodes_exported
    dims = [d.dim_param for d in proto.graph.input[0].type.tensor_type.shape.dim]
    assert dims == ["batch", "sequence"]


def test_failed_verification_raises_with_numbers_and_writes_nothing(tmp_path):
    model, (x,) = tiny_mlp()
    path = tmp_path / "mlp.onnx"
    with pytest.raises(peftc.ExportError, match=r"max \|diff\| = .* > tolerance"):
        lower_onnx.export_module(model, (x,), {}, path, reference=lambda x: model(x) + 1.0)
    assert list(tmp_path.iterdir()) == []


def test_unwritable_directory_is_an_export_error(tmp_path):
    model, (x,) = tiny_mlp()
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(peftc.ExportError, match="cannot write"):
        lower_onnx.export_module(model, (x,), {}, blocker / "mlp.onnx")


def test_large_models_use_external_data(tmp_path, monkeypatch):
    monkeypatch.setattr(lower_onnx, "EXTERNAL_DATA_THRESHOLD", 0)
    model, (x,) = tiny_mlp()
    path = tmp_path / "mlp.onnx"
    report = lower_onnx.export_module(model, (x,), {}, path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mlp.onnx", "mlp.onnx.data"]
    assert report.file_bytes == sum(p.stat().st_size for p in tmp_path.iterdir())
    got = _session(path).run(None, {"x": x.numpy()})[0]
    _close(got, model(x))


def test_adapters_inputs_needs_unmerged(llama, tmp_path):
    _, _, cm = llama
    with pytest.raises(peftc.ExportError, match="merged=False"):
        cm.export_onnx(tmp_path / "x.onnx", adapters="inputs")
