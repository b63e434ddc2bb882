"""Additive deltas on parameters: what SparseDelta, BitFit and NormTuning share.

Each rewrites a read of a frozen parameter, `W = get_attr(...)`, into `W + delta` before W's first use:
- dense (BitFit, NormTuning):  `W_eff = W + delta`, delta shaped like W;
- sparse:      `W_eff = view(index_add(view(W, -1), 0, idx, delta), W.shape)`, delta and idx of length k;
- structured:  `W_eff = index_add(W, dim, idx, delta)`, whole rows (dim 0) or columns (dim 1).
`index_add`'s backward hands `delta` exactly `grad_W_eff[idx]`: its gradient and optimizer state have the size of
the selection. (A `W + index_put(zeros_like(W), idx, delta)` form would allocate a second W-sized tensor in forward
for the same result; see docs/methods.md for the measurement.)

Adapter tensors are named after the parameter's owner module and leaf: `<module>.sparse_delta.<leaf>` (values,
trainable) with `<module>.sparse_delta.<leaf>_index` (int64, frozen); `<module>.bitfit.<leaf>`;
`<module>.norm_tuning.<leaf>`. The rewritten `W_eff` node carries `node.meta["peftc.delta"]`, which names the
parameter, its values, its index and the dim, so a merge pass can fold `W_eff` back into W.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Mapping

import torch
from torch import nn
from torch.fx import GraphModule, Node

from .capture import ModelInfo
from .errors import PeftcError, SpecError
from .match import _matches, matmul_sites, select
from .params import BASE, ParamTable
from .rewrite import NodeBuilder, replace_uses
from .spec import SparseDelta, Target

aten = torch.ops.aten

DELTA_METHODS = ("sparse_delta", "bitfit", "norm_tuning", "modules_to_save")


def owner(name: str) -> tuple[str, str]:
    """`a.b.weight` ==> (`a.b`, `weight`)."""
    module, _, leaf = name.rpartition(".")
    return module, leaf


def param_matches(target: Target, name: str) -> bool:
    """A parameter matches when `target` matches its name or its owner module's path (or a dotted suffix)."""
    module, _ = owner(name)
    return _matches(target, name) or (bool(module) and _matches(target, module))


def is_norm_module(module: str, info: ModelInfo) -> bool:
    return "Norm" in info.module_types.get(module, "")


def aliases_of(info: ModelInfo, name: str) -> tuple[str, ...]:
    """Every name of the parameter `name` (a tied weight has several; export may read it under any of them)."""
    return info.aliases.get(name) or next((a for a in info.aliases.values() if name in a), (name,))


@dataclass(frozen=True)
class Read:
    """One get_attr node of a base parameter the rule selected."""

    node: Node
    param: str  # the table name (the name export uses)
    name: str  # the alias the rule matched, which names the adapter


def parameter_reads(gm: GraphModule, table: ParamTable, info: ModelInfo, target: Target, exclude: Target,
                    keep: Callable[[str], bool], where: str, what: str) -> list[Read]:
    """Every get_attr of a base parameter whose name (any alias of a tied weight) `target` selects and `keep`
    accepts. `target=None` selects every parameter `keep` accepts; "all-linear" the weights of every matmul but
    the output layer, as for LoRA."""
    linear_weights: set[str] | None = None
    if target == "all-linear":
        linear_weights = {s.weight for s in select(matmul_sites(gm, table, info), target, exclude, info, where)}
    reads, candidates = [], []
    for node in gm.graph.nodes:
        if node.op != "get_attr" or node.target not in table or table[node.target].role != BASE or not node.users:
            continue
        for alias in aliases_of(info, node.target):
            if not keep(alias):
                continue
            candidates.append(alias)
            if linear_weights is not None:
                chosen = node.target in linear_weights
            else:
                chosen = target is None or param_matches(target, alias)
            if chosen and (exclude is None or not param_matches(exclude, alias)):
                reads.append(Read(node, node.target, alias))
                break
    if not reads:
        import difflib

        hint = difflib.get_close_matches(str(target), candidates, n=3, cutoff=0.3) or candidates[:5]
        raise SpecError(f"{where}: target={target!r} selects no {what}"
                        + (f" after exclude={exclude!r}" if exclude is not None else "")
                        + (f". Candidates: {', '.join(hint)} ({len(candidates)} in all)" if candidates
                           else ": the model has none"))
    return reads


# ---- choosing the entries ---------------------------------------------------------------------------------------
def _count(density: float, n: int) -> int:
    return max(1, min(n, round(density * n)))


