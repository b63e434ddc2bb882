"""insert-lora: golden diff, counters, idempotence, every matmul form, dropout and dtype handling."""

import os
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import peftc
from peftc.capture import ModelInfo, capture
from peftc.params import ParamTable
from peftc.pipeline import PassContext, Pipeline

GOLDEN = Path(__file__).parent / "golden"


class MLP(nn.Module):
    def __init__(self, dim=4, hidden=6, dropout=0.0):
        super().__init__()
        self.up = nn.Linear(dim, hidden)
        self.drop = nn.Dropout(dropout)
        self.down = nn.Linear(hidden, dim)

    def forward(self, x):
        return self.down(self.drop(torch.relu(self.up(x))))


class FunctionalLinear(nn.Module):
    """Calls F.linear on its own weight: HF PEFT cannot adapt this, it never sees an nn.Linear."""

    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(5, 4))
        self.bias = nn.Parameter(torch.randn(5))

    def forward(self, x):
        return F.linear(x, self.weight, self.bias).tanh()


def check_golden(name: str, text: str) -> None:
    path = GOLDEN / name
    if os.environ.get("PEFTC_UPDATE_GOLDEN"):  # regenerate: PEFTC_UPDATE_GOLDEN=1 make test
        path.write_text(text)
    assert text == path.read_text(), f"{name} changed; inspect the diff, then regenerate with PEFTC_UPDATE_GOLDEN=1"


def test_golden_diff_and_counters():
    torch.manual_seed(0)
    cm = peftc.compile(MLP().eval(), peftc.LoRA(target="up", r=2, alpha=4), args=(torch.randn(3, 4),), dynamic=False)
    check_golden("insert_lora_mlp.diff", cm.diff("insert-lora"))
    assert cm.counters["insert-lora.inserted"] == 1
    assert "up.lora_A.weight  [2x4] float32  trainable  adapter:lora" in cm.diff("insert-lora")
    freeze = cm.diff("freeze-base")
    assert "-up.weight  [6x4] float32  trainable  base" in freeze and "+up.weight  [6x4] float32  frozen  base" in freeze


def test_does_not_fire_on_excluded_or_adapter_matmuls():
    # all-linear on a plain module (no get_output_embeddings) is every Linear, as in HF PEFT; both are excluded here.
    with pytest.raises(peftc.SpecError, match="matches no matmul after exclude"):
        peftc.compile(MLP().eval(), peftc.LoRA(target="all-linear", exclude=["up", "down"], r=2),
                      args=(torch.randn(3, 4),), dynamic=False)
    cm = peftc.compile(MLP().eval(), peftc.LoRA(target=["up", "down"], r=2), args=(torch.randn(3, 4),), dynamic=False)
    assert cm.counters["insert-lora.inserted"] == 2  # the adapters' own linears are not sites


def run_pipeline_twice(model, spec, *args):
    table = ParamTable()
    gm = capture(model, args, {}, table)
    ctx = PassContext(table, ModelInfo.of(model), training=model.training)
    pipeline = Pipeline.for_spec(spec)
    gm = pipeline.run(gm, ctx)
    code, params = gm.code, table.render()
    results = [p.run(gm, ctx) for p in pipeline.passes]
    return results, code, gm.code, params, table.render()


def test_running_twice_changes_nothing():
    results, code1, code2, params1, params2 = run_pipeline_twice(MLP().eval(), peftc.Spec(peftc.LoRA(target="up|down")),
                                                                torch.randn(3, 4))
    assert not any(r.modified for r in results)
    assert code1 == code2 and params1 == params2


def test_overlapping_rules_are_an_error():
    spec = peftc.Spec(peftc.LoRA(target="up", r=2), peftc.LoRA(target="up|down", r=4))
    with pytest.raises(peftc.SpecError, match="already adapts"):
        peftc.compile(MLP().eval(), spec, args=(torch.randn(3, 4),), dynamic=False)


