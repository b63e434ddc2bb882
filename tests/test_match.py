"""Matching finds every form of matmul capture produces, and selects them as HF PEFT's target_modules would."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import peftc
from peftc.capture import ModelInfo, call_kwargs, capture
from peftc.match import matmul_sites, select
from peftc.params import ParamTable

from conftest import tiny_gpt2, tiny_llama, ids


def sites_of(model, *args, dynamic=True, **kwargs):
    table = ParamTable()
    gm = capture(model, args, call_kwargs(model, kwargs), table, dynamic=dynamic)
    return matmul_sites(gm, table, ModelInfo.of(model)), ModelInfo.of(model)


@pytest.fixture(scope="module")
def llama_sites():
    """Selection reads module paths only (and `select` copies the sites): one static capture serves every test."""
    return sites_of(tiny_llama(), input_ids=ids(), dynamic=False)


class Forms(nn.Module):
    """One matmul of every form, each on its own weight."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(6, 5)
        self.functional = nn.Module()
        self.functional.weight = nn.Parameter(torch.randn(4, 5))
        self.w_in_out = nn.Parameter(torch.randn(4, 3))  # (in, out): x @ W
        self.eins = nn.Parameter(torch.randn(2, 3))  # (out, in) read by einsum
        self.eins_t = nn.Parameter(torch.randn(2, 3))  # (in, out) read by einsum

    def forward(self, x):
        h = self.lin(x)
        h = F.linear(h, self.functional.weight)
        h = h @ self.w_in_out
        h = torch.einsum("bsi,oi->bso", h, self.eins)
        return torch.einsum("bsi,io->bso", h, self.eins_t)


def test_every_form_is_a_site_with_its_layout():
    sites, _ = sites_of(Forms(), torch.randn(2, 3, 6))
    got = {s.module: (s.form, s.in_features, s.out_features) for s in sites}
    assert got == {
        "lin": ("linear", 6, 5),
        "functional": ("linear", 5, 4),
        "w_in_out": ("matmul", 4, 3),
        "eins": ("einsum", 3, 2),
        "eins_t": ("einsum", 2, 3),
    }


def test_gpt2_conv1d_is_addmm_with_in_out_weight():
    model = tiny_gpt2()
    sites, _ = sites_of(model, input_ids=ids())
    c_attn = next(s for s in sites if s.module == "transformer.h.0.attn.c_attn")
    assert c_attn.form == "addmm"
    assert (c_attn.in_features, c_attn.out_features) == (32, 96)  # Conv1D stores W as (in, out) = (32, 96)


def test_tied_output_layer_is_named_after_the_module_that_reads_it():
    model = tiny_gpt2()  # lm_head.weight is transformer.wte.weight
    sites, info = sites_of(model, input_ids=ids(), dynamic=False)
    assert sites[-1].module == "lm_head" and info.output_layer == "lm_head"


@pytest.mark.parametrize("target, expected", [
    ("q_proj|v_proj", {"q_proj", "v_proj"}),  # regex, full match of a dotted suffix
    (r"model\.layers\.1\.self_attn\.q_proj", {"q_proj"}),  # HF-style full-path regex
    (["q_proj", "self_attn.o_proj"], {"q_proj", "o_proj"}),  # list: exact or dotted suffix
    ("all-linear", {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}),
])
def test_selectors_follow_hf_target_modules(llama_sites, target, expected):
    sites, info = llama_sites
    chosen = select(sites, target, None, info, "test")
    assert {s.module.rpartition(".")[2] for s in chosen} == expected
    if "layers\\.1" in str(target):
        assert {s.module for s in chosen} == {"model.layers.1.self_attn.q_proj"}


def test_list_entries_do_not_match_partial_names(llama_sites):
    sites, info = llama_sites
    with pytest.raises(peftc.SpecError):
        select(sites, ("proj",), None, info, "test")


def test_exclude_removes_matches(llama_sites):
    sites, info = llama_sites
    chosen = select(sites, "all-linear", r".*layers\.0\..*", info, "test")
    assert chosen and all(".layers.1." in s.module for s in chosen)


def test_no_match_lists_closest_module_paths(llama_sites):
    sites, info = llama_sites
    with pytest.raises(peftc.SpecError) as err:
        select(sites, "q_projj", None, info, "LoRA rule")
    msg = str(err.value)
    assert "matches no matmul" in msg and "model.layers.0.self_attn.q_proj" in msg and "q_proj" in msg
