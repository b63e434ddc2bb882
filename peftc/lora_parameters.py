"""LoRA on raw parameters (HF PEFT's `target_parameters`): W = get_attr(p)  ==>  W + s·ΔW(A, B), before W's first use.

Every op that reads the parameter (a matmul, a per-expert index, a grouped matmul of transformers' MoE experts) then
sees the adapted weight, as HF PEFT's `lora.ParamWrapper` parametrizes it. HF's shapes, names and math:
- a 2-d weight W [out, in]: A [r, in], B [out, r], ΔW = B A;
- a 3-d expert stack of E experts, stored (E, out, in) (transformers' default) or (E, in, out) (a module with
  `is_transposed`, GPT-OSS): A [r·E, in], B [out, r·E], and expert e's ΔW_e = B_e A_e with A_e = A.view(E, r, in)[e]
  and B_e = B.view(out, r, E)[:, :, e] (HF's einsum "o r e, e r i -> e o i"), transposed for (E, in, out).
s = alpha/r (alpha/√r with rsLoRA), r and alpha by rank_pattern/alpha_pattern on the parameter's name; the adapters
are float32 on half-precision weights, and, as HF folds them, cast to W's dtype for W + s·ΔW. A is
Kaiming-uniform over `in`, B zeros, so at init the graph computes what it did. HF PEFT refuses dropout, DoRA,
lora_bias and the inits that decompose W here, and so does peftc.

Names: the adapter of `<module>.weight` is `<module>.lora_A.weight` (as for a module); of any other parameter
`<module>.<leaf>` it is `<module>.<leaf>_adapter.lora_A.weight` (match.py's rule for a weight read functionally).
HF PEFT keys both after the module, wrapping one `ParamWrapper` per targeted parameter in the module's parameter
order, so the i-th of k targeted parameters of a module is saved under `<module>` + `.base_layer` * (k-1-i);
`peft_names` translates. Merged, `W + s·ΔW` reads only frozen tensors and fold-params folds it into W.
"""

from __future__ import annotations

import difflib
import functools
from dataclasses import dataclass
from typing import Any

import torch
from torch.fx import GraphModule, Node

from .errors import SpecError
from .params import BASE
from .rewrite import NodeBuilder, replace_uses

aten = torch.ops.aten

TAG = "peftc.lora_parameter"  # on W + s·ΔW: {param, name, A, B, scaling}


def check_rule(rule: Any, where: str) -> None:
    """Normalize `target_parameters` to a sorted tuple of names and refuse what HF PEFT's ParamWrapper refuses."""
    names = rule.target_parameters
    if names is None:
        return
    if isinstance(names, str) or not isinstance(names, (list, tuple, set, frozenset)) or not names \
            or not all(isinstance(n, str) and n for n in names):
        raise SpecError(f"{where}: `target_parameters` must be a non-empty list of parameter names (matched exactly "
                        f"or as a dotted suffix, e.g. ['mlp.experts.gate_up_proj']; HF PEFT takes no regex here), "
                        f"got {names!r}")
    object.__setattr__(rule, "target_parameters", tuple(sorted(set(names))))  # a set, as HF PEFT holds it
    from .lora_init import mutates_base

    refused = [key for key, on in (("dropout", rule.dropout > 0), ("use_dora", rule.use_dora),
                                   ("lora_bias", rule.lora_bias), ("slices", bool(rule.slices)),
                                   ("init", mutates_base(rule.init))) if on]
    if refused:
        raise SpecError(f"{where}: `target_parameters` does not combine with {refused[0]}="
                        f"{getattr(rule, refused[0])!r} (HF PEFT's ParamWrapper refuses it: ΔW is added to the "
                        f"weight, which sees no input to drop or decompose); put the parameters in a rule of their own")


@dataclass(frozen=True)
class ParameterSite:
    read: Node  # the get_attr of the parameter
    param: str  # its table name
    name: str  # the alias the rule matched (rank_pattern and HF PEFT's keys read it)
    adapter_prefix: str
    experts: int  # E; 0 for a 2-d weight
    in_features: int
    out_features: int
    transposed: bool  # a 3-d stack stored (E, in, out)


def adapter_prefix(name: str) -> str:
    owner, _, leaf = name.rpartition(".")
    return owner if leaf == "weight" and owner else f"{name}_adapter"


