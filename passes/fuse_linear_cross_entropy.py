"""fuse-linear-cross-entropy: cross_entropy(rowwise(linear(h, W)), t)  ==>  chunked_cross_entropy(h, t, W, ...)

In a training graph, the projection to the output vocabulary and the row-wise ops between it and a cross-entropy
loss (casts, scaling, soft-capping `tanh(x / c) * c`, a bias, LoRA on the head, the `view(-1, V)` flattening) are
moved into a sub-GraphModule that the fused op runs over chunks of tokens. Because the loss is a scalar, each
chunk's gradients w.r.t. the hidden states and every trainable tensor the subgraph reads are computed right away,
inside forward, and only those are kept; backward scales them by the incoming gradient. No [tokens, vocab] tensor
outlives its chunk, and nothing is computed twice: the FLOPs are the unfused step's.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch._guards import detect_fake_mode
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.autograd.function import once_differentiable
from torch.fx import Graph, GraphModule, Node
from torch.fx.experimental.symbolic_shapes import statically_known_true
from torch.fx.node import map_arg

from peftc.errors import PeftcError, SpecError
from peftc.params import get_attr_path
from peftc.pipeline import Pass, PassContext, PassResult, register_pass
from peftc.rewrite import NodeBuilder

aten = torch.ops.aten
NAME = "fuse-linear-cross-entropy"

# Bytes one chunk's rows may take: fp32 logits plus hidden states. The floor keeps each chunk's matmul large enough
# to run at full speed.
CHUNK_BYTES = 2 * 2**20
MIN_CHUNK_TOKENS = 64

_MATMULS = {  # op: (activation operand index, weight operand index)
    aten.linear.default: (0, 1), aten.addmm.default: (1, 2), aten.mm.default: (0, 1), aten.matmul.default: (0, 1)}
# Ops that only regroup the leading (token) dims or alias: the identity on [tokens, last] rows.
_ROW_VIEWS = {aten.view.default, aten.reshape.default, aten._unsafe_view.default, aten.alias.default,
              aten.contiguous.default, aten.clone.default, aten.flatten.using_ints}
_CASTS = {aten.to.dtype, aten.to.dtype_layout, aten._to_copy.default, aten.type_as.default}
_IGNORED_USERS = {aten._assert_tensor_metadata.default}
_MEAN, _SUM = 1, 2  # at::Reduction
_CE_ARGS = ("self", "target", "weight", "reduction", "ignore_index", "label_smoothing")
_CE_DEFAULTS = {"weight": None, "reduction": _MEAN, "ignore_index": -100, "label_smoothing": 0.0}


def default_chunk_tokens(vocab: int, hidden: int) -> int:
    """Tokens per chunk: as many as fit CHUNK_BYTES of fp32 logits and hidden rows, a multiple of 8, at least 64."""
    tokens = CHUNK_BYTES // (4 * (vocab + hidden)) // 8 * 8
    return max(MIN_CHUNK_TOKENS, tokens)


# ---- what the fused graph returns instead of the logits --------------------------------------------------------

def _not_computed_message(what: str) -> str:
    return (f"`{what}` is not computed in this training graph: {NAME} computes the loss in chunks of tokens and "
            f"never materializes the full [tokens, vocab] logits. Compile with peftc.compile(..., fuse_loss=False) "
            f"to get them (at the memory cost of the full logits), or call the model in eval mode or without labels")


class NotComputed:
    """Stands in for an output the fused graph does not compute; any use raises PeftcError naming the opt-out."""

    __slots__ = ("_what",)

    def __init__(self, what: str):
        object.__setattr__(self, "_what", what)

    def _fail(self, *args: Any, **kwargs: Any):
        raise PeftcError(_not_computed_message(object.__getattribute__(self, "_what")))

    def __getattr__(self, name: str):
        if name.startswith("__") and name.endswith("__"):  # protocol probes (copy, pickle) see a plain object
            raise AttributeError(name)
        self._fail()

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        what = next(a for a in (*args, *(kwargs or {}).values()) if isinstance(a, NotComputed))
        what._fail()

    def __repr__(self) -> str:
        return f"<{object.__getattribute__(self, '_what')} not computed by {NAME}; fuse_loss=False computes it>"


for _dunder in ("__getitem__", "__setitem__", "__iter__", "__len__", "__bool__", "__float__", "__int__",
                "__index__", "__array__", "__neg__", "__abs__", "__add__", "__radd__", "__sub__", "__rsub__",
                "__mul__", "__rmul__", "__truediv__", "__rtruediv__", "__matmul__", "__rmatmul__", "__pow__",
                "__lt__", "__le__", "__gt__", "__ge__", "__contains__"):
    setattr(NotComputed, _dunder, NotComputed._fail)


def not_computed(what: str) -> NotComputed:
    return NotComputed(what)


# ---- the fused op ----------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class _Loss:
    chunk: GraphModule  # rows[n, *] chunks and the externals ==> logits rows [n, V]
    n_rows: int
    reduction: int
    ignore_index: int
    label_smoothing: float
    chunk_tokens: int
    grad_enabled: bool


class _ChunkedCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, loss: _Loss, target, weight, *inputs):
        rows = [r.reshape(-1, r.shape[-1]) for r in inputs[:loss.n_rows]]
        externals = inputs[loss.n_rows:]
        n = target.numel()
        target = target.reshape(-1)
        if any(r.shape[0] != n for r in rows):
            raise PeftcError(f"{NAME}: the loss has {n} targets but the rows it reads have "
                             f"{[r.shape[0] for r in rows]} tokens")
        need_rows = [loss.grad_enabled and r.requires_grad for r in rows]
        need_ext = [loss.grad_enabled and isinstance(e, torch.Tensor) and e.requires_grad for e in externals]
        # Leaves to differentiate each chunk against: the gradients are what this op keeps, not the inputs.
        ext_leaves = [e.detach().requires_grad_() if need else e for e, need in zip(externals, need_ext)]
        grad_rows = [torch.empty_like(r) if need else None for r, need in zip(rows, need_rows)]
        # Weight gradients summed over chunks in fp32, rounded once, as one unchunked matmul would.
        grad_ext = [torch.zeros_like(e, dtype=torch.float32) if need else None for e, need in zip(externals, need_ext)]
        denom = _denominator(target, weight, loss) if loss.reduction == _MEAN else None
        total = torch.zeros((), dtype=torch.float32, device=target.device)
        out_dtype = None
        for start in range(0, n, loss.chunk_tokens):
            end = min(start + loss.chunk_tokens, n)
            with torch.enable_grad():
                row_leaves = [r[start:end].detach().requires_grad_(need) for r, need in zip(rows, need_rows)]
                # forward, not __call__: module hooks (FlopCounterMode's tracker) would hook these leaves, and
                # autograd.grad refuses hooks on leaves.
                logits = loss.chunk.forward(*row_leaves, *ext_leaves)
                out_dtype = logits.dtype
                part = aten.cross_entropy_loss.default(logits, target[start:end], weight, _SUM, loss.ignore_index,
                                                       loss.label_smoothing)
                wanted = [x for x, need in zip(row_leaves, need_rows) if need] + \
                         [x for x, need in zip(ext_leaves, need_ext) if need]
                if wanted:
                    # Scaled like the unfused mean before differentiating, so the chunk's logit gradient rounds
                    # as the unfused one does.
                    grads = iter(torch.autograd.grad(part if denom is None else part / denom, wanted,
                                                     allow_unused=True))
            total += part.detach().float()
            del logits, part
            if wanted:
                for i, need in enumerate(need_rows):
                    if need:
                        g = next(grads)
                        grad_rows[i][start:end] = 0 if g is None else g
                for i, need in enumerate(need_ext):
                    if need:
                        g = next(grads)
                        if g is not None:
                            grad_ext[i] += g
        ctx.shapes = [r.shape for r in inputs[:loss.n_rows]]
        ctx.grad_rows = grad_rows
        ctx.grad_ext = [None if g is None else g.to(e.dtype) for g, e in zip(grad_ext, externals)]
        result = total if denom is None else total / denom
        return result.to(out_dtype or torch.float32)

    @staticmethod
    @once_differentiable  # the kept gradients are constants of this backward: no second derivatives through it
    def backward(ctx, grad):
        rows = [None if g is None else (g * grad).reshape(shape) for g, shape in zip(ctx.grad_rows, ctx.shapes)]
        ext = [None if g is None else g * grad for g in ctx.grad_ext]
        ctx.grad_rows = ctx.grad_ext = None
        return None, None, None, *rows, *ext


def _denominator(target: torch.Tensor, weight: torch.Tensor | None, loss: _Loss) -> torch.Tensor:
    """What the unfused mean divides by: the count (or total class weight) of the targets not ignored."""
    kept = target != loss.ignore_index
    if weight is None:
        return kept.sum()
    return (weight.gather(0, target.masked_fill(~kept, 0)) * kept).sum()


def chunked_cross_entropy(chunk: GraphModule, target: torch.Tensor, rows: tuple, externals: tuple,
                          weight: torch.Tensor | None, reduction: int, ignore_index: int, label_smoothing: float,
                          chunk_tokens: int) -> torch.Tensor:
    """cross_entropy(chunk(rows, externals), target) over chunks of `chunk_tokens` tokens, gradients kept."""
    loss = _Loss(chunk, len(rows), reduction, ignore_index, label_smoothing, chunk_tokens, torch.is_grad_enabled())
    return _ChunkedCrossEntropy.apply(loss, target, weight, *rows, *externals)


# ---- matching --------------------------------------------------------------------------------------------------

class _Decline(Exception):
    """The loss stays unfused; the message says why (cm.report() shows it)."""


@dataclass
class _Match:
    ce: Node
    target: Node
    weight: Any
    reduction: int
    ignore_index: int
    label_smoothing: float
    region: list[Node]  # graph order; the last is the logits the loss reads
    rows: list[Node]
    externals: list[Node]
    vocab: int
    hidden: int


class _Shapes:
    """Shapes of nodes: export's `val`, or for a node a pass made, its value evaluated on fake tensors from its
    inputs' (in export's own fake mode, so symbolic batch and sequence sizes stay symbolic)."""

    def __init__(self, gm: GraphModule):
        self.gm = gm
        vals = [n.meta["val"] for n in gm.graph.nodes if isinstance(n.meta.get("val"), torch.Tensor)]
        self.mode = detect_fake_mode(vals) or FakeTensorMode()
        self.values: dict[Node, Any] = {}
        self.params: dict[Node, bool] = {}

    def param_only(self, node: Any) -> bool:
        """Depends on no graph input: a weight, or a weight computed from weights (W + delta, t(W))."""
        if not isinstance(node, Node):
            return True
        if node not in self.params:
            self.params[node] = node.op == "get_attr" or (
                node.op == "call_function" and all(self.param_only(a) for a in node.all_input_nodes))
        return self.params[node]

    def value(self, node: Any):
        if not isinstance(node, Node):
            return node
        if node not in self.values:
            val = node.meta.get("val")
            if val is None and node.op == "get_attr":
                real = get_attr_path(self.gm, node.target)
                val = self.mode.from_tensor(real) if isinstance(real, torch.Tensor) else None
            elif val is None and node.op == "call_function":
                try:
                    args = map_arg(node.args, self.value)
                    kwargs = map_arg(node.kwargs, self.value)
                    with self.mode:
                        val = node.target(*args, **kwargs)
                except Exception:  # an input without a value, or an op fake tensors cannot run: shape unknown
                    val = None
            self.values[node] = val
        return self.values[node]

    def shape(self, node: Node) -> tuple | None:
        val = self.value(node)
        return tuple(val.shape) if isinstance(val, torch.Tensor) else None


def _same(a, b) -> bool:
    return statically_known_true(a == b) if isinstance(a, torch.SymInt) or isinstance(b, torch.SymInt) else a == b


def _rows_of(shape: tuple):
    return math.prod(shape[:-1]) if shape else 1


def _kind(node: Node) -> str | None:
    if node.op != "call_function":
        return None
    target = node.target
    if target in _MATMULS:
        return "matmul"
    if target in _ROW_VIEWS:
        return "view"
    if target in _CASTS:
        return "pointwise"
    if isinstance(target, torch._ops.OpOverload) and torch.Tag.pointwise in target.tags \
            and torch.Tag.nondeterministic_seeded not in target.tags and not target._schema.is_mutable:
        return "pointwise"
    return None


def _outside_users(node: Node, region: set[Node], ce: Node) -> list[Node]:
    return [u for u in node.users
            if u not in region and u is not ce and u.op != "output" and u.target not in _IGNORED_USERS]


def match_loss(gm: GraphModule, ce: Node, shapes: _Shapes) -> _Match:
    """The region of row-wise ops from the vocabulary projection(s) up to `ce`'s input, or _Decline."""
    bound = {**_CE_DEFAULTS, **dict(zip(_CE_ARGS, ce.args)), **ce.kwargs}
    logits, target = bound["self"], bound["target"]
    if bound["reduction"] not in (_MEAN, _SUM):
        raise _Decline(f"`{ce.name}` returns one loss per token (reduction='none'); only 'mean' and 'sum' are fused")
    lval, tval = shapes.value(logits), shapes.value(target)
    if not isinstance(lval, torch.Tensor) or lval.dim() != 2 or not isinstance(tval, torch.Tensor) \
            or tval.dim() != 1 or tval.is_floating_point():
        raise _Decline(f"`{ce.name}` does not read [tokens, classes] logits and [tokens] class indices")
    n_tokens, vocab = lval.shape
    if not isinstance(vocab, int):
        raise _Decline(f"the number of classes of `{ce.name}` is not static")
    if isinstance(bound["weight"], Node) and not shapes.param_only(bound["weight"]):
        raise _Decline(f"the class weights of `{ce.name}` are computed from the inputs")

    # Grow the region upward from the logits through row-wise ops whose every user is in the region (or the
    # output, which gets a placeholder); a node read elsewhere is evicted and the walk starts again.
    evicted: dict[Node, list[Node]] = {}
    while True:
        region, rows, externals = _walk(logits, evicted, shapes)
        leaks = {n: _outside_users(n, region, ce) for n in region}
        leaks = {n: users for n, users in leaks.items() if users}
        if not leaks:
            break
        evicted.update(leaks)

    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    full = [r for r in rows if _last(shapes, r) == vocab]
    if full or logits not in region:
        at = full[0] if full else logits
        if at in evicted:
            readers = ", ".join(f"`{u.name}`" for u in evicted[at])
            raise _Decline(f"the logits `{at.name}` also feed {readers}, not only the loss `{ce.name}`")
        raise _Decline(f"the logits `{at.name}` come from `{at.target}`, which is neither a projection nor a "
                       f"row-wise op the pass can chunk")
    projections = [n for n in region if n.target in _MATMULS]
    if not projections:
        raise _Decline(f"no projection feeds the loss `{ce.name}` through row-wise ops")
    hidden = max(_weight_in(shapes, n) for n in projections)
    if vocab <= hidden:
        raise _Decline(f"the output dimension ({vocab}) is not larger than the hidden size ({hidden}), as in a "
                       f"classification head: the logits are no bigger than the hidden states, nothing to gain")
    for n in region:
        shape = shapes.shape(n)
        if shape is not None and not _same(_rows_of(shape), n_tokens):
            raise _Decline(f"`{n.name}` between the projection and the loss does not keep one row per token")
    return _Match(ce, target, bound["weight"], bound["reduction"], bound["ignore_index"], bound["label_smoothing"],
                  sorted(region, key=order.__getitem__), sorted(rows, key=order.__getitem__),
                  sorted(externals, key=order.__getitem__), vocab, hidden)


