"""Generation cost per new token: cm.generate (KV cache in the compiled graphs) at 8 vs 64 new tokens.

Llama-shaped model from a config (random weights): 4 layers, hidden 256, 4 heads, intermediate 688, vocab 4000;
LoRA r=8 on q_proj/v_proj with non-zero B, unmerged. Batch 1, a 128-token prompt, greedy, no EOS (every run makes
all its tokens), 2 threads (`--threads`). Per-token time = (t(N) - t(1)) / (N - 1): the prefill is taken out, what
is left is N - 1 decode steps. Median of several runs, the variants timed round-robin. For reference, the same for
HF PEFT's generate (same adapter weights, transformers' DynamicCache) and for a loop that re-runs cm's forward over
the whole sequence for each token (no cache), whose cost per token grows with the length.

    .venv/bin/python -m benchmarks.generate            # prints a Markdown table
    .venv/bin/python -m benchmarks.generate --quick    # fewer repetitions
"""

from __future__ import annotations

import argparse
import copy

import torch

from benchmarks.models import llama
from benchmarks.onnx_latency import interleaved_medians_ms

THREADS = 2
PROMPT = 128
LENGTHS = (8, 64)


def main(argv: list[str] | None = None) -> dict[str, dict[int, float]]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="3 repetitions instead of 7")
    parser.add_argument("--threads", type=int, default=THREADS)
    args = parser.parse_args(argv)
    reps = 3 if args.quick else 7

    from peft import LoraConfig, get_peft_model, set_peft_model_state_dict

    import peftc

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    base = llama(layers=4, hidden=256, heads=4, vocab=4000, intermediate=688).eval()
    base.generation_config.eos_token_id = None  # every run generates all its tokens
    x = torch.randint(0, 4000, (1, PROMPT))
    cm = peftc.compile(base, peftc.LoRA(target="q_proj|v_proj", r=8, alpha=16),
                       kwargs={"input_ids": torch.randint(0, 4000, (2, PROMPT))})
    cm.eval()
    torch.manual_seed(1)
    weights = {k: torch.randn_like(v) * 0.02 for k, v in cm.adapter_state_dict().items()}
    cm.load_adapter_state_dict(weights)
    hf = get_peft_model(copy.deepcopy(base), LoraConfig(target_modules=["q_proj", "v_proj"], r=8, lora_alpha=16))
    set_peft_model_state_dict(hf, {f"base_model.model.{k}": v for k, v in weights.items()})
    hf.eval()

    @torch.no_grad()
    def recompute(n: int) -> None:
        seq = x
        for _ in range(n):
            seq = torch.cat([seq, cm(input_ids=seq).logits[:, -1].argmax(-1, keepdim=True)], 1)

    fns = {}
    for n in (1, *LENGTHS):
        fns[("peftc", n)] = lambda n=n: cm.generate(x, max_new_tokens=n)
        fns[("hf_peft", n)] = lambda n=n: hf.generate(x, max_new_tokens=n, do_sample=False)
        fns[("no_cache", n)] = lambda n=n: recompute(n)
    cm.generate(x, max_new_tokens=3)  # capture the prefill and decode graphs before timing
    assert torch.equal(cm.generate(x, max_new_tokens=16), hf.generate(x, max_new_tokens=16, do_sample=False))
    ms = interleaved_medians_ms(fns, reps)
    per_token = {name: {n: (ms[(name, n)] - ms[(name, 1)]) / (n - 1) for n in LENGTHS}
                 for name in ("peftc", "hf_peft", "no_cache")}
    print(f"| per new token (ms), prompt {PROMPT} | {LENGTHS[0]} new tokens | {LENGTHS[1]} new tokens | ratio |")
    print("|---|---:|---:|---:|")
    labels = {"peftc": "peftc cm.generate (compiled, KV cache)", "hf_peft": "HF PEFT generate (eager, KV cache)",
              "no_cache": "cm forward over the whole sequence per token"}
    for name, row in per_token.items():
        a, b = row[LENGTHS[0]], row[LENGTHS[1]]
        print(f"| {labels[name]} | {a:.2f} | {b:.2f} | {b / a:.2f} |")
    return per_token


if __name__ == "__main__":
    main()
