"""The `peftc` CLI, in-process through peftc.cli.main (fast) plus one run of the installed console script."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch

from peftc.cli import main, parse_bytes

ROOT = Path(__file__).resolve().parents[1]
LLAMA = f"{ROOT}/examples/tiny_models.py:tiny_llama"
MLP = f"{ROOT}/examples/tiny_models.py:tiny_mlp"
MLP_PIPELINE = "insert-lora{r=2,target=up}"


@pytest.fixture
def spec(tmp_path) -> Path:
    path = tmp_path / "spec.toml"
    path.write_text('[[lora]]\ntarget = "q_proj|v_proj"\nr = 4\nalpha = 8\n')
    return path


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_line_error(err: str, *needles: str) -> None:
    lines = [ln for ln in err.splitlines() if ln.startswith("peftc: error:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    for needle in needles:
        assert needle in lines[0], lines[0]


def test_passes_lists_every_pass_with_options(capsys):
    code, out, _ = run(capsys, "passes")
    assert code == 0
    assert "insert-lora: y = matmul(x, W)" in out and "freeze-base:" in out
    assert "prune-grads [training stage: never exported]: " in out  # in every default pipeline
    assert "    r: int = 8" in out


def test_compile_factory_merged(capsys, tmp_path):
    out_path, adapter = tmp_path / "mlp.onnx", tmp_path / "mlp.onnx_adapter"
    code, out, err = run(capsys, "compile", MLP, "-p", MLP_PIPELINE, "-o", str(out_path), "--export-adapter", str(adapter), "--time-passes", "--print-ir-after-change",
                         "--memory-budget", "2GiB")
    assert code == 0, err
    assert out_path.is_file() and adapter.is_file()
    assert "verified against eager on 2x4x16, 3x7x16" in out
    assert "memory budget 2.00 GiB (2,147,483,648 bytes): no recomputation needed" in out
    assert "IR after #2 insert-lora" in out and "up_lora_A" in out
    assert "pass timings" in err and "✓ merging adapters" in err and "✓ verifying with onnxruntime" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mlp.onnx", "mlp.onnx_adapter"]
    assert "nodes: 7 exported -> 7 optimized" in out  # merged: 2 x (MatMul, Transpose W, Add bias) + Relu


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory):
    """A tiny Llama saved with save_pretrained, and a HF PEFT LoRA adapter for it (non-zero B), saved too."""
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    root = tmp_path_factory.mktemp("hf")
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                         num_key_value_heads=4, vocab_size=64, max_position_embeddings=64)
    LlamaForCausalLM(config).save_pretrained(root / "model")
    peft_model = get_peft_model(LlamaForCausalLM.from_pretrained(root / "model"),
                                LoraConfig(target_modules=["q_proj", "v_proj"], r=4, lora_alpha=8))
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.2)
    peft_model.save_pretrained(root / "adapter")
    return root / "model", root / "adapter", peft_model.eval()


def test_compile_hf_directory_with_peft_adapter_matches_peft(capsys, spec, tmp_path, hf_dirs):
    """A save_pretrained model dir + a HF PEFT adapter dir ==> ORT with the adapter file == PEFT eager."""
    model_dir, adapter_dir, peft_model = hf_dirs
    out_path, adapter = tmp_path / "m.onnx", tmp_path / "m.onnx_adapter"
    code, out, err = run(capsys, "compile", str(model_dir), "--spec", str(spec), "--adapter",
                         str(adapter_dir), "-o", str(out_path), "--adapters-as-inputs", "--export-adapter",
                         str(adapter), "-q")
    assert code == 0, err
    assert err.strip() == "" or "✓" not in err  # -q: no progress

    ids = torch.randint(0, 64, (3, 5))
    lora = ort.LoraAdapter()
    lora.Load(str(adapter))
    options = ort.RunOptions()
    options.add_active_adapter(lora)
    got = ort.InferenceSession(str(out_path), providers=["CPUExecutionProvider"]).run(
        None, {"input_ids": ids.numpy()}, options)[0]
    with torch.no_grad():
        ref = peft_model(input_ids=ids).logits.numpy()
    assert np.abs(got - ref).max() <= 1e-4 * max(1.0, np.abs(ref).max())


def test_adapter_trained_with_another_alpha_is_a_spec_error(capsys, tmp_path, hf_dirs):
    model_dir, adapter_dir, _ = hf_dirs
    spec = tmp_path / "alpha16.toml"
    spec.write_text('[[lora]]\ntarget = "q_proj|v_proj"\nr = 4\nalpha = 16\n')
    code, _, err = run(capsys, "explain", str(model_dir), "--spec", str(spec), "--adapter", str(adapter_dir), "-q")
    assert code == 2
    assert_one_line_error(err, "lora_alpha=8", "scaling 2", "spec compiles scaling 4")


def test_diff_and_explain_on_a_hf_directory(capsys, spec, hf_dirs):
    model_dir, adapter_dir, _ = hf_dirs
    code, out, _ = run(capsys, "diff", str(model_dir), "--spec", str(spec), "--pass", "insert-lora", "-q")
    assert code == 0
    assert "+model.layers.0.self_attn.v_proj.lora_B.weight  [32x4] float32  trainable  adapter:lora" in out
    code, out, _ = run(capsys, "explain", str(model_dir), "--spec", str(spec), "--adapter", str(adapter_dir), "-q")
    assert code == 0
    assert "trainable: 512 of" in out and "memory of one training step" in out


def test_diff_prints_and_dumps_per_pass_diffs(capsys, tmp_path):
    code, out, _ = run(capsys, "diff", MLP, "-p", MLP_PIPELINE, "--pass", "insert-lora", "-q")
    assert code == 0
    assert "+up.lora_A.weight  [2x16] float32  trainable  adapter:lora" in out
    assert "freeze-base" not in out
    code, out, _ = run(capsys, "diff", MLP, "-p", MLP_PIPELINE, "--dump-dir", str(tmp_path / "d"), "-q")
    assert code == 0
    assert sorted(p.name for p in (tmp_path / "d").iterdir()) == ["01-freeze-base.diff", "02-insert-lora.diff"]
    code, _, err = run(capsys, "diff", MLP, "-p", MLP_PIPELINE, "--pass", "insert-lorra", "-q")
    assert code == 1
    assert_one_line_error(err, "no pass named `insert-lorra`")


def test_explain_reports_parameters_and_measured_saved_tensors(capsys):
    code, out, _ = run(capsys, "explain", MLP, "-p", MLP_PIPELINE, "-q")
    assert code == 0
    assert "adapter" in out and "lora" in out and "trainable: 96 of 1,168" in out
    assert "memory of one training step (measured" in out and "saved " in out and "FLOPs" in out
    assert "recomputed in backward: nothing" in out


@pytest.mark.parametrize("argv, code, needle", [
    (["compile", MLP, "--spec", "{tmp}/missing.toml", "-o", "{tmp}/o.onnx"], 2, "spec file"),
    (["compile", MLP, "--spec", "{tmp}/bad.toml", "-o", "{tmp}/o.onnx"], 2, "unknown key `rank`"),
    (["compile", "no_such_module_xyz:factory", "-p", MLP_PIPELINE, "-o", "{tmp}/o.onnx"], 2, "cannot import"),
    (["compile", "{tmp}/no_model_dir", "-p", MLP_PIPELINE, "-o", "{tmp}/o.onnx"], 2, "does not exist"),
    (["compile", MLP, "-p", MLP_PIPELINE, "-o", "/sys/peftc-test.onnx"], 1, "cannot write to /sys"),
    (["compile", MLP, "-p", MLP_PIPELINE, "-o", "{tmp}/nodir/o.onnx"], 2, "does not exist"),
    (["compile", MLP, "-p", MLP_PIPELINE, "-o", "{tmp}/o.onnx", "--memory-budget", "2 parsecs"], 2, "2GiB"),
    (["compile", MLP, "-p", "insert-lorra", "-o", "{tmp}/o.onnx"], 2, "did you mean insert-lora"),
    (["compile", MLP, "-p", MLP_PIPELINE, "-o", "{tmp}/o.onnx", "--adapter", "{tmp}"], 2,
     "no adapter_model.safetensors"),
    (["compile", MLP, "-o", "{tmp}/o.onnx"], 2, "give --spec"),
    (["compile", MLP, "-p", MLP_PIPELINE], 2, "required: -o"),
    (["frobnicate"], 2, "invalid choice"),
])
def test_bad_input_is_one_line_error_and_leaves_nothing(capsys, tmp_path, argv, code, needle):
    (tmp_path / "bad.toml").write_text("[[lora]]\ntarget = 'up'\nrank = 4\n")
    before = sorted(tmp_path.iterdir())
    got, out, err = run(capsys, *(a.replace("{tmp}", str(tmp_path)) for a in argv))
    assert got == code, err
    assert_one_line_error(err, needle)
    assert sorted(tmp_path.iterdir()) == before


def test_verbose_prints_the_traceback(capsys, tmp_path):
    code, _, err = run(capsys, "--verbose", "compile", "no_such_module_xyz:f", "-p", MLP_PIPELINE, "-o",
                       str(tmp_path / "o.onnx"))
    assert code == 2 and "Traceback" in err and err.rstrip().endswith("is it on PYTHONPATH?")


def test_parse_bytes():
    assert parse_bytes("2GiB") == 2 * 1024 ** 3
    assert parse_bytes("512 MiB") == 512 * 1024 ** 2
    assert parse_bytes("1.5GB") == 1_500_000_000
    assert parse_bytes("4096") == 4096


def test_console_script_exit_codes(tmp_path):
    script = shutil.which("peftc", path=str(Path(sys.executable).parent))
    assert script is not None
    proc = subprocess.run([script, "compile", "no_such_module_xyz:f", "-p", MLP_PIPELINE, "-o",
                           str(tmp_path / "o.onnx")], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and proc.stderr.startswith("peftc: error: MODEL")
    assert list(tmp_path.iterdir()) == []
