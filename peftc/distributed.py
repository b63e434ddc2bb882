"""peftc under torch.distributed: DDP, FSDP2 (`fully_shard` per block and at the root), distributed checkpoints.

A CompiledModel runs its graphs through its own modules (peftc/lower/modules.py): every tensor is read from the
module tree when the graph runs, and each repeated block runs as a call of the CompiledModel's module at that path.
So `DistributedDataParallel(cm)` and

    for block in cm.model.layers:
        fully_shard(block)
    fully_shard(cm)

work as they do on the source model; so does `peftc.compile` on a model already sharded that way (compile_sharded
moves the sharding onto the compiled model). What cannot work raises a ShardingError at the first step
(check_sharding): sharding a module that is neither the root nor a repeated block, sharding blocks without the
root, and capturing a new call signature once the model is sharded.
"""

from __future__ import annotations

import weakref
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .errors import PeftcError
from .params import get_attr_path, set_attr_path

WORKS = ("compile first, then shard the compiled model: `for block in <repeated blocks, e.g. cm.model.layers>: "
         "fully_shard(block)`, then `fully_shard(cm)`")


class ShardingError(PeftcError):
    """A combination of peftc and FSDP2 that would not train correctly."""


def _initialized() -> bool:
    # Sharding needs a process group: without one, peftc never imports FSDP or DTensor.
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def _fsdp_module_type():
    if not _initialized():
        return None
    from torch.distributed.fsdp import FSDPModule

    return FSDPModule


def sharded_modules(root: nn.Module) -> list[str]:
    """Paths of the modules under `root` that `fully_shard` was applied to ('' is root itself)."""
    fsdp = _fsdp_module_type()
    return [] if fsdp is None else [name for name, m in root.named_modules() if isinstance(m, fsdp)]


def is_dtensor(t: Any) -> bool:
    if not _initialized():
        return False
    from torch.distributed.tensor import DTensor

    return isinstance(t, DTensor)


_UNSHARDED: "weakref.WeakSet[nn.Module]" = weakref.WeakSet()  # sharded sources that compile_sharded gathered


def check_source(model: nn.Module) -> None:
    """Compiling an FSDP-sharded model directly cannot work: torch.export cannot read DTensor shards (nor run FSDP's
    hooks on fake tensors), and the compiled model registers its own modules, which the source's sharding would
    miss. compile_sharded gathers the source first."""
    sharded = sharded_modules(model)
    if sharded and model not in _UNSHARDED:
        where = "the model itself" if sharded[0] == "" else f"`{sharded[0]}`"
        raise ShardingError(f"peftc.compile got a model already sharded with fully_shard ({where}"
                            f"{f' and {len(sharded) - 1} more modules' if len(sharded) > 1 else ''}); {WORKS}")


def compile_sharded(model: nn.Module, build):
    """`build()` (a CompiledModel of `model`); for a model already sharded with fully_shard, the compiled model is
    sharded the same way instead:

        with the source's parameters all-gathered (FSDPModule.unshard) and its hooks idle, capture and compile;
        the compiled model takes copies of the whole tensors; the source's shards go back (reshard);
        fully_shard the compiled model's modules at the source's paths, blocks first, with the same mesh,
        reshard_after_forward, MixedPrecisionPolicy and OffloadPolicy.

    Every rank must call it (the gather is a collective). The source keeps its own shards: until it is freed, each
    rank holds its 1/N of the base weights twice.
    """
    settings = _shard_settings(model)
    if not settings:
        return build()
    from torch.distributed.fsdp import fully_shard

    with _unsharded(model):
        cm = build()
        _own_whole_tensors(cm, model)
    for path, options in sorted(settings, key=lambda s: (s[0] == "", -s[0].count("."))):
        fully_shard(cm.get_submodule(path), **options)
    adopt_registered(cm)  # the table reads the shards: a new signature raises (check_capture), never reads shards
    return cm


def _shard_settings(model: nn.Module) -> list[tuple[str, dict[str, Any]]]:
    """(path, fully_shard options) of every module of `model` that fully_shard was applied to (FSDP2's state, private
    in torch 2.13)."""
    out = []
    for path in sharded_modules(model):
        state = model.get_submodule(path)._get_fsdp_state()
        group = state._fsdp_param_group
        if group is None:
            raise ShardingError(f"peftc.compile got a model with fully_shard on `{path or 'the model itself'}`, which "
                                f"holds no parameters of its own; {WORKS}")
        reshard = None if state._auto_reshard_after_forward else group.post_forward_mesh_info is not None
        out.append((path, {"mesh": group.mesh_info.mesh, "reshard_after_forward": reshard,
                           "mp_policy": group.mp_policy, "offload_policy": group.offload_policy}))
    return out


