"""SparseDelta, BitFit and NormTuning: additive deltas on frozen parameters."""

import copy

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import peftc
from peftc.delta import random_index
from peftc.errors import SpecError
from variants_helpers import Captured, ids, probe, tiny_gpt2, tiny_llama



@pytest.fixture(scope="module")
def llama():
    torch.manual_seed(0)
    model = tiny_llama(hidden_size=64, intermediate_size=128, vocab_size=128)
    ref = copy.deepcopy(model).eval()
    cap = Captured(model, dict(input_ids=ids(vocab=128)), dynamic=False)
    cap.ref = ref
    return cap


@pytest.fixture(scope="module")
def gpt2():
    torch.manual_seed(0)
    model = tiny_gpt2()
    ref = copy.deepcopy(model).eval()
    cap = Captured(model, dict(input_ids=ids()), dynamic=False)
    cap.ref = ref
    return cap


def full_ft_grads(cap):
    """Full fine-tuning gradients of the reference copy for loss = (logits * probe).sum()."""
    ref = cap.ref
    ref.zero_grad()
    for p in ref.parameters():
        p.requires_grad_(True)
    logits = ref(**cap.kwargs).logits
    (logits * probe(logits.shape)).sum().backward()
    return {n: p.grad.clone() for n, p in ref.named_parameters()}


def backward(cap, gm):
    logits = cap.logits(gm)
    (logits * probe(logits.shape)).sum().backward()


def deltas(ctx, method):
    return {p.name: p for p in ctx.params if p.method == method and p.trainable}


RULES = [
    peftc.SparseDelta(target=r".*_proj\.weight", density=0.05, select="random", seed=3),
    peftc.SparseDelta(target="all-linear", density=0.02, select="magnitude"),
    peftc.SparseDelta(target=["embed_tokens", "wte", "norm", "ln_f"], density=0.1, select="magnitude"),
    peftc.SparseDelta(target=r".*(q_proj|c_attn|up_proj|c_fc)\.weight", density=0.1, structure="rows"),
    peftc.SparseDelta(target=r".*(v_proj|c_attn|down_proj|c_proj)\.weight", density=0.1, structure="columns",
                      select="random"),
    peftc.NormTuning(),
    peftc.BitFit(),
]


@pytest.mark.parametrize("which", ["llama", "gpt2"])
@pytest.mark.parametrize("rule", RULES, ids=lambda r: f"{r.kind}-{r.target}"[:40])
@settings(max_examples=2, deadline=None, suppress_health_check=list(HealthCheck))
@given(seed=st.integers(0, 2**16))
def test_identity_at_init_and_gradient_set_is_trainable_set(llama, gpt2, rule, which, seed):
    cap = llama if which == "llama" else gpt2
    if isinstance(rule, peftc.BitFit) and which == "llama":
        with pytest.raises(SpecError, match="selects no bias"):  # Llama has no biases
            cap.rewrite(rule)
        return
    gm, ctx = cap.rewrite(rule)
    with torch.no_grad():
        torch.testing.assert_close(cap.logits(gm), cap.logits(), rtol=0, atol=0)
    # A non-zero delta must change the output, or the test above proves nothing.
    gen = torch.Generator().manual_seed(seed)
    trainable = {p.name: p.tensor for p in ctx.params if p.trainable}
    assert trainable and all(p.role == "adapter" for p in ctx.params if p.trainable)
    for t in trainable.values():
        t.grad = None
    backward(cap, gm)
    got = {n for n, t in trainable.items() if t.grad is not None}
    assert got == set(trainable)
    assert all(p.tensor.grad is None for p in ctx.params if not p.trainable)
    with torch.no_grad():
        for t in trainable.values():
            t.copy_(torch.randn(t.shape, generator=gen))
        assert not torch.allclose(cap.logits(gm), cap.logits())
        for t in trainable.values():
            t.zero_()


@pytest.mark.parametrize("structure", [None, "rows", "columns"])
def test_delta_gradient_equals_full_fine_tuning_gradient(llama, structure):
    rule = peftc.SparseDelta(target=r".*_proj\.weight|embed_tokens|.*norm", density=0.05, structure=structure)
    if structure is not None:  # 1-d norm weights have no columns
        rule = peftc.SparseDelta(target=r".*_proj\.weight|embed_tokens|lm_head", density=0.05, structure=structure)
    gm, ctx = llama.rewrite(rule)
    full = full_ft_grads(llama)
    backward(llama, gm)
    checked = 0
    for p in ctx.params:
        if p.method != "sparse_delta" or not p.trainable:
            continue
        param = ctx.params[p.name + "_index"]
        idx = param.tensor
        base = p.name.replace(".sparse_delta.", ".")
        if structure is None:
            expect = full[base].flatten()[idx]
        else:
            expect = full[base].index_select(0 if structure == "rows" else 1, idx)
        assert p.tensor.grad.shape == p.tensor.shape == expect.shape
        torch.testing.assert_close(p.tensor.grad, expect, rtol=0, atol=1e-6)
        checked += 1
    assert checked >= 15


