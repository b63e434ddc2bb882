"""combine_lora against HF PEFT's LoraModel.add_weighted_adapter on a tiny Llama with the same adapter weights."""

import copy
import json

import peft
import pytest
import torch
from peft.utils import get_peft_model_state_dict
from safetensors.torch import save_file

import peftc
from peftc.combine import COMBINATION_TYPES, CombineError, combine_lora
from peftc.errors import SpecError
from peftc.peft_format import _plain

from conftest import ids, tiny_gpt2, tiny_llama

PREFIX = "base_model.model."


def hf_model(adapters: dict[str, dict], seed=0, make=tiny_llama):
    """A tiny model with one LoRA adapter per (name, LoraConfig kwargs), every A and B random; and its base copy."""
    torch.manual_seed(seed)
    base = make()
    fresh = copy.deepcopy(base)
    names = list(adapters)
    model = peft.get_peft_model(base, peft.LoraConfig(**adapters[names[0]]), adapter_name=names[0])
    for name in names[1:]:
        model.add_adapter(name, peft.LoraConfig(**adapters[name]))
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_" in n:
                p.normal_(0, 0.5)
    return model.eval(), fresh


def hf_adapter(model, name):
    sd = get_peft_model_state_dict(model, adapter_name=name, save_embedding_layers=False)
    return {k.removeprefix(PREFIX): v.detach().clone() for k, v in sd.items()}


def hf_config(model, name):
    return {k: _plain(v) for k, v in model.peft_config[name].to_dict().items()}


def model_order(model):
    return [n for n, _ in model.base_model.model.named_modules()]


def ours(model, names, weights, combination_type, **kwargs):
    """combine_lora as CompiledModel.add_weighted_adapter calls it: with the model's module order."""
    kwargs.setdefault("module_order", model_order(model))
    return combine_lora([hf_adapter(model, n) for n in names], [hf_config(model, n) for n in names], weights,
                        combination_type, **kwargs)


def hf_combined(model, names, weights, combination_type, **kwargs):
    model.add_weighted_adapter(names, weights, "combined", combination_type=combination_type, **kwargs)
    return hf_adapter(model, "combined"), hf_config(model, "combined")


def delta(sd, module, scale=1.0):
    return sd[f"{module}.lora_B.weight"] @ sd[f"{module}.lora_A.weight"] * scale


def assert_same_config(mine, theirs):
    assert mine["r"] == theirs["r"] and mine["lora_alpha"] == theirs["lora_alpha"]
    assert sorted(mine["target_modules"]) == sorted(theirs["target_modules"])
    assert {k: v for k, v in mine.items() if k != "target_modules"} == \
        {k: v for k, v in theirs.items() if k != "target_modules"}


QV = dict(target_modules=["q_proj", "v_proj"])
SAME_RANK = {"x": dict(r=4, lora_alpha=8, **QV), "y": dict(r=4, lora_alpha=16, **QV),
             "z": dict(r=4, lora_alpha=4, target_modules=["v_proj", "down_proj"])}


@pytest.mark.parametrize("combination_type,kwargs", [
    ("linear", {}), ("cat", {}), ("ties", dict(density=0.5)), ("ties", dict(density=0.3,
     majority_sign_method="frequency")), ("magnitude_prune", dict(density=0.4))])
def test_deterministic_types_give_hf_s_weights_and_config(combination_type, kwargs):
    model, _ = hf_model(SAME_RANK)
    names, weights = ["x", "y", "z"], [0.7, -1.3, 0.4]  # a negative weight, different scalings, partial overlap
    sd, config = ours(model, names, weights, combination_type, **kwargs)
    theirs, their_config = hf_combined(model, names, weights, combination_type, **kwargs)
    assert list(sd) == list(theirs)
    for k in theirs:
        torch.testing.assert_close(sd[k], theirs[k], atol=1e-5, rtol=0)
    assert_same_config(config, their_config)


DIFFERENT_RANKS = {"x": dict(r=2, lora_alpha=4, **QV), "y": dict(r=6, lora_alpha=3, **QV),
                   "z": dict(r=4, lora_alpha=8, target_modules=["q_proj", "o_proj"])}


