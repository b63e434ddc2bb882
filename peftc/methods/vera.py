"""VeRA (HF PEFT's `vera`): frozen shared random projections scaled by trained vectors, written with peftc.Method."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

import peftc


def _kaiming(generator: torch.Generator):
    """HF PEFT's VeRA init: Kaiming-uniform (gain √2, fan-in) drawn from one seeded generator, A then B."""
    def init(t: torch.Tensor) -> torch.Tensor:
        bound = math.sqrt(3.0) * math.sqrt(2.0) / math.sqrt(t.shape[1])
        return torch.empty(t.shape).uniform_(-bound, bound, generator=generator)
    return init


@peftc.register_method
class VeRA(peftc.Method):
    """VeRA: y = x W^T  ==>  y + λ_b ⊙ (B[:out] (λ_d ⊙ (A[:, :in] dropout(x)))), on matmuls.

    A [r, max in] and B [max out, r] are frozen, shared by every site and drawn as HF PEFT draws them
    (`projection_prng_key`); HF saves them as `base_model.vera_A` / `base_model.vera_B`, here `vera_A` / `vera_B`.
    Per site: `<module>.vera_lambda_b` [out] (zeros) and `<module>.vera_lambda_d` [r] (`d_initial`) train.
    """

    kind = "vera"
    peft_type = "VERA"  # HF PEFT's format both ways (options and tensor names are HF's)
    peft_defaults = {"init_weights": True, "save_projection": True, "bias": "none"}
    hf_names = {**peftc.Method.hf_names, "vera_dropout": "dropout"}

    r: int = 256
    dropout: float = 0.0
    d_initial: float = 0.1
    projection_prng_key: int = 0

    def validate(self) -> None:
        if self.r <= 0:
            raise peftc.SpecError(f"{self._where()}: `r` must be a positive integer, got {self.r}")
        if not 0 <= self.dropout < 1:
            raise peftc.SpecError(f"{self._where()}: `dropout` must be in [0, 1), got {self.dropout}")

    def shared_params(self, sites):
        generator = torch.Generator().manual_seed(self.projection_prng_key)
        return {"vera_A": peftc.Param((self.r, max(s.in_features for s in sites)), init=_kaiming(generator),
                                      trainable=False),
                "vera_B": peftc.Param((max(s.out_features for s in sites), self.r), init=_kaiming(generator),
                                      trainable=False)}

    def params(self, site):
        return {"vera_lambda_b": peftc.Param((site.out_features,), init="zeros"),
                "vera_lambda_d": peftc.Param((self.r,), init=self.d_initial)}

    def forward(self, site, x, y, p):
        if self.dropout and site.training:
            x = F.dropout(x, self.dropout, training=True)
        down = p.vera_lambda_d * F.linear(x, p.vera_A[:, :site.in_features])
        return y + p.vera_lambda_b * F.linear(down, p.vera_B[:site.out_features, :])

    def merge(self, site, w, p):
        b = p.vera_lambda_b[:, None] * p.vera_B[:site.out_features, :]
        return w + b @ (p.vera_lambda_d[:, None] * p.vera_A[:, :site.in_features])
