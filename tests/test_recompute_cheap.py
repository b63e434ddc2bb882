"""recompute-cheap, the default schedule: decided from the graph, it lowers the measured peak at <= 2% more FLOPs,
keeps gradients (dropout replayed), stays out of exports, and gives way to budgets and HF checkpointing."""

import pytest
import torch

import peftc
from peftc.memory import measure_step
from peftc.passes.recompute_cheap import RecomputeCheap, kept_in_backward
from peftc.passes.schedule_recompute import REGION_KEY, ScheduleRecompute, never_rerun
from peftc.pipeline import PassContext, Pipeline
from peftc.recompute import recomputed_regions
from tests.conftest import tiny_llama
from tests.recompute_checks import assert_same_grads, grads as _grads, inputs as _inputs

LAYERS = 3
SPEC = peftc.LoRA(target="q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj", r=2, alpha=4, dropout=0.1)


def _model():
    torch.manual_seed(0)
    return tiny_llama(num_hidden_layers=LAYERS, hidden_size=64, intermediate_size=128, vocab_size=128,
                      attention_dropout=0.1).train()


def _regions(gm):
    return [n.meta[REGION_KEY] for n in gm.graph.nodes if REGION_KEY in n.meta]


@pytest.fixture(scope="module")
def pair():
    """The same model and adapters compiled with the default pipeline and with recompute=False."""
    plain = peftc.compile(_model(), SPEC, kwargs=_inputs(), recompute=False)
    with torch.no_grad():  # non-zero B, so that every adapter tensor gets a gradient
        g = torch.Generator().manual_seed(5)
        for p in plain.trainable_parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    default = peftc.compile(_model(), SPEC, kwargs=_inputs())
    default.load_adapter_state_dict(plain.adapter_state_dict())
    return plain, default


def test_default_pipeline_recomputes_cheap_ops_of_every_region_but_the_last(pair):
    plain, default = pair
    assert str(default.pipeline.training) == "prune-grads,fuse-linear-cross-entropy,recompute-cheap"
    assert str(plain.pipeline.training) == "prune-grads,fuse-linear-cross-entropy"
    gm = default.graph_for(**_inputs())
    # 2 regions per layer; the last one runs first in backward and is left alone. The low-rank products contract
    # over r=2, the full-size matmuls over hidden 64 or intermediate 128.
    assert _regions(gm) == [f"model.layers.{i}#{k}" for i in range(LAYERS) for k in (0, 1)][:-1]
    assert gm.code.count("peftc_region_recompute_run_region(") == 2 * LAYERS - 1  # no dispatch mode, no checkpoint
    assert "checkpoint" not in gm.code
    plan = gm.get_submodule("peftc_recompute_model_layers_0_r1")  # the MLP half
    ops = {n.name: n for n in plan.region.nodes if n.op == "call_function"}
    kept = {n.target.__name__.split(".")[0] if hasattr(n.target, "__name__") else str(n.target)
            for name, n in ops.items() if name in plan.kept}
    recomputed = {str(n.target) for name, n in ops.items() if name not in plan.kept}
    assert {"linear", "dropout_linear"} <= kept and "silu" not in kept  # gate/up/down projections, LoRA's A x
    assert {"aten.silu.default", "aten.mul.Tensor", "aten.rsqrt.default", "aten.linear.default"} <= recomputed
    assert default.counters["fuse-linear-cross-entropy.fused"] == 1  # the fused loss works under it
    assert recomputed_regions(default) == tuple(f"{r}:matmul>2" for r in _regions(gm))
    assert _regions(plain.graph_for(**_inputs())) == []
    assert default.counters["recompute-cheap.regions"] == 2 * LAYERS - 1


def test_it_lowers_the_measured_peak_within_two_percent_more_flops(pair):
    plain, default = pair
    before, after = measure_step(plain, (), _inputs()), measure_step(default, (), _inputs())
    flops = (before.forward_flops + before.backward_flops, after.forward_flops + after.backward_flops)
    assert after.peak_bytes < 0.9 * before.peak_bytes, (after.peak_bytes, before.peak_bytes)
    assert flops[0] <= flops[1] <= 1.02 * flops[0], flops


@pytest.mark.parametrize("shape", [(2, 16), (3, 11)])  # the second shape runs the dynamic (SymInt) graph
def test_gradients_equal_the_unscheduled_graph_dropout_included(pair, shape):
    plain, default = pair
    inputs = _inputs(*shape, seed=1)
    (loss0, grads0), (loss1, grads1) = _grads(plain, inputs, seed=3), _grads(default, inputs, seed=3)
    assert torch.allclose(loss0, loss1, rtol=1e-6, atol=0)
    assert_same_grads(grads0, grads1, 14 * LAYERS)


def test_exports_and_eval_graphs_never_see_it(pair):
    _, default = pair
    assert not _regions(default.method_graph_for(**_inputs()))  # what every lowering reads
    default.eval()
    try:
        assert not _regions(default.graph_for(**_inputs()))
    finally:
        default.train()


def test_rerun_changes_nothing_and_options_are_checked(pair):
    _, default = pair
    gm = default.graph_for(**_inputs())
    ctx = PassContext(default.params, default._info, training=True)
    before = gm.code
    assert RecomputeCheap().run(gm, ctx).modified is False and gm.code == before
    with pytest.raises(peftc.SpecError, match="regions recomputed"):  # whole blocks on top: a clear error
        ScheduleRecompute(blocks=1).run(gm, ctx)
    for bad in (1.5, -0.1, True):
        with pytest.raises(peftc.SpecError, match="fraction"):
            RecomputeCheap(flops=bad)
    assert Pipeline.parse("insert-lora{r=2},recompute-cheap{flops=0.05}").passes[-1] == RecomputeCheap(0.05)


