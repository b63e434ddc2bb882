"""Inference latency: peftc's merged ONNX in onnxruntime vs HF PEFT (unmerged, eager) vs the base model (eager).

Llama-shaped model from a config (random weights): 8 layers, hidden 512, 8 heads, intermediate 1024, vocab 8000.
LoRA r=8, alpha=16 on q_proj/v_proj with non-zero B (as after training), the same adapter weights in peftc and
PEFT. Median wall time of one forward (no KV cache) at batch 1 and 8, sequence 128, 2 threads everywhere.

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


def median_ms(fn, reps: int, warmup: int = 2) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times) * 1e3


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
        session = ort.InferenceSession(str(Path(tmp) / "merged.onnx"), opts, providers=["CPUExecutionProvider"])

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
                got = session.run(None, feeds)[0]
                assert np.abs(got - ref).max() <= 1e-4 * max(1.0, np.abs(ref).max()), "ORT != PEFT"
                base_ms = median_ms(lambda: base(input_ids=ids, use_cache=False), reps)
                peft_ms = median_ms(lambda: peft_model(input_ids=ids, use_cache=False), reps)
                ort_ms = median_ms(lambda: session.run(None, feeds), reps)
            rows.append((batch, ort_ms, peft_ms, base_ms))

    load = os.getloadavg()[0]
    print(f"load average {load:.1f} on {os.cpu_count()} cores at the end (other processes share them: compare "
          f"columns, not absolute times)")
    print(f"onnx export: {export_s:.1f} s, {report.nodes_exported} -> {report.nodes_optimized} nodes, "
          f"max |ORT - eager| {report.max_abs_diff:.2g}; torch {torch.__version__}, onnxruntime {ort.__version__}, "
          f"{THREADS} threads, median of {reps}")
    print()
    print("| batch x seq | peftc merged ONNX (onnxruntime) | HF PEFT unmerged (eager) | base model (eager) |")
    print("|---|---|---|---|")
    for batch, ort_ms, peft_ms, base_ms in rows:
        print(f"| {batch} x {SEQ} | {ort_ms:.1f} ms | {peft_ms:.1f} ms ({peft_ms / ort_ms:.2f}x) | "
              f"{base_ms:.1f} ms ({base_ms / ort_ms:.2f}x) |")


if __name__ == "__main__":
    main()
