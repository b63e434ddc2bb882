"""peftc.memory: byte counts checked against what autograd must keep, computed by hand for tiny float32 models."""

import gc

import pytest
import torch
from torch import nn
from torch.multiprocessing.reductions import StorageWeakRef

from peftc.errors import PeftcError
from peftc.memory import LiveStorageTracker, MeasureError, StepReport, measure_step, storage_bytes

F32 = 4  # bytes per float32 element
M, K, N, O = 4, 8, 16, 3  # batch, in, hidden, out


def nbytes(*shape: int) -> int:
    n = F32
    for s in shape:
        n *= s
    return n


class TwoLayer(nn.Module):
    """y = relu(x @ W1) @ W2."""

    def __init__(self, w1_trainable: bool, w2_trainable: bool) -> None:
        super().__init__()
        self.W1 = nn.Parameter(torch.randn(K, N), requires_grad=w1_trainable)
        self.W2 = nn.Parameter(torch.randn(N, O), requires_grad=w2_trainable)

    def forward(self, x):
        return (x @ self.W1).relu() @ self.W2


class Matmul(nn.Module):
    """y = A @ B with both operands as parameters."""

    def __init__(self, a_trainable: bool, b_trainable: bool) -> None:
        super().__init__()
        self.A = nn.Parameter(torch.randn(M, K), requires_grad=a_trainable)
        self.B = nn.Parameter(torch.randn(K, N), requires_grad=b_trainable)

    def forward(self):
        return self.A @ self.B


# --- the mechanism the tracker relies on ---------------------------------------------------------------------------

def test_storage_weak_ref_identifies_a_storage_and_sees_it_die():
    t = torch.zeros(10)
    ref = StorageWeakRef(t.untyped_storage())
    view = t[2:]
    assert StorageWeakRef(view.untyped_storage()).cdata == ref.cdata
    assert StorageWeakRef(torch.zeros(10).untyped_storage()).cdata != ref.cdata
    del t
    gc.collect()
    assert not ref.expired()  # the view still holds the storage
    del view
    assert ref.expired()


def test_storage_weak_ref_sees_a_storage_held_only_by_autograd():
    x = torch.randn(5, requires_grad=True)
    y = x.exp()  # exp saves its result for backward
    ref = StorageWeakRef(y.untyped_storage())
    loss = y.sum()
    del y
    assert not ref.expired()
    loss.backward()  # frees the saved result
    assert ref.expired()


# --- LiveStorageTracker -----------------------------------------------------------------------------------------

def test_views_count_once_and_keep_the_storage_alive():
    with LiveStorageTracker() as tracker:
        t = torch.zeros(10)
        v1, v2, v3 = t[2:], t.view(2, 5), t.view(2, 5).t()
        assert tracker.live_bytes == nbytes(10)
        del t
        assert tracker.live_bytes == nbytes(10)
        del v1, v2
        assert tracker.live_bytes == nbytes(10)
        del v3
        assert tracker.live_bytes == 0
    assert tracker.peak_bytes == nbytes(10)


def test_views_and_in_place_ops_on_pre_existing_tensors_create_nothing():
    p = torch.zeros(4, 6)
    with LiveStorageTracker() as tracker:
        views = [p.t(), p[1:], p.view(-1), p.detach(), p.expand(2, 4, 6)]
        p.add_(1)
        p[0].mul_(2)
        assert tracker.live_bytes == 0
        q = p + 1
        assert tracker.live_bytes == nbytes(4, 6)
    del views, q


def test_out_and_resize_grow_a_tracked_storage():
    x = torch.ones(3, 4)
    with LiveStorageTracker() as tracker:
        out = torch.empty(0)
        assert tracker.live_bytes == 0
        torch.add(x, x, out=out)
        assert tracker.live_bytes == nbytes(3, 4)
        out.resize_(100)
        assert tracker.live_bytes == nbytes(100)


def test_torch_tensor_literals_count_as_created():
    with LiveStorageTracker() as tracker:
        c = torch.tensor([1.0, 2.0, 3.0])
        assert tracker.live_bytes == nbytes(3)
    del c


