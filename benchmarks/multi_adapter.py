"""Several adapters on one base: per-call cost with 8 loaded adapters vs 1, and a batch of 8 that mixes 4 adapters.

(1) Per-call overhead: the median forward of a compiled model with one adapter vs the same model with 8 loaded
adapters (one active), peftc and HF PEFT side by side. peftc binds the active adapter into the compiled graph's
slots, so the call is the same graph either way. (2) A batch of 8 samples, two per adapter for 4 adapters:
peftc's mixed batch (`adapter_names=`, one graph: gather + batched matmul), HF PEFT's `adapter_names=`, and peftc
as 4 separate calls of 2 samples (set_adapter, call). Same base and adapter weights everywhere (non-zero B), eval
mode, no KV cache, variants timed round-robin; medians.

Full size: benchmarks/run.py's Llama (8 layers, hidden 512, vocab 8000), LoRA r=8 alpha=16 on q_proj/v_proj,
sequence 128 (per-call: batch 1, sequence 16, where fixed costs show). --quick: a 2-layer hidden-64 Llama, a few
repetitions (seconds; what the smoke test runs).

    .venv/bin/python -m benchmarks.multi_adapter            # prints a Markdown table
    .venv/bin/python -m benchmarks.multi_adapter --quick
"""

from __future__ import annotations

import argparse
import copy
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
from tiny_models import llama_bench, tiny_llama  # noqa: E402

from benchmarks.onnx_latency import interleaved_medians_ms  # noqa: E402

ADAPTERS = 8
MIXED = ["a0", "a0", "a1", "a1", "a2", "a2", "a3", "a3"]


def _peft_with_adapters(base, names: list[str], seed: int):
    """An HF PEFT model with LoRA adapters `names` (random A and B)."""
    from peft import LoraConfig, get_peft_model

    config = dict(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"])
    pm = get_peft_model(copy.deepcopy(base), LoraConfig(**config), adapter_name=names[0])
    for n in names[1:]:
        pm.add_adapter(n, LoraConfig(**config))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    pm.base_model.set_adapter(names[0])
    return pm.eval()


def _compiled(base, pm, names: list[str], example: dict, directory: Path):
    """peftc on the same base with the same adapters: the first compiled from its saved directory (peftc names it
    "default", as HF PEFT names a compiled adapter), the others loaded under their names."""
    import peftc

    pm.save_pretrained(str(directory))  # each adapter in <directory>/<name> (none is named "default")
    cm = peftc.compile(copy.deepcopy(base), str(directory / names[0]), kwargs=example).eval()
    for n in names[1:]:
        cm.load_adapter(str(directory / n), name=n)
    return cm


def peftc_name(name: str) -> str:
    return "default" if name == "a0" else name


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a tiny model and 5 repetitions")
    parser.add_argument("--reps", type=int, default=None, help="repetitions (default 5 with --quick, else 30)")
    args = parser.parse_args(argv)
    reps = args.reps or (5 if args.quick else 30)
    torch.set_num_threads(1 if args.quick else 2)
    base, _ = tiny_llama(hidden=64, layers=2, vocab=128) if args.quick else llama_bench()
    vocab = base.config.vocab_size
    seq = 16 if args.quick else 128
    gen = torch.Generator().manual_seed(0)
    small = {"input_ids": torch.randint(0, vocab, (2, 16), generator=gen)}
    batch = {"input_ids": torch.randint(0, vocab, (len(MIXED), seq), generator=gen)}
    names = [f"a{i}" for i in range(ADAPTERS)]
    one = _peft_with_adapters(base, names[:1], seed=1)
    many = _peft_with_adapters(base, names, seed=1)  # a0 is the same adapter in both
    with tempfile.TemporaryDirectory() as tmp:
        cm1 = _compiled(base, one, names[:1], small, Path(tmp) / "one")
        cm8 = _compiled(base, many, names, small, Path(tmp) / "many")
    cm8.set_adapter("default")
    call = {"input_ids": small["input_ids"][:1].clone()}

    def run(model, **kw):
        return lambda: model(**call, **kw)

    with torch.no_grad():
        for m in (cm1, cm8):  # capture the batch-1 call first; sizes 1 specialize, so it is its own graph
            m(**call)
        overhead = interleaved_medians_ms({"peftc, 1 adapter": run(cm1), "peftc, 8 adapters": run(cm8),
                                           "HF PEFT, 1 adapter": run(one), "HF PEFT, 8 adapters": run(many)}, reps)
        x = batch["input_ids"]
        parts = {n: x[[i for i, m in enumerate(MIXED) if m == n]] for n in dict.fromkeys(MIXED)}

        def separate():
            out = []
            for n, xs in parts.items():
                cm8.set_adapter(peftc_name(n))
                out.append(cm8(input_ids=xs).logits)
            cm8.set_adapter("default")
            return torch.cat(out)

        ours = [peftc_name(n) for n in MIXED]
        mixed_fns = {"peftc mixed batch (1 call)": lambda: cm8(input_ids=x, adapter_names=ours).logits,
                     "HF PEFT adapter_names= (1 call)": lambda: many(input_ids=x, adapter_names=MIXED).logits,
                     "peftc, 4 separate calls": separate}
        outs = {k: f() for k, f in mixed_fns.items()}
        mixed = interleaved_medians_ms(mixed_fns, reps)
    ref = outs["HF PEFT adapter_names= (1 call)"]
    results = {"overhead_ms": overhead, "mixed_ms": mixed,
               "max_abs_diff": {k: float((v - ref).abs().max()) for k, v in outs.items()},
               "ratio_8_vs_1": overhead["peftc, 8 adapters"] / overhead["peftc, 1 adapter"],
               "size": "quick" if args.quick else "full", "reps": reps}
    print(render(results))
    return results


def render(results: dict) -> str:
    lines = [f"Per-call forward (batch 1, sequence 16), median of {results['reps']}:", "",
             "| model | 1 adapter (ms) | 8 adapters loaded (ms) | 8 vs 1 |", "|---|---:|---:|---:|"]
    o = results["overhead_ms"]
    for lib in ("peftc", "HF PEFT"):
        a, b = o[f"{lib}, 1 adapter"], o[f"{lib}, 8 adapters"]
        lines.append(f"| {lib} | {a:.2f} | {b:.2f} | {b / a:.3f}x |")
    lines += ["", "A batch of 8 mixing 4 adapters (2 samples each):", "",
              "| variant | median (ms) | max abs diff vs HF PEFT |", "|---|---:|---:|"]
    for k, v in results["mixed_ms"].items():
        lines.append(f"| {k} | {v:.2f} | {results['max_abs_diff'][k]:.1e} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
