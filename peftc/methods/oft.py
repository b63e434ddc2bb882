"""OFT (HF PEFT's `oft`): a block-diagonal orthogonal rotation of the weight's input side, written with peftc.Method."""

from __future__ import annotations

import math
import warnings

import torch
import torch.nn.functional as F

import peftc


def adjust_oft_parameters(in_features: int, params: int) -> int:
    """HF PEFT's fix-up of a block size (or block count) that does not divide `in_features`: the nearest divisor,
    the lower one on a tie; `in_features` itself when `params` exceeds it."""
    if params >= in_features:
        return in_features
    higher = params
    while higher <= in_features and in_features % higher != 0:
        higher += 1
    lower = params
    while lower > 1 and in_features % lower != 0:
        lower -= 1
    return lower if params - lower <= higher - params else higher


def skew_symmetric(vec: torch.Tensor, size: int) -> torch.Tensor:
    """[b, size·(size-1)/2] ==> [b, size, size] Q with Q^T = -Q, the vector filling the strict upper triangle row by
    row (HF's `triu_indices` order). Built from slices and pads, so the traced graph holds no device-bound index."""
    rows, start = [], 0
    for i in range(size):
        n = size - 1 - i
        rows.append(F.pad(vec[:, start:start + n], (i + 1, 0)))
        start += n
    upper = torch.stack(rows, 1)
    return upper - upper.transpose(1, 2)


def cayley(q: torch.Tensor, neumann: bool, terms: int) -> torch.Tensor:
    """R = (I - Q)(I + Q)^-1 for skew-symmetric Q [b, n, n], or HF PEFT's truncated Neumann series of it:
    I + 2Q + 2Q² + ... + 2Q^(terms-2) + Q^(terms-1)."""
    eye = torch.ones_like(q[:, 0]).diag_embed()
    if not neumann:
        return torch.linalg.solve(eye + q, eye - q, left=False)
    r = eye
    if terms > 1:
        r = r + 2 * q
    if terms > 2:
        power = q @ q
        r = r + 2 * power
        for _ in range(3, terms - 1):
            power = power @ q
            r = r + 2 * power
        r = r + power @ q
    return r


def coft_project(vec: torch.Tensor, eps: float) -> torch.Tensor:
    """HF PEFT's COFT projection of [b, n] block parameters: each block's skew matrix Q stays when its Frobenius
    norm is at most eps/√b, and is scaled onto that sphere otherwise (‖Q‖_F = √2·‖row‖, Q being ±the row)."""
    radius = eps / math.sqrt(vec.shape[0])
    norm = (2 * vec.square().sum(-1, keepdim=True)).sqrt()
    return torch.where(norm <= radius, vec, vec * (radius / norm))


def rotate_input_side(w: torch.Tensor, rotations: torch.Tensor) -> torch.Tensor:
    """W' = W_flat · BD(R_1, ..., R_k)^T: W (any shape, out first) flattened to [out, k·b], rotations [k, b, b]."""
    k, b, _ = rotations.shape
    blocks = w.reshape(w.shape[0], k, b)
    return torch.einsum("oik,ick->oic", blocks, rotations).reshape(w.shape)


