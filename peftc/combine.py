"""Several LoRA adapters ==> one, by HF PEFT's `LoraModel.add_weighted_adapter` rules (peft 0.21).

With w_i the weights and s_i each adapter's scaling on a module:

- linear family (linear, ties, dare_linear, dare_ties, magnitude_prune), ranks must agree:
      A = merge_i(√|w_i s_i|·sign(w_i s_i) · A_i),   B = merge_i(√|w_i s_i| · B_i)
  `merge` is a weighted sum (linear), TIES (magnitude pruning, sign election, disjoint mean), DARE (random
  pruning rescaled by 1/density, then a sum or TIES' sign election) or magnitude pruning then a sum.
- cat, any ranks:  A = [w_1 s_1 A_1; w_2 s_2 A_2; ...],  B = [B_1 | B_2 | ...],  so B A = Σ w_i s_i B_i A_i exactly.
- svd family (svd, ties_svd, dare_linear_svd, dare_ties_svd, magnitude_prune_svd):
      ΔW = merge_i(w_i · s_i B_i A_i) ≈ U_k S_k V_kᵀ,  B = U_k S_k,  A = V_kᵀ   (k = svd_rank or the max rank)

The combined adapter's config is the first adapter's with r = lora_alpha = the new rank, so its scaling is 1: every
source scaling is already inside the weights. Unlike peft 0.21 it also sets `use_rslora` to False; peft 0.21 keeps it
from the first adapter, so the combined adapter would be scaled by √r again (fixed in peft after 0.21).
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple, Sequence

import torch

from .errors import SpecError
from .peft_format import _INERT_DEFAULTS, _METADATA, _is_empty, _peft_module_match, _plain
from .spec import pattern_value

LINEAR_FAMILY = ("linear", "ties", "dare_linear", "dare_ties", "magnitude_prune")
SVD_FAMILY = ("svd", "ties_svd", "dare_linear_svd", "dare_ties_svd", "magnitude_prune_svd")
COMBINATION_TYPES = (*LINEAR_FAMILY, "cat", *SVD_FAMILY)
# How each merge treats the stacked task tensors: (pruning, TIES' sign election).
_MERGES = {"linear": (None, False), "ties": ("magnitude", True), "dare_linear": ("random", False),
           "dare_ties": ("random", True), "magnitude_prune": ("magnitude", False)}
SIGN_METHODS = ("total", "frequency")
SVD_DRIVERS = ("gesvd", "gesvdj", "gesvda")
# LoraConfig keys whose value the combination understands; any other key must keep its default (DoRA, lora_bias,
# modules_to_save, target_parameters, ...: HF PEFT 0.21 combines only A and B and silently drops the rest).
_COMBINABLE_KEYS = {"target_modules", "exclude_modules", "r", "lora_alpha", "use_rslora", "rank_pattern",
                    "alpha_pattern", "lora_dropout", "layers_to_transform", "layers_pattern", "fan_in_fan_out",
                    "init_lora_weights"}
# state-dict key suffixes of a module's LoRA factors: (A suffix, B suffix, embedding?)
_FACTORS = ((".lora_A.weight", ".lora_B.weight", False), (".lora_embedding_A", ".lora_embedding_B", True))


class CombineError(SpecError):
    """Adapters cannot be combined as asked (add_weighted_adapter)."""


class _Source(NamedTuple):
    """One adapter's factors on one module, with its combination weight and its scaling there."""
    a: torch.Tensor
    b: torch.Tensor
    weight: float
    scaling: float