def _last(shapes: _Shapes, node: Node):
    shape = shapes.shape(node)
    return shape[-1] if shape else None


def _weight_in(shapes: _Shapes, matmul: Node) -> int:
    w = matmul.args[_MATMULS[matmul.target][1]]
    shape = shapes.shape(w)
    if shape is None or len(shape) != 2:
        raise _Decline(f"the weight of `{matmul.name}` is not a 2-d tensor")
    return shape[1] if matmul.target == aten.linear.default else shape[0]


def _walk(logits: Node, evicted: dict, shapes: _Shapes) -> tuple[set[Node], list[Node], list[Node]]:
    region: set[Node] = set()
    rows: list[Node] = []
    externals: list[Node] = []

    def boundary(node: Node, as_row: bool) -> None:
        target = rows if as_row else externals
        if node not in rows and node not in externals:
            target.append(node)

    stack = [logits]
    while stack:
        node = stack.pop()
        if node in region:
            continue
        kind = _kind(node)
        if kind is None or node in evicted:
            boundary(node, True)
            continue
        region.add(node)
        if kind == "matmul":
            x_at, w_at = _MATMULS[node.target]
            for i, a in enumerate(node.args):
                if not isinstance(a, Node):
                    continue
                if i == x_at:
                    boundary(a, True)  # the hidden states: chunked, never walked into
                elif shapes.param_only(a):
                    boundary(a, False)
                else:
                    raise _Decline(f"`{node.name}` multiplies two activations; only a weight projection is fused")
            continue
        if kind == "view":
            src = node.args[0]
            if _last(shapes, src) is None or _last(shapes, node) is None or \
                    not _same(_last(shapes, src), _last(shapes, node)):
                raise _Decline(f"`{node.name}` reshapes the last dim of the logits")
            stack.append(src)
            continue
        here = shapes.shape(node)
        for a in node.all_input_nodes:
            if _kind(a) is not None and a not in evicted and _row_like(shapes, a, here):
                stack.append(a)
            elif _broadcast(shapes, a):
                boundary(a, False)
            elif _row_like(shapes, a, here):
                boundary(a, True)
            else:
                raise _Decline(f"`{node.name}` reads `{a.name}`, which is neither one row per token nor "
                               f"broadcast over the tokens")
    return region, rows, externals