@peftc.register_method
class OFT(peftc.Method):
    """OFT: y = op(x, W)  ==>  y = op(x, W·BD(R)^T),  R_i = cayley(Q_i - Q_i^T), on matmuls and convolutions.

    HF PEFT 0.21's OFT rotates x in blocks before the base op (x·BD(R) through W^T is the same product); peftc
    rewrites the weight instead, so merging is evaluating W'. `<module>.oft_R.weight` [blocks, b(b-1)/2] (zeros:
    R = I at init; one row with `block_share`) holds each block's strict upper triangle. The input side (in, or
    in_channels·kernel on a convolution) splits into blocks of `oft_block_size`, or into `r` blocks, adjusted to
    a divisor as HF adjusts them. R is the Cayley transform, by default HF's 5-term Neumann series. COFT (`coft`)
    rotates by HF's projection of the parameters (coft_project) and, as HF's forward does, writes it into them
    before each call (before_call). `module_dropout` does nothing, as in HF PEFT 0.21, whose forward never applies it.
    """

    kind = "oft"
    peft_type = "OFT"
    sites = ("matmul", "conv")
    rewrite_order = "reversed"  # HF PEFT's layer rotates x by each active adapter in turn: x·R_1·R_2

    r: int = 0
    oft_block_size: int = 32
    block_share: bool = False
    use_cayley_neumann: bool = True
    num_cayley_neumann_terms: int = 5
    init_weights: bool = True
    module_dropout: float = 0.0
    coft: bool = False
    eps: float = 6e-5

    def validate(self) -> None:
        where = self._where()
        if self.r < 0 or self.oft_block_size < 0 or (self.r != 0) == (self.oft_block_size != 0):
            raise peftc.SpecError(f"{where}: give exactly one of `r` (blocks per layer) and `oft_block_size`, the "
                                  f"other 0 (r × oft_block_size = in_features); got r={self.r}, "
                                  f"oft_block_size={self.oft_block_size}")
        if self.num_cayley_neumann_terms < 1:
            raise peftc.SpecError(f"{where}: `num_cayley_neumann_terms` must be >= 1, got "
                                  f"{self.num_cayley_neumann_terms}")
        if self.coft and not self.eps > 0:
            raise peftc.SpecError(f"{where}: `eps` (COFT's radius) must be > 0, got {self.eps}")
        if not 0 <= self.module_dropout < 1:
            raise peftc.SpecError(f"{where}: `module_dropout` must be in [0, 1), got {self.module_dropout}")
        if self.module_dropout:
            warnings.warn(f"{where}: module_dropout={self.module_dropout} has no effect: HF PEFT 0.21 builds OFT's "
                          f"multiplicative dropout but its forward never applies it, and peftc computes what HF does")

    def layout(self, site, warn: bool = False) -> tuple[int, int]:
        """(blocks, block size) for this site, as HF PEFT's update_layer picks them."""
        if site.kind == "conv" and site.groups != 1:
            raise peftc.SpecError(f"{self._where()} on `{site.module}`: OFT rotates the whole input side of a "
                                  f"convolution, which a grouped one (groups={site.groups}) does not have; exclude it")
        fan_in = math.prod(site.weight_shape[1:])
        if self.r == 0:
            size = self.oft_block_size
            if fan_in % size:
                size = adjust_oft_parameters(fan_in, size)
                if warn:
                    warnings.warn(f"OFT on `{site.module}`: oft_block_size {self.oft_block_size} does not divide "
                                  f"{fan_in}; using {size}, as HF PEFT does")
            return fan_in // size, size
        blocks = self.r
        if fan_in % blocks or blocks > fan_in:
            blocks = adjust_oft_parameters(fan_in, blocks)
            if warn:
                warnings.warn(f"OFT on `{site.module}`: r {self.r} does not divide {fan_in}; using {blocks}, as HF "
                              f"PEFT does")
        return blocks, fan_in // blocks

    def params(self, site):
        blocks, size = self.layout(site, warn=True)
        if size < 2:
            raise peftc.SpecError(f"{self._where()} on `{site.module}`: blocks of size {size} have no rotation; use "
                                  f"a larger oft_block_size (or a smaller r)")
        init = "zeros" if self.init_weights else (lambda t: torch.nn.init.normal_(t, 0.0, 0.1))
        return {"oft_R.weight": peftc.Param((1 if self.block_share else blocks, size * (size - 1) // 2), init=init)}

    def rotations(self, site, p) -> torch.Tensor:
        blocks, size = self.layout(site)
        vec = p["oft_R.weight"]
        if self.coft:  # HF's forward computes R from the projected tensor, and its gradient flows to it unchanged
            vec = vec + (coft_project(vec, self.eps) - vec).detach()
        r = cayley(skew_symmetric(vec, size), self.use_cayley_neumann, self.num_cayley_neumann_terms)
        return r.expand(blocks, size, size) if self.block_share else r

    def rewrite_weight(self, site, w, p):
        return rotate_input_side(w, self.rotations(site, p).to(w.dtype))

    def uses(self, hook: str) -> bool:
        return hook != "before_call" or self.coft

    def before_call(self, sites) -> None:
        """COFT: each call starts by projecting oft_R in place, as HF PEFT's forward does, so training steps from
        the projected value (the graph projects too, so merge and export see the same R)."""
        for p in sites.values():
            p["oft_R.weight"].copy_(coft_project(p["oft_R.weight"], self.eps))
