"""save_pretrained with several adapters: HF PEFT's layout ("default" at the root, every other adapter in
`<dir>/<name>/`), read back by the real peft package (PeftModel.from_pretrained + load_adapter) with the same
tensors and outputs, for LoRA adapters of the compiled structure and of another rank, and for LoHa."""

import copy
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import peftc
from peftc.errors import AdapterError

from conftest import ids, tiny_llama

peft = pytest.importorskip("peft")

CONFIGS = {
    "lora": {"default": dict(r=4, lora_alpha=8), "x": dict(r=4, lora_alpha=8), "y": dict(r=2, lora_alpha=16)},
    "loha": {"default": dict(r=2, alpha=4), "x": dict(r=2, alpha=4)},
}
CLASSES = {"lora": "LoraConfig", "loha": "LoHaConfig"}


def files(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*") if p.is_file() and p.name != "README.md"}


class Models:
    """HF PEFT's model with adapters default, x (and y), the peftc model loaded from the same directories."""

    def __init__(self, method, tmp):
        torch.manual_seed(0)
        self.base = tiny_llama(num_hidden_layers=1).eval()
        self.names = list(CONFIGS[method])
        self.hf = None
        for seed, (name, options) in enumerate(CONFIGS[method].items(), 1):
            config = getattr(peft, CLASSES[method])(target_modules=["q_proj", "v_proj"], **options)
            if self.hf is None:
                self.hf = peft.get_peft_model(copy.deepcopy(self.base), config)
            else:
                self.hf.add_adapter(name, config)
            g = torch.Generator().manual_seed(seed)
            with torch.no_grad():
                for key, p in self.hf.named_parameters():
                    if f".{name}." in key or key.endswith(f".{name}"):
                        p.copy_(torch.randn(p.shape, generator=g) * 0.3)
        self.hf.eval()
        self.hf_dir = tmp / "hf"
        self.hf.save_pretrained(str(self.hf_dir))
        self.cm = peftc.compile(copy.deepcopy(self.base), str(self.hf_dir), kwargs=dict(input_ids=ids())).eval()
        for name in self.names[1:]:
            self.cm.load_adapter(str(self.hf_dir / name), name=name)

    def reloaded(self, directory: Path, names):
        """HF PEFT's model from a directory peftc wrote, as HF PEFT's docs load several adapters."""
        first, *rest = names
        pm = peft.PeftModel.from_pretrained(copy.deepcopy(self.base), str(directory if first == "default" else
                                                                            directory / first), adapter_name=first)
        for name in rest:
            pm.load_adapter(str(directory / name), adapter_name=name)
        return pm.eval()


@pytest.fixture(scope="module", params=list(CONFIGS))
def models(request, tmp_path_factory):
    return Models(request.param, tmp_path_factory.mktemp(request.param))


def test_layout_tensors_and_outputs_match_peft(models, tmp_path):
    cm = models.cm
    cm.set_adapter("x")  # the bound adapter is not what goes to the root: "default" is, as in HF PEFT
    assert cm.save_pretrained(tmp_path) == "peft"
    assert files(tmp_path) == files(models.hf_dir)
    for name in models.names:
        sub = "" if name == "default" else name
        ours, theirs = load_file(str(tmp_path / sub / "adapter_model.safetensors")), \
            load_file(str(models.hf_dir / sub / "adapter_model.safetensors"))
        assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
    pm = models.reloaded(tmp_path, models.names)
    for name in models.names:
        pm.set_adapter(name)
        cm.set_adapter(name)
        with torch.no_grad():
            torch.testing.assert_close(cm(input_ids=ids()).logits, pm(input_ids=ids()).logits, atol=1e-5, rtol=1e-5)
    cm.set_adapter("default")


def test_selected_adapters_and_a_trainers_state_dict(models, tmp_path):
    cm = models.cm
    cm.save_pretrained(tmp_path / "sel", selected_adapters=["x"])
    assert files(tmp_path / "sel") == {"x/adapter_config.json", "x/adapter_model.safetensors"}
    # what Trainer passes: the state_dict it gathered, every adapter under its bank name
    state = {k: v.clone() for k, v in cm.state_dict().items()}
    cm.save_pretrained(tmp_path / "sd", state_dict=state)
    for name in models.names:
        sub = "" if name == "default" else name
        ours, want = load_file(str(tmp_path / "sd" / sub / "adapter_model.safetensors")), \
            load_file(str(models.hf_dir / sub / "adapter_model.safetensors"))
        assert all(torch.equal(ours[k], want[k]) for k in want)
    with pytest.raises(AdapterError, match="no adapter named `z`"):
        cm.save_pretrained(tmp_path / "bad", selected_adapters=["z"])
