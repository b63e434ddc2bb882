"""Checks of several adapters of one method (peftc/adapters.py) against the real peft package, shared by
tests/test_multi_adapter_loha_lokr.py and tests/test_multi_adapter_vera_oft.py (each fixes the methods it runs).

For IA3, LoHa, LoKr, VeRA and OFT: adapters "default" and "x" share a config (so "x" is bound into the compiled
graphs' slots), "y" has another rank (another structure: a graph of its own). Each of load, set_adapter (one and
several, as HF PEFT's layers loop over the active adapters), disable_adapters and delete_adapter agrees with HF
PEFT's same calls within 1e-5; mixed batches, which HF PEFT 0.21 implements only for LoRA, are refused.
"""

import copy

import pytest
import torch

import peftc
from peftc.errors import AdapterError

from conftest import ids, tiny_llama

peft = pytest.importorskip("peft")

__all__ = ["Pair", "test_switch_and_disable_agree_with_peft", "test_several_active_agree_with_peft",
           "test_only_active_adapters_train", "test_mixed_batches_are_refused_naming_the_method",
           "test_save_pretrained_is_read_by_peft", "test_delete_adapter_agrees_with_peft"]

TARGETS = ["q_proj", "v_proj", "down_proj"]
# method ==> (PEFT config for adapter "default"/"x", for "y"), random non-zero adapter values
METHODS = {
    "loha": (dict(cls="LoHaConfig", r=4, alpha=8), dict(r=2, alpha=4)),
    "lokr": (dict(cls="LoKrConfig", r=4, alpha=8), dict(r=2, alpha=6)),
    "vera": (dict(cls="VeraConfig", r=8), dict(d_initial=0.5)),  # HF PEFT shares one projection: one r
    "oft": (dict(cls="OFTConfig", r=0, oft_block_size=8), dict(r=0, oft_block_size=4)),
}


def save_adapter(base, method, directory, seed, **changes):
    options, _ = METHODS[method]
    options = {k: v for k, v in {**options, **changes}.items() if k != "cls"}
    config = getattr(peft, METHODS[method][0]["cls"])(target_modules=TARGETS, **options)
    pm = peft.get_peft_model(copy.deepcopy(base), config)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    pm.save_pretrained(str(directory))
    return str(directory)


class Pair:
    def __init__(self, method, tmp):
        torch.manual_seed(0)
        self.base = base = tiny_llama(num_hidden_layers=1).eval()
        _, other = METHODS[method]
        self.names = ["default", "x"] + (["y"] if other else [])
        configs = {"default": {}, "x": {}, "y": other or {}}
        dirs = {n: save_adapter(base, method, tmp / n, seed, **configs[n]) for seed, n in enumerate(self.names, 1)}
        self.hf = peft.PeftModel.from_pretrained(copy.deepcopy(base), dirs["default"]).eval()
        self.cm = peftc.compile(copy.deepcopy(base), dirs["default"], kwargs=dict(input_ids=ids()),
                                dynamic=False).eval()
        for n in self.names[1:]:
            self.hf.load_adapter(dirs[n], adapter_name=n)
            self.cm.load_adapter(dirs[n], name=n)
        self.method = method

    def agree(self):
        with torch.no_grad():
            want, got = self.hf(input_ids=ids()).logits, self.cm(input_ids=ids()).logits
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
        return got

    def set_adapter(self, names):
        self.hf.base_model.set_adapter(names)
        self.cm.set_adapter(names)


def test_switch_and_disable_agree_with_peft(pair):
    cm = pair.cm
    assert cm.adapter_names == pair.names
    outputs = {"default": pair.agree()}
    for name in [*pair.names[1:], "default"]:
        pair.set_adapter(name)
        assert cm.active_adapters == [name]
        outputs[name] = pair.agree()
    assert all(not torch.allclose(outputs[a], outputs[b]) for a in pair.names for b in pair.names if a < b)
    pair.set_adapter("x")
    with pair.hf.disable_adapter(), cm.disable_adapters():
        base = pair.agree()
    assert not torch.allclose(base, outputs["x"])
    torch.testing.assert_close(pair.agree(), outputs["x"], atol=0, rtol=0)
    pair.set_adapter("default")


def test_several_active_agree_with_peft(pair):
    names = pair.names[::-1]  # "y" (a structure of its own), then two of the compiled structure
    pair.set_adapter(names)
    assert pair.cm.active_adapters == names
    pair.agree()
    pair.set_adapter("default")


def test_only_active_adapters_train(pair):
    cm, hf = pair.cm, pair.hf
    names = ["default", "x"]
    pair.set_adapter(names)
    bank = cm._adapter_bank.adapters
    want = {id(t) for n in names for k, t in bank[n].tensors.items() if bank[n].trains[k]}
    assert {id(t) for t in cm.trainable_parameters()} == want
    hf_trainable = sum(p.numel() for p in hf.parameters() if p.requires_grad)
    assert sum(t.numel() for t in cm.trainable_parameters()) == hf_trainable
    pair.set_adapter("default")


def test_mixed_batches_are_refused_naming_the_method(pair):
    with pytest.raises(AdapterError, match=f"only for lora.*{pair.method}|{pair.method}.*only for lora"):
        pair.cm(input_ids=ids(), adapter_names=["default", "x"])


def test_save_pretrained_is_read_by_peft(pair, tmp_path):
    pair.cm.save_pretrained(tmp_path)  # HF PEFT's layout: x in tmp_path/x, y (another structure) in tmp_path/y
    pm = peft.PeftModel.from_pretrained(copy.deepcopy(pair.base), str(tmp_path)).eval()
    for name in pair.names[1:]:
        pm.load_adapter(str(tmp_path / name), adapter_name=name)
    for name in pair.names:
        pm.set_adapter(name)
        pair.set_adapter(name)
        with torch.no_grad():
            torch.testing.assert_close(pm(input_ids=ids()).logits, pair.hf(input_ids=ids()).logits, atol=1e-5,
                                       rtol=1e-5)
    pair.set_adapter("default")


def test_delete_adapter_agrees_with_peft(pair):
    pair.set_adapter("x")
    pair.hf.delete_adapter("x")
    pair.cm.delete_adapter("x")
    assert pair.cm.adapter_names == [n for n in pair.names if n != "x"]
    assert pair.cm.active_adapters == pair.hf.active_adapters
    pair.agree()
    with pytest.raises(AdapterError, match="no adapter named `x`"):
        pair.cm.set_adapter("x")
    if "y" in pair.names:
        pair.set_adapter("y")
        pair.agree()
