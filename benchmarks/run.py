"""HF PEFT vs peftc, side by side in one run: peak bytes, bytes saved for backward, FLOPs, median step time.

    python -m benchmarks.run            # full size (minutes on a 2-core CPU); writes docs/benchmarks.{md,json,png}
    python -m benchmarks.run --quick    # tiny sizes, seconds; for CI smoke tests

Both sides get the same base model (same seed), the same adapter weights and the same inputs; peftc runs its
spec's pipeline plus prune-grads. Memory and FLOPs come from peftc.memory.measure_step (exact live-storage
tracking, FlopCounterMode); step time is the median of interleaved forward+backward steps.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

import peftc
import peftc.match
from peftc.memory import measure_step

from . import models

METRICS = ("peak_bytes", "saved_bytes", "flops", "step_s")


@dataclass
class Case:
    key: str
    title: str
    model: nn.Module
    spec: peftc.Spec
    hf_targets: list[str]
    hf_dropout: float
    args: tuple
    kwargs: dict
    loss_fn: Callable[[Any], torch.Tensor] | None
    note: str = ""
    results: dict = field(default_factory=dict)


def llama_case(key: str, quick: bool, dropout: float) -> Case:
    size = dict(layers=2, hidden=64, heads=4, vocab=256, intermediate=172) if quick else \
        dict(layers=8, hidden=512, heads=8, vocab=8000, intermediate=1376)
    batch, seq = (2, 32) if quick else (4, 512)
    torch.manual_seed(0)
    model = models.llama(**size).train()
    ids = torch.randint(0, size["vocab"], (batch, seq))
    title = (f"Llama {size['layers']}x{size['hidden']}, {size['heads']} heads, seq {seq}, batch {batch}, "
             f"vocab {size['vocab']}; LoRA r=8 q_proj/v_proj" + (f", dropout {dropout}" if dropout else ""))
    return Case(key, title, model, peftc.Spec(peftc.LoRA(target="q_proj|v_proj", r=8, alpha=16, dropout=dropout)),
                ["q_proj", "v_proj"], dropout, (), {"input_ids": ids, "labels": ids, "use_cache": False}, None)


def resnet_case(quick: bool) -> Case:
    widths, batch, side = ((8, 16, 32), 2, 16) if quick else ((32, 64, 128), 16, 64)
    torch.manual_seed(0)
    model = models.ResNet(widths)
    models.randomize_batch_norm(model)
    model.eval()
    x = torch.randn(batch, 3, side, side)
    labels = torch.randint(0, 10, (batch,))
    convs = [name for name, m in model.named_modules() if isinstance(m, nn.Conv2d) and name.startswith("stages.2.")]
    targets, note = convs + ["head"], "LoRA on every convolution of the last stage and on the head"
    if not hasattr(peftc.match, "conv_sites"):  # conv LoRA came with the `variants` branch
        targets, note = ["head"], "conv LoRA unavailable in this build: LoRA on the head's linear only"
    title = f"ResNet {'/'.join(map(str, widths))}, batch {batch}, {side}x{side}, frozen eval-mode BatchNorm"
    return Case("c", title, model, peftc.Spec(peftc.LoRA(target=targets, r=8, alpha=16)), targets, 0.0, (x,), {},
                lambda out: F.cross_entropy(out, labels), note)


def build(case: Case) -> dict[str, nn.Module]:
    """HF PEFT and peftc models over identical copies of the base model, with identical non-zero adapters."""
    from peft import LoraConfig, get_peft_model, set_peft_model_state_dict

    spec = case.spec
    ours = peftc.compile(copy.deepcopy(case.model), spec, case.args, case.kwargs, dynamic=False,
                         prune_grads=True)
    torch.manual_seed(1)
    with torch.no_grad():
        for p in ours.trainable_parameters():
            p.uniform_(-0.05, 0.05)  # B = 0 at init would hide differences in what the adapters compute
    hf = get_peft_model(copy.deepcopy(case.model), LoraConfig(target_modules=case.hf_targets, r=8, lora_alpha=16,
                                                               lora_dropout=case.hf_dropout))
    set_peft_model_state_dict(hf, {f"base_model.model.{k}": v for k, v in ours.adapter_state_dict().items()})
    hf.train(case.model.training)
    return {"hf_peft": hf, "peftc": ours}


def loss_of(case: Case, out: Any) -> torch.Tensor:
    return case.loss_fn(out) if case.loss_fn is not None else out.loss


def step(module: nn.Module, case: Case) -> torch.Tensor:
    for p in module.parameters():
        p.grad = None
    loss = loss_of(case, module(*case.args, **case.kwargs))
    loss.backward()
    return loss.detach()


def run_case(case: Case, steps: int) -> dict:
    built = build(case)
    out: dict[str, Any] = {"title": case.title, "note": case.note}
    losses = {}
    for name, module in built.items():
        torch.manual_seed(2)
        losses[name] = float(step(module, case))
        torch.manual_seed(2)
        report = measure_step(module, case.args, case.kwargs, lambda o: loss_of(case, o))
        out[name] = {"peak_bytes": report.peak_bytes, "saved_bytes": report.saved_bytes,
                     "flops": report.forward_flops + report.backward_flops}
    out["loss_diff"] = abs(losses["peftc"] - losses["hf_peft"])
    times: dict[str, list[float]] = {name: [] for name in built}
    for i in range(steps + 1):  # interleaved, so drift in machine load hits both sides alike; step 0 warms up
        for name, module in built.items():
            torch.manual_seed(100 + i)
            start = time.perf_counter()
            step(module, case)
            if i:
                times[name].append(time.perf_counter() - start)
    for name in built:
        out[name]["step_s"] = statistics.median(times[name])
    return out


def check_targets(results: dict) -> list[tuple[str, bool, str]]:
    """The issue's targets, each with whether it holds and the numbers behind it."""
    rows = []
    for key, r in results.items():
        ours, hf = r["peftc"], r["hf_peft"]
        for metric, label in (("peak_bytes", "peak memory"), ("flops", "FLOPs")):
            ratio = ours[metric] / hf[metric]
            rows.append((f"({key}) {label} <= HF PEFT", ratio <= 1.0, f"{ratio:.3f}x"))
        ratio = ours["step_s"] / hf["step_s"]
        rows.append((f"({key}) step time <= 1.05x HF PEFT", ratio <= 1.05, f"{ratio:.3f}x"))
    if "b" in results and "a" in results:
        ratio = results["b"]["peftc"]["peak_bytes"] / results["a"]["hf_peft"]["peak_bytes"]
        rows.append(("(b) peak within 2% of HF PEFT without dropout", ratio <= 1.02, f"{ratio:.3f}x"))
    if "c" in results:
        ratio = results["c"]["peftc"]["saved_bytes"] / results["c"]["hf_peft"]["saved_bytes"]
        rows.append(("(c) bytes saved for backward <= 0.6x HF PEFT", ratio <= 0.6, f"{ratio:.3f}x"))
    return rows


