"""schedule-recompute{blocks=...}: whole blocks recomputed, same gradients, lower peaks (the memory-budget planner's
region-level schedules: tests/test_recompute_plan.py)."""

import pytest
import torch

import peftc
from peftc.cli import main
from peftc.passes.schedule_recompute import ScheduleRecompute, repeated_blocks
from peftc.pipeline import PassContext
from peftc.recompute import parse_bytes, peak_with_blocks, plan_recompute, repeated_block_paths
from tests.conftest import ids, tiny_bert, tiny_gpt2, tiny_llama
from tests.recompute_checks import assert_same_grads, grads as _grads, inputs as _inputs

LAYERS = 3
BLOCKS = [f"model.layers.{i}" for i in range(LAYERS)]
PIPELINE = "insert-lora{r=4,target=q_proj|v_proj|down_proj,dropout=0.1},prune-grads"


def _model():
    torch.manual_seed(0)
    return tiny_llama(num_hidden_layers=LAYERS, attention_dropout=0.1).train()


@pytest.fixture(scope="module")
def peaks():
    """Measured peak with 0..LAYERS blocks recomputed, and the model compiled without a budget."""
    cm = peftc.compile(_model(), None, kwargs=_inputs(), pipeline=PIPELINE, dynamic=False)
    return [peak_with_blocks(cm, k) for k in range(LAYERS + 1)]


@pytest.fixture(scope="module")
def pair():
    """The same model and adapters compiled without and with every block recomputed (the scheduled one under the
    default dynamic capture; the reference recaptures at the second shape)."""
    plain = peftc.compile(_model(), None, kwargs=_inputs(), pipeline=PIPELINE, dynamic=False)
    scheduled = peftc.compile(_model(), None, kwargs=_inputs(), pipeline=PIPELINE + ",schedule-recompute")
    with torch.no_grad():  # non-zero B, so that every adapter tensor gets a gradient
        for p in plain.trainable_parameters():
            p.normal_(0, 0.1)
    scheduled.load_adapter_state_dict(plain.adapter_state_dict())
    return plain, scheduled


@pytest.mark.parametrize("shape", [(2, 16), (3, 11)])  # the second shape runs the dynamic (SymInt) graph
def test_scheduled_gradients_equal_unscheduled(pair, shape):
    plain, scheduled = pair
    inputs = _inputs(*shape, seed=1)
    loss0, grads0 = _grads(plain, inputs, seed=3)
    loss1, grads1 = _grads(scheduled, inputs, seed=3)
    calls = [n for n in scheduled.graph_for(**inputs).graph.nodes if n.target is torch.utils.checkpoint.checkpoint]
    assert len(calls) == LAYERS
    assert torch.allclose(loss0, loss1, rtol=1e-6, atol=0)
    assert_same_grads(grads0, grads1, 6 * LAYERS)


def test_peak_decreases_with_more_recomputed_blocks(peaks):
    # Every block but the last: backward needs the last block's activations first, so recomputing it saves nothing
    # (its saved inputs and the rerun cost a little: the planner measures rather than assumes).
    assert all(a > b for a, b in zip(peaks[:LAYERS], peaks[1:LAYERS])), peaks
    assert min(peaks) == peaks[LAYERS - 1] and peaks[LAYERS] < peaks[0], peaks


def test_eval_graph_is_unchanged_and_idempotent():
    cm = peftc.compile(_model().eval(), None, kwargs=_inputs(), pipeline=PIPELINE, dynamic=False)
    eval_gm = cm.graph_module
    ctx = PassContext(cm.params, cm._info, training=False)
    before = eval_gm.code
    assert ScheduleRecompute().run(eval_gm, ctx).modified is False and eval_gm.code == before
    assert list(repeated_blocks(eval_gm, cm._info)) == BLOCKS

    cm.train()
    gm = cm.graph_for(**_inputs())
    ctx = PassContext(cm.params, cm._info, training=True)
    assert ScheduleRecompute(blocks=1).run(gm, ctx).modified
    gm.recompile()
    once = gm.code
    assert ScheduleRecompute(blocks=1).run(gm, ctx).modified is False and gm.code == once
    assert list(repeated_blocks(gm, cm._info)) == BLOCKS  # a checkpointed block is still found, as its call
    assert ScheduleRecompute(blocks=("model.layers.2",)).run(gm, ctx).modified
    gm.recompile()
    assert ScheduleRecompute(blocks="model.layers.0|model.layers.2").run(gm, ctx).modified is False
    assert gm.code.count("torch.utils.checkpoint.checkpoint(") == 2
    assert repeated_block_paths(cm) == tuple(BLOCKS)