def combine_lora(adapters: list[dict[str, torch.Tensor]], configs: list[dict], weights: list[float],
                 combination_type: str, *, svd_rank: int | None = None, svd_clamp: float | None = None,
                 svd_full_matrices: bool = True, svd_driver: str | None = None, density: float | None = None,
                 majority_sign_method: str = "total",
                 module_order: Sequence[str] | None = None) -> tuple[dict[str, torch.Tensor], dict]:
    """(state dict, PEFT config) of the adapter HF PEFT's `add_weighted_adapter` builds from `adapters`.

    `adapters` are LoRA state dicts in HF PEFT's key names without the adapter name
    (`model.layers.0.self_attn.q_proj.lora_A.weight`, `model.embed_tokens.lora_embedding_A`), `configs` their
    LoraConfig dicts. One adapter is always combined linearly, as HF PEFT does.

    DARE draws its masks from torch's global generator in HF PEFT's order: module by module, A's then B's (the svd
    family: one ΔW per adapter), adapters in order. HF PEFT visits modules in model order; `module_order` (the
    model's `named_modules()` paths) gives that order when the adapters adapt different modules; by default modules
    come in the order they first appear in the adapters.
    """
    n = len(adapters)
    _check_arguments(adapters, configs, weights, combination_type, svd_rank, svd_clamp, svd_driver, density,
                     majority_sign_method)
    if n == 1:
        combination_type = "linear"
    configs = [_checked_config(c, i) for i, c in enumerate(configs)]
    factors = [_factors(sd, i) for i, sd in enumerate(adapters)]
    ranks = [max([c["r"], *c["rank_pattern"].values()]) for c in configs]
    if combination_type in LINEAR_FAMILY:
        if len(set(ranks)) != 1:
            raise CombineError(f"add_weighted_adapter: combination_type={combination_type!r} needs adapters of one "
                               f"rank, got r={ranks}; use combination_type='cat' (exact, rank {sum(ranks)}) or "
                               f"'svd' (rank svd_rank, default {max(ranks)})")
        new_rank = ranks[0]
    elif combination_type == "cat":
        new_rank = sum(ranks)
    else:
        new_rank = svd_rank or max(ranks)
    config = {**configs[0], "r": new_rank, "lora_alpha": new_rank, "target_modules": _union_targets(configs, factors),
              "rank_pattern": {}, "alpha_pattern": {}, "use_rslora": False}

    modules = _ordered_modules(factors, module_order)
    modules = [m for m in modules if _peft_module_match(config, m)]
    if not modules:
        raise CombineError("add_weighted_adapter: the combined config selects none of the adapters' modules "
                           "(exclude_modules / layers_to_transform come from the first adapter's config)")
    out: dict[str, torch.Tensor] = {}
    for module in modules:
        present = [(i, *factors[i][module]) for i in range(n) if module in factors[i]]
        _check_shapes(module, present)
        sources = [_Source(a, b, weights[i], _scaling(configs[i], module, a)) for i, a, b, _ in present]
        transposed = present[0][3] or bool(configs[present[0][0]].get("fan_in_fan_out"))
        if combination_type == "cat":
            a, b = _cat(sources)
        elif combination_type in LINEAR_FAMILY:
            a, b = _linear_family(sources, combination_type, density, majority_sign_method)
        else:
            a, b = _svd_family(sources, _merge_of(combination_type), new_rank, transposed, density,
                               majority_sign_method, svd_clamp, svd_full_matrices, svd_driver)
        a_key, b_key = (_FACTORS[1] if present[0][3] else _FACTORS[0])[:2]
        out[module + a_key], out[module + b_key] = _pad_rank(a, b, new_rank)
    return out, config


def _merge_of(combination_type: str) -> str:
    """The merge of A's and B's (linear family) or of the ΔW's (svd family) a combination type applies."""
    return "linear" if combination_type == "svd" else combination_type.removesuffix("_svd")


