"""LoRA on raw parameters (`target_parameters`, peftc/lora_parameters.py) against HF PEFT's lora.ParamWrapper: a tiny
Qwen3-MoE (3-d expert stacks read by transformers' grouped_mm, and the router's raw 2-d weight), and a hand-written
module with a raw 2-d weight in a matmul and experts stored (E, in, out) (`is_transposed`, as GPT-OSS) read per token.
"""

import copy

import pytest
import torch
from torch import nn

import peftc
from peftc.errors import SpecError
from peftc.lora_parameters import peft_names

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

MOE_PARAMETERS = ["mlp.experts.gate_up_proj", "experts.down_proj", "mlp.gate.weight"]


def close(a, b):
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def randomized(pm):
    """HF PEFT's model with random non-zero adapters (B starts at zero, which would test nothing)."""
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for p in pm.parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    return pm.eval()


def peft_grads(pm):
    """{HF key without `base_model.model.` and `.default`: gradient}."""
    return {n.removeprefix("base_model.model.").replace(".default", ""): p.grad for n, p in pm.named_parameters()
            if p.requires_grad}


# ---- a tiny Qwen3-MoE --------------------------------------------------------------------------------------------
def tiny_qwen3_moe():
    cfg = transformers.Qwen3MoeConfig(vocab_size=64, hidden_size=32, intermediate_size=64, moe_intermediate_size=16,
                                      num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                                      num_experts=4, num_experts_per_tok=2, max_position_embeddings=64)
    torch.manual_seed(0)
    return transformers.Qwen3MoeForCausalLM(cfg).eval()


@pytest.fixture(scope="module")
def moe(tmp_path_factory):
    """(base model, HF PEFT model with random adapters, its saved directory, peftc compiled from that directory)."""
    model = tiny_qwen3_moe()
    config = peft.LoraConfig(r=2, lora_alpha=4, target_modules=[], target_parameters=MOE_PARAMETERS)
    pm = randomized(peft.get_peft_model(copy.deepcopy(model), config))
    directory = tmp_path_factory.mktemp("moe_peft")
    pm.save_pretrained(directory)
    x = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(1))
    cm = peftc.compile(copy.deepcopy(model), directory, kwargs=dict(input_ids=x, labels=x), dynamic=False)
    return model, pm, directory, cm, x


@pytest.mark.filterwarnings("ignore")
def test_moe_spec_from_peft_counts_and_names(moe):
    model, pm, directory, cm, _ = moe
    rule = peftc.Spec.from_peft(directory).rules[0]
    assert rule == peftc.LoRA(r=2, alpha=4, target_parameters=MOE_PARAMETERS)
    assert rule.target is None  # parameters alone: no module adapter, as HF's target_modules=[]
    assert cm.parameter_counts()[0] == sum(p.numel() for p in pm.parameters() if p.requires_grad) == 968
    shapes = {p.name: tuple(p.tensor.shape) for p in cm.params if p.role == "adapter"}
    # HF's shapes: A [r·E, in], B [out, r·E] per expert stack; the router weight [4, 32] as a 2-d weight
    assert shapes == {"model.layers.0.mlp.experts.gate_up_proj_adapter.lora_A.weight": (8, 32),
                      "model.layers.0.mlp.experts.gate_up_proj_adapter.lora_B.weight": (32, 8),
                      "model.layers.0.mlp.experts.down_proj_adapter.lora_A.weight": (8, 16),
                      "model.layers.0.mlp.experts.down_proj_adapter.lora_B.weight": (32, 8),
                      "model.layers.0.mlp.gate.lora_A.weight": (2, 32),
                      "model.layers.0.mlp.gate.lora_B.weight": (4, 2)}
    # HF nests one ParamWrapper per parameter of `experts`, in its parameter order: gate_up_proj is the inner one
    assert peft_names(cm)["model.layers.0.mlp.experts.gate_up_proj_adapter.lora_A.weight"] == \
        "model.layers.0.mlp.experts.base_layer.lora_A.weight"


@pytest.mark.filterwarnings("ignore")
def test_moe_outputs_and_gradients_match_peft(moe):
    model, pm, _, cm, x = moe
    ours = cm(input_ids=x, labels=x)
    theirs = pm(input_ids=x, labels=x)
    assert not torch.allclose(ours.logits, model(input_ids=x).logits, atol=1e-3)  # the adapters change the model
    close(ours.logits, theirs.logits)
    ours.loss.backward()
    theirs.loss.backward()
    grads = peft_grads(pm)
    keys = peft_names(cm)
    adapters = {p.name: p.tensor for p in cm.params if p.role == "adapter"}
    for name, tensor in adapters.items():
        assert tensor.grad is not None and tensor.grad.abs().sum() > 0, name
        torch.testing.assert_close(tensor.grad, grads[keys[name]], atol=1e-5, rtol=1e-4)
    assert all(p.tensor.grad is None and not p.tensor.requires_grad for p in cm.params if p.role == "base")
    for t in adapters.values():
        t.grad = None


