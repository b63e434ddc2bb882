"""prune-grads: same gradients as the unpruned graph, less saved for backward, fires only where it helps."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

import peftc
from peftc.memory import measure_step
from peftc.passes.prune_grads import PruneGrads, grad_nodes
from peftc.pipeline import PassContext



def tiny_llama(dtype=torch.float32, layers=2) -> tuple[nn.Module, dict]:
    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=layers, num_attention_heads=2,
                      num_key_value_heads=2, vocab_size=64)
    model = LlamaForCausalLM(cfg).to(dtype).train()
    return model, {"input_ids": torch.randint(0, 64, (2, 8))}


class PatchNet(nn.Module):
    """A linear patch embedding under a frozen conv/BN trunk: adapters below convs and eval-mode BatchNorm."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Linear(12, 8)
        self.conv1, self.bn1 = nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.conv2, self.bn2 = nn.Conv2d(8, 8, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(8)
        self.head = nn.Linear(8, 5)

    def forward(self, x):
        h = self.embed(x).permute(0, 3, 1, 2)
        h = torch.relu(self.bn1(self.conv1(h))) + h
        h = torch.relu(self.bn2(self.conv2(h)))
        return self.head(h.mean((2, 3)))


def patch_net() -> tuple[nn.Module, dict]:
    torch.manual_seed(0)
    model = PatchNet()
    for bn in (model.bn1, model.bn2):
        bn.running_mean.uniform_(-1, 1)
        bn.running_var.uniform_(0.5, 2)
        bn.weight.data.uniform_(0.5, 1.5)
        bn.bias.data.uniform_(-1, 1)
    return model.eval(), {"x": torch.randn(2, 6, 6, 12)}


def compile_pair(model, spec, kwargs):
    """The same model compiled without prune-grads and by default (with it), sharing base weights and adapters;
    neither recomputes (recompute-cheap would hide what prune-grads saves)."""
    plain = peftc.compile(copy.deepcopy(model), spec, kwargs=kwargs, dynamic=False, prune_grads=False,
                          recompute=False)
    pruned = peftc.compile(copy.deepcopy(model), spec, kwargs=kwargs, dynamic=False, recompute=False)
    torch.manual_seed(1)
    with torch.no_grad():
        for p in plain.trainable_parameters():
            p.uniform_(-0.3, 0.3)  # B = 0 at init would hide every adapter gradient but B's
    pruned.load_adapter_state_dict(plain.adapter_state_dict())
    return plain, pruned


_llama_pairs: dict = {}


def llama_pair(*rules, layers=2):
    """tiny_llama(layers) and compile_pair of it, made once per spec: several tests check the same pair, and each
    capture costs seconds. Tests read the pair (gradients are reset by every step), never change it."""
    key = (repr(rules), layers)
    if key not in _llama_pairs:
        model, kwargs = tiny_llama(layers=layers)
        _llama_pairs[key] = (model, kwargs, *compile_pair(model, peftc.Spec(*rules), kwargs))
    return _llama_pairs[key]


def loss_of(out):
    logits = out.logits if hasattr(out, "logits") else out
    return logits.float().pow(2).mean()


def grads(cm, kwargs, seed=7, loss_fn=loss_of):
    torch.manual_seed(seed)
    for p in cm.trainable_parameters():
        p.grad = None
    loss = loss_fn(cm(**kwargs))
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in cm.named_parameters() if p.requires_grad}


def assert_same_grads(plain, pruned, kwargs, rtol=1e-6, loss_fn=loss_of):
    loss0, g0 = grads(plain, kwargs, loss_fn=loss_fn)
    loss1, g1 = grads(pruned, kwargs, loss_fn=loss_fn)
    assert torch.allclose(loss0, loss1, rtol=1e-6, atol=0)
    assert g0.keys() == g1.keys() and g0
    for name in g0:
        err = (g0[name] - g1[name]).norm() / g0[name].norm()
        assert err <= rtol, f"{name}: relative gradient error {err:.2e}"


@pytest.mark.parametrize("rule", [
    peftc.LoRA(target="q_proj|v_proj", r=4, alpha=8),
    peftc.LoRA(target="q_proj|v_proj", r=4, alpha=8, dropout=0.1),
    peftc.LoRA(target="all-linear", r=4, alpha=8, dropout=0.2, use_rslora=True),
], ids=["lora", "lora-dropout", "rslora-dropout-all-linear"])
def test_llama_gradients_match_unpruned(rule):
    _, kwargs, plain, pruned = llama_pair(rule)
    assert_same_grads(plain, pruned, kwargs)
    n_dropout = sum(str(n.target) == "aten.dropout.default" for n in pruned.graph_module.graph.nodes)
    assert n_dropout == 0
    assert pruned.counters["prune-grads.causal-sdpa"] == 2  # one per layer
    if rule.dropout:
        # Every LoRA dropout was fused with the adapter's A matmul, and none was left storing a mask.
        assert pruned.counters["prune-grads.dropout-linear"] == plain.counters["insert-lora.inserted"]
        assert measure_step(pruned, (), kwargs, loss_of).saved_bytes < measure_step(plain, (), kwargs,
                                                                                     loss_of).saved_bytes