def _site(read: Node, alias: str, tensor: torch.Tensor, info: Any, where: str) -> ParameterSite:
    shape = tuple(tensor.shape)
    if len(shape) == 2:
        return ParameterSite(read, read.target, alias, adapter_prefix(alias), 0, shape[1], shape[0], False)
    if len(shape) == 3:
        transposed = alias.rpartition(".")[0] in info.transposed_experts
        in_f, out_f = (shape[1], shape[2]) if transposed else (shape[2], shape[1])
        return ParameterSite(read, read.target, alias, adapter_prefix(alias), shape[0], in_f, out_f, transposed)
    raise SpecError(f"{where}: target_parameters selects `{alias}` of shape {shape}; LoRA adapts 2-d weights and 3-d "
                    f"expert stacks only (as HF PEFT)")


def parameter_sites(gm: GraphModule, table: Any, info: Any, rule: Any, where: str) -> list[ParameterSite]:
    """Every read of a base parameter one of `rule.target_parameters` names, exactly or as a dotted suffix (HF
    PEFT's rule); each name must select a parameter of the model."""
    from .delta import aliases_of
    from .match import _matches

    candidates = [a for aliases in info.aliases.values() for a in aliases]
    missing = [t for t in rule.target_parameters if not any(_matches((t,), a) for a in candidates)]
    if missing:
        leaves = {c.rpartition(".")[2]: c for c in candidates}
        close = difflib.get_close_matches(missing[0], candidates, n=3, cutoff=0.5) or \
            [leaves[n] for n in difflib.get_close_matches(missing[0].rpartition(".")[2], list(leaves), n=3)]
        raise SpecError(f"{where}: target_parameters entry {missing[0]!r} names no parameter of the model (give a "
                        f"parameter's name, exactly or as a dotted suffix)"
                        + (f"; closest: {', '.join(close)}" if close else f"; parameters: {', '.join(candidates[:5])}"))
    sites = []
    for node in gm.graph.nodes:
        if node.op != "get_attr" or node.target not in table or table[node.target].role != BASE or not node.users:
            continue
        alias = next((a for a in aliases_of(info, node.target) if _matches(rule.target_parameters, a)), None)
        if alias is not None:
            sites.append(_site(node, alias, table[node.target].tensor, info, where))
    return sites


def insert_all(pass_name: str, rule: Any, gm: GraphModule, ctx: Any, module_weights: set[str]) -> bool:
    """Adapt every parameter `rule.target_parameters` selects; `module_weights` are the weights the rule's module
    targets adapt, which HF PEFT refuses to target twice."""
    where = repr(rule)
    read_names = {n.target for n in gm.graph.nodes if n.op == "get_attr"}
    modified = False
    for site in parameter_sites(gm, ctx.params, ctx.info, rule, where):
        done = site.read.meta.get("peftc.adapted", {}).get("lora")
        if done == rule:
            continue
        if done is not None:
            raise SpecError(f"{where} selects `{site.name}`, which {done!r} already adapts; narrow one "
                            f"target_parameters")
        if site.param in module_weights:
            raise SpecError(f"{where}: `{site.name}` is the weight of a module `target` also adapts (HF PEFT refuses "
                            f"both on one module); drop it from target_parameters or exclude its module")
        if f"{site.adapter_prefix}.lora_A.weight" in read_names:
            raise SpecError(f"{where}: `{site.adapter_prefix}.lora_A.weight` is already read by another adapter of "
                            f"this graph (a module rule on `{site.adapter_prefix}`); adapt `{site.name}` once")
        insert(pass_name, rule, gm, ctx, site)
        site.read.meta["peftc.adapted"] = {**site.read.meta.get("peftc.adapted", {}), "lora": rule}
        ctx.count("insert-lora.parameters")
        modified = True
    return modified


