import gc
import os

import pytest
import torch

# `make test` runs two xdist workers with OMP_NUM_THREADS=1 each; a lone pytest run may use both cores.
torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))


def tiny_llama(**overrides):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, max_position_embeddings=64)
    cfg.update(overrides)
    return LlamaForCausalLM(LlamaConfig(**cfg))


def tiny_gpt2(**overrides):
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = dict(vocab_size=64, n_embd=32, n_layer=2, n_head=4, n_positions=64)
    cfg.update(overrides)
    return GPT2LMHeadModel(GPT2Config(**cfg))


def tiny_bert(**overrides):
    from transformers import BertConfig, BertForSequenceClassification

    cfg = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
               max_position_embeddings=64, num_labels=3)
    cfg.update(overrides)
    return BertForSequenceClassification(BertConfig(**cfg))


@pytest.fixture(autouse=True)
def frozen_heap():
    """Moves what exists before each test out of the collector's sight (gc.freeze), so that a gc.collect() in the
    test (peftc.memory.measure_step makes two, the recompute planner more) scans only what the test made: a full
    collection of the heap that torch and transformers leave costs ~0.3 s. Cyclic garbage the test makes is still
    collected; the rest is unfrozen after."""
    gc.freeze()
    yield
    gc.unfreeze()


@pytest.fixture
def seeded():
    torch.manual_seed(0)
    yield


def ids(batch=2, seq=8, vocab=64, seed=0):
    return torch.randint(0, vocab, (batch, seq), generator=torch.Generator().manual_seed(seed))


def pytest_terminal_summary(terminalreporter):
    """Counts of the fuzz tests (tests/test_fuzz.py records them as user properties; xdist workers send those back)."""
    from collections import Counter

    totals: Counter = Counter()
    for reports in terminalreporter.stats.values():
        for r in reports:
            if getattr(r, "when", None) == "call":
                for name, value in getattr(r, "user_properties", ()):
                    if name.startswith("fuzz:"):
                        totals[tuple(name.split(":")[1:])] += value
    if not totals:
        return
    terminalreporter.section("fuzz counts")
    for target in sorted({t for t, _ in totals}):
        parts = ", ".join(f"{key} {totals[t, key]:,}" for t, key in sorted(totals) if t == target)
        terminalreporter.write_line(f"{target}: {parts}")
    tried = sum(v for (t, k), v in totals.items() if k == "tried")
    defects = "0" if not terminalreporter.stats.get("failed") else "see the failures above"
    terminalreporter.write_line(f"all: {tried:,} inputs tried; defects: {defects}")
