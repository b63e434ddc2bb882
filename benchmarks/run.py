"""HF PEFT vs peftc, side by side in one run: peak bytes, bytes saved for backward, FLOPs, median step time.

    python -m benchmarks.run            # full size (minutes on a 2-core CPU); writes docs/benchmarks.{md,json,png}
    python -m benchmarks.run --quick    # tiny sizes, seconds; for CI smoke tests

Both sides get the same base model (same seed), the same adapter weights and the same inputs. peftc is the default
`peftc.compile(model, spec, args, kwargs)`, no options. Memory and FLOPs come from peftc.memory.measure_step (exact
live-storage tracking, FlopCounterMode); step time is the median of interleaved forward+backward steps.
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
from peftc.memory import measure_step

from . import models

METRICS = ("peak_bytes", "saved_bytes", "flops", "step_s")
LLAMA_PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@dataclass
class Case:
    key: str
    title: str
    model: nn.Module
    targets: list[str]  # LoRA target modules, in HF PEFT's list form (exact names or dotted suffixes)
    r: int
    dropout: float
    args: tuple
    kwargs: dict
    loss_fn: Callable[[Any], torch.Tensor] | None
    note: str = ""
    # The targets: metric -> the largest peftc / HF PEFT ratio that meets it. "peak_bytes_vs_no_dropout"
    # compares with HF PEFT's peak for the same adapters without dropout.
    goals: dict[str, float] = field(default_factory=dict)

    @property
    def spec(self) -> peftc.Spec:
        return peftc.Spec(peftc.LoRA(target=self.targets, r=self.r, alpha=2 * self.r, dropout=self.dropout))


def _tokens(vocab: int, batch: int, seq: int) -> dict:
    ids = torch.randint(0, vocab, (batch, seq), generator=torch.Generator().manual_seed(0))
    return {"input_ids": ids, "labels": ids, "use_cache": False}


def llama_case(key: str, quick: bool, vocab: int, targets: list[str], r: int, dropout: float = 0.0,
               goals: dict[str, float] | None = None) -> Case:
    # Quick: a one-layer body but the real vocabulary and enough tokens that the loss is chunked as at full size.
    size = dict(layers=1, hidden=32, heads=2, intermediate=86) if quick else \
        dict(layers=4, hidden=256, heads=8, intermediate=688)
    batch, seq = (2, 128) if quick else (2, 256)
    torch.manual_seed(0)
    model = models.llama(vocab=vocab, **size).train()
    which = "all seven projections" if targets == LLAMA_PROJECTIONS else "/".join(targets)
    title = (f"Llama {size['layers']}x{size['hidden']}, {size['heads']} heads, seq {seq}, batch {batch}, "
             f"vocab {vocab:,}; LoRA r={r} on {which}" + (f", dropout {dropout}" if dropout else ""))
    return Case(key, title, model, targets, r, dropout, (), _tokens(vocab, batch, seq), None, goals=goals or {})


def gpt2_case(key: str, quick: bool) -> Case:
    size = dict(layers=1, hidden=32, heads=2) if quick else dict(layers=4, hidden=256, heads=8)
    batch, seq = (2, 128) if quick else (2, 256)
    vocab = 50257
    torch.manual_seed(0)
    model = models.gpt2(vocab=vocab, **size).train()
    title = (f"GPT-2 {size['layers']}x{size['hidden']}, {size['heads']} heads, seq {seq}, batch {batch}, "
             f"vocab {vocab:,} (tied lm_head), its own dropouts 0.1; LoRA r=16 on c_attn/c_proj/c_fc")
    return Case(key, title, model, ["c_attn", "c_proj", "c_fc"], 16, 0.0, (), _tokens(vocab, batch, seq), None)


def resnet_case(key: str, quick: bool) -> Case:
    widths, batch, side = ((8, 16, 32), 2, 16) if quick else ((32, 64, 128), 16, 64)
    torch.manual_seed(0)
    model = models.ResNet(widths)
    models.randomize_batch_norm(model)
    model.eval()
    x = torch.randn(batch, 3, side, side)
    labels = torch.randint(0, 10, (batch,))
    convs = [name for name, m in model.named_modules() if isinstance(m, nn.Conv2d) and name.startswith("stages.2.")]
    title = f"ResNet {'/'.join(map(str, widths))}, batch {batch}, {side}x{side}, frozen eval-mode BatchNorm"
    return Case(key, title, model, convs + ["head"], 8, 0.0, (x,), {}, lambda out: F.cross_entropy(out, labels),
                "LoRA r=8 on every convolution of the last stage and on the head", goals={"saved_bytes": 0.6})


def cases(quick: bool) -> list[Case]:
    qv = ["q_proj", "v_proj"]
    return [
        llama_case("a", quick, 32000, LLAMA_PROJECTIONS, 16, goals={"peak_bytes": 0.45, "flops": 1.01,
                                                                   "step_s": 1.05}),
        llama_case("b", quick, 4000, LLAMA_PROJECTIONS, 16, goals={"peak_bytes": 0.85}),
        llama_case("c", quick, 4000, qv, 8, dropout=0.1, goals={"peak_bytes_vs_no_dropout": 1.0}),
        resnet_case("d", quick),
        gpt2_case("e", quick),
    ]


def hf_peft(case: Case, dropout: float) -> nn.Module:
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(copy.deepcopy(case.model), LoraConfig(target_modules=case.targets, r=case.r,
                                                                  lora_alpha=2 * case.r, lora_dropout=dropout))
    return model.train(case.model.training)


def build(case: Case) -> dict[str, nn.Module]:
    """HF PEFT and peftc models over identical copies of the base model, with identical non-zero adapters."""
    from peft import set_peft_model_state_dict

    ours = peftc.compile(copy.deepcopy(case.model), case.spec, case.args, case.kwargs)  # the default: no options
    torch.manual_seed(1)
    with torch.no_grad():
        for p in ours.trainable_parameters():
            p.uniform_(-0.05, 0.05)  # B = 0 at init would hide differences in what the adapters compute
    built = {"hf_peft": hf_peft(case, case.dropout), "peftc": ours}
    if "peak_bytes_vs_no_dropout" in case.goals:
        built["hf_peft_no_dropout"] = hf_peft(case, 0.0)
    for name, module in built.items():
        if name != "peftc":
            set_peft_model_state_dict(module, {f"base_model.model.{k}": v
                                               for k, v in ours.adapter_state_dict().items()})
    return built


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
    out: dict[str, Any] = {"title": case.title, "note": case.note, "goals": case.goals}
    losses = {}
    for name, module in built.items():
        torch.manual_seed(2)
        losses[name] = float(step(module, case))
        torch.manual_seed(2)
        report = measure_step(module, case.args, case.kwargs, lambda o: loss_of(case, o))
        out[name] = {"peak_bytes": report.peak_bytes, "saved_bytes": report.saved_bytes,
                     "flops": report.forward_flops + report.backward_flops}
    out["loss_diff"] = abs(losses["peftc"] - losses["hf_peft"])
    timed = ["hf_peft", "peftc"]
    times: dict[str, list[float]] = {name: [] for name in timed}
    for i in range(steps + 1):  # interleaved, so drift in machine load hits both sides alike; step 0 warms up
        for name in timed if i % 2 else timed[::-1]:  # and each side goes first half the time
            torch.manual_seed(100 + i)
            start = time.perf_counter()
            step(built[name], case)
            if i:
                times[name].append(time.perf_counter() - start)
    for name in timed:
        out[name]["step_s"] = statistics.median(times[name])
    return out


def ratio(r: dict, metric: str) -> float:
    if metric == "peak_bytes_vs_no_dropout":
        return r["peftc"]["peak_bytes"] / r["hf_peft_no_dropout"]["peak_bytes"]
    return r["peftc"][metric] / r["hf_peft"][metric]


GOAL_LABELS = {"peak_bytes": "peak memory", "saved_bytes": "bytes saved for backward", "flops": "FLOPs",
               "step_s": "median step time", "peak_bytes_vs_no_dropout": "peak memory"}


def check_targets(results: dict) -> list[tuple[str, bool, str]]:
    """The issue's targets, each with whether it holds and the ratio behind it."""
    rows = []
    for key, r in results.items():
        for metric, goal in r["goals"].items():
            value = ratio(r, metric)
            reference = "HF PEFT without dropout" if metric == "peak_bytes_vs_no_dropout" else "HF PEFT"
            rows.append((f"({key}) {GOAL_LABELS[metric]} <= {goal:g}x {reference}", value <= goal, f"{value:.3f}x"))
    return rows


