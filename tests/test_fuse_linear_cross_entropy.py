"""fuse-linear-cross-entropy: the loss and every gradient of the unfused graph, without the [tokens, vocab] logits."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
import transformers as T
from rich.console import Console
from torch import nn

import peftc
from peftc.memory import measure_step
from peftc.passes.fuse_linear_cross_entropy import (NAME, FuseLinearCrossEntropy, chunked_cross_entropy,
                                                    default_chunk_tokens)
from peftc.pipeline import PassContext, Pipeline
from peftc.recompute import _scheduled
from tests.conftest import ids


V = 128  # larger than every hidden size below: a vocabulary, not a classification head


def _causal(cls, config, **cfg):
    return lambda: cls(config(vocab_size=V, **cfg))


MODELS = {  # name: (factory, LoRA targets: attention plus the LM head where it is not tied)
    "llama": (_causal(T.LlamaForCausalLM, T.LlamaConfig, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=4, num_key_value_heads=2), "q_proj|v_proj|lm_head"),
    "mistral": (_causal(T.MistralForCausalLM, T.MistralConfig, hidden_size=32, intermediate_size=64,
                        num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2), "q_proj|lm_head"),
    "qwen2": (_causal(T.Qwen2ForCausalLM, T.Qwen2Config, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=4, num_key_value_heads=2), "q_proj|lm_head"),
    "gemma": (_causal(T.GemmaForCausalLM, T.GemmaConfig, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=8), "q_proj"),
    "gemma2-softcap": (_causal(T.Gemma2ForCausalLM, T.Gemma2Config, hidden_size=32, intermediate_size=64,
                               num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                               final_logit_softcapping=3.0), "q_proj"),
    "gpt2": (_causal(T.GPT2LMHeadModel, T.GPT2Config, n_embd=32, n_layer=1, n_head=4, bos_token_id=0,
                     eos_token_id=0), "c_attn"),
    "gpt-neox": (_causal(T.GPTNeoXForCausalLM, T.GPTNeoXConfig, hidden_size=32, intermediate_size=64,
                         num_hidden_layers=1, num_attention_heads=4), "query_key_value|embed_out"),
    "opt": (_causal(T.OPTForCausalLM, T.OPTConfig, hidden_size=32, ffn_dim=64, num_hidden_layers=1,
                    num_attention_heads=4, word_embed_proj_dim=32), "q_proj"),
    "falcon": (_causal(T.FalconForCausalLM, T.FalconConfig, hidden_size=32, num_hidden_layers=1,
                       num_attention_heads=4), "query_key_value"),
    "bloom": (_causal(T.BloomForCausalLM, T.BloomConfig, hidden_size=32, n_layer=1, n_head=4), "query_key_value"),
    "t5": (_causal(T.T5ForConditionalGeneration, T.T5Config, d_model=32, d_ff=64, d_kv=8, num_layers=1,
                   num_heads=4, decoder_start_token_id=0), "q|v"),
    "bart": (_causal(T.BartForConditionalGeneration, T.BartConfig, d_model=32, encoder_ffn_dim=64, decoder_ffn_dim=64,
                     encoder_layers=1, decoder_layers=1, encoder_attention_heads=4, decoder_attention_heads=4),
             "q_proj|v_proj"),
}


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
    if torch.isnan(b).all():
        return 0.0 if torch.isnan(a).all() else float("inf")
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def labels(seed=1, batch=2, seq=8, ignored=3):
    y = ids(batch, seq, vocab=V, seed=seed)
    y[0, :ignored] = -100
    return y


class Pair:
    """One compiled model serving either its unfused training graph or that graph with the pass run on a copy:
    the same tensors, the same adapter values (random, non-zero), one capture: static unless a test calls it at
    other shapes."""

    def __init__(self, model, spec, kwargs, chunk_tokens=None, dynamic=False, **options):
        self.cm = peftc.compile(model, spec, kwargs=kwargs, fuse_loss=False, dynamic=dynamic, **options)
        torch.manual_seed(1)
        with torch.no_grad():
            for p in self.cm.trainable_parameters():
                p.copy_(torch.randn_like(p) * 0.2)  # B = 0 at init would hide every adapter gradient but B's
        self.plain = self.serving = self.cm.graph_for(**kwargs)
        self.fused = _scheduled(self.plain, FuseLinearCrossEntropy(chunk_tokens), self.cm)
        assert any(n.target is chunked_cross_entropy for n in self.fused.graph.nodes)

    def step(self, graph, kwargs):
        self.cm._replace_graph(self.serving, graph)
        self.serving = graph
        return step(self.cm, kwargs)

    def assert_same_step(self, kwargs, loss_rtol=1e-6, grad_rtol=1e-5):
        loss0, grads0 = self.step(self.plain, kwargs)
        loss1, grads1 = self.step(self.fused, kwargs)
        assert relative(loss1, loss0) <= loss_rtol, (loss1, loss0)
        assert set(grads1) == set(grads0) and grads0
        for name in grads0:
            assert relative(grads1[name], grads0[name]) <= grad_rtol, name
        return loss0, grads0


def step(cm, kwargs):
    for p in cm.parameters():
        p.grad = None
    torch.manual_seed(7)  # the same dropout masks in both graphs: the fused region draws nothing
    out = cm(**kwargs)
    loss = out if isinstance(out, torch.Tensor) else out.loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in cm.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("name", list(MODELS))
def test_same_loss_and_gradients_as_the_unfused_graph(name):
    factory, target = MODELS[name]
    torch.manual_seed(0)
    kwargs = {"input_ids": ids(vocab=V), "labels": labels()}
    pair = Pair(factory().train(), peftc.LoRA(target=target, r=4), kwargs, chunk_tokens=5)  # 16 tokens: 4 chunks
    assert not any(n.target == torch.ops.aten.cross_entropy_loss.default for n in pair.fused.graph.nodes)
    pair.assert_same_step(kwargs)


def test_gemma2_soft_capping_runs_inside_the_chunks():
    torch.manual_seed(0)
    pair = Pair(MODELS["gemma2-softcap"][0]().train(), peftc.LoRA(target="q_proj"),
                {"input_ids": ids(vocab=V), "labels": labels()})
    chunk, outer = pair.fused.peftc_chunked_logits_0.code, pair.fused.code
    assert "tanh" in chunk and "linear" in chunk
    assert "tanh" in pair.plain.code.split("lm_head")[-1] and "tanh" not in outer.split("lm_head")[-1]


def test_default_compile_fuses_and_reports_the_missing_logits():
    torch.manual_seed(0)
    kwargs = {"input_ids": ids(vocab=V), "labels": labels()}
    cm = peftc.compile(MODELS["llama"][0]().train(), peftc.LoRA(target="q_proj|v_proj"), kwargs=kwargs, dynamic=False)
    assert [p.name for p in cm.pipeline.passes][-2:] == [NAME, "recompute-cheap"]
    assert cm.counters[f"{NAME}.fused"] == 1
    out = cm(**kwargs)
    assert torch.isfinite(out.loss)
    out.loss.backward()
    assert all(p.grad is not None for p in cm.trainable_parameters())
    for use in (lambda x: x.shape, lambda x: x.float(), lambda x: x[0], lambda x: torch.softmax(x, -1),
                lambda x: x + 1, lambda x: len(x)):
        with pytest.raises(peftc.PeftcError, match=rf"{NAME}.*fuse_loss=False"):
            use(out.logits)
    assert "not computed" in repr(out.logits)
    report = str(cm.report())
    assert NAME in report and "`logits` are not computed" in report and "fuse_loss=False" in report
    console = Console(width=200)
    with console.capture() as shown:
        console.print(cm.report())  # as `peftc explain` prints it: the table, then the notes
    assert "`logits` are not computed" in shown.get()
    diff = cm.diff(NAME)
    assert "logits_not_computed" in diff and "chunked_cross_entropy" in diff and "fuse_loss=False" in diff
    # A training call without labels has no loss to fuse: real logits.
    assert cm(input_ids=kwargs["input_ids"]).logits.shape == (2, 8, V)


def test_pipeline_order_option_and_idempotence():
    spec = peftc.Spec(peftc.LoRA(target="q_proj"))
    names = [p.name for p in Pipeline.for_spec(spec, prune_grads=True).passes]
    assert names[-3:] == ["prune-grads", NAME, "recompute-cheap"]
    assert NAME not in [p.name for p in Pipeline.for_spec(spec, fuse_loss=False).passes]
    parsed = Pipeline.parse(f"insert-lora{{r=4,target=q_proj}},{NAME}{{chunk_tokens=3}}")
    assert parsed.passes[-1] == FuseLinearCrossEntropy(chunk_tokens=3)
    with pytest.raises(peftc.SpecError, match="chunk_tokens"):
        Pipeline.parse(f"{NAME}{{chunk_tokens=0}}")

    torch.manual_seed(0)
    kwargs = {"input_ids": ids(vocab=V), "labels": labels()}
    cm = peftc.compile(MODELS["llama"][0]().train(), None, kwargs=kwargs, pipeline=parsed, dynamic=False)
    gm = cm.graph_module
    assert "chunked_cross_entropy(peftc_chunked_logits_0" in gm.code and ", 3)" in gm.code
    code = gm.code
    ctx = PassContext(cm.params, cm._info, training=True)
    assert not FuseLinearCrossEntropy(chunk_tokens=3).run(gm, ctx).modified
    assert gm.code == code and not ctx.notes


def test_default_chunk_size_from_vocab_and_hidden():
    assert default_chunk_tokens(32000, 256) == 64  # the floor: smaller chunks would starve the matmul
    assert default_chunk_tokens(4000, 256) == 120  # 2 MiB of fp32 logits and hidden rows
    assert default_chunk_tokens(V, 32) % 8 == 0 and default_chunk_tokens(V, 32) > 1000


def test_ignored_tokens_fill_a_whole_chunk_and_a_whole_batch():
    torch.manual_seed(0)
    kwargs = {"input_ids": ids(vocab=V), "labels": labels(ignored=7)}  # shifted: the first 6 targets are -100
    pair = Pair(MODELS["llama"][0]().train(), peftc.LoRA(target="q_proj|lm_head", r=4), kwargs, chunk_tokens=3)
    pair.assert_same_step(kwargs)
    # Every target ignored: the mean is 0/0 = nan in both, and every gradient is zero in both.
    ignored = {"input_ids": kwargs["input_ids"], "labels": torch.full((2, 8), -100)}
    (loss0, grads0), (loss1, grads1) = pair.step(pair.plain, ignored), pair.step(pair.fused, ignored)
    assert torch.isnan(loss0) and torch.isnan(loss1)
    assert set(grads0) == set(grads1)
    assert all(torch.equal(grads1[n], grads0[n]) for n in grads0)


def test_num_items_in_batch_sum_reduction():
    """HF's Trainer passes num_items_in_batch: the loss is a sum divided by it, after the fused op. (Captured with
    static shapes: with dynamic ones, capturing that keyword fails today, fused or not.)"""
    torch.manual_seed(0)
    kwargs = {"input_ids": ids(vocab=V), "labels": labels(), "num_items_in_batch": torch.tensor(11)}
    pair = Pair(MODELS["llama"][0]().train(), peftc.LoRA(target="q_proj|lm_head", r=4), kwargs, chunk_tokens=4)
    assert "div" in pair.fused.code.split("chunked_cross_entropy")[-1]
    loss, _ = pair.assert_same_step(kwargs)
    mean = pair.cm(input_ids=kwargs["input_ids"], labels=kwargs["labels"]).loss
    kept = (kwargs["labels"][:, 1:] != -100).sum()
    torch.testing.assert_close(loss, mean * kept / 11)  # the sum over 11, not the mean over the kept targets


def test_other_batch_and_sequence_sizes_reuse_the_fused_graph():
    torch.manual_seed(0)
    kwargs = {"input_ids": ids(vocab=V), "labels": labels()}
    pair = Pair(MODELS["gpt2"][0]().train(), peftc.LoRA(target="c_attn", r=4), kwargs, chunk_tokens=7, dynamic=True)
    other = {"input_ids": ids(3, 13, vocab=V, seed=4), "labels": labels(seed=5, batch=3, seq=13, ignored=9)}
    pair.assert_same_step(other)
    assert sum(len(g) for g in pair.cm._graphs.values()) == 1  # dynamic shapes: no second capture


def test_trainable_tied_embedding_gets_its_gradient_from_the_chunks():
    """GPT-2's lm_head is the token embedding; a dense delta on it trains it through the loss and the lookup."""
    torch.manual_seed(0)
    kwargs = {"input_ids": ids(vocab=V), "labels": labels()}
    spec = peftc.Spec(peftc.SparseDelta(target="transformer.wte.weight", density=1.0), peftc.LoRA(target="c_attn"))
    pair = Pair(MODELS["gpt2"][0]().train(), spec, kwargs, chunk_tokens=5)
    _, grads = pair.assert_same_step(kwargs)
    assert grads["transformer.wte.sparse_delta.weight"].abs().sum() > 0


