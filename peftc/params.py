"""The parameter table: the half of the IR that the graph code does not show.

Every tensor a graph reads through `get_attr` is an entry: its qualified name (exactly as
`model.named_parameters()` spells it, or the HF PEFT adapter key), the tensor itself, its role and which pass
added it, and whether the spec trains it. The verifier checks that autograd agrees (`requires_grad`).
The table outlives one capture: when the model is captured again (another call signature, train vs eval) the
passes find their adapter tensors here and reuse them, so every graph shares one set of weights.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Callable, Iterator

import torch
from torch import nn

from .errors import PassError

BASE, BUFFER, ADAPTER = "base", "buffer", "adapter"


@dataclass
class Param:
    name: str
    tensor: torch.Tensor
    role: str  # BASE (a weight of the captured model), BUFFER (non-parameter state) or ADAPTER
    trainable: bool
    method: str = ""  # the spec method that owns an adapter ("lora", ...)
    added_by: str = ""  # the pass that added it

    def row(self) -> str:
        shape = "x".join(map(str, self.tensor.shape)) or "scalar"
        dtype = str(self.tensor.dtype).removeprefix("torch.")
        flag = "trainable" if self.trainable else "frozen"
        owner = f"{self.role}:{self.method}" if self.method else self.role
        return f"{self.name}  [{shape}] {dtype}  {flag}  {owner}"


def set_attr_path(root: nn.Module, dotted: str, value: torch.Tensor | nn.Module) -> None:
    """Set `root.<dotted>` to value, creating empty container modules along the way."""
    *path, leaf = dotted.split(".")
    mod = root
    for part in path:
        child = getattr(mod, part, None)
        if not isinstance(child, nn.Module):
            child = nn.Module()
            mod.add_module(part, child)
        mod = child
    if isinstance(value, nn.Parameter):
        mod.register_parameter(leaf, value)
    elif isinstance(value, nn.Module):
        mod.add_module(leaf, value)
    elif isinstance(value, torch.Tensor):
        if leaf in mod._parameters:
            del mod._parameters[leaf]
        mod.register_buffer(leaf, value)
    else:
        setattr(mod, leaf, value)


def get_attr_path(root: nn.Module, dotted: str):
    obj = root
    for part in dotted.split("."):
        obj = getattr(obj, part)
    return obj


def _asked_for(init: Callable[[], torch.Tensor], error: BaseException) -> str:
    """What an adapter initializer that failed asked for, e.g. "a [1000000000000, 16] float32 tensor (64.0 TB)",
    found by running it again on fake tensors (no memory); the error's first line when even that fails."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    try:
        with FakeTensorMode():
            fake = init()
    except Exception:
        return f"{type(error).__name__}: {str(error).strip().splitlines()[0][:200]}"
    size = float(fake.numel() * fake.element_size())
    for unit in ("B", "KB", "MB", "GB", "TB", "PB"):
        if size < 1000:
            break
        size /= 1000
    return f"it would be a {list(fake.shape)} {str(fake.dtype).removeprefix('torch.')} tensor ({size:.1f} {unit}), " \
           f"more than this machine can allocate"


class ParamTable:
    """Ordered name -> Param map shared by every graph of one compiled model."""

    def __init__(self) -> None:
        self._entries: dict[str, Param] = {}
        # Tensors fold-params computed, keyed by the expression that computed them: (name, tensor).
        self.constants: dict[str, tuple[str, torch.Tensor]] = {}

    def __contains__(self, name: str) -> bool:
        return name in self._entries

    def __getitem__(self, name: str) -> Param:
        return self._entries[name]

    def __iter__(self) -> Iterator[Param]:
        return iter(self._entries.values())

    def __len__(self) -> int:
        return len(self._entries)

    def copy(self) -> "ParamTable":
        """A table with copies of the entries (the tensors are shared) and no folded constants."""
        table = ParamTable()
        table._entries = {name: dataclasses.replace(p) for name, p in self._entries.items()}
        return table

    def insert(self, param: Param) -> None:
        """Enter `param` as it is (a tensor another table or a bank of adapters owns); replaces one of that name."""
        self._entries[param.name] = param

    def pop(self, name: str) -> Param:
        return self._entries.pop(name)

    def names(self, role: str | None = None) -> list[str]:
        return [p.name for p in self if role is None or p.role == role]

    def trainable_names(self) -> set[str]:
        return {p.name for p in self if p.trainable}

    def adopt(self, name: str, tensor: torch.Tensor, role: str) -> torch.Tensor:
        """Record a tensor the captured graph already reads; keep the first one seen under that name."""
        if name not in self._entries:
            self._entries[name] = Param(name, tensor, role, trainable=tensor.requires_grad)
        return self._entries[name].tensor

    def add(self, gm: nn.Module, name: str, init: Callable[[], torch.Tensor], *, method: str, added_by: str,
            trainable: bool = True) -> nn.Parameter:
        """Add an adapter parameter and bind it into `gm` at `name`.

        `init` runs only the first time: a later capture of the same model reuses the existing tensor.
        """
        entry = self._entries.get(name)
        if entry is None:
            try:
                tensor = init()
            except (RuntimeError, MemoryError, OverflowError) as e:
                raise PassError(f"{added_by}: cannot allocate adapter `{name}`: {_asked_for(init, e)}; lower the "
                                f"spec's size (r, length, ...)") from None
            param = nn.Parameter(tensor.detach(), requires_grad=trainable)
            entry = self._entries[name] = Param(name, param, ADAPTER, trainable, method, added_by)
        elif entry.role != ADAPTER:
            raise PassError(f"{added_by}: cannot add adapter `{name}`: the model already has a {entry.role} "
                            f"tensor of that name")
        set_attr_path(gm, name, entry.tensor)
        return entry.tensor

    def set_trainable(self, name: str, trainable: bool) -> bool:
        """Make the table and autograd say `trainable`; True when that changed anything."""
        entry = self._entries[name]
        changed = entry.trainable != trainable or entry.tensor.requires_grad != trainable
        entry.trainable = trainable
        entry.tensor.requires_grad_(trainable)
        return changed

    def render(self) -> str:
        """One line per tensor, for diffs: freezing changes only this table, never the code."""
        return "\n".join(p.row() for p in self) + "\n"

    def count(self, trainable: bool | None = None) -> int:
        # Integer tensors (a sparse delta's indices) are bookkeeping, not parameters.
        return sum(p.tensor.numel() for p in self
                   if p.role != BUFFER and p.tensor.is_floating_point()
                   and (trainable is None or p.trainable == trainable))
