"""`peftc demo` / `make demo`: compile a small Llama-shaped model with LoRA on q/v, show what the compiler did,
then fine-tune it on a synthetic task while the loss falls."""

from __future__ import annotations

import torch
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

VOCAB = 32


def tiny_llama(seed: int = 0):
    """A Llama-shaped transformers model from a config (random weights, nothing downloaded)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    return LlamaForCausalLM(config)


def counting_batch(generator: torch.Generator, batch: int = 16, length: int = 16) -> torch.Tensor:
    """Sequences that count up by a per-sequence stride: the next token is learnable from the last two."""
    start = torch.randint(0, VOCAB, (batch, 1), generator=generator)
    stride = torch.randint(1, 3, (batch, 1), generator=generator)
    return (start + stride * torch.arange(length)) % VOCAB


def run_demo(steps: int = 50, lr: float = 3e-2, console: Console | None = None) -> list[float]:
    import peftc

    console = console or Console()
    model = tiny_llama()
    gen = torch.Generator().manual_seed(0)
    example = counting_batch(gen)
    spec = peftc.Spec(peftc.LoRA(target="q_proj|v_proj", r=8, alpha=16))
    console.print(f"[bold]peftc demo[/]: {type(model).__name__} (2 layers, hidden 64), spec {spec.rules[0]}", soft_wrap=True)
    cm = peftc.compile(model, spec, kwargs={"input_ids": example, "labels": example})
    console.print(cm.report())
    console.print("[bold]insert-lora, layer 0[/] (code and parameter table):")
    console.print(cm.diff("insert-lora", module="model.layers.0"), markup=False, highlight=False, soft_wrap=True)

    optimizer = torch.optim.AdamW(cm.trainable_parameters(), lr=lr)
    losses: list[float] = []
    with Progress(TextColumn("training"), BarColumn(), TextColumn("step {task.completed}/{task.total}"),
                  TextColumn("loss {task.fields[loss]}"), TimeElapsedColumn(), console=console) as progress:
        task = progress.add_task("train", total=steps, loss="-")
        for _ in range(steps):
            ids = counting_batch(gen)
            loss = cm(input_ids=ids, labels=ids).loss
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
            progress.update(task, advance=1, loss=f"{loss.item():.3f}")
    trainable, total = cm.parameter_counts()
    console.print(f"loss {losses[0]:.3f} -> {losses[-1]:.3f} over {steps} steps")
    console.print(f"trainable params: {trainable:,} of {total:,} ({100 * trainable / total:.2f}%)")
    return losses