def test_cat_of_different_ranks_is_hf_s_and_exact():
    model, _ = hf_model(DIFFERENT_RANKS)
    names, weights = ["x", "y", "z"], [1.0, 0.5, -2.0]
    sd, config = ours(model, names, weights, "cat")
    theirs, their_config = hf_combined(model, names, weights, "cat")
    assert config["r"] == 12 and list(sd) == list(theirs)
    for k in theirs:
        torch.testing.assert_close(sd[k], theirs[k], atol=1e-5, rtol=0)
    assert_same_config(config, their_config)
    # B A = Σ w_i s_i B_i A_i on a module that only two adapters adapt
    m = "model.layers.1.self_attn.v_proj"
    a, b = hf_adapter(model, "x"), hf_adapter(model, "y")
    torch.testing.assert_close(delta(sd, m), delta(a, m, 1.0 * 2.0) + delta(b, m, 0.5 * 0.5), atol=1e-5, rtol=0)


@pytest.mark.parametrize("combination_type,kwargs", [
    ("svd", {}), ("svd", dict(svd_rank=3)), ("svd", dict(svd_rank=5, svd_clamp=0.9, svd_full_matrices=False)),
    ("ties_svd", dict(density=0.5)), ("magnitude_prune_svd", dict(density=0.6, svd_rank=8))])
def test_svd_types_give_hf_s_delta_weights(combination_type, kwargs):
    model, _ = hf_model(DIFFERENT_RANKS)
    names, weights = ["x", "y", "z"], [1.0, 0.5, -2.0]
    sd, config = ours(model, names, weights, combination_type, **kwargs)
    theirs, their_config = hf_combined(model, names, weights, combination_type, **kwargs)
    assert_same_config(config, their_config)
    assert list(sd) == list(theirs) and all(sd[k].shape == theirs[k].shape for k in sd)
    for key in [k for k in theirs if k.endswith(".lora_A.weight")]:
        m = key.removesuffix(".lora_A.weight")
        torch.testing.assert_close(delta(sd, m), delta(theirs, m), atol=1e-4, rtol=1e-4)


def test_full_rank_svd_is_the_exact_weighted_sum():
    model, _ = hf_model(DIFFERENT_RANKS)
    sd, _ = ours(model, ["x", "y"], [1.0, 0.5], "svd", svd_rank=12)  # rank 2 + 6 fits in 12
    a, b = hf_adapter(model, "x"), hf_adapter(model, "y")
    m = "model.layers.0.self_attn.q_proj"
    torch.testing.assert_close(delta(sd, m), delta(a, m, 2.0) + delta(b, m, 0.5 * 0.5), atol=1e-5, rtol=0)


def _seed_after_injection(model, seed):
    """HF PEFT initialises the new adapter (drawing random numbers) before it combines: reseed right there."""
    inject = model.base_model.inject_adapter

    def reseeded(*args, **kwargs):
        inject(*args, **kwargs)
        torch.manual_seed(seed)
    model.base_model.inject_adapter = reseeded


@pytest.mark.parametrize("combination_type", ["dare_linear", "dare_ties", "dare_linear_svd", "dare_ties_svd"])
def test_dare_draws_hf_s_masks_from_the_same_generator_state(combination_type):
    model, _ = hf_model(SAME_RANK)
    names, weights = ["x", "y", "z"], [0.7, -1.3, 0.4]
    torch.manual_seed(5)
    sd, config = ours(model, names, weights, combination_type, density=0.5)
    _seed_after_injection(model, 5)
    theirs, their_config = hf_combined(model, names, weights, combination_type, density=0.5)
    assert_same_config(config, their_config)
    assert list(sd) == list(theirs)
    for k in theirs:
        if combination_type.endswith("_svd"):
            if k.endswith(".lora_A.weight"):
                m = k.removesuffix(".lora_A.weight")
                torch.testing.assert_close(delta(sd, m), delta(theirs, m), atol=1e-4, rtol=1e-4)
        else:
            torch.testing.assert_close(sd[k], theirs[k], atol=1e-5, rtol=0)


@pytest.mark.parametrize("combination_type,kwargs", [
    ("cat", {}), ("ties", dict(density=0.5)), ("dare_linear_svd", dict(density=0.5)), ("ties_svd", dict(density=0.3))])