def _mib(n: int) -> str:
    return f"{n / 2**20:.2f}"


def render_markdown(results: dict, meta: dict) -> str:
    lines = ["| case | library | peak MiB | saved MiB | GFLOPs (fwd+bwd) | median step s |",
             "| --- | --- | ---: | ---: | ---: | ---: |"]
    for key, r in results.items():
        for lib in ("hf_peft", "peftc"):
            m = r[lib]
            lines.append(f"| ({key}) | {lib} | {_mib(m['peak_bytes'])} | {_mib(m['saved_bytes'])} | "
                         f"{m['flops'] / 1e9:.2f} | {m['step_s']:.3f} |")
    cases = "\n".join(f"- ({k}) {r['title']}. {r['note'] + '. ' if r['note'] else ''}"
                      f"|loss(peftc) - loss(HF PEFT)| = {r['loss_diff']:.2e}." for k, r in results.items())
    targets = "\n".join(f"| {name} | {'met' if ok else '**missed**'} | {value} |"
                        for name, ok, value in check_targets(results))
    return (f"# Benchmarks: peftc vs HF PEFT\n\n{INTRO}\n\n## Results\n\n"
            f"Run: `{meta['command']}` on {meta['machine']}, torch {meta['torch']}, peft {meta['peft']}, "
            f"{meta['threads']} threads, median of {meta['steps']} interleaved steps after one warm-up. "
            f"This file is written by the run.\n\n![peftc / HF PEFT per case](benchmarks.png)\n\nCases:\n{cases}\n\n"
            + "\n".join(lines) + "\n\n| target | status | peftc / HF PEFT |\n| --- | --- | --- |\n" + targets
            + f"\n\n{WHY}\n")


