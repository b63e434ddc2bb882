"""CompiledModel: called like the original, new signatures and modes on first use, strict adapter I/O, clear errors."""

from dataclasses import dataclass

import pytest
import torch
from torch import nn

import peftc
from peftc.pipeline import Pass, PassResult, register_pass

from conftest import ids, tiny_llama


class DropMLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.up = nn.Linear(4, 8)
        self.drop = nn.Dropout(0.5)
        self.down = nn.Linear(8, 4)
        self.register_buffer("shift", torch.ones(4))

    def forward(self, x, scale: float = 1.0):
        return self.down(self.drop(self.up(x).relu())) * scale + self.shift


def test_hf_output_structure_dynamic_shapes_and_new_keyword_sets():
    torch.manual_seed(0)
    model = tiny_llama().eval()
    cm = peftc.compile(model, peftc.LoRA(target="q_proj|v_proj", r=2), kwargs={"input_ids": ids()})
    out = cm(input_ids=ids(batch=3, seq=5))  # other sizes along the dynamic dims
    assert type(out).__name__ == "CausalLMOutputWithPast" and out.logits.shape == (3, 5, 64)
    train_ids = ids(batch=2, seq=6, seed=3)
    loss = cm(input_ids=train_ids, labels=train_ids).loss  # a keyword set the example did not have
    torch.testing.assert_close(loss, model(input_ids=train_ids, labels=train_ids, use_cache=False).loss)
    loss.backward()
    assert all(p.grad is not None for p in cm.trainable_parameters())  # the new graph trains the same adapters
    assert len(cm._graphs) == 2


def test_train_and_eval_switch_dropout_as_on_the_original():
    torch.manual_seed(0)
    model, x = DropMLP(), torch.randn(5, 4)
    cm = peftc.compile(model, peftc.LoRA(target="up", r=2), args=(x,), dynamic=False)
    torch.manual_seed(7)
    ours = cm(x)
    torch.manual_seed(7)
    torch.testing.assert_close(ours, model.train()(x))  # same dropout draws
    cm.eval()
    torch.testing.assert_close(cm(x), model.eval()(x))
    assert cm.training is False and torch.equal(cm(x), cm(x))


def test_non_tensor_arguments_are_part_of_the_signature():
    torch.manual_seed(0)
    model, x = DropMLP().eval(), torch.randn(5, 4)
    cm = peftc.compile(model, peftc.LoRA(target="up", r=2), args=(x,), dynamic=False)
    torch.testing.assert_close(cm(x, 3.0), model(x, 3.0))
    torch.testing.assert_close(cm(x, scale=2.0), model(x, scale=2.0))


def test_static_shapes_recapture_on_a_new_shape():
    torch.manual_seed(0)
    model = DropMLP().eval()
    cm = peftc.compile(model, peftc.LoRA(target="up", r=2), args=(torch.randn(5, 4),), dynamic=False)
    x = torch.randn(7, 4)
    torch.testing.assert_close(cm(x), model(x))
    assert sum(len(g) for g in cm._graphs.values()) == 2


def test_to_dtype_moves_parameters_and_buffers_for_every_graph():
    torch.manual_seed(0)
    model = DropMLP().eval()
    cm = peftc.compile(model, peftc.LoRA(target="up", r=2), args=(torch.randn(5, 4),))
    cm.double()
    x = torch.randn(3, 4, dtype=torch.float64)
    out = cm(x)
    assert out.dtype == torch.float64
    assert cm.get_buffer("shift").dtype == torch.float64


def test_adapter_state_dict_round_trip_and_strict_errors():
    torch.manual_seed(0)
    cm = peftc.compile(DropMLP().eval(), peftc.LoRA(target="up|down", r=2), args=(torch.randn(5, 4),), dynamic=False)
    sd = cm.adapter_state_dict()
    assert set(sd) == {"up.lora_A.weight", "up.lora_B.weight", "down.lora_A.weight", "down.lora_B.weight"}
    assert sd["up.lora_A.weight"].shape == (2, 4) and sd["up.lora_B.weight"].shape == (8, 2)
    new = {k: torch.randn_like(v) for k, v in sd.items()}
    cm.load_adapter_state_dict(new)
    assert all(torch.equal(cm.adapter_state_dict()[k], v) for k, v in new.items())

    with pytest.raises(peftc.AdapterError, match="unknown key `up.lora_A.weights`; did you mean `up.lora_A.weight`"):
        cm.load_adapter_state_dict({**new, "up.lora_A.weights": new["up.lora_A.weight"]})
    with pytest.raises(peftc.AdapterError, match="missing `down.lora_B.weight`"):
        cm.load_adapter_state_dict({k: v for k, v in new.items() if k != "down.lora_B.weight"})
    with pytest.raises(peftc.AdapterError, match=r"`up.lora_B.weight` has shape \(8, 3\); the model expects \(8, 2\)"):
        cm.load_adapter_state_dict({**new, "up.lora_B.weight": torch.zeros(8, 3)})
    assert isinstance(peftc.AdapterError("x"), peftc.PeftcError)


