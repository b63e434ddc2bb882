"""Regression tests for issue #13: every bad input is a clear PeftcError, adapter loads are checked and atomic,
first captures from several threads take turns, and the CLI's exits are one line."""

from __future__ import annotations

import json
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
import torch

import peftc
from peftc.cli import main
from peftc.lower.onnx import _save_atomic

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "examples"))
from tiny_models import tiny_mlp  # noqa: E402

MLP = f"{ROOT}/examples/tiny_models.py:tiny_mlp"
MLP_PIPELINE = "insert-lora{r=2,target=up}"


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def one_line_error(err: str) -> str:
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("peftc: error: "), err
    return lines[0]


@pytest.fixture(scope="module")
def mlp():
    model, args = tiny_mlp()
    return peftc.compile(model, peftc.LoRA(target="up|down", r=2), args), args


# ---- 1, 2: spec files ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("suffix, text, needle", [
    (".toml", b"\xff", "not UTF-8 text (byte 0xff at offset 0)"),
    (".json", b'{"lora": [{"target": "q\xe9"}]}', "not UTF-8 text (byte 0xe9"),
    (".json", b"[" * 100_000, "nested too deeply"),
    (".toml", b"lora = " + b"[" * 100_000, "nested too deeply"),
    (".json", b'{"lora": {"r": ' + b"1" * 5000 + b"}}", "invalid JSON: Exceeds the limit"),
])
def test_unreadable_spec_files_name_the_file(tmp_path, capsys, suffix, text, needle):
    path = tmp_path / f"spec{suffix}"
    path.write_bytes(text)
    with pytest.raises(peftc.SpecError, match="^" + str(path).replace(".", r"\.")) as e:
        peftc.Spec.load(path)
    assert needle in str(e.value)
    code, _, err = run(capsys, "compile", MLP, "--spec", str(path), "-o", str(tmp_path / "o.onnx"))
    assert code == 2 and str(path) in one_line_error(err) and needle in err


# ---- 3, 6: regexes -------------------------------------------------------------------------------------------
HOSTILE = {"a{4294967296}": "a repeat count or group is too large", "(" * 5000 + ")" * 5000: "nested too deeply"}


@pytest.mark.parametrize("pattern, reason", HOSTILE.items(), ids=["overflow", "recursion"])
@pytest.mark.parametrize("build, key", [
    (lambda p: peftc.LoRA(target=p), "`target`"),
    (lambda p: peftc.LoRA(target="q", exclude=p), "`exclude`"),
    (lambda p: peftc.LoRA(target="q", rank_pattern={p: 2}), "`rank_pattern` key"),
    (lambda p: peftc.LoRA(target="q", alpha_pattern={p: 2.0}), "`alpha_pattern` key"),
    (lambda p: peftc.IA3(target="q", feedforward=p), "`feedforward`"),
    (lambda p: peftc.SparseDelta(target=p), "`target`"),
    (lambda p: peftc.Prefix(target=p), "`target`"),
    (lambda p: peftc.BitFit(exclude=p), "`exclude`"),
])
def test_hostile_regexes_are_spec_errors(build, key, pattern, reason):
    with pytest.raises(peftc.SpecError) as e:
        build(pattern)
    assert key in str(e.value) and reason in str(e.value) and len(str(e.value)) < 400


def test_hostile_regex_in_a_spec_file_is_exit_2(tmp_path, capsys):
    path = tmp_path / "spec.json"
    path.write_text(json.dumps({"lora": [{"target": "q", "rank_pattern": {"a{4294967296}": 2}}]}))
    code, _, err = run(capsys, "compile", MLP, "--spec", str(path), "-o", str(tmp_path / "o.onnx"))
    assert code == 2 and "`rank_pattern` key 'a{4294967296}'" in one_line_error(err) and str(path) in err


def test_global_flags_inside_pattern_keys_fail_when_the_spec_is_built():
    with pytest.raises(peftc.SpecError, match=r"`rank_pattern` key '\(\?i\)q_proj' .*global flags.*\(\?i:\.\.\.\)"):
        peftc.LoRA(target="q_proj", rank_pattern={"(?i)q_proj": 2})
    assert peftc.LoRA(target="q_proj", rank_pattern={"(?i:Q_PROJ)": 2}).rank_for("layers.0.q_proj") == 2
    assert peftc.LoRA(target="(?i)Q_PROJ").target == "(?i)Q_PROJ"  # a target is matched alone: flags are fine