def _structured_dim(structure: str | None, shape: torch.Size, name: str) -> int | None:
    if structure is None:
        return None
    dim = 0 if structure == "rows" else 1
    if len(shape) <= dim:
        raise SpecError(f"SparseDelta: `{name}` has shape {tuple(shape)}, which has no {structure}; drop "
                        f"structure= or narrow target to matrices")
    return dim


def _reduce(scores: torch.Tensor, dim: int | None) -> torch.Tensor:
    """Per-entry scores ==> per-selectable-unit scores (entries, rows or columns)."""
    if dim is None:
        return scores.flatten()
    return scores.transpose(0, dim).flatten(1).sum(1)


def top_index(scores: torch.Tensor, density: float, dim: int | None) -> torch.Tensor:
    """Sorted indices of the `density` fraction of units (entries, rows or columns) with the largest score."""
    units = _reduce(scores.detach().float(), dim)
    return torch.topk(units, _count(density, units.numel()), sorted=False).indices.sort().values


def random_index(n: int, density: float, seed: int, name: str) -> torch.Tensor:
    # Seeded per parameter name, so the selection does not depend on which other parameters are targeted.
    gen = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
    return torch.randperm(n, generator=gen)[:_count(density, n)].sort().values


def mask_index(mask: Any, shape: torch.Size, dim: int | None, name: str) -> torch.Tensor:
    if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool or mask.shape != shape:
        got = f"{mask.dtype} {tuple(mask.shape)}" if isinstance(mask, torch.Tensor) else type(mask).__name__
        raise SpecError(f"SparseDelta: mask for `{name}` must be a bool tensor of shape {tuple(shape)}, got {got}")
    mask = mask.cpu()
    if dim is None:
        idx = mask.flatten().nonzero().squeeze(1)
    else:
        units = mask.transpose(0, dim).flatten(1)
        whole = units.all(1)
        if not torch.equal(whole, units.any(1)):
            raise SpecError(f"SparseDelta: mask for `{name}` is not whole {'rows' if dim == 0 else 'columns'}; "
                            f"select entire slices along dim {dim} or drop structure=")
        idx = whole.nonzero().squeeze(1)
    if idx.numel() == 0:
        raise SpecError(f"SparseDelta: mask for `{name}` selects nothing")
    return idx


def sparse_index(rule: SparseDelta, weight: torch.Tensor, name: str, aliases: Iterable[str]) -> torch.Tensor:
    """The int64 indices `rule` selects in `weight` (flat, or rows/columns with `structure`)."""
    dim = _structured_dim(rule.structure, weight.shape, name)
    n = weight.numel() if dim is None else weight.shape[dim]
    if rule.select == "mask":
        key = next((a for a in (name, *aliases) if a in rule.masks), None)
        if key is None:
            raise SpecError(f"SparseDelta: target selects `{name}` but `masks` has no entry for it; masks cover "
                            f"{', '.join(list(rule.masks)[:5])}")
        idx = mask_index(rule.masks[key], weight.shape, dim, name)
    elif rule.select == "random":
        idx = random_index(n, rule.density, rule.seed, name)
    else:
        # |W|^2 orders entries as |W| does and sums to a row's (column's) squared L2 norm.
        idx = top_index(weight.square(), rule.density, dim)
    return idx.to(device=weight.device, dtype=torch.int64)


def delta_shape(shape: torch.Size, k: int, dim: int | None) -> tuple[int, ...]:
    if dim is None:
        return (k,)
    out = list(shape)
    out[dim] = k
    return tuple(out)


# ---- the rewrite -------------------------------------------------------------------------------------------------
def insert_delta(gm: GraphModule, read: Read, weight: torch.Tensor, *, pass_name: str, method: str,
                 values: str, index: str | None = None, dim: int | None = None) -> Node:
    """`W = get_attr` ==> `W_eff = W + scatter(index, values)` before W's first use; every user reads W_eff."""
    node = read.node
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    first = min(node.users, key=order.__getitem__)
    b = NodeBuilder(gm, first, pass_name, method, like=first)
    stem = read.name.replace(".", "_")
    vals = b.attr(values)
    if gm.get_parameter(values).dtype != weight.dtype:
        vals = b.call(aten.to.dtype, vals, weight.dtype, name=f"{stem}_{method}_cast")
    if index is None:
        eff = b.call(aten.add.Tensor, node, vals, name=f"{stem}_{method}")
    elif dim is None:
        flat = b.call(aten.view.default, node, [-1], name=f"{stem}_{method}_flat")
        added = b.call(aten.index_add.default, flat, 0, b.attr(index), vals, name=f"{stem}_{method}_add")
        eff = b.call(aten.view.default, added, list(weight.shape), name=f"{stem}_{method}")
    else:
        eff = b.call(aten.index_add.default, node, dim, b.attr(index), vals, name=f"{stem}_{method}")
    eff.meta["peftc.delta"] = {"param": read.param, "method": method, "values": values, "index": index, "dim": dim}
    eff.meta["peftc.replaces"] = (read.param,)  # merged, W_eff folds into a tensor named W
    replace_uses(node, eff, keep=b.created)
    return eff