# ---- checks ------------------------------------------------------------------------------------------------------
def _check_arguments(adapters, configs, weights, combination_type, svd_rank, svd_clamp, svd_driver, density,
                     majority_sign_method) -> None:
    where = "add_weighted_adapter"
    if combination_type not in COMBINATION_TYPES:
        raise CombineError(f"{where}: unknown combination_type {combination_type!r}; valid: "
                           f"{', '.join(COMBINATION_TYPES)}")
    if not adapters:
        raise CombineError(f"{where}: no adapters given; pass the names of the adapters to combine")
    if len(configs) != len(adapters) or len(weights) != len(adapters):
        raise CombineError(f"{where}: {len(adapters)} adapters but {len(weights)} weights and {len(configs)} "
                           f"configs; give one weight per adapter")
    for i, w in enumerate(weights):
        if isinstance(w, bool) or not isinstance(w, (int, float)) or not math.isfinite(w):
            raise CombineError(f"{where}: weights[{i}] = {w!r} is not a finite number")
    if majority_sign_method not in SIGN_METHODS:
        raise CombineError(f"{where}: majority_sign_method={majority_sign_method!r}; valid: "
                           f"{', '.join(SIGN_METHODS)}")
    pruning = _MERGES[_merge_of(combination_type)][0] if combination_type != "cat" else None
    if pruning is not None:
        if density is None or isinstance(density, bool) or not isinstance(density, (int, float)) or density < 0:
            raise CombineError(f"{where}: combination_type={combination_type!r} prunes and needs density, the "
                               f"fraction of values kept, in [0, 1]; got density={density!r}")
        if density == 0 and pruning == "random":
            raise CombineError(f"{where}: {combination_type!r} rescales what it keeps by 1/density; density=0 "
                               f"keeps nothing. Give a density in (0, 1]")
    elif density is not None:
        raise CombineError(f"{where}: density applies only to the pruning types (ties, dare_*, magnitude_prune "
                           f"and their _svd forms), not to {combination_type!r}; drop it")
    svd_options = {"svd_rank": svd_rank, "svd_clamp": svd_clamp, "svd_driver": svd_driver}
    if combination_type not in SVD_FAMILY and len(adapters) > 1:
        given = [k for k, v in svd_options.items() if v is not None]
        if given:
            raise CombineError(f"{where}: {', '.join(given)} apply only to the svd types ({', '.join(SVD_FAMILY)}), "
                               f"not to {combination_type!r}; drop them")
    if svd_rank is not None and (isinstance(svd_rank, bool) or not isinstance(svd_rank, int) or svd_rank < 1):
        raise CombineError(f"{where}: svd_rank={svd_rank!r}; give a positive int (or None for the max rank)")
    if svd_clamp is not None and not (isinstance(svd_clamp, (int, float)) and 0 <= svd_clamp <= 1):
        raise CombineError(f"{where}: svd_clamp={svd_clamp!r} is a quantile; give a number in [0, 1] or None")
    if svd_driver is not None and svd_driver not in SVD_DRIVERS:
        raise CombineError(f"{where}: svd_driver={svd_driver!r}; valid: None, {', '.join(SVD_DRIVERS)} (CUDA only)")


def _checked_config(config: dict, i: int) -> dict:
    where = f"add_weighted_adapter: adapter {i}'s config"
    config = {k: _plain(v) for k, v in dict(config).items()}
    if config.get("peft_type", "LORA") != "LORA":
        raise CombineError(f"{where} is {config['peft_type']}; add_weighted_adapter combines LoRA adapters only")
    for key, value in config.items():
        if key in _COMBINABLE_KEYS or key in _METADATA or _is_empty(value) or _INERT_DEFAULTS.get(key) == value:
            continue
        raise CombineError(f"{where} sets `{key}` = {value!r}; only plain LoRA A/B weights can be combined (HF PEFT "
                           f"would silently drop what `{key}` adds). Combine adapters without it")
    # LoraConfig's defaults, for configs written by hand
    return {"r": 8, "lora_alpha": 8, "use_rslora": False, **config,
            "rank_pattern": config.get("rank_pattern") or {}, "alpha_pattern": config.get("alpha_pattern") or {}}


def _factors(state_dict: dict[str, torch.Tensor], i: int) -> dict[str, tuple[torch.Tensor, torch.Tensor, bool]]:
    """module path -> (A, B, embedding?) of one adapter's state dict."""
    where = f"add_weighted_adapter: adapter {i}"
    found: dict[str, tuple[torch.Tensor, torch.Tensor, bool]] = {}
    for key in state_dict:
        for a_suffix, b_suffix, embedding in _FACTORS:
            if key.endswith(a_suffix) or key.endswith(b_suffix):
                module = key.removesuffix(a_suffix).removesuffix(b_suffix)
                missing = [module + s for s in (a_suffix, b_suffix) if module + s not in state_dict]
                if missing:
                    raise CombineError(f"{where}: `{missing[0]}` is missing (its partner `{key}` is there); give "
                                       f"both LoRA factors of every module")
                found[module] = (state_dict[module + a_suffix], state_dict[module + b_suffix], embedding)
                break
        else:
            raise CombineError(f"{where}: `{key}` is not a LoRA A/B weight; add_weighted_adapter combines only "
                               f"`.lora_A.weight`/`.lora_B.weight` and `.lora_embedding_A`/`_B` (keys without the "
                               f"`base_model.model.` prefix and the adapter name)")
    if not found:
        raise CombineError(f"{where}: the state dict has no LoRA weights")
    return found


