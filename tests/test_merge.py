"""merge-reparam + fold-params: CompiledModel.merge() folds adapters into base weights with zero overhead."""

from __future__ import annotations

import copy

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

import peftc
from peftc.capture import call_kwargs, capture
from peftc.errors import SpecError
from peftc.params import ParamTable
from peftc.passes.fold_params import FoldParams
from peftc.passes.merge_reparam import MergeReparam
from peftc.pipeline import PassContext



def op_count(gm) -> int:
    return sum(n.op == "call_function" for n in gm.graph.nodes)


def plain_op_count(model: nn.Module, kwargs: dict, training: bool) -> int:
    model = copy.deepcopy(model).train(training)
    return op_count(capture(model, (), call_kwargs(model, kwargs), ParamTable(), dynamic=False))


def randomize_adapters(cm, seed=1, scale=0.3):
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in cm.trainable_parameters():
            p.uniform_(-scale, scale)  # B = 0 at init would make any merge look right


def tiny_llama():
    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                      num_key_value_heads=2, vocab_size=64)
    return LlamaForCausalLM(cfg), {"input_ids": torch.randint(0, 64, (2, 8))}


def base_names(model: nn.Module) -> set[str]:
    return {n for n, _ in model.named_parameters()}


def test_merge_parity_op_count_and_names():
    model, kwargs = tiny_llama()
    spec = peftc.Spec(peftc.LoRA(target="q_proj|v_proj|gate_proj", r=4, alpha=8, dropout=0.1),
                      peftc.LoRA(target="o_proj|down_proj", r=2, alpha=4, use_rslora=True))
    cm = peftc.compile(copy.deepcopy(model).train(), spec, kwargs=kwargs, dynamic=False)
    randomize_adapters(cm)
    merged = cm.merge()  # from a training-mode model: the LoRA dropout goes, the rest of the graph stays
    assert merged.training
    assert merged.counters["merge-reparam.strip-adapter-dropout"] == 6
    assert merged.counters["merge-reparam.lora-linear"] == 10
    assert merged.counters["fold-params.folded"] == 10
    assert op_count(merged.graph_module) == plain_op_count(model, kwargs, training=True)
    assert {n for n, _ in merged.named_parameters()} == base_names(model)
    assert not any(p.requires_grad for p in merged.parameters())

    cm.eval(), merged.eval()
    with torch.no_grad():
        ref, out = cm(**kwargs).logits, merged(**kwargs).logits
    assert torch.allclose(out, ref, rtol=1e-5, atol=1e-5)
    assert op_count(merged._graphs[merged._key((), call_kwargs(model, kwargs))][0]) == \
        plain_op_count(model, kwargs, training=False)

    # cm is untouched and still trains.
    cm.train()
    cm(**kwargs).logits.sum().backward()
    assert all(p.grad is not None for p in cm.trainable_parameters())
    cm.eval()
    with torch.no_grad():
        assert torch.equal(cm(**kwargs).logits, ref)


def test_merge_subset_leaves_the_rest_trainable():
    model, kwargs = tiny_llama()
    cm = peftc.compile(copy.deepcopy(model).eval(), peftc.LoRA(target="q_proj|v_proj", r=4), kwargs=kwargs,
                       dynamic=False)
    randomize_adapters(cm)
    merged = cm.merge(adapters=["model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.v_proj.lora_A.weight",
                                "model.layers.1.self_attn.v_proj.lora_B.weight"])
    assert merged.counters["merge-reparam.lora-linear"] == 2
    left = {n for n, p in merged.named_parameters() if p.requires_grad}
    assert left == {f"model.layers.{i}.self_attn.{m}.lora_{ab}.weight"
                    for i, m in ((0, "v_proj"), (1, "q_proj")) for ab in "AB"}
    assert {n for n, _ in merged.named_parameters()} == base_names(model) | left
    # the method graph: prune-grads (on by default) may rewrite the attention the adapters left feed
    assert op_count(merged.method_graph_for(**kwargs)) == plain_op_count(model, kwargs, training=False) + 2 * 4
    with torch.no_grad():
        assert torch.allclose(merged(**kwargs).logits, cm(**kwargs).logits, rtol=1e-5, atol=1e-5)
    merged(**kwargs).logits.sum().backward()
    assert all(p.grad is not None for n, p in merged.named_parameters() if n in left)
    # The unmerged adapters are the merged module's own copies: training it does not move cm.
    assert all(p.grad is None for p in cm.trainable_parameters())

    with pytest.raises(SpecError, match="names no adapter"):
        cm.merge(adapters=["model.layers.0.self_attn.k_proj"])


def test_merge_gpt2_conv1d_addmm():
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=64, n_positions=16)).eval()
    kwargs = {"input_ids": torch.randint(0, 64, (2, 8))}
    cm = peftc.compile(copy.deepcopy(model), peftc.LoRA(target="c_attn|c_fc", r=4), kwargs=kwargs, dynamic=False)
    randomize_adapters(cm)
    merged = cm.merge()
    assert merged.counters["merge-reparam.lora-addmm"] == 2
    assert op_count(merged.graph_module) == plain_op_count(model, kwargs, training=False)
    with torch.no_grad():
        assert torch.allclose(merged(**kwargs).logits, cm(**kwargs).logits, rtol=1e-5, atol=1e-5)
    assert {n for n, _ in merged.named_parameters()} <= base_names(model) | {"lm_head.weight"}


