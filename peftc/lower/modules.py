"""Module calls: a captured graph ==> a module that reads the live module tree, one module call per block.

    w = <the graph's own reference to model.layers.0.mlp.up_proj.weight>
      ==>  w = self.model.layers[0].mlp.up_proj.weight, looked up on the CompiledModel's tree at call time
    y = <the nodes of block model.layers.0>(x, W...)
      ==>  y = cm.model.layers[0](body, x)        (body: those nodes, reading the block's tensors live)

Why: a captured GraphModule holds its own references to the tensors it read at capture, but the training stack
swaps the tensors registered on modules: FSDP2 replaces them with sharded DTensors and, around each sharded
module's forward, with unsharded ones; `load_state_dict(assign=True)` and `_apply` replace them too. So the graph
peftc runs (the *runnable*) reads every tensor through the CompiledModel's modules when it runs. And FSDP2 gathers a
module's parameters in that module's forward hooks, so each repeated block (a ModuleList child: `model.layers.3`)
runs as a call of the CompiledModel's module at that path: its hooks fire, and its tensors are read inside the call.

The IR is untouched: passes, diffs, merge and ONNX export read the captured GraphModule (`cm.graph_for`); the
runnable is derived from it on first call and cached per graph.
"""

from __future__ import annotations

import operator
import weakref
from typing import Any

import torch
from torch import nn
from torch.fx import Graph, GraphModule, Node

from ..capture import ModelInfo
from ..params import Param, get_attr_path
from ..rewrite import extract_region, interleaved_reader, shape_meta

LOCAL = "peftc_local"  # the runnable's own attributes: graph-only submodules, tensors no module registers


class Block(nn.Module):
    """The CompiledModel's module at a repeated-block path: calling it runs one graph's nodes of that block.

    Its parameters are registered under it (`self_attn.q_proj.weight`), so `fully_shard(block)` shards exactly
    the block's tensors and its hooks run around the block's computation. One Block serves every graph (train,
    eval, each keyword set): the caller passes the body to run.
    """

    def forward(self, body: GraphModule, *args: Any) -> Any:
        return body(*args)


def outer_blocks(info: ModelInfo) -> list[str]:
    """The repeated-block paths: children of a ModuleList that sit inside no other repeated block."""
    blocks: list[str] = []
    for path in info.module_types:
        parent, _, index = path.rpartition(".")
        if index.isdigit() and info.module_types.get(parent) == "ModuleList" and \
                not any(path.startswith(b + ".") for b in blocks):
            blocks.append(path)
    return blocks


def make_containers(root: nn.Module, info: ModelInfo) -> None:
    """Create the modules the tensors are registered under, where their type matters: a ModuleList for each
    ModuleList of the source model (so `for layer in cm.model.layers` works), a Block for each repeated block.
    Every other container is a plain nn.Module (created as tensors are registered)."""
    blocks = set(outer_blocks(info))
    for path, kind in info.module_types.items():
        if not path or not (path in blocks or kind == "ModuleList"):
            continue
        parts = path.split(".")
        mod = root
        for i, part in enumerate(parts):
            child = mod._modules.get(part)
            if child is None:
                prefix = ".".join(parts[:i + 1])
                child = Block() if prefix in blocks else \
                    nn.ModuleList() if info.module_types.get(prefix) == "ModuleList" else nn.Module()
                mod.add_module(part, child)
            mod = child


def live_tensor(root: nn.Module, p: Param) -> torch.Tensor:
    """The tensor registered on `root` under `p.name` now (FSDP2 or load_state_dict(assign=True) may have swapped
    it), or the table's when nothing is registered there."""
    try:
        t = get_attr_path(root, p.name)
    except AttributeError:
        return p.tensor
    return t if isinstance(t, torch.Tensor) else p.tensor


# ---- the runnable --------------------------------------------------------------------------------------------

def runnable(cm: nn.Module, gm: GraphModule, info: ModelInfo) -> GraphModule:
    """The module that runs `gm` for `cm`: built on first use, then kept (on `cm`) for as long as `gm` lives."""
    cache = cm.__dict__.setdefault("_runnables", weakref.WeakKeyDictionary())
    run = cache.get(gm)
    if run is None:
        run = cache[gm] = build_runnable(cm, gm, info)
    return run


