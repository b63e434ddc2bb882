"""LoRA initializations (peftc/lora_init.py) against HF PEFT's init_lora_weights on the same base weights."""

import copy

import pytest
import torch

import peftc
from peftc.errors import SpecError

from conftest import ids, tiny_gpt2, tiny_llama

peft = pytest.importorskip("peft")

TARGET = ["q_proj", "v_proj", "down_proj"]


def logits(out):
    return out.logits if hasattr(out, "logits") else out[0]


def close(a, b, atol=1e-5):
    torch.testing.assert_close(a, b, atol=atol, rtol=1e-5)


def adapters(cm):
    return {p.name: p.tensor for p in cm.params if p.role == "adapter"}


def hf_adapters(pm):
    return {n.removeprefix("base_model.model.").replace(".default", ""): p for n, p in pm.named_parameters()
            if p.requires_grad}


def base_weight(cm, name):
    return cm.params[name].tensor


def nudge(tensors, seed=2):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for t in tensors.values():
            t.add_(torch.randn(t.shape, generator=g) * 0.05)


@pytest.fixture(scope="module")
def llama():
    torch.manual_seed(0)
    return tiny_llama().eval()


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_pissa_and_olora_match_hf_adapters_residual_outputs_merge_and_format(llama, init, tmp_path):
    x, x2 = ids(), ids(seed=4)
    plain = logits(llama(input_ids=x2))
    source = copy.deepcopy(llama)
    cm = peftc.compile(source, peftc.LoRA(target=TARGET, r=4, alpha=8, init=init), kwargs=dict(input_ids=x), dynamic=False)
    close(logits(cm(input_ids=x2)), plain)  # W_res + s·BA = W: unchanged at init
    assert torch.equal(source.model.layers[0].self_attn.q_proj.weight, llama.model.layers[0].self_attn.q_proj.weight)
    pm = peft.get_peft_model(copy.deepcopy(llama), peft.LoraConfig(target_modules=TARGET, r=4, lora_alpha=8,
                                                                   init_lora_weights=init)).eval()
    ours, theirs = adapters(cm), hf_adapters(pm)
    assert sorted(ours) == sorted(theirs)
    for name, t in ours.items():  # QR and the full SVD are deterministic on one machine (signs included)
        close(t, theirs[name])
    q = "model.layers.1.self_attn.q_proj"
    close(base_weight(cm, q + ".weight"), pm.base_model.model.model.layers[1].self_attn.q_proj.base_layer.weight)
    nudge(ours)
    with torch.no_grad():
        for name, t in theirs.items():
            t.copy_(ours[name])
    trained = logits(cm(input_ids=x2))
    assert not torch.allclose(trained, plain, atol=1e-3)
    close(trained, logits(pm(input_ids=x2)))
    merged = cm.merge()  # W_res + s·BA, as HF merges
    close(logits(merged(input_ids=x2)), trained)
    close(merged.state_dict()[q + ".weight"], copy.deepcopy(pm).merge_and_unload().state_dict()[q + ".weight"])
    # saved as is, with init_lora_weights=init, as HF saves it: loading re-derives the residual from the base
    assert cm.save_pretrained(tmp_path / "ours") == "peft"
    back = peft.PeftModel.from_pretrained(copy.deepcopy(llama), str(tmp_path / "ours")).eval()
    assert back.peft_config["default"].init_lora_weights == init
    close(logits(back(input_ids=x2)), trained)
    pm.save_pretrained(str(tmp_path / "theirs"))
    again = peftc.compile(copy.deepcopy(llama), tmp_path / "theirs", kwargs=dict(input_ids=x), dynamic=False)
    close(logits(again(input_ids=x2)), trained)


def test_pissa_on_gpt2_conv1d_reads_the_weight_transposed_as_hf():
    torch.manual_seed(0)
    model = tiny_gpt2().eval()
    x = ids()
    cm = peftc.compile(copy.deepcopy(model), peftc.LoRA(target=["c_attn"], r=2, alpha=4, init="pissa"),
                       kwargs=dict(input_ids=x), dynamic=False)
    close(logits(cm(input_ids=x)), logits(model(input_ids=x)))
    pm = peft.get_peft_model(copy.deepcopy(model), peft.LoraConfig(target_modules=["c_attn"], r=2, lora_alpha=4,
                                                                   init_lora_weights="pissa", fan_in_fan_out=True))
    for name, t in hf_adapters(pm).items():
        close(adapters(cm)[name], t)
    close(base_weight(cm, "transformer.h.0.attn.c_attn.weight"),
          pm.base_model.model.transformer.h[0].attn.c_attn.base_layer.weight)