def test_peak_keeps_a_dropped_temporary():
    with LiveStorageTracker() as tracker:
        a = torch.ones(100)
        del a
        b = torch.ones(10)
        assert tracker.live_bytes == nbytes(10)
        tracker.reset_peak()
        assert tracker.peak_bytes == nbytes(10)
    assert tracker.peak_bytes == nbytes(10)
    del b


def test_backward_ops_are_seen_and_counted_in_the_peak():
    x = torch.randn(M, K)
    w = torch.randn(K, N, requires_grad=True)
    with LiveStorageTracker() as tracker:
        loss = (x @ w).sum()  # mm saves only x for w's grad, so x @ w dies once summed
        assert tracker.live_bytes == nbytes()
        assert tracker.peak_bytes == nbytes(M, N) + nbytes()
        loss.backward()
        assert tracker.tracked_bytes([w.grad]) == nbytes(K, N)
    # backward: ones_like(loss), expanded to grad_y without a copy, then w.grad = x.T @ grad_y
    assert tracker.peak_bytes == nbytes() + nbytes() + nbytes(K, N)


# --- measure_step: analytic cases ---------------------------------------------------------------------------------

def test_two_layer_with_only_w2_trainable_saves_exactly_the_relu_output():
    model, x = TwoLayer(w1_trainable=False, w2_trainable=True), torch.randn(M, K)
    r = measure_step(model, (x,))
    # x @ W1 needs no grad, so it is freed after relu; W2's grad needs relu's output; y and the loss are outputs.
    assert r.saved_bytes == nbytes(M, N) + nbytes(M, O) + nbytes()
    assert r.forward_peak_bytes == 2 * nbytes(M, N)  # x @ W1 and its relu, at once
    assert r.grad_bytes == nbytes(N, O)
    assert model.W1.grad is None and model.W2.grad.shape == (N, O)
    assert r.param_bytes == nbytes(K, N) + nbytes(N, O)
    assert r.trainable_param_bytes == nbytes(N, O)
    assert r.input_bytes == nbytes(M, K)
    assert r.buffer_bytes == 0


def test_two_layer_with_both_trainable_also_pays_for_w1_grad():
    model, x = TwoLayer(w1_trainable=True, w2_trainable=True), torch.randn(M, K)
    r = measure_step(model, (x,))
    # x and W1 (saved by the first matmul) are not created by the step; relu's output serves relu's and W2's grads.
    assert r.saved_bytes == nbytes(M, N) + nbytes(M, O) + nbytes()
    assert r.grad_bytes == nbytes(K, N) + nbytes(N, O)


def test_frozen_linear_saves_nothing_for_its_input():
    def step(weight_trainable: bool) -> StepReport:
        model = nn.Sequential(nn.Linear(K, N, bias=False), nn.Linear(N, O, bias=False))
        model[1].weight.requires_grad_(weight_trainable)  # the first layer stays trainable, so h needs grad
        return measure_step(model, (torch.randn(M, K),))

    frozen, trainable = step(False), step(True)
    # outputs: y and the loss. A frozen second layer needs only its weight for grad_h, so h dies after it.
    assert frozen.saved_bytes == nbytes(M, O) + nbytes()
    assert trainable.saved_bytes == nbytes(M, N) + nbytes(M, O) + nbytes()


class WithDroppedTemporary(nn.Module):
    def __init__(self, drop: bool) -> None:
        super().__init__()
        self.drop = drop
        self.W = nn.Parameter(torch.randn(K, O))

    def forward(self, x):
        if self.drop:
            big = x.repeat(64, 1)  # computed and thrown away
            del big
        return x @ self.W


def test_a_dropped_output_raises_the_peak_but_not_the_saved_bytes():
    x = torch.randn(M, K)
    base = measure_step(WithDroppedTemporary(drop=False), (x,))
    dropped = measure_step(WithDroppedTemporary(drop=True), (x,))
    assert dropped.saved_bytes == base.saved_bytes == nbytes(M, O) + nbytes()
    assert base.forward_peak_bytes == nbytes(M, O) + nbytes()
    assert dropped.forward_peak_bytes == nbytes(64 * M, K)
    assert dropped.peak_bytes == nbytes(64 * M, K)


