"""Kept raw exports (CompiledModel._exports): merge() and each new adapter configuration rewrite the export the model
already made instead of running torch.export again; other sizes, sizes its guards refuse or another dtype export
anew."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import peftc
from peftc.capture import admits, capture, export, input_guards
from peftc.params import ParamTable



class Parity(nn.Module):
    """Two projections and a branch on the batch size's parity: export guards `batch % 2 == 0`, which no size range
    says, so an odd batch fits a kept export's ranges and fails its guard when the graph runs."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(6, 8)
        self.b = nn.Linear(8, 6)

    def forward(self, x):
        h = self.b(torch.tanh(self.a(x)))
        return h * 2 if h.shape[0] % 2 == 0 else h + 1


class Embed(nn.Module):
    """Integer inputs: a dtype cast of the model leaves the call's key as it was."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(16, 6)
        self.proj = nn.Linear(6, 5)

    def forward(self, ids):
        return self.proj(torch.tanh(self.emb(ids)))


@pytest.fixture
def exports(monkeypatch):
    """Every torch.export.export call from now on, by the sizes of its first tensor input."""
    calls: list = []
    real = torch.export.export

    def counting(model, args=(), kwargs=None, **options):
        first = next((t for t in (*args, *(kwargs or {}).values()) if isinstance(t, torch.Tensor)), None)
        calls.append(None if first is None else tuple(first.shape))
        return real(model, args, kwargs, **options)

    monkeypatch.setattr(torch.export, "export", counting)
    return calls


def randomized(cm, seed=1):
    """cm with every adapter tensor moved off its initial value, so a merge or a wrong graph shows in the outputs."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in cm.params:
            if p.role == "adapter":
                p.tensor.add_(torch.randn(p.tensor.shape, generator=gen, dtype=p.tensor.dtype) * 0.3)
    return cm


def compiled(model_class=Parity, batch=4, **options):
    torch.manual_seed(0)
    model = model_class()
    x = torch.randint(0, 16, (batch, 3), generator=torch.Generator().manual_seed(0)) if model_class is Embed \
        else torch.randn(batch, 6)
    return model, randomized(peftc.compile(model, peftc.LoRA(target=["a", "b"] if model_class is Parity else "proj",
                                                             r=2), (x,), **options)), x


def test_admits_reads_an_exports_sizes_and_input_guards_its_guards():
    torch.manual_seed(0)
    model, x = Parity(), torch.randn(4, 6)
    static, dynamic = export(model, (x,), {}, dynamic=False), export(model, (x,), {})
    assert admits(static, (x,), {}) and not admits(static, (torch.randn(6, 6),), {})
    assert admits(dynamic, (torch.randn(6, 6),), {}) and admits(dynamic, (torch.randn(5, 6),), {})
    assert not admits(dynamic, (torch.randn(4, 7),), {})  # the feature size is static: nn.Linear(6, 8) reads it
    assert not admits(dynamic, (x, x), {})  # another structure
    guards = input_guards(capture(model, (x,), {}, ParamTable(), exported=dynamic))
    assert guards((torch.randn(6, 6),), {}) and not guards((torch.randn(5, 6),), {})  # the parity guard


def test_merge_rewrites_the_kept_export(exports):
    model, cm, x = compiled()
    assert exports == [(4, 6)] and len(cm._exports) == 1
    (kept,) = cm._exports._by_key.values()
    ep = kept[0][0]
    before = ep.graph_module.code
    with torch.no_grad():
        want = cm(x)
        merged = cm.merge()
        got = merged(x)
    assert exports == [(4, 6)]  # merge exported nothing
    assert merged._exports is cm._exports
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert not any(n.target.endswith("lora_A.weight") for n in merged.graph_module.graph.nodes if n.op == "get_attr")
    assert ep.graph_module.code == before  # the kept export is rewritten on a copy, never in place


def test_a_new_adapter_configuration_rewrites_the_kept_export(exports, tmp_path):
    model, cm, x = compiled()
    with torch.no_grad():
        with cm.disable_adapters():
            torch.testing.assert_close(cm(x), model(x))  # the base model: every adapter off
    assert exports == [(4, 6)]
    # An adapter of another rank: served by graphs compiled for its own configuration.
    other = randomized(peftc.compile(copy.deepcopy(model), peftc.LoRA(target=["a", "b"], r=3), (x,)), seed=2)
    other.save_pretrained(tmp_path / "other")
    del exports[:]
    cm.load_adapter(tmp_path / "other", name="other")
    cm.set_adapter("other")
    with torch.no_grad():
        got = cm(x)
    assert exports == []
    with torch.no_grad():
        torch.testing.assert_close(got, other(x), atol=1e-5, rtol=1e-5)


