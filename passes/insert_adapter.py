"""insert-adapter: [LN](h + r)  ==>  AdapterHub's bottleneck layer around the sub-block output h (serial or parallel)."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn
from torch.fx import GraphModule, Node, Proxy
from torch.fx.proxy import GraphAppendingTracer

from peftc.bottleneck import ADAPTER_OF, Adapter, SubBlock, residual_sub_blocks
from peftc.errors import PassError, SpecError
from peftc.pipeline import Pass, PassContext, PassResult, register_pass
from peftc.rewrite import NodeBuilder, adapted, mark_adapted

from .insert_lora import adapter_dtype

aten = torch.ops.aten

_ACT = {"relu": F.relu, "swish": F.silu, "silu": F.silu, "gelu": F.gelu, "tanh": torch.tanh,
        "sigmoid": torch.sigmoid, "leakyrelu": F.leaky_relu, "linear": lambda x: x,
        "gelu_new": lambda x: F.gelu(x, approximate="tanh")}


def _bert(t):  # AdapterHub's init_bert_weights for a Linear weight
    return nn.init.normal_(t, 0.0, 0.02)


def _houlsby(t):
    return nn.init.trunc_normal_(t, mean=0.0, std=1e-2, a=-2e-2, b=2e-2)


def _linear_default(t):  # nn.Linear's own init (a gate that init_weights="houlsby" leaves alone)
    return nn.init.kaiming_uniform_(t, a=math.sqrt(5))


def adapter_params(rule: Adapter, hidden: int) -> dict[str, tuple[tuple[int, ...], object]]:
    """{key: (shape, init)} of one adapter, named as AdapterHub names them inside `adapters.<name>`."""
    d = rule.bottleneck(hidden)
    down = "adapter_down.1" if rule.ln_before else "adapter_down.0"
    w_down, w_up = {"bert": (_bert, _bert), "mam_adapter": (_linear_default, nn.init.zeros_),
                    "houlsby": (_houlsby, _houlsby)}[rule.init_weights]
    out: dict = {}
    if rule.ln_before:
        out.update({"adapter_down.0.weight": ((hidden,), nn.init.ones_),
                    "adapter_down.0.bias": ((hidden,), nn.init.zeros_)})
    out.update({f"{down}.weight": ((d, hidden), w_down), f"{down}.bias": ((d,), nn.init.zeros_),
                "adapter_up.weight": ((hidden, d), w_up), "adapter_up.bias": ((hidden,), nn.init.zeros_)})
    if rule.scaling == "learned":
        out["scaling"] = ((1,), nn.init.ones_)
    elif rule.scaling == "channel":
        out["scaling"] = ((hidden,), nn.init.ones_)
    if rule.ln_after:
        out.update({"adapter_norm_after.weight": ((hidden,), nn.init.ones_),
                    "adapter_norm_after.bias": ((hidden,), nn.init.zeros_)})
    if rule.use_gating:
        gate = _linear_default if rule.init_weights == "houlsby" else _bert
        bound = 1 / math.sqrt(hidden)
        out.update({"gate.weight": ((1, hidden), gate),
                    "gate.bias": ((1,), (lambda t: nn.init.uniform_(t, -bound, bound))
                                  if rule.init_weights == "houlsby" else nn.init.zeros_)})
    return out


def adapter_prefix(block: SubBlock, name: str) -> str:
    """AdapterHub's layout: inside the module that adds the residual when that module owns the projection (BERT's
    `attention.output.adapters.<name>`), else beside it (`<layer>.attention_adapters.adapters.<name>`)."""
    if block.projection.rsplit(".", 1)[0] == block.module:
        return f"{block.module}.adapters.{name}"
    location = "attention_adapters" if block.kind == "attention" else "output_adapters"
    return f"{block.module}.{location}.adapters.{name}" if block.module else f"{location}.adapters.{name}"


@register_pass
@dataclass(frozen=True)
class InsertAdapter(Pass):
    """insert-adapter: y = [LN](h + r)  ==>  AdapterHub's bottleneck layer on the sub-block output h.

    With A(x) = dropout(up(act(down(x))) · scaling) (· gate(x) with use_gating):
    serial     hs = [LN](h + r) if original_ln_before else h;  o = A(hs) + (h | h + r | hs by residual_before_ln)
    parallel   o = h + A(r)
    then y = [LN](o + r) with original_ln_after (the model's own add and norm, now reading o), else y = o.
    h is the attention / feed-forward output before the residual add, r the residual stream, LN the layer's norm
    where the model applies it after the add (post-norm: BERT); pre-norm models (Llama, GPT-2) have none here, as
    AdapterHub passes none for them. The adapter is not linear, so it does not merge: it trains and exports
    unmerged.
    """

    name: ClassVar[str] = "insert-adapter"
    rule_type: ClassVar[type] = Adapter
    rule: Adapter

    def run(self, gm: GraphModule, ctx: PassContext) -> PassResult:
        rule = self.rule
        if any(n.meta.get("peftc.adapted", {}).get("adapter") == rule for n in gm.graph.nodes):
            return PassResult(gm, False)  # this rule rewrote every sub-block it selects at once
        wanted = {k for k, on in (("attention", rule.mh_adapter), ("output", rule.output_adapter)) if on}
        blocks = [b for b in residual_sub_blocks(gm, ctx.params, ctx.info)
                  if b.kind in wanted and b.layer not in rule.leave_out]
        if not blocks:
            raise SpecError(f"{rule!r}: found no {' or '.join(sorted(wanted))} sub-block (an output projection "
                            f"whose result is added to the residual stream) to put an adapter on")
        modified = False
        replaced: dict[Node, Node] = {}  # a sub-block end that an adapter replaced (original_ln_after=False)
        for block in blocks:
            if adapted(block.add, "adapter", rule, block.module):
                continue
            block = dataclasses.replace(block, residual=replaced.get(block.residual, block.residual))
            out = self._insert(gm, ctx, block, replaced)
            for node in (block.add, out):  # the add is gone when the adapter replaces the sub-block's end
                mark_adapted(node, "adapter", rule)
            ctx.count(f"insert-adapter.{block.kind}")
            modified = True
        return PassResult(gm, modified)

    def _insert(self, gm: GraphModule, ctx: PassContext, block: SubBlock, replaced: dict[Node, Node]) -> Node:
        rule, add, norm = self.rule, block.add, block.norm
        val = add.meta["val"]
        hidden, base_dtype = int(val.shape[-1]), val.dtype
        dtype = adapter_dtype(base_dtype)
        prefix = adapter_prefix(block, rule.name)
        if rule.residual_before_ln == "post_add" and norm is None:
            raise PassError(f"{rule!r} on `{block.module}`: residual_before_ln='post_add' needs the layer norm a "
                            f"post-norm model applies after this add, and this sub-block has none (AdapterHub "
                            f"fails here too); use residual_before_ln=true")
        names = {}
        for key, (shape, init) in adapter_params(rule, hidden).items():
            names[key] = f"{prefix}.{key}"
            ctx.params.add(gm, names[key], lambda s=shape, f=init: f(torch.empty(s, dtype=dtype, device=val.device)),
                           method="adapter", added_by=self.name)
        b = NodeBuilder(gm, add, self.name, "adapter", like=add)
        tracer = GraphAppendingTracer(gm.graph)
        before = set(gm.graph.nodes)

        def px(node: Node) -> Proxy:
            return Proxy(node if dtype == base_dtype else b.call(aten.to.dtype, node, dtype), tracer)

        def layer_norm(x: Node) -> Node:
            """The model's own norm, applied to `x` (fresh reads of its weights, so they precede the add)."""
            with gm.graph.inserting_before(add):
                copy = gm.graph.node_copy(norm, lambda a: x if a is add else b.attr(a.target)
                                          if a.op == "get_attr" else a)
            return b._tag(copy)

        p = {k: Proxy(b.attr(n), tracer) for k, n in names.items()}
        h, r = block.h, block.residual
        with gm.graph.inserting_before(add):
            if rule.is_parallel:
                o = self._bottleneck(px(r), p, hidden, ctx.training)
                if rule.ln_after:
                    o = F.layer_norm(o, [hidden], p["adapter_norm_after.weight"], p["adapter_norm_after.bias"])
                o = px(h) + o
            else:
                hs = post_add = h
                if rule.original_ln_before:
                    hs = post_add = b.call(aten.add.Tensor, h, r)
                    if norm is not None:
                        hs = layer_norm(post_add)
                residual = post_add if rule.residual_before_ln == "post_add" else h if rule.residual_before_ln \
                    else hs
                o = self._bottleneck(px(hs), p, hidden, ctx.training)
                if rule.adapter_residual_before_ln:
                    o = o + px(residual)
                if rule.ln_after:
                    o = F.layer_norm(o, [hidden], p["adapter_norm_after.weight"], p["adapter_norm_after.bias"])
                if not rule.adapter_residual_before_ln:
                    o = o + px(residual)
        out = o.node if dtype == base_dtype else b.call(aten.to.dtype, o.node, base_dtype)
        for node in gm.graph.nodes:
            if node not in before:
                node.meta.update(b.meta)
        out.meta[ADAPTER_OF] = h
        if rule.original_ln_after:
            add.replace_input_with(h, out)
        else:  # the adapter's output is the sub-block's: the model's own add (and norm) are dropped
            end = norm if norm is not None else add
            end.replace_all_uses_with(out)
            replaced[end] = out
            for node in (norm, add):
                if node is not None and not node.users:
                    gm.graph.erase_node(node)
        return out

    def _bottleneck(self, x: Proxy, p: dict, hidden: int, training: bool) -> Proxy:
        """dropout(up(act(down(x))) · scaling), times the gate with use_gating (AdapterHub's Adapter.forward)."""
        rule = self.rule
        z = x
        down = "adapter_down.0"
        if rule.ln_before:
            z = F.layer_norm(z, [hidden], p["adapter_down.0.weight"], p["adapter_down.0.bias"])
            down = "adapter_down.1"
        z = _ACT[rule.non_linearity](F.linear(z, p[f"{down}.weight"], p[f"{down}.bias"]))
        up = F.linear(z, p["adapter_up.weight"], p["adapter_up.bias"])
        up = up * (p["scaling"] if "scaling" in p else float(rule.scaling))
        if rule.dropout and training:
            up = F.dropout(up, rule.dropout, training=True)
        if rule.use_gating:
            gate = torch.sigmoid(F.linear(x, p["gate.weight"], p["gate.bias"]))
            up = up * gate.mean(dim=1).unsqueeze(-1)
        return up