def insert(pass_name: str, rule: Any, gm: GraphModule, ctx: Any, site: ParameterSite) -> Node:
    """W ==> baddbmm(W, B_e, A_e, alpha=s) (addmm for a 2-d weight), the factors cast to W's dtype, as HF PEFT."""
    from .lora_init import random_factors
    from .passes.insert_lora import adapter_dtype

    weight = ctx.params[site.param].tensor
    dtype = adapter_dtype(weight.dtype)
    r, scaling = rule.rank_for(site.name), rule.scaling_for(site.name)
    rows = r * max(site.experts, 1)
    a_name, b_name = f"{site.adapter_prefix}.lora_A.weight", f"{site.adapter_prefix}.lora_B.weight"
    factors = functools.cache(lambda: random_factors(rule.init, (rows, site.in_features), (site.out_features, rows),
                                                     weight, dtype, r))
    ctx.params.add(gm, a_name, lambda: factors()[0], method="lora", added_by=pass_name,
                   trainable=not rule.freeze_a)
    ctx.params.add(gm, b_name, lambda: factors()[1], method="lora", added_by=pass_name)
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    first = min(site.read.users, key=order.__getitem__)
    b = NodeBuilder(gm, first, pass_name, "lora", like=first)
    stem = site.name.replace(".", "_")
    lhs, rhs = b.attr(b_name), b.attr(a_name)  # W + s·lhs @ rhs, laid out as W is stored
    if site.experts:
        e = site.experts
        rhs = b.call(aten.view.default, rhs, [e, r, site.in_features], name=f"{stem}_lora_A_experts")
        lhs = b.call(aten.permute.default, b.call(aten.view.default, lhs, [site.out_features, r, e]), [2, 0, 1],
                     name=f"{stem}_lora_B_experts")  # (E, out, r)
        if site.transposed:  # (E, in, out) = A_eᵀ B_eᵀ
            lhs, rhs = (b.call(aten.transpose.int, rhs, 1, 2, name=f"{stem}_lora_A_t"),
                        b.call(aten.transpose.int, lhs, 1, 2, name=f"{stem}_lora_B_t"))
    if dtype != weight.dtype:  # as HF PEFT folds the factors: in W's dtype
        lhs, rhs = (b.call(aten.to.dtype, t, weight.dtype, name=f"{stem}_lora_{k}_cast") for t, k in ((lhs, "B"),
                                                                                                   (rhs, "A")))
    # one fused op, so the forward holds one W-sized tensor (HF's baddbmm)
    fused = aten.baddbmm.default if site.experts else aten.addmm.default
    eff = b.call(fused, site.read, lhs, rhs, kwargs={"alpha": scaling}, name=f"{stem}_lora")
    eff.meta[TAG] = {"param": site.param, "name": site.name, "A": a_name, "B": b_name, "scaling": scaling}
    eff.meta["peftc.replaces"] = (site.param,)  # merged, W + s·ΔW folds into a tensor named W
    replace_uses(site.read, eff, keep=b.created)
    return eff


# ---- HF PEFT's keys ---------------------------------------------------------------------------------------------
def adapted_parameters(cm) -> dict[str, dict]:
    """{parameter alias: its tag} of every parameter adapter in cm's compiled graphs."""
    return {n.meta[TAG]["name"]: n.meta[TAG] for gms in cm._graphs.values() for gm in gms for n in gm.graph.nodes
            if TAG in n.meta}


def peft_names(cm) -> dict[str, str]:
    """{peftc adapter tensor name: HF PEFT's key (without `base_model.model.`)}: the i-th of a module's k targeted
    parameters, in the module's parameter order, is keyed `<module>` + `.base_layer` * (k-1-i), as HF PEFT nests its
    ParamWrappers."""
    from .peft_format import NotPeftExpressible

    by_owner: dict[str, list[dict]] = {}
    for name, tag in adapted_parameters(cm).items():
        owner, _, leaf = name.rpartition(".")
        if not owner:
            raise NotPeftExpressible(f"LoRA on `{name}`, a parameter of the top-level model, has no PEFT format (HF "
                                     f"PEFT cannot wrap the model itself)")
        by_owner.setdefault(owner, []).append(tag)
    out = {}
    for owner, tags in by_owner.items():
        order = list(cm._source.get_submodule(owner)._parameters)
        tags.sort(key=lambda t: order.index(t["name"].rpartition(".")[2]))
        for i, tag in enumerate(tags):
            key = owner + ".base_layer" * (len(tags) - 1 - i)
            out[tag["A"]], out[tag["B"]] = f"{key}.lora_A.weight", f"{key}.lora_B.weight"
    return out


def peft_target_parameters(cm, rule: Any) -> list[str]:
    """`target_parameters` that HF PEFT reads as exactly the parameters peftc adapted: the rule's own names when
    they select the same, else the full names."""
    from .match import _matches
    from .peft_format import NotPeftExpressible

    adapted = set(adapted_parameters(cm))
    names = {a for aliases in cm._info.aliases.values() for a in aliases}
    for candidate in (list(rule.target_parameters), sorted(adapted)):
        if {n for n in names if _matches(tuple(candidate), n)} == adapted:
            return candidate
    raise NotPeftExpressible(f"HF PEFT cannot name exactly the parameters peftc adapted ({', '.join(sorted(adapted))})")