class MLP(nn.Module):
    def __init__(self, widths, bias):
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(i, o, bias=bias) for i, o in zip(widths, widths[1:]))

    def forward(self, x):
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i < len(self.layers) - 1:
                x = torch.nn.functional.gelu(x)
        return x


def test_passes_are_idempotent():
    model = MLP([4, 6, 3], bias=True).eval()
    cm = peftc.compile(model, peftc.LoRA(target="layers.0", r=2), args=(torch.randn(2, 4),), dynamic=False)
    merged = cm.merge()
    assert merged.counters["fold-params.folded"] == 1
    gm, ctx = merged.graph_module, PassContext(merged.params, merged._info, training=False)
    code = gm.code
    assert MergeReparam().run(gm, ctx).modified is False
    assert FoldParams().run(gm, ctx).modified is False
    assert gm.code == code and not ctx.counters


def test_bf16_merge_error_no_larger_than_hf_merge_and_unload():
    from peft import LoraConfig, get_peft_model, set_peft_model_state_dict

    torch.manual_seed(0)
    model = MLP([64, 128, 64], bias=True).to(torch.bfloat16).eval()
    x = torch.randn(64, 64).to(torch.bfloat16)
    cm = peftc.compile(copy.deepcopy(model), peftc.LoRA(target="layers.0|layers.1", r=8, alpha=16), args=(x,),
                       dynamic=False)
    randomize_adapters(cm, scale=0.05)
    adapters = cm.adapter_state_dict()

    reference = copy.deepcopy(model).float()  # fp32 unmerged: the same bf16 base values, exactly upcast
    with torch.no_grad():
        h = x.float()
        for i, layer in enumerate(reference.layers):
            key = f"layers.{i}"
            h_next = layer(h) + (h @ adapters[f"{key}.lora_A.weight"].T @ adapters[f"{key}.lora_B.weight"].T) * 2.0
            h = torch.nn.functional.gelu(h_next) if i == 0 else h_next
    ref = h

    hf = get_peft_model(copy.deepcopy(model), LoraConfig(target_modules=["layers.0", "layers.1"], r=8,
                                                         lora_alpha=16))
    set_peft_model_state_dict(hf, {f"base_model.model.{k}": v for k, v in adapters.items()})
    with torch.no_grad():
        assert torch.allclose(hf(x).float(), cm(x).float(), atol=2e-2)  # same adapters, unmerged
        hf_err = (hf.merge_and_unload()(x).float() - ref).abs().mean()
        merged = cm.merge()
        assert all(p.dtype == torch.bfloat16 for p in merged.parameters())
        ours_err = (merged(x).float() - ref).abs().mean()
    plain = capture(copy.deepcopy(model), (x,), {}, ParamTable(), dynamic=False)
    assert op_count(merged.graph_module) == op_count(plain)
    assert ours_err <= hf_err, (ours_err, hf_err)


@settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(widths=st.lists(st.integers(2, 12), min_size=2, max_size=4), bias=st.booleans(), r=st.integers(1, 4),
       alpha=st.floats(0.5, 16), rslora=st.booleans(), data=st.data())
def test_merge_parity_property(widths, bias, r, alpha, rslora, data):
    torch.manual_seed(0)
    model = MLP(widths, bias).eval()
    n = len(widths) - 1
    chosen = data.draw(st.lists(st.integers(0, n - 1), min_size=1, max_size=n, unique=True))
    x = torch.randn(3, widths[0])
    target = [f"layers.{i}" for i in chosen]
    cm = peftc.compile(copy.deepcopy(model), peftc.LoRA(target=target, r=r, alpha=alpha, use_rslora=rslora),
                       args=(x,), dynamic=False)
    randomize_adapters(cm, seed=len(widths))
    merged = cm.merge()
    with torch.no_grad():
        assert torch.allclose(merged(x), cm(x), rtol=1e-5, atol=1e-5)
    assert op_count(merged.graph_module) == op_count(capture(copy.deepcopy(model), (x,), {}, ParamTable(),
                                                             dynamic=False))
    assert {k for k, _ in merged.named_parameters()} == base_names(model)


def test_merge_conv2d_lora():
    from benchmarks.models import ResNet, randomize_batch_norm

    torch.manual_seed(0)
    model = ResNet((4, 8, 8))
    randomize_batch_norm(model)
    model.eval()
    x = torch.randn(2, 3, 8, 8)
    targets = ["stages.2.0.conv1", "stages.2.0.conv2", "stages.2.0.down.0", "head"]
    cm = peftc.compile(copy.deepcopy(model), peftc.LoRA(target=targets, r=2, alpha=4), args=(x,), dynamic=False)
    randomize_adapters(cm)
    merged = cm.merge()
    assert merged.counters["merge-reparam.lora-conv2d"] == 3
    assert merged.counters["merge-reparam.lora-linear"] == 1
    with torch.no_grad():
        assert torch.allclose(merged(x), cm(x), rtol=1e-5, atol=1e-5)
    assert op_count(merged.graph_module) == op_count(capture(copy.deepcopy(model), (x,), {}, ParamTable(),
                                                             dynamic=False))
    assert {n for n, _ in merged.named_parameters()} == base_names(model)