def test_density_bounds_trainable_parameters_and_optimizer_state(llama):
    rule = peftc.SparseDelta(target=r".*_proj\.weight|embed_tokens|lm_head", density=0.01)
    gm, ctx = llama.rewrite(rule)
    targeted = sum(p.tensor.numel() for p in ctx.params
                   if p.role == "base" and any(s in p.name for s in ("_proj.weight", "embed_tokens", "lm_head")))
    trainable = ctx.params.count(trainable=True)
    assert abs(trainable - 0.01 * targeted) <= 0.01 * (0.01 * targeted), (trainable, targeted)
    params = [p.tensor for p in ctx.params if p.trainable]
    opt = torch.optim.AdamW(params, lr=1e-3)
    backward(llama, gm)
    opt.step()
    state_bytes = sum(t.numel() * t.element_size() for s in opt.state.values() for t in s.values()
                      if isinstance(t, torch.Tensor) and t.dim() > 0)
    assert state_bytes == 2 * 4 * trainable  # exp_avg + exp_avg_sq, float32, the size of the selection
    assert state_bytes <= 0.0101 * 2 * 4 * targeted
    index_bytes = sum(p.tensor.numel() * 8 for p in ctx.params if p.name.endswith("_index"))
    assert index_bytes == 8 * trainable  # one int64 per trained entry, frozen
    with torch.no_grad():
        for p in params:
            p.zero_()