def test_bf16_no_further_from_fp32_than_the_unfused_bf16_graph():
    torch.manual_seed(0)
    model = MODELS["llama"][0]().train()
    kwargs = {"input_ids": ids(2, 16, vocab=V), "labels": labels(seq=16)}
    spec = peftc.LoRA(target="q_proj|v_proj|lm_head", r=4)
    reference = Pair(copy.deepcopy(model), spec, kwargs)
    half = Pair(model.to(torch.bfloat16), spec, kwargs, chunk_tokens=5)
    half.cm.load_adapter_state_dict(reference.cm.adapter_state_dict())
    ref_loss, ref_grads = reference.step(reference.plain, kwargs)
    (loss0, grads0), (loss1, grads1) = half.step(half.plain, kwargs), half.step(half.fused, kwargs)
    # Rounding differs (a chunked sum), so "no further" gets 10% of the unfused graph's own bf16 error as slack.
    assert relative(loss1, ref_loss) <= 1.1 * relative(loss0, ref_loss)
    for name in ref_grads:
        unfused_err, fused_err = relative(grads0[name], ref_grads[name]), relative(grads1[name], ref_grads[name])
        assert 0 < fused_err <= 1.1 * unfused_err, (name, fused_err, unfused_err)


def test_fused_step_peak_is_well_below_the_unfused_one_at_a_larger_vocab():
    torch.manual_seed(0)
    model = T.LlamaForCausalLM(T.LlamaConfig(vocab_size=4096, hidden_size=32, intermediate_size=64,
                                             num_hidden_layers=1, num_attention_heads=4)).train()
    x = ids(2, 256, vocab=4096)
    kwargs = {"input_ids": x, "labels": x}
    pair = Pair(model, peftc.LoRA(target="q_proj|v_proj", r=4), kwargs)  # default chunks: 496 of 512 tokens
    reports = []
    for graph in (pair.plain, pair.fused):
        pair.cm._replace_graph(pair.serving, graph)
        pair.serving = graph
        reports.append(measure_step(pair.cm, (), kwargs))
    plain, fused = reports
    assert fused.peak_bytes < 0.5 * plain.peak_bytes, (fused.peak_bytes, plain.peak_bytes)
    # The logits are never recomputed: the same FLOPs.
    assert fused.forward_flops + fused.backward_flops <= 1.01 * (plain.forward_flops + plain.backward_flops)