def _check_shapes(module: str, present: list) -> None:
    i0, a0, b0, emb0 = present[0]
    for i, a, b, emb in present:
        if a.dim() < 2 or b.dim() != a.dim() or b.shape[1] != a.shape[0]:
            raise CombineError(f"add_weighted_adapter: adapter {i}, `{module}`: lora_A {list(a.shape)} and lora_B "
                               f"{list(b.shape)} are not LoRA factors (B's dim 1 must be A's rank)")
        if emb != emb0 or a.shape[1:] != a0.shape[1:] or b.shape[0] != b0.shape[0] or b.shape[2:] != b0.shape[2:]:
            raise CombineError(f"add_weighted_adapter: `{module}` has lora_A {list(a.shape)}, lora_B "
                               f"{list(b.shape)} in adapter {i} but {list(a0.shape)}, {list(b0.shape)} in adapter "
                               f"{i0}; combine adapters trained on the same base model")


def _scaling(config: dict, module: str, a: torch.Tensor) -> float:
    """HF PEFT's per-module scaling: alpha/r (alpha/√r with rsLoRA), r and alpha by rank_pattern/alpha_pattern."""
    r = pattern_value(config["rank_pattern"], module, config["r"])
    if a.shape[0] != r:
        raise CombineError(f"add_weighted_adapter: `{module}`'s lora_A has rank {a.shape[0]} but its config says "
                           f"r={r}; give each adapter its own config")
    alpha = pattern_value(config["alpha_pattern"], module, config["lora_alpha"])
    return alpha / math.sqrt(r) if config["use_rslora"] else alpha / r


def _union_targets(configs: list[dict], factors: list[dict]) -> Any:
    """HF PEFT's target_modules of the combined adapter: regexes joined by `|`, name sets united."""
    targets = []
    for c, f in zip(configs, factors):
        t = c.get("target_modules")
        if isinstance(t, str) and t.lower() == "all-linear":
            t = set(f)  # HF PEFT resolves "all-linear" to the full paths of the modules it adapts
        targets.append(t)
    if all(isinstance(t, str) for t in targets):
        return "|".join(f"({t})" for t in targets)
    if all(isinstance(t, (list, tuple, set, frozenset)) for t in targets):
        return sorted(set().union(*targets))
    raise CombineError(f"add_weighted_adapter: target_modules are {[type(t).__name__ for t in targets]}; all must "
                       f"be regex strings or all lists of names (HF PEFT cannot combine a mix)")


def _ordered_modules(factors: list[dict], module_order: Sequence[str] | None) -> list[str]:
    modules = list(dict.fromkeys(m for f in factors for m in f))
    if module_order is None:
        return modules
    rank = {m: i for i, m in enumerate(module_order)}
    unknown = [m for m in modules if m not in rank]
    if unknown:
        raise CombineError(f"add_weighted_adapter: module_order lacks `{unknown[0]}` (and {len(unknown) - 1} "
                           f"more); give every module path of the model, in named_modules() order")
    return sorted(modules, key=rank.__getitem__)


# ---- the combinations --------------------------------------------------------------------------------------------
def _cat(sources: list[_Source]) -> tuple[torch.Tensor, torch.Tensor]:
    return (torch.cat([src.a * src.weight * src.scaling for src in sources], dim=0),
            torch.cat([src.b for src in sources], dim=1))


def _linear_family(sources: list[_Source], how: str, density, sign_method) -> tuple[torch.Tensor, torch.Tensor]:
    # √|w s| on each side so that B A carries w s; the sign goes on A only, or it would cancel.
    roots = [math.sqrt(abs(src.weight * src.scaling)) for src in sources]
    signs = [1 if src.weight * src.scaling >= 0 else -1 for src in sources]
    dtype, device = sources[0].a.dtype, sources[0].a.device
    a = _merge([src.a for src in sources], torch.tensor([r * g for r, g in zip(roots, signs)]).to(device), how,
               density, sign_method)
    b = _merge([src.b for src in sources], torch.tensor(roots).to(device), how, density, sign_method)
    return a.to(dtype), b.to(dtype)


