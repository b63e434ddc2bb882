"""insert-lora: y = matmul(x, W)  ==>  y + s·B(A·dropout(x))."""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import ClassVar

import torch
from torch.fx import GraphModule, Node

from peftc import lora_embedding, lora_init, lora_mha, lora_parameters
from peftc.errors import SpecError
from peftc.match import ConvSite, MatmulSite, conv_sites, matmul_sites, select
from peftc.pipeline import Pass, PassContext, PassResult, register_pass
from peftc.rewrite import NodeBuilder, adapted, mark_adapted, replace_uses
from peftc.spec import LoRA

aten = torch.ops.aten


def adapter_dtype(weight_dtype: torch.dtype) -> torch.dtype:
    """Adapters on half-precision bases train in float32, as HF PEFT's autocast_adapter_dtype does."""
    return torch.float32 if weight_dtype in (torch.float16, torch.bfloat16) else weight_dtype


def dora_magnitude(weight: torch.Tensor, dtype: torch.dtype, in_out: bool) -> torch.Tensor:
    """‖W + s·BA‖ per output unit at init (B = 0): the norm of each output row (conv filter) of W, whose
    output dim is 1 when it is stored (in, out) like GPT-2's Conv1D."""
    w = weight.detach().to(dtype)
    return w.norm(dim=0) if in_out else w.flatten(1).norm(dim=1)


def _bias(site) -> Node | None:
    args = site.node.args
    if site.form == "addmm":
        return args[0]
    if site.form in ("linear", "conv"):
        return args[2] if len(args) > 2 else None
    return None


def _free_letter(used: str) -> str:
    return next(c for c in "zyxwvutsrqponmlkjihgfedcbaZYXWVUTSRQPONMLKJIHGFEDCBA" if c not in used)