def test_eval_graphs_and_calls_without_labels_are_untouched():
    torch.manual_seed(0)
    kwargs = {"input_ids": ids(vocab=V), "labels": labels()}
    cm = peftc.compile(MODELS["llama"][0]().eval(), peftc.LoRA(target="q_proj"), kwargs=kwargs, dynamic=False)
    assert NAME in [p.name for p in cm.pipeline.passes] and f"{NAME}.fused" not in cm.counters
    assert cm(**kwargs).logits.shape == (2, 8, V)
    gm, code = cm.graph_module, cm.graph_module.code
    assert "cross_entropy_loss" in code
    ctx = PassContext(cm.params, cm._info, training=False)
    assert not FuseLinearCrossEntropy().run(gm, ctx).modified and gm.code == code and not ctx.notes
    # A training graph without labels: nothing to fuse, and the pass says why.
    cm.train()
    out = cm(input_ids=kwargs["input_ids"])
    assert isinstance(out.logits, torch.Tensor)
    gm = cm.graph_for(input_ids=kwargs["input_ids"])
    code, ctx = gm.code, PassContext(cm.params, cm._info, training=True)
    assert not FuseLinearCrossEntropy().run(gm, ctx).modified and gm.code == code
    assert any("no cross-entropy loss" in note for note in ctx.notes)


