"""Checks of save_pretrained for a loaded adapter of another structure than the compiled one, for every method with
an adapter name besides LoRA (tests/test_multi_adapter_save.py has LoRA), and IA3 with modules_to_save; shared by
tests/test_multi_adapter_save_other.py (module methods) and tests/test_multi_adapter_save_prompts.py (prompt and
prefix tuning). "default" is compiled, "y" has another rank, block size, number of virtual tokens or set of
targets. peftc writes y with the compiled adapter's writers from y's own spec and tensors; the files and tensors
equal HF PEFT's own save of the same two adapters, and HF PEFT reads them back (PeftModel.from_pretrained +
load_adapter) to the outputs peftc computes with each adapter active.
"""

import copy
import json
import warnings

import pytest
import torch
from safetensors.torch import load_file

import peftc

from conftest import ids, tiny_bert, tiny_llama

peft = pytest.importorskip("peft")

__all__ = ["METHODS", "Models", "test_files_and_tensors_equal_peft_and_peft_reads_them",
           "test_peftc_layout_round_trips"]

T = ["q_proj", "v_proj", "down_proj"]
# method ==> PEFT config class, options of "default", changes for "y"
METHODS = {
    "ia3": ("IA3Config", dict(target_modules=T, feedforward_modules=["down_proj"]), dict(target_modules=["q_proj",
                                                                                                       "down_proj"])),
    "loha": ("LoHaConfig", dict(target_modules=T, r=4, alpha=8), dict(r=2, alpha=6)),
    "lokr": ("LoKrConfig", dict(target_modules=T, r=4, alpha=8), dict(r=2, alpha=6)),
    "vera": ("VeraConfig", dict(target_modules=["q_proj", "v_proj"], r=8), dict(target_modules=["q_proj"])),
    "oft": ("OFTConfig", dict(target_modules=T, r=0, oft_block_size=8), dict(oft_block_size=4)),
    "boft": ("BOFTConfig", dict(target_modules=T, boft_block_size=4), dict(boft_block_size=8)),
    "prompt_tuning": ("PromptTuningConfig", dict(task_type="CAUSAL_LM", num_virtual_tokens=3),
                      dict(num_virtual_tokens=5)),
    "prefix": ("PrefixTuningConfig", dict(task_type="CAUSAL_LM", num_virtual_tokens=3), dict(num_virtual_tokens=5)),
    # on BERT: the classifier trained in full beside the vectors (modules_to_save)
    "ia3_seq_cls": ("IA3Config", dict(task_type="SEQ_CLS", target_modules=["query", "value", "output.dense"],
                                      feedforward_modules=["output.dense"]), dict(target_modules=["query",
                                                                                                  "output.dense"])),
}
NEAR_ONE = ("ia3_l", "boft_s")  # scalings: random around 1


def files(root):
    return {str(p.relative_to(root)) for p in root.rglob("*") if p.is_file() and p.name != "README.md"}


class Models:
    """HF PEFT's model with adapters default and y, saved; peftc compiled from that directory, y loaded."""

    def __init__(self, method, tmp):
        torch.manual_seed(0)
        self.method = method
        self.base = (tiny_bert if method == "ia3_seq_cls" else tiny_llama)(
            num_hidden_layers=2 if method == "prefix" else 1).eval()
        cls, options, changes = METHODS[method]
        cls = getattr(peft, cls)
        self.hf = peft.get_peft_model(copy.deepcopy(self.base), cls(**options))
        self.hf.add_adapter("y", cls(**{**options, **changes}))
        self.lengths = {"default": options.get("num_virtual_tokens"),
                        "y": changes.get("num_virtual_tokens", options.get("num_virtual_tokens"))}
        for seed, name in enumerate(("default", "y"), 1):
            g = torch.Generator().manual_seed(seed)
            with torch.no_grad():
                for key, p in self.hf.named_parameters():
                    if f".{name}." in key or key.endswith(f".{name}"):
                        p.copy_(torch.randn(p.shape, generator=g) * 0.3 + any(n in key for n in NEAR_ONE))
        self.hf.eval()
        self.hf_dir = tmp / "hf"
        self.hf.save_pretrained(str(self.hf_dir))
        # prompt tuning lengthens the sequence, which needs a dynamic sequence axis
        self.cm = peftc.compile(copy.deepcopy(self.base), str(self.hf_dir), kwargs=self.kwargs("default"),
                                dynamic=method == "prompt_tuning").eval()
        self.cm.load_adapter(str(self.hf_dir / "y"), name="y")
        assert not self.cm._adapter_bank.bindable("y")  # y is of another structure

    def kwargs(self, name):
        out = dict(input_ids=ids())
        if self.method == "prefix":  # HF PEFT keeps the prefix in the KV cache: real tokens are numbered after it
            n = self.lengths[name]
            out["position_ids"] = torch.arange(n, n + 8).expand(2, -1)
        return out

    def peftc_logits(self, name):
        self.cm.set_adapter(name)
        with torch.no_grad():
            return self.cm(**self.kwargs(name)).logits


def test_files_and_tensors_equal_peft_and_peft_reads_them(models, tmp_path):
    assert models.cm.save_pretrained(tmp_path) == "peft"
    assert files(tmp_path) == files(models.hf_dir)
    for sub in ("", "y"):
        ours, theirs = (load_file(str(d / sub / "adapter_model.safetensors")) for d in (tmp_path, models.hf_dir))
        assert ours.keys() == theirs.keys()
        for k in ours:
            # a module trained in full is kept as W + δ and written as their sum: one float rounding off HF's copy
            tol = 1e-6 if k.startswith("base_model.model.classifier.") else 0
            torch.testing.assert_close(ours[k], theirs[k], atol=tol, rtol=0)
        config = json.loads((tmp_path / sub / "adapter_config.json").read_text())
        assert config["peft_type"] == json.loads((models.hf_dir / sub / "adapter_config.json").read_text())["peft_type"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = peft.PeftModel.from_pretrained(copy.deepcopy(models.base), str(tmp_path)).eval()
        pm.load_adapter(str(tmp_path / "y"), adapter_name="y")
        for name in ("default", "y"):
            pm.set_adapter(name)
            with torch.no_grad():
                want = pm(input_ids=ids()).logits
            torch.testing.assert_close(models.peftc_logits(name), want, atol=1e-5, rtol=1e-5)
    models.cm.set_adapter("default")


def test_peftc_layout_round_trips(models, tmp_path):
    """format="peftc": y's own spec and tensors, which load_adapter reads back to the same outputs."""
    assert models.cm.save_pretrained(tmp_path, format="peftc", selected_adapters=["y"]) == "peftc"
    assert files(tmp_path) == {"y/peftc_spec.json", "y/peftc_adapter.safetensors"}
    want = models.peftc_logits("y")
    models.cm.load_adapter(tmp_path / "y", name="y2")
    models.lengths["y2"] = models.lengths["y"]
    torch.testing.assert_close(models.peftc_logits("y2"), want, atol=0, rtol=0)
    models.cm.set_adapter("default")
    models.cm.delete_adapter("y2")