def test_pissa_niter_is_identity_at_init_and_merges(llama):
    x = ids()
    cm = peftc.compile(copy.deepcopy(llama), peftc.LoRA(target=TARGET, r=4, init="pissa_niter_4"),
                       kwargs=dict(input_ids=x), dynamic=False)
    close(logits(cm(input_ids=x)), logits(llama(input_ids=x)), atol=1e-4)
    nudge(adapters(cm))
    close(logits(cm.merge()(input_ids=x)), logits(cm(input_ids=x)))


def test_gaussian_and_false_inits_as_hf(llama):
    x = ids()
    torch.manual_seed(1)
    cm = peftc.compile(copy.deepcopy(llama), peftc.LoRA(target=["down_proj"], r=4, init="gaussian"),
                       kwargs=dict(input_ids=x), dynamic=False)
    a = adapters(cm)["model.layers.0.mlp.down_proj.lora_A.weight"]
    assert abs(a.std().item() - 1 / 4) < 0.03 and not adapters(cm)["model.layers.0.mlp.down_proj.lora_B.weight"].any()
    close(logits(cm(input_ids=x)), logits(llama(input_ids=x)))
    off = peftc.compile(copy.deepcopy(llama), peftc.LoRA(target=["down_proj"], r=4, init=False),
                        kwargs=dict(input_ids=x), dynamic=False)
    b = adapters(off)["model.layers.0.mlp.down_proj.lora_B.weight"]
    bound = 1 / 4 ** 0.5  # nn.Linear(r, out)'s Kaiming-uniform(a=√5): U(-1/√r, 1/√r)
    assert b.abs().max() <= bound and b.std() > bound / 3
    assert not torch.allclose(logits(off(input_ids=x)), logits(llama(input_ids=x)), atol=1e-4)
    pm = peft.get_peft_model(copy.deepcopy(llama), peft.LoraConfig(target_modules=["down_proj"], r=4,
                                                                   init_lora_weights=False))
    assert not hf_adapters(pm)["model.layers.0.mlp.down_proj.lora_B.weight"].eq(0).all()


def test_bad_inits_are_refused():
    with pytest.raises(SpecError, match="init_lora_weights"):
        peftc.LoRA(target=["q_proj"], init="loftq")
    torch.manual_seed(0)
    with pytest.raises(SpecError, match="olora"):
        peftc.compile(tiny_gpt2(), peftc.LoRA(target=["c_attn"], r=2, init="olora"), kwargs=dict(input_ids=ids()), dynamic=False)


def test_pissa_converted_on_save_is_hf_s_lora_of_the_original_base(llama, tmp_path):
    x, x2 = ids(), ids(seed=4)
    cm = peftc.compile(copy.deepcopy(llama), peftc.LoRA(target=TARGET, r=4, alpha=8, init="pissa"),
                       kwargs=dict(input_ids=x), dynamic=False)
    pm = peft.get_peft_model(copy.deepcopy(llama), peft.LoraConfig(target_modules=TARGET, r=4, lora_alpha=8,
                                                                   init_lora_weights="pissa")).eval()
    cm.save_pretrained(tmp_path / "init")
    pm.save_pretrained(str(tmp_path / "hf_init"))
    ours, theirs = adapters(cm), hf_adapters(pm)
    nudge(ours)
    with torch.no_grad():
        for name, t in theirs.items():
            t.copy_(ours[name])
    cm.save_pretrained(tmp_path / "lora", path_initial_model_for_weight_conversion=tmp_path / "init")
    pm.save_pretrained(str(tmp_path / "hf_lora"), path_initial_model_for_weight_conversion=str(tmp_path / "hf_init"))
    from safetensors.torch import load_file

    mine, hf = (load_file(str(tmp_path / d / "adapter_model.safetensors")) for d in ("lora", "hf_lora"))
    assert sorted(mine) == sorted(hf)
    for key in mine:
        close(mine[key], hf[key])
    back = peft.PeftModel.from_pretrained(copy.deepcopy(llama), str(tmp_path / "lora")).eval()  # the original base
    assert back.peft_config["default"].init_lora_weights is True and back.peft_config["default"].r == 8
    close(logits(back(input_ids=x2)), logits(cm(input_ids=x2)))