def _mib(n: int) -> str:
    return f"{n / 2**20:.2f}"


LIBRARIES = {"hf_peft": "HF PEFT", "hf_peft_no_dropout": "HF PEFT, no dropout", "peftc": "peftc"}


def render_markdown(results: dict, meta: dict) -> str:
    lines = ["| case | library | peak MiB | saved MiB | GFLOPs (fwd+bwd) | median step s |",
             "| --- | --- | ---: | ---: | ---: | ---: |"]
    for key, r in results.items():
        for lib, label in LIBRARIES.items():
            if lib in r:
                m = r[lib]
                step_s = f"{m['step_s']:.3f}" if "step_s" in m else "-"
                lines.append(f"| ({key}) | {label} | {_mib(m['peak_bytes'])} | {_mib(m['saved_bytes'])} | "
                             f"{m['flops'] / 1e9:.2f} | {step_s} |")
        lines.append(f"| ({key}) | **peftc / HF PEFT** | **{ratio(r, 'peak_bytes'):.3f}x** | "
                     f"{ratio(r, 'saved_bytes'):.3f}x | {ratio(r, 'flops'):.3f}x | {ratio(r, 'step_s'):.3f}x |")
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
and peftc identical copies of the base model and identical non-zero adapter weights, and measures both in the same
process. Every peftc row is the default `peftc.compile(model, spec, args, kwargs)`, no options: the spec's method
passes, then the default training passes (docs/optimize.md). Measured: peak bytes, bytes saved for backward (alive at
the end of forward, outputs and loss included) and forward+backward FLOPs from `peftc.memory.measure_step` (exact
storage tracking and FlopCounterMode), and the median wall time of full training steps (forward, loss, backward), HF
PEFT and peftc steps interleaved (each side first in every other round) so that load on the machine hits both alike.
Memory and FLOPs are exact and repeatable; step times on a shared 2-core CPU are noisy (a few percent between
runs), so the ratio of medians is what to read."""

WHY = """## Where the differences come from

