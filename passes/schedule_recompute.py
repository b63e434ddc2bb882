"""schedule-recompute: run chosen repeated blocks, or regions of them, again in backward.

    y = block(x, W...)   ==>  y = checkpoint(block_k, x, W..., use_reentrant=False)
    y = region(x, W...)  ==>  y = run_region(plan_k, x, W...)   (plan_k: the ops whose outputs backward keeps,
                                                                 `linear.0+linear.2`; every other op is rerun)

A block is a child of a ModuleList (`model.layers.3`, `transformer.h.0`, `bert.encoder.layer.1`): every node whose
module stack passes through it. A block runs under torch's activation checkpointing, as HF's
gradient_checkpointing_enable does. A region is a segment of a block between two points where a single tensor (the
residual stream) carries everything on: `model.layers.3#0` is a Llama layer's attention half, `#1` its MLP half.
Its nodes move into a peftc.region_recompute.RegionPlan `peftc_recompute_<path>`: forward keeps only what the region
reads from outside (activations, weights, SymInts) plus the outputs of the ops its save list names (`op_keys`) and of
its random ops, and backward reruns the other ops that what autograd saved is computed from.
"""

from __future__ import annotations

import functools
import operator
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.utils.checkpoint
from torch.fx import GraphModule, Node

from peftc.capture import ModelInfo
from peftc.errors import PassError, SpecError
from peftc.pipeline import Pass, PassContext, PassResult, register_pass
from peftc.region_recompute import RegionPlan, run_region
from peftc.rewrite import call_in_place_of, interleaved_reader

NAME = "schedule-recompute"
BLOCK_KEY = "peftc.recompute_block"  # on the checkpoint call: the module path of the block it runs
REGION_KEY = "peftc.recompute_region"  # on a region's call: `block#k`
SAVE_KEY = "peftc.recompute_save"  # on a region's call: what backward keeps (`linear.0`, ...)


def op_keys(nodes) -> dict[str, str]:
    """Node name ==> how a save list names it: the op and its index among the region's calls of that op
    (`linear.0`, `scaled_dot_product_attention.0`, `mul.3`), the same in every capture of the region."""
    keys, counts = {}, {}
    for node in nodes:
        if node.op != "call_function":
            continue
        op = getattr(node.target, "__name__", str(node.target)).split(".")[0]
        keys[node.name] = f"{op}.{counts.get(op, 0)}"
        counts[op] = counts.get(op, 0) + 1
    return keys


def submodule_name(label: str) -> str:
    """The submodule a block or region moves into: `model.layers.0#1` ==> `peftc_recompute_model_layers_0_r1`."""
    return f"peftc_recompute_{label.replace('.', '_').replace('#', '_r')}"


def never_rerun(node: Node) -> bool:
    """Whether backward must keep `node`'s output rather than run it again: a random op (its rerun would draw other
    numbers) or a call that is not an aten op, getitem or prune-grads' causal SDPA (what it does is not known)."""
    from .prune_grads import causal_sdpa

    if node.target is operator.getitem:
        return False
    if node.target is causal_sdpa:
        return bool(node.args[5] if len(node.args) > 5 else node.kwargs.get("dropout_p", 0.0))
    if not isinstance(node.target, torch._ops.OpOverload):
        return True
    dropout = next((v for a, v in zip(node.target._schema.arguments, node.args) if a.name == "dropout_p"),
                   node.kwargs.get("dropout_p", 0.0))  # attention with dropout_p > 0 draws a mask
    return any(w in node.target.__name__ for w in ("dropout", "bernoulli", "rand", "normal")) or bool(dropout)


def _block_of(node: Node, info: ModelInfo) -> str | None:
    """The outermost ModuleList child on `node`'s module stack, or None."""
    for path, _ in (node.meta.get("nn_module_stack") or {}).values():
        parent, _, index = path.rpartition(".")
        if index.isdigit() and info.module_types.get(parent) == "ModuleList" and path in info.module_types:
            return path
    return None


def repeated_blocks(gm: GraphModule, info: ModelInfo) -> dict[str, list[Node]]:
    """Block path ==> its nodes in graph order, blocks in the order they run. A block this pass already
    checkpointed maps to its checkpoint call alone."""
    blocks: dict[str, list[Node]] = {}
    for node in gm.graph.nodes:
        if BLOCK_KEY in node.meta:  # a block or region call (this pass's or recompute-cheap's)
            blocks.setdefault(node.meta[BLOCK_KEY], []).append(node)
            continue
        if node.meta.get("peftc.pass") == NAME:
            continue
        if node.op != "call_function":  # get_attr and placeholders stay outside: the block reads them as inputs
            continue
        path = _block_of(node, info)
        if path is not None:
            blocks.setdefault(path, []).append(node)
    return blocks