# ---- 4: unknown constructor keywords -------------------------------------------------------------------------
@pytest.mark.parametrize("build, message", [
    (lambda: peftc.LoRA(target="q_proj", lora_alpha=16), "LoRA: unknown key `lora_alpha`; did you mean alpha?"),
    (lambda: peftc.LoRA(target_modules="q_proj"), "LoRA: unknown key `target_modules`; did you mean target?"),
    (lambda: peftc.LoRA(target="q", dropot=0.1), "LoRA: unknown key `dropot`; did you mean dropout?"),
    (lambda: peftc.IA3(target="q", feedforward_modules="q"), "IA3: unknown key `feedforward_modules`; did you"),
    (lambda: peftc.Prefix(num_virtual_tokens=4), "Prefix: unknown key `num_virtual_tokens`"),
    (lambda: peftc.LoRA("q", *[None] * 40), "positional arguments"),  # more than LoRA has fields
    (lambda: peftc.LoRA("q", target="k"), "`target` is given both by position and by name"),
])
def test_unknown_constructor_keywords_get_the_spec_file_hint(build, message):
    with pytest.raises(peftc.SpecError) as e:
        build()
    assert message in str(e.value)


def test_constructor_and_spec_file_give_the_same_hint(tmp_path):
    path = tmp_path / "s.toml"
    path.write_text('[[lora]]\ntarget = "q"\nlora_alpha = 16\n')
    with pytest.raises(peftc.SpecError, match="unknown key `lora_alpha`; did you mean alpha?"):
        peftc.Spec.load(path)


# ---- 5: scalings -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kwargs, needle", [
    ({"alpha_pattern": {"q_proj": float("nan")}}, "`alpha_pattern['q_proj']` must be a positive number"),
    ({"alpha_pattern": {"q_proj": float("inf")}}, "`alpha_pattern['q_proj']` must be a positive number"),
    ({"alpha": 1e308, "r": 1}, "gives scaling 1e+308, which float32 adapters cannot hold (it would be inf)"),
    ({"alpha": 1e-300}, "(it would be denormal or 0)"),
    ({"alpha": 1e39, "rank_pattern": {"q": 1}, "r": 8}, "with `r` (rank_pattern['q']) = 1"),
    ({"alpha": 10 ** 400}, "`alpha` must be a positive number"),
    ({"r": 10 ** 400}, "`r` = 1000"),
    ({"rank_pattern": {"q": 2 ** 64}}, "`rank_pattern['q']` must be a positive integer rank"),
])
def test_non_finite_scalings_are_rejected(kwargs, needle):
    with pytest.raises(peftc.SpecError) as e:
        peftc.LoRA(target="q_proj", **kwargs)
    assert needle in str(e.value)


def test_the_largest_float32_scaling_still_builds():
    assert peftc.LoRA(target="q", alpha=1e38, r=1).scaling == 1e38
    assert peftc.LoRA(target="q", r={"a": 1, "b": 100}, alpha={"a": 1e38, "b": 1e-35},
                      slices={"a": (0, 4), "b": (4, 8)}).scaling_for("m", "b") == pytest.approx(1e-37)


# ---- sizes, seeds, slices (the "Also" items) ------------------------------------------------------------------
def test_huge_sizes_say_what_was_asked_for():
    model, args = tiny_mlp()
    with pytest.raises(peftc.PassError) as e:
        peftc.compile(model, peftc.LoRA(target="up", r=10 ** 12), args)
    assert "cannot allocate adapter `up.lora_A.weight`: it would be a [1000000000000, 16] float32 tensor " \
           "(64.0 TB)" in str(e.value) and "DefaultCPUAllocator" not in str(e.value)
    with pytest.raises(peftc.SpecError, match="`length` = 1180591620717411303424 is larger than any tensor"):
        peftc.PromptTuning(length=2 ** 70)
    with pytest.raises(peftc.SpecError, match=r"`seed` must be an integer in \[0, 2\*\*32\), got 1180591620717"):
        peftc.SparseDelta(target="w", seed=2 ** 70)


def test_slice_errors_name_the_slices_key():
    with pytest.raises(peftc.SpecError, match="`slices` entry `q` must be"):
        peftc.LoRA(target="qkv", slices={"q": (4, 2)})
    with pytest.raises(peftc.SpecError, match="`slices` entries `q` and `v` overlap"):
        peftc.LoRA(target="qkv", slices={"q": (0, 4), "v": (2, 6)})
    with pytest.raises(peftc.SpecError, match="`slices` name '1q' must be an identifier"):
        peftc.LoRA(target="qkv", slices={"1q": (0, 4)})


# ---- 7: --memory-budget ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("budget, needle", [("9" * 400, "too large"), ("", "write a size such as 2GiB"),
                                            ("1e9", "write a size")])
