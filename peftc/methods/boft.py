"""BOFT (HF PEFT's `boft`): a product of butterfly-permuted block-diagonal rotations and a per-output scale on the
weight, written with peftc.Method."""

from __future__ import annotations

import math

import torch

import peftc

from .oft import rotate_input_side


def butterfly_gather(w: torch.Tensor, chunk: int, half_block: int, inverse: bool = False) -> torch.Tensor:
    """W[:, perm] (or W[:, perm^-1]) for HF PEFT's block_butterfly_perm: within each chunk of `chunk` columns, the
    sub-blocks of `half_block` columns in even positions first, then the odd ones. A reshape and a permute, so
    the traced graph holds no index tensor."""
    out, n = w.shape[0], math.prod(w.shape[1:])
    pairs = chunk // half_block // 2
    split = (out, n // chunk, 2, pairs, half_block) if inverse else (out, n // chunk, pairs, 2, half_block)
    return w.reshape(split).transpose(2, 3).reshape(w.shape)


def cayley_exact(data: torch.Tensor) -> torch.Tensor:
    """HF PEFT's BOFT cayley_batch: Q = (data - data^T)/2, R = (I - Q)(I + Q)^-1, for data [b, n, n]."""
    q = 0.5 * (data - data.transpose(1, 2))
    eye = torch.ones_like(q[:, 0]).diag_embed()
    return torch.linalg.solve(eye + q, eye - q, left=False)


def block_dropout(rotations: torch.Tensor, p: float) -> torch.Tensor:
    """HF PEFT's BOFT multiplicative dropout, a training-time op: in one butterfly factor drawn uniformly,
    int(p·blocks) blocks drawn uniformly (without replacement) become the identity; nothing is rescaled. Draws
    are rand_like on the rotations, so the graph follows the model's device; the mask, not the RNG stream, is
    HF's."""
    factors, blocks, size, _ = rotations.shape
    dropped = int(p * blocks)
    if dropped == 0:
        return rotations
    factor_draw = torch.rand_like(rotations[:, 0, 0, 0])
    position = torch.ones_like(factor_draw).cumsum(0) - 1
    in_factor = position == factor_draw.argmax()
    block_draw = torch.rand_like(rotations[0, :, 0, 0])
    in_blocks = block_draw.argsort().argsort() < dropped  # the blocks holding the `dropped` smallest draws
    mask = (in_factor[:, None] & in_blocks[None, :]).to(rotations.dtype)[:, :, None, None]
    eye = torch.ones_like(rotations[..., 0]).diag_embed()
    return (1 - mask) * rotations + mask * eye


@peftc.register_method
class BOFT(peftc.Method):
    """BOFT: y = op(x, W)  ==>  y = op(x, s ⊙ W·B_0^T···B_{m-1}^T),  B_i = P_i·BD(R_i)·P_i^T, on matmuls and convs.

    HF PEFT's names and init: `<module>.boft_R` [m, blocks, b, b] (zeros, so every R_i = I), each block turned
    orthogonal by the Cayley transform of its skew part; `<module>.boft_s` [out, 1] ([1, out] on a convolution;
    ones) scales W's rows, which leaves the bias alone. P_i is HF's butterfly permutation for factor i (identity for
    i = 0), m = boft_n_butterfly_factor. HF rotates x before the base op; peftc rewrites the weight (the same
    product), so merging is evaluating W'. `boft_dropout` replaces blocks by the identity in training graphs only
    (block_dropout); a merge evaluates W' without it.
    """

    kind = "boft"
    peft_type = "BOFT"
    sites = ("matmul", "conv")

    boft_block_size: int = 4
    boft_block_num: int = 0
    boft_n_butterfly_factor: int = 1
    boft_dropout: float = 0.0
    init_weights: bool = True

    def validate(self) -> None:
        where = self._where()
        if self.boft_block_size < 0 or self.boft_block_num < 0 \
                or (self.boft_block_size != 0) == (self.boft_block_num != 0):
            raise peftc.SpecError(f"{where}: give exactly one of `boft_block_size` and `boft_block_num`, the other 0 "
                                  f"(their product is the layer's input size); got boft_block_size="
                                  f"{self.boft_block_size}, boft_block_num={self.boft_block_num}")
        if self.boft_n_butterfly_factor < 1:
            raise peftc.SpecError(f"{where}: `boft_n_butterfly_factor` must be a positive integer, got "
                                  f"{self.boft_n_butterfly_factor}")
        if not 0 <= self.boft_dropout < 1:
            raise peftc.SpecError(f"{where}: `boft_dropout` is the fraction of blocks set to the identity while "
                                  f"training, in [0, 1); got {self.boft_dropout}")

    def layout(self, site) -> tuple[int, int, int]:
        """(factors, blocks, block size) for this site, checked as HF PEFT's update_layer checks them."""
        where = f"{self._where()} on `{site.module}`"
        if site.kind == "conv" and site.groups != 1:
            raise peftc.SpecError(f"{where}: BOFT rotates the whole input side of a convolution, which a grouped one "
                                  f"(groups={site.groups}) does not have; exclude it")
        n = math.prod(site.weight_shape[1:])
        extra = self.boft_n_butterfly_factor - 1
        if self.boft_block_num:
            blocks = self.boft_block_num
            bad = n % blocks or (extra and (extra > int(math.log2(blocks)) or blocks % 2 ** extra))
            size = n // blocks
        else:
            size = self.boft_block_size
            bad = n % size or (extra and n % (size * 2 ** extra))
            blocks = n // size
        if bad or (extra and (blocks % 2 or size % 2)):
            raise peftc.SpecError(f"{where}: input size {n} does not split into {self.boft_n_butterfly_factor} "
                                  f"butterfly factor(s) of blocks (boft_block_size={self.boft_block_size}, "
                                  f"boft_block_num={self.boft_block_num}); blocks × size must be {n}, and with more "
                                  f"than one factor both even and blocks a multiple of 2^(factors-1)")
        return self.boft_n_butterfly_factor, blocks, size

    def params(self, site):
        factors, blocks, size = self.layout(site)
        scale_shape = (1, site.out_features) if site.kind == "conv" else (site.out_features, 1)
        if self.init_weights:
            return {"boft_R": peftc.Param((factors, blocks, size, size)), "boft_s": peftc.Param(scale_shape, 1.0)}
        return {"boft_R": peftc.Param((factors, blocks, size, size), init=lambda t: t.normal_(0.0, 0.1)),
                "boft_s": peftc.Param(scale_shape, init=lambda t: t.normal_(1.0, 0.1))}

    def rewrite_weight(self, site, w, p):
        factors, blocks, size = self.layout(site)
        rotations = cayley_exact(p.boft_R.reshape(factors * blocks, size, size)).reshape(factors, blocks, size, size)
        if site.training and self.boft_dropout:
            rotations = block_dropout(rotations, self.boft_dropout)
        n = math.prod(site.weight_shape[1:])
        w = w.reshape(w.shape[0], n)
        for i in range(factors):
            chunk = n // (blocks // 2 ** i)
            w = butterfly_gather(w, chunk, size // 2, inverse=True) if factors > 1 else w
            w = rotate_input_side(w, rotations[i].to(w.dtype))
            w = butterfly_gather(w, chunk, size // 2) if factors > 1 else w
        scale = p.boft_s.t() if site.kind == "conv" else p.boft_s
        return (w * scale.to(w.dtype)).reshape(site.weight_shape)
