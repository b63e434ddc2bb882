"""schedule-recompute: run chosen repeated blocks under activation checkpointing.

    y = block(x, W...)  ==>  y = checkpoint(block_k, x, W..., use_reentrant=False)

A block is a child of a ModuleList (`model.layers.3`, `transformer.h.0`, `bert.encoder.layer.1`): every node whose
module stack passes through it. Its nodes move into a sub-GraphModule `peftc_recompute_<k>`; forward keeps only
what the block reads from outside (activations, weights, SymInts), and backward runs the block again.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.utils.checkpoint
from torch.fx import Graph, GraphModule, Node

from peftc.capture import ModelInfo
from peftc.errors import PassError, SpecError
from peftc.pipeline import Pass, PassContext, PassResult, register_pass
from peftc.rewrite import NodeBuilder

NAME = "schedule-recompute"
BLOCK_KEY = "peftc.recompute_block"  # on the checkpoint call: the module path of the block it runs


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
        if node.meta.get("peftc.pass") == NAME:
            if BLOCK_KEY in node.meta:
                blocks.setdefault(node.meta[BLOCK_KEY], []).append(node)
            continue
        if node.op != "call_function":  # get_attr and placeholders stay outside: the block reads them as inputs
            continue
        path = _block_of(node, info)
        if path is not None:
            blocks.setdefault(path, []).append(node)
    return blocks


@register_pass
@dataclass(frozen=True)
class ScheduleRecompute(Pass):
    """schedule-recompute: y = block(x, W)  ==>  y = checkpoint(block, x, W, use_reentrant=False).

    `blocks`: how many repeated blocks to recompute (the first ones to run), a tuple of block paths, or a
    `|`-separated string of them; None recomputes every block. Training graphs only: eval graphs keep no
    activations for backward, so they are left unchanged. Gradients are unchanged: the block runs the same ops on
    the same inputs again, with the RNG state it first ran with (dropout draws the same masks).
    """

    name: ClassVar[str] = NAME
    stage: ClassVar[str] = "training"
    blocks: int | tuple[str, ...] | str | None = None

    def __post_init__(self):
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
        blocks = repeated_blocks(gm, ctx.info)
        chosen = self.chosen(list(blocks))
        if not ctx.training:
            return PassResult(gm, False)
        modified = False
        for path in chosen:
            nodes = blocks[path]
            if any(n.meta.get("peftc.pass") == NAME for n in nodes):
                continue  # already checkpointed
            self._checkpoint(gm, path, nodes)
            ctx.count(f"{NAME}.blocks")
            modified = True
        return PassResult(gm, modified)

    def _checkpoint(self, gm: GraphModule, path: str, nodes: list[Node]) -> None:
        inside = set(nodes)
        for node in nodes:
            schema = getattr(node.target, "_schema", None)
            if schema is not None and schema.is_mutable:
                raise PassError(f"{NAME}: block `{path}` runs `{node.target}`, which writes to its input in place; "
                                f"running the block again in backward would apply it twice")
        # The call goes right after the block's last node: nothing outside the block may read a block value
        # before that point, or it would run before the value exists.
        order = {n: i for i, n in enumerate(gm.graph.nodes)}
        last = nodes[-1]
        for node in gm.graph.nodes:
            if order[nodes[0]] < order[node] < order[last] and node not in inside and \
                    any(a in inside for a in node.all_input_nodes):
                raise PassError(f"{NAME}: `{node.name}` runs inside block `{path}` but outside its modules and reads "
                                f"block values; the block cannot run as one call")
        inputs: list[Node] = []
        for node in nodes:
            for a in node.all_input_nodes:
                if a not in inside and a not in inputs:
                    inputs.append(a)
        outputs = [n for n in nodes if any(u not in inside for u in n.users)]

        sub = Graph()
        env: dict[Node, Node] = {}
        for a in inputs:
            env[a] = sub.placeholder(a.name)
            env[a].meta.update({k: v for k, v in a.meta.items() if k in ("val", "tensor_meta")})
        for node in nodes:
            env[node] = sub.node_copy(node, lambda a: env[a])
        sub.output(tuple(env[n] for n in outputs))
        qualname = f"peftc_recompute_{path.replace('.', '_')}"
        gm.add_submodule(qualname, GraphModule(torch.nn.Module(), sub, class_name="RecomputeBlock"))

        nb = NodeBuilder(gm, last.next, NAME, "checkpoint")
        block = nb.attr(qualname)
        call = nb.call(torch.utils.checkpoint.checkpoint, block, *inputs, kwargs={"use_reentrant": False})
        call.meta[BLOCK_KEY] = path
        for i, out in enumerate(outputs):
            value = nb.call(operator.getitem, call, i, name=f"{out.name}_recomputed")
            value.meta.update({k: v for k, v in out.meta.items() if k in ("val", "tensor_meta")})
            out.replace_all_uses_with(value, delete_user_cb=lambda user: user not in inside)
        for node in reversed(nodes):
            gm.graph.erase_node(node)