def _svd_family(sources: list[_Source], how: str, new_rank: int, transposed: bool, density, sign_method, clamp,
                full_matrices, driver) -> tuple[torch.Tensor, torch.Tensor]:
    a0, b0 = sources[0].a, sources[0].b
    if driver is not None and a0.device.type != "cuda":
        raise CombineError(f"add_weighted_adapter: svd_driver={driver!r} is a cuSOLVER option; the adapters are on "
                           f"{a0.device.type}. Drop svd_driver or move the adapters to CUDA")
    deltas = [_delta_weight(src.a, src.b, src.scaling, transposed) for src in sources]
    delta = _merge(deltas, torch.tensor([src.weight for src in sources]).to(a0.device), how, density, sign_method)
    if transposed:
        delta = delta.T
    u, s, vh = torch.linalg.svd(delta, full_matrices=full_matrices, driver=driver)
    k = min(new_rank, s.numel())  # ranks beyond min(out, in) carry nothing; _pad_rank fills them with zeros
    u = u[:, :k] @ torch.diag(s[:k])
    vh = vh[:k, :]
    if clamp is not None:
        high = torch.quantile(torch.cat([u.flatten(), vh.flatten()]), clamp)
        u, vh = u.clamp(-high, high), vh.clamp(-high, high)
    return vh.reshape(k, *a0.shape[1:]).to(a0.dtype), u.reshape(b0.shape[0], k, *b0.shape[2:]).to(a0.dtype)


def _delta_weight(a: torch.Tensor, b: torch.Tensor, scaling: float, transposed: bool) -> torch.Tensor:
    """s·B A in the layout HF PEFT's get_delta_weight returns (transposed for embeddings and fan_in_fan_out), which
    is the layout DARE draws its masks in; half precision on CPU is multiplied in float32, as HF PEFT does."""
    dtype = a.dtype
    upcast = a.device.type == "cpu" and dtype in (torch.float16, torch.bfloat16)
    a, b = (a.float(), b.float()) if upcast else (a, b)
    delta = b.flatten(1) @ a.flatten(1)
    delta = (delta.T if transposed else delta) * scaling
    return delta.to(dtype)


def _merge(tensors: list[torch.Tensor], weights: torch.Tensor, how: str, density, sign_method) -> torch.Tensor:
    """Σ w_i t_i (linear), over pruned t_i (magnitude_prune, dare_linear), or TIES' disjoint mean (ties, dare_ties)."""
    pruning, elect_sign = _MERGES[how]
    if pruning is not None and density < 1:
        tensors = [_prune(t, density, pruning) for t in tensors]
    stacked = torch.stack(tensors, dim=0)
    weighted = stacked * weights.view(-1, *[1] * (stacked.dim() - 1))
    if not elect_sign:
        return weighted.sum(dim=0)
    sign = stacked.sign()
    votes = stacked.sum(dim=0) if sign_method == "total" else sign.sum(dim=0)
    agrees = sign == torch.where(votes >= 0, 1, -1)
    return (weighted * agrees).sum(dim=0) / torch.clamp(agrees.sum(dim=0), min=1.0)


def _prune(t: torch.Tensor, density: float, pruning: str) -> torch.Tensor:
    if pruning == "magnitude":  # keep the int(density·numel) largest |t|
        keep = torch.zeros_like(t).reshape(-1)
        keep[torch.topk(t.abs().reshape(-1), k=int(density * t.numel()), largest=True).indices] = 1
        return t * keep.reshape(t.shape)
    return t * torch.bernoulli(torch.full_like(t, density)) / density  # DARE: drop at random, rescale the rest


def _pad_rank(a: torch.Tensor, b: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Zero rows of A and columns of B up to `rank` (B A is unchanged), so that every module has the config's r."""
    if a.shape[0] == rank:
        return a, b
    a_full = a.new_zeros(rank, *a.shape[1:])
    b_full = b.new_zeros(b.shape[0], rank, *b.shape[2:])
    a_full[: a.shape[0]], b_full[:, : a.shape[0]] = a, b
    return a_full, b_full