def _broadcast(shapes: _Shapes, node: Node) -> bool:
    """A value that broadcasts over every token: a scalar, a SymInt, a 1-d tensor or one whose leading dims are 1."""
    val = shapes.value(node)
    if isinstance(val, (int, float, bool, torch.SymInt, torch.SymFloat, torch.SymBool)):
        return True
    shape = shapes.shape(node)
    return shape is not None and (len(shape) <= 1 or all(_same(d, 1) for d in shape[:-1]))


def _row_like(shapes: _Shapes, node: Node, like: tuple | None) -> bool:
    """One row per token, laid out like `like` (the op's output) in every dim but the last."""
    shape = shapes.shape(node)
    if shape is None or like is None or len(shape) != len(like) or len(shape) < 2:
        return False
    return all(_same(a, b) for a, b in zip(shape[:-1], like[:-1]))


# ---- rewriting -------------------------------------------------------------------------------------------------

def _chunk_module(m: _Match, shapes: _Shapes) -> GraphModule:
    """The region as a graph over rows: placeholders are [n, *] chunks of the row inputs, then the externals."""
    sub = Graph()
    env: dict[Node, Node] = {}
    region = set(m.region)
    for r in m.rows:
        env[r] = sub.placeholder(r.name)
    for e in m.externals:
        ph = sub.placeholder(e.name)
        shape = shapes.shape(e)
        if shape is not None and len(shape) >= 2 and all(_same(d, 1) for d in shape[:-1]) and \
                not any(u.target in _MATMULS for u in e.users if u in region):
            ph = sub.call_function(aten.reshape.default, (ph, [-1]))  # [1, 1, V] broadcasts against [n, V] as [V]
        env[e] = ph
    for node in m.region:
        if _kind(node) == "view":
            env[node] = env[node.args[0]]
        else:
            env[node] = sub.node_copy(node, lambda a: env[a])
    sub.output(env[m.region[-1]])
    return GraphModule(torch.nn.Module(), sub, class_name="ChunkedLogits")