class _unsharded:
    """Within: `model`'s parameters whole (FSDPModule.unshard, a collective) and its FSDP hooks idle (each state
    as in recomputation before backward: no gather, no reshard, only the dtype casts of its policy)."""

    def __init__(self, model: nn.Module):
        self.model = model
        self.modules = [model.get_submodule(p) for p in sharded_modules(model)]

    def __enter__(self):
        from torch.distributed.fsdp._fully_shard._fsdp_common import TrainingState

        for m in self.modules:
            m.unshard()
        self.states = [m._get_fsdp_state() for m in self.modules]
        self.before = [s._training_state for s in self.states]
        for s in self.states:
            s._training_state = TrainingState.PRE_BACKWARD
        _UNSHARDED.add(self.model)
        return self

    def __exit__(self, *exc):
        _UNSHARDED.discard(self.model)
        for s, state in zip(self.states, self.before):
            s._training_state = state
        for m in self.modules:
            m.reshard()
        return False


def _own_whole_tensors(cm, model: nn.Module) -> None:
    """Replace each tensor the compiled model took from the unsharded source by a copy: reshard frees them."""
    gathered = {id(p) for p in model.parameters()}
    for p in cm.params:
        old = p.tensor
        if id(old) not in gathered:
            continue
        new = old.detach().clone()
        if isinstance(old, nn.Parameter):
            new = nn.Parameter(new, requires_grad=old.requires_grad)
        p.tensor = new
        _rebind(cm, p.name, old, new)
        for graphs in (*cm._graphs.values(), *cm._method_graphs.values()):
            for gm in graphs:
                _rebind(gm, p.name, old, new)


_CHECKED: "weakref.WeakKeyDictionary[nn.Module, tuple]" = weakref.WeakKeyDictionary()


def check_sharding(cm: nn.Module, run: nn.Module) -> None:
    """Before `run` (a runnable of `cm`) runs: every sharded module's hooks must run around the computation that
    reads its parameters, and the root must be sharded too, or tensors outside the blocks would stay unsynced."""
    sharded = sharded_modules(cm)
    if not sharded:
        return
    key = (id(cm), tuple(sharded))
    if _CHECKED.get(run) == key:
        return
    called = {"", *run.peftc_blocks}
    outside = [name for name in sharded if name not in called]
    if outside:
        blocks = ", ".join(run.peftc_blocks[:2]) + (", ..." if len(run.peftc_blocks) > 2 else "")
        raise ShardingError(
            f"fully_shard on `{outside[0]}` of the compiled model cannot work: peftc runs only the root and the "
            f"repeated blocks ({blocks or 'none in this model'}) as module calls, so the hooks of `{outside[0]}` "
            f"would never gather its parameters; {WORKS}")
    if "" not in sharded:
        raise ShardingError(
            f"fully_shard on blocks ({sharded[0]}, ...) without the root: the tensors outside the blocks (embeddings, "
            f"head, their adapters) would not be synchronized across ranks; call fully_shard(cm) after the blocks")
    adopt_registered(cm)
    _CHECKED[run] = key


def adopt_registered(cm) -> None:
    """Point the parameter table, the IR graphs and the source model at the sharded DTensors FSDP2 registered.

    Nothing else then keeps the full tensors alive, so each rank holds only its shards (and the graphs captured
    so far stay the only ones: check_capture).
    """
    from .lower.modules import live_tensor

    shards = _sharded_params(cm)
    if shards:
        # Kept raw exports (CompiledModel._exports) read the whole tensors: once sharded, nothing may keep them alive,
        # and no new signature is captured anyway (check_capture).
        cm._exports.clear()
    for p in cm.params:
        parent, _, leaf = p.name.rpartition(".")
        try:
            owner = cm.get_submodule(parent)
        except AttributeError:
            continue
        live = shards.get((id(owner), leaf), live_tensor(cm, p))
        old = p.tensor
        if live is old:
            continue
        p.tensor = live
        for alias in cm._info.aliases.get(p.name, (p.name,)):
            _rebind(cm._source, alias, old, live)
        for graphs in (*cm._graphs.values(), *cm._method_graphs.values()):
            for gm in graphs:
                _rebind(gm, p.name, old, live)


