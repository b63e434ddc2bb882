"""merge-reparam: y = W x + s·B(A x)  ==>  y = (W + s·BA) x, for every selected adapter on a frozen weight."""

from __future__ import annotations

import difflib
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch.fx import GraphModule, Node

from peftc import lora_embedding
from peftc.errors import SpecError
from peftc.merge import merge_tagged
from peftc.method import merge_methods
from peftc.params import ADAPTER, BASE, ParamTable
from peftc.pipeline import Pass, PassContext, PassResult, register_pass
from peftc.rewrite import Bindings, Rule, RuleSet

aten = torch.ops.aten


# ---- which tensors a rule may touch ------------------------------------------------------------------------------

@dataclass
class MergeScope:
    """What the rules' `where` clauses see: the pass context and the adapters chosen for merging."""

    ctx: PassContext
    adapters: frozenset[str]

    def count(self, key: str, n: int = 1) -> None:
        self.ctx.count(key, n)

    def frozen_base(self, node: Any) -> bool:
        table = self.ctx.params
        return isinstance(node, Node) and node.op == "get_attr" and node.target in table \
            and table[node.target].role == BASE and not table[node.target].trainable

    def merging(self, node: Any) -> bool:
        return isinstance(node, Node) and node.op == "get_attr" and node.target in self.adapters


def select_adapters(table: ParamTable, adapters: Any) -> frozenset[str]:
    """Adapter tensor names chosen by `adapters`: None (all), or module paths, tensor names or method names."""
    names = [p.name for p in table if p.role == ADAPTER]
    if adapters is None:
        return frozenset(names)
    if isinstance(adapters, str):
        adapters = [adapters]
    chosen: set[str] = set()
    for item in adapters:
        hit = {n for n in names if n == item or n.startswith(item + ".") or table[n].method == item}
        if not hit:
            modules = sorted({n.rsplit(".", 2 if n.endswith(".weight") else 1)[0] for n in names})
            close = difflib.get_close_matches(item, modules + names, n=3)
            hint = f"; did you mean {', '.join(close)}?" if close else f"; adapters: {', '.join(modules[:8])}"
            raise SpecError(f"merge(adapters=...): `{item}` names no adapter{hint}")
        chosen |= hit
    return frozenset(chosen)


def _lora_pair(scope: MergeScope, a: Any, b: Any, s: Any) -> bool:
    return scope.merging(a) and scope.merging(b) and a.target.endswith("lora_A.weight") \
        and b.target == a.target.removesuffix("lora_A.weight") + "lora_B.weight" and isinstance(s, (int, float))


def _lora_where(bind: Bindings, scope: MergeScope) -> bool:
    return scope.frozen_base(bind["w"]) and _lora_pair(scope, bind["a"], bind["b"], bind["s"])


def _lora_cast_where(bind: Bindings, scope: MergeScope) -> bool:
    x32 = bind["x32"]
    return _lora_where(bind, scope) and isinstance(x32, Node) and x32.target == aten.to.dtype \
        and x32.args[0] is bind["x"]


# ---- the rules ----------------------------------------------------------------------------------------------------

def _lora(x, a, b, s):
    return aten.mul.Tensor(aten.linear.default(aten.linear.default(x, a), b), s)


def _delta(a, b, s):
    # HF PEFT's get_delta_weight: (B @ A) * scaling, in the adapters' dtype (fp32 for half-precision bases).
    return aten.mul.Tensor(aten.mm.default(b, a), s)


# linear(x, w) matches linear(x, w, bias) with bias=None: the matcher fills in schema defaults.
def lora_linear(x, w, bias, a, b, s):
    return aten.add.Tensor(aten.linear.default(x, w, bias), _lora(x, a, b, s))


def merged_linear(x, w, bias, a, b, s):
    return aten.linear.default(x, aten.add.Tensor(w, _delta(a, b, s)), bias)


def lora_addmm(bias, x, w, a, b, s):
    return aten.add.Tensor(aten.addmm.default(bias, x, w), _lora(x, a, b, s))


def merged_addmm(bias, x, w, a, b, s):
    # Conv1D stores W as (in, out): the delta goes in transposed.
    return aten.addmm.default(bias, x, aten.add.Tensor(w, aten.t.default(_delta(a, b, s))))


# Half-precision bases: the adapter reads x cast to fp32 and the sum is cast back. The merged weight is computed
# in fp32 (bf16 W + fp32 delta promotes) and cast once.
def lora_linear_cast(x, w, bias, a, b, s, x32, dt):
    return aten.to.dtype(aten.add.Tensor(aten.linear.default(x, w, bias), _lora(x32, a, b, s)), dt)


def merged_linear_cast(x, w, bias, a, b, s, x32, dt):
    return aten.linear.default(x, aten.to.dtype(aten.add.Tensor(w, _delta(a, b, s)), dt), bias)


def lora_addmm_cast(bias, x, w, a, b, s, x32, dt):
    return aten.to.dtype(aten.add.Tensor(aten.addmm.default(bias, x, w), _lora(x32, a, b, s)), dt)


def merged_addmm_cast(bias, x, w, a, b, s, x32, dt):
    return aten.addmm.default(bias, x, aten.to.dtype(aten.add.Tensor(w, aten.t.default(_delta(a, b, s))), dt))