@register_pass
@dataclass(frozen=True)
class FuseLinearCrossEntropy(Pass):
    """fuse-linear-cross-entropy: cross_entropy(rowwise(linear(h, W)), t)  ==>  chunked_cross_entropy(h, t, W).

    Training graphs only. The loss equals the unfused one to rounding (a chunked sum); gradients too. `logits` in
    the output become a placeholder whose use raises PeftcError (peftc.compile(..., fuse_loss=False) keeps them).
    `chunk_tokens` overrides the tokens per chunk (default: `default_chunk_tokens(vocab, hidden)`). The pass
    declines, with a note in cm.report(), when the logits feed anything but the loss and the output, or when the
    output dimension is not larger than the hidden size (classification heads).
    """

    name: ClassVar[str] = NAME
    stage: ClassVar[str] = "training"
    chunk_tokens: int | None = None

    def __post_init__(self):
        if self.chunk_tokens is not None and (isinstance(self.chunk_tokens, bool)
                                              or not isinstance(self.chunk_tokens, int) or self.chunk_tokens < 1):
            raise SpecError(f"{NAME}: chunk_tokens must be a positive integer, got {self.chunk_tokens!r}")

    def run(self, gm: GraphModule, ctx: PassContext) -> PassResult:
        if not ctx.training:
            return PassResult(gm, False)
        losses = [n for n in gm.graph.nodes if n.op == "call_function" and n.target == aten.cross_entropy_loss.default]
        if not losses:
            if not any(n.target is chunked_cross_entropy for n in gm.graph.nodes):
                ctx.note("no cross-entropy loss in this graph (called without labels?): nothing to fuse")
            return PassResult(gm, False)
        shapes = _Shapes(gm)
        modified = False
        for ce in losses:
            try:
                m = match_loss(gm, ce, shapes)
            except _Decline as why:
                ctx.note(f"declined: {why}")
                ctx.count(f"{NAME}.declined")
                continue
            self._rewrite(gm, ctx, m, shapes)
            modified = True
        return PassResult(gm, modified)

    def _rewrite(self, gm: GraphModule, ctx: PassContext, m: _Match, shapes: _Shapes) -> None:
        chunk_tokens = self.chunk_tokens or default_chunk_tokens(m.vocab, m.hidden)
        index = sum(1 for name, _ in gm.named_children() if name.startswith("peftc_chunked_logits"))
        qualname = f"peftc_chunked_logits_{index}"
        gm.add_submodule(qualname, _chunk_module(m, shapes))
        nb = NodeBuilder(gm, m.ce, self.name, "chunked-loss", like=m.ce)
        fused = nb.call(chunked_cross_entropy, nb.attr(qualname), m.target, tuple(m.rows), tuple(m.externals),
                        m.weight, m.reduction, m.ignore_index, m.label_smoothing, chunk_tokens,
                        name=f"{m.ce.name}_chunked")
        fused.meta.update({k: v for k, v in m.ce.meta.items() if k in ("val", "tensor_meta")})
        m.ce.replace_all_uses_with(fused)
        gm.graph.erase_node(m.ce)

        output = next(n for n in gm.graph.nodes if n.op == "output")
        returned = [n for n in m.region if n in output.all_input_nodes]
        if returned:
            stub = NodeBuilder(gm, output, self.name, "logits-not-computed").call(
                not_computed, "logits", name="logits_not_computed")
            for n in returned:
                output.replace_input_with(n, stub)
            ctx.note(f"fused `{m.region[-1].name}` into chunks of {chunk_tokens} tokens: the output's `logits` "
                     f"are not computed (reading them raises PeftcError; peftc.compile(..., fuse_loss=False) keeps "
                     f"them)")
        else:
            ctx.note(f"fused `{m.region[-1].name}` into chunks of {chunk_tokens} tokens")
        for node in reversed(m.region):
            for user in list(node.users):
                if user.target in _IGNORED_USERS:
                    gm.graph.erase_node(user)
            gm.graph.erase_node(node)
        ctx.count(f"{NAME}.fused")