def test_views_of_one_activation_are_counted_once():
    class Views(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.W = nn.Parameter(torch.randn(K, N))

        def forward(self, x):
            h = x @ self.W
            return h.sum(), h[1:], h.t(), h.view(-1)

    r = measure_step(Views(), (torch.randn(M, K),), loss_fn=lambda out: out[0])
    assert r.saved_bytes == nbytes(M, N) + nbytes()  # h once, plus the loss h.sum()


def test_grads_of_inputs_count_in_the_peak_but_not_as_grad_bytes():
    x = torch.randn(M, K, requires_grad=True)
    model = nn.Linear(K, O, bias=False).requires_grad_(False)
    r = measure_step(model, (x,))
    assert r.grad_bytes == 0
    assert x.grad is not None
    # y, the loss, ones_like(loss), and grad_x = grad_y @ W (grad_y is an expand of the ones: no new storage)
    assert r.peak_bytes == nbytes(M, O) + nbytes() + nbytes() + nbytes(M, K)


def test_existing_grads_are_cleared_first():
    model, x = TwoLayer(w1_trainable=False, w2_trainable=True), torch.randn(M, K)
    measure_step(model, (x,))
    first = model.W2.grad.clone()
    stale = model.W2.grad
    r = measure_step(model, (x,))
    assert model.W2.grad is not stale  # re-allocated, so it is measured
    assert torch.equal(model.W2.grad, first)  # not accumulated
    assert r.grad_bytes == nbytes(N, O)


def test_measurement_is_repeatable():
    model, x = TwoLayer(w1_trainable=True, w2_trainable=True), torch.randn(M, K)
    assert measure_step(model, (x,)) == measure_step(model, (x,))


def test_cyclic_garbage_is_not_counted_as_saved():
    class Cycle(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.W = nn.Parameter(torch.randn(K, O))

        def forward(self, x):
            y = x @ self.W
            junk = [y * 2]
            junk.append(junk)  # unreachable once forward returns, but only a collection frees it
            return y

    r = measure_step(Cycle(), (torch.randn(M, K),))
    assert r.saved_bytes == nbytes(M, O) + nbytes()
    assert r.forward_peak_bytes == 2 * nbytes(M, O) + nbytes()  # the peak is an upper bound: garbage included


def test_buffers_are_reported_apart():
    model = nn.Sequential(nn.Linear(K, N), nn.BatchNorm1d(N))
    r = measure_step(model, (torch.randn(M, K),))
    assert r.buffer_bytes == 2 * nbytes(N) + 8  # running mean, running var, num_batches_tracked (int64)
    assert r.param_bytes == nbytes(N, K) + nbytes(N) + 2 * nbytes(N)


# --- FLOPs ---------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize(("a_trainable", "b_trainable", "backward_matmuls"),
                         [(True, True, 2), (True, False, 1), (False, True, 1)])
def test_matmul_flops(a_trainable, b_trainable, backward_matmuls):
    r = measure_step(Matmul(a_trainable, b_trainable))
    assert r.forward_flops == 2 * M * K * N
    assert r.backward_flops == backward_matmuls * 2 * M * K * N


def test_two_layer_flops_split_forward_and_backward():
    r = measure_step(TwoLayer(w1_trainable=False, w2_trainable=True), (torch.randn(M, K),))
    assert r.forward_flops == 2 * M * K * N + 2 * M * N * O
    assert r.backward_flops == 2 * M * N * O  # only W2's grad; nothing flows back into W1


# --- loss selection and errors ------------------------------------------------------------------------------------

class Returns(nn.Module):
    def __init__(self, make_output) -> None:
        super().__init__()
        self.W = nn.Parameter(torch.randn(K, O))
        self.make_output = make_output

    def forward(self, x):
        return self.make_output(x @ self.W)


def test_default_loss_prefers_output_loss():
    from transformers.modeling_outputs import CausalLMOutput

    r = measure_step(Returns(lambda y: CausalLMOutput(logits=y, loss=y.exp().mean())), (torch.randn(M, K),))
    # logits, exp(logits) (saved by exp's backward) and the loss; logits.sum() would have saved no exp
    assert r.saved_bytes == nbytes(M, O) + nbytes(M, O) + nbytes()


def test_default_loss_sums_the_first_tensor_of_a_nest():
    model, x = Returns(lambda y: ("no tensor here", [y, y * 2])), torch.randn(M, K)
    r = measure_step(model, (x,))
    assert r.saved_bytes == nbytes(M, O) + nbytes(M, O) + nbytes()
    torch.testing.assert_close(model.W.grad, x.T @ torch.ones(M, O))  # d(sum y)/dW, not d(sum 2y)/dW


def test_custom_loss_fn_runs_inside_the_measured_forward():
    model, x = Returns(lambda y: y), torch.randn(M, K)
    plain = measure_step(model, (x,), loss_fn=lambda y: y.sum())
    custom = measure_step(model, (x,), loss_fn=lambda y: y.exp().sum())
    assert plain.saved_bytes == nbytes(M, O) + nbytes()
    assert custom.saved_bytes == nbytes(M, O) + nbytes(M, O) + nbytes()  # exp saves its result


def test_kwargs_are_passed_and_counted_as_inputs():
    class Kw(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.W = nn.Parameter(torch.randn(K, O))

        def forward(self, *, x, scale):
            return x @ self.W * scale

    r = measure_step(Kw(), kwargs={"x": torch.randn(M, K), "scale": torch.ones(1)})
    assert r.input_bytes == nbytes(M, K) + nbytes(1)


@pytest.mark.parametrize(("model", "loss_fn", "message"), [
    (Returns(lambda y: "text"), None, "returned no tensor"),
    (Returns(lambda y: y), lambda y: y, "one-element tensor"),
    (Returns(lambda y: y).requires_grad_(False), None, "does not require grad"),
])
def test_errors_are_peftc_errors(model, loss_fn, message):
    with pytest.raises(MeasureError, match=message) as info:
        measure_step(model, (torch.randn(M, K),), loss_fn=loss_fn)
    assert isinstance(info.value, PeftcError)


def test_not_a_module_is_rejected():
    with pytest.raises(MeasureError, match="nn.Module"):
        measure_step(lambda x: x, (torch.randn(2),))


# --- report ------------------------------------------------------------------------------------------------------

def test_report_is_frozen_and_renders():
    r = measure_step(TwoLayer(w1_trainable=False, w2_trainable=True), (torch.randn(M, K),))
    with pytest.raises(AttributeError):
        r.peak_bytes = 0
    d = r.as_dict()
    assert d["saved_bytes"] == r.saved_bytes and set(d) == {
        "peak_bytes", "forward_peak_bytes", "saved_bytes", "grad_bytes", "param_bytes", "trainable_param_bytes",
        "buffer_bytes", "input_bytes", "forward_flops", "backward_flops", "optimizer_state_bytes"}
    # AdamW's state by default: two fp32 moments per trainable element, counted in what the device holds.
    assert r.optimizer_state_bytes == 8 * sum(p.numel() for p in TwoLayer(False, True).parameters() if p.requires_grad)
    assert r.device_peak_bytes == r.param_bytes + r.buffer_bytes + r.input_bytes + r.optimizer_state_bytes + r.peak_bytes
    text = str(r)
    assert f"saved       {r.saved_bytes} B" in text
    assert "forward 1.41 k" in text


def test_storage_bytes_counts_shared_storage_once():
    t = torch.zeros(6)
    assert storage_bytes([t, t[1:], t.view(2, 3)]) == nbytes(6)
    assert storage_bytes([t, torch.zeros(6)]) == 2 * nbytes(6)


def test_measure_step_leaves_the_collector_as_it_found_it():
    """It freezes the heap while it measures (so its second collection scans only what the step made) unless the
    caller froze it already, and leaves the collector enabled and frozen as before."""
    model, x = nn.Linear(K, O), torch.randn(M, K)
    assert gc.get_freeze_count() > 0  # tests/conftest.py's frozen_heap
    measure_step(model, (x,))
    assert gc.get_freeze_count() > 0 and gc.isenabled()  # still frozen (freed objects leave the count)
    gc.unfreeze()
    measure_step(model, (x,))
    assert gc.get_freeze_count() == 0 and gc.isenabled()