def lora_reference(x, weight, a, b, scale):
    return x @ a.T @ b.T * scale


def test_functional_linear_gets_an_adapter_that_changes_the_output():
    torch.manual_seed(0)
    model = nn.Sequential(FunctionalLinear(), nn.Linear(5, 2)).eval()
    x = torch.randn(2, 3, 4)
    cm = peftc.compile(model, peftc.LoRA(target=["0"], r=2, alpha=2), args=(x,), dynamic=False)
    assert set(cm.adapter_state_dict()) == {"0.lora_A.weight", "0.lora_B.weight"}
    assert torch.equal(cm(x), model(x))  # B = 0 at init
    with torch.no_grad():
        cm.adapter_state_dict()["0.lora_B.weight"].normal_()
    sd = cm.adapter_state_dict()
    f = model[0]
    expected = model[1]((F.linear(x, f.weight, f.bias) + lora_reference(x, None, sd["0.lora_A.weight"],
                                                                        sd["0.lora_B.weight"], 1.0)).tanh())
    torch.testing.assert_close(cm(x), expected)
    assert not torch.allclose(cm(x), model(x))


def test_einsum_and_matmul_sites_compute_lora():
    class EinsumProj(nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = nn.Module()
            self.proj.weight = nn.Parameter(torch.randn(3, 4))  # (in, out), read as "bsi,io->bso"
            self.out = nn.Parameter(torch.randn(4, 5))  # (in, out), read as x @ W

        def forward(self, x):
            return torch.einsum("bsi,io->bso", x, self.proj.weight) @ self.out

    torch.manual_seed(0)
    model, x = EinsumProj(), torch.randn(2, 5, 3)
    cm = peftc.compile(model, peftc.LoRA(target=["proj", "out"], r=2, alpha=6), args=(x,), dynamic=False)
    sd = {k: torch.randn_like(v) for k, v in cm.adapter_state_dict().items()}
    cm.load_adapter_state_dict(sd)
    s = 6 / 2
    assert set(sd) == {"proj.lora_A.weight", "proj.lora_B.weight", "out_adapter.lora_A.weight",
                       "out_adapter.lora_B.weight"}
    h = torch.einsum("bsi,io->bso", x, model.proj.weight) + lora_reference(x, None, sd["proj.lora_A.weight"],
                                                                           sd["proj.lora_B.weight"], s)
    expected = h @ model.out + lora_reference(h, None, sd["out_adapter.lora_A.weight"],
                                              sd["out_adapter.lora_B.weight"], s)
    torch.testing.assert_close(cm(x), expected, rtol=1e-5, atol=1e-5)


def test_dropout_only_in_training_graphs():
    torch.manual_seed(0)
    model = MLP()
    x = torch.randn(3, 4)
    cm = peftc.compile(model, peftc.LoRA(target="up", r=2, dropout=0.5), args=(x,), dynamic=False)
    # insert-lora's graph (prune-grads, a training pass, then fuses this dropout into the LoRA matmul)
    assert "lora_dropout" in cm.method_graph_for(x).code  # compiled in the model's (training) mode
    with torch.no_grad():
        for v in cm.adapter_state_dict().values():
            v.normal_()
    cm.eval()
    x = torch.randn(3, 4)
    assert torch.equal(cm(x), cm(x))  # eval: no dropout anywhere
    assert "lora_dropout" not in cm.method_graph_for(x).code
    cm.train()
    assert not torch.equal(cm(x), cm(x))


def test_half_precision_base_trains_float32_adapters_like_hf():
    torch.manual_seed(0)
    model = MLP().to(torch.bfloat16).eval()
    x = torch.randn(3, 4, dtype=torch.bfloat16)
    cm = peftc.compile(model, peftc.LoRA(target="up", r=2), args=(x,), dynamic=False)
    assert {v.dtype for v in cm.adapter_state_dict().values()} == {torch.float32}
    assert torch.equal(cm(x), model(x)) and cm(x).dtype == torch.bfloat16
