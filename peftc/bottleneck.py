"""Bottleneck adapters (AdapterHub's `seq_bn`, `double_seq_bn`, `par_bn`): the rule, and the sub-blocks they go on.

A transformer sub-block (attention, feed-forward) ends in an output projection whose result h is added to the
residual stream r: `add(h, r)`, followed by the layer's norm in a post-norm model (BERT: `LN(h + r)`). The adapter
rewrites that add. `residual_sub_blocks` finds these adds structurally in the captured graph, whatever the model
calls its modules: one operand of the add is a matmul with a base weight (walking through dropout, casts and
reshapes), the other is an ancestor of that matmul (the sub-block's input), and the sub-block is an attention one
when the matmul reads an attention's output (through reshapes), else a feed-forward one.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar, Union

import torch
from torch.fx import GraphModule, Node

from .errors import SpecError
from .spec import Rule, _shown, is_positive_number, register_rule

aten = torch.ops.aten

# AdapterHub's configs (adapters/configuration/adapter_config.py), by name and by their older aliases.
PRESETS: dict[str, dict] = {
    "seq_bn": dict(mh_adapter=False, output_adapter=True, reduction_factor=16.0, non_linearity="relu",
                   original_ln_before=True, is_parallel=False, scaling=1.0, init_weights="bert"),
    "double_seq_bn": dict(mh_adapter=True, output_adapter=True, reduction_factor=16.0, non_linearity="swish",
                          original_ln_before=False, is_parallel=False, scaling=1.0, init_weights="bert"),
    "par_bn": dict(mh_adapter=False, output_adapter=True, reduction_factor=2.0, non_linearity="relu",
                   original_ln_before=False, is_parallel=True, scaling=4.0, init_weights="mam_adapter"),
}
ALIASES = {"pfeiffer": ("seq_bn", {}), "houlsby": ("double_seq_bn", {}), "parallel": ("par_bn", {}),
           "scaled_parallel": ("par_bn", {"scaling": "learned"})}
# BnConfig's defaults, shared by the three.
_COMMON = dict(original_ln_after=True, residual_before_ln=True, ln_before=False, ln_after=False,
               adapter_residual_before_ln=False, use_gating=False)
NON_LINEARITIES = ("relu", "swish", "silu", "gelu", "gelu_new", "tanh", "sigmoid", "leakyrelu", "linear")
INITS = ("bert", "mam_adapter", "houlsby")


@register_rule
@dataclass(frozen=True)
class Adapter(Rule):
    """Bottleneck adapter: `add(h, r)` at the end of each attention / feed-forward sub-block  ==>  AdapterHub's
    `bottleneck_layer_forward` with an adapter `up(act(down(x))) · scaling`.

    `config` names AdapterHub's preset (`seq_bn` = Pfeiffer, `double_seq_bn` = Houlsby, `par_bn` = He et al.'s
    parallel adapter; also `pfeiffer`, `houlsby`, `parallel`, `scaled_parallel`); every other option left unset
    takes the preset's value, and one that is set overrides it, with AdapterHub's meaning (docs/methods.md).
    `name` is the adapter's name in its keys (`<block>.adapters.<name>.adapter_down.0.weight`); `leave_out` lists
    layer indices (the first number in the sub-block's module path) that get no adapter.
    """

    kind: ClassVar[str] = "adapter"

    config: str = "seq_bn"
    name: str = "default"
    mh_adapter: bool | None = None
    output_adapter: bool | None = None
    reduction_factor: float | None = None
    non_linearity: str | None = None
    original_ln_before: bool | None = None
    original_ln_after: bool | None = None
    residual_before_ln: Union[bool, str, None] = None
    ln_before: bool | None = None
    ln_after: bool | None = None
    adapter_residual_before_ln: bool | None = None
    is_parallel: bool | None = None
    scaling: Union[float, str, None] = None
    init_weights: str | None = None
    use_gating: bool | None = None
    dropout: float = 0.0
    leave_out: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        where = self._where()
        if not isinstance(self.config, str) or self.config not in PRESETS and self.config not in ALIASES:
            raise SpecError(f"{where}: unknown `config` {_shown(self.config)}; use one of "
                            f"{', '.join([*PRESETS, *ALIASES])} (AdapterHub's names)")
        preset, extra = ALIASES.get(self.config, (self.config, {}))
        for key, default in {**_COMMON, **PRESETS[preset], **extra}.items():
            if getattr(self, key) is None:
                object.__setattr__(self, key, default)
        if not isinstance(self.name, str) or not self.name.isidentifier():
            raise SpecError(f"{where}: `name` must be an identifier (it names the adapter's keys), got "
                            f"{_shown(self.name)}")
        for key in ("mh_adapter", "output_adapter", "original_ln_before", "original_ln_after", "ln_before",
                    "ln_after", "adapter_residual_before_ln", "is_parallel", "use_gating"):
            if not isinstance(getattr(self, key), bool):
                raise SpecError(f"{where}: `{key}` must be true or false, got {_shown(getattr(self, key))}")
        if not (self.mh_adapter or self.output_adapter):
            raise SpecError(f"{where}: mh_adapter and output_adapter are both false, so no sub-block gets an "
                            f"adapter; set one")
        if isinstance(self.reduction_factor, dict):
            raise SpecError(f"{where}: per-layer `reduction_factor` mappings are not supported; give one number "
                            f"(use two rules with `leave_out` for different sizes)")
        if not is_positive_number(self.reduction_factor):
            raise SpecError(f"{where}: `reduction_factor` must be a positive number, got "
                            f"{_shown(self.reduction_factor)}")
        if self.non_linearity not in NON_LINEARITIES:
            raise SpecError(f"{where}: `non_linearity` {self.non_linearity!r} is not one of "
                            f"{', '.join(NON_LINEARITIES)}")
        if not (isinstance(self.residual_before_ln, bool) or self.residual_before_ln == "post_add"):
            raise SpecError(f"{where}: `residual_before_ln` must be true, false or 'post_add', got "
                            f"{_shown(self.residual_before_ln)}")
        if self.residual_before_ln == "post_add" and not self.original_ln_before:
            raise SpecError(f"{where}: residual_before_ln='post_add' takes the residual after the model's own "
                            f"residual add, which only original_ln_before=true applies; set it")
        numeric = isinstance(self.scaling, (int, float)) and not isinstance(self.scaling, bool) \
            and math.isfinite(self.scaling)
        if not (numeric or self.scaling in ("learned", "channel")):
            raise SpecError(f"{where}: `scaling` must be a number, 'learned' or 'channel', got "
                            f"{_shown(self.scaling)}")
        if self.init_weights not in INITS:
            raise SpecError(f"{where}: `init_weights` must be one of {', '.join(INITS)}, got "
                            f"{_shown(self.init_weights)}")
        if isinstance(self.dropout, bool) or not isinstance(self.dropout, (int, float)) or not 0 <= self.dropout < 1:
            raise SpecError(f"{where}: `dropout` must be in [0, 1), got {_shown(self.dropout)}")
        leave = self.leave_out
        if not isinstance(leave, (list, tuple)) or not all(isinstance(i, int) and not isinstance(i, bool)
                                                           for i in leave):
            raise SpecError(f"{where}: `leave_out` must be a list of layer indices, got {_shown(leave)}")
        object.__setattr__(self, "leave_out", tuple(leave))

    def bottleneck(self, hidden: int) -> int:
        """AdapterHub's `down_sample`: int(hidden // reduction_factor), at least 1."""
        return max(1, int(hidden // self.reduction_factor))


# Ops between a sub-block's output projection and the residual add, and around an attention's output.
_THROUGH = {aten.dropout.default, aten.view.default, aten.reshape.default, aten._unsafe_view.default,
            aten.to.dtype, aten._to_copy.default, aten.clone.default, aten.contiguous.default, aten.alias.default}
_LAYOUT = _THROUGH | {aten.transpose.int, aten.permute.default, aten.expand.default, aten.flatten.using_ints}
_NORMS = {aten.layer_norm.default}
ADAPTER_OF = "peftc.adapter_of"  # on an adapter's output: the sub-block output it rewrote


@dataclass(frozen=True)
class SubBlock:
    """One residual add `h + r` that ends a sub-block; `norm` is the post-norm reading only it (BERT), else None."""

    add: Node
    h: Node
    residual: Node
    norm: Node | None
    kind: str  # "attention" | "output" (AdapterHub's mh_adapter / output_adapter locations)
    module: str  # the module the add ran in
    projection: str  # the output projection's module
    layer: int | None  # the first number in the projection's module path


def _module(node: Node) -> str:
    stack = node.meta.get("nn_module_stack") or {}
    return list(stack.values())[-1][0] if stack else ""


def _walk(node, through, limit: int = 12):
    """Follow first operands through `through` ops (and through earlier passes' adapters on that output)."""
    for _ in range(limit):
        if not isinstance(node, Node) or node.op != "call_function":
            return node
        if ADAPTER_OF in node.meta:
            node = node.meta[ADAPTER_OF]
        elif node.target in through or ("peftc.pass" in node.meta and node.args and isinstance(node.args[0], Node)):
            node = node.args[0]
        else:
            return node
    return node


def _is_ancestor(a: Node, b: Node) -> bool:
    todo, seen = [b], set()
    while todo:
        n = todo.pop()
        if n is a:
            return True
        if n not in seen:
            seen.add(n)
            todo.extend(n.all_input_nodes)
    return False


def residual_sub_blocks(gm: GraphModule, params, info) -> list[SubBlock]:
    """Every `add(h, r)` that ends an attention or feed-forward sub-block, in graph order."""
    from .attention import attention_sites
    from .match import matmul_sites

    sites = {s.node: s for s in matmul_sites(gm, params, info)}
    attention_outputs = {a.node if a.form == "sdpa" else a.pv for a in attention_sites(gm)}
    found = []
    for node in gm.graph.nodes:
        if node.op != "call_function" or node.target != aten.add.Tensor or "peftc.pass" in node.meta \
                or len(node.args) != 2 or not all(isinstance(a, Node) for a in node.args):
            continue
        shapes = [a.meta.get("val") for a in node.args]
        if not all(isinstance(v, torch.Tensor) for v in shapes) or str(shapes[0].shape) != str(shapes[1].shape):
            continue
        for i in (0, 1):
            h, r = node.args[i], node.args[1 - i]
            site = sites.get(_walk(h, _THROUGH))
            if site is None or not _is_ancestor(r, site.node):
                continue
            reads = _walk(site.x, _LAYOUT)
            kind = "attention" if reads in attention_outputs else "output"
            module = _module(node)
            users = list(node.users)
            norm = users[0] if len(users) == 1 and users[0].target in _NORMS \
                and _module(users[0]).startswith(module + ".") else None
            digits = [int(p) for p in site.module.split(".") if p.isdigit()]
            found.append(SubBlock(node, h, r, norm, kind, module, site.module, digits[0] if digits else None))
            break
    return found