def test_bad_options_are_spec_errors(pair):
    with pytest.raises(peftc.SpecError, match="blocks must be"):
        ScheduleRecompute(blocks=-1)
    cm, scheduled = pair
    ctx = PassContext(cm.params, cm._info, training=True)
    with pytest.raises(peftc.SpecError, match="only 3 repeated blocks"):
        ScheduleRecompute(blocks=4).run(cm.graph_module, ctx)
    with pytest.raises(peftc.SpecError, match="not a repeated block"):
        ScheduleRecompute(blocks="model.layers.7").run(cm.graph_module, ctx)
    with pytest.raises(peftc.SpecError, match="2GiB"):
        parse_bytes("2 parsecs")
    with pytest.raises(peftc.SpecError, match="already has schedule-recompute"):
        plan_recompute(scheduled, "1GiB")


LLAMA = "examples/tiny_models.py:tiny_llama"


def test_cli_memory_budget_on_tiny_llama(capsys):
    code = main(["explain", LLAMA, "-p", "insert-lora{r=4,target=q_proj}", "-q", "--memory-budget", "1GiB"])
    out = capsys.readouterr().out
    assert code == 0
    assert "recomputed in backward: nothing" in out
    assert "memory budget 1.00 GiB (1,073,741,824 bytes): no recomputation needed; peak of one training step" in out

    code = main(["explain", LLAMA, "-p", "insert-lora{r=4,target=q_proj}", "-q", "--memory-budget", "100"])
    err = capsys.readouterr().err
    assert code == 1 and "memory budget 100 B (100 bytes) is too small" in err and "smallest feasible budget" in err


@pytest.mark.parametrize("value", ["2 parsecs", "0", "-5GiB"])
def test_cli_bad_memory_budget_is_exit_2(capsys, value):
    code = main(["explain", LLAMA, "-p", "insert-lora{r=4,target=q_proj}", "-q", "--memory-budget", value])
    err = capsys.readouterr().err
    assert code == 2 and "--memory-budget" in err and err.count("\n") == 1


@pytest.mark.parametrize("make, target, blocks", [
    (tiny_gpt2, "c_attn", ["transformer.h.0", "transformer.h.1"]),  # dropout everywhere in training
    (tiny_bert, "query|value", ["bert.encoder.layer.0", "bert.encoder.layer.1"]),
])
def test_other_architectures_find_their_blocks_and_keep_gradients(make, target, blocks):
    torch.manual_seed(0)
    model, inputs = make().train(), {"input_ids": ids(2, 8)}
    plain = peftc.compile(model, None, kwargs=inputs, pipeline=f"insert-lora{{r=4,target={target}}}", dynamic=False)
    scheduled = peftc.compile(model, None, kwargs=inputs,
                              pipeline=f"insert-lora{{r=4,target={target}}},schedule-recompute", dynamic=False)
    assert repeated_block_paths(scheduled) == tuple(blocks)
    assert scheduled.graph_module.code.count("torch.utils.checkpoint.checkpoint(") == len(blocks)
    with torch.no_grad():  # non-zero B, so that A gets a gradient too
        for p in plain.trainable_parameters():
            p.normal_(0, 0.1)
    scheduled.load_adapter_state_dict(plain.adapter_state_dict())
    grads = []
    for cm in (plain, scheduled):
        torch.manual_seed(1)
        out = cm(**inputs)
        (out.logits if hasattr(out, "logits") else out[0]).sum().backward()
        grads.append([p.grad for p in cm.trainable_parameters()])
    assert len(grads[0]) == 2 * len(target.split("|")) * len(blocks)  # lora_A and lora_B per site
    for a, b in zip(*grads):
        assert a.abs().sum() > 0
        assert torch.allclose(a, b, rtol=1e-6, atol=1e-6 * a.abs().max().item())
