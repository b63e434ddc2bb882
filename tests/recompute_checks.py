"""What the recompute tests share: inputs with labels, one step's loss and gradients, and gradient equality."""

import torch

from tests.conftest import ids


def inputs(batch=2, seq=16, seed=0):
    x = ids(batch, seq, seed=seed)
    return {"input_ids": x, "labels": x}


def grads(cm, inputs, seed):
    """One forward+backward with the RNG at `seed` (dropout masks): (loss, {trainable name: gradient})."""
    for p in cm.trainable_parameters():
        p.grad = None
    torch.manual_seed(seed)
    loss = cm(**inputs).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in cm.named_parameters() if p.requires_grad}


def assert_same_grads(grads0, grads1, count):
    """The same `count` gradients, each non-zero, within 1e-6 relative."""
    assert grads0.keys() == grads1.keys() and len(grads0) == count
    for name, g in grads0.items():
        assert g.abs().sum() > 0, name
        assert torch.allclose(grads1[name], g, rtol=1e-6, atol=1e-6 * g.abs().max().item()), name