def test_memory_budget_values_exit_2_on_one_line(tmp_path, capsys, budget, needle):
    code, _, err = run(capsys, "compile", MLP, "-p", MLP_PIPELINE, "-o", str(tmp_path / "o.onnx"),
                       "--memory-budget", budget)
    assert code == 2 and needle in one_line_error(err) and "--memory-budget" in err
    with pytest.raises(peftc.SpecError, match="too large"):
        peftc.compile(torch.nn.Linear(2, 2), peftc.LoRA(), (torch.ones(2, 2),), memory_budget="9" * 400)


# ---- 9: staging directories ------------------------------------------------------------------------------------
def _tiny_onnx():
    import onnx_ir as ir

    x = ir.Value(name="x", shape=ir.Shape([2]), type=ir.TensorType(ir.DataType.FLOAT))
    node = ir.node("Relu", [x])
    node.outputs[0].name, node.outputs[0].type, node.outputs[0].shape = "y", x.type, x.shape
    graph = ir.Graph([x], node.outputs, nodes=[node], opset_imports={"": 18})
    return ir.Model(graph, ir_version=9)


def test_staging_cannot_pass_for_output_and_stale_ones_are_removed(tmp_path):
    import subprocess

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True).stdout.strip()
    stale = tmp_path / f".peftc-staging-{dead}-abc"
    stale.mkdir()
    (stale / "m.onnx.unverified").write_bytes(b"partial")
    live = tmp_path / ".peftc-staging-1-xyz"  # pid 1 is always running: another export in progress
    live.mkdir()
    seen = []

    def check(staged: Path) -> None:
        seen.append(staged)
        assert staged.name == "m.onnx.unverified" and staged.parent.name.startswith(".peftc-staging-")
        assert not (tmp_path / "m.onnx").exists()

    _save_atomic(_tiny_onnx(), tmp_path / "m.onnx", check)
    assert seen and sorted(p.name for p in tmp_path.iterdir()) == [".peftc-staging-1-xyz", "m.onnx"]

    def failing(staged: Path) -> None:
        raise peftc.ExportError("disagrees")

    (tmp_path / "m.onnx").write_bytes(b"previous")
    with pytest.raises(peftc.ExportError):
        _save_atomic(_tiny_onnx(), tmp_path / "m.onnx", failing)
    assert (tmp_path / "m.onnx").read_bytes() == b"previous" and live.is_dir()
    assert sorted(p.name for p in tmp_path.iterdir()) == [".peftc-staging-1-xyz", "m.onnx"]


# ---- 10: load_adapter_state_dict -------------------------------------------------------------------------------
def _bad_entries(sd):
    key = "down.lora_B.weight"
    shape = sd[key].shape
    yield "meta", {**sd, key: torch.empty(shape, device="meta")}, f"`{key}` is a meta tensor"
    for dtype in (torch.bool, torch.int64, torch.complex64):
        yield str(dtype), {**sd, key: torch.ones(shape, dtype=dtype)}, f"`{key}` has dtype {dtype}"
    for value in (float("nan"), float("inf")):
        t = torch.ones(shape)
        t[0, 0] = value
        yield str(value), {**sd, key: t}, f"`{key}` contains NaN or inf values"
    yield "f64 beyond f32", {**sd, key: torch.full(shape, 1e300, dtype=torch.float64)}, "beyond the range"
    yield "ndarray", {**sd, key: np.zeros(tuple(shape), np.float32)}, f"`{key}` is a numpy.ndarray, not a torch"
    yield "list", {**sd, key: [0.0]}, f"`{key}` is a builtins.list, not a torch.Tensor"
    yield "shape", {**sd, key: torch.ones(3)}, f"`{key}` has shape (3,); the model expects"
    yield "int key", {**sd, 1: torch.ones(2)}, "a key 1 of type int"
    yield "unknown", {**sd, "down.lora_C.weight": torch.ones(2)}, "unknown key `down.lora_C.weight`"
    yield "missing", {k: v for k, v in sd.items() if k != key}, f"is missing `{key}`"
    yield "a list", list(sd.items()), "must be a mapping"
    yield "None", None, "got NoneType"


def test_bad_adapter_state_dicts_change_nothing(mlp):
    cm, _ = mlp
    before = {k: v.clone() for k, v in cm.adapter_state_dict().items()}
    # every entry but the bad one holds new values: a half-done load would show
    fresh = {k: torch.full_like(v, 0.5) for k, v in before.items()}
    for name, state_dict, needle in _bad_entries(fresh):
        with pytest.raises(peftc.AdapterError) as e:
            cm.load_adapter_state_dict(state_dict)
        assert needle in str(e.value), name
        assert all(torch.equal(before[k], v) for k, v in cm.adapter_state_dict().items()), name