@pytest.mark.parametrize("rules", [
    (peftc.LoRA(target="q_proj|v_proj", r=4, dropout=0.1, use_dora=True),),
    (peftc.IA3(target="k_proj|v_proj|down_proj", feedforward="down_proj"),),
    (peftc.Prefix(length=3, projection=True),),
    (peftc.SparseDelta(target="o_proj", density=0.1), peftc.NormTuning(target="input_layernorm")),
], ids=["dora-dropout", "ia3", "prefix-projection", "sparse-delta+norm-tuning"])
def test_other_methods_gradients_match_unpruned(rules):
    model, kwargs = tiny_llama(layers=1)
    plain, pruned = compile_pair(model, peftc.Spec(*rules), kwargs)
    assert_same_grads(plain, pruned, kwargs)


def test_dropout_stores_no_mask():
    """With dropout, the pruned graph saves what the graph without dropout saves (x once, shared by q and v)."""
    model, kwargs, _, pruned = llama_pair(peftc.LoRA(target="q_proj|v_proj", r=4, alpha=8, dropout=0.1))
    no_dropout = peftc.compile(copy.deepcopy(model), peftc.LoRA(target="q_proj|v_proj", r=4), kwargs=kwargs,
                               dynamic=False)
    rng_states = 2 * 2 * torch.get_rng_state().numel()  # one saved RNG state per adapter and layer
    saved = measure_step(pruned, (), kwargs, loss_of).saved_bytes
    assert saved <= measure_step(no_dropout, (), kwargs, loss_of).saved_bytes + rng_states


def test_conv_and_batch_norm_save_nothing_for_frozen_weights():
    model, kwargs = patch_net()
    spec = peftc.Spec(peftc.LoRA(target="embed|head", r=4))
    plain, pruned = compile_pair(model, spec, kwargs)
    assert_same_grads(plain, pruned, kwargs)
    assert pruned.counters["prune-grads.frozen-conv"] == 2
    assert pruned.counters["prune-grads.frozen-batch-norm"] == 2
    plain_saved = measure_step(plain, (), kwargs, loss_of).saved_bytes
    pruned_saved = measure_step(pruned, (), kwargs, loss_of).saved_bytes
    act = 2 * 8 * 6 * 6 * 4  # one [2, 8, 6, 6] fp32 activation
    # Unpruned saves conv1's input, bn1's input, conv2's input, bn2's input; pruned saves none of them.
    assert plain_saved - pruned_saved >= 2 * act


def test_does_not_fire_below_the_lowest_adapter():
    """Adapters only on the head: the trunk reads no trainable tensor, so nothing there is rewritten."""
    model, kwargs = patch_net()
    spec = peftc.Spec(peftc.LoRA(target="head", r=4))
    plain, pruned = compile_pair(model, spec, kwargs)
    assert pruned.counters["prune-grads.frozen-conv"] == 0
    assert pruned.counters["prune-grads.frozen-batch-norm"] == 0
    assert pruned.graph_module.code == plain.graph_module.code
    g = pruned.graph_module
    needs = grad_nodes(g, pruned.params)
    assert all(n.name.startswith(("head", "add", "output")) or n.op == "output" for n in needs), \
        sorted(n.name for n in needs)


def test_idempotent_and_honest_modified():
    _, _, _, pruned = llama_pair(peftc.LoRA(target="q_proj|v_proj", r=4, alpha=8, dropout=0.1))
    gm = pruned.graph_module
    before = gm.code
    ctx = PassContext(pruned.params, pruned._info, training=True)
    assert PruneGrads().run(gm, ctx).modified is False
    assert gm.code == before and not ctx.counters


def test_bf16_adapters_share_one_cast_of_x():
    # One layer: x needs no gradient, so sharing its cast cannot reorder a bf16 gradient sum. (Deeper, the shared
    # cast sums the adapters' input gradients in fp32 before rounding once: different, and closer to exact.)
    model, kwargs = tiny_llama(torch.bfloat16, layers=1)
    spec = peftc.Spec(peftc.LoRA(target="q_proj|k_proj|v_proj", r=4))
    plain, pruned = compile_pair(model, spec, kwargs)
    # q, k and v read one normed x: three fp32 casts become one.
    assert pruned.counters["prune-grads.shared-cast"] == 2
    assert_same_grads(plain, pruned, kwargs)
    assert measure_step(pruned, (), kwargs, loss_of).saved_bytes < measure_step(plain, (), kwargs,
                                                                                 loss_of).saved_bytes