def block_regions(gm: GraphModule, info: ModelInfo) -> dict[str, list[Node]]:
    """`block#k` ==> the nodes of the k-th region of each repeated block, in the order they run.

    A block is cut after a node when the only value that the block's later nodes read from its earlier ones (or
    from the previous block) is that node's output: a residual stream point. Values every block reads (rotary
    tables, masks) are computed outside the blocks and do not count. A region reads at least one weight (no
    region of casts alone). Blocks already checkpointed are left out.
    """
    blocks = repeated_blocks(gm, info)
    regions: dict[str, list[Node]] = {}
    for path, nodes in blocks.items():
        if any(BLOCK_KEY in n.meta for n in nodes):
            continue
        position = {n: i for i, n in enumerate(nodes)}
        # What a cut must carry: values of this block, and values from outside that only this block reads (its
        # input activation); not values every block reads.
        carried = [a for a in dict.fromkeys(a for n in nodes for a in n.all_input_nodes)
                   if a in position or (a.op == "call_function" and all(u in position for u in a.users))]
        last_use = {a: max(position[u] for u in a.users if u in position) for a in carried}
        k, start = 0, 0
        for i, n in enumerate(nodes[:-1]):
            crossing = [a for a in carried if last_use[a] > i and position.get(a, -1) <= i]
            reads_weights = any(a.op == "get_attr" for m in nodes[start:i + 1] for a in m.all_input_nodes)
            if crossing == [n] and all(u in position for u in n.users) and reads_weights:
                regions[f"{path}#{k}"] = nodes[start:i + 1]
                k, start = k + 1, i + 1
        regions[f"{path}#{k}"] = nodes[start:]
    return regions


def _parse_region(text: str) -> tuple[str, tuple[str, ...]]:
    """`model.layers.0#1:mm.0+mm.2` ==> ("model.layers.0#1", ("mm.0", "mm.2"))."""
    name, _, save = text.partition(":")
    return name.strip(), tuple(s.strip() for s in save.split("+") if s.strip())