def build_runnable(cm: nn.Module, gm: GraphModule, info: ModelInfo) -> GraphModule:
    graph = Graph()
    graph.output(graph.graph_copy(gm.graph, {}))
    graph._codegen = gm.graph._codegen  # the calling convention (pytree specs)
    attrs = {n.target: get_attr_path(gm, n.target) for n in graph.nodes if n.op in ("get_attr", "call_module")}
    for path in outer_blocks(info):
        block = cm.get_submodule(path) if _has(cm, path) else None
        if isinstance(block, Block):
            nodes = _block_nodes(graph, path, info)
            if nodes:
                split_block(graph, path, nodes, attrs, block)
    graph.lint()
    run = bound_module(graph, attrs, cm, f"{type(gm).__name__}Runnable")
    run.peftc_blocks = tuple(p for p in outer_blocks(info) if any(
        n.op == "call_module" and n.target == p for n in graph.nodes))
    return run


def _has(root: nn.Module, path: str) -> bool:
    try:
        root.get_submodule(path)
    except AttributeError:
        return False
    return True


def _block_nodes(graph: Graph, path: str, info: ModelInfo) -> list[Node]:
    from ..passes.schedule_recompute import BLOCK_KEY, _block_of

    nodes: list[Node] = []
    for node in graph.nodes:
        if node.op == "call_function" and (node.meta.get(BLOCK_KEY) == path or
                                           (BLOCK_KEY not in node.meta and _block_of(node, info) == path)):
            nodes.append(node)
        elif node.op == "call_function" and node.target is operator.getitem and node.args[0] in nodes:
            nodes.append(node)  # the outputs a checkpointed block's call returns
    return nodes


def split_block(graph: Graph, path: str, nodes: list[Node], attrs: dict[str, Any], block: Block) -> bool:
    """Move `nodes` into a body graph called through `block`; False (graph unchanged) when they cannot run as one
    call: a node outside the block runs between the block's nodes and reads one of its values."""
    if interleaved_reader(graph, nodes) is not None:
        return False
    inside = set(nodes)
    last = nodes[-1]
    # Tensors read only inside the block are read in the block's call, after its hooks gathered them.
    moved = [a for a in dict.fromkeys(a for n in nodes for a in n.all_input_nodes)
             if a.op == "get_attr" and a not in inside and all(u in inside for u in a.users)]
    inside.update(moved)

    def local(target: str) -> str:  # a block tensor by its name on the block
        return target.removeprefix(path + ".")

    body, inputs, outputs = extract_region(nodes, moved, local)
    body_attrs = {local(a.target): attrs[a.target] for a in moved}
    body_name = f"peftc_body_{path.replace('.', '_')}"
    attrs[body_name] = bound_module(body, body_attrs, block, "BlockBody")
    attrs[path] = block

    with graph.inserting_before(last.next):
        call = graph.call_module(path, (graph.get_attr(body_name), *inputs))
        for i, out in enumerate(outputs):
            value = graph.call_function(operator.getitem, (call, i))
            value.meta.update(shape_meta(out))
            out.replace_all_uses_with(value, delete_user_cb=lambda user: user not in inside)
    for node in reversed([n for n in graph.nodes if n in inside]):
        graph.erase_node(node)
    return True


def bound_module(graph: Graph, attrs: dict[str, Any], owner: nn.Module, class_name: str) -> GraphModule:
    """A GraphModule running `graph` whose reads resolve on `owner` when it runs.

    `attrs`: each get_attr / call_module target ==> the object the IR read there. A tensor `owner` registers under
    that name, or a module it holds there, is looked up on `owner`'s modules at call time: the module shares
    `owner`'s tensor dicts and child modules. Anything else (graph-only submodules, tensors no module registers) the
    module holds itself, under `peftc_local`.
    """
    local = nn.Module()
    for node in graph.nodes:
        if node.op not in ("get_attr", "call_module"):
            continue
        obj = attrs[node.target]
        try:
            found = get_attr_path(owner, node.target)
        except AttributeError:
            found = None
        # A tensor by name: whatever is registered there when the graph runs is what it reads (FSDP2 may have
        # swapped it already). A module only when it is the same one (graph-only submodules stay ours).
        registered = found is obj or (isinstance(obj, torch.Tensor) and isinstance(found, torch.Tensor))
        if not registered:
            name = f"a{len(local._modules) + len(local._parameters) + len(local._buffers)}"
            if isinstance(obj, nn.Module):
                local.add_module(name, obj)
            elif isinstance(obj, nn.Parameter):
                local.register_parameter(name, obj)
            elif isinstance(obj, torch.Tensor):
                local.register_buffer(name, obj)
            else:
                setattr(local, name, obj)
            node.target = f"{LOCAL}.{name}"
    run = GraphModule(nn.Module(), Graph(), class_name=class_name)
    # Shared, not copied: FSDP2 and load_state_dict write these dicts in place.
    run.__dict__["_parameters"] = owner._parameters
    run.__dict__["_buffers"] = owner._buffers
    run._modules.update(owner._modules)
    run._modules[LOCAL] = local
    run.graph = graph
    return run