INTRO = """`make bench` (`python -m benchmarks.run`) builds each case once from a seed, gives HF PEFT (`get_peft_model`)
and peftc (the spec's pipeline plus `prune-grads`) identical copies of the base model and identical non-zero adapter
weights, and measures both in the same process: peak bytes, bytes saved for backward (alive at the end of forward,
outputs and loss included) and forward+backward FLOPs from `peftc.memory.measure_step` (exact storage tracking and
FlopCounterMode), and the median wall time of full training steps (forward, loss, backward), HF PEFT and peftc
steps interleaved so that load on the machine hits both alike. Memory and FLOPs are exact and repeatable; step
times on a shared 2-core CPU are noisy (a few percent between runs)."""

WHY = """## Where the differences come from

- (a) With a frozen base, eager autograd already saves nothing for a frozen `nn.Linear`, so an fp32 Llama with
  LoRA on q/v has little to prune. The one difference is in capture: torch.export records the boolean causal mask
  that transformers builds when tracing, and CPU SDPA saves a float copy of it per layer. `prune-grads` checks the
  mask once per step and runs SDPA with `is_causal=True`, as the eager HF model does, so both save the same tensors.
- (b) HF PEFT's `nn.Dropout` on CPU multiplies x by a float noise tensor: per adapter it saves the noise and the
  dropped copy of x. peftc's `dropout_linear` saves x (one copy, shared by q and v and read by the base anyway) and
  the RNG state, and replays the mask in backward.
- (c) Eval-mode BatchNorm saves its input for backward even when frozen, and a frozen conv saves its input;
  `prune-grads` turns BatchNorm into `x * scale + shift` and frozen convs into input-gradient-only convs."""


def render_chart(results: dict, path: Path) -> bool:
    try:
        import matplotlib
    except ImportError:
        return False
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = {"peak_bytes": "peak memory", "saved_bytes": "saved for backward", "flops": "FLOPs",
              "step_s": "step time"}
    keys = list(results)
    fig, ax = plt.subplots(figsize=(8, 4))
    width = 0.8 / len(METRICS)
    for i, metric in enumerate(METRICS):
        ratios = [results[k]["peftc"][metric] / results[k]["hf_peft"][metric] for k in keys]
        ax.bar([j + i * width for j in range(len(keys))], ratios, width, label=labels[metric])
    ax.axhline(1.0, color="black", linewidth=0.8)
    ax.set_xticks([j + width * (len(METRICS) - 1) / 2 for j in range(len(keys))], [f"({k})" for k in keys])
    ax.set_ylabel("peftc / HF PEFT (lower is better)")
    ax.set_title("peftc vs HF PEFT, same model, adapters and inputs")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes, for smoke tests")
    parser.add_argument("--steps", type=int, default=None, help="timed steps per library (default 3, quick 2)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=None,
                        help="folder for benchmarks.{md,json,png} (default docs/ at full size, none with --quick)")
    opts = parser.parse_args(argv)
    steps = opts.steps or (2 if opts.quick else 3)
    out_dir = opts.out if opts.out is not None else (None if opts.quick else Path("docs"))
    torch.set_num_threads(opts.threads)

    cases = [llama_case("a", opts.quick, 0.0), llama_case("b", opts.quick, 0.1), resnet_case(opts.quick)]
    results = {}
    for case in cases:
        results[case.key] = run_case(case, steps)
        r = results[case.key]
        print(f"({case.key}) " + "  ".join(
            f"{lib}: peak {_mib(r[lib]['peak_bytes'])} MiB saved {_mib(r[lib]['saved_bytes'])} MiB "
            f"{r[lib]['flops'] / 1e9:.2f} GFLOP {r[lib]['step_s']:.3f} s" for lib in ("hf_peft", "peftc")),
            flush=True)
    for name, ok, value in check_targets(results):
        print(f"{'ok  ' if ok else 'MISS'} {name}: {value}")

    if out_dir is not None:
        import peft
        import platform

        meta = {"command": "python -m benchmarks.run" + (" --quick" if opts.quick else ""),
                "machine": f"{platform.machine()} CPU", "torch": torch.__version__, "peft": peft.__version__,
                "threads": opts.threads, "steps": steps}
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "benchmarks.json").write_text(json.dumps({"meta": meta, "results": results}, indent=2) + "\n")
        (out_dir / "benchmarks.md").write_text(render_markdown(results, meta))
        render_chart(results, out_dir / "benchmarks.png")
    return results


if __name__ == "__main__":
    main()