def test_other_float_dtypes_are_cast_to_the_adapter_dtype(mlp):
    cm, args = mlp
    before = {k: v.clone() for k, v in cm.adapter_state_dict().items()}
    try:
        half = {k: torch.full_like(v, 0.25, dtype=torch.bfloat16) for k, v in before.items()}
        cm.load_adapter_state_dict(half)
        for k, v in cm.adapter_state_dict().items():
            assert v.dtype == torch.float32 and torch.equal(v, torch.full_like(v, 0.25)), k
    finally:
        cm.load_adapter_state_dict(before)


# ---- 11: --adapter files -----------------------------------------------------------------------------------------
def _adapter_dir(tmp_path: Path, tensors=None, config=None, raw_weights: bytes | None = None) -> Path:
    from safetensors.torch import save_file

    d = tmp_path / "adapter"
    d.mkdir(exist_ok=True)
    if raw_weights is not None:
        (d / "adapter_model.safetensors").write_bytes(raw_weights)
    else:
        save_file(tensors, str(d / "adapter_model.safetensors"))
    if config is not None:
        (d / "adapter_config.json").write_text(config if isinstance(config, str) else json.dumps(config))
    return d


def _mlp_adapter(value: float = 0.1) -> dict[str, torch.Tensor]:
    return {"base_model.model.up.lora_A.weight": torch.full((2, 16), value),
            "base_model.model.up.lora_B.weight": torch.full((32, 2), value)}


@pytest.mark.parametrize("kind, needle", [
    ("corrupt", "adapter_model.safetensors is not a readable safetensors file"),
    ("json", "adapter_config.json is not valid JSON"),
    ("alpha", "`lora_alpha` must be a positive number, got 'eight'"),
    ("r", "`r` must be a positive integer, got '4'"),
    ("list", "must hold a JSON object, got list"),
    ("nan", "`up.lora_A.weight` contains NaN or inf values"),
    ("int", "`up.lora_B.weight` has dtype torch.int32"),
])
def test_bad_adapter_files_are_adapter_errors_naming_the_path(tmp_path, capsys, kind, needle):
    tensors, config, raw = _mlp_adapter(), {"r": 2, "lora_alpha": 8}, None
    if kind == "corrupt":
        raw = b"\x08\x00\x00\x00\x00\x00\x00\x00{garbage"
    elif kind == "json":
        config = '{"r": 2, "lora_alpha": '
    elif kind == "alpha":
        config = {"r": 2, "lora_alpha": "eight"}
    elif kind == "r":
        config = {"r": "4", "lora_alpha": 8}
    elif kind == "list":
        config = [1, 2]
    elif kind == "nan":
        tensors["base_model.model.up.lora_A.weight"][0, 0] = float("nan")
    elif kind == "int":
        tensors["base_model.model.up.lora_B.weight"] = torch.zeros(32, 2, dtype=torch.int32)
    d = _adapter_dir(tmp_path, tensors, config, raw)
    code, _, err = run(capsys, "compile", MLP, "-p", MLP_PIPELINE, "-o", str(tmp_path / "o.onnx"), "--adapter",
                       str(d), "-q")
    line = one_line_error(err)
    assert code == 2 and f"--adapter {d}" in line and needle in line
    assert not (tmp_path / "o.onnx").exists()