- (a), (b), (e) The language-model loss. HF PEFT's step keeps the [tokens, vocab] logits for backward and, inside the
  loss, log-softmax and gradient copies of the same size: at vocab 32,000 and 512 tokens each is 62.5 MiB. peftc's
  default training stage ends with `fuse-linear-cross-entropy`: the head and the loss run over chunks of tokens
  (a chunk's fp32 logits are about 2 MiB, at least 64 tokens), each chunk's gradient w.r.t. the hidden states is
  computed right away, and only that gradient ([tokens, hidden]) is kept. Nothing is computed twice, so the FLOPs
  are HF PEFT's; the loss is the same (|diff| below). The smaller the vocabulary, the smaller the share: (b) at
  4,000. GPT-2's `lm_head` is tied to the input embedding; the same pass fuses it.
- (a), (b) `prune-grads`: with a frozen base, eager autograd already saves nothing for a frozen `nn.Linear`. The
  difference is in capture: torch.export records the boolean causal mask that transformers builds when tracing, and
  CPU SDPA saves a float copy of it per layer; `prune-grads` checks the mask once per step and runs SDPA with
  `is_causal=True`, as the eager HF model does.
- (c) HF PEFT's `nn.Dropout` on CPU multiplies x by a float noise tensor: per adapter it saves the noise and the
  dropped copy of x. peftc's `dropout_linear` saves x (one copy, shared by q and v and read by the base anyway) and
  the RNG state, and replays the mask in backward; so peftc with dropout stays under HF PEFT without it (the fused
  loss adds to the margin).
- (d) Eval-mode BatchNorm saves its input for backward even when frozen, and a frozen conv saves its input;
  `prune-grads` turns BatchNorm into `x * scale + shift` and frozen convs into input-gradient-only convs. The model
  trains in eval mode, and the training passes run on eval-mode graphs too (docs/optimize.md).
- Step time: the same FLOPs on both sides. The chunked loss adds per-chunk overhead (a sub-graph call and an
  `autograd.grad` per chunk), which shows when the loss dominates a small model's step."""


def render_chart(results: dict, path: Path) -> bool:
    try:
        import matplotlib
    except ImportError:
        return False
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = {"peak_bytes": "peak memory", "saved_bytes": "saved for backward", "flops": "FLOPs",
              "step_s": "median step time"}
    keys = list(results)
    fig, ax = plt.subplots(figsize=(9, 4))
    width = 0.8 / len(METRICS)
    for i, metric in enumerate(METRICS):
        bars = ax.bar([j + i * width for j in range(len(keys))], [ratio(results[k], metric) for k in keys], width,
                      label=labels[metric])
        if metric == "peak_bytes":
            ax.bar_label(bars, fmt="%.2f", fontsize=7)
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
    parser.add_argument("--steps", type=int, default=None, help="timed steps per library (default 7, quick 2)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--cases", default=None, help="comma-separated case keys to run (default: all)")
    parser.add_argument("--out", type=Path, default=None,
                        help="folder for benchmarks.{md,json,png} (default docs/ at full size, none with --quick)")
    opts = parser.parse_args(argv)
    steps = opts.steps or (2 if opts.quick else 7)
    out_dir = opts.out if opts.out is not None else (None if opts.quick or opts.cases else Path("docs"))
    torch.set_num_threads(opts.threads)

    chosen = set(opts.cases.split(",")) if opts.cases else None
    results = {}
    for case in cases(opts.quick):
        if chosen is not None and case.key not in chosen:
            continue
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
        md = out_dir / "benchmarks.md"
        kept = md.read_text().partition("<!-- benchmarks.recompute: begin -->") if md.exists() else ("", "", "")
        # benchmarks/recompute.py's section, if any, survives a rerun of this benchmark
        md.write_text(render_markdown(results, meta) + (f"\n{kept[1]}{kept[2]}" if kept[1] else ""))
        render_chart(results, out_dir / "benchmarks.png")
    return results


if __name__ == "__main__":
    main()
