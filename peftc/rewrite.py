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


def replace_uses(old: Node, new: Node, keep: Any = ()) -> None:
    """Point every user of `old` except `new` itself (which reads old), and the nodes in `keep` (the rest of the
    rewrite that reads old), at `new`."""
    keep = set(keep)
    old.replace_all_uses_with(new, delete_user_cb=lambda user: user is not new and user not in keep)