@register_pass
@dataclass(frozen=True)
class ScheduleRecompute(Pass):
    """schedule-recompute: y = block(x, W)  ==>  y = checkpoint(block, x, W, use_reentrant=False);
    y = region(x, W)  ==>  y = run_region(plan, x, W).

    `blocks`: how many repeated blocks to recompute (the first ones to run), a tuple of block paths, or a
    `|`-separated string of them; None recomputes every block. `regions` instead names regions of blocks
    (`block_regions`), each with the ops whose outputs backward keeps rather than recomputes (`op_keys`):
    `model.layers.0#0:linear.0+linear.4|model.layers.1#1` (the memory-budget planner writes these). Training graphs
    only: eval graphs keep no activations for backward, so they are left unchanged. Gradients are unchanged: a block
    runs the same ops on the same inputs again, with the RNG state it first ran with (dropout draws the same masks);
    a region never reruns its random ops, it keeps their outputs.
    """

    name: ClassVar[str] = NAME
    stage: ClassVar[str] = "training"
    blocks: int | tuple[str, ...] | str | None = None
    regions: tuple[str, ...] | str | None = None

    def __post_init__(self):
        if isinstance(self.regions, str):
            object.__setattr__(self, "regions", tuple(r.strip() for r in self.regions.split("|") if r.strip()))
        elif isinstance(self.regions, list):
            object.__setattr__(self, "regions", tuple(self.regions))
        if self.regions is not None:
            if self.blocks is not None:
                raise SpecError(f"{NAME}: give blocks or regions, not both")
            if not all(isinstance(r, str) and "#" in r for r in self.regions):
                raise SpecError(f"{NAME}: regions must be such as 'model.layers.0#1:mm.0+mm.2|model.layers.1#0', "
                                f"got {self.regions!r}")
        if isinstance(self.blocks, str):
            object.__setattr__(self, "blocks", tuple(b.strip() for b in self.blocks.split("|") if b.strip()))
        elif isinstance(self.blocks, list):
            object.__setattr__(self, "blocks", tuple(self.blocks))
        ok = self.blocks is None or (isinstance(self.blocks, int) and not isinstance(self.blocks, bool)
                                     and self.blocks >= 0) or \
            (isinstance(self.blocks, tuple) and all(isinstance(b, str) for b in self.blocks))
        if not ok:
            raise SpecError(f"{NAME}: blocks must be a count >= 0, block paths such as 'model.layers.0|"
                            f"model.layers.1', or None for all; got {self.blocks!r}")

    def chosen(self, found: list[str]) -> list[str]:
        if self.blocks is None:
            return list(found)
        if isinstance(self.blocks, int):
            if self.blocks > len(found):
                raise SpecError(f"{NAME}{{blocks={self.blocks}}}: the model has only {len(found)} repeated "
                                f"blocks ({', '.join(found) or 'none'})")
            return found[:self.blocks]
        unknown = [b for b in self.blocks if b not in found]
        if unknown:
            raise SpecError(f"{NAME}: `{unknown[0]}` is not a repeated block of this model; blocks: "
                            f"{', '.join(found) or 'none'}")
        return [b for b in found if b in self.blocks]

    def run(self, gm: GraphModule, ctx: PassContext) -> PassResult:
        if self.regions is not None:
            return self._run_regions(gm, ctx)
        blocks = repeated_blocks(gm, ctx.info)
        chosen = self.chosen(list(blocks))
        if not ctx.training:
            return PassResult(gm, False)
        modified = False
        for path in chosen:
            nodes = blocks[path]
            if any(REGION_KEY in n.meta for n in nodes):
                raise SpecError(f"{NAME}: block `{path}` already has regions recomputed (by recompute-cheap or "
                                f"regions=...); recompute whole blocks or regions, not both: leave recompute-cheap "
                                f"out (peftc.compile(..., recompute=False))")
            if any(BLOCK_KEY in n.meta for n in nodes):
                continue  # already checkpointed
            self._checkpoint(gm, path, nodes)
            ctx.count(f"{NAME}.blocks")
            modified = True
        return PassResult(gm, modified)

    def _run_regions(self, gm: GraphModule, ctx: PassContext) -> PassResult:
        found = block_regions(gm, ctx.info)
        done = {n.meta[REGION_KEY] for n in gm.graph.nodes if REGION_KEY in n.meta}
        wanted = [_parse_region(r) for r in self.regions]
        unknown = [name for name, _ in wanted if name not in found and name not in done]
        if unknown:
            raise SpecError(f"{NAME}: `{unknown[0]}` is not a region of this model; regions: "
                            f"{', '.join(found) or 'none'}")
        if not ctx.training:
            return PassResult(gm, False)
        modified = False
        for name, save in wanted:
            if name in done:
                continue
            self._checkpoint(gm, name.partition("#")[0], found[name], save, region=name)
            ctx.count(f"{NAME}.regions")
            modified = True
        return PassResult(gm, modified)

    def _checkpoint(self, gm: GraphModule, path: str, nodes: list[Node], save: tuple[str, ...] = (),
                    region: str | None = None) -> None:
        for node in nodes:
            schema = getattr(node.target, "_schema", None)
            if schema is not None and schema.is_mutable:
                raise PassError(f"{NAME}: block `{path}` runs `{node.target}`, which writes to its input in place; "
                                f"running the block again in backward would apply it twice")
        # The call goes right after the block's last node: nothing outside the block may read a block value
        # before that point, or it would run before the value exists.
        reader = interleaved_reader(gm.graph, nodes)
        if reader is not None:
            raise PassError(f"{NAME}: `{reader.name}` runs inside block `{path}` but outside its modules and reads "
                            f"block values; the block cannot run as one call")
        qualname = submodule_name(region or path)
        if region is None:
            module = functools.partial(GraphModule, torch.nn.Module(), class_name="RecomputeBlock")
            call = call_in_place_of(gm, nodes, qualname, module, torch.utils.checkpoint.checkpoint, pass_name=NAME,
                                    kwargs={"use_reentrant": False})
        else:
            keys = op_keys(nodes)
            unknown = sorted(set(save) - set(keys.values()))
            if unknown:
                raise SpecError(f"{NAME}: region `{region}` has no op `{unknown[0]}`; its ops are "
                                f"{', '.join(keys.values())}")
            kept = {n.name for n in nodes if keys.get(n.name) in save or never_rerun(n)}
            call = call_in_place_of(gm, nodes, qualname, lambda graph: RegionPlan(graph, kept), run_region,
                                    pass_name=NAME)
            call.meta[REGION_KEY] = region
            call.meta[SAVE_KEY] = tuple(save)
        call.meta[BLOCK_KEY] = path