class Distilled(nn.Module):
    """A causal LM whose training loss adds a distillation term on the same logits, computed in the graph."""

    def __init__(self):
        super().__init__()
        self.lm = MODELS["llama"][0]()

    def forward(self, input_ids, labels, teacher):
        logits = self.lm(input_ids=input_ids, use_cache=False).logits
        ce = F.cross_entropy(logits.flatten(0, 1), labels.flatten())
        kl = F.kl_div(logits.log_softmax(-1), teacher.log_softmax(-1), log_target=True, reduction="batchmean")
        return ce + kl


class CustomHead(nn.Module):
    """Soft-capped logits with a bias, class weights and label smoothing, the loss written by hand."""

    def __init__(self, vocab=V, reduction="mean"):
        super().__init__()
        torch.manual_seed(0)
        self.body = nn.Sequential(nn.Embedding(vocab, 16), nn.Linear(16, 16), nn.GELU())
        self.head = nn.Linear(16, vocab)
        self.register_buffer("class_weight", torch.rand(vocab) + 0.5)
        self.reduction = reduction

    def forward(self, x, y):
        logits = torch.tanh(self.head(self.body(x)) / 5.0) * 5.0
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1), weight=self.class_weight,
                               label_smoothing=0.1, reduction=self.reduction)


def test_custom_head_with_class_weights_label_smoothing_and_soft_capping():
    kwargs = {"x": ids(vocab=V), "y": labels()}
    pair = Pair(CustomHead().train(), peftc.LoRA(target=["head", "body.1"], r=2), kwargs, chunk_tokens=3)
    chunk = pair.fused.peftc_chunked_logits_0.code
    assert "tanh" in chunk and "head_lora" in chunk
    pair.assert_same_step(kwargs)


