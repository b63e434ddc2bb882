"""Tiny model factories for tests, docs and the CLI: `peftc compile examples/tiny_models.py:tiny_llama ...`.

Each factory returns `(model, example_inputs)`: random weights from a config (no downloads), inputs with batch
and sequence sizes >= 2 so that capture keeps them dynamic.
"""

from __future__ import annotations

import torch


def tiny_llama(hidden: int = 32, layers: int = 1, heads: int = 4, vocab: int = 64, seq: int = 8, batch: int = 2,
               seed: int = 0, intermediate: int | None = None):
    """A Llama with random weights and `{"input_ids": ...}` example inputs."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(hidden_size=hidden, intermediate_size=intermediate or 2 * hidden, num_hidden_layers=layers,
                         num_attention_heads=heads, num_key_value_heads=heads, vocab_size=vocab,
                         max_position_embeddings=max(64, seq))
    model = LlamaForCausalLM(config).eval()
    input_ids = torch.randint(0, vocab, (batch, seq), generator=torch.Generator().manual_seed(seed))
    return model, {"input_ids": input_ids}


class TinyMLP(torch.nn.Module):
    """Two linear layers; positional input. The smallest thing worth compiling."""

    def __init__(self, d: int = 16):
        super().__init__()
        self.up = torch.nn.Linear(d, 2 * d)
        self.down = torch.nn.Linear(2 * d, d)

    def forward(self, x):
        return self.down(torch.relu(self.up(x)))


def tiny_mlp(d: int = 16, seed: int = 0):
    torch.manual_seed(seed)
    return TinyMLP(d).eval(), (torch.randn(2, 4, d),)


def llama_bench():
    """The Llama-shaped benchmark config (benchmarks/run.py's): 8 layers, hidden 512, 8 heads, intermediate 1376,
    vocab 8000; example inputs batch 2, seq 128."""
    return tiny_llama(hidden=512, layers=8, heads=8, vocab=8000, seq=128, batch=2, intermediate=1376)
