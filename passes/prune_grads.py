"""prune-grads: save for backward only what the trainable set's gradients need.

    conv(x, W_frozen)                  ==>  frozen_conv(x, W)        (saves W, not x)
    batch_norm(x, frozen, training=0)  ==>  x * scale + shift         (saves the per-channel scale, not x)
    linear(dropout(x, p), A)           ==>  dropout_linear(x, A, p)   (A trainable: saves x and an RNG state, no mask)
    sdpa(q, k, v, causal bool mask)    ==>  sdpa(q, k, v, is_causal)  (saves no float copy of the mask)
    dropout(x, p)                      ==>  seeded_dropout(x, p)      (saves an RNG state, no mask)
    to(x, dt) ... to(x, dt)            ==>  one to(x, dt)             (several adapters share one copy of x)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch.fx import GraphModule, Node

from peftc.params import ParamTable
from peftc.pipeline import Pass, PassContext, PassResult, register_pass
from peftc.rewrite import NodeBuilder

aten = torch.ops.aten

_CONVS = {aten.conv1d.default: 1, aten.conv2d.default: 2, aten.conv3d.default: 3}
_RANDOM = {aten.dropout.default, aten.native_dropout.default, aten.bernoulli.default, aten.bernoulli.p,
           aten.bernoulli_.float, aten.rand.default, aten.randn.default, aten.rand_like.default,
           aten.randn_like.default, aten.randint.low, aten.randperm.default,
           aten.scaled_dot_product_attention.default}  # SDPA draws when its dropout_p > 0
_CSE_SAFE = {aten.to.dtype, aten._to_copy.default, aten.t.default}


# ---- autograd functions the rewritten graph calls --------------------------------------------------------------

def _dropout_noise(like: torch.Tensor, p: float) -> torch.Tensor:
    # Exactly what aten.dropout draws on CPU: bernoulli(1 - p) laid out like x, scaled by 1 / (1 - p).
    return like.bernoulli_(1 - p).div_(1 - p)


class _Draw:
    """One dropout draw, kept as the RNG state before it plus the noise tensor's layout, never as the mask."""

    def __init__(self, x: torch.Tensor, p: float):
        self.p = p
        self.state = torch.cuda.get_rng_state(x.device) if x.device.type == "cuda" else torch.get_rng_state()
        self.noise = _dropout_noise(torch.empty_like(x), p)
        self.layout = (self.noise.shape, self.noise.stride(), self.noise.dtype, self.noise.device)

    def forget(self) -> torch.Tensor:
        noise, self.noise = self.noise, None
        return noise

    def replay(self) -> torch.Tensor:
        """The same noise again; the caller's RNG stream is left where it was."""
        shape, stride, dtype, device = self.layout
        cuda = device.type == "cuda"
        with torch.random.fork_rng(devices=[device] if cuda else []):
            if cuda:
                torch.cuda.set_rng_state(self.state, device)
            else:
                torch.set_rng_state(self.state)
            return _dropout_noise(torch.empty_strided(shape, stride, dtype=dtype, device=device), self.p)


class _SeededDropout(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, p):
        ctx.draw = _Draw(x, p)
        return x * ctx.draw.forget()

    @staticmethod
    def backward(ctx, grad):
        return grad * ctx.draw.replay(), None


class _DropoutLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, p):
        ctx.draw = _Draw(x, p)
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        return F.linear(x * ctx.draw.forget(), weight, bias)

    @staticmethod
    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        noise = ctx.draw.replay()
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = grad.matmul(weight) * noise
        if ctx.needs_input_grad[1]:
            dropped = (x * noise).reshape(-1, x.shape[-1])
            grad_w = grad.reshape(-1, grad.shape[-1]).t().mm(dropped)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_b = grad.reshape(-1, grad.shape[-1]).sum(0)
        return grad_x, grad_w, grad_b, None


class _FrozenConv(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, stride, padding, dilation, groups):
        ctx.conf = (stride, padding, dilation, groups)
        ctx.x_shape = x.shape
        ctx.save_for_backward(weight)
        return aten.convolution(x, weight, bias, stride, padding, dilation, False, [0] * len(stride), groups)

    @staticmethod
    def backward(ctx, grad):
        (weight,) = ctx.saved_tensors
        stride, padding, dilation, groups = ctx.conf
        # The input gradient needs only the input's shape: an expanded 1-element stub stands in for x.
        stub = grad.new_empty(1).expand(ctx.x_shape)
        grad_x = aten.convolution_backward(grad, stub, weight, None, stride, padding, dilation, False,
                                           [0] * len(stride), groups, (True, False, False))[0]
        return grad_x, None, None, None, None, None, None


def seeded_dropout(x: torch.Tensor, p: float) -> torch.Tensor:
    """dropout(x, p) that stores the RNG state instead of the mask and replays it in backward."""
    return _SeededDropout.apply(x, p)