@pytest.mark.filterwarnings("ignore")
def test_moe_merge_matches_peft_merge(moe):
    model, pm, _, cm, x = moe
    merged = cm.merge()
    hf = copy.deepcopy(pm).merge_and_unload()
    close(merged(input_ids=x, labels=x).logits, hf(input_ids=x).logits)
    names = {n for n, _ in merged.named_parameters()}
    assert not any("lora" in n for n in names)
    ours, theirs = dict(merged.named_parameters()), dict(hf.named_parameters())
    for leaf in ("experts.gate_up_proj", "experts.down_proj", "gate.weight"):
        name = f"model.layers.0.mlp.{leaf}"
        assert not torch.equal(theirs[name], model.get_parameter(name))
        close(ours[name], theirs[name])


@pytest.mark.filterwarnings("ignore")
def test_moe_save_pretrained_loads_in_peft(moe, tmp_path):
    model, _, _, cm, x = moe
    assert cm.save_pretrained(tmp_path) == "peft"
    loaded = peft.PeftModel.from_pretrained(copy.deepcopy(model), tmp_path).eval()
    assert loaded.peft_config["default"].target_parameters == set(MOE_PARAMETERS)
    assert loaded.peft_config["default"].target_modules in (set(), [], None)
    close(loaded(input_ids=x).logits, cm(input_ids=x, labels=x).logits)


# ---- a hand-written module: a raw 2-d weight in a matmul, (E, in, out) experts gathered per token ---------------
class Mix(nn.Module):
    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(8, 8) * 0.3)  # used as x @ w: stored (in, out), adapted as stored

    def forward(self, x):
        return x @ self.w


class TransposedExperts(nn.Module):
    """GPT-OSS's layout: up [E, in, out], down [E, in, out]; each token's expert read by indexing."""

    def __init__(self, experts=3, dim=8, hidden=12):
        super().__init__()
        self.is_transposed = True
        self.up = nn.Parameter(torch.randn(experts, dim, hidden) * 0.3)
        self.down = nn.Parameter(torch.randn(experts, hidden, dim) * 0.3)

    def forward(self, x, expert):
        h = torch.relu(torch.bmm(x.unsqueeze(1), self.up[expert]))
        return torch.bmm(h, self.down[expert]).squeeze(1)


class Toy(nn.Module):
    def __init__(self):
        super().__init__()
        self.mix = Mix()
        self.experts = TransposedExperts()
        self.head = nn.Linear(8, 4)

    def forward(self, x, expert):
        return self.head(self.experts(self.mix(x), expert))


TOY_PARAMETERS = ["mix.w", "experts.up", "experts.down"]


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    torch.manual_seed(0)
    model = Toy().eval()
    x, expert = torch.randn(6, 8), torch.tensor([0, 2, 1, 2, 0, 1])
    config = peft.LoraConfig(r=2, lora_alpha=3, target_modules=[], target_parameters=TOY_PARAMETERS)
    pm = randomized(peft.get_peft_model(copy.deepcopy(model), config))
    directory = tmp_path_factory.mktemp("toy_peft")
    pm.save_pretrained(directory)
    cm = peftc.compile(copy.deepcopy(model), peftc.LoRA(r=2, alpha=3, target_parameters=TOY_PARAMETERS),
                       args=(x, expert))
    return model, pm, directory, cm, (x, expert)


@pytest.mark.filterwarnings("ignore")
def test_toy_identity_at_init_then_load_adapter_matches_peft(toy):
    model, pm, directory, cm, args = toy
    close(cm(*args), model(*args))  # B = 0
    a = next(p.tensor for p in cm.params if p.name == "experts.up_adapter.lora_A.weight")
    assert a.shape == (6, 8) and a.abs().sum() > 0  # [r·E, in]: `in` is dim 1 of an (E, in, out) stack
    assert cm.parameter_counts()[0] == sum(p.numel() for p in pm.parameters() if p.requires_grad)
    cm.load_adapter(directory)
    assert not torch.allclose(cm(*args), model(*args), atol=1e-3)
    close(cm(*args), pm(*args))
    merged = cm.merge()
    close(merged(*args), pm(*args))
    hf_merged = copy.deepcopy(pm).merge_and_unload()
    close(merged(*args), hf_merged(*args))
    unloaded = cm.merge_and_unload()  # the model's own class, merged weights, nothing of peftc
    assert type(unloaded) is Toy
    close(unloaded.experts.up, hf_merged.experts.up)
    close(unloaded(*args), hf_merged(*args))
    assert cm.save_pretrained(directory.parent / "toy_ours") == "peft"
    loaded = peft.PeftModel.from_pretrained(copy.deepcopy(model), directory.parent / "toy_ours").eval()
    close(loaded(*args), cm(*args))