def test_gpt2_conv1d_adapters_combine_in_hf_s_transposed_layout(combination_type, kwargs):
    cfg = dict(target_modules=["c_attn", "c_fc"], fan_in_fan_out=True)
    model, _ = hf_model({"x": dict(r=4, lora_alpha=8, **cfg), "y": dict(r=4, lora_alpha=2, **cfg)}, make=tiny_gpt2)
    torch.manual_seed(1)
    sd, config = ours(model, ["x", "y"], [0.8, 0.6], combination_type, **kwargs)
    _seed_after_injection(model, 1)
    theirs, their_config = hf_combined(model, ["x", "y"], [0.8, 0.6], combination_type, **kwargs)
    assert_same_config(config, their_config)
    assert list(sd) == list(theirs)
    for k in [k for k in theirs if k.endswith(".lora_A.weight")]:
        m = k.removesuffix(".lora_A.weight")
        if combination_type.endswith("svd"):
            torch.testing.assert_close(delta(sd, m), delta(theirs, m), atol=1e-4, rtol=1e-4)
        else:
            torch.testing.assert_close(sd[k], theirs[k], atol=1e-5, rtol=0)
            torch.testing.assert_close(sd[m + ".lora_B.weight"], theirs[m + ".lora_B.weight"], atol=1e-5, rtol=0)


def test_dare_linear_keeps_about_density_and_rescales_by_its_inverse():
    model, _ = hf_model(SAME_RANK)
    torch.manual_seed(0)
    a = hf_adapter(model, "x")
    sd, _ = combine_lora([a, a], [hf_config(model, "x")] * 2, [1.0, 0.0], "dare_linear", density=0.25)
    key = "model.layers.0.self_attn.q_proj.lora_B.weight"
    root = 2.0 ** 0.5  # √(w s) with w = 1, s = 8/4
    kept = sd[key] != 0
    assert 0.1 < kept.float().mean() < 0.4
    torch.testing.assert_close(sd[key][kept], (a[key] * root / 0.25)[kept], atol=1e-5, rtol=1e-5)


def test_the_module_order_decides_dare_s_draws_when_adapters_adapt_different_modules():
    model, _ = hf_model({"x": dict(r=4, target_modules=["q_proj"]), "y": dict(r=4, target_modules=["v_proj"])})
    torch.manual_seed(3)
    sd, _ = ours(model, ["x", "y"], [1.0, 1.0], "dare_linear", density=0.5)
    torch.manual_seed(3)
    unordered, _ = ours(model, ["x", "y"], [1.0, 1.0], "dare_linear", density=0.5, module_order=None)
    _seed_after_injection(model, 3)
    theirs, _ = hf_combined(model, ["x", "y"], [1.0, 1.0], "dare_linear", density=0.5)
    assert list(sd) == list(theirs)
    for k in theirs:
        torch.testing.assert_close(sd[k], theirs[k], atol=1e-5, rtol=0)
    assert any(not torch.equal(unordered[k], theirs[k]) for k in theirs)