def lora_conv2d(x, w, bias, stride, padding, dilation, groups, a, b, s):
    # HF PEFT's conv LoRA: A is a conv with the base's geometry (so it shares stride, padding, dilation, groups),
    # B a 1x1 conv.
    base = aten.conv2d.default(x, w, bias, stride, padding, dilation, groups)
    down = aten.conv2d.default(x, a, None, stride, padding, dilation, groups)
    return aten.add.Tensor(base, aten.mul.Tensor(aten.conv2d.default(down, b, None, [1, 1], [0, 0], [1, 1], 1), s))


def merged_conv2d(x, w, bias, stride, padding, dilation, groups, a, b, s):
    # HF PEFT's conv delta: B composed with A, as a conv over A's input channels.
    delta = aten.permute.default(aten.conv2d.default(aten.permute.default(a, [1, 0, 2, 3]), b), [1, 0, 2, 3])
    return aten.conv2d.default(x, aten.add.Tensor(w, aten.mul.Tensor(delta, s)), bias, stride, padding, dilation,
                               groups)


def _ia3_where(bind: Bindings, scope: MergeScope) -> bool:
    l_ = bind["l"]
    return scope.frozen_base(bind["w"]) and scope.merging(l_) and l_.target.endswith(".ia3_l") \
        and scope.ctx.params[l_.target].tensor.dtype == scope.ctx.params[bind["w"].target].tensor.dtype  # no casts


def _ia3_output_bias_where(bind: Bindings, scope: MergeScope) -> bool:
    return _ia3_where(bind, scope) and scope.frozen_base(bind["bias"])


def ia3_output(x, w, bias, l, flat):
    return aten.mul.Tensor(aten.linear.default(x, w, bias), aten.view.default(l, flat))


def merged_ia3_output(x, w, bias, l, flat):
    return aten.linear.default(x, aten.mul.Tensor(w, l), bias)  # l is [out, 1]: it scales W's rows


def merged_ia3_output_bias(x, w, bias, l, flat):
    return aten.linear.default(x, aten.mul.Tensor(w, l), aten.mul.Tensor(bias, aten.view.default(l, flat)))


def ia3_feedforward(x, w, bias, l, flat):
    return aten.linear.default(aten.mul.Tensor(x, aten.view.default(l, flat)), w, bias)


def merged_ia3_feedforward(x, w, bias, l, flat):
    return aten.linear.default(x, aten.mul.Tensor(w, l), bias)  # l is [1, in]: it scales W's columns


def dropped_adapter(x, p, train, a):
    return aten.linear.default(aten.dropout.default(x, p, train), a)


def undropped_adapter(x, p, train, a):
    return aten.linear.default(x, a)


# Ordered: dropout first (merging means evaluating the adapter without it, as HF PEFT's merge does), then the
# merge rules, most specific first. Each method adds its rules here with MERGE_RULES.add(Rule(...)).
MERGE_RULES = RuleSet(
    Rule("strip-adapter-dropout", dropped_adapter, undropped_adapter,
         where=lambda bind, scope: scope.merging(bind["a"])),
    Rule("lora-linear-cast", lora_linear_cast, merged_linear_cast, _lora_cast_where, replaces="w"),
    Rule("lora-addmm-cast", lora_addmm_cast, merged_addmm_cast, _lora_cast_where, replaces="w"),
    Rule("lora-linear", lora_linear, merged_linear, _lora_where, replaces="w"),
    Rule("lora-addmm", lora_addmm, merged_addmm, _lora_where, replaces="w"),
    Rule("lora-conv2d", lora_conv2d, merged_conv2d, _lora_where, replaces="w"),
    # IA3 (HF PEFT's merge: W *= l; an output vector scales the bias too)
    Rule("ia3-output-bias", ia3_output, merged_ia3_output_bias, _ia3_output_bias_where, replaces=("w", "bias")),
    Rule("ia3-output", ia3_output, merged_ia3_output, lambda bind, scope: _ia3_where(bind, scope)
         and bind["bias"] is None, replaces="w"),
    Rule("ia3-feedforward", ia3_feedforward, merged_ia3_feedforward, _ia3_where, replaces="w"),
)


@register_pass
@dataclass(frozen=True)
class MergeReparam(Pass):
    """merge-reparam: y = W x + s·B(A x)  ==>  y = (W + s·BA) x, by the declarative rules in MERGE_RULES.

    The rewritten weight is a parameter-only subgraph; fold-params (run next) evaluates it once into a tensor named
    like W. `adapters` limits the merge to some adapters (module paths, tensor names or method names); the rest
    stay as they are. Merged adapters must be frozen in the table (CompiledModel.merge() freezes copies of them).
    """

    name: ClassVar[str] = "merge-reparam"
    adapters: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        if isinstance(self.adapters, (str, list)):
            object.__setattr__(self, "adapters", (self.adapters,) if isinstance(self.adapters, str)
                               else tuple(self.adapters))

    def run(self, gm: GraphModule, ctx: PassContext) -> PassResult:
        scope = MergeScope(ctx, select_adapters(ctx.params, self.adapters))
        hits = MERGE_RULES.apply(gm, scope, self.name)
        # Then every adapter its insert pass tagged (DoRA, slices, IA3, LoRA on mm/matmul/einsum/conv ...).
        hits += merge_tagged(gm, scope, self.name)
        # And every method written with peftc.Method that states a merge (peftc/method.py).
        hits += merge_methods(gm, scope, self.name)
        hits += lora_embedding.merge(gm, scope, self.name)
        return PassResult(gm, hits > 0)
