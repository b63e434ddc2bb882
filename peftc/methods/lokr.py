"""LoKr (HF PEFT's `lokr`): a Kronecker product as the weight delta, written with peftc.Method."""

from __future__ import annotations

import math

import torch

import peftc


def factorization(dimension: int, factor: int = -1) -> tuple[int, int]:
    """HF PEFT's LoKr split of `dimension` into m·n, m <= n: `factor` itself when it divides, else the divisor
    pair closest to the square root whose smaller side is at most `factor` (-1: no bound)."""
    if factor > 0 and dimension % factor == 0:
        return factor, dimension // factor
    bound = dimension if factor == -1 else factor
    m, n = 1, dimension
    while m < n:
        d = next(k for k in range(m + 1, dimension + 1) if dimension % k == 0)
        if d + dimension // d > m + n or d > bound:
            break
        m, n = d, dimension // d
    return min(m, n), max(m, n)


@peftc.register_method
class LoKr(peftc.Method):
    """LoKr: y = op(x, W)  ==>  y + op(x, s·(W1 ⊗ W2)),  s = alpha/r, on matmuls and convolutions.

    out = a·b and in = c·d are split as HF PEFT splits them (`decompose_factor`); W1 [a, c] is `<module>.lokr_w1`
    (zeros), or `lokr_w1_a` [a, r] (zeros) · `lokr_w1_b` [r, c] with `decompose_both` when r < max(a, c)/2; W2
    [b, d] is `lokr_w2` (Kaiming-uniform), or `lokr_w2_a` [b, r] · `lokr_w2_b` [r, d] when r < max(b, d)/2. On a
    convolution `in` is in_channels/groups and W2 carries the kernel (`lokr_w2` [b, d, *kernel], or `lokr_w2_b`
    [r, d·kernel]); the delta is applied with the base's stride, padding, dilation and groups.
    """

    kind = "lokr"
    peft_type = "LOKR"  # HF PEFT's format both ways (options and tensor names are HF's)
    peft_defaults = {"init_weights": True}
    sites = ("matmul", "conv")

    r: int = 8
    alpha: float = 8.0
    decompose_both: bool = False
    decompose_factor: int = -1

    def validate(self) -> None:
        if self.r <= 0 or self.alpha <= 0:
            raise peftc.SpecError(f"{self._where()}: `r` and `alpha` must be positive, got r={self.r}, "
                                  f"alpha={self.alpha}")
        if self.decompose_factor == 0 or self.decompose_factor < -1:
            raise peftc.SpecError(f"{self._where()}: `decompose_factor` must be -1 (near the square root) or a "
                                  f"positive factor, got {self.decompose_factor}")

    def layout(self, site):
        """((a, b), (c, d), kernel, full W1, full W2), as HF PEFT chooses them."""
        (a, b), (c, d) = (factorization(site.weight_shape[0], self.decompose_factor),
                          factorization(site.weight_shape[1], self.decompose_factor))
        full_w1 = not (self.decompose_both and self.r < max(a, c) / 2)
        full_w2 = not self.r < max(b, d) / 2
        return (a, b), (c, d), tuple(site.weight_shape[2:]), full_w1, full_w2

    def params(self, site):
        (a, b), (c, d), kernel, full_w1, full_w2 = self.layout(site)
        p = {"lokr_w1": peftc.Param((a, c))} if full_w1 else \
            {"lokr_w1_a": peftc.Param((a, self.r)), "lokr_w1_b": peftc.Param((self.r, c), init="kaiming_uniform")}
        if full_w2:
            p["lokr_w2"] = peftc.Param((b, d, *kernel), init="kaiming_uniform")
        else:
            p["lokr_w2_a"] = peftc.Param((b, self.r), init="kaiming_uniform")
            p["lokr_w2_b"] = peftc.Param((self.r, d * math.prod(kernel)), init="kaiming_uniform")
        return p

    def delta(self, site, p):
        _, _, kernel, full_w1, full_w2 = self.layout(site)
        w1 = p.lokr_w1 if full_w1 else p.lokr_w1_a @ p.lokr_w1_b
        w2 = p.lokr_w2 if full_w2 else p.lokr_w2_a @ p.lokr_w2_b
        if full_w2 and len(kernel) == 2:  # HF's make_kron lines W1 up with a 2-d kernel only
            w1 = w1[:, :, None, None]
        return (torch.kron(w1, w2) * (self.alpha / self.r)).reshape(site.weight_shape)

    def forward(self, site, x, y, p):
        return y + site.apply(x, self.delta(site, p))

    def merge(self, site, w, p):
        return w + self.delta(site, p)
