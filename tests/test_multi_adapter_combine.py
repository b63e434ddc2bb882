"""cm.add_weighted_adapter (the math: peftc/combine.py) against HF PEFT's add_weighted_adapter on the same adapters."""

import pytest
import torch

from peftc.errors import AdapterError

from conftest import ids
from test_multi_adapter import Pair

peft = pytest.importorskip("peft")


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    return Pair("llama", tmp_path_factory.mktemp("combine"))


@pytest.mark.parametrize("how, names, options", [
    ("linear", ["default", "x"], {}),
    ("ties", ["default", "x"], {"density": 0.5}),
    ("cat", ["x", "y"], {}),          # ranks 4 and 2: rank 6, not the compiled structure (its own graph)
    ("svd", ["x", "y"], {"svd_rank": 4}),
])
def test_combined_adapter_agrees_with_peft(pair, how, names, options):
    new = f"{how}_combined"
    pair.hf.add_weighted_adapter(names, [0.7, 0.4], new, combination_type=how, **options)
    pair.cm.add_weighted_adapter(names, [0.7, 0.4], combination_type=how, name=new, **options)
    assert new in pair.cm.adapter_names
    hf_state = {k: v for k, v in pair.hf.state_dict().items() if f".{new}." in k}
    ours = pair.cm._adapter_bank.adapters[new].tensors
    assert len(hf_state) == len(ours)
    for k, t in ours.items():
        module, _, kind = k.rpartition(".lora_")
        want = hf_state[f"base_model.model.{module}.lora_{kind.split('.')[0]}.{new}.weight"]
        torch.testing.assert_close(t.detach(), want, atol=1e-5, rtol=1e-4)
    pair.set_adapter(new)
    pair.agree(ids(seed=4))
    pair.set_adapter("default")


def test_combining_unknown_adapters_is_refused(pair):
    with pytest.raises(AdapterError, match="no adapter named `zz`"):
        pair.cm.add_weighted_adapter(["x", "zz"], [1.0, 1.0], combination_type="cat", name="bad")
