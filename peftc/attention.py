"""Attention matching: find every attention in a captured graph, in the two forms capture produces.

- `sdpa`: `aten.scaled_dot_product_attention(q, k, v, attn_mask=..., is_causal=..., enable_gqa=...)`, what
  transformers' default attention and `F.scaled_dot_product_attention` in user code become.
- `softmax`: the written-out form `softmax(q @ k^T · scale + mask) @ v` (transformers' eager attention, BERT/GPT-2
  `attn_implementation="eager"`, hand-written modules). Between the scores matmul and the softmax we accept
  scalar scaling (`mul`/`div` by a number or a 0-d tensor), dtype casts, and masking (`add` of a mask,
  `where`, `masked_fill`); between the softmax and the value matmul, casts and dropout.

Queries are `[batch, heads, Lq, head_dim]` (or `[batch, L, dim]`, read as one head). Grouped-query attention is
recognised both ways: SDPA's `enable_gqa=True` (K/V carry fewer heads), and K/V repeated up to the query heads
before the op (`repeat_kv`: unsqueeze/expand/reshape, or `repeat_interleave`); `kv_heads` is the head count before
the repeat, and query head h reads KV head h // (heads // kv_heads) in both. A K/V tiled with `repeat` is not seen
through: such a site reports kv_heads == heads.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass
from typing import Iterable

import torch
from torch.fx import GraphModule, Node

from .errors import SpecError
from .match import _matches
from .spec import Target

aten = torch.ops.aten

_SOFTMAX = {aten.softmax.int, aten._softmax.default}
_MATMUL = {aten.matmul.default, aten.bmm.default}
_CASTS = {aten.to.dtype, aten.to.dtype_layout, aten._to_copy.default, aten.type_as.default, aten.alias.default,
          aten.clone.default, aten.contiguous.default}
_SCALES = {aten.mul.Tensor, aten.div.Tensor, aten.mul.Scalar, aten.div.Scalar}
# Ops a repeat_kv is built from: walking back through them from K/V finds the tensor before the repeat.
_REPEATS = {aten.slice.Tensor, aten.unsqueeze.default, aten.expand.default, aten.reshape.default, aten.view.default,
            aten._unsafe_view.default, aten.clone.default, aten.contiguous.default, aten.alias.default,
            aten.repeat_interleave.self_int}
_IGNORED_USERS = {aten._assert_tensor_metadata.default}


@dataclass(frozen=True)
class AttentionSite:
    node: Node  # the SDPA node, or the softmax node of the written-out form
    form: str  # sdpa | softmax
    module: str  # the module path the attention ran in (adapters are named after it)
    q: Node
    k: Node  # SDPA: the key operand; softmax: the operand of the scores matmul (k^T)
    v: Node
    heads: int  # query heads
    kv_heads: int  # key/value heads before any repeat (== heads without grouped-query attention)
    head_dim: int
    value_dim: int
    k_heads_at_op: int = 0  # K/V heads where they enter the attention: kv_heads, heads, or 1 when broadcast
    mask: Node | None = None  # SDPA's attn_mask (the softmax form keeps its mask ops in `scale_ops`' chain)
    is_causal: bool = False  # SDPA's is_causal flag
    enable_gqa: bool = False  # SDPA's enable_gqa flag: K/V reach the op with kv_heads heads
    # softmax form only
    scores: Node | None = None  # the softmax input
    qk: Node | None = None  # the scores matmul q @ k^T
    pv: Node | None = None  # the output matmul p @ v
    scale_ops: tuple[Node, ...] = ()  # scalar scalings and casts between qk and softmax, in order


def _val(node) -> torch.Tensor | None:
    val = node.meta.get("val") if isinstance(node, Node) else None
    return val if isinstance(val, torch.Tensor) else None


def _static(dim) -> int | None:
    return dim if isinstance(dim, int) else None


def unwrap_prefix(node: Node) -> Node:
    """The tensor a peftc prefix rewrite concatenated onto (so a rewritten site is still found)."""
    while (isinstance(node, Node) and node.target == aten.cat.default and node.meta.get("peftc.pass")
           and node.meta.get("peftc.role") == "prefix"):
        node = node.args[0][-1]
    return node


def _module_of(node: Node) -> str:
    stack = node.meta.get("nn_module_stack") or {}
    return list(stack.values())[-1][0] if stack else ""


def _heads_and_dim(q: Node) -> tuple[int, int] | None:
    val = _val(q)
    if val is None or val.dim() not in (3, 4):
        return None
    heads = _static(val.shape[1]) if val.dim() == 4 else 1
    head_dim = _static(val.shape[-1])
    if heads is None or head_dim is None:
        return None
    return heads, head_dim


def _kv_heads(kv: Node, heads: int, head_dim: int, heads_at_op: int) -> int:
    """Walk back through a repeat_kv to the K/V tensor before it; its head count is the KV head count."""
    best = heads_at_op
    node = unwrap_prefix(kv)
    seen = 0
    while isinstance(node, Node) and seen < 16:
        val = _val(node)
        if val is not None and val.dim() == 4 and _static(val.shape[-1]) == head_dim:
            h = _static(val.shape[1])
            if h is not None and 0 < h < best and heads % h == 0:
                best = h
        if node.op != "call_function" or node.target not in _REPEATS:
            break
        node = node.args[0]
        seen += 1
    return best


def _sdpa_site(node: Node) -> AttentionSite | None:
    schema = node.target._schema
    args = {a.name: (a.default_value if a.has_default_value() else None) for a in schema.arguments}
    for a, value in zip(schema.arguments, node.args):
        args[a.name] = value
    args.update(node.kwargs)
    q, k, v = args["query"], args["key"], args["value"]
    found = _heads_and_dim(q)
    if found is None:
        return None
    heads, head_dim = found
    k_val, v_val = _val(unwrap_prefix(k)), _val(unwrap_prefix(v))
    if k_val is None or v_val is None or _static(v_val.shape[-1]) is None:
        return None
    gqa = bool(args.get("enable_gqa"))
    at_op = _static(k_val.shape[1]) if k_val.dim() == 4 else 1
    if at_op is None:
        return None
    kv_heads = at_op if gqa else _kv_heads(k, heads, head_dim, at_op)
    return AttentionSite(node, "sdpa", _module_of(node), q, k, v, heads, kv_heads, head_dim,
                         _static(v_val.shape[-1]), k_heads_at_op=at_op, mask=args.get("attn_mask"),
                         is_causal=bool(args.get("is_causal")), enable_gqa=gqa)


def _is_param(node) -> bool:
    while isinstance(node, Node) and node.op == "call_function" and node.target in (
            aten.t.default, aten.transpose.int, aten.permute.default, *_CASTS):
        node = node.args[0]
    return isinstance(node, Node) and node.op == "get_attr"


def _is_scalar(x) -> bool:
    if isinstance(x, (int, float)):
        return True
    val = _val(x)
    return val is not None and val.dim() == 0


def _scores_chain(scores: Node) -> tuple[Node, tuple[Node, ...]] | None:
    """Walk back from the softmax input to the q @ k^T matmul; return it and the scale/cast ops on the way."""
    ops: list[Node] = []
    node = unwrap_prefix(scores)
    for _ in range(12):
        if not isinstance(node, Node) or node.op != "call_function":
            return None
        t = node.target
        if t in _MATMUL:
            if _is_param(node.args[0]) or _is_param(node.args[1]):
                return None
            return node, tuple(reversed(ops))
        if t in _SCALES and _is_scalar(node.args[1]):
            ops.append(node)
            node = node.args[0]
        elif t in _CASTS:
            ops.append(node)
            node = node.args[0]
        elif t == aten.add.Tensor and not _is_scalar(node.args[1]):
            # one operand is the scores, the other a mask; the scores side leads to the matmul
            node = node.args[0] if _scores_chain(node.args[0]) is not None else node.args[1]
        elif t in (aten.where.self, aten.where.ScalarOther, aten.where.ScalarSelf, aten.where.Scalar):
            node = node.args[1]
        elif t in (aten.masked_fill.Scalar, aten.masked_fill.Tensor):
            node = node.args[0]
        else:
            return None
    return None


def _value_matmul(softmax: Node) -> Node | None:
    node = softmax
    for _ in range(6):
        users = [u for u in node.users if u.target not in _IGNORED_USERS]
        if len(users) != 1:
            return None
        (user,) = users
        if user.target in _MATMUL:
            return user if user.args[0] is node else None
        if user.target in _CASTS or user.target in (aten.dropout.default, aten.native_dropout.default):
            node = user
        else:
            return None
    return None


def _softmax_site(node: Node) -> AttentionSite | None:
    scores = node.args[0]
    val = _val(unwrap_prefix(scores))
    if val is None or val.dim() not in (3, 4) or node.args[1] not in (-1, val.dim() - 1):
        return None
    chain = _scores_chain(scores)
    pv = _value_matmul(node)
    if chain is None or pv is None:
        return None
    qk, scale_ops = chain
    q, kt = qk.args[0], qk.args[1]
    found = _heads_and_dim(q)
    v = pv.args[1]
    v_val = _val(unwrap_prefix(v))
    if found is None or v_val is None or v_val.dim() != val.dim():
        return None
    heads, head_dim = found
    at_op = _static(v_val.shape[1]) if v_val.dim() == 4 else 1
    if at_op is None:
        return None
    k = kt.args[0] if kt.target == aten.transpose.int else kt
    kv_heads = min(_kv_heads(k, heads, head_dim, at_op), _kv_heads(v, heads, _static(v_val.shape[-1]), at_op))
    return AttentionSite(node, "softmax", _module_of(node), q, kt, v, heads, kv_heads, head_dim,
                         _static(v_val.shape[-1]), k_heads_at_op=at_op, scores=scores, qk=qk, pv=pv,
                         scale_ops=scale_ops)


def attention_sites(gm: GraphModule) -> list[AttentionSite]:
    """Every attention of the captured graph, in graph order."""
    sites = []
    for node in gm.graph.nodes:
        if node.op != "call_function" or node.meta.get("peftc.pass"):
            continue
        site = None
        if node.target == aten.scaled_dot_product_attention.default:
            site = _sdpa_site(node)
        elif node.target in _SOFTMAX:
            site = _softmax_site(node)
        if site is not None:
            sites.append(site)
    return sites


def select_attention(sites: Iterable[AttentionSite], target: Target, where: str) -> list[AttentionSite]:
    """`target` as LoRA's (regex full match on the module path or a dotted suffix, or a list); None: all."""
    sites = list(sites)
    paths = list(dict.fromkeys(s.module for s in sites))
    if not sites:
        raise SpecError(f"{where}: the model has no attention peftc can match (scaled_dot_product_attention, or "
                        f"softmax(q @ k^T * scale + mask) @ v). Check that the model runs attention on "
                        f"[batch, heads, seq, head_dim] tensors")
    if target is None:
        return sites
    chosen = [s for s in sites if _matches(target, s.module)]
    if not chosen:
        wanted = [target] if isinstance(target, str) else list(target)
        close: list[str] = []
        for t in wanted:
            close += difflib.get_close_matches(t, paths, n=3, cutoff=0.4)
        close = list(dict.fromkeys(close))[:5] or paths[:5]
        raise SpecError(f"{where}: target={target!r} matches no attention. Closest attention module paths: "
                        f"{', '.join(close)} ({len(paths)} in all)")
    return chosen
