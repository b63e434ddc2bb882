"""AdaLoRA (HF PEFT's `adalora`): an SVD-form update P Λ Q whose rank budget is reallocated during training, written
with peftc.Method; its orthogonality penalty is a Method.regularizer and `cm.update_and_allocate(step)` runs HF
PEFT's RankAllocator on the compiled model's tensors."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

import peftc


@peftc.register_method
class AdaLoRA(peftc.Method):
    """AdaLoRA: y = op(x, W)  ==>  y + op(dropout(x), s/(r + 1e-5) · B(Λ ⊙ A)),  s = lora_alpha (or r when 0).

    HF PEFT's names, shapes and init: `<module>.lora_A` [r, in] (right singular vectors, N(0, 0.02)), `lora_E`
    [r, 1] (the singular values Λ, zeros, so the output is unchanged at init), `lora_B` [out, r] (left singular
    vectors, N(0, 0.02)); r = init_r, and in = in_channels·kernel on a convolution. While training, the loss gets
    orth_reg_weight · mean over A and B of ‖AA^T - I‖_F / ‖B^T B - I‖_F (when the model returns one), and
    `cm.update_and_allocate(step)` zeroes the singular values of the least important triplets down to the cubic
    budget schedule (tinit, tfinal, deltaT, target_r, total_step), importance being HF's EMA of |p·∇p| (beta1)
    times its uncertainty (beta2).
    """

    kind = "adalora"
    # Saved with full-size tensors and no rank_pattern (masked triplets are zeros, so HF computes the same); a
    # config with a rank_pattern (HF's resized tensors) is refused when read.
    peft_type = "ADALORA"
    peft_defaults = {"r": None, "init_lora_weights": True}
    sites = ("matmul", "conv")

    target_r: int = 8
    init_r: int = 12
    tinit: int = 0
    tfinal: int = 0
    deltaT: int = 1
    beta1: float = 0.85
    beta2: float = 0.85
    orth_reg_weight: float = 0.5
    total_step: int = 0
    lora_alpha: float = 8.0
    lora_dropout: float = 0.0

    def validate(self) -> None:
        where = self._where()
        if self.total_step <= 0:
            raise peftc.SpecError(f"{where}: `total_step` (the number of training steps) must be set, > 0")
        if self.init_r <= 0 or self.target_r < 0:
            raise peftc.SpecError(f"{where}: `init_r` must be positive and `target_r` >= 0, got init_r="
                                  f"{self.init_r}, target_r={self.target_r}")
        if self.tinit >= self.total_step - self.tfinal:
            raise peftc.SpecError(f"{where}: `tinit`={self.tinit}, `tfinal`={self.tfinal}, `total_step`="
                                  f"{self.total_step} leave no budgeting phase; decrease tinit/tfinal or increase "
                                  f"total_step")
        if not (0 < self.beta1 < 1 and 0 < self.beta2 < 1):
            raise peftc.SpecError(f"{where}: `beta1` and `beta2` must be in (0, 1), got {self.beta1}, {self.beta2}")
        if self.orth_reg_weight < 0 or self.deltaT <= 0 or not 0 <= self.lora_dropout < 1:
            raise peftc.SpecError(f"{where}: need `orth_reg_weight` >= 0, `deltaT` > 0 and 0 <= `lora_dropout` < 1; "
                                  f"got {self.orth_reg_weight}, {self.deltaT}, {self.lora_dropout}")

    def params(self, site):
        fan_in = math.prod(site.weight_shape[1:])
        normal = lambda t: torch.nn.init.normal_(t, 0.0, 0.02)  # noqa: E731
        return {"lora_A": peftc.Param((self.init_r, fan_in), init=normal),
                "lora_E": peftc.Param((self.init_r, 1), init="zeros"),
                "lora_B": peftc.Param((site.out_features, self.init_r), init=normal)}

    def scale(self) -> float:
        # HF's ranknum: init_r, fixed (masked triplets are zeroed, not removed)
        return (self.lora_alpha if self.lora_alpha > 0 else float(self.init_r)) / (self.init_r + 1e-5)

    def delta(self, site, p):
        return (p.lora_B @ (p.lora_A * p.lora_E) * self.scale()).reshape(site.weight_shape)

    def forward(self, site, x, y, p):
        if self.lora_dropout and site.training:
            x = F.dropout(x, self.lora_dropout, training=True)
        if site.kind == "matmul":
            return y + F.linear(F.linear(x, p.lora_A * p.lora_E), p.lora_B) * self.scale()
        return y + site.apply(x, self.delta(site, p))

    def merge(self, site, w, p):
        return w + self.delta(site, p)

    def regularizer(self, sites: dict[str, peftc.method.Tensors]) -> torch.Tensor | float:
        """HF PEFT's orthogonality penalty: orth_reg_weight · mean of ‖AA^T - I‖_F and ‖B^T B - I‖_F."""
        norms = []
        for p in sites.values():
            for cov in (p.lora_A @ p.lora_A.T, p.lora_B.T @ p.lora_B):
                norms.append(torch.linalg.matrix_norm(cov - torch.eye(cov.shape[0], dtype=cov.dtype,
                                                                         device=cov.device)))
        return self.orth_reg_weight * (sum(norms) / len(norms)) if norms else 0.0


