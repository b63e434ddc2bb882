"""LoRA variants: DoRA, LoRA-FA, rank/alpha patterns, convolutions, per-slice adapters on fused weights."""

import copy

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

import peftc
from peftc.errors import SpecError
from peftc.spec import pattern_value
from variants_helpers import Captured, ids, probe, tiny_gpt2, tiny_llama



class TinyCNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv1d(3, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 6, 3, stride=2, padding=1)
        self.proj = nn.Linear(6, 6)
        self.head = nn.Linear(6, 4)

    def forward(self, x):
        h = torch.relu(self.conv1(x))  # (N, 8, L)
        h = self.conv2(h.unsqueeze(-1).expand(-1, -1, -1, 4))  # (N, 6, L/2, 2)
        return self.head(self.proj(h.mean((2, 3))))


@pytest.fixture(scope="module")
def llama():
    torch.manual_seed(0)
    model = tiny_llama()
    cap = Captured(copy.deepcopy(model), dict(input_ids=ids()))
    cap.ref = model.eval()
    return cap


@pytest.fixture(scope="module")
def gpt2():
    torch.manual_seed(0)
    model = tiny_gpt2(resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    cap = Captured(copy.deepcopy(model), dict(input_ids=ids()))
    cap.ref = model.eval()
    return cap


@pytest.fixture(scope="module")
def cnn():
    torch.manual_seed(0)
    model = TinyCNN().eval()
    cap = Captured(copy.deepcopy(model), dict(x=torch.randn(2, 3, 8, generator=torch.Generator().manual_seed(0))))
    cap.ref = model
    return cap


def hf_name(name):
    return (name.replace("base_model.model.", "").replace(".default", "")
            .replace("lora_magnitude_vector.weight", "lora_magnitude_vector"))


def hf_peft(model, **config):
    from peft import LoraConfig, get_peft_model

    return get_peft_model(copy.deepcopy(model), LoraConfig(**config))


def randomize(ctx, hf, seed=3):
    """Give both models the same non-zero adapter weights (B = 0 would hide most of the math)."""
    gen = torch.Generator().manual_seed(seed)
    hf_params = {hf_name(n): p for n, p in hf.named_parameters() if "lora_" in n}
    ours = {p.name: p.tensor for p in ctx.params if p.role == "adapter"}
    assert sorted(hf_params) == sorted(ours)  # same adapter names, HF PEFT's keys
    with torch.no_grad():
        for name, t in ours.items():
            assert t.shape == hf_params[name].shape, name
            t.add_(torch.randn(t.shape, generator=gen) * 0.1)
            hf_params[name].copy_(t)
    return ours, hf_params


def compare(cap, gm, hf, ours, hf_params, out_atol=1e-5, grad_rtol=1e-4):
    for t in [*ours.values(), *hf_params.values()]:
        t.grad = None
    a, b = cap.logits(gm), hf(**cap.kwargs)
    b = b.logits if hasattr(b, "logits") else b
    torch.testing.assert_close(a, b, rtol=0, atol=out_atol)
    cot = probe(a.shape)
    (a * cot).sum().backward()
    (b * cot).sum().backward()
    for name, t in ours.items():
        if t.requires_grad:
            g, ref = t.grad, hf_params[name].grad
            assert (g - ref).norm() <= grad_rtol * ref.norm() + 1e-12, name


# ---- DoRA ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("which,target", [("llama", ["q_proj", "v_proj", "down_proj"]), ("gpt2", ["c_attn", "c_fc"])])
def test_dora_matches_hf_peft(llama, gpt2, which, target):
    cap = llama if which == "llama" else gpt2
    gm, ctx = cap.rewrite(peftc.LoRA(target=target, r=4, alpha=8, use_dora=True))
    hf = hf_peft(cap.ref, target_modules=target, r=4, lora_alpha=8, use_dora=True).eval()
    # The magnitude starts at HF's value (the row norms of W), before any change.
    for p in ctx.params:
        if p.name.endswith("lora_magnitude_vector"):
            ref = dict(hf.named_parameters())[f"base_model.model.{p.name}.default.weight"]
            torch.testing.assert_close(p.tensor, ref.detach(), rtol=0, atol=1e-6)
    ours, hf_params = randomize(ctx, hf)
    compare(cap, gm, hf, ours, hf_params)


def test_dora_dropout_path_matches_hf_peft():
    """In training with lora dropout, HF recomputes the base as W·dropout(x) (no bias); same RNG, same result."""
    torch.manual_seed(0)
    model = tiny_gpt2(resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    hf = hf_peft(model, target_modules=["c_attn"], r=4, lora_alpha=8, use_dora=True, lora_dropout=0.3).train()
    cap = Captured(copy.deepcopy(model), dict(input_ids=ids()), training=True)
    gm, ctx = cap.rewrite(peftc.LoRA(target=["c_attn"], r=4, alpha=8, use_dora=True, dropout=0.3))
    assert any(n.target == torch.ops.aten.dropout.default for n in gm.graph.nodes)
    ours, hf_params = randomize(ctx, hf)
    torch.manual_seed(11)
    a = cap.logits(gm)
    torch.manual_seed(11)
    b = hf(**cap.kwargs).logits
    torch.testing.assert_close(a, b, rtol=0, atol=1e-5)
    torch.manual_seed(12)
    assert not torch.allclose(cap.logits(gm), a)  # dropout is live, so the match above is not vacuous


# ---- LoRA-FA ---------------------------------------------------------------------------------------------------
def saved_bytes(cap, gm):
    """Bytes of distinct storages autograd saves for backward in one forward."""
    seen = {}

    def pack(t):
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        cap.logits(gm)
    return sum(seen.values())


def test_lora_fa_freezes_a_and_saves_the_adapter_input(llama):
    plain, ctx_plain = llama.rewrite(peftc.LoRA(target=["q_proj", "v_proj"], r=4))
    fa, ctx_fa = llama.rewrite(peftc.LoRA(target=["q_proj", "v_proj"], r=4, freeze_a=True))
    a_names = {p.name for p in ctx_fa.params if ".lora_A." in p.name}
    assert len(a_names) == 4 and not any(ctx_fa.params[n].trainable for n in a_names)
    assert {p.name for p in ctx_fa.params if p.trainable} == {p.name for p in ctx_plain.params if p.trainable} - a_names
    batch, seq = llama.kwargs["input_ids"].shape
    hidden = llama.model.config.hidden_size
    layers = llama.model.config.num_hidden_layers
    # q_proj and v_proj read the same normed hidden state: one (batch, seq, hidden) float32 tensor per layer that
    # only lora_A's weight gradient needs.
    stored = layers * batch * seq * hidden * 4
    assert saved_bytes(llama, plain) - saved_bytes(llama, fa) >= stored
    # The same through peftc.memory's storage tracker, which counts only what the step allocated.
    from peftc.memory import measure_step

    def loss(out):
        return (out.logits * probe(out.logits.shape)).sum()

    steps = [measure_step(gm, kwargs=llama.kwargs, loss_fn=loss) for gm in (plain, fa)]
    assert steps[0].saved_bytes - steps[1].saved_bytes >= stored
    assert steps[0].grad_bytes - steps[1].grad_bytes == sum(ctx_fa.params[n].tensor.numel() * 4 for n in a_names)
    for ctx in (ctx_plain, ctx_fa):
        for p in ctx.params:
            p.tensor.grad = None
    logits = llama.logits(fa)
    (logits * probe(logits.shape)).sum().backward()
    assert all(ctx_fa.params[n].tensor.grad is None for n in a_names)
    assert all(p.tensor.grad is not None for p in ctx_fa.params if p.trainable)


# ---- rank / alpha patterns -------------------------------------------------------------------------------------
def test_pattern_matching_follows_hf_get_pattern_key():
    from peft.utils.other import get_pattern_key

    pattern = {"q_proj": 8, r"layers\.1\.self_attn\.v_proj": 2, "proj": 5}
    for module in ["model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.v_proj",
                   "model.layers.0.self_attn.v_proj", "model.layers.0.mlp.gate_proj", "xq_proj", "lm_head"]:
        key = get_pattern_key(pattern.keys(), module)
        assert pattern_value(pattern, module, 4) == pattern.get(key, 4), module


def test_rank_and_alpha_patterns_match_hf_peft(llama):
    config = dict(target_modules=["q_proj", "v_proj", "o_proj"], r=4, lora_alpha=8,
                  rank_pattern={"q_proj": 8, r"layers\.1\.self_attn\.v_proj": 2}, alpha_pattern={"v_proj": 16})
    gm, ctx = llama.rewrite(peftc.LoRA(target=config["target_modules"], r=4, alpha=8,
                                       rank_pattern=config["rank_pattern"], alpha_pattern=config["alpha_pattern"]))
    hf = hf_peft(llama.ref, **config).eval()
    assert ctx.params["model.layers.0.self_attn.q_proj.lora_A.weight"].tensor.shape[0] == 8
    assert ctx.params["model.layers.1.self_attn.v_proj.lora_A.weight"].tensor.shape[0] == 2
    assert ctx.params["model.layers.0.self_attn.v_proj.lora_A.weight"].tensor.shape[0] == 4
    ours, hf_params = randomize(ctx, hf)  # also checks every shape against HF's
    compare(llama, gm, hf, ours, hf_params)


# ---- convolutions ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("use_dora", [False, True])
def test_conv_lora_matches_hf_peft(cnn, use_dora):
    target = ["conv1", "conv2", "head"]
    gm, ctx = cnn.rewrite(peftc.LoRA(target=target, r=2, alpha=4, use_dora=use_dora))
    assert ctx.params["conv2.lora_A.weight"].tensor.shape == (2, 8, 3, 3)
    assert ctx.params["conv2.lora_B.weight"].tensor.shape == (6, 2, 1, 1)
    hf = hf_peft(cnn.ref, target_modules=target, r=2, lora_alpha=4, use_dora=use_dora).eval()
    torch.testing.assert_close(gm(**cnn.kwargs), cnn.ref(**cnn.kwargs), rtol=0, atol=0)
    ours, hf_params = randomize(ctx, hf)
    compare(cnn, gm, hf, ours, hf_params)


def test_all_linear_leaves_convolutions_alone(cnn):
    _, ctx = cnn.rewrite(peftc.LoRA(target="all-linear"))
    ours = {p.name for p in ctx.params if p.role == "adapter"}
    # a plain module has no get_output_embeddings: HF PEFT adapts every Linear, the head included
    assert ours == {f"{m}.lora_{w}.weight" for m in ("proj", "head") for w in "AB"}
    hf = hf_peft(copy.deepcopy(cnn.ref), target_modules="all-linear")
    assert ours == {hf_name(n) for n, p in hf.named_parameters() if p.requires_grad}


# ---- per-slice adapters on a fused weight ----------------------------------------------------------------------
def test_slices_on_gpt2_fused_c_attn(gpt2):
    n = gpt2.model.config.n_embd
    rule = peftc.LoRA(target="c_attn", slices={"q": (0, n), "v": (2 * n, 3 * n)}, r={"q": 8, "v": 4},
                      alpha={"q": 16, "v": 4})
    gm, ctx = gpt2.rewrite(rule)
    names = {p.name: tuple(p.tensor.shape) for p in ctx.params if p.role == "adapter" and ".h.0." in p.name}
    assert names == {"transformer.h.0.attn.c_attn.lora_A.q.weight": (8, n),
                     "transformer.h.0.attn.c_attn.lora_B.q.weight": (n, 8),
                     "transformer.h.0.attn.c_attn.lora_A.v.weight": (4, n),
                     "transformer.h.0.attn.c_attn.lora_B.v.weight": (n, 4)}
    torch.testing.assert_close(gpt2.logits(gm), gpt2.logits(gpt2.ref), rtol=0, atol=0)
    gen = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for p in ctx.params:
            if p.role == "adapter":
                p.tensor.copy_(torch.randn(p.tensor.shape, generator=gen) * 0.1)
    # Reference: the eager model with each slice's delta added to its columns of c_attn's output (keys untouched).
    ref = copy.deepcopy(gpt2.ref)
    tensors = {p.name: p.tensor for p in ctx.params}

    def hook(name):
        def add_slices(module, inputs, out):
            x = inputs[0]
            out = out.clone()
            for key, (start, end), s in (("q", (0, n), 16 / 8), ("v", (2 * n, 3 * n), 4 / 4)):
                a, b = tensors[f"{name}.lora_A.{key}.weight"], tensors[f"{name}.lora_B.{key}.weight"]
                out[..., start:end] += s * (x @ a.T @ b.T)
            return out
        return add_slices

    for i, block in enumerate(ref.transformer.h):
        block.attn.c_attn.register_forward_hook(hook(f"transformer.h.{i}.attn.c_attn"))
    out = gpt2.logits(gm)
    torch.testing.assert_close(out, ref(**gpt2.kwargs).logits, rtol=0, atol=1e-5)
    (out * probe(out.shape)).sum().backward()
    assert all(p.tensor.grad is not None for p in ctx.params if p.trainable)
    with torch.no_grad():
        for p in ctx.params:
            if p.role == "adapter":
                p.tensor.grad = None


def test_slices_errors(gpt2):
    with pytest.raises(SpecError, match="overlap"):
        peftc.LoRA(target="c_attn", slices={"q": (0, 40), "k": (32, 64)})
    with pytest.raises(SpecError, match="only per-slice"):
        peftc.LoRA(target="c_attn", r={"q": 8})
    with pytest.raises(SpecError, match="one value per slice"):
        peftc.LoRA(target="c_attn", slices={"q": (0, 32), "v": (64, 96)}, r={"q": 8})
    with pytest.raises(SpecError, match="does not combine"):
        peftc.LoRA(target="c_attn", slices={"q": (0, 32)}, use_dora=True)
    with pytest.raises(SpecError, match="ends at 200"):
        gpt2.rewrite(peftc.LoRA(target="c_attn", slices={"q": (0, 200)}))


def test_variant_spec_file(tmp_path):
    path = tmp_path / "spec.toml"
    path.write_text('[[lora]]\ntarget = "c_attn"\nslices = { q = [0, 768], v = [1536, 2304] }\n'
                    'r = { q = 8, v = 4 }\nalpha = 16\nfreeze_a = true\n\n'
                    '[[lora]]\ntarget = ["q_proj", "v_proj"]\nuse_dora = true\nrank_pattern = { q_proj = 16 }\n')
    spec = peftc.Spec.load(path)
    sliced, dora = spec.rules
    assert sliced.slices == {"q": (0, 768), "v": (1536, 2304)} and sliced.freeze_a
    assert sliced.scaling_for("c_attn", "q") == 2.0 and sliced.scaling_for("c_attn", "v") == 4.0
    assert dora.use_dora and dora.rank_for("model.layers.0.self_attn.q_proj") == 16
    assert dora.rank_for("model.layers.0.self_attn.v_proj") == 8


# ---- properties over every variant -----------------------------------------------------------------------------
VARIANTS = [
    ("llama", peftc.LoRA(target=["q_proj", "v_proj"], r=4, use_dora=True)),
    ("llama", peftc.LoRA(target="all-linear", r=2, freeze_a=True)),
    ("llama", peftc.LoRA(target=["q_proj", "down_proj"], rank_pattern={"down_proj": 6}, alpha_pattern={"q_proj": 3})),
    ("gpt2", peftc.LoRA(target=["c_attn", "c_proj"], r=4, use_dora=True, freeze_a=True)),
    ("gpt2", peftc.LoRA(target="c_attn", slices={"q": (0, 32), "v": (64, 96)}, r={"q": 4, "v": 2})),
    ("cnn", peftc.LoRA(target=["conv1", "conv2"], r=2, use_dora=True)),
    ("cnn", peftc.LoRA(target=["conv2", "head"], r=3, freeze_a=True)),
    ("cnn", peftc.LoRA(target="proj", slices={"a": (0, 2), "b": (4, 6)}, r=2)),  # a fused nn.Linear
]


@pytest.mark.parametrize("case", VARIANTS, ids=lambda c: f"{c[0]}-{c[1].target}")
@settings(max_examples=2, deadline=None, suppress_health_check=list(HealthCheck))
@given(seed=st.integers(0, 2**16))
def test_identity_at_init_gradient_set_and_idempotence(llama, gpt2, cnn, case, seed):
    from peftc.passes.insert_lora import InsertLora

    which, rule = case
    cap = {"llama": llama, "gpt2": gpt2, "cnn": cnn}[which]
    gm, ctx = cap.rewrite(rule)
    with torch.no_grad():
        torch.testing.assert_close(cap.logits(gm), cap.logits(cap.ref), rtol=0, atol=1e-6 if rule.use_dora else 0)
    tags = [n.meta["peftc.lora"] for n in gm.graph.nodes if "peftc.lora" in n.meta]
    assert tags and all(ctx.params[name].role == "adapter" for t in tags for a in t["adapters"].values()
                        for name in a[:2])
    assert all(ctx.params[t["weight"]].role == "base" for t in tags)
    code, table = gm.code, ctx.params.render()
    assert not InsertLora(rule).run(gm, ctx).modified and gm.code == code and ctx.params.render() == table
    adapters = {p.name: p.tensor for p in ctx.params if p.role == "adapter"}
    trainable = {p.name for p in ctx.params if p.trainable}
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # B = 0 would starve A of gradient; move every adapter off its init
        saved = {n: t.clone() for n, t in adapters.items()}
        for t in adapters.values():
            t.add_(torch.randn(t.shape, generator=gen) * 0.05)
    for t in adapters.values():
        t.grad = None
    out = cap.logits(gm)
    (out * probe(out.shape)).sum().backward()
    assert {n for n, t in adapters.items() if t.grad is not None} == trainable
    assert all(p.tensor.grad is None for p in ctx.params if p.role != "adapter")
    with torch.no_grad():
        for n, t in adapters.items():
            t.copy_(saved[n])
            t.grad = None


@pytest.mark.parametrize("spec", [
    peftc.Spec(peftc.SparseDelta(target=r"0\.weight", density=0.2), peftc.BitFit(target="2"), peftc.NormTuning()),
    peftc.Spec(peftc.LoRA(target=["0", "2"], r=2, use_dora=True, freeze_a=True)),
], ids=["deltas", "dora-fa"])
def test_half_precision_base_trains_fp32_adapters(spec):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.LayerNorm(16), nn.Linear(16, 4)).to(torch.bfloat16).eval()
    x = torch.randn(3, 5, 8, dtype=torch.bfloat16)
    cm = peftc.compile(model, spec, args=(x,), dynamic=False)
    assert torch.equal(cm(x), model(x))  # exact at init, even with DoRA's m/‖W‖ = 1 computed in fp32
    params = cm.trainable_parameters()
    assert params and {p.dtype for p in params} == {torch.float32}
    cm(x).float().sum().backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in params)
