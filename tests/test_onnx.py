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
    # Keyword order differs from forward's (input_ids, attention_mask): ONNX inputs are matched by name.
    kwargs = {"attention_mask": torch.ones_like(kwargs["input_ids"]), "input_ids": kwargs["input_ids"]}
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
    feeds = {k: v.numpy() for k, v in kwargs.items()}
    outputs = {}
    for name, adapter in (("first", first), ("second", second)):
        cm.load_adapter_state_dict(adapter)
        cm.export_onnx_adapter(tmp_path / f"{name}.onnx_adapter", onnx_model=path)
    for name, adapter in (("second", second), ("first", first), ("second", second)):  # switch back and forth
        lora = ort.LoraAdapter()
        lora.Load(str(tmp_path / f"{name}.onnx_adapter"))
        options = ort.RunOptions()
        options.add_active_adapter(lora)
        got = sess.run(None, feeds, options)[0]
        cm.load_adapter_state_dict(adapter)
        with torch.no_grad():
            _close(got, cm(**kwargs).logits)
        outputs[name] = got
    assert np.abs(outputs["first"] - outputs["second"]).max() > 1e-3  # the adapters really differ

    # No adapter active: the zero defaults make it the base model.
    with torch.no_grad():
        base = model(**kwargs).logits
    got = sess.run(None, feeds)[0]
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


def test_merged_export_is_the_base_graph_with_merged_weights(llama, tmp_path):
    model, kwargs, cm = llama
    merged_path, base_path = tmp_path / "merged.onnx", tmp_path / "base.onnx"
    report = cm.export_onnx(merged_path)
    base = lower_onnx.export_module(model, (), dict(kwargs, use_cache=False), base_path, verify=False)
    assert report.nodes_optimized == base.nodes_optimized  # zero overhead: LoRA left no node behind
    assert report.rules == {"rsqrt-mul-to-div": 3}  # two RMSNorms in the layer, one at the end
    assert report.max_abs_diff <= report.tolerance and report.shapes_checked == ["2x8", "3x11"]

    proto = onnx.load(str(merged_path))
    inits = {t.name: onnx.numpy_helper.to_array(t) for t in proto.graph.initializer}
    base_names = {p.name for p in cm.params if p.role == "base"}
    assert base_names <= set(inits) and not any("lora" in name for name in inits)
    q = "model.layers.0.self_attn.q_proj"
    w, a, b = (cm.params[f"{q}.{t}"].tensor.detach() for t in ("weight", "lora_A.weight", "lora_B.weight"))
    np.testing.assert_allclose(inits[f"{q}.weight"], (w + 2.0 * b @ a).numpy(), atol=1e-6)

    opts = ort.SessionOptions()
    opts.optimized_model_filepath = str(tmp_path / "ort.onnx")
    opts.log_severity_level = 3
    sess = ort.InferenceSession(str(merged_path), opts, providers=["CPUExecutionProvider"])
    fused = [n.op_type for n in onnx.load(str(tmp_path / "ort.onnx")).graph.node]
    assert fused.count("SimplifiedLayerNormalization") == 3  # what rsqrt-mul-to-div is for
    ids = torch.randint(0, 64, (1, 5))  # batch 1 and a new length: the axes are dynamic
    with torch.no_grad():
        mask = torch.ones_like(ids)
        _close(sess.run(None, {"input_ids": ids.numpy(), "attention_mask": mask.numpy()})[0],
               cm(attention_mask=mask, input_ids=ids).logits)


class _Norms(torch.nn.Module):
    def forward(self, x):
        v = x.pow(2).mean(-1, keepdim=True) + 1e-6
        return x * torch.rsqrt(v), x * torch.reciprocal(v)  # only the first is x * rsqrt(v)


def test_rsqrt_mul_rule_fires_only_on_rsqrt(tmp_path):
    x = torch.randn(2, 3, 8)
    report = lower_onnx.export_module(_Norms(), (x,), {}, tmp_path / "norms.onnx")
    assert report.rules == {"rsqrt-mul-to-div": 1}
    ops = [n.op_type for n in onnx.load(str(tmp_path / "norms.onnx")).graph.node]
    assert ops.count("Div") == 1 and ops.count("Reciprocal") == 1 and ops.count("Sqrt") == 1


def test_run_options_activates_disjoint_adapters_and_refuses_overlaps(llama, adapter_inputs_onnx, tmp_path):
    _, kwargs, cm = llama
    path, _ = adapter_inputs_onnx
    tensors = lower_onnx.adapter_tensors(cm)
    q = {k: v for k, v in tensors.items() if "q_proj" in k}
    v = {k: t for k, t in tensors.items() if "v_proj" in k}
    lower_onnx.write_adapter(tmp_path / "q.onnx_adapter", q)
    lower_onnx.write_adapter(tmp_path / "v.onnx_adapter", v)
    lower_onnx.write_adapter(tmp_path / "all.onnx_adapter", tensors)
    # q and v together are the whole adapter: same output as eager with both.
    options = lower_onnx.run_options([tmp_path / "q.onnx_adapter", tmp_path / "v.onnx_adapter"], path)
    got = _session(path).run(None, {k: v.numpy() for k, v in kwargs.items()}, options)[0]
    with torch.no_grad():
        _close(got, cm(**kwargs).logits)
    with pytest.raises(peftc.AdapterError, match="both set `model.layers.0.self_attn.q_proj.lora_[AB].weight`"):
        lower_onnx.run_options([tmp_path / "q.onnx_adapter", tmp_path / "all.onnx_adapter"], path)
    lower_onnx.write_adapter(tmp_path / "bad.onnx_adapter", {**q, next(iter(q)): np.zeros((3, 32), np.float32)})
    with pytest.raises(peftc.AdapterError, match=r"is \(3, 32\) float32"):
        lower_onnx.run_options([tmp_path / "bad.onnx_adapter"], path)


def test_adapters_as_inputs_refuses_adapters_without_a_zero_no_op(tmp_path):
    model, (x,) = tiny_mlp()
    cm = peftc.compile(model, peftc.IA3(target="up"), (x,))
    with pytest.raises(peftc.ExportError, match="LoRA A/B only: `up.ia3_l.*no zero default"):
        cm.export_onnx(tmp_path / "ia3.onnx", merged=False, adapters="inputs")
    with pytest.raises(peftc.ExportError, match="LoRA A/B only"):
        cm.export_onnx_adapter(tmp_path / "ia3.onnx_adapter")
    assert list(tmp_path.iterdir()) == []
    report = cm.export_onnx(tmp_path / "ia3.onnx")  # merged: IA3 folds into the weight
    assert report.nodes_optimized == 7 and report.max_abs_diff <= report.tolerance