def dropout_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, p: float) -> torch.Tensor:
    """linear(dropout(x, p), weight, bias) that stores x (shared with other readers) instead of the dropped copy
    and the mask."""
    return _DropoutLinear.apply(x, weight, bias, p)


def frozen_conv(x, weight, bias, stride, padding, dilation, groups):
    """conv(x, weight, bias) for a frozen weight and bias: backward computes only the input gradient."""
    return _FrozenConv.apply(x, weight, bias, stride, padding, dilation, groups)


def mask_is_causal(mask: torch.Tensor) -> bool:
    """True when a boolean attention mask is exactly the square lower-triangular (top-left aligned) causal mask."""
    if mask.dtype != torch.bool or mask.dim() < 2 or mask.shape[-1] != mask.shape[-2]:
        return False
    n = mask.shape[-1]
    return bool((mask == torch.ones(n, n, dtype=torch.bool, device=mask.device).tril_()).all())


def causal_sdpa(q, k, v, mask, causal: bool, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
    """SDPA that drops a mask known to be causal for `is_causal=True`: the kernel then saves no mask for backward
    (with a boolean mask it saves a float copy per call) and skips the masked blocks."""
    if causal and q.shape[-2] == k.shape[-2]:
        mask, is_causal = None, True
    return aten.scaled_dot_product_attention.default(q, k, v, mask, dropout_p, is_causal, scale=scale,
                                                     enable_gqa=enable_gqa)


# ---- analysis ----------------------------------------------------------------------------------------------------

def grad_nodes(gm: GraphModule, table: ParamTable) -> set[Node]:
    """The nodes whose value depends on a trainable tensor: gradients flow through these and nowhere else.

    Inputs are data; the region below the lowest adapter reads no trainable tensor, so autograd records nothing there.
    """
    out: set[Node] = set()
    for node in gm.graph.nodes:
        if node.op == "get_attr":
            if node.target in table and table[node.target].trainable:
                out.add(node)
        elif any(a in out for a in node.all_input_nodes):
            out.add(node)
    return out


def _frozen_attr(node, table: ParamTable) -> bool:
    return node is None or (isinstance(node, Node) and node.op == "get_attr" and node.target in table
                            and not table[node.target].trainable)


def _ntuple(value, n: int) -> list[int]:
    return list(value) * n if len(value) == 1 else list(value)


@register_pass
@dataclass(frozen=True)
class PruneGrads(Pass):
    """prune-grads: frozen conv / eval batch_norm / dropout  ==>  forms that save only what trainable grads need.

    Gradients of the trainable tensors are unchanged (to rounding: batch_norm becomes x·scale + shift, the same
    affine map the CPU kernel applies). Dropout masks are replayed from the RNG state in backward, the very masks
    `aten.dropout` draws on CPU, so forward values are bit-identical.
    """

    name: ClassVar[str] = "prune-grads"
    stage: ClassVar[str] = "training"

    def run(self, gm: GraphModule, ctx: PassContext) -> PassResult:
        table = ctx.params
        modified = self._share_casts(gm, ctx)
        for node in list(gm.graph.nodes):
            if node.op != "call_function" or node.target not in (*_CONVS, aten.batch_norm.default,
                                                                  aten.dropout.default,
                                                                  aten.scaled_dot_product_attention.default):
                continue
            # Recomputed per candidate: a rewrite replaces nodes that later candidates read.
            grads = grad_nodes(gm, table)
            if node.target in _CONVS and node.args[0] in grads:
                modified |= self._conv(gm, ctx, node)
            elif node.target == aten.batch_norm.default and node.args[0] in grads:
                modified |= self._batch_norm(gm, ctx, node)
            elif node.target == aten.dropout.default:
                modified |= self._dropout(gm, ctx, node, grads)
            elif node.target == aten.scaled_dot_product_attention.default and any(a in grads for a in node.args[:3]):
                modified |= self._sdpa(gm, ctx, node, grads)
        return PassResult(gm, modified)

    def _replace(self, old: Node, new: Node) -> None:
        new.meta.update({k: v for k, v in old.meta.items() if k in ("val", "tensor_meta", "nn_module_stack")})
        old.replace_all_uses_with(new)
        old.graph.erase_node(old)

    def _conv(self, gm: GraphModule, ctx: PassContext, node: Node) -> bool:
        n = _CONVS[node.target]
        x, w, b, stride, padding, dilation, groups = (*node.args, *[None] * 7)[:7]
        if isinstance(padding, str) or not (_frozen_attr(w, ctx.params) and _frozen_attr(b, ctx.params)):
            return False
        stride, dilation = _ntuple(stride or [1], n), _ntuple(dilation or [1], n)
        padding = _ntuple(padding or [0], n)
        nb = NodeBuilder(gm, node, self.name, "frozen-conv", like=node)
        self._replace(node, nb.call(frozen_conv, x, w, b, stride, padding, dilation, groups or 1))
        ctx.count("prune-grads.frozen-conv")
        return True

    def _batch_norm(self, gm: GraphModule, ctx: PassContext, node: Node) -> bool:
        x, w, b, mean, var, training, _momentum, eps = node.args[:8]
        if training or mean is None or var is None or \
                not all(_frozen_attr(t, ctx.params) for t in (w, b, mean, var)):
            return False
        val = node.meta.get("val")  # the output has x's shape; x may be a node a pass made, without "val"
        if not isinstance(val, torch.Tensor):
            return False
        rank = val.dim()
        shape = [-1] + [1] * (rank - 2)
        nb = NodeBuilder(gm, node, self.name, "frozen-batch-norm", like=node)
        scale = nb.call(aten.rsqrt.default, nb.call(aten.add.Tensor, var, eps))
        if w is not None:
            scale = nb.call(aten.mul.Tensor, scale, w)
        shift = nb.call(aten.neg.default, nb.call(aten.mul.Tensor, mean, scale))
        if b is not None:
            shift = nb.call(aten.add.Tensor, shift, b)
        y = nb.call(aten.mul.Tensor, x, nb.call(aten.view.default, scale, shape))
        self._replace(node, nb.call(aten.add.Tensor, y, nb.call(aten.view.default, shift, shape)))
        ctx.count("prune-grads.frozen-batch-norm")
        return True

    def _dropout(self, gm: GraphModule, ctx: PassContext, node: Node, grads: set[Node]) -> bool:
        x, p, train = node.args
        if not train or p == 0:
            return False
        users = list(node.users)
        user = users[0] if len(users) == 1 else None
        w, b = (*user.args[1:], None)[:2] if user is not None else (None, None)
        # Fused only where the linear's weight is trainable and so needs its (dropped) input for backward: a
        # frozen linear saves nothing of its input, and seeded_dropout keeps only an RNG state.
        if user is not None and user.target == aten.linear.default and user.args[0] is node \
                and node not in user.args[1:] and not (_frozen_attr(w, ctx.params) and _frozen_attr(b, ctx.params)) \
                and not self._random_between(node, user):
            nb = NodeBuilder(gm, user, self.name, "seeded-dropout", like=node)
            self._replace(user, nb.call(dropout_linear, x, w, b, p))
            gm.graph.erase_node(node)
            ctx.count("prune-grads.dropout-linear")
            return True
        if x in grads:  # otherwise autograd records nothing for this dropout anyway
            nb = NodeBuilder(gm, node, self.name, "seeded-dropout", like=node)
            self._replace(node, nb.call(seeded_dropout, x, p))
            ctx.count("prune-grads.seeded-dropout")
            return True
        return False

    def _sdpa(self, gm: GraphModule, ctx: PassContext, node: Node, grads: set[Node]) -> bool:
        names = ("q", "k", "v", "attn_mask", "dropout_p", "is_causal")
        bound = {**dict(zip(names, node.args)), **node.kwargs}
        mask = bound.get("attn_mask")
        val = mask.meta.get("val") if isinstance(mask, Node) else None
        if val is None or val.dtype != torch.bool or mask in grads or bound.get("is_causal"):
            return False
        # One check per mask per call, shared by every attention layer that reads it.
        flag = next((u for u in mask.users if u.target is mask_is_causal), None)
        if flag is None:
            flag = NodeBuilder(gm, mask.next, self.name, "causal-mask").call(mask_is_causal, mask)
        nb = NodeBuilder(gm, node, self.name, "causal-mask", like=node)
        new = nb.call(causal_sdpa, *node.args[:3], mask, flag, bound.get("dropout_p", 0.0), False)
        new.kwargs = {k: v for k, v in node.kwargs.items() if k in ("scale", "enable_gqa")}
        self._replace(node, new)
        ctx.count("prune-grads.causal-sdpa")
        return True

    @staticmethod
    def _random_between(first: Node, last: Node) -> bool:
        """Moving `first`'s draw to `last` would reorder the RNG stream if a random op runs in between."""
        node = first.next
        while node is not last:
            if node.op == "call_function" and (node.target in _RANDOM or node.target in (seeded_dropout,
                                                                                       dropout_linear,
                                                                                       causal_sdpa)):
                return True
            node = node.next
        return False

    def _share_casts(self, gm: GraphModule, ctx: PassContext) -> bool:
        """Adapters that read the same x each cast it; one cast means one stored copy."""
        seen: dict[tuple, Node] = {}
        modified = False
        for node in list(gm.graph.nodes):
            if node.op != "call_function" or node.target not in _CSE_SAFE or "peftc.pass" not in node.meta:
                continue
            key = (node.target, node.args, tuple(sorted(node.kwargs.items())))
            first = seen.setdefault(key, node)
            if first is not node:
                node.replace_all_uses_with(first)
                gm.graph.erase_node(node)
                ctx.count("prune-grads.shared-cast")
                modified = True
        return modified