def test_declines_when_the_logits_feed_a_distillation_term():
    torch.manual_seed(0)
    kwargs = {"input_ids": ids(vocab=V), "labels": labels(), "teacher": torch.randn(2, 8, V)}
    cm = peftc.compile(Distilled().train(), peftc.LoRA(target="q_proj"), kwargs=kwargs, dynamic=False)
    assert f"{NAME}.fused" not in cm.counters and cm.counters[f"{NAME}.declined"] == 1
    report = str(cm.report())
    assert "declined" in report and "also feed" in report and "log_softmax" in report
    cm(**kwargs).backward()  # the unfused graph still trains


def test_declines_on_a_classification_head_and_per_token_losses():
    torch.manual_seed(0)
    bert = T.BertForSequenceClassification(T.BertConfig(vocab_size=64, hidden_size=32, intermediate_size=64,
                                                        num_hidden_layers=1, num_attention_heads=4, num_labels=3))
    kwargs = {"input_ids": ids(), "labels": torch.tensor([0, 2])}
    cm = peftc.compile(bert.train(), peftc.LoRA(target="query|value"), kwargs=kwargs, dynamic=False)
    assert cm.counters[f"{NAME}.declined"] == 1 and f"{NAME}.fused" not in cm.counters
    assert "not larger than the hidden size" in str(cm.report())
    assert cm(**kwargs).logits.shape == (2, 3)

    per_token = {"x": ids(vocab=V), "y": labels()}
    cm = peftc.compile(CustomHead(reduction="none").train(), peftc.LoRA(target="head"), kwargs=per_token, dynamic=False)
    assert cm.counters[f"{NAME}.declined"] == 1 and "reduction='none'" in str(cm.report())


def test_no_grad_call_computes_the_loss_only():
    torch.manual_seed(0)
    kwargs = {"input_ids": ids(vocab=V), "labels": labels()}
    pair = Pair(MODELS["llama"][0]().train(), peftc.LoRA(target="q_proj|lm_head"), kwargs, chunk_tokens=5)
    loss0, _ = pair.step(pair.plain, kwargs)
    pair.cm._replace_graph(pair.plain, pair.fused)
    with torch.no_grad():
        loss1 = pair.cm(**kwargs).loss
    assert not loss1.requires_grad and relative(loss1, loss0) <= 1e-6
