"""What recomputation costs in step time, side by side: recompute=False, the default (recompute-cheap), a memory
budget (the planner; both run on peftc's own recompute runtime) and HF-style whole-block checkpointing.

Same model, adapters (non-zero B) and inputs for all four (benchmarks.recompute's 4-layer Llama, LoRA r=16 on all
projections); one training step each (forward + backward), timed round-robin so that load from other processes hits
every variant alike; medians. Also prints each variant's activation peak and FLOPs (peftc.memory.measure_step) and
its gradient parity against recompute=False.

    .venv/bin/python -m benchmarks.recompute_step_time            # full size, 15 steps, 1 thread
    .venv/bin/python -m benchmarks.recompute_step_time --quick    # the quick model
"""

from __future__ import annotations

import argparse

import torch

import peftc
from peftc.memory import measure_step

from . import recompute as R
from .onnx_latency import interleaved_medians_ms

BUDGET = 0.6  # the budget leaves this fraction of recompute=False's activation peak: most regions are recomputed


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.recompute_step_time",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="the quick model")
    parser.add_argument("--steps", type=int, default=15, help="timed steps per variant (default 15)")
    parser.add_argument("--threads", type=int, default=1)
    opts = parser.parse_args(argv)
    torch.set_num_threads(opts.threads)
    case = R.cases(opts.quick)[0]
    inputs = R._inputs(case)
    spec = peftc.LoRA(target=case["target"], r=16, alpha=32)
    plain = peftc.compile(R._model(case), spec, kwargs=inputs, dynamic=False, recompute=False)
    step = measure_step(plain, (), inputs)
    budget = step.device_peak_bytes - int((1 - BUDGET) * step.peak_bytes)
    variants = {"default (recompute-cheap)": {}, f"memory budget: activations {BUDGET}x recompute=False's":
                dict(memory_budget=budget), "whole blocks (gradient_checkpointing_enable)": dict(recompute=False)}
    cms = {"recompute=False": plain, **{k: peftc.compile(R._model(case), spec, kwargs=inputs, dynamic=False, **kw)
                                        for k, kw in variants.items()}}
    cms["whole blocks (gradient_checkpointing_enable)"].gradient_checkpointing_enable()
    for cm in cms.values():
        R._adapters_nonzero(cm)
    reference = R._grads(cms["recompute=False"], inputs)
    rows = {}
    for name, cm in cms.items():
        step = measure_step(cm, (), inputs)
        rows[name] = {"activations": step.peak_bytes, "flops": step.forward_flops + step.backward_flops,
                      "parity": R._parity(reference, R._grads(cm, inputs))}

    def step_of(cm):
        def run():
            cm(**inputs).loss.backward()
            for p in cm.trainable_parameters():
                p.grad = None
        return run

    times = interleaved_medians_ms({name: step_of(cm) for name, cm in cms.items()}, opts.steps)
    base = times["recompute=False"]
    print(f"{case['title']}, seq {case['seq']}, {opts.steps} steps, {opts.threads} thread(s)")
    print("| variant | activation peak MiB | GFLOPs | step ms | vs recompute=False | parity |")
    print("|---|---|---|---|---|---|")
    for name, row in rows.items():
        row["step_ms"] = times[name]
        print(f"| {name} | {row['activations'] / R.MIB:.2f} | {row['flops'] / 1e9:.3f} | {times[name]:.1f} | "
              f"{times[name] / base:.2f}x | {row['parity']:.0e} |")
    return rows


if __name__ == "__main__":
    main()
