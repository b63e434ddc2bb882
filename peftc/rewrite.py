"""Graph-editing helpers shared by the passes."""

from __future__ import annotations

from typing import Any

from torch.fx import GraphModule, Node


class NodeBuilder:
    """Emit nodes before `anchor`, tagged with the pass and role that made them (provenance for diffs).

    Inserting before `site.next` keeps a multi-node insertion in order; `inserting_after(site)` would reverse it.
    New nodes inherit `like`'s module stack, so they stay attributed to the module they adapt.
    """

    def __init__(self, gm: GraphModule, anchor: Node, pass_name: str, role: str, like: Node | None = None):
        self.graph = gm.graph
        self.anchor = anchor
        self.meta: dict[str, Any] = {"peftc.pass": pass_name, "peftc.role": role}
        if like is not None and "nn_module_stack" in like.meta:
            self.meta["nn_module_stack"] = like.meta["nn_module_stack"]

    def _tag(self, node: Node) -> Node:
        node.meta.update(self.meta)
        return node

    def call(self, target, *args: Any, name: str | None = None, kwargs: dict[str, Any] | None = None) -> Node:
        with self.graph.inserting_before(self.anchor):
            node = self.graph.create_node("call_function", target, tuple(args), kwargs, name=name)
        return self._tag(node)

    def attr(self, qualname: str) -> Node:
        with self.graph.inserting_before(self.anchor):
            return self._tag(self.graph.get_attr(qualname))


def replace_uses(old: Node, new: Node) -> None:
    """Point every user of `old` at `new`, except the inserted nodes `new` is computed from (which read old).

    `new` may be a chain (`y -> add -> cast`): every tagged node on it keeps reading `old`, or the graph would loop.
    """
    chain: set[Node] = set()
    stack = [new]
    while stack:
        node = stack.pop()
        if node in chain or node is old or "peftc.pass" not in node.meta:
            continue
        chain.add(node)
        stack.extend(node.all_input_nodes)
    old.replace_all_uses_with(new, delete_user_cb=lambda user: user not in chain)
