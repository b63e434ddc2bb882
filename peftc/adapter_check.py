"""Checks an adapter state dict completely before any tensor of a compiled model is overwritten.

`CompiledModel.load_adapter_state_dict` copies only after `check_adapter_state_dict` passed, so a bad entry (an int
key, a meta tensor, a NaN) leaves every adapter as it was instead of half-loaded.
"""

from __future__ import annotations

import difflib
from collections.abc import Mapping
from typing import Any

import torch

from .errors import AdapterError


def _shown(key: Any) -> str:
    """`name` as is when it reads plainly, else its repr ('' or 'a\\nb'), shortened."""
    plain = isinstance(key, str) and key and key.isprintable() and key.strip() == key
    text = f"`{key}`" if plain else repr(key)
    return text if len(text) <= 80 else f"{text[:80]}..."


def check_adapter_state_dict(state_dict: Any, ours: Mapping[str, torch.Tensor], source: str = "adapter state dict"
                             ) -> None:
    """Raise AdapterError naming the first key whose entry cannot be loaded into `ours` (name ==> tensor).

    An entry loads when its key is one of ours, its value a dense, non-meta torch.Tensor with our shape, of a
    floating dtype whose values are finite once cast to our dtype (integer for our integer tensors: SparseDelta's
    indices). Every one of ours must be given.
    """
    if not isinstance(state_dict, Mapping):
        raise AdapterError(f"{source} must be a mapping {{name: tensor}} (e.g. cm.adapter_state_dict()), got "
                           f"{type(state_dict).__name__}")
    for key in state_dict:
        if not isinstance(key, str):
            raise AdapterError(f"{source} has a key {_shown(key)} of type {type(key).__name__}; keys are adapter "
                               f"names such as `{next(iter(ours), 'q_proj.lora_A.weight')}`")
        if key not in ours:
            close = difflib.get_close_matches(key, list(ours), n=1)
            hint = f"; did you mean `{close[0]}`?" if close else ""
            raise AdapterError(f"{source} has unknown key {_shown(key)}{hint}")
    for key, value in state_dict.items():
        _check_tensor(key, value, ours[key], source)
    missing = [k for k in ours if k not in state_dict]
    if missing:
        raise AdapterError(f"{source} is missing `{missing[0]}`"
                           + (f" and {len(missing) - 1} more" if len(missing) > 1 else ""))


def _check_tensor(key: str, value: Any, target: torch.Tensor, source: str) -> None:
    where = f"{source}: adapter {_shown(key)}"
    if not isinstance(value, torch.Tensor):
        raise AdapterError(f"{where} is a {type(value).__module__}.{type(value).__qualname__}, not a torch.Tensor"
                           + ("; convert it with torch.from_numpy" if type(value).__module__ == "numpy" else ""))
    if value.is_meta:
        raise AdapterError(f"{where} is a meta tensor (a shape without data); load its values first")
    if value.layout != torch.strided:
        raise AdapterError(f"{where} is a {value.layout} tensor; give a dense one (.to_dense())")
    if target.is_floating_point() and not value.is_floating_point():
        raise AdapterError(f"{where} has dtype {value.dtype}; adapter weights are floating point (the model's "
                           f"is {target.dtype})")
    if not target.is_floating_point() and (value.is_floating_point() or value.is_complex()
                                           or value.dtype == torch.bool):
        raise AdapterError(f"{where} has dtype {value.dtype}; it holds integer indices ({target.dtype})")
    if tuple(value.shape) != tuple(target.shape):
        raise AdapterError(f"{where} has shape {tuple(value.shape)}; the model expects {tuple(target.shape)}")
    if value.numel() and target.is_floating_point():
        value = value.detach()
        if not bool(torch.isfinite(value.to(torch.float64 if value.dtype == torch.float64 else torch.float32)).all()):
            raise AdapterError(f"{where} contains NaN or inf values; an adapter with them makes every output NaN")
        if not bool(torch.isfinite(value.to(target.dtype)).all()):
            raise AdapterError(f"{where} has values beyond the range of the model's {target.dtype}, which it would "
                               f"hold as inf")
