"""DDP, FSDP2 and distributed checkpoints: 2 gloo ranks on CPU against single-process full-batch training.

One launch (`python tests/test_distributed.py OUTDIR RANK PORT`, one process per rank) runs every scenario and
saves what each rank saw; the tests compare it with single-process training in this process. Each scenario trains
STEPS AdamW steps on a batch of 4 split 2 + 2 across the ranks (no dropout: the ranks' RNG streams differ from a
single process's), with prune-grads, and two of them with every block recomputed in backward.
"""

from __future__ import annotations

import copy
import os
import socket
import subprocess
import sys
import time
import weakref
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
WORLD, BATCH, SEQ, STEPS, RESUME_STEPS, LR = 2, 4, 8, 3, 2, 1e-2
SCENARIOS = {  # name ==> (wrapper, recompute every block)
    "ddp": ("ddp", False), "ddp_recompute": ("ddp", True),
    "fsdp": ("fsdp", False), "fsdp_recompute": ("fsdp", True),
    "fsdp_sharded_source": ("fsdp_source", False),  # fully_shard the source, then peftc.compile it
}


def tiny():
    """The tiny Llama every scenario compiles, and the full batch: same seeds in every process."""
    sys.path.insert(0, str(ROOT))
    from examples.tiny_models import tiny_llama

    model, _ = tiny_llama(hidden=32, layers=2, heads=4, vocab=64, seq=SEQ, batch=2)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 64, (BATCH, SEQ), generator=g)
    labels = torch.randint(0, 64, (BATCH, SEQ), generator=g)
    return model, ids, labels


_BUILT: dict = {}


def build(recompute: bool, source=None):
    """tiny() (or `source`, the same model sharded), compiled: LoRA on three projections, prune-grads, and with
    `recompute` every block checkpointed. Compiled once per process and `recompute`, and copied for each caller
    (the capture is most of a compile's time; the copy, source model included, is what a fresh compile gives)."""
    if source is not None:
        return _compile(recompute, source)
    if recompute not in _BUILT:
        _BUILT[recompute] = _compile(recompute)
    return copy.deepcopy(_BUILT[recompute])


def _compile(recompute: bool, source=None):
    import peftc
    from peftc.passes.schedule_recompute import ScheduleRecompute
    from peftc.pipeline import Pipeline

    model, ids, labels = tiny()
    model = (model if source is None else source).train()  # captured in the mode it trains in: steps reuse it
    spec = peftc.Spec(peftc.LoRA(target="q_proj|v_proj|down_proj", r=4, alpha=8))
    pipeline = Pipeline.for_spec(spec, prune_grads=True, recompute=not recompute)  # the default recompute-cheap
    if recompute:
        pipeline = Pipeline((*pipeline.passes, ScheduleRecompute()))
    torch.manual_seed(2)  # the LoRA A init
    # Static shapes: a fifth of the capture time, and every call here has the example's shapes but the
    # single-process full batch (captured once more). The examples under torchrun keep the dynamic default.
    cm = peftc.compile(model, spec, kwargs={"input_ids": ids[:2], "labels": labels[:2]}, pipeline=pipeline,
                       dynamic=False)
    assert cm.training
    return model, cm, ids, labels


def train(model, params, batches):
    opt = torch.optim.AdamW(params, lr=LR)
    losses, grads = [], None
    for ids, labels in batches:
        loss = model(input_ids=ids, labels=labels).loss
        loss.backward()
        if grads is None:
            grads = [p.grad.detach().clone() for p in params]
        opt.step()
        opt.zero_grad()
        losses.append(loss.detach())
    return opt, losses, grads


# ---- the ranks --------------------------------------------------------------------------------------------------

def _full(t):
    from peftc.distributed import is_dtensor

    return t.full_tensor() if is_dtensor(t) else t


