"""Tag-driven merges: y = matmul(x, W[, b]) adapted by a tagged adapter  ==>  y = matmul(x, W'[, b']).

The insert passes record on the adapter's output node what it computes: insert-lora writes `meta["peftc.lora"]`
(weight, layout, each (A, B, scaling, output columns), DoRA's magnitude), insert-ia3 writes `meta["peftc.ia3"]`
(weight, vector, feed-forward or output). Every such adapter is linear in x with the same site, so the adapted
output equals the site's own matmul with a weight (and bias) computed from parameters only:

    LoRA (LoRA-FA, rank/alpha patterns, conv, einsum)  W' = W + s·BA   (lora_bias: b' = b + s·b_B)
    per-slice LoRA                                      W'[s_i:e_i] = W[s_i:e_i] + s_i·B_i A_i
    DoRA                                                W' = m / ‖W + s·BA‖ · (W + s·BA)   (row norms; bias kept)
    IA3 on the output                                   W' = diag(l)·W,  b' = l·b
    IA3 on the feed-forward input                       W' = W·diag(l)

One routine builds W' (in W's storage layout, in the adapters' float32 for half-precision bases, cast once) from
tagged nodes beside the site, points the site's weight read at it, and points the adapter's users back at y (or, for
a feed-forward input, the site back at x). fold-params then evaluates W' into a tensor named W: the merged graph is
the plain capture's, op for op. No per-form pattern is needed; the graph only has to say which node is the site.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch.fx import GraphModule, Node

from .match import _FLIPS, _KEEPS, conv_sites, matmul_sites
from .rewrite import NodeBuilder, erase_dead

aten = torch.ops.aten

# Methods whose tensors enter the model as activations, not as weights: a merge keeps them as frozen constants
# (fold-params still folds a parameter-only projection in front of them), so they cost what they cost unmerged.
KEPT_AS_CONSTANTS = frozenset({"prefix", "prompt_tuning", "p_tuning", "adaption_prompt"})

LORA, IA3 = "peftc.lora", "peftc.ia3"


def _tensors(kind: str, tag: dict) -> list[str]:
    if kind == IA3:
        return [tag["vector"]]
    names = [n for a, b, _s, _span in tag["adapters"].values() for n in (a, b)]
    return names + [n for n in (tag["magnitude"], tag.get("bias")) if n]


def adapter_nodes(out: Node, pass_name: str) -> set[Node]:
    """The adapter's own nodes: `out` and its ancestors made by the same pass, up to another adapter's output."""
    seen, todo = set(), [out]
    while todo:
        node = todo.pop()
        if node in seen or node.meta.get("peftc.pass") != pass_name:
            continue
        if node is not out and (LORA in node.meta or IA3 in node.meta):
            continue
        seen.add(node)
        todo.extend(node.all_input_nodes)
    return seen


def _weight_leaf(site, dying: set[Node]) -> tuple[Node, Node] | None:
    """(reader, leaf): walk W's read down through the model's layout ops to the tensor itself (a get_attr, or a
    node a pass made: a delta's W + δ, an earlier merge's W'). Rewiring reader -> leaf swaps W for W' and keeps the
    layout ops, so the merged graph has the plain capture's ops. None when a layout op also feeds something else."""
    args = site.node.args
    if site.form == "einsum":
        node = args[1][1 - site.x_path[1]]
    else:
        node = args[{"linear": 1, "conv": 1, "addmm": 2, "mm": 1, "matmul": 1}[site.form]]
    reader = site.node
    while node.op == "call_function" and "peftc.pass" not in node.meta:
        if node.target not in _FLIPS | _KEEPS | {aten.transpose.int, aten.permute.default}:
            return None
        if any(u is not reader and u not in dying for u in node.users):
            return None
        reader, node = node, node.args[0]
    return reader, node


class _Merge:
    """Builds W' (and b') for one tagged adapter, before its site."""

    def __init__(self, gm: GraphModule, ctx, site, kind: str, tag: dict, pass_name: str, anchor: Node):
        self.table, self.site, self.tag = ctx.params, site, tag
        # before the node that reads W, which may be a layout op ahead of the site
        self.b = NodeBuilder(gm, anchor, pass_name, "merge-" + kind.rpartition(".")[2], like=site.node)
        self.in_out = tag["weight_in_out"]
        self.shape = list(self.table[tag["weight"]].tensor.shape)
        self.dtype = self.table[tag["weight"]].tensor.dtype  # W + δ and an earlier W' keep W's dtype
        any_adapter = tag["vector"] if kind == IA3 else next(iter(tag["adapters"].values()))[0]
        self.compute = self.table[any_adapter].tensor.dtype  # fp32 on half-precision bases

    def upcast(self, node: Node) -> Node:
        return node if self.compute == self.dtype else self.b.call(aten.to.dtype, node, self.compute)

    def done(self, node: Node, source: Node) -> Node:
        """Cast back once; name the tensor W' takes the place of, so fold-params names the folded tensor after it."""
        if self.compute != self.dtype:
            node = self.b.call(aten.to.dtype, node, self.dtype)
        node.meta["peftc.replaces"] = (source.target,) if source.op == "get_attr" \
            else source.meta.get("peftc.replaces", ())
        return node

    def _out_dim(self) -> int:
        return 1 if self.in_out else 0

    def _delta(self, a: str, b: str, s: float, rows: int) -> Node:
        """s·BA, laid out as W is stored."""
        call, attr = self.b.call, self.b.attr
        if self.site.form == "conv":  # B is a 1x1 conv after A: their product is one kernel of W's shape
            flat_b = call(aten.view.default, attr(b), [rows, -1])
            flat_a = call(aten.view.default, attr(a), [self.table[a].tensor.shape[0], -1])
            delta = call(aten.view.default, call(aten.mm.default, flat_b, flat_a), [rows, *self.shape[1:]])
        else:
            delta = call(aten.mm.default, attr(b), attr(a))
            if self.in_out:
                delta = call(aten.t.default, delta)
        return call(aten.mul.Tensor, delta, s)

    def lora(self, w: Node) -> Node:
        call = self.b.call
        adapters = list(self.tag["adapters"].values())
        if adapters[0][3] is None:  # one adapter over the whole weight
            a, b, s, _ = adapters[0]
            w = call(aten.add.Tensor, w, self._delta(a, b, s, self.site.out_features))
        else:  # per-slice: each adapter adds to its own output rows of W
            dim, pieces, pos = self._out_dim(), [], 0
            for a, b, s, (start, end) in sorted(adapters, key=lambda t: t[3]):
                if start > pos:
                    pieces.append(call(aten.slice.Tensor, w, dim, pos, start))
                part = call(aten.slice.Tensor, w, dim, start, end)
                pieces.append(call(aten.add.Tensor, part, self._delta(a, b, s, end - start)))
                pos = end
            if pos < self.site.out_features:
                pieces.append(call(aten.slice.Tensor, w, dim, pos, self.site.out_features))
            w = call(aten.cat.default, pieces, dim)
        return self._dora(w) if self.tag["magnitude"] else w

    def _dora(self, w: Node) -> Node:
        """HF PEFT's DoRA merge: m / ‖W + s·BA‖ per output unit, times W + s·BA."""
        call = self.b.call
        conv = self.site.form == "conv"
        dims = list(range(1, len(self.shape))) if conv else [1 - self._out_dim()]
        norm = call(aten.linalg_vector_norm.default, w, 2, dims, False)
        scale = call(aten.div.Tensor, call(aten.view.default, self.b.attr(self.tag["magnitude"]), [-1]), norm)
        shape = [-1, *[1] * len(dims)] if conv else ([1, -1] if self.in_out else [-1, 1])
        return call(aten.mul.Tensor, w, call(aten.view.default, scale, shape))

    def ia3(self, w: Node) -> Node:
        if self.site.form == "conv":
            return self._ia3_conv(w)
        along_rows = self.tag["feedforward"] == self.in_out  # l scales W's stored rows, else its columns
        vec = self.b.call(aten.view.default, self.b.attr(self.tag["vector"]), [-1, 1] if along_rows else [1, -1])
        return self.b.call(aten.mul.Tensor, w, vec)

    def _ia3_conv(self, w: Node) -> Node:
        """HF PEFT's conv IA3 merge: W [out, in/g, *k] scaled per output filter, or per input channel of its group."""
        call, k = self.b.call, len(self.shape) - 2
        vec = call(aten.view.default, self.b.attr(self.tag["vector"]), [-1])
        if not self.tag["feedforward"]:
            return call(aten.mul.Tensor, w, call(aten.view.default, vec, [-1, 1, *[1] * k]))
        groups, (out, per_group) = self.tag["conv_groups"], self.shape[:2]
        grid = call(aten.expand.default, call(aten.view.default, vec, [groups, 1, per_group]),
                    [groups, out // groups, per_group])
        return call(aten.mul.Tensor, w, call(aten.reshape.default, grid, [out, per_group, *[1] * k]))

    def lora_bias(self, bias: Node) -> Node:
        """HF PEFT's lora_bias merge: b' = b + s·b_B."""
        self.b.anchor = self.site.node
        s = next(iter(self.tag["adapters"].values()))[2]
        scaled = self.b.call(aten.mul.Tensor, self.b.attr(self.tag["bias"]), s)
        return self.b.call(aten.add.Tensor, self.upcast(bias), scaled)

    def ia3_bias(self, bias: Node) -> Node:
        self.b.anchor = self.site.node  # the bias may be read after W's layout ops
        vec = self.b.call(aten.view.default, self.b.attr(self.tag["vector"]), [-1])
        return self.b.call(aten.mul.Tensor, self.upcast(bias), vec)


def _bias(site) -> Node | None:
    args = site.node.args
    if site.form == "addmm":
        return args[0]
    if site.form in ("linear", "conv") and len(args) > 2:
        return args[2]
    return None


def _counter(kind: str, tag: dict) -> str:
    if kind == IA3:
        return "tag-ia3-feedforward" if tag["feedforward"] else "tag-ia3"
    if tag["magnitude"]:
        return "tag-dora"
    return "tag-lora-slices" if next(iter(tag["adapters"].values()))[3] is not None else "tag-lora"


@dataclass(frozen=True)
class _Rewritten:
    """A matmul a merge rule already rewrote (`linear(x, W·l, b·l)`): still the site of an adapter stacked on it."""

    node: Node
    form: str
    weight: str
    out_features: int


_REWRITTEN = {aten.linear.default: "linear", aten.addmm.default: "addmm", aten.conv2d.default: "conv"}


def _rewritten_site(node: Node, tag: dict, table) -> _Rewritten | None:
    form = _REWRITTEN.get(node.target)
    if form is None or "peftc.pass" not in node.meta:
        return None
    todo, seen = [node.args[2 if form == "addmm" else 1]], set()
    while todo:  # W' reads W somewhere among its (parameter-only) inputs
        n = todo.pop()
        if n.op == "get_attr" and n.target == tag["weight"]:
            shape = table[tag["weight"]].tensor.shape
            return _Rewritten(node, form, tag["weight"], shape[1] if tag["weight_in_out"] else shape[0])
        if n not in seen and n.op == "call_function" and "peftc.pass" in n.meta:
            seen.add(n)
            todo.extend(n.all_input_nodes)
    return None


def _site_of(out: Node, kind: str, tag: dict, dying: set[Node], sites: dict, order: dict, table):
    """The matmul the adapter at `out` adapts, when the graph around it is the one its insert pass made."""
    def site(node: Node):
        return sites.get(node) or _rewritten_site(node, tag, table)

    if kind == IA3 and tag["feedforward"]:  # `out` is x·l, read by the site alone
        found = [site(u) for u in out.users] if len(out.users) == 1 else []
    else:  # `out` is y + adapter(x): y, read by the adapter's nodes alone
        found = [site(i) for n in dying for i in n.all_input_nodes if i not in dying]
        found = [s for s in found if s is not None and all(u in dying for u in s.node.users)]
    found = [s for s in found if s is not None and s.weight == tag["weight"]]
    return max(found, key=lambda s: order[s.node]) if found else None  # x may be an earlier read of W


def merge_tagged(gm: GraphModule, scope: Any, pass_name: str) -> int:
    """Merge every tagged adapter whose tensors are all in `scope.adapters`, counting `<pass>.tag-<method>`.

    Repeats until nothing changes: with adapters stacked on one site, one may only be mergeable once another is (IA3
    scaling the input that a LoRA also reads). An adapter whose site cannot be told apart (a layout op of W shared
    with another reader, say) stays as it is; CompiledModel.merge() names it (`unmerged_tags`).
    """
    table, info = scope.ctx.params, scope.ctx.info
    sites = {s.node: s for s in matmul_sites(gm, table, info) + conv_sites(gm, table, info)}
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    hits = 0
    while True:
        before = hits
        for out in list(gm.graph.nodes):
            kind = LORA if LORA in out.meta else IA3 if IA3 in out.meta else None
            if kind is None or out._erased or not all(n in scope.adapters for n in _tensors(kind, out.meta[kind])):
                continue
            hits += _merge_one(gm, scope, pass_name, out, kind, sites, order)
        if hits == before:
            return hits


def _merge_one(gm: GraphModule, scope: Any, pass_name: str, out: Node, kind: str, sites: dict, order: dict) -> int:
    tag = out.meta[kind]
    if tag.get("groups", 1) != 1:  # A reads every input channel: B·A is no grouped kernel (HF PEFT cannot merge it)
        return 0
    dying = adapter_nodes(out, out.meta["peftc.pass"])
    site = _site_of(out, kind, tag, dying, sites, order, scope.ctx.params)
    rewire = site and _weight_leaf(site, dying)
    if not rewire:
        return 0
    reader, leaf = rewire
    bias = _bias(site)
    if kind == LORA and tag.get("bias") and bias is None:  # lora_bias needs a base bias to merge into (as in HF)
        return 0
    m = _Merge(gm, scope.ctx, site, kind, tag, pass_name, anchor=reader)
    w = m.upcast(leaf)
    reader.replace_input_with(leaf, m.done(m.lora(w) if kind == LORA else m.ia3(w), leaf))
    if kind == IA3 and not tag["feedforward"] and bias is not None:
        site.node.replace_input_with(bias, m.done(m.ia3_bias(bias), bias))
    if kind == LORA and tag.get("bias"):
        site.node.replace_input_with(bias, m.done(m.lora_bias(bias), bias))
    if kind == IA3 and tag["feedforward"]:
        x = next(i for n in dying for i in n.all_input_nodes if i not in dying)
        site.node.replace_input_with(out, x)
    else:
        out.replace_all_uses_with(site.node)
    erase_dead(gm, [out, *dying])
    scope.count(f"{pass_name}.{_counter(kind, tag)}")
    return 1


def unmerged_tags(gm: GraphModule, chosen) -> list[str]:
    """Adapter tensors in `chosen` whose tagged adapter is still in the graph (fold-params may have folded a part
    of it, `view(l)`, so reading the get_attrs alone would miss it)."""
    left = []
    for node in gm.graph.nodes:
        for kind in (LORA, IA3):
            if kind in node.meta:
                left += [n for n in _tensors(kind, node.meta[kind]) if n in chosen]
    return left
