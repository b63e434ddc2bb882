"""fold-params: f(W1, W2, ..., constants)  ==>  C, for subgraphs peftc made that read only frozen tensors."""

from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn
from torch.fx import GraphModule, Node
from torch.fx.node import map_arg

from peftc.params import BUFFER, set_attr_path
from peftc.pipeline import Pass, PassContext, PassResult, register_pass
from peftc.rewrite import erase_dead

aten = torch.ops.aten
# Random draws: a new value on every call, never a constant (dropout; rand_like in BOFT's block dropout).
_RANDOM = {aten.dropout, aten.native_dropout, aten.bernoulli, aten.rand, aten.rand_like, aten.randn, aten.randn_like,
           aten.randint, aten.randint_like, aten.randperm, aten.normal, aten.uniform, aten.multinomial}


def _pure(node: Node) -> bool:
    target = node.target
    if target is operator.getitem:  # an element of a multi-output op (linalg_solve_ex), folded with it
        return True
    if not isinstance(target, torch._ops.OpOverload):
        return False
    return target.overloadpacket not in _RANDOM and not target._schema.is_mutable


@register_pass
@dataclass(frozen=True)
class FoldParams(Pass):
    """fold-params: f(W1, W2, ..., constants)  ==>  C  (evaluated once; the graph reads C).

    Folds the maximal subgraphs that read only frozen tensors and literals and end in a node a peftc pass made
    (a merged weight `W + s·BA`, a BatchNorm scale): the model's own parameter-only ops are left alone, so the
    folded graph has no op the plain capture lacks. A folded tensor that takes the place of a parameter (the rule
    said `replaces=`) gets that parameter's name when nothing else reads the original, so merged models keep the
    base model's parameter names. Results are cached in the parameter table by expression, so every capture of
    the model (another signature, train and eval) folds to the same tensor.
    """

    name: ClassVar[str] = "fold-params"

    def run(self, gm: GraphModule, ctx: PassContext) -> PassResult:
        table = ctx.params
        foldable: set[Node] = set()
        for node in gm.graph.nodes:
            if node.op == "get_attr":
                if node.target in table and not table[node.target].trainable:
                    foldable.add(node)
            elif node.op == "call_function" and node.all_input_nodes and _pure(node) \
                    and all(n in foldable for n in node.all_input_nodes):
                foldable.add(node)
        # A frontier is read by a node outside the fold, or by one of the model's own ops (`t(W')`), which stays.
        frontiers = [n for n in foldable if n.op == "call_function" and "peftc.pass" in n.meta
                     and any(u not in foldable or "peftc.pass" not in u.meta for u in n.users)]
        if not frontiers:
            return PassResult(gm, False)

        groups: dict[str, list[Node]] = {}
        for node in frontiers:
            groups.setdefault(_expression(node), []).append(node)
        for key, nodes in groups.items():
            name, tensor = self._constant(gm, ctx, key, nodes)
            set_attr_path(gm, name, tensor)
            for node in nodes:
                with gm.graph.inserting_before(node):
                    const = gm.graph.get_attr(name)
                const.meta.update({"peftc.pass": self.name, "peftc.role": "folded"})
                if "val" in node.meta:
                    const.meta["val"] = node.meta["val"]
                node.replace_all_uses_with(const)
                erase_dead(gm, [node])
                ctx.count("fold-params.folded")
        return PassResult(gm, True)

    def _constant(self, gm: GraphModule, ctx: PassContext, key: str, nodes: list[Node]) -> tuple[str, torch.Tensor]:
        table = ctx.params
        cached = table.constants.get(key)
        if cached is not None:  # the table's tensor, not the cached one: `.to()` may have replaced it since
            return cached[0], table[cached[0]].tensor
        with torch.no_grad():
            tensor = _evaluate(nodes[0], table)
        name = self._name(gm, ctx, nodes, tensor)
        if name in table:  # it replaces that parameter: the table now holds the folded value under its name
            old = table[name]
            old.tensor = nn.Parameter(tensor, requires_grad=False) if isinstance(old.tensor, nn.Parameter) \
                else tensor
        else:
            table.adopt(name, tensor, BUFFER)
        table.constants[key] = (name, table[name].tensor)
        return table.constants[key]

    def _name(self, gm: GraphModule, ctx: PassContext, nodes: list[Node], tensor: torch.Tensor) -> str:
        table = ctx.params
        inside = set().union(*(_ancestors(n) for n in nodes))
        for replaces in nodes[0].meta.get("peftc.replaces", ()):
            original = table[replaces].tensor
            readers = [u for n in gm.graph.nodes if n.op == "get_attr" and n.target == replaces for u in n.users]
            if original.shape == tensor.shape and original.dtype == tensor.dtype and all(u in inside for u in readers):
                return replaces
        return f"peftc_folded_{len(table.constants)}"


def _ancestors(node: Node) -> set[Node]:
    seen, todo = set(), [node]
    while todo:
        n = todo.pop()
        if n not in seen:
            seen.add(n)
            todo.extend(n.all_input_nodes)
    return seen


def _expression(node: Node) -> str:
    """A canonical text of the computation: equal text, equal tensor (tensors are named by their table name)."""
    if node.op == "get_attr":
        return node.target

    def render(a: Any) -> str:
        if isinstance(a, Node):
            return _expression(a)
        if isinstance(a, (list, tuple)):
            return "[" + ", ".join(render(x) for x in a) + "]"
        return repr(a)

    args = [render(a) for a in node.args] + [f"{k}={render(v)}" for k, v in sorted(node.kwargs.items())]
    return f"{node.target}({', '.join(args)})"


def _evaluate(node: Node, table) -> torch.Tensor:
    env: dict[Node, Any] = {}

    def value(n: Node):
        if n not in env:
            if n.op == "get_attr":
                env[n] = table[n.target].tensor.detach()
            else:
                args = map_arg(n.args, value)
                kwargs = map_arg(n.kwargs, value)
                env[n] = n.target(*args, **kwargs)
        return env[n]

    return value(node).detach().clone()