def _scenario(rank: int, name: str, out: Path) -> dict:
    import torch.distributed as dist
    from torch.distributed.algorithms.ddp_comm_hooks import default_hooks
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.nn.parallel import DistributedDataParallel as DDP

    from peftc.distributed import full_adapter_state_dict, save_checkpoint

    wrapper, recompute = SCENARIOS[name]
    if wrapper == "fsdp_source":
        mesh = init_device_mesh("cpu", (WORLD,))
        source, _, _ = tiny()
        source.train()
        full_bytes = sum(p.numel() * p.element_size() for p in source.parameters())
        for layer in source.model.layers:
            fully_shard(layer, mesh=mesh)
        fully_shard(source, mesh=mesh)
        model, cm, ids, labels = build(recompute, source=source)
        mine = slice(rank * BATCH // WORLD, (rank + 1) * BATCH // WORLD)
        params = cm.trainable_parameters()
        _, losses, grads = train(cm, params, [(ids[mine], labels[mine])] * STEPS)
        local = [p.to_local() for p in cm.parameters() if not p.requires_grad]
        return {"base_bytes": (sum(t.numel() * t.element_size() for t in local), full_bytes),
                "adapters": {k: v.clone() for k, v in full_adapter_state_dict(cm).items()},
                "first_grads": [_full(g) for g in grads], "losses": losses}
    model, cm, ids, labels = build(recompute)
    mine = slice(rank * BATCH // WORLD, (rank + 1) * BATCH // WORLD)
    result: dict = {}
    if wrapper == "ddp":
        wrapped = DDP(cm)
        sent: list[int] = []

        def counting_allreduce(state, bucket):
            sent.append(bucket.buffer().numel() * bucket.buffer().element_size())
            return default_hooks.allreduce_hook(state, bucket)

        wrapped.register_comm_hook(None, counting_allreduce)
        params = cm.trainable_parameters()
        _, losses, grads = train(wrapped, params, [(ids[mine], labels[mine])] * STEPS)
        result["bytes_per_step"] = sum(sent) / STEPS
        result["adapter_grad_bytes"] = sum(p.numel() * p.element_size() for p in params)
        result["adapters"] = {k: v.clone() for k, v in cm.adapter_state_dict().items()}
    else:
        mesh = init_device_mesh("cpu", (WORLD,))
        base = weakref.ref(model.model.layers[0].mlp.up_proj.weight)
        full_bytes = sum(p.numel() * p.element_size() for p in cm.parameters() if not p.requires_grad)
        for block in cm.model.layers:
            fully_shard(block, mesh=mesh)
        fully_shard(cm, mesh=mesh)
        params = cm.trainable_parameters()
        opt, losses, grads = train(cm, params, [(ids[mine], labels[mine])] * STEPS)
        import gc

        gc.collect()
        result["base_freed"] = base() is None
        local = [p.to_local() for p in cm.parameters() if not p.requires_grad]
        result["base_bytes"] = (sum(t.numel() * t.element_size() for t in local), full_bytes)
        grads = [_full(g) for g in grads]
        result["adapters"] = {k: v.clone() for k, v in full_adapter_state_dict(cm).items()}
        if name == "fsdp":  # checkpoint, then train on: a single process must resume with the same losses
            save_checkpoint(cm, out / "ckpt", opt)
            adapters = full_adapter_state_dict(cm)
            if rank == 0:
                torch.save(adapters, out / "adapters.pt")
            # PEFT's format from the sharded model: every rank gathers, rank 0 writes
            cm.save_pretrained(out / "peft", is_main_process=rank == 0)
            resumed = []
            for _ in range(RESUME_STEPS):
                loss = cm(input_ids=ids[mine], labels=labels[mine]).loss
                loss.backward()
                opt.step()
                opt.zero_grad()
                total = loss.detach().clone()
                dist.all_reduce(total)
                resumed.append(total / WORLD)
            result["resumed_losses"] = resumed
    result["first_grads"] = grads
    result["losses"] = losses
    return result


def _rank(rank: int, port: int, out: str) -> None:
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        results = {name: _scenario(rank, name, Path(out)) for name in SCENARIOS}
        torch.save(results, Path(out) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


if __name__ == "__main__":
    _rank(int(sys.argv[2]), int(sys.argv[3]), sys.argv[1])


# ---- the tests ----------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    """One process per rank, started here (no launcher process importing torch as well); one failed rank stops the
    other, which would wait for it in a collective."""
    out = tmp_path_factory.mktemp("distributed")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    port, logs = _free_port(), [out / f"rank{r}.log" for r in range(WORLD)]
    procs = []
    for r, log in enumerate(logs):
        with log.open("w") as stderr:
            procs.append(subprocess.Popen([sys.executable, __file__, str(out), str(r), str(port)], env=env,
                                          stdout=subprocess.DEVNULL, stderr=stderr))
    deadline = time.monotonic() + 600
    while any(p.poll() is None for p in procs):
        if any(p.returncode for p in procs) or time.monotonic() > deadline:
            for p in procs:
                p.kill()
        time.sleep(0.1)
    for p, log in zip(procs, logs):
        assert p.wait() == 0, log.read_text()[-4000:]
    return out, [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]


@pytest.fixture(scope="module")
def single():
    """Single-process full-batch training per scenario: (compiled model, optimizer, losses, first grads)."""
    out = {}
    for recompute in (False, True):
        model, cm, ids, labels = build(recompute)
        params = cm.trainable_parameters()
        opt, losses, grads = train(cm, params, [(ids, labels)] * STEPS)
        out[recompute] = (cm, opt, losses, grads, ids, labels)
    return out


def _close(a, b, tol=1e-5):
    torch.testing.assert_close(a, b, rtol=0, atol=tol)


@pytest.mark.parametrize("name", list(SCENARIOS))
def test_adapters_match_single_process_full_batch(ranks, single, name):
    _, results = ranks
    cm, _, losses, grads, _, _ = single[SCENARIOS[name][1]]
    for r in range(WORLD):
        got = results[r][name]
        assert got["adapters"].keys() == cm.adapter_state_dict().keys()
        for key, value in cm.adapter_state_dict().items():
            _close(got["adapters"][key], value)
        for g, ref in zip(got["first_grads"], grads):  # DDP: averaged; FSDP: reduce-scattered, gathered here
            _close(g, ref)
    moved = [k for k, v in cm.adapter_state_dict().items() if "lora_B" in k and v.abs().max() > 0]
    assert moved, "the adapters did not train"  # so matching them is not matching zeros
    # the full batch's loss is the mean of the ranks' losses (equal token counts)
    for step in range(STEPS):
        _close(sum(results[r][name]["losses"][step] for r in range(WORLD)) / WORLD, losses[step])


@pytest.mark.parametrize("name", ["ddp", "ddp_recompute"])
def test_ddp_communicates_only_adapter_gradients(ranks, name):
    _, results = ranks
    got = results[0][name]
    assert got["bytes_per_step"] == got["adapter_grad_bytes"] > 0


@pytest.mark.parametrize("name", ["fsdp", "fsdp_recompute", "fsdp_sharded_source"])
def test_fsdp_each_rank_holds_half_the_base_weights(ranks, name):
    """Of the compiled model's base weights. (Compiled already sharded, the source model keeps its own shards.)"""
    _, results = ranks
    for r in range(WORLD):
        local, full = results[r][name]["base_bytes"]
        assert abs(local / full - 1 / WORLD) < 0.02, (local, full)
        if name != "fsdp_sharded_source":
            assert results[r][name]["base_freed"], "a full copy of a sharded base weight is still alive"


def test_checkpoint_reloads_in_one_process_and_resumes(ranks):
    from peftc.distributed import load_checkpoint

    out, results = ranks
    model, cm, ids, labels = build(False)
    opt = torch.optim.AdamW(cm.trainable_parameters(), lr=LR)
    load_checkpoint(cm, out / "ckpt", opt)
    # rank 0's plain adapter file, in a fresh compiled model: the same outputs
    _, other, _, _ = build(False)
    other.load_adapter_state_dict(torch.load(out / "adapters.pt"))
    # what save_pretrained wrote from the sharded ranks, in a fresh compiled model: the same adapters
    _, from_peft, _, _ = build(False)
    from_peft.load_adapter(out / "peft")
    for key, value in from_peft.adapter_state_dict().items():
        assert torch.equal(value, results[0]["fsdp"]["adapters"][key]), key
    assert sorted(p.name for p in (out / "peft").iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    cm.eval(), other.eval()
    with torch.no_grad():
        assert torch.equal(cm(input_ids=ids).logits, other(input_ids=ids).logits)
    cm.train()
    for step in range(RESUME_STEPS):
        loss = cm(input_ids=ids, labels=labels).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        _close(loss.detach(), results[0]["fsdp"]["resumed_losses"][step])


@pytest.fixture
def one_rank(tmp_path):
    """A gloo process group of one rank, in this process: enough for what peftc checks before any collective."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    dist.init_process_group("gloo", store=dist.FileStore(str(tmp_path / "store"), 1), rank=0, world_size=1)
    try:
        yield init_device_mesh("cpu", (1,))
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("case,names", [
    ("non_block", ["`model.layers.0.mlp`", "fully_shard(block)", "fully_shard(cm)"]),
    ("no_root", ["without the root", "fully_shard(cm)"]),
    ("new_signature", ["new after the model was sharded", "cm.eval(); cm(**inputs)"]),
    ("merge_sharded", ["cm.merge() needs whole weights", "full_adapter_state_dict"]),
])
def test_what_cannot_work_raises_at_the_first_step(one_rank, case, names):
    from peftc.distributed import ShardingError
    from torch.distributed.fsdp import fully_shard

    model, cm, ids, labels = build(False)
    with pytest.raises(ShardingError) as e:
        if case == "non_block":
            fully_shard(cm.model.layers[0].mlp, mesh=one_rank)
            fully_shard(cm, mesh=one_rank)
        elif case == "no_root":
            for block in cm.model.layers:
                fully_shard(block, mesh=one_rank)
        elif case == "new_signature":
            for block in cm.model.layers:
                fully_shard(block, mesh=one_rank)
            fully_shard(cm, mesh=one_rank)
            cm(input_ids=ids[:2], labels=labels[:2]).loss.backward()  # the first step captures: fine
            cm(input_ids=ids[:2])  # after it, the weights are shards: a new keyword set cannot be captured
        elif case == "merge_sharded":
            for block in cm.model.layers:
                fully_shard(block, mesh=one_rank)
            fully_shard(cm, mesh=one_rank)
            cm(input_ids=ids[:2], labels=labels[:2]).loss.backward()
            cm.merge()
        cm(input_ids=ids[:2], labels=labels[:2])
    for name in names:
        assert name in str(e.value), str(e.value)


def test_compiling_a_sharded_model_shards_the_compiled_model_the_same_way(one_rank):
    """fully_shard on the source (blocks, then root), then peftc.compile: the compiled model is sharded at the same
    paths and trains what the unsharded compile trains."""
    from torch.distributed.fsdp import FSDPModule, fully_shard

    _, reference, ids, labels = build(False)
    source, _, _ = tiny()
    source.train()  # compiled in the mode it trains in: once sharded, no new signature can be captured
    for layer in source.model.layers:
        fully_shard(layer, mesh=one_rank)
    fully_shard(source, mesh=one_rank)
    _, cm, _, _ = build(False, source=source)
    assert isinstance(cm, FSDPModule) and all(isinstance(b, FSDPModule) for b in cm.model.layers)
    assert type(cm).source_class is type(reference._source)  # LlamaForCausalLM, not FSDP's class for it
    batch = [(ids[:2], labels[:2])] * 2  # the example's shapes: once sharded, no new signature can be captured
    got = train(cm, cm.trainable_parameters(), batch)
    want = train(reference, reference.trainable_parameters(), batch)
    for a, b in zip(got[1], want[1]):
        _close(a, b)
    for g, ref in zip(got[2], want[2]):
        _close(_full(g), ref)
    for key, value in reference.adapter_state_dict().items():
        _close(_full(cm.adapter_state_dict()[key]), value)


def test_save_pretrained_of_a_sharded_model_gathers_base_weights_too(one_rank, tmp_path):
    """A trained copy (modules_to_save) is written as base + delta: both sharded, both gathered whole."""
    import peftc
    from safetensors.torch import load_file
    from torch.distributed.fsdp import fully_shard

    model, ids, labels = tiny()
    cm = peftc.compile(model, peftc.Spec(peftc.LoRA(target="q_proj", r=2), peftc.ModulesToSave(target="lm_head")),
                       kwargs={"input_ids": ids[:2], "labels": labels[:2]}, dynamic=False)
    with torch.no_grad():
        for t in cm.adapter_state_dict().values():
            t.add_(0.25)  # a non-zero delta, so base + delta differs from the base
    assert cm.save_pretrained(tmp_path / "whole") == "peft"
    for block in cm.model.layers:
        fully_shard(block, mesh=one_rank)
    fully_shard(cm, mesh=one_rank)
    cm(input_ids=ids[:2], labels=labels[:2]).loss.backward()
    assert cm.save_pretrained(tmp_path / "sharded") == "peft"
    whole, sharded = (load_file(tmp_path / d / "adapter_model.safetensors") for d in ("whole", "sharded"))
    assert whole.keys() == sharded.keys() and "base_model.model.lm_head.weight" in whole
    for key in whole:
        assert torch.equal(whole[key], sharded[key]), key


# ---- single process: what the distributed cases rely on --------------------------------------------------------

@pytest.mark.parametrize("recompute", [False, True])
def test_each_block_runs_as_a_call_of_its_module(recompute):
    from peftc.lower.modules import Block

    model, cm, ids, labels = build(recompute)
    ids, labels = ids[:2], labels[:2]  # the example's shapes: the compiled graph, no second capture
    assert isinstance(cm.model.layers, torch.nn.ModuleList)
    calls = []
    for i, block in enumerate(cm.model.layers):
        assert isinstance(block, Block)
        block.register_forward_pre_hook(lambda m, args, i=i: calls.append(i))
    loss = cm(input_ids=ids, labels=labels).loss
    cm.eval()
    with torch.no_grad():
        logits = cm(input_ids=ids).logits  # another signature, the same block modules
    assert calls == [0, 1, 0, 1]
    # the block calls compute what the captured graph does
    cm.train()
    graph = cm.graph_for(input_ids=ids, labels=labels)
    torch.testing.assert_close(graph(input_ids=ids, labels=labels, use_cache=False).loss, loss, rtol=0, atol=0)
    torch.testing.assert_close(logits, model.eval()(input_ids=ids).logits)  # B = 0: the base model's outputs


def test_graphs_read_tensors_registered_later():
    """load_state_dict(assign=True) replaces the registered tensors: the graphs read the new ones."""
    model, cm, ids, labels = build(False)
    new = {k: torch.nn.Parameter(v.detach() + 0.01, requires_grad=v.requires_grad)
           for k, v in cm.state_dict(keep_vars=True).items() if "lora_B" in k}
    before = cm(input_ids=ids, labels=labels).loss
    cm.load_state_dict(new, strict=False, assign=True)
    after = cm(input_ids=ids, labels=labels).loss
    assert not torch.equal(before, after)
    after.backward()
    assert all(p.grad is not None for p in new.values())
    assert cm.trainable_parameters()[1] is new["model.layers.0.self_attn.q_proj.lora_B.weight"]


# ---- the launchers -------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("script", ["ddp_train.py", "fsdp_train.py"])
def test_example_runs_under_torchrun(tmp_path, script):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "CUDA_VISIBLE_DEVICES": ""}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={WORLD}",
           str(ROOT / "examples" / script), "--steps", "2", "--layers", "1", "--out", str(tmp_path)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "step 1: loss" in proc.stdout
    adapters = torch.load(tmp_path / "adapters.pt")
    assert adapters and all("lora_" in k for k in adapters)
    assert any(v.abs().max() > 0 for k, v in adapters.items() if "lora_B" in k)  # trained
    assert (tmp_path / "checkpoint" / ".metadata").exists()


def test_merge_reads_tensors_registered_later():
    model, cm, ids, labels = build(False)
    new = {k: torch.nn.Parameter(torch.randn_like(v) * 0.1) for k, v in cm.adapter_state_dict().items()
           if "lora_B" in k}
    cm.load_state_dict(new, strict=False, assign=True)
    cm.eval()
    with torch.no_grad():
        torch.testing.assert_close(cm.merge()(input_ids=ids).logits, cm(input_ids=ids).logits)
