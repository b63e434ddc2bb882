"""Several prompt-learning adapters (prompt tuning, prefix tuning) in one compiled model, against the real peft
package: load, set_adapter, disable_adapters and delete_adapter agree with HF PEFT's same calls within 1e-5.
"default" and "x" share a config (bound into the compiled slots), "y" has another number of virtual tokens (a graph
of its own). HF PEFT has one active prompt-learning adapter and no mixed batches for them: both are refused.
"""

import copy
import warnings

import pytest
import torch

import peftc
from peftc.errors import AdapterError

from conftest import ids, tiny_llama

peft = pytest.importorskip("peft")

LENGTHS = {"default": 3, "x": 3, "y": 5}
METHODS = {"prompt_tuning": "PromptTuningConfig", "prefix": "PrefixTuningConfig"}


def save_adapter(base, method, directory, length, seed):
    config = getattr(peft, METHODS[method])(task_type="CAUSAL_LM", num_virtual_tokens=length)
    pm = peft.get_peft_model(copy.deepcopy(base), config)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in pm.parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    pm.save_pretrained(str(directory))
    return str(directory)


class Pair:
    def __init__(self, method, tmp):
        torch.manual_seed(0)
        base = tiny_llama().eval()
        self.method = method
        x = ids()
        self.mask = torch.ones_like(x)
        self.mask[1, :2] = 0  # left padding
        dirs = {n: save_adapter(base, method, tmp / n, length, seed) for seed, (n, length) in enumerate(LENGTHS.items())}
        self.hf = peft.PeftModel.from_pretrained(copy.deepcopy(base), dirs["default"]).eval()
        self.cm = peftc.compile(copy.deepcopy(base), dirs["default"],
                                kwargs=self.call(x, "default")).eval()
        for n in ("x", "y"):
            self.hf.load_adapter(dirs[n], adapter_name=n)
            self.cm.load_adapter(dirs[n], name=n)

    def call(self, x, name):
        kwargs = dict(input_ids=x, attention_mask=self.mask)
        if self.method == "prefix":  # HF PEFT keeps the prefix in the KV cache: real tokens are numbered after it
            kwargs["position_ids"] = torch.arange(LENGTHS[name], LENGTHS[name] + x.shape[1]).expand(x.shape[0], -1)
        return kwargs

    def agree(self, name, disabled=False):
        x = ids()
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            want = self.hf(input_ids=x, attention_mask=self.mask).logits
            got = self.cm(**(dict(input_ids=x, attention_mask=self.mask) if disabled else self.call(x, name))).logits
        keep = self.mask.bool()
        if not disabled and self.method == "prompt_tuning":  # the virtual tokens' positions come first
            keep = torch.cat([torch.ones(x.shape[0], LENGTHS[name], dtype=torch.bool), keep], 1)
        torch.testing.assert_close(got[keep], want[keep], atol=1e-5, rtol=1e-5)
        return got[keep]

    def set_adapter(self, name):
        self.hf.set_adapter(name)
        self.cm.set_adapter(name)


@pytest.fixture(scope="module", params=list(METHODS))
def pair(request, tmp_path_factory):
    return Pair(request.param, tmp_path_factory.mktemp(request.param))


def test_switch_and_disable_agree_with_peft(pair):
    outputs = {"default": pair.agree("default")}
    for name in ("x", "y", "default"):
        pair.set_adapter(name)
        assert pair.cm.active_adapters == [name]
        outputs[name] = pair.agree(name)
    assert not torch.allclose(outputs["x"], outputs["default"])
    pair.set_adapter("y")
    with pair.hf.disable_adapter(), pair.cm.disable_adapters():
        base = pair.agree("y", disabled=True)
    assert base.shape != outputs["y"].shape or not torch.allclose(base, outputs["y"])
    torch.testing.assert_close(pair.agree("y"), outputs["y"], atol=0, rtol=0)
    pair.set_adapter("default")


def test_several_active_and_mixed_batches_are_refused(pair):
    with pytest.raises(AdapterError, match="one prompt-learning adapter at a time"):
        pair.cm.set_adapter(["default", "x"])
    with pytest.raises(AdapterError, match=f"{pair.method}.*only for lora"):
        pair.cm(input_ids=ids(), adapter_names=["default", "x"])
    assert pair.cm.active_adapters == ["default"]


def test_delete_adapter_agrees_with_peft(pair):
    pair.set_adapter("x")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pair.hf.delete_adapter("x")
    pair.cm.delete_adapter("x")
    assert pair.cm.adapter_names == ["default", "y"]
    assert pair.cm.active_adapters == pair.hf.active_adapters == ["default"]
    pair.agree("default")
    pair.set_adapter("y")
    pair.agree("y")