def test_a_static_export_is_reused_at_its_sizes_only(exports):
    model, cm, x = compiled(dynamic=False)
    x3 = torch.randn(3, 6)
    with torch.no_grad():
        with cm.disable_adapters():
            gm = cm.graph_for(x3)  # a new configuration at other sizes: the static kept export cannot take them
            assert exports == [(4, 6), (3, 6)]
            (placeholder,) = (n for n in gm.graph.nodes if n.op == "placeholder")
            assert tuple(placeholder.meta["val"].shape) == (3, 6)
            torch.testing.assert_close(cm(x3), model(x3))
        want = cm(x)
        merged = cm.merge()  # at the example's sizes: the first kept export, not the newer one for (3, 6)
        assert exports == [(4, 6), (3, 6)]
        torch.testing.assert_close(merged(x), want, atol=1e-5, rtol=1e-5)


def shapes(gm):
    return [tuple(n.meta["val"].shape) for n in gm.graph.nodes if n.op == "placeholder"]


def test_a_dynamic_export_is_reused_within_its_ranges_only(exports):
    model, cm, ids = compiled(Embed, batch=1)  # a size-1 batch specializes: only the sequence stays dynamic
    longer, wider = torch.randint(0, 16, (1, 7)), torch.randint(0, 16, (3, 3))
    with torch.no_grad(), cm.disable_adapters():
        (shape,) = shapes(cm.graph_for(longer))  # a new configuration, a sequence length within the kept ranges
        assert exports == [(1, 3)] and shape[0] == 1 and not isinstance(shape[1], int)
        torch.testing.assert_close(cm(longer), model(longer))
    model, cm, ids = compiled(Embed, batch=1)
    with torch.no_grad(), cm.disable_adapters():
        (shape,) = shapes(cm.graph_for(wider))  # a batch of 3: outside the kept export's batch of 1
        assert exports == [(1, 3), (1, 3), (3, 3)] and not isinstance(shape[0], int)
        torch.testing.assert_close(cm(wider), model(wider))


def test_a_guard_failure_exports_anew_and_computes_the_right_outputs(exports):
    model, cm, x = compiled()
    (kept,) = cm._exports._by_key.values()
    x5 = torch.randn(5, 6)
    assert admits(kept[0][0], (x5,), {})  # the kept export's ranges take batch 5; only its parity guard refuses it
    with torch.no_grad():
        with cm.disable_adapters():
            torch.testing.assert_close(cm(x5), model(x5))  # the odd-batch branch, h + 1
        assert exports == [(4, 6), (5, 6)]
        want = cm(x)
        # The newest kept export (batch 5) fits the example's batch of 4 by its ranges, not by its guards: the merge
        # rewrites the older one, made at batch 4.
        merged = cm.merge()
        torch.testing.assert_close(merged(x), want, atol=1e-5, rtol=1e-5)
    assert exports == [(4, 6), (5, 6)]


def test_a_dtype_cast_does_not_reuse_a_float32_export(exports):
    model, cm, ids = compiled(Embed)
    with torch.no_grad():
        cm.to(torch.float64)
        want = cm(ids)
        assert exports == [(4, 3)]  # same call key (integer inputs): the float32 graph still serves the call
        merged = cm.merge()  # a new graph: from a float64 export, not the kept float32 one
        got = merged(ids)
    assert exports == [(4, 3), (4, 3)]
    assert got.dtype == torch.float64
    torch.testing.assert_close(got, want)


def test_a_deep_copy_starts_with_no_kept_exports(exports):
    model, cm, x = compiled()
    twin = copy.deepcopy(cm)
    assert len(cm._exports) == 1 and len(twin._exports) == 0
    with torch.no_grad():
        merged = twin.merge()  # the copy reads its own source model: it exports it
        assert exports == [(4, 6), (4, 6)]
        torch.testing.assert_close(merged(x), cm(x), atol=1e-5, rtol=1e-5)


def test_sharding_drops_the_kept_exports(tmp_path):
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    dist.init_process_group("gloo", store=dist.FileStore(str(tmp_path / "store"), 1), rank=0, world_size=1)
    try:
        model, cm, x = compiled()
        with torch.no_grad():
            want = cm(x)
        assert len(cm._exports) == 1
        fully_shard(cm, mesh=init_device_mesh("cpu", (1,)))
        with torch.no_grad():
            got = cm(x)  # the first sharded call points the table at the shards
        assert len(cm._exports) == 0
        torch.testing.assert_close(got, want)
    finally:
        dist.destroy_process_group()