def test_flop_cap_and_regions_without_gradients(pair):
    plain, _ = pair
    gm = plain.graph_for(**_inputs())
    ctx = PassContext(plain.params, plain._info, training=True)
    assert RecomputeCheap(flops=0.0).choose(gm, ctx) == ()  # every low-rank product costs something
    assert len(RecomputeCheap(flops=0.002).choose(gm, ctx)) < 2 * LAYERS - 1
    top = peftc.compile(_model(), peftc.LoRA(target=r"model\.layers\.2\..*(q_proj|down_proj)", r=2),
                        kwargs=_inputs())
    # Layers 0 and 1 carry no gradient: nothing of them is kept for backward, so nothing to recompute.
    assert _regions(top.graph_for(**_inputs())) == ["model.layers.2#0"]


def test_budgets_and_checkpointing_replace_it(pair):
    plain, default = pair
    budgeted = peftc.compile(_model(), SPEC, kwargs=_inputs(), memory_budget="1GiB")
    assert "recompute-cheap" not in str(budgeted.pipeline) and budgeted.recompute_plan.regions == ()
    with pytest.raises(peftc.SpecError, match="already has recompute-cheap"):
        peftc.recompute.plan_recompute(default, "1GiB")

    grads = _grads(default, _inputs(), seed=1)
    default.gradient_checkpointing_enable()
    try:
        gm = default.graph_for(**_inputs())
        assert "recompute-cheap" not in str(default.pipeline) and not _regions(gm)
        assert gm.code.count("torch.utils.checkpoint.checkpoint(") == LAYERS  # whole blocks, HF-style
        loss, g = _grads(default, _inputs(), seed=1)
        assert torch.allclose(loss, grads[0]) and all(torch.allclose(g[k], v, rtol=1e-6, atol=1e-7)
                                                      for k, v in grads[1].items())
    finally:
        default.gradient_checkpointing_disable()
    assert str(default.pipeline).endswith("recompute-cheap") and len(_regions(default.graph_for(**_inputs()))) == 5


def test_what_is_never_rerun_and_what_the_cheap_rule_keeps():
    """Random ops and calls of unknown cost are never rerun; prune-grads' causal SDPA is rerunnable without dropout
    (schedule-recompute may rerun it) but kept by recompute-cheap, as attention; getitem is free."""
    import operator

    from torch.fx import Graph, GraphModule

    from peftc.passes.prune_grads import causal_sdpa

    aten = torch.ops.aten
    g = Graph()
    x, q = g.placeholder("x"), g.placeholder("q")
    nodes = {
        "dropout": g.call_function(aten.dropout.default, (x, 0.1, True)),
        "silu": g.call_function(aten.silu.default, (x,)),
        "getitem": g.call_function(operator.getitem, (x, 0)),
        "python": g.call_function(print, (x,)),
        "sdpa": g.call_function(causal_sdpa, (q, q, q, None, True, 0.0, False)),
        "sdpa_dropout": g.call_function(causal_sdpa, (q, q, q, None, True, 0.1, False)),
        "aten_sdpa_dropout": g.call_function(aten.scaled_dot_product_attention.default, (q, q, q, None, 0.1)),
    }
    g.output(None)
    gm = GraphModule(torch.nn.Module(), g)
    never = {name for name, n in nodes.items() if never_rerun(n)}
    assert never == {"dropout", "python", "sdpa_dropout", "aten_sdpa_dropout"}
    kept = {name for name, n in nodes.items() if kept_in_backward(gm, n, 2)}
    assert kept == never | {"sdpa"}


def test_under_autocast_it_recomputes_with_the_same_gradients(pair):
    """Graphs captured under autocast (bf16 Trainer and TRL runs) get the default schedule too: backward recomputes
    under the autocast state forward ran with, so gradients equal the unscheduled graph's."""
    plain, default = pair
    with torch.autocast("cpu", dtype=torch.bfloat16):
        (loss0, grads0), (loss1, grads1) = _grads(plain, _inputs(), seed=3), _grads(default, _inputs(), seed=3)
        gm = default.graph_for(**_inputs())
    assert gm is not default.graph_for(**_inputs())  # a graph of its own, captured under autocast
    assert len(_regions(gm)) == 2 * LAYERS - 1
    assert torch.equal(loss0, loss1) and not torch.equal(loss1, _grads(default, _inputs(), seed=3)[0])
    assert_same_grads(grads0, grads1, 14 * LAYERS)


def test_a_second_backward_recomputes_again(pair):
    """retain_graph=True: each backward recomputes the dropped tensors from what forward kept. (Through the logits:
    the fused loss keeps its gradients for one backward.)"""
    grads = []
    for cm in pair:
        for p in cm.trainable_parameters():
            p.grad = None
        torch.manual_seed(3)
        out = cm(input_ids=_inputs()["input_ids"]).logits.pow(2).mean()
        out.backward(retain_graph=True)
        out.backward()
        grads.append({n: p.grad for n, p in cm.named_parameters() if p.requires_grad})
    assert _regions(pair[1].graph_for(input_ids=_inputs()["input_ids"]))
    assert_same_grads(*grads, 14 * LAYERS)
