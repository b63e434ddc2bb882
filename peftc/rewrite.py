"""Graph-editing helpers shared by the passes."""

from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import Any, Callable, Iterable

from torch.fx import Graph, GraphModule, Node
from torch.fx.subgraph_rewriter import replace_pattern_with_filters

from .errors import SpecError


class NodeBuilder:
    """Emit nodes before `anchor`, tagged with the pass and role that made them (provenance for diffs).

    Inserting before `site.next` keeps a multi-node insertion in order; `inserting_after(site)` would reverse it.
    New nodes inherit `like`'s module stack, so they stay attributed to the module they adapt.
    """

    def __init__(self, gm: GraphModule, anchor: Node, pass_name: str, role: str, like: Node | None = None):
        self.graph = gm.graph
        self.anchor = anchor
        self.meta: dict[str, Any] = {"peftc.pass": pass_name, "peftc.role": role}
        self.created: list[Node] = []  # every node this builder emitted, in order
        if like is not None and "nn_module_stack" in like.meta:
            self.meta["nn_module_stack"] = like.meta["nn_module_stack"]

    def _tag(self, node: Node) -> Node:
        node.meta.update(self.meta)
        self.created.append(node)
        return node

    def call(self, target, *args: Any, name: str | None = None, kwargs: dict[str, Any] | None = None) -> Node:
        with self.graph.inserting_before(self.anchor):
            node = self.graph.create_node("call_function", target, tuple(args), kwargs, name=name)
        return self._tag(node)

    def attr(self, qualname: str) -> Node:
        with self.graph.inserting_before(self.anchor):
            return self._tag(self.graph.get_attr(qualname))


def shape_meta(node: Node) -> dict[str, Any]:
    """The shape metadata of `node` (its fake value), for a node that stands for it in another graph."""
    return {k: v for k, v in node.meta.items() if k in ("val", "tensor_meta")}


def interleaved_reader(graph: Graph, nodes: list[Node]) -> Node | None:
    """A node outside `nodes` that runs between the first and the last of them and reads one of their values (so
    they cannot run as one call), or None."""
    inside = set(nodes)
    order = {n: i for i, n in enumerate(graph.nodes)}
    first, last = order[nodes[0]], order[nodes[-1]]
    return next((n for n in graph.nodes if first < order[n] < last and n not in inside
                 and any(a in inside for a in n.all_input_nodes)), None)


def extract_region(nodes: list[Node], attrs: Iterable[Node] = (),
                   attr_target: Callable[[str], str] = lambda target: target) -> tuple[Graph, list[Node], list[Node]]:
    """nodes (in graph order) ==> (a graph of their own, the values it reads from outside, the values read after it).

    The new graph takes one placeholder per outside value (named and shaped like it), reads the `attrs` get_attr
    nodes itself (as `attr_target(target)`), copies `nodes`, and returns a tuple of the outputs. The original graph
    is not changed: the caller puts a call of the new graph in place of `nodes`.
    """
    attrs = list(attrs)
    inside = {*nodes, *attrs}
    inputs = [a for a in dict.fromkeys(a for n in nodes for a in n.all_input_nodes) if a not in inside]
    outputs = [n for n in nodes if any(u not in inside for u in n.users)]
    region = Graph()
    env: dict[Node, Node] = {}
    for a in inputs:
        env[a] = region.placeholder(a.name)
        env[a].meta.update(shape_meta(a))
    for a in attrs:
        env[a] = region.get_attr(attr_target(a.target))
    for node in nodes:
        env[node] = region.node_copy(node, env.__getitem__)
    region.output(tuple(env[n] for n in outputs))
    return region, inputs, outputs


def call_in_place_of(gm: GraphModule, nodes: list[Node], qualname: str, module, target, *leading: Any,
                     pass_name: str, kwargs: dict[str, Any] | None = None) -> Node:
    """nodes (in graph order) ==> `outs = target(<qualname>, *leading, *inputs, **kwargs)`; `outs[i]` for each value
    read after them.

    `module(graph)` makes the submodule `qualname` from the nodes' own graph (extract_region). The call goes right
    after the last node; the caller has checked that nothing outside reads their values before (interleaved_reader).
    """
    inside = set(nodes)
    sub, inputs, outputs = extract_region(nodes)
    gm.add_submodule(qualname, module(sub))
    nb = NodeBuilder(gm, nodes[-1].next, pass_name, "region")
    call = nb.call(target, nb.attr(qualname), *leading, *inputs, kwargs=kwargs)
    for i, out in enumerate(outputs):
        value = nb.call(operator.getitem, call, i, name=f"{out.name}_recomputed")
        value.meta.update(shape_meta(out))
        out.replace_all_uses_with(value, delete_user_cb=lambda user: user not in inside)
    for node in reversed(nodes):
        gm.graph.erase_node(node)
    return call


