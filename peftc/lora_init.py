"""LoRA initializations, HF PEFT's `init_lora_weights`: True, False, "gaussian", "pissa", "pissa_niter_<k>", "olora".

    True        A Kaiming-uniform(a=√5), B = 0                      (the graph computes what it did)
    "gaussian"  A ~ N(0, 1/r²) (std 1/r), B = 0                     (the same)
    False       A and B Kaiming-uniform(a=√5), as nn.Linear/nn.Conv left them in HF (the output changes)
    "pissa"     W = U S Vᵀ: B = U_r √(S_r/s), A = √(S_r/s) V_rᵀ, W ==> W - s·BA (exact SVD; "pissa_niter_k":
                torch.svd_lowrank with k iterations, random as in HF)
    "olora"     W = QR: B = Q[:, :r], A = R[:r], W ==> W - s·BA

PiSSA and OLoRA rewrite the base weight to its residual: a weight transform on the parameter table (the table's W
becomes a new frozen tensor; the source model is left as it is), so W_res + s·BA = W at init and every graph of the
compiled model reads W_res. Merging folds s·BA into W_res, as HF's merge does. HF computes in float32 and casts the
residual back to W's dtype; so does peftc. Embedding lookups take HF's embedding init for every truthy value
(A = 0, B ~ N(0, 1)), as HF's lora.Embedding does; False gives A, B ~ N(0, 1).
"""

from __future__ import annotations

import math
import re

import torch
from torch import nn

from .errors import SpecError

MUTATING = ("pissa", "olora")  # inits that rewrite the base weight to a residual


def check(value) -> None:
    ok = value is True or value is False or value in ("gaussian", "pissa", "olora") \
        or (isinstance(value, str) and re.fullmatch(r"pissa_niter_\d+", value))
    if not ok:
        raise SpecError(f"LoRA: `init` (HF's init_lora_weights) must be true, false, 'gaussian', 'pissa', "
                        f"'pissa_niter_<iterations>' or 'olora', got {value!r}")


def mutates_base(value) -> bool:
    return isinstance(value, str) and value.startswith(MUTATING)


def _kaiming(shape, like: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    t = torch.empty(shape, dtype=dtype, device=like.device)
    nn.init.kaiming_uniform_(t, a=math.sqrt(5))
    return t


def random_factors(value, a_shape, b_shape, like: torch.Tensor, dtype: torch.dtype, r: int):
    """(A, B) for the inits that do not read W."""
    if value is True:
        return _kaiming(a_shape, like, dtype), torch.zeros(b_shape, dtype=dtype, device=like.device)
    if value == "gaussian":
        a = torch.empty(a_shape, dtype=dtype, device=like.device)
        nn.init.normal_(a, std=1 / r)
        return a, torch.zeros(b_shape, dtype=dtype, device=like.device)
    return _kaiming(a_shape, like, dtype), _kaiming(b_shape, like, dtype)  # False


def decompose(value: str, w_oi: torch.Tensor, r: int, scaling: float):
    """(A [r, in], B [out, r]) of PiSSA / OLoRA from W laid out (out, in), in float32, and the residual
    W - s·BA (float32, (out, in))."""
    w = w_oi.detach().to(torch.float32)
    if value == "olora":
        q, rr = torch.linalg.qr(w)
        b, a = q[:, :r].contiguous(), rr[:r].contiguous()
    else:
        if value == "pissa":
            u, s, vh = torch.linalg.svd(w, full_matrices=False)
            u, s, vh = u[:, :r], s[:r], vh[:r]
        else:
            u, s, v = torch.svd_lowrank(w, r, niter=int(value.rpartition("_")[2]))
            vh = v.t()
        s = torch.sqrt(s / scaling)
        a, b = torch.diag(s) @ vh, u @ torch.diag(s)
    return a, b, w - scaling * b @ a


def replace_base(gm, ctx, name: str, residual: torch.Tensor) -> None:
    """The table's base tensor `name` ==> `residual` (a new frozen tensor, W's dtype), rebound into `gm`."""
    from .params import set_attr_path

    entry = ctx.params[name]
    old = entry.tensor
    new = residual.to(old.dtype).contiguous()
    entry.tensor = nn.Parameter(new, requires_grad=False) if isinstance(old, nn.Parameter) else new
    set_attr_path(gm, name, entry.tensor)