def test_seeded_dropout_replays_mask_without_touching_rng():
    from peftc.passes.prune_grads import dropout_linear, seeded_dropout

    torch.manual_seed(3)
    x = torch.randn(4, 6, requires_grad=True)
    w = torch.randn(3, 6, requires_grad=True)
    torch.manual_seed(5)
    ref = torch.nn.functional.linear(torch.nn.functional.dropout(x, 0.3), w)
    ref.sum().backward()
    gx, gw = x.grad.clone(), w.grad.clone()
    after_ref = torch.rand(1)
    x.grad = w.grad = None
    torch.manual_seed(5)
    out = dropout_linear(x, w, None, 0.3)
    out.sum().backward()
    assert torch.equal(out, ref) and torch.allclose(x.grad, gx) and torch.allclose(w.grad, gw)
    assert torch.equal(torch.rand(1), after_ref)  # backward's replay left the RNG stream where forward left it
    torch.manual_seed(5)
    y = seeded_dropout(x, 0.3)
    torch.manual_seed(5)
    assert torch.equal(y, torch.nn.functional.dropout(x, 0.3))


def test_padded_mask_is_not_taken_for_causal():
    """With padding the mask is not the causal one: the runtime check keeps it, and gradients still match."""
    model, kwargs = tiny_llama(layers=1)
    kwargs = {**kwargs, "attention_mask": torch.tensor([[1] * 8, [0, 0] + [1] * 6])}
    plain, pruned = compile_pair(model, peftc.Spec(peftc.LoRA(target="q_proj|v_proj", r=4)), kwargs)
    assert pruned.counters["prune-grads.causal-sdpa"] == 1
    assert_same_grads(plain, pruned, kwargs)
    from peftc.passes.prune_grads import mask_is_causal

    causal = torch.ones(4, 4, dtype=torch.bool).tril()
    assert mask_is_causal(causal.expand(2, 1, 4, 4))
    assert not mask_is_causal(causal.T) and not mask_is_causal(causal.float())


def test_bert_training_dropouts_store_no_masks():
    """BERT in training mode: the model's own hidden dropouts become seeded dropouts, the LoRA ones fuse."""
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    model = BertModel(BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                                 vocab_size=64, attention_probs_dropout_prob=0.0)).train()
    kwargs = {"input_ids": torch.randint(0, 64, (2, 8))}
    plain, pruned = compile_pair(model, peftc.Spec(peftc.LoRA(target="query|value", r=4, dropout=0.1)), kwargs)
    assert pruned.counters["prune-grads.dropout-linear"] == 2
    assert pruned.counters["prune-grads.seeded-dropout"] == 2  # after the attention output and the FFN
    loss = lambda out: out.last_hidden_state.pow(2).mean()  # noqa: E731
    assert measure_step(pruned, (), kwargs, loss).saved_bytes < measure_step(plain, (), kwargs, loss).saved_bytes
    assert_same_grads(plain, pruned, kwargs, loss_fn=loss)


class DropoutHead(nn.Module):
    """An adapted layer, then dropout, then a frozen head (T5's decoder output ends so, before lm_head)."""

    def __init__(self):
        super().__init__()
        self.body, self.drop, self.head = nn.Linear(8, 8), nn.Dropout(0.3), nn.Linear(8, 16)

    def forward(self, x):
        return self.head(self.drop(torch.relu(self.body(x))))


def test_dropout_before_a_frozen_linear_is_seeded_not_fused():
    """dropout_linear only where the linear needs its input (a trainable weight); a frozen head keeps its linear,
    so the fused loss still finds it, and the dropout saves an RNG state instead of x."""
    torch.manual_seed(0)
    kwargs = {"x": torch.randn(4, 8)}
    plain, pruned = compile_pair(DropoutHead().train(), peftc.Spec(peftc.LoRA(target="body", r=2)), kwargs)
    assert pruned.counters["prune-grads.seeded-dropout"] == 1 and "prune-grads.dropout-linear" not in pruned.counters
    assert sum(n.target == torch.ops.aten.linear.default and n.args[1].target == "head.weight"
               for n in pruned.graph_module.graph.nodes) == 1
    assert_same_grads(plain, pruned, kwargs, loss_fn=lambda out: out.pow(2).mean())
