"""Tiny models with attention in every form peftc matches, and the golden-diff helper, for the attention tests.

Regenerate the golden diffs under tests/golden/ with `PEFTC_UPDATE_GOLDEN=1 .venv/bin/python -m pytest tests -q
-k golden`, then review them with `git diff tests/golden`.
"""

from __future__ import annotations

import math
import os
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

warnings.filterwarnings("ignore", message=".*(bos|eos|pad)_token_id.*")

GOLDEN = Path(__file__).parent / "golden"
VOCAB = 64


def tiny_llama(impl: str = "sdpa", layers: int = 1):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, attn_implementation=impl)
    return LlamaForCausalLM(cfg).eval()


def tiny_gpt2(impl: str = "sdpa", layers: int = 1):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=layers, n_head=4, n_positions=64, resid_pdrop=0.0,
                     embd_pdrop=0.0, attn_pdrop=0.0, attn_implementation=impl, bos_token_id=0, eos_token_id=0)
    return GPT2LMHeadModel(cfg).eval()


def tiny_bert(impl: str = "sdpa", layers: int = 1, head: str = "classifier"):
    from transformers import BertConfig, BertForSequenceClassification, BertModel

    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                     num_attention_heads=4, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
                     max_position_embeddings=64, attn_implementation=impl)
    model = BertForSequenceClassification(cfg) if head == "classifier" else BertModel(cfg, add_pooling_layer=False)
    return model.eval()


class HandAttention(nn.Module):
    """Causal grouped-query attention written by hand, as `softmax` (written out, K/V repeated), `broadcast`
    (written out, one K/V head broadcast by the matmul), `sdpa` (is_causal, enable_gqa) or `sdpa_float` (an
    additive [L, L] float mask).

    `prefix=(pk, pv)` ([kv_heads, P, d] each) runs the reference prefix semantics in plain PyTorch, for tests.
    """

    def __init__(self, dim: int = 16, heads: int = 4, kv_heads: int = 2, form: str = "softmax"):
        super().__init__()
        self.heads, self.kv_heads, self.d, self.form = heads, kv_heads, dim // heads, form
        self.q = nn.Linear(dim, dim, bias=False)
        self.k = nn.Linear(dim, kv_heads * self.d, bias=False)
        self.v = nn.Linear(dim, kv_heads * self.d, bias=False)
        self.o = nn.Linear(dim, dim, bias=False)

    def forward(self, x: torch.Tensor, prefix: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        b, n, _ = x.shape
        q = self.q(x).view(b, n, self.heads, self.d).transpose(1, 2)
        k = self.k(x).view(b, n, self.kv_heads, self.d).transpose(1, 2)
        v = self.v(x).view(b, n, self.kv_heads, self.d).transpose(1, 2)
        causal = torch.ones(n, n, dtype=torch.bool, device=x.device).tril()
        if prefix is not None:  # the reference: prefix keys first, visible to every query
            pk, pv = (p.unsqueeze(0).expand(b, -1, -1, -1) for p in prefix)
            k, v = torch.cat([pk, k], 2), torch.cat([pv, v], 2)
            causal = torch.cat([causal.new_ones(n, prefix[0].shape[1]), causal], 1)
        if self.form == "sdpa_float":  # an additive float mask, broadcast over batch and heads
            additive = torch.zeros(causal.shape, device=x.device).masked_fill(~causal, float("-inf"))
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=additive, enable_gqa=True)
        elif self.form == "sdpa":
            if prefix is not None:
                out = F.scaled_dot_product_attention(q, k, v, attn_mask=causal, enable_gqa=True)
            else:
                out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        else:
            if self.form == "softmax":
                rep = self.heads // self.kv_heads
                k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
            scores = (q @ k.transpose(-2, -1)) / math.sqrt(self.d)
            scores = scores.masked_fill(~causal, float("-inf"))
            out = scores.softmax(-1) @ v
        return self.o(out.transpose(1, 2).reshape(b, n, -1))


class HandLM(nn.Module):
    """Embedding, one hand-written attention block per form, output layer."""

    def __init__(self, forms: tuple[str, ...] = ("softmax",), dim: int = 16):
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(VOCAB, dim)
        self.blocks = nn.ModuleList(HandAttention(dim, kv_heads=1 if f == "broadcast" else 2, form=f) for f in forms)
        self.head = nn.Linear(dim, VOCAB, bias=False)

    def forward(self, input_ids: torch.Tensor, prefixes=None) -> torch.Tensor:
        h = self.embed(input_ids)
        for i, block in enumerate(self.blocks):
            h = h + block(h, None if prefixes is None else prefixes[i])
        return self.head(h)


def ids(batch: int = 2, seq: int = 8, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(1, VOCAB, (batch, seq), generator=g)


def logits(out) -> torch.Tensor:
    return out if isinstance(out, torch.Tensor) else out.logits


def check_golden(name: str, text: str) -> None:
    """Compare `text` with tests/golden/<name>; PEFTC_UPDATE_GOLDEN=1 rewrites the file instead."""
    path = GOLDEN / name
    if os.environ.get("PEFTC_UPDATE_GOLDEN") == "1":
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    assert path.exists(), f"{path} is missing; run with PEFTC_UPDATE_GOLDEN=1 to create it"
    assert text == path.read_text(), (f"{name} differs from the golden file; if the change is intended, rerun "
                                      f"with PEFTC_UPDATE_GOLDEN=1 and review `git diff tests/golden`")


def train_steps(cm, batch: dict, loss_fn, steps: int = 8, lr: float = 0.05) -> tuple[float, float]:
    """(first loss, last loss) of a few Adam steps on the compiled model's trainable parameters."""
    opt = torch.optim.Adam(cm.trainable_parameters(), lr=lr)
    losses = []
    for _ in range(steps):
        loss = loss_fn(cm(**batch))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses[0], losses[-1]