def tiny_llama_1():
    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                      num_key_value_heads=2, vocab_size=64)
    return LlamaForCausalLM(cfg).eval(), {"input_ids": torch.randint(0, 64, (2, 8))}


def test_merge_ia3_output_and_feedforward():
    model, kwargs = tiny_llama_1()
    cm = peftc.compile(copy.deepcopy(model), peftc.IA3(target="k_proj|v_proj|down_proj", feedforward="down_proj"),
                       kwargs=kwargs, dynamic=False)
    randomize_adapters(cm)
    merged = cm.merge()
    assert merged.counters["merge-reparam.ia3-output"] == 2
    assert merged.counters["merge-reparam.ia3-feedforward"] == 1
    with torch.no_grad():
        assert torch.allclose(merged(**kwargs).logits, cm(**kwargs).logits, rtol=1e-5, atol=1e-5)
    assert op_count(merged.graph_module) == plain_op_count(model, kwargs, training=False)
    assert {n for n, _ in merged.named_parameters()} == base_names(model)


def test_merge_ia3_scales_the_bias_too():
    model = MLP([4, 6, 3], bias=True).eval()
    x = torch.randn(5, 4)
    cm = peftc.compile(copy.deepcopy(model), peftc.IA3(target="layers.0|layers.1", feedforward="layers.1"),
                       args=(x,), dynamic=False)
    randomize_adapters(cm)
    merged = cm.merge()
    assert merged.counters["merge-reparam.ia3-output-bias"] == 1
    with torch.no_grad():
        assert torch.allclose(merged(x), cm(x), rtol=1e-5, atol=1e-6)
    assert {n for n, _ in merged.named_parameters()} == base_names(model)  # the scaled bias keeps its name
    assert op_count(merged.graph_module) == op_count(capture(copy.deepcopy(model), (x,), {}, ParamTable(),
                                                             dynamic=False))


def test_fold_params_folds_the_prefix_projection_mlp():
    """No rule needed: the prefix MLP reads only (frozen, once merged) parameters, so fold-params evaluates it."""
    model, kwargs = tiny_llama_1()
    cm = peftc.compile(copy.deepcopy(model), peftc.Prefix(length=3, projection=True), kwargs=kwargs, dynamic=False)
    randomize_adapters(cm, scale=0.1)
    merged = cm.merge()
    assert merged.counters["fold-params.folded"] >= 1
    with torch.no_grad():
        assert torch.allclose(merged(**kwargs).logits, cm(**kwargs).logits, rtol=1e-5, atol=1e-6)
    assert {n for n, _ in merged.named_parameters()} == base_names(model)
    linears = sum(n.target == torch.ops.aten.linear.default for n in merged.graph_module.graph.nodes)
    assert linears == 8  # q, k, v, o, gate, up, down, lm_head: none of the projection MLP's is left


def test_merge_of_a_pruned_training_model():
    """merge() runs its rules before prune-grads, so a pipeline with prune-grads merges too, and prune-grads still
    fuses the dropout of the adapters left trainable."""
    torch.manual_seed(0)
    model = MLP([6, 8, 8, 4], bias=True).train()
    x = torch.randn(5, 6)
    spec = peftc.Spec(peftc.LoRA(target="layers.0|layers.1|layers.2", r=2, dropout=0.2))
    cm = peftc.compile(copy.deepcopy(model), spec, args=(x,), dynamic=False)  # prune-grads: on by default
    randomize_adapters(cm)
    merged = cm.merge(adapters=["layers.0", "layers.2"])
    assert merged.counters["merge-reparam.lora-linear"] == 2
    assert merged.counters["prune-grads.dropout-linear"] == 1
    merged(x).sum().backward()
    assert {n for n, p in merged.named_parameters() if p.grad is not None} == {"layers.1.lora_A.weight",
                                                                              "layers.1.lora_B.weight"}
    cm.eval(), merged.eval()
    with torch.no_grad():
        assert torch.allclose(merged(x), cm(x), rtol=1e-5, atol=1e-6)


class EinsumNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(4, 3)

    def forward(self, x):
        return torch.einsum("bi,oi->bo", x, self.proj.weight)


def test_merge_refuses_what_no_rule_merges():
    from peftc.errors import PassError

    x = torch.randn(2, 4)
    cm = peftc.compile(EinsumNet(), peftc.LoRA(target="proj", r=2), args=(x,), dynamic=False)
    assert cm.merge().counters["merge-reparam.tag-lora"] == 1  # einsum LoRA merges by its tag (peftc/merge.py)
    with pytest.raises(PassError, match="no merge rule matched how `proj.lora_A.weight` is applied"):
        cm.merge(adapters=["proj.lora_A.weight"])  # A without its B cannot fold