def already_adapted(read: Read, rule: Any, method: str) -> bool:
    """True when `rule` already rewrote this read (idempotence); raise when another delta rule did."""
    done = read.node.meta.get("peftc.adapted", {})
    for other in DELTA_METHODS:
        if other in done:
            # masks take no part in ==, so rules that differ only in their masks are told apart by identity
            same_masks = getattr(done[other], "masks", None) is getattr(rule, "masks", None)
            if other == method and done[other] == rule and same_masks:
                return True
            raise SpecError(f"{rule!r} selects `{read.name}`, which {done[other]!r} already adapts; narrow one "
                            f"target or add an `exclude`")
    return False


def mark_adapted(read: Read, rule: Any, method: str) -> None:
    read.node.meta["peftc.adapted"] = {**read.node.meta.get("peftc.adapted", {}), method: rule}


# ---- Fisher masks (FishMask) -------------------------------------------------------------------------------------
def _default_loss(model: nn.Module, batch: Any) -> torch.Tensor:
    out = model(**batch) if isinstance(batch, Mapping) else model(*batch) if isinstance(batch, (tuple, list)) \
        else model(batch)
    loss = getattr(out, "loss", None)
    if loss is None and isinstance(out, Mapping):
        loss = out.get("loss")
    if not isinstance(loss, torch.Tensor):
        raise PeftcError("fisher_masks: the model returned no `loss`; include labels in each batch (e.g. "
                         "labels=input_ids for a causal LM) or pass loss_fn=lambda model, batch: ...")
    return loss


def fisher_masks(model: nn.Module, batches: Iterable[Any], density: float = 0.01, *, target: Target = None,
                 exclude: Target = None, structure: str | None = None,
                 loss_fn: Callable[[nn.Module, Any], torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """FishMask selection: the `density` fraction of entries of each targeted parameter with the largest empirical
    Fisher information, sum over `batches` of the squared gradient of the loss.

    Each batch is a kwargs dict (or an args tuple) for `model`; its loss is `loss_fn(model, batch)` or the model
    output's `.loss`. Pass batches of one example for the per-example Fisher of the FishMask paper. Returns
    {parameter name: bool mask} for `peftc.SparseDelta(masks=..., structure=...)`. The model's parameters keep
    their `requires_grad` and `.grad` as they were.
    """
    rule = SparseDelta(target=target if target is not None else ".*", density=density, structure=structure,
                       exclude=exclude)  # validates the arguments as a spec would
    named = dict(model.named_parameters())
    chosen = {n: p for n, p in named.items() if param_matches(rule.target, n)
              and (exclude is None or not param_matches(exclude, n))}
    if not chosen:
        raise SpecError(f"fisher_masks: target={target!r} selects no parameter of {type(model).__name__}")
    saved = {n: (p.requires_grad, p.grad) for n, p in named.items()}
    scores = {n: torch.zeros_like(p, dtype=torch.float32) for n, p in chosen.items()}
    seen = 0
    try:
        for n, p in named.items():
            p.requires_grad_(n in chosen)
            p.grad = None
        for batch in batches:
            loss = (loss_fn or _default_loss)(model, batch)
            grads = torch.autograd.grad(loss, list(chosen.values()), allow_unused=True)
            for n, g in zip(chosen, grads):
                if g is not None:
                    scores[n] += g.detach().float().square()
            seen += 1
    finally:
        for n, p in named.items():
            p.requires_grad_(saved[n][0])
            p.grad = saved[n][1]
    if seen == 0:
        raise PeftcError("fisher_masks: `batches` is empty; pass at least one calibration batch")
    masks = {}
    for n, s in scores.items():
        dim = _structured_dim(structure, s.shape, n)
        idx = top_index(s, density, dim)
        units = torch.zeros(s.numel() if dim is None else s.shape[dim], dtype=torch.bool, device=s.device)
        units[idx] = True
        if dim is None:
            masks[n] = units.view(s.shape)
        else:
            shape = [1] * s.dim()
            shape[dim] = -1
            masks[n] = units.view(shape).expand(s.shape).clone()
    return masks