# ---- 13: first capture from several threads --------------------------------------------------------------------
def test_first_calls_from_several_threads_capture_once():
    model, (x,) = tiny_mlp()
    cm = peftc.compile(model, peftc.LoRA(target="up", r=2), (x,))
    cm.train()  # a new signature: the training graph is captured by whichever thread comes first
    barrier, errors, outs = threading.Barrier(4), [], []

    def first_call():
        barrier.wait()
        try:
            outs.append(cm(x))
        except Exception as e:  # noqa: BLE001  (the test reports it)
            errors.append(e)

    threads = [threading.Thread(target=first_call) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == [] and len(outs) == 4
    assert [len(g) for g in cm._graphs.values()] == [1, 1]  # eval graph + one training graph, not four
    for out in outs[1:]:
        torch.testing.assert_close(out, outs[0])


# ---- the CLI gaps ----------------------------------------------------------------------------------------------
def test_version_and_demo_help(capsys):
    code, out, _ = run(capsys, "--version")
    assert code == 0 and out.strip() == f"peftc {peftc.__version__}"
    code, out, _ = run(capsys, "demo", "--help")
    assert code == 0 and "training steps to run (default 50)" in out
    code, _, err = run(capsys, "demo", "--steps", "0")
    assert code == 2 and "argument --steps: 0 is less than 1" in one_line_error(err)


def test_factory_that_raises_is_named(tmp_path, capsys):
    factory = tmp_path / "fac.py"
    factory.write_text("def boom():\n    raise RuntimeError('factory boom')\n")
    code, _, err = run(capsys, "compile", f"{factory}:boom", "-p", MLP_PIPELINE, "-o", str(tmp_path / "o.onnx"))
    assert code == 1
    assert one_line_error(err) == f"peftc: error: MODEL '{factory}:boom': the factory raised RuntimeError: " \
                                  f"factory boom"


@pytest.mark.parametrize("argv, needle", [
    (["--inputs", "input_id"], "unknown input 'input_id'; did you mean input_ids?"),
    (["--inputs", "input_ids,input_ids"], "names an input twice"),
    (["--seq-len", "1"], "a size-1 dimension would be captured as fixed"),
    (["--batch", "x"], "'x' is not an integer"),
    (["--batch", "3"], "shape a model directory's example inputs; a factory returns its own"),
    (["--opset", "0"], "argument --opset: 0 is less than 1"),
])
def test_example_input_flags_are_checked(tmp_path, capsys, argv, needle):
    code, _, err = run(capsys, "compile", MLP, "-p", MLP_PIPELINE, "-o", str(tmp_path / "o.onnx"), *argv)
    assert code == 2 and needle in one_line_error(err)


@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory):
    from transformers import BertConfig, BertModel

    d = tmp_path_factory.mktemp("bert") / "model"
    torch.manual_seed(0)
    BertModel(BertConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=4, max_position_embeddings=32)).save_pretrained(d)
    return d


def test_model_directory_with_bert_inputs_shapes_and_opset(tmp_path, capsys, bert_dir):
    import onnx

    spec = tmp_path / "spec.toml"
    spec.write_text('[[lora]]\ntarget = "query|value"\nr = 2\n')
    out = tmp_path / "bert.onnx"
    code, stdout, err = run(capsys, "compile", str(bert_dir), "--spec", str(spec), "-o", str(out), "-q",
                            "--inputs", "input_ids,attention_mask,token_type_ids", "--seq-len", "6", "--batch", "3",
                            "--opset", "20")
    assert code == 0, err
    assert "inputs: input_ids, attention_mask, token_type_ids;" in stdout
    assert "verified against eager on 3x6, 4x9" in stdout
    assert {o.domain: o.version for o in onnx.load(str(out), load_external_data=False).opset_import}[""] == 20
    code, _, err = run(capsys, "compile", str(bert_dir), "--spec", str(spec), "-o", str(out), "--seq-len", "64")
    assert code == 2 and "max_position_embeddings is 32" in one_line_error(err)
    code, _, err = run(capsys, "compile", str(bert_dir), "--spec", str(spec), "-o", str(out), "--inputs",
                       "pixel_values")
    assert code == 2 and "forward takes no `pixel_values`" in one_line_error(err)


def test_an_interrupt_a_library_turned_into_another_error_still_exits_130(tmp_path, capsys):
    """Importing onnxruntime's extension during Ctrl-C raises "ImportError: initialization failed"."""
    import os
    import signal

    factory = tmp_path / "fac.py"
    factory.write_text("import os, signal\n\ndef f():\n    try:\n        os.kill(os.getpid(), signal.SIGINT)\n"
                       "    except KeyboardInterrupt:\n        raise ImportError('initialization failed')\n")
    handler = signal.getsignal(signal.SIGINT)
    code, _, err = run(capsys, "compile", f"{factory}:f", "-p", MLP_PIPELINE, "-o", str(tmp_path / "o.onnx"))
    assert code == 130 and err == "peftc: interrupted\n"
    assert signal.getsignal(signal.SIGINT) is handler  # main put the caller's handler back
    assert os.listdir(tmp_path) == ["fac.py"]


def test_integer_adapter_tensors_take_integer_values():
    """SparseDelta's index tensor is an int64 adapter entry: it loads integers, not floats."""
    model, args = tiny_mlp()
    cm = peftc.compile(model, peftc.SparseDelta(target="up.weight", density=0.25), args)
    sd = cm.adapter_state_dict()
    (index_key,) = [k for k, v in sd.items() if not v.is_floating_point()]
    with pytest.raises(peftc.AdapterError, match=f"`{index_key}` has dtype torch.float32; it holds integer indices"):
        cm.load_adapter_state_dict({**sd, index_key: sd[index_key].float()})
    cm.load_adapter_state_dict({k: v.clone() for k, v in sd.items()})  # its own state round-trips