@pytest.mark.filterwarnings("ignore")
def test_bfloat16_weights_keep_float32_adapters_and_w_dtype(toy):
    model, _, directory, _, (x, expert) = toy
    half = copy.deepcopy(model).to(torch.bfloat16)
    cm = peftc.compile(half, directory, args=(x.bfloat16(), expert), dynamic=False)
    assert all(p.tensor.dtype == torch.float32 for p in cm.params if p.role == "adapter")
    hf = peft.PeftModel.from_pretrained(copy.deepcopy(half), directory).eval()
    ours = cm(x.bfloat16(), expert)
    assert ours.dtype == torch.bfloat16
    torch.testing.assert_close(ours, hf(x.bfloat16(), expert), atol=3e-2, rtol=3e-2)
    merged = cm.merge()
    assert merged.get_parameter("experts.up").dtype == torch.bfloat16
    torch.testing.assert_close(merged(x.bfloat16(), expert), ours, atol=3e-2, rtol=3e-2)


@pytest.mark.filterwarnings("ignore")
def test_two_adapters_switched_and_summed_as_peft(toy, tmp_path):
    model, _, directory, _, args = toy
    config = peft.LoraConfig(r=2, lora_alpha=3, target_modules=[], target_parameters=TOY_PARAMETERS)
    other = randomized(peft.get_peft_model(copy.deepcopy(model), config))
    with torch.no_grad():
        for p in other.parameters():
            if p.requires_grad:
                p.mul_(-1.7)
    other.save_pretrained(tmp_path)
    cm = peftc.compile(copy.deepcopy(model), directory, args=args, dynamic=False)
    cm.load_adapter(tmp_path, adapter_name="other")
    hf = peft.PeftModel.from_pretrained(copy.deepcopy(model), directory).eval()
    hf.load_adapter(tmp_path, adapter_name="other")
    for active in (["other"], ["default", "other"]):
        cm.set_adapter(active)
        hf.base_model.set_adapter(active)
        close(cm(*args), hf(*args))


@pytest.mark.filterwarnings("ignore")
def test_modules_and_parameters_in_one_rule(toy, tmp_path):
    model, _, _, _, args = toy
    rule = peftc.LoRA(target="all-linear", r=2, alpha=3, target_parameters=["experts.up"])
    cm = peftc.compile(copy.deepcopy(model), rule, args=args, dynamic=False)
    config = peft.LoraConfig(r=2, lora_alpha=3, target_modules="all-linear", target_parameters=["experts.up"])
    pm = randomized(peft.get_peft_model(copy.deepcopy(model), config))
    assert cm.parameter_counts()[0] == sum(p.numel() for p in pm.parameters() if p.requires_grad)
    pm.save_pretrained(tmp_path)
    cm.load_adapter(tmp_path)
    close(cm(*args), pm(*args))


def test_errors_say_what_and_how(toy):
    model, _, _, _, args = toy
    with pytest.raises(SpecError, match=r"'experts\.upp' names no parameter.*closest: experts\.up"):
        peftc.compile(copy.deepcopy(model), peftc.LoRA(target_parameters=["experts.upp"]), args=args)
    with pytest.raises(SpecError, match="1-d|2-d weights and 3-d"):
        peftc.compile(copy.deepcopy(model), peftc.LoRA(target_parameters=["head.bias"]), args=args)
    with pytest.raises(SpecError, match="HF PEFT refuses both"):
        peftc.compile(copy.deepcopy(model), peftc.LoRA(target="head", target_parameters=["head.weight"]), args=args)
    with pytest.raises(SpecError, match="list of parameter names"):
        peftc.LoRA(target_parameters="experts.up")
    with pytest.raises(SpecError, match="dropout"):
        peftc.LoRA(target_parameters=["experts.up"], dropout=0.1)
    with pytest.raises(SpecError, match="use_dora"):
        peftc.LoRA(target_parameters=["experts.up"], use_dora=True)
    # a spec file says the same
    spec = peftc.Spec.loads('[[lora]]\nr = 2\ntarget_parameters = ["experts.up"]\n', "toml")
    assert spec.rules[0].target is None and spec.rules[0].target_parameters == ("experts.up",)
    assert peftc.Spec.from_dict(spec.to_dict()) == spec


@pytest.mark.filterwarnings("ignore")
def test_onnx_export_unmerged(toy, tmp_path):
    pytest.importorskip("onnxruntime")
    from peftc.errors import ExportError

    model, _, directory, _, args = toy
    cm = peftc.compile(copy.deepcopy(model), directory, args=args)
    # unmerged: the adapters' ops as ONNX ops (merged, the graph is the base model's); checked in onnxruntime
    assert cm.export_onnx(tmp_path / "toy.onnx", merged=False, dynamic=False).max_abs_diff < 1e-5
    with pytest.raises(ExportError, match="scaling"):
        cm.export_onnx(tmp_path / "toy_inputs.onnx", merged=False, dynamic=False, adapters="inputs")
