"""LoHa (HF PEFT's `loha`): a low-rank Hadamard product as the weight delta, written with peftc.Method."""

from __future__ import annotations

import peftc


@peftc.register_method
class LoHa(peftc.Method):
    """LoHa: y = op(x, W)  ==>  y + op(x, s·(W1a W1b) ⊙ (W2a W2b)),  s = alpha/r, on matmuls and convolutions.

    HF PEFT's names and init: `<module>.hada_w1_a` [out, r], `hada_w1_b` [r, in], `hada_w2_a` [out, r] (all
    Kaiming-uniform) and `hada_w2_b` [r, in] (zeros), so at init the graph computes what it did. On a convolution
    `in` is in_channels/groups · kernel, the delta is reshaped to the kernel and applied with the base's stride,
    padding, dilation and groups (HF's default, use_effective_conv2d=False).
    """

    kind = "loha"
    peft_type = "LOHA"  # HF PEFT's format both ways (options and tensor names are HF's)
    peft_defaults = {"init_weights": True}
    sites = ("matmul", "conv")

    r: int = 8
    alpha: float = 8.0

    def validate(self) -> None:
        if self.r <= 0 or self.alpha <= 0:
            raise peftc.SpecError(f"{self._where()}: `r` and `alpha` must be positive, got r={self.r}, "
                                  f"alpha={self.alpha}")

    def params(self, site):
        out, fan_in = site.weight_shape[0], _prod(site.weight_shape[1:])
        return {"hada_w1_a": peftc.Param((out, self.r), init="kaiming_uniform"),
                "hada_w1_b": peftc.Param((self.r, fan_in), init="kaiming_uniform"),
                "hada_w2_a": peftc.Param((out, self.r), init="kaiming_uniform"),
                "hada_w2_b": peftc.Param((self.r, fan_in), init="zeros")}

    def delta(self, site, p):
        hada = (p.hada_w1_a @ p.hada_w1_b) * (p.hada_w2_a @ p.hada_w2_b) * (self.alpha / self.r)
        return hada.reshape(site.weight_shape)

    def forward(self, site, x, y, p):
        return y + site.apply(x, self.delta(site, p))

    def merge(self, site, w, p):
        return w + self.delta(site, p)


def _prod(dims) -> int:
    n = 1
    for d in dims:
        n *= d
    return n