def adapted(node: Node, method: str, rule: Any, module: str) -> bool:
    """Whether `rule` already adapted this site, so a rerun of the pass changes nothing. Another rule of the same
    method on the same site is a spec error: two adapters of one kind on one site are ambiguous."""
    done = node.meta.get("peftc.adapted", {}).get(method)
    if done is not None and done != rule:
        raise SpecError(f"{rule!r} matches `{module}`, which {done!r} already adapts; narrow one target or add an "
                        f"`exclude`")
    return done is not None


def mark_adapted(node: Node, method: str, rule: Any) -> None:
    node.meta["peftc.adapted"] = {**node.meta.get("peftc.adapted", {}), method: rule}


def replace_uses(old: Node, new: Node, keep: Any = ()) -> None:
    """Point every user of `old` at `new`, except the inserted nodes `new` is computed from (which read old).

    `new` may be a chain (`y -> add -> cast`): every tagged node on it keeps reading `old`, or the graph would loop.
    `keep` names more nodes that must keep reading `old` (the rest of a rewrite that reads it).
    """
    chain: set[Node] = set(keep)
    stack = [new]
    while stack:
        node = stack.pop()
        if node in chain or node is old or "peftc.pass" not in node.meta:
            continue
        chain.add(node)
        stack.extend(node.all_input_nodes)
    old.replace_all_uses_with(new, delete_user_cb=lambda user: user is not new and user not in chain)


def erase_dead(gm: GraphModule, candidates) -> int:
    """Erase `candidates` that nothing reads, then whatever they alone read, provided it is a `get_attr` or a node a
    peftc pass made. Unlike `eliminate_dead_code`, it never touches the captured model's own unused nodes."""
    erased = 0
    todo = list(candidates)
    while todo:
        node = todo.pop()
        if node._erased or node.graph is not gm.graph or node.users or node.op not in ("get_attr", "call_function"):
            continue
        if node.op == "call_function" and "peftc.pass" not in node.meta:
            continue
        inputs = node.all_input_nodes
        gm.graph.erase_node(node)
        erased += 1
        todo.extend(inputs)
    return erased


Bindings = dict  # pattern argument name -> the graph Node (or literal) it matched


@dataclass(frozen=True)
class Rule:
    """A declarative rewrite: wherever `pattern` matches and `where(bindings, ctx)` holds, put `replacement`.

    Both are functions of the same arguments written with aten ops; an argument matches any node or literal, and
    the replacement receives what it matched. `replaces` names the argument(s) whose tensors the replacement's
    folded weights take the place of (fold-params gives a folded tensor the name of the one it matches in shape).
    """

    name: str
    pattern: Callable
    replacement: Callable
    where: Callable[[Bindings, Any], bool] | None = None
    replaces: str | tuple[str, ...] | None = None


class RuleSet:
    """An ordered list of rules applied one after another; `apply` counts every hit under `<pass>.<rule>`."""

    def __init__(self, *rules: Rule):
        self.rules = list(rules)

    def add(self, rule: Rule) -> Rule:
        if any(r.name == rule.name for r in self.rules):
            raise ValueError(f"a rule named {rule.name!r} is already in this rule set")
        self.rules.append(rule)
        return rule

    def apply(self, gm: GraphModule, ctx: Any, pass_name: str) -> int:
        hits = 0
        for rule in self.rules:
            hits += self._apply(rule, gm, ctx, pass_name)
        return hits

    def _apply(self, rule: Rule, gm: GraphModule, ctx: Any, pass_name: str) -> int:
        def bindings(match, pattern_graph) -> Bindings:
            return {pn.target: match.nodes_map[pn] for pn in pattern_graph.nodes if pn.op == "placeholder"}

        def accept(match, original_graph, pattern_graph) -> bool:
            return rule.where is None or bool(rule.where(bindings(match, pattern_graph), ctx))

        replaced = replace_pattern_with_filters(gm, rule.pattern, rule.replacement, match_filters=[accept])
        for rp in replaced:
            meta = {"peftc.pass": pass_name, "peftc.role": rule.name}
            bound = {pn.target: gn for pn, gn in rp.nodes_map.items() if pn.op == "placeholder"}
            if rule.replaces is not None:
                names = (rule.replaces,) if isinstance(rule.replaces, str) else rule.replaces
                meta["peftc.replaces"] = tuple(bound[n].target for n in names
                                               if isinstance(bound[n], Node) and bound[n].op == "get_attr")
            like = rp.anchor.meta.get("nn_module_stack")
            for node in rp.replacements:
                node.meta.update(meta)
                if like is not None:
                    node.meta.setdefault("nn_module_stack", like)
            erase_dead(gm, [n for n in bound.values() if isinstance(n, Node)])
        if hasattr(ctx, "count") and replaced:
            ctx.count(f"{pass_name}.{rule.name}", len(replaced))
        return len(replaced)