def test_embeddings_and_rank_patterns_combine_as_hf_does():
    cfg = dict(r=4, lora_alpha=8, target_modules=["embed_tokens", "q_proj", "v_proj"], rank_pattern={"v_proj": 2},
               alpha_pattern={"layers.1.self_attn.q_proj": 3})
    model, _ = hf_model({"x": cfg, "y": {**cfg, "lora_alpha": 5}})
    for combination_type in ("linear", "cat"):
        sd, config = ours(model, ["x", "y"], [0.6, 0.9], combination_type)
        theirs, their_config = hf_combined(model, ["x", "y"], [0.6, 0.9], combination_type)
        model.delete_adapter("combined")
        assert_same_config(config, their_config)
        assert list(sd) == list(theirs)
        for k in theirs:
            if k.endswith(("lora_A.weight", "lora_embedding_A")):  # HF leaves v_proj at rank 2 under r=4: pad
                b_key = k.replace("lora_A", "lora_B").replace("lora_embedding_A", "lora_embedding_B")
                torch.testing.assert_close(sd[b_key] @ sd[k], theirs[b_key] @ theirs[k], atol=1e-5, rtol=0)
                assert sd[k].shape[0] == config["r"]
    sd, _ = ours(model, ["x", "y"], [0.6, 0.9], "svd")
    theirs, _ = hf_combined(model, ["x", "y"], [0.6, 0.9], "svd")
    for k in [k for k in theirs if k.endswith("embedding_A")]:
        b_key = k.replace("_A", "_B")
        torch.testing.assert_close(sd[b_key] @ sd[k], theirs[b_key] @ theirs[k], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("second", [dict(target_modules=["q_proj", "v_proj"]), dict(target_modules="all-linear")])
def test_the_combined_config_selects_modules_as_hf_s_does(second):
    """The first adapter's layers_to_transform holds for the combined adapter; "all-linear" unites as its paths."""
    model, _ = hf_model({"x": dict(r=4, target_modules=["q_proj", "v_proj"], layers_to_transform=[0]),
                         "y": dict(r=4, **second)})
    configs = [hf_config(model, "x"), {**hf_config(model, "y"), **second}]  # as written, not as HF resolved it
    sd, config = combine_lora([hf_adapter(model, "x"), hf_adapter(model, "y")], configs, [1.0, 1.0], "linear",
                              module_order=model_order(model))
    theirs, their_config = hf_combined(model, ["x", "y"], [1.0, 1.0], "linear")
    if second["target_modules"] != "all-linear":  # all-linear's full paths are taken whatever their layer
        assert not any(".layers.1." in k for k in theirs)
    assert list(sd) == list(theirs)
    for k in theirs:
        torch.testing.assert_close(sd[k], theirs[k], atol=1e-5, rtol=0)
    assert_same_config(config, their_config)


def test_rslora_adapters_combine_to_scaling_one():
    """peft 0.21 keeps use_rslora from the first adapter and so scales the combined adapter by √r once more."""
    cfg = dict(r=4, lora_alpha=8, use_rslora=True, **QV)
    model, _ = hf_model({"x": cfg, "y": cfg})
    sd, config = ours(model, ["x"], [1.0], "linear")
    theirs, their_config = hf_combined(model, ["x"], [1.0], "linear")
    for k in theirs:
        torch.testing.assert_close(sd[k], theirs[k], atol=1e-5, rtol=0)
    assert config["use_rslora"] is False and their_config["use_rslora"] is True
    m = "model.layers.0.self_attn.q_proj"
    torch.testing.assert_close(delta(sd, m), delta(hf_adapter(model, "x"), m, 8 / 4 ** 0.5), atol=1e-5, rtol=0)


def test_the_combined_adapter_computes_what_hf_s_does_in_peftc(tmp_path):
    model, fresh = hf_model(DIFFERENT_RANKS)
    names, weights = ["x", "y", "z"], [1.0, 0.5, -2.0]
    sd, config = ours(model, names, weights, "cat")
    model.add_weighted_adapter(names, weights, "combined", combination_type="cat")
    model.set_adapter("combined")
    x = ids()
    with torch.no_grad():
        expected = model(input_ids=x).logits
    (tmp_path / "adapter_config.json").write_text(json.dumps(config))
    save_file({PREFIX + k: v.contiguous() for k, v in sd.items()}, str(tmp_path / "adapter_model.safetensors"))
    cm = peftc.CompiledModel.from_pretrained(fresh, tmp_path, kwargs=dict(input_ids=x), dynamic=False)
    with torch.no_grad():
        got = cm(input_ids=x).logits
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


# ---- errors ------------------------------------------------------------------------------------------------------
def _inputs(**config):
    sd = {"m.q.lora_A.weight": torch.randn(4, 8), "m.q.lora_B.weight": torch.randn(8, 4)}
    return sd, {"r": 4, "lora_alpha": 8, "target_modules": ["q"], **config}


def _raises(match, adapters, configs, weights, combination_type="linear", **kwargs):
    with pytest.raises(CombineError, match=match) as info:
        combine_lora(adapters, configs, weights, combination_type, **kwargs)
    assert isinstance(info.value, SpecError)


def test_bad_inputs_say_what_is_wrong_and_the_fix():
    sd, cfg = _inputs()
    wide = {"m.q.lora_A.weight": torch.randn(8, 8), "m.q.lora_B.weight": torch.randn(8, 8)}
    _raises("unknown combination_type 'mean'.*" + ", ".join(COMBINATION_TYPES), [sd], [cfg], [1.0], "mean")
    _raises(r"one rank, got r=\[4, 8\].*'cat'.*'svd'", [sd, wide], [cfg, {**cfg, "r": 8}], [1.0, 1.0])
    _raises("2 adapters but 1 weights", [sd, sd], [cfg, cfg], [1.0])
    _raises("`m.q.lora_B.weight` is missing", [{"m.q.lora_A.weight": sd["m.q.lora_A.weight"]}], [cfg], [1.0])
    _raises("not a LoRA A/B weight", [{**sd, "m.q.lora_magnitude_vector": torch.ones(8)}], [cfg], [1.0])
    _raises("`use_dora` = True", [sd], [{**cfg, "use_dora": True}], [1.0])
    _raises("`modules_to_save`", [sd], [{**cfg, "modules_to_save": ["score"]}], [1.0])
    _raises("`lora_bias`", [sd], [{**cfg, "lora_bias": True}], [1.0])
    _raises("needs density", [sd, sd], [cfg, cfg], [1.0, 1.0], "ties")
    _raises("density=0 keeps nothing", [sd, sd], [cfg, cfg], [1.0, 1.0], "dare_linear", density=0)
    _raises("density applies only", [sd, sd], [cfg, cfg], [1.0, 1.0], "linear", density=0.5)
    _raises("svd_rank apply only", [sd, sd], [cfg, cfg], [1.0, 1.0], "cat", svd_rank=2)
    _raises("majority_sign_method='most'", [sd, sd], [cfg, cfg], [1.0, 1.0], "ties", density=0.5,
            majority_sign_method="most")
    _raises("cuSOLVER", [sd, sd], [cfg, cfg], [1.0, 1.0], "svd", svd_driver="gesvd")
    _raises("rank 4 but its config says r=2", [sd], [{**cfg, "r": 2}], [1.0])
    _raises("combine adapters trained on the same base", [sd, {"m.q.lora_A.weight": torch.randn(4, 6),
            "m.q.lora_B.weight": torch.randn(8, 4)}], [cfg, cfg], [1.0, 1.0])
    _raises("all must be regex strings or all lists", [sd, sd], [cfg, {**cfg, "target_modules": ".*q"}], [1.0, 1.0])
    _raises(r"weights\[1\] = nan", [sd, sd], [cfg, cfg], [1.0, float("nan")])


class _ConvNet(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 8, 3)
        self.point = torch.nn.Conv2d(8, 6, 1)
        self.head = torch.nn.Linear(6, 4)

    def forward(self, x):
        return self.head(self.point(self.conv(x)).mean(dim=(2, 3)))


@pytest.mark.parametrize("combination_type,kwargs", [
    ("linear", {}), ("cat", {}), ("svd", dict(svd_rank=3)), ("dare_linear_svd", dict(density=0.5))])
def test_conv2d_adapters_combine_as_hf_s(combination_type, kwargs):
    cfg = dict(target_modules=["conv", "point", "head"])
    model, fresh = hf_model({"x": dict(r=2, lora_alpha=4, **cfg), "y": dict(r=2, lora_alpha=2, **cfg)},
                            make=_ConvNet)
    torch.manual_seed(2)
    sd, config = ours(model, ["x", "y"], [0.5, -1.5], combination_type, **kwargs)
    _seed_after_injection(model, 2)
    theirs, their_config = hf_combined(model, ["x", "y"], [0.5, -1.5], combination_type, **kwargs)
    assert_same_config(config, their_config)
    assert list(sd) == list(theirs) and all(sd[k].shape == theirs[k].shape for k in sd)
    for k in [k for k in theirs if k.endswith(".lora_A.weight")]:
        b = k.replace("lora_A", "lora_B")
        if combination_type.endswith("svd"):
            torch.testing.assert_close(sd[b].flatten(1) @ sd[k].flatten(1), theirs[b].flatten(1) @ theirs[k].flatten(1),
                                       atol=1e-4, rtol=1e-4)
        else:
            torch.testing.assert_close(sd[k], theirs[k], atol=1e-5, rtol=0)
            torch.testing.assert_close(sd[b], theirs[b], atol=1e-5, rtol=0)


@pytest.mark.parametrize("combination_type", ["linear", "svd"])
def test_bfloat16_adapters_combine_as_hf_s_and_stay_bfloat16(combination_type):
    model, _ = hf_model(SAME_RANK)
    model.to(torch.bfloat16)
    sd, _ = ours(model, ["x", "y"], [0.7, -1.3], combination_type)
    theirs, _ = hf_combined(model, ["x", "y"], [0.7, -1.3], combination_type)
    assert all(v.dtype == torch.bfloat16 for v in sd.values())
    for k in [k for k in theirs if k.endswith(".lora_A.weight")]:
        m = k.removesuffix(".lora_A.weight")
        if combination_type == "linear":
            torch.testing.assert_close(sd[k], theirs[k], atol=0, rtol=0)
        torch.testing.assert_close(delta(sd, m).float(), delta(theirs, m).float(), atol=2e-2, rtol=2e-2)