@register_pass
@dataclass(frozen=True)
class InsertLora(Pass):
    """insert-lora: y = matmul(x, W)  ==>  y + s·B(A·dropout(x)),  s = alpha/r (alpha/√r with rsLoRA).

    A [r, in] is Kaiming-uniform and B [out, r] zeros, so at init the graph computes exactly what it did.
    Parameters are named as HF PEFT saves them: `<module>.lora_A.weight`, `<module>.lora_B.weight`, whatever the
    weight's layout (Conv1D's (in, out) included). A weight read by several matmuls gets one adapter, applied at
    every read, as a module-swapping library applies one adapter at every call of the module.

    Variants, each HF PEFT's math and names unless noted: `use_dora` (y + (m/‖W+s·BA‖ - 1)·base + m/‖W+s·BA‖·s·BAx,
    `<module>.lora_magnitude_vector`), `freeze_a` (LoRA-FA: A frozen), `lora_bias` (`<module>.lora_B.bias`),
    `rank_pattern`/`alpha_pattern`, convolutions (A: conv with the base kernel/stride/padding/dilation to r
    channels, B: 1x1 conv with the base's groups), and peftc's own `slices`: one adapter per output-column slice of a
    fused weight, `<module>.lora_A.<slice>.weight`. `target_parameters`: W ==> W + s·ΔW(A, B) where W is read
    (raw parameters, 3-d expert stacks; peftc/lora_parameters.py).
    """

    name: ClassVar[str] = "insert-lora"
    rule_type: ClassVar[type] = LoRA
    rule: LoRA = field(default_factory=LoRA)

    def run(self, gm: GraphModule, ctx: PassContext) -> PassResult:
        sites = self._module_sites(gm, ctx) if self.rule.target is not None else []
        modified = False
        for site in sites:
            if adapted(site.node, "lora", self.rule, site.module):
                continue
            if isinstance(site, lora_embedding.EmbeddingSite):
                lora_embedding.check_rule(self.rule, site)
                lora_embedding.insert(self.name, self.rule, gm, ctx, site)
            else:
                self._check(site)
                self._insert(gm, ctx, site)
            mark_adapted(site.node, "lora", self.rule)
            ctx.count("insert-lora.inserted")
            modified = True
        if self.rule.target_parameters:
            modified |= lora_parameters.insert_all(self.name, self.rule, gm, ctx, {s.weight for s in sites})
        return PassResult(gm, modified)

    def _module_sites(self, gm: GraphModule, ctx: PassContext) -> list:
        sites: list = matmul_sites(gm, ctx.params, ctx.info)
        if self.rule.target != "all-linear":  # HF's "all-linear" leaves convolutions and embeddings alone
            sites += conv_sites(gm, ctx.params, ctx.info)
            sites += lora_embedding.embedding_sites(gm, ctx.params, ctx.info)
        sites = lora_mha.as_hf(sites, ctx.info)
        return lora_mha.with_out_proj(select(sites, self.rule.target, self.rule.exclude, ctx.info,
                                             where=repr(self.rule)), sites, ctx.info)

    def _check(self, site: MatmulSite | ConvSite) -> None:
        rule, where = self.rule, f"{self.rule!r} on `{site.module}`"
        if lora_init.mutates_base(rule.init) and (isinstance(site, ConvSite) or site.form == "einsum" or rule.slices
                                                  or (rule.init == "olora" and site.weight_in_out)):
            raise SpecError(f"{where}: init={rule.init!r} decomposes a 2-d weight read by linear/addmm/mm/matmul "
                            f"(OLoRA: stored (out, in), as HF reads it), without slices; this site is a "
                            f"{site.form}{' with slices' if rule.slices else ''}; exclude it or use init=True")
        if isinstance(site, ConvSite):
            if rule.slices:
                raise SpecError(f"{where}: `slices` apply to matmuls, not convolutions; exclude this module")
            if site.groups != 1 and (rule.use_dora or rule.rank_for(site.module) % site.groups):
                raise SpecError(f"{where}: LoRA on a convolution with groups={site.groups} needs a rank divisible "
                                f"by the groups (B is a grouped 1x1 conv, as in HF PEFT) and no DoRA; got "
                                f"r={rule.rank_for(site.module)}, use_dora={rule.use_dora}")
        elif site.form == "einsum" and (rule.use_dora or rule.slices or rule.lora_bias):
            raise SpecError(f"{where}: use_dora, slices and lora_bias need a linear/addmm/mm/matmul site, this one "
                            f"is an einsum ({site.equation}); exclude it")
        if rule.slices:
            too_far = [n for n, (_, end) in rule.slices.items() if end > site.out_features]
            if too_far:
                raise SpecError(f"{where}: slice `{too_far[0]}` ends at {rule.slices[too_far[0]][1]} but the "
                                f"weight has {site.out_features} output columns")

    def _add_pair(self, gm: GraphModule, ctx: PassContext, site, key: str, r: int, out_features: int,
                  dtype: torch.dtype, weight: torch.Tensor) -> tuple[str, str]:
        """Register `<module>.lora_A<key>.weight` (frozen with LoRA-FA) and `<module>.lora_B<key>.weight`."""
        a_name, b_name = f"{site.adapter_prefix}.lora_A{key}.weight", f"{site.adapter_prefix}.lora_B{key}.weight"
        conv = isinstance(site, ConvSite)
        a_shape = (r, site.in_features, *site.kernel) if conv else (r, site.in_features)
        b_shape = (out_features, r // site.groups, *[1] * len(site.kernel)) if conv else (out_features, r)
        init = self.rule.init
        if lora_init.mutates_base(init) and a_name not in ctx.params:  # PiSSA / OLoRA: W becomes its residual
            in_out = site.weight_in_out
            a0, b0, residual = lora_init.decompose(init, weight.t() if in_out else weight, r,
                                                   self.rule.scaling_for(site.module))
            factors = functools.cache(lambda: (a0.to(dtype), b0.to(dtype)))
            lora_init.replace_base(gm, ctx, site.weight, residual.t() if in_out else residual)
        else:
            factors = functools.cache(lambda: lora_init.random_factors(init, a_shape, b_shape, weight, dtype, r))
        ctx.params.add(gm, a_name, lambda: factors()[0], method="lora", added_by=self.name,
                       trainable=not self.rule.freeze_a)
        ctx.params.add(gm, b_name, lambda: factors()[1], method="lora", added_by=self.name)
        return a_name, b_name

    def _insert(self, gm: GraphModule, ctx: PassContext, site: MatmulSite | ConvSite) -> None:
        weight = ctx.params[site.weight].tensor
        dtype = adapter_dtype(weight.dtype)
        y = site.node
        stem = site.module.replace(".", "_")
        b = NodeBuilder(gm, y.next, self.name, "lora", like=y)
        x: Node = site.x
        if dtype != weight.dtype:
            x = b.call(aten.to.dtype, x, dtype, name=f"{stem}_lora_x")
        dropped = self.rule.dropout > 0 and ctx.training and not lora_mha.undropped(site, ctx.info)
        if dropped:
            x = b.call(aten.dropout.default, x, float(self.rule.dropout), True, name=f"{stem}_lora_dropout")
        bias_name = f"{site.adapter_prefix}.lora_B.bias" if self.rule.lora_bias else None
        if self.rule.slices:
            out = self._slices(gm, ctx, b, site, x, dtype, weight, stem)
        else:
            r, scaling = self.rule.rank_for(site.module), self.rule.scaling_for(site.module)
            a_name, b_name = self._add_pair(gm, ctx, site, "", r, site.out_features, dtype, weight)
            a_w, b_w = b.attr(a_name), b.attr(b_name)
            b_bias = None
            if self.rule.lora_bias:
                ctx.params.add(gm, bias_name, lambda: torch.zeros(site.out_features, dtype=dtype, device=weight.device),
                               method="lora", added_by=self.name)
                b_bias = b.attr(bias_name)
            if isinstance(site, ConvSite):
                delta = self._conv_delta(b, site, x, a_w, b_w, stem, b_bias)
            elif site.form == "einsum":
                delta = self._einsum_delta(b, site, x, a_w, b_w, stem)
            else:
                down = b.call(aten.linear.default, x, a_w, name=f"{stem}_lora_A")
                delta = b.call(aten.linear.default, down, b_w, *([b_bias] if self.rule.lora_bias else []),
                               name=f"{stem}_lora_B")
            if self.rule.use_dora:
                y_a = y if dtype == weight.dtype else b.call(aten.to.dtype, y, dtype, name=f"{stem}_lora_y")
                out = self._dora(gm, ctx, b, site, x, y_a, a_w, b_w, delta, scaling, dropped, dtype, stem)
            else:
                scaled = b.call(aten.mul.Tensor, delta, scaling, name=f"{stem}_lora_scaled")
                out = b.call(aten.add.Tensor, y, scaled, name=f"{stem}_lora_out")
        if dtype != weight.dtype:
            out = b.call(aten.to.dtype, out, weight.dtype, name=f"{stem}_lora_cast")
        # What a merge pass needs to fold this adapter into W: which weight, its layout, each (A, B, scaling,
        # output columns), and DoRA's magnitude.
        adapters = {key: (f"{site.adapter_prefix}.lora_A{key and '.' + key}.weight",
                          f"{site.adapter_prefix}.lora_B{key and '.' + key}.weight",
                          self.rule.scaling_for(site.module, key or None), span)
                    for key, span in (self.rule.slices or {"": None}).items()}
        out.meta["peftc.lora"] = {
            "weight": site.weight, "module": site.module, "form": site.form,
            "weight_in_out": getattr(site, "weight_in_out", False), "adapters": adapters,
            "magnitude": f"{site.adapter_prefix}.lora_magnitude_vector" if self.rule.use_dora else None,
            "groups": getattr(site, "groups", 1), "bias": bias_name}
        replace_uses(y, out, keep=b.created)

    def _slices(self, gm: GraphModule, ctx: PassContext, b: NodeBuilder, site: MatmulSite, x: Node,
                dtype: torch.dtype, weight: torch.Tensor, stem: str) -> Node:
        """y ==> cat([y[..., :s0], y[..., s0:e0] + s_0·B_0(A_0 x), ...], -1): one adapter per column slice."""
        y = site.node
        pieces, pos = [], 0
        for key, (start, end) in sorted(self.rule.slices.items(), key=lambda kv: kv[1]):
            if start > pos:
                pieces.append(b.call(aten.slice.Tensor, y, -1, pos, start, name=f"{stem}_lora_keep_{pos}"))
            r, scaling = self.rule.rank_for(site.module, key), self.rule.scaling_for(site.module, key)
            a_name, b_name = self._add_pair(gm, ctx, site, f".{key}", r, end - start, dtype, weight)
            down = b.call(aten.linear.default, x, b.attr(a_name), name=f"{stem}_lora_A_{key}")
            up = b.call(aten.linear.default, down, b.attr(b_name), name=f"{stem}_lora_B_{key}")
            scaled = b.call(aten.mul.Tensor, up, scaling, name=f"{stem}_lora_scaled_{key}")
            part = b.call(aten.slice.Tensor, y, -1, start, end, name=f"{stem}_lora_slice_{key}")
            pieces.append(b.call(aten.add.Tensor, part, scaled, name=f"{stem}_lora_out_{key}"))
            pos = end
        if pos < site.out_features:
            pieces.append(b.call(aten.slice.Tensor, y, -1, pos, site.out_features, name=f"{stem}_lora_keep_{pos}"))
        return b.call(aten.cat.default, pieces, -1, name=f"{stem}_lora_out")

    def _conv_delta(self, b: NodeBuilder, site: ConvSite, x: Node, a_w: Node, b_w: Node, stem: str,
                    b_bias: Node | None = None) -> Node:
        """HF PEFT's conv LoRA: A is a conv with the base's kernel, stride and padding to r channels (over every input
        channel), B a 1x1 conv with the base's groups. A also takes the base's dilation, so a dilated site's delta has
        the base's output size (HF PEFT's A drops the dilation, which mis-sizes its output)."""
        n = len(site.kernel)
        dilation = list(site.dilation)
        if site.node.target == aten.convolution.default:
            down = b.call(aten.convolution.default, x, a_w, None, site.stride, site.padding, dilation, False,
                          [0] * n, 1, name=f"{stem}_lora_A")
            return b.call(aten.convolution.default, down, b_w, b_bias, [1] * n, [0] * n, [1] * n, False, [0] * n,
                          site.groups, name=f"{stem}_lora_B")
        down = b.call(site.node.target, x, a_w, None, site.stride, site.padding, dilation, name=f"{stem}_lora_A")
        one = {1: aten.conv1d.default, 2: aten.conv2d.default, 3: aten.conv3d.default}[n]
        return b.call(one, down, b_w, b_bias, [1] * n, [0] * n, [1] * n, site.groups, name=f"{stem}_lora_B")

    def _dora(self, gm: GraphModule, ctx: PassContext, b: NodeBuilder, site: MatmulSite | ConvSite, x: Node,
              y: Node, a_w: Node, b_w: Node, lora: Node, scaling: float, dropped: bool, dtype: torch.dtype,
              stem: str) -> Node:
        """HF PEFT's DoRA: y + (m/‖W + s·BA‖ - 1)·base + m/‖W + s·BA‖ · s·B(A x), the norm detached.

        `base` is y without its bias, or W·dropout(x) when dropout is active, as HF PEFT computes it.
        """
        weight = ctx.params[site.weight].tensor
        conv = isinstance(site, ConvSite)
        r = self.rule.rank_for(site.module)
        if conv:
            w = site.node.args[1]
            w_oi = w if weight.dtype == dtype else b.call(aten.to.dtype, w, dtype, name=f"{stem}_lora_w")
            flat_b = b.call(aten.view.default, b_w, [site.out_features, r], name=f"{stem}_lora_B_flat")
            flat_a = b.call(aten.view.default, a_w, [r, -1], name=f"{stem}_lora_A_flat")
            lw = b.call(aten.view.default, b.call(aten.mm.default, flat_b, flat_a, name=f"{stem}_lora_BA"),
                        list(weight.shape), name=f"{stem}_lora_weight")
            dims = list(range(1, weight.dim()))
        else:
            w = site.node.args[1] if site.form == "linear" else site.node.args[2 if site.form == "addmm" else 1]
            if weight.dtype != dtype:
                w = b.call(aten.to.dtype, w, dtype, name=f"{stem}_lora_w")
            # linear reads W as (out, in); addmm/mm/matmul as (in, out)
            w_oi = w if site.form == "linear" else b.call(aten.t.default, w, name=f"{stem}_lora_w_t")
            lw = b.call(aten.mm.default, b_w, a_w, name=f"{stem}_lora_weight")
            dims = [1]
        m_name = f"{site.adapter_prefix}.lora_magnitude_vector"
        shape = (1, site.out_features, *[1] * len(site.kernel)) if conv else (site.out_features,)
        in_out = not conv and site.weight_in_out
        ctx.params.add(gm, m_name, lambda: dora_magnitude(weight, dtype, in_out).reshape(shape), method="lora",
                       added_by=self.name)
        lw = b.call(aten.detach.default, lw, name=f"{stem}_lora_weight_detached")
        combined = b.call(aten.add.Tensor, w_oi, b.call(aten.mul.Tensor, lw, scaling, name=f"{stem}_dora_sdw"),
                          name=f"{stem}_dora_w")
        norm = b.call(aten.linalg_vector_norm.default, combined, 2, dims, conv, name=f"{stem}_dora_norm")
        if conv:
            norm = b.call(aten.transpose.int, norm, 0, 1, name=f"{stem}_dora_norm_t")
        norm = b.call(aten.detach.default, norm, name=f"{stem}_dora_norm_detached")
        scale = b.call(aten.div.Tensor, b.attr(m_name), norm, name=f"{stem}_dora_scale")
        if dropped:
            if not conv:
                base = b.call(aten.linear.default, x, w_oi, name=f"{stem}_dora_base")
            elif site.node.target == aten.convolution.default:
                base = b.call(aten.convolution.default, x, w_oi, None, *site.node.args[3:], name=f"{stem}_dora_base")
            else:
                base = b.call(site.node.target, x, w_oi, None, site.stride, site.padding, site.dilation, site.groups,
                              name=f"{stem}_dora_base")
        else:
            bias = _bias(site)
            base = y
            if bias is not None:
                if weight.dtype != dtype:
                    bias = b.call(aten.to.dtype, bias, dtype, name=f"{stem}_dora_bias")
                if conv:
                    bias = b.call(aten.view.default, bias, [1, -1, *[1] * len(site.kernel)],
                                  name=f"{stem}_dora_bias_view")
                base = b.call(aten.sub.Tensor, y, bias, name=f"{stem}_dora_base")
        base_term = b.call(aten.mul.Tensor, b.call(aten.sub.Tensor, scale, 1, name=f"{stem}_dora_scale_m1"), base,
                           name=f"{stem}_dora_base_term")
        lora_term = b.call(aten.mul.Tensor, b.call(aten.mul.Tensor, scale, lora, name=f"{stem}_dora_lora"), scaling,
                           name=f"{stem}_dora_lora_term")
        return b.call(aten.add.Tensor, y, b.call(aten.add.Tensor, base_term, lora_term, name=f"{stem}_dora"),
                      name=f"{stem}_lora_out")

    def _einsum_delta(self, b: NodeBuilder, site: MatmulSite, x: Node, a_w: Node, b_w: Node, stem: str) -> Node:
        """Same equation with A in W's place (r where W had out), then contract r with B."""
        contracted, kept = site.weight_subscripts
        inputs, output = site.equation.split("->")
        subs = inputs.split(",")
        w_idx = 1 - site.x_path[1]
        w_subs = subs[w_idx]
        a_laid = a_w if w_subs.index(kept) == 0 else b.call(aten.t.default, a_w, name=f"{stem}_lora_A_t")
        operands = [x, a_laid] if w_idx == 1 else [a_laid, x]
        down = b.call(aten.einsum.default, site.equation, operands, name=f"{stem}_lora_A")
        fresh = _free_letter(site.equation)
        up_eq = f"{output},{fresh}{kept}->{output.replace(kept, fresh)}"
        return b.call(aten.einsum.default, up_eq, [down, b_w], name=f"{stem}_lora_B")
