"""Inference latency: peftc's merged ONNX in onnxruntime vs HF PEFT (unmerged, eager) vs the base model (eager).

Also peftc's adapters-as-inputs ONNX (one session for many adapters) with the adapter active.

Llama-shaped model from a config (random weights; benchmarks/run.py's): 8 layers, hidden 512, 8 heads,
intermediate 1376, vocab 8000. LoRA r=8, alpha=16 on q_proj/v_proj with non-zero B (as after training), the same
adapter weights in peftc and PEFT. Median wall time of one forward (no KV cache), the variants timed round-robin,
at batch 1 and 8, sequence 128, 2 threads everywhere.

    .venv/bin/python benchmarks/onnx_latency.py            # prints a Markdown table
    .venv/bin/python benchmarks/onnx_latency.py --quick    # fewer repetitions
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
from tiny_models import llama_bench  # noqa: E402

THREADS = 2
SEQ = 128


def interleaved_medians_ms(fns: dict[str, callable], reps: int, warmup: int = 2) -> dict[str, float]:
    """Median wall time of each fn, timed round-robin so that load from other processes hits every fn alike."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(reps):
        for name, fn in fns.items():
            t = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t)
    return {name: statistics.median(ts) * 1e3 for name, ts in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="3 repetitions instead of 15")
    args = parser.parse_args()
    reps = 3 if args.quick else 15

    import onnxruntime as ort
    from peft import LoraConfig, get_peft_model, set_peft_model_state_dict

    import peftc

    torch.set_num_threads(THREADS)
    model, example = llama_bench()
    spec = peftc.LoRA(target="q_proj|v_proj", r=8, alpha=16)
    cm = peftc.compile(model, spec, kwargs=example)
    gen = torch.Generator().manual_seed(0)
    adapter = {k: (torch.randn(v.shape, generator=gen) * 0.02) for k, v in cm.adapter_state_dict().items()}
    cm.load_adapter_state_dict(adapter)
    cm.eval()

    with tempfile.TemporaryDirectory() as tmp:
        t = time.perf_counter()
        report = cm.export_onnx(Path(tmp) / "merged.onnx")
        export_s = time.perf_counter() - t
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = THREADS
        opts.inter_op_num_threads = 1
        opts.log_severity_level = 3  # not one warning per overridable initializer
        session = ort.InferenceSession(str(Path(tmp) / "merged.onnx"), opts, providers=["CPUExecutionProvider"])
        cm.export_onnx(Path(tmp) / "base.onnx", merged=False, adapters="inputs", verify=False)
        cm.export_onnx_adapter(Path(tmp) / "a.onnx_adapter", onnx_model=Path(tmp) / "base.onnx")
        multi = ort.InferenceSession(str(Path(tmp) / "base.onnx"), opts, providers=["CPUExecutionProvider"])
        lora = ort.LoraAdapter()
        lora.Load(str(Path(tmp) / "a.onnx_adapter"))
        with_adapter = ort.RunOptions()
        with_adapter.add_active_adapter(lora)

        base = copy.deepcopy(model)  # before PEFT swaps modules inside `model`
        peft_model = get_peft_model(model, LoraConfig(target_modules=["q_proj", "v_proj"], r=8, lora_alpha=16))
        set_peft_model_state_dict(peft_model, {f"base_model.model.{k}": v for k, v in adapter.items()})
        peft_model.eval()

        rows = []
        for batch in (1, 8):
            ids = torch.randint(0, 8000, (batch, SEQ), generator=gen)
            feeds = {"input_ids": ids.numpy()}
            with torch.no_grad():
                ref = peft_model(input_ids=ids, use_cache=False).logits.numpy()
                for got in (session.run(None, feeds)[0], multi.run(None, feeds, with_adapter)[0]):
                    assert np.abs(got - ref).max() <= 1e-4 * max(1.0, np.abs(ref).max()), "ORT != PEFT"
                ms = interleaved_medians_ms({
                    "ort": lambda: session.run(None, feeds),
                    "multi": lambda: multi.run(None, feeds, with_adapter),
                    "peft": lambda: peft_model(input_ids=ids, use_cache=False),
                    "base": lambda: base(input_ids=ids, use_cache=False),
                }, reps)
            rows.append((batch, ms["ort"], ms["multi"], ms["peft"], ms["base"]))

    load = os.getloadavg()[0]
    print(f"load average {load:.1f} on {os.cpu_count()} cores at the end (other processes share them: compare "
          f"columns, not absolute times)")
    print(f"onnx export: {export_s:.1f} s, {report.nodes_exported} -> {report.nodes_optimized} nodes, "
          f"max |ORT - eager| {report.max_abs_diff:.2g}; torch {torch.__version__}, onnxruntime {ort.__version__}, "
          f"{THREADS} threads, median of {reps}")
    print()
    print("| batch x seq | peftc merged ONNX (onnxruntime) | peftc adapters-as-inputs ONNX, adapter active "
          "(onnxruntime) | HF PEFT unmerged (eager) | base model (eager) |")
    print("|---|---|---|---|---|")
    for batch, ort_ms, multi_ms, peft_ms, base_ms in rows:
        print(f"| {batch} x {SEQ} | {ort_ms:.1f} ms | {multi_ms:.1f} ms ({multi_ms / ort_ms:.2f}x) | "
              f"{peft_ms:.1f} ms ({peft_ms / ort_ms:.2f}x) | {base_ms:.1f} ms ({base_ms / ort_ms:.2f}x) |")


if __name__ == "__main__":
    main()