def _sharded_params(cm) -> dict[tuple[int, str], torch.Tensor]:
    """(id of the owning module, parameter name) ==> FSDP2's sharded DTensor parameter. Inside the root's forward
    the root's own parameters are registered unsharded, so ask FSDP2's state (private in torch 2.13)."""
    out = {}
    for name in sharded_modules(cm):
        group = cm.get_submodule(name)._get_fsdp_state()._fsdp_param_group
        for fsdp_param in group.fsdp_params if group is not None else ():
            info = fsdp_param._module_info
            out[(id(info.module), info.param_name)] = fsdp_param.sharded_param
    return out


def _rebind(root: nn.Module, name: str, old: torch.Tensor, new: torch.Tensor) -> None:
    """root.<name> = new where it holds old (a merged model's table is not its source's)."""
    try:
        held = get_attr_path(root, name)
    except AttributeError:
        return
    if held is old:
        set_attr_path(root, name, new)


def check_capture(cm) -> None:
    """A new call signature after the first sharded step (adopt_registered): the source's weights are shards."""
    if any(is_dtensor(p.tensor) for p in cm.params):
        raise ShardingError(
            "this call signature (keyword set, or train/eval) is new after the model was sharded: its weights are "
            "shards now, and torch.export needs them whole; call the model once with each signature it will be "
            "called with before fully_shard (e.g. `cm.eval(); cm(**inputs); cm.train()`), or, compiling an "
            "already-sharded model, compile it in the train/eval mode and with the keywords it will be called with")


def whole_weights(cm, what: str) -> None:
    """Before reading the parameter table as weights (merge, ONNX export): point it at the registered tensors
    (load_state_dict(assign=True) may have replaced them), and refuse shards."""
    adopt_registered(cm)
    if any(is_dtensor(p.tensor) for p in cm.params):
        raise ShardingError(f"{what} needs whole weights, and this model is sharded with fully_shard; save the "
                            f"adapters (full_adapter_state_dict on every rank, then rank 0 writes them) and load them "
                            f"into a model compiled in a single process")


# ---- adapter state -----------------------------------------------------------------------------------------

def whole_tensor(t: torch.Tensor) -> torch.Tensor:
    """`t`, gathered whole when it is a sharded DTensor (then a collective: every rank must call it)."""
    return t.full_tensor() if is_dtensor(t) else t


def full_adapter_state_dict(cm) -> dict[str, torch.Tensor]:
    """`cm.adapter_state_dict()` with sharded tensors gathered whole; a collective: every rank must call it."""
    return {k: whole_tensor(v) for k, v in cm.adapter_state_dict().items()}


def copy_full_into(target: torch.Tensor, value: torch.Tensor) -> None:
    """target[...] = value, for a target that may be a sharded DTensor (then a collective: every rank calls it with
    the same full value; rank 0's is the one kept)."""
    with torch.no_grad():
        if is_dtensor(target):
            from torch.distributed.tensor import distribute_tensor

            value = distribute_tensor(value.to(device=target.device, dtype=target.dtype), target.device_mesh,
                                      target.placements)
        target.copy_(value)


# ---- distributed checkpoints ---------------------------------------------------------------------------------

def _state(cm: nn.Module, optimizer):
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    # Only trainable tensors; strict=False lets set_state_dict skip the frozen ones, while dcp.load still fails
    # on any trainable tensor the checkpoint lacks.
    options = StateDictOptions(ignore_frozen_params=True, strict=False)
    if optimizer is None:
        from torch.distributed.checkpoint.state_dict import get_model_state_dict

        return {"model": get_model_state_dict(cm, options=options)}, options
    model_sd, optim_sd = get_state_dict(cm, optimizer, options=options)
    return {"model": model_sd, "optim": optim_sd}, options


def save_checkpoint(cm: nn.Module, path: str | Path, optimizer: torch.optim.Optimizer | None = None) -> None:
    """Save the trainable tensors (and the optimizer's state) with torch.distributed.checkpoint: each rank writes
    its own shards; the frozen base weights are not written. `cm` may be a CompiledModel, DDP(cm) or a sharded cm.
    Call it on every rank (or in a single process)."""
    import torch.distributed.checkpoint as dcp

    state, _ = _state(cm, optimizer)
    dcp.save(state, checkpoint_id=str(path))


def load_checkpoint(cm: nn.Module, path: str | Path, optimizer: torch.optim.Optimizer | None = None) -> None:
    """Load what save_checkpoint wrote, into any world size or sharding (a single process reads all shards)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import set_state_dict

    state, options = _state(cm, optimizer)
    dcp.load(state, checkpoint_id=str(path))
    if optimizer is None:
        from torch.distributed.checkpoint.state_dict import set_model_state_dict

        set_model_state_dict(cm, state["model"], options=options)
    else:
        set_state_dict(cm, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"],
                       options=options)