def test_state_dict_reads_like_the_original_plus_adapters():
    torch.manual_seed(0)
    model = DropMLP().eval()
    cm = peftc.compile(model, peftc.LoRA(target="up", r=2), args=(torch.randn(5, 4),), dynamic=False)
    assert set(cm.state_dict()) == set(model.state_dict()) | {"up.lora_A.weight", "up.lora_B.weight"}
    assert [n for n, p in cm.named_parameters() if p.requires_grad] == ["up.lora_A.weight", "up.lora_B.weight"]


class Branchy(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 4)

    def forward(self, x):
        if x.sum() > 0:  # data-dependent control flow
            return self.lin(x)
        return x


def test_capture_errors_name_the_model_the_operation_and_the_fix():
    with pytest.raises(peftc.CaptureError) as err:
        peftc.compile(Branchy(), peftc.LoRA(target="lin"), args=(torch.randn(2, 4),))
    msg = str(err.value)
    assert "Branchy" in msg and "if x.sum() > 0" in msg and "Likely fix" in msg
    with pytest.raises(peftc.CaptureError, match="use_cache=False"):
        peftc.compile(tiny_llama(), peftc.LoRA(target="q_proj"), kwargs={"input_ids": ids(), "use_cache": True})


@register_pass
@dataclass(frozen=True)
class Boom(Pass):
    name = "test-boom"

    def run(self, gm, ctx):
        raise RuntimeError("kaput")


@register_pass
@dataclass(frozen=True)
class UnfreezeBehindTheTablesBack(Pass):
    name = "test-unfreeze"

    def run(self, gm, ctx):
        next(p for p in ctx.params if p.role == "base").tensor.requires_grad_(True)
        return PassResult(gm, True)


def test_failing_pass_is_named_with_the_passes_before_it():
    with pytest.raises(peftc.PassError, match=r"pass #3 `test-boom` failed: kaput \(passes run before it: "
                                              r"freeze-base, insert-lora\)"):
        peftc.compile(DropMLP().eval(), None, args=(torch.randn(2, 4),), pipeline="insert-lora{target=up},test-boom",
                      dynamic=False)


def test_verifier_catches_a_pass_that_breaks_the_trainable_set():
    with pytest.raises(peftc.PassError, match="test-unfreeze.*the table says frozen but requires_grad=True"):
        peftc.compile(DropMLP().eval(), None, args=(torch.randn(2, 4),), pipeline="test-unfreeze", dynamic=False)
    # with the verifier off, the same pipeline goes through
    peftc.compile(DropMLP().eval(), None, args=(torch.randn(2, 4),), pipeline="test-unfreeze", verify=False,
                  dynamic=False)


def test_report_and_diff_filters():
    torch.manual_seed(0)
    cm = peftc.compile(tiny_llama().eval(), peftc.LoRA(target="q_proj", r=2), kwargs={"input_ids": ids()},
                       dynamic=False)
    text = str(cm.report())
    assert "freeze-base" in text and "insert-lora" in text
    records = cm.report().records
    assert [r.name for r in records] == ["freeze-base", "insert-lora", "prune-grads",  # the default pipeline
                                         "fuse-linear-cross-entropy", "recompute-cheap"]
    assert records[1].params_added == 4 and records[1].trainable == cm.parameter_counts()[0]
    layer0 = cm.diff("insert-lora", module="model.layers.0")
    assert "model.layers.0.self_attn.q_proj.lora_A.weight" in layer0 and "layers_1" not in layer0
    with pytest.raises(peftc.PeftcError, match="no pass named `merge`"):
        cm.diff("merge")


def test_compile_needs_inputs_and_a_module():
    with pytest.raises(peftc.PeftcError, match="example inputs"):
        peftc.compile(DropMLP(), peftc.LoRA(target="up"))
    with pytest.raises(peftc.PeftcError, match="nn.Module"):
        peftc.compile(lambda x: x, peftc.LoRA(target="up"), args=(torch.randn(2, 4),))


def test_measure_step_on_a_signature_not_yet_captured():
    from peftc.memory import measure_step

    torch.manual_seed(0)
    model, x = DropMLP().eval(), torch.randn(5, 4)
    cm = peftc.compile(model, peftc.LoRA(target="up", r=2), args=(x,), dynamic=False)
    first = measure_step(cm, (x, 2.0))  # scale=2.0 is a new signature: captured before measuring
    again = measure_step(cm, (x, 2.0))
    assert first == again and isinstance(first.forward_flops, int) and first.forward_flops > 0


@pytest.mark.parametrize("fuse_loss", [False, True])
def test_one_tensor_for_two_inputs_at_capture_does_not_tie_them(fuse_loss):
    """Compiled with `input_ids=ids, labels=ids` (one tensor), later calls with other labels get their own loss."""
    torch.manual_seed(0)
    model = tiny_llama()
    x = ids()
    cm = peftc.compile(model, peftc.LoRA(target="q_proj"), kwargs={"input_ids": x, "labels": x},
                       fuse_loss=fuse_loss, dynamic=False)
    other = ids(seed=5)
    assert not torch.equal(other, x)
    with torch.no_grad():
        torch.testing.assert_close(cm(input_ids=x, labels=other).loss, model(input_ids=x, labels=other).loss)