class RankAllocator:
    """HF PEFT's AdaLoRA RankAllocator on a compiled model's tensors (`<module>.lora_A/E/B`)."""

    def __init__(self, rule: AdaLoRA, modules: dict[str, dict[str, torch.nn.Parameter]]):
        self.rule, self.modules = rule, dict(sorted(modules.items()))
        self.init_bgt = sum(m["lora_A"].shape[0] for m in self.modules.values())
        self.target_bgt = rule.target_r * len(self.modules)
        self.rank_pattern: dict[str, list[bool]] | None = None
        self.reset_ipt()

    def reset_ipt(self) -> None:
        self.ipt: dict[str, torch.Tensor] = {}
        self.exp_avg_ipt: dict[str, torch.Tensor] = {}
        self.exp_avg_unc: dict[str, torch.Tensor] = {}

    def _named(self):
        for module, tensors in self.modules.items():
            for key, p in tensors.items():
                yield f"{module}.{key}", p

    def budget_schedule(self, step: int) -> tuple[int, bool]:
        r = self.rule
        if step <= r.tinit:
            return self.init_bgt, False
        if step > r.total_step - r.tfinal:
            return self.target_bgt, True
        mul_coeff = 1 - (step - r.tinit) / (r.total_step - r.tfinal - r.tinit)
        return int((self.init_bgt - self.target_bgt) * (mul_coeff ** 3) + self.target_bgt), step % r.deltaT == 0

    def update_ipt(self) -> None:
        b1, b2 = self.rule.beta1, self.rule.beta2
        with torch.no_grad():
            for name, p in self._named():
                if p.grad is None:
                    raise peftc.PeftcError(f"update_and_allocate: `{name}` has no gradient; call it after "
                                           f"loss.backward() and before zero_grad()")
                if name not in self.ipt:
                    self.exp_avg_ipt[name] = torch.zeros_like(p)
                    self.exp_avg_unc[name] = torch.zeros_like(p)
                self.ipt[name] = (p * p.grad).abs().detach()
                self.exp_avg_ipt[name] = b1 * self.exp_avg_ipt[name] + (1 - b1) * self.ipt[name]
                self.exp_avg_unc[name] = b2 * self.exp_avg_unc[name] + (1 - b2) * \
                    (self.ipt[name] - self.exp_avg_ipt[name]).abs()

    def _score(self, name: str) -> torch.Tensor:
        return self.exp_avg_ipt[name] * self.exp_avg_unc[name]

    def mask_to_budget(self, budget: int) -> dict[str, list[bool]]:
        if not self.exp_avg_ipt:
            raise peftc.PeftcError("update_and_allocate: no sensitivity recorded before this allocation; call it at "
                                   "every training step from step 0, as HF PEFT's schedule expects")
        triplets = {}
        for module in self.modules:
            a = self._score(f"{module}.lora_A").mean(dim=1, keepdim=True)
            b = self._score(f"{module}.lora_B").mean(dim=0).view(-1, 1)
            triplets[module] = self._score(f"{module}.lora_E").view(-1) + torch.cat([a, b], dim=1).sum(dim=1)
        threshold = torch.kthvalue(torch.cat(list(triplets.values())), k=self.init_bgt - budget)[0].item()
        pattern = {}
        with torch.no_grad():
            for module, score in triplets.items():
                keep = score.view(-1, 1) > threshold
                self.modules[module]["lora_E"].masked_fill_(~keep, 0.0)
                pattern[f"{module}.lora_E"] = keep.view(-1).tolist()
        return pattern

    def mask_using_rank_pattern(self) -> None:
        with torch.no_grad():
            for module, tensors in self.modules.items():
                keep = torch.tensor(self.rank_pattern[f"{module}.lora_E"], device=tensors["lora_E"].device)
                tensors["lora_E"].masked_fill_(~keep.view(-1, 1), 0.0)

    def step(self, global_step: int) -> None:
        """HF PEFT's AdaLoraModel.update_and_allocate."""
        end = self.rule.total_step - self.rule.tfinal
        if global_step < end:
            self.update_ipt()
            budget, mask = self.budget_schedule(global_step)
            if mask:
                self.rank_pattern = self.mask_to_budget(budget)
        elif global_step == end:
            self.rank_pattern = self.mask_to_budget(self.budget_schedule(global_step)[0])
            self.reset_ipt()
        elif self.rank_pattern is not None:
            self.mask_using_rank_pattern()


def update_and_allocate(cm, global_step: int) -> RankAllocator:
    """cm.update_and_allocate(step): AdaLoRA's budget step for the spec's AdaLoRA rule (after backward, before
    zero_grad, as in HF PEFT). The allocator lives on cm; its `rank_pattern` is HF's (keys `<module>.lora_E`)."""
    allocator = cm.__dict__.get("_peftc_rank_allocator")
    if allocator is None:
        rules = [r for r in (cm.spec.rules if cm.spec is not None else ()) if isinstance(r, AdaLoRA)]
        if len(rules) != 1:
            raise peftc.SpecError(f"update_and_allocate needs a spec with one AdaLoRA rule; this one has "
                                  f"{len(rules)}")
        modules = {module: {k: cm.get_parameter(n) for k, n in names.items()}
                   for module, names in peftc.method.site_params(cm, rules[0]).items()}
        allocator = cm.__dict__["_peftc_rank_allocator"] = RankAllocator(rules[0], modules)
    allocator.step(global_step)
    return allocator