def test_selection_rules(llama):
    name = "model.layers.0.mlp.up_proj.weight"
    w = llama.table[name].tensor
    _, ctx = llama.rewrite(peftc.SparseDelta(target="up_proj", density=0.05))
    idx = ctx.params["model.layers.0.mlp.up_proj.sparse_delta.weight_index"].tensor
    k = round(0.05 * w.numel())
    assert idx.numel() == k
    assert set(idx.tolist()) == set(w.abs().flatten().topk(k).indices.tolist())  # magnitude: largest |W|
    _, a = llama.rewrite(peftc.SparseDelta(target="up_proj", density=0.05, select="random", seed=1))
    _, b = llama.rewrite(peftc.SparseDelta(target="up_proj", density=0.05, select="random", seed=1))
    _, c = llama.rewrite(peftc.SparseDelta(target="up_proj", density=0.05, select="random", seed=2))
    key = "model.layers.0.mlp.up_proj.sparse_delta.weight_index"
    assert torch.equal(a.params[key].tensor, b.params[key].tensor)
    assert not torch.equal(a.params[key].tensor, c.params[key].tensor)
    assert torch.equal(a.params[key].tensor, random_index(w.numel(), 0.05, 1, name))
    _, rows = llama.rewrite(peftc.SparseDelta(target="up_proj", density=0.25, structure="rows"))
    ridx = rows.params[key].tensor
    assert set(ridx.tolist()) == set(w.norm(dim=1).topk(w.shape[0] // 4).indices.tolist())
    assert rows.params["model.layers.0.mlp.up_proj.sparse_delta.weight"].tensor.shape == (w.shape[0] // 4, w.shape[1])


def test_explicit_masks(llama):
    name = "model.layers.1.self_attn.o_proj.weight"
    w = llama.table[name].tensor
    mask = torch.zeros(w.shape, dtype=torch.bool)
    mask[3, 5] = mask[7, :].fill_(True)[0]
    gm, ctx = llama.rewrite(peftc.SparseDelta(masks={name: mask}))
    idx = ctx.params["model.layers.1.self_attn.o_proj.sparse_delta.weight_index"].tensor
    assert torch.equal(idx, mask.flatten().nonzero().squeeze(1))
    assert ctx.params.count(trainable=True) == int(mask.sum())
    row_mask = torch.zeros(w.shape, dtype=torch.bool)
    row_mask[[2, 9]] = True
    _, ctx = llama.rewrite(peftc.SparseDelta(masks={name: row_mask}, structure="rows"))
    assert ctx.params["model.layers.1.self_attn.o_proj.sparse_delta.weight_index"].tensor.tolist() == [2, 9]
    with pytest.raises(SpecError, match="already adapts"):  # rules that differ only in their masks conflict
        llama.rewrite(peftc.Spec(peftc.SparseDelta(masks={name: mask}), peftc.SparseDelta(masks={name: row_mask})))
    with pytest.raises(SpecError, match="not whole rows"):
        llama.rewrite(peftc.SparseDelta(masks={name: mask}, structure="rows"))
    with pytest.raises(SpecError, match="bool tensor of shape"):
        llama.rewrite(peftc.SparseDelta(masks={name: mask.float()}))
    with pytest.raises(SpecError, match="fisher_masks"):
        peftc.SparseDelta(target="q_proj", select="fisher")


def test_fisher_masks_pick_largest_squared_gradients(llama):
    model = llama.ref
    batches = [dict(input_ids=ids(vocab=128, seed=s), labels=ids(vocab=128, seed=s)) for s in (5, 6)]
    before = {n: p.requires_grad for n, p in model.named_parameters()}
    for p in model.parameters():
        p.requires_grad_(False)
    masks = peftc.fisher_masks(model, batches, density=0.02, target=r".*q_proj\.weight")
    assert all(not p.requires_grad for p in model.parameters())  # restored
    assert set(masks) == {f"model.layers.{i}.self_attn.q_proj.weight" for i in range(2)}
    name = "model.layers.0.self_attn.q_proj.weight"
    w = dict(model.named_parameters())[name]
    w.requires_grad_(True)
    score = torch.zeros_like(w)
    for batch in batches:
        (g,) = torch.autograd.grad(model(**batch).loss, [w])
        score += g.square()
    w.requires_grad_(False)
    k = round(0.02 * w.numel())
    assert int(masks[name].sum()) == k
    assert set(masks[name].flatten().nonzero().squeeze(1).tolist()) == set(score.flatten().topk(k).indices.tolist())
    rows = peftc.fisher_masks(model, batches, density=0.25, target=name, structure="rows")
    top_rows = score.sum(1).topk(w.shape[0] // 4).indices
    assert set(rows[name].all(1).nonzero().squeeze(1).tolist()) == set(top_rows.tolist())
    gm, ctx = llama.rewrite(peftc.SparseDelta(masks=masks))
    assert ctx.params.count(trainable=True) == 2 * k
    for n, p in model.named_parameters():
        p.requires_grad_(before[n])


def test_bitfit_and_norm_tuning_select_the_right_parameters(gpt2, llama):
    _, ctx = gpt2.rewrite(peftc.BitFit())
    biases = {n for n in gpt2.table.names("base") if n.endswith(".bias")}
    assert {p.name for p in ctx.params if p.trainable} == {n.replace(".bias", ".bitfit.bias") for n in biases}
    assert all(p.method == "bitfit" for p in ctx.params if p.trainable)
    _, ctx = llama.rewrite(peftc.NormTuning())
    assert {p.name for p in ctx.params if p.trainable} == {
        *(f"model.layers.{i}.{n}.norm_tuning.weight" for i in range(2)
          for n in ("input_layernorm", "post_attention_layernorm")), "model.norm.norm_tuning.weight"}
    _, ctx = gpt2.rewrite(peftc.NormTuning(target="ln_f"))
    assert {p.name for p in ctx.params if p.trainable} == {"transformer.ln_f.norm_tuning.weight",
                                                          "transformer.ln_f.norm_tuning.bias"}
    with pytest.raises(SpecError, match="already adapts"):
        gpt2.rewrite(peftc.Spec(peftc.BitFit(), peftc.NormTuning()))
    gm, ctx = gpt2.rewrite(peftc.Spec(peftc.BitFit(exclude=r".*ln_.*"), peftc.NormTuning()))
    full = full_ft_grads(gpt2)
    backward(gpt2, gm)
    for p in ctx.params:
        if p.trainable:
            base = p.name.replace(f".{p.method}.", ".")
            torch.testing.assert_close(p.tensor.grad, full[base], rtol=0, atol=1e-6)


def test_tied_weight_gets_one_delta_for_both_uses(gpt2):
    """GPT-2 ties lm_head to wte: one delta, its gradient the sum over both uses, like full fine-tuning."""
    gm, ctx = gpt2.rewrite(peftc.SparseDelta(target="wte", density=0.1))
    assert [p.name for p in ctx.params if p.trainable] == ["transformer.wte.sparse_delta.weight"]
    full = full_ft_grads(gpt2)
    backward(gpt2, gm)
    p = ctx.params["transformer.wte.sparse_delta.weight"].tensor
    idx = ctx.params["transformer.wte.sparse_delta.weight_index"].tensor
    torch.testing.assert_close(p.grad, full["transformer.wte.weight"].flatten()[idx], rtol=0, atol=1e-6)


@pytest.mark.parametrize("rule", [peftc.SparseDelta(target="c_attn", density=0.1), peftc.BitFit()])
def test_pass_is_idempotent_and_tagged(gpt2, rule):
    from peftc.pipeline import RULE_PASSES

    gm, ctx = gpt2.rewrite(rule)
    code, table = gm.code, ctx.params.render()
    again = RULE_PASSES[type(rule)](rule).run(gm, ctx)
    assert not again.modified and gm.code == code and ctx.params.render() == table
    tagged = [n for n in gm.graph.nodes if "peftc.delta" in n.meta]
    assert tagged and all(n.meta["peftc.pass"] == RULE_PASSES[type(rule)].name for n in tagged)
    for n in tagged:
        info = n.meta["peftc.delta"]
        assert ctx.params[info["values"]].role == "adapter" and ctx.params[info["values"]].trainable
        assert ctx.params[info["param"]].role == "base"


def test_compiled_model_trains_saves_and_reloads():
    torch.manual_seed(0)
    model = tiny_gpt2().eval()
    x = ids()
    spec = peftc.Spec(peftc.SparseDelta(target="c_fc", density=0.05), peftc.BitFit(target="c_proj"))
    cm = peftc.compile(model, spec, kwargs=dict(input_ids=x), dynamic=False)
    ref = cm(input_ids=x).logits.detach()
    opt = torch.optim.AdamW(cm.trainable_parameters(), lr=1e-2)
    cm.train()
    for _ in range(2):
        loss = cm(input_ids=x, labels=x).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    cm.eval()
    trained = cm(input_ids=x).logits.detach()
    assert not torch.allclose(trained, ref)
    state = cm.adapter_state_dict()
    assert {k.rpartition(".")[2] for k in state} == {"weight", "weight_index", "bias", "bias_index"}  # c_fc: both
    assert state["transformer.h.0.mlp.c_fc.sparse_delta.weight_index"].dtype == torch.int64
    other = peftc.compile(copy.deepcopy(model), spec, kwargs=dict(input_ids=x), dynamic=False)
    other.load_adapter_state_dict(state)
    torch.testing.assert_close(other(input_ids=x).logits, trained)
    assert "insert-sparse-delta" in str(cm.report()) and "index_add" in cm.diff("insert-sparse-delta")


def test_spec_errors_and_files(tmp_path):
    with pytest.raises(SpecError, match="density"):
        peftc.SparseDelta(target="q_proj", density=0)
    with pytest.raises(SpecError, match="structure"):
        peftc.SparseDelta(target="q_proj", structure="blocks")
    with pytest.raises(SpecError, match="target"):
        peftc.SparseDelta()
    path = tmp_path / "spec.toml"
    path.write_text('[[sparse_delta]]\ntarget = "q_proj"\ndensity = 0.02\nselect = "random"\n\n[[bitfit]]\n'
                    '\n[[norm_tuning]]\nexclude = "ln_f"\n')
    spec = peftc.Spec.load(path)
    assert spec.rules == (peftc.SparseDelta(target="q_proj", density=0.02, select="random"), peftc.BitFit(),
                          peftc.NormTuning(exclude="ln_f"))


def test_lora_composes_with_a_delta_on_the_same_weight_in_either_order(llama):
    """LoRA finds a matmul whose weight a delta rewrote to W + delta; both adapters train."""
    sd = peftc.SparseDelta(target=r".*q_proj\.weight", density=0.1)
    lora = peftc.LoRA(target="q_proj", r=2)
    for spec in (peftc.Spec(sd, lora), peftc.Spec(lora, sd)):
        gm, ctx = llama.rewrite(spec)
        trainable = {p.name for p in ctx.params if p.trainable}
        assert {p.method for p in ctx.params if p.trainable} == {"sparse_delta", "lora"}
        assert len(trainable) == 2 * 3  # per layer: delta values, lora_A, lora_B
        with torch.no_grad():
            torch.testing.assert_close(llama.logits(gm), llama.logits(), rtol=0, atol=0)
            for p in ctx.params:
                if p.name.endswith("lora_B.weight"):
                    p.tensor.normal_()
        backward(llama, gm)
        assert {p.name for p in ctx.params if p.tensor.grad is not None} == trainable
        with torch.no_grad():
            for p in ctx.params:
                if p.role == "adapter":
                    p.tensor.grad = None
                    if p.name.endswith("lora_B.weight"):
                        p.tensor.zero_()


def test_deltas_merge_into_the_base_weights():
    """The deltas are parameter-only subgraphs, so CompiledModel.merge() folds them into W exactly."""
    torch.manual_seed(0)
    model = tiny_gpt2().eval()
    x = ids()
    spec = peftc.Spec(peftc.SparseDelta(target=r".*c_fc\.weight", density=0.1, structure="columns"),
                      peftc.BitFit(exclude=r".*ln_.*"), peftc.NormTuning())
    cm = peftc.compile(model, spec, kwargs=dict(input_ids=x), dynamic=False)
    with torch.no_grad():
        for p in cm.trainable_parameters():
            p.add_(torch.randn_like(p) * 0.1)
    merged = cm.merge()
    assert not [n for n, _ in merged.named_parameters() if any(m in n for m in ("delta", "bitfit", "norm_tuning"))]
    torch.testing.assert_close(merged(input_ids=x).logits, cm(input_ids=x).logits, rtol=0, atol=1e-6)
