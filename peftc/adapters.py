"""Several adapters in one compiled model: a bank of named adapters, served by binding or by a graph per configuration.

Storage. Each loaded adapter owns its tensors (nn.Parameters keyed by *slot*: the HF PEFT name without
`base_model.model.`, e.g. `model.layers.0.self_attn.q_proj.lora_A.weight`), registered on the CompiledModel under
`peftc_adapters.<adapter>.<slot>` so `parameters()`, `.to()` and optimizers see every adapter. The compiled
adapter is "default", as HF PEFT names it. The bank exists from the first multi-adapter call; until then nothing
here runs.

Switching, decided when the active set changes and never per call:
- *bind*: one active adapter whose structure (slot names, shapes, dtypes, LoRA scalings, rule options) equals the
  compiled adapter's is bound into the slots: its tensors are registered at the slot names, entered in the
  parameter table and set in every captured graph. The graphs compiled for the default adapter then compute with
  it: no capture, and a call costs what it cost with one adapter.
- *a graph per configuration*: anything else (several active adapters, an adapter of another rank, alpha or
  targets, adapters disabled, a mixed batch) is a configuration key in the CompiledModel's graph cache (the last
  part of `_key`). Its graphs are captured once, through the compiled pipeline with the adapter passes replaced by
  `insert-adapters` (each active adapter's own passes, one after another), `insert-mixed-lora` (gather + batched
  matmul) or nothing (disabled), and read the bank's tensors at `peftc_adapters.<adapter>.<slot>` directly;
  switching back to a seen configuration selects its graphs again.

Only active adapters train: set_adapter sets requires_grad on exactly the active adapters' trainable tensors.
"""

from __future__ import annotations

import dataclasses
import math
import re
import threading
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch
from torch import nn

from .errors import AdapterError
from .method import with_hook
from .params import ADAPTER, BUFFER, Param, ParamTable, get_attr_path, set_attr_path
from .passes.insert_adapters import InsertAdapters, bank_name
from .passes.insert_mixed_lora import MIXED_INDEX, InsertMixedLora
from .pipeline import Pipeline
from .spec import LoRA, ModulesToSave, Spec

DEFAULT = "default"  # the adapter a spec compiles, as HF PEFT names it
BASE = "__base__"  # a mixed batch's sample that uses no adapter (HF PEFT's name)
_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_-]*")
# LoRA options whose difference changes only the tensors' shapes or the scalings, both compared on their own.
_SHAPE_FIELDS = {"target", "exclude", "r", "alpha", "use_rslora", "rank_pattern", "alpha_pattern"}


@dataclass
class LoadedAdapter:
    name: str
    spec: Spec | None
    tensors: dict[str, nn.Parameter]  # slot ==> its own tensor
    trains: dict[str, bool]  # slot ==> whether it trains while the adapter is active
    methods: dict[str, str]  # slot ==> the method that owns it ("lora", "ia3", ...)

    def lora_rule(self) -> LoRA | None:
        """The adapter's one LoRA rule, when its spec is exactly one LoRA rule (what combining and ONNX files read)."""
        rules = list(self.spec.rules) if self.spec is not None else []
        if len(rules) == 1 and isinstance(rules[0], LoRA) and set(self.methods.values()) == {"lora"}:
            return rules[0]
        return None

    def structure(self) -> tuple:
        """What a graph compiled for this adapter depends on, besides the tensors' values."""
        shapes = tuple(sorted((k, tuple(t.shape), t.dtype) for k, t in self.tensors.items()))
        rules = []
        for rule in (self.spec.rules if self.spec is not None else ()):
            # selectors are compared as the tensors they made (shapes); IA3's feed-forward choice is in its shapes
            skip = _SHAPE_FIELDS if isinstance(rule, LoRA) else {"target", "exclude", "feedforward"}
            rules.append((type(rule).__name__, tuple((f.name, getattr(rule, f.name)) for f in dataclasses.fields(rule)
                                                     if f.name not in skip)))
        return shapes, self.scalings(), tuple(rules)

    def scalings(self) -> tuple:
        """B's slot ==> its LoRA scaling, from the adapter's LoRA rules (one rule covers every slot here)."""
        loras = [r for r in (self.spec.rules if self.spec is not None else ()) if isinstance(r, LoRA)]
        if len(loras) != 1:
            return tuple(r for r in loras)  # several LoRA rules: compared as rules (the compiled spec only)
        out = []
        for slot in sorted(self.tensors):
            if ".lora_B." in slot:
                module, _, tail = slot.rpartition(".lora_B.")
                key = tail.rsplit(".", 1)[0] if tail.count(".") else None
                out.append((slot, loras[0].scaling_for(module, key)))
        return tuple(out)


class AdapterBank:
    """The loaded adapters of one CompiledModel, which of them are active, and which one sits in the slots."""

    def __init__(self, cm) -> None:
        slots = [p for p in cm.params if p.role == ADAPTER]
        default = LoadedAdapter(DEFAULT, cm.spec, {p.name: _live(cm, p) for p in slots},
                                {p.name: p.trainable for p in slots}, {p.name: p.method for p in slots})
        self.adapters: dict[str, LoadedAdapter] = {}
        self.slot_structure = default.structure()
        self.active: tuple[str, ...] = (DEFAULT,)
        self.bound = DEFAULT
        self.disabled = False
        self.index = torch.zeros(0, dtype=torch.long)  # a mixed batch's per-sample adapter index, set per call
        self.lock = threading.Lock()  # mixed-batch calls write `index`; one at a time
        self.add(cm, default)

    def add(self, cm, adapter: LoadedAdapter) -> None:
        self.adapters[adapter.name] = adapter
        for slot, t in adapter.tensors.items():
            set_attr_path(cm, bank_name(adapter.name, slot), t)

    def bindable(self, name: str) -> bool:
        return self.adapters[name].structure() == self.slot_structure


def bank(cm) -> AdapterBank:
    """cm's adapter bank, created on first use from the compiled adapter."""
    found = cm.__dict__.get("_adapter_bank")
    if found is None:
        found = cm.__dict__["_adapter_bank"] = AdapterBank(cm)
    return found


def _live(cm, p: Param) -> nn.Parameter:
    from .lower.modules import live_tensor

    return live_tensor(cm, p)


def adapter_names(cm) -> list[str]:
    found = cm.__dict__.get("_adapter_bank")
    return [DEFAULT] if found is None else list(found.adapters)


def active_adapters(cm) -> list[str]:
    found = cm.__dict__.get("_adapter_bank")
    return [DEFAULT] if found is None else list(found.active)


# ---- loading -------------------------------------------------------------------------------------------------
def load_adapter(cm, directory, name: str | None, is_trainable: bool | None) -> None:
    """cm.load_adapter: into the compiled slots when `name` is None or names the adapter bound there, else as one
    more loaded adapter `name`."""
    from .peft_format import load_adapter as load_into_slots

    found = cm.__dict__.get("_adapter_bank")
    if name is None or name == (DEFAULT if found is None else found.bound):
        load_into_slots(cm, directory, is_trainable=is_trainable)
    else:
        load_named_adapter(cm, directory, name)


def load_named_adapter(cm, directory, name: str) -> None:
    """Load a saved adapter (HF PEFT's format or peftc's) as a new adapter `name`, inactive and frozen (as HF
    PEFT's load_adapter leaves it); nothing changes when it does not fit."""
    from .peft_format import MODEL_PREFIX, peftc_state_dict, read_adapter

    _check_name(name)
    b = bank(cm)
    if name in b.adapters:
        raise AdapterError(f"an adapter named `{name}` is loaded already; delete_adapter({name!r}) first, or load "
                           f"under another name (loaded: {', '.join(b.adapters)})")
    spec, tensors, fmt = read_adapter(directory)
    if fmt == "peft":
        own = _own_module_tensors(cm, tensors)
        tensors = {**peftc_state_dict(cm, {k: v for k, v in tensors.items() if k not in own}),
                   **{k.removeprefix(MODEL_PREFIX): v for k, v in own.items()}}
    register_adapter(cm, name, spec, tensors)


def _own_module_tensors(cm, saved: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """HF PEFT's saved tensors that sit on a module of the model under a name that is no base parameter: an
    adapter's own tensors, whatever their layout (LoKr of another rank factors W2), read as they are."""
    from .peft_format import MODEL_PREFIX

    aliases = {a for names in cm._info.aliases.values() for a in names}
    out = {}
    for key, value in saved.items():
        name = key.removeprefix(MODEL_PREFIX)
        module = name.rpartition(".")[0]
        if key.startswith(MODEL_PREFIX) and module in cm._info.module_types and name not in aliases:
            out[key] = value
    return out


def register_adapter(cm, name: str, spec: Spec | None, state: dict[str, torch.Tensor]) -> None:
    """Enter `state` (peftc / HF PEFT names without `base_model.model.`) as the inactive, frozen adapter `name`."""
    from .adapter_check import check_adapter_state_dict

    b = bank(cm)
    default = b.adapters.get(b.bound) or next(iter(b.adapters.values()))
    like = next(iter(default.tensors.values()), None)
    refs = {k: default.tensors.get(k, like) for k in state}
    # Values are checked as load_adapter_state_dict checks them; whether they fit the model, when first used.
    check_adapter_state_dict(state, {k: torch.empty(getattr(v, "shape", ()), dtype=r.dtype if r is not None
                                                    else torch.float32) for (k, v), r in zip(state.items(),
                                                                                             refs.values())})
    owners = _owners(spec, state)
    tensors = {}
    for key, value in state.items():
        ref = refs[key]
        dtype = ref.dtype if ref is not None else value.dtype
        device = ref.device if ref is not None else value.device
        tensors[key] = nn.Parameter(value.detach().to(device=device, dtype=dtype).clone(), requires_grad=False)
    b.add(cm, LoadedAdapter(name, spec, tensors, {k: _trains(b, spec, k, owners[k]) for k in tensors}, owners))


def _trains(b: AdapterBank, spec: Spec | None, slot: str, method: str) -> bool:
    """Whether `slot` trains while its adapter is active: LoRA's A unless freeze_a; a tensor another adapter of the
    method holds frozen (VeRA's shared projections) stays frozen; anything else trains."""
    if method == "lora":
        return not (".lora_A." in slot and _freeze_a(spec))
    return next((a.trains[slot] for a in b.adapters.values() if a.methods.get(slot) == method), True)


def _owners(spec: Spec | None, state: dict[str, torch.Tensor]) -> dict[str, str]:
    def owner(key: str) -> str:
        if ".modules_to_save." in key:
            return "modules_to_save"
        if any(m in key for m in (".lora_A.", ".lora_B.", ".lora_magnitude_vector")):
            return "lora"
        if key.endswith(".ia3_l"):
            return "ia3"
        return next((r.kind for r in (spec.rules if spec is not None else ()) if not isinstance(r, ModulesToSave)),
                    "adapter")
    return {k: owner(k) for k in state}


def _freeze_a(spec: Spec | None) -> bool:
    return any(isinstance(r, LoRA) and r.freeze_a for r in (spec.rules if spec is not None else ()))


def _check_name(name: Any) -> None:
    if not isinstance(name, str) or not _NAME.fullmatch(name) or name == BASE:
        raise AdapterError(f"adapter name {name!r}: use letters, digits, '_' and '-' (no dots, not {BASE!r})")


def _known(b: AdapterBank, names: Sequence[str], where: str) -> None:
    for n in names:
        if n not in b.adapters:
            raise AdapterError(f"{where}: no adapter named `{n}`; loaded: {', '.join(b.adapters)}")


# ---- switching ---------------------------------------------------------------------------------------------
def set_adapter(cm, names: str | Sequence[str]) -> None:
    """Make `names` the active adapters (summed, in this order) and the only trainable ones."""
    names = (names,) if isinstance(names, str) else tuple(names)
    b = bank(cm)
    if not names or len(set(names)) != len(names):
        raise AdapterError(f"set_adapter: give one adapter name or a list of distinct names, got {list(names)}")
    _known(b, names, "set_adapter")
    if not (len(names) == 1 and b.bindable(names[0])):
        adapter_rules(b, "active", names)  # a graph of its own: refused now, not at the next call
    for adapter in b.adapters.values():
        on = adapter.name in names
        for slot, t in adapter.tensors.items():
            t.requires_grad_(on and adapter.trains[slot])
    if b.bindable(names[0]):
        _bind(cm, b, names[0])
    else:
        _sync_slots(cm)
    b.active = names
    _reconfigure(cm, b)


def _reconfigure(cm, b: AdapterBank) -> None:
    if b.disabled:
        config = ("disabled",)
    elif len(b.active) == 1 and b.active[0] == b.bound:
        config = None  # the compiled graphs, reading the slots
    else:
        config = ("active", b.active)
    cm.__dict__["_adapter_config"] = config
    # HF PEFT's AdaLoRA adds its penalty on the compiled adapter's tensors (the slots), disabled or not; a graph of
    # another configuration holds no adapter with a regularizer (adapter_rules refuses one)
    compiled = cm.spec.rules if cm.spec is not None and (config is None or b.disabled) else ()
    cm.__dict__["_regularizers"] = with_hook(compiled, "regularizer")
    # in-place updates (COFT's projection) on each active adapter's own tensors, as HF PEFT's forward makes them
    active = config[1] if config is not None and config[0] == "active" else ()
    own = tuple((rule, _own_sites(cm, b.adapters[n], rule)) for n in active
                for rule in with_hook(b.adapters[n].spec.rules, "before_call"))
    cm.__dict__["_before_call"] = with_hook(compiled, "before_call") + own


def _own_sites(cm, adapter: LoadedAdapter, rule) -> dict:
    """{module: the adapter's tensors of `rule`'s method there, by key}: what rule.before_call gets."""
    from .method import Tensors
    from .peft_format import owning_module

    sites: dict[str, Tensors] = {}
    for slot, t in adapter.tensors.items():
        if adapter.methods[slot] == rule.kind and "." in slot:
            module = owning_module(slot, cm._info)
            sites.setdefault(module, Tensors())[slot[len(module) + 1:]] = t
    return sites


def _bind(cm, b: AdapterBank, name: str) -> None:
    """Register adapter `name`'s tensors at the slot names: in cm's module tree (what the runnables read), in the
    parameter table and in every graph compiled for the slots (what merge and export read)."""
    adapter = b.adapters[name]
    slot_graphs = [gm for graphs in (cm._graphs, cm._method_graphs) for key, gms in graphs.items()
                   if key[-1] is None for gm in gms]
    for p in cm.params:
        if p.role != ADAPTER:
            continue
        t = adapter.tensors[p.name]
        p.tensor = t
        set_attr_path(cm, p.name, t)
        for gm in slot_graphs:
            set_attr_path(gm, p.name, t)
    b.bound = name
    _sync_slots(cm)


def _sync_slots(cm) -> None:
    for p in cm.params:
        if p.role == ADAPTER:
            p.trainable = p.tensor.requires_grad


@contextmanager
def disable_adapters(cm) -> Iterator[None]:
    """The base model inside the block (every adapter off, as HF PEFT's disable_adapter), then as before."""
    b = bank(cm)
    was = b.disabled
    b.disabled = True
    _reconfigure(cm, b)
    try:
        yield
    finally:
        b.disabled = was
        _reconfigure(cm, b)


def delete_adapter(cm, name: str) -> None:
    """Remove adapter `name`, its tensors and the graphs compiled for configurations that use it. Deleting an
    active adapter leaves the others active (or, when none is left, the first remaining adapter), as HF PEFT does."""
    b = bank(cm)
    _known(b, [name], "delete_adapter")
    if len(b.adapters) == 1:
        raise AdapterError(f"delete_adapter: `{name}` is the only adapter; a compiled model keeps at least one")
    adapter = b.adapters.pop(name)
    for slot in adapter.tensors:
        _unregister(cm, bank_name(name, slot))
    for graphs in (cm._graphs, cm._method_graphs):
        for key in [k for k in graphs if isinstance(k[-1], tuple) and len(k[-1]) > 1 and name in k[-1][1]]:
            del graphs[key]
    active = tuple(n for n in b.active if n != name) or (next(iter(b.adapters)),)
    if b.bound == name:
        fit = next((n for n in (*active, *b.adapters) if b.bindable(n)), None)
        if fit is not None:
            _bind(cm, b, fit)
        else:
            b.bound = None  # the slots hold tensors of no loaded adapter; every configuration has its own graph
    set_adapter(cm, active)


def _unregister(cm, dotted: str) -> None:
    parent, _, leaf = dotted.rpartition(".")
    mod = get_attr_path(cm, parent)
    mod._parameters.pop(leaf, None)


def extra_trainable(cm) -> list[nn.Parameter]:
    """Active adapters' trainable tensors that are not in the slots (several active, or not bindable)."""
    found = cm.__dict__.get("_adapter_bank")
    if found is None:
        return []
    in_slots = {id(p.tensor) for p in cm.params if p.role == ADAPTER}
    return [t for n in found.active for t in found.adapters[n].tensors.values()
            if t.requires_grad and id(t) not in in_slots]


# ---- graphs for a configuration ------------------------------------------------------------------------------
def config_stage(cm, config: tuple) -> tuple[Pipeline, ParamTable]:
    """The pipeline and parameter table that capture a graph for `config`: the compiled pipeline without its
    adapter passes, plus insert-adapters / insert-mixed-lora on the bank's tensors (nothing for "disabled")."""
    b = bank(cm)
    kind, names = config[0], (config[1] if len(config) > 1 else ())
    table = ParamTable()
    for p in cm.params:
        if p.role != ADAPTER:
            table.insert(dataclasses.replace(p))
    rules = adapter_rules(b, kind, names) if names else []
    for n in names:
        adapter = b.adapters[n]
        for slot, t in adapter.tensors.items():
            table.insert(Param(bank_name(n, slot), t, ADAPTER, t.requires_grad, adapter.methods[slot],
                               "load-adapter"))
    passes = [p for p in cm.pipeline.method.passes if p.rule_type is None]
    if kind == "active":
        passes.append(InsertAdapters(tuple(names), tuple(rules)))
    elif kind == "mixed":
        table.insert(Param(MIXED_INDEX, b.index, BUFFER, False))
        passes.append(InsertMixedLora(tuple(names), tuple(r for r, in rules)))
    return Pipeline((*passes, *cm.pipeline.training.passes)), table


# Methods whose HF PEFT layers loop over several active adapters (peft 0.21: `for active_adapter in
# self.active_adapters`), summing (LoRA, LoHa, LoKr, VeRA), multiplying (IA3) their terms or composing their
# rotations (OFT, BOFT: insert-adapters nests the weight rewrites in HF's order); and the methods whose
# layers implement `_mixed_batch_forward` (adapter_names=). Prompt learning (prefix, prompt tuning) has one active
# adapter in HF PEFT; the other module methods' PEFT forward drops adapter_names= (runs the active adapter on
# every sample), which peftc refuses rather than copies.
SEVERAL_ACTIVE = ("lora", "ia3", "loha", "lokr", "vera", "oft", "boft")
MIXED_BATCH = ("lora",)
PROMPT_LEARNING = ("prefix", "prompt_tuning", "p_tuning", "adaption_prompt")


def adapter_rules(b: AdapterBank, kind: str, names: Sequence[str]) -> list[tuple]:
    """Each adapter's rules for a graph of configuration (kind, names); AdapterError when HF PEFT does not support
    that configuration for the adapters' method."""
    out = []
    for n in names:
        spec = b.adapters[n].spec
        rules = tuple(spec.rules) if spec is not None else ()
        if not rules:
            raise AdapterError(f"adapter `{n}` was loaded without a spec, so no graph can be captured for it; "
                               f"activate one adapter of the compiled structure at a time")
        where = f"adapter `{n}` ({' + '.join(r.kind for r in rules)})"
        if with_hook(rules, "regularizer"):
            raise AdapterError(f"{where} adds a regularizer to the loss (AdaLoRA), which peftc computes on the "
                               f"compiled adapter's slots only; activate it alone, with the compiled structure")
        if kind == "mixed" and (len(rules) != 1 or rules[0].kind not in MIXED_BATCH):
            raise AdapterError(f"adapter_names= (a mixed batch): {where}: HF PEFT 0.21 implements mixed batches only "
                               f"for {', '.join(MIXED_BATCH)} adapters of one rule (its other methods do not implement "
                               f"adapter_names); run each adapter's samples as their own batch with set_adapter")
        if kind == "active" and len(names) > 1:
            if len(rules) != 1 or rules[0].kind not in SEVERAL_ACTIVE:
                if len(rules) != 1:
                    why = "peftc composes adapters of one rule only"
                elif rules[0].kind in PROMPT_LEARNING:
                    why = "HF PEFT activates one prompt-learning adapter at a time"
                else:
                    why = "peftc does not compose this method's adapters"
                raise AdapterError(f"set_adapter({list(names)}): {where}: several active adapters are supported for "
                                   f"adapters of one rule of {', '.join(SEVERAL_ACTIVE)} (as HF PEFT 0.21's layers "
                                   f"loop over them); {why}. Activate one adapter at a time")
            first = out[0][0] if out else None
            if first is not None and first.kind != rules[0].kind:
                raise AdapterError(f"set_adapter({list(names)}): {where} and adapter `{names[0]}` ({first.kind}) are "
                                   f"of different methods, which HF PEFT does not combine; activate one method's "
                                   f"adapters")
        out.append(rules)
    return out


def mixed_call(cm, adapter_names: Sequence[str], entry: str | None, args: tuple, kwargs: dict[str, Any]) -> Any:
    """HF PEFT's `adapter_names=`: sample k through adapter adapter_names[k] ("__base__": none), in one graph."""
    b = bank(cm)
    if cm.training:
        raise AdapterError("adapter_names= (a mixed batch) is for inference: call cm.eval() first (HF PEFT raises "
                           "the same)")
    names = list(adapter_names) if not isinstance(adapter_names, str) else None
    if names is None or not names:
        raise AdapterError(f"adapter_names must be a list with one adapter name per sample, got {adapter_names!r}")
    distinct = tuple(sorted({n for n in names if n != BASE}))
    _known(b, distinct, "adapter_names")
    batch = _batch_size(args, kwargs)
    if batch is not None and batch != len(names):
        raise AdapterError(f"adapter_names has {len(names)} names for a batch of {batch}; give one per sample")
    adapter_rules(b, "mixed", distinct)
    for n in distinct:
        rule = b.adapters[n].lora_rule()
        if rule is not None and (rule.use_dora or rule.slices or rule.lora_bias):
            raise AdapterError(f"adapter_names: adapter `{n}` uses DoRA, slices or lora_bias, which a mixed batch "
                               f"does not support (HF PEFT supports none of them either)")
    position = {n: i for i, n in enumerate(distinct)}
    like = next((t for a in b.adapters.values() for t in a.tensors.values()), b.index)
    index = torch.tensor([position.get(n, len(distinct)) for n in names], dtype=torch.long, device=like.device)
    with b.lock:
        b.index.set_(index)
        return cm._call(entry, args, kwargs, config=("mixed", distinct))


def _batch_size(args: tuple, kwargs: dict[str, Any]) -> int | None:
    for value in (*args, *kwargs.values()):
        if isinstance(value, torch.Tensor) and value.dim() >= 1:
            return value.shape[0]
    return None


def require_slots(cm, what: str) -> None:
    """Raise unless the compiled graphs (the adapter in the slots) serve cm now: what merges and exports fold."""
    config = cm.__dict__.get("_adapter_config")
    if config is not None:
        b = bank(cm)
        now = "adapters disabled" if config[0] == "disabled" else f"active adapters {list(b.active)}"
        raise AdapterError(f"{what} folds the one adapter in the compiled slots, but cm computes with {now}; "
                           f"set_adapter(name) one adapter of the compiled structure first (loaded: "
                           f"{', '.join(b.adapters)})")


# ---- ONNX ------------------------------------------------------------------------------------------------------
@contextmanager
def serving_slots(cm, name: str | None = None) -> Iterator[None]:
    """Inside the block, cm is served by the compiled graphs with adapter `name` (the bound one by default) in the
    slots, as exports read it; afterwards the bank is as it was. No bank: cm as it is."""
    b = cm.__dict__.get("_adapter_bank")
    if b is None:
        if name not in (None, DEFAULT):
            raise AdapterError(f"no adapter named `{name}`; loaded: {DEFAULT}")
        yield
        return
    name = b.bound if name is None else name
    if name is None:
        raise AdapterError("the compiled adapter slots hold no loaded adapter (it was deleted); set_adapter(...) "
                           "an adapter of the compiled structure first, or name one")
    _known(b, [name], "export")
    if not b.bindable(name):
        raise AdapterError(f"adapter `{name}` has another structure (rank, alpha, targets or options) than the "
                           f"compiled adapter, so the compiled graphs cannot serve it")
    was = b.bound
    _bind(cm, b, name)
    cm.__dict__["_adapter_config"] = None
    try:
        yield
    finally:
        if was is not None:
            _bind(cm, b, was)
        _reconfigure(cm, b)


def onnx_adapter_tensors(cm, name: str) -> dict[str, Any]:
    """Adapter `name` as feeds of the adapters-as-inputs ONNX model (`lora_A`, and `lora_B` times its scaling).

    An adapter of the compiled structure is the compiled adapter's feeds with its tensors in the slots. A LoRA
    adapter of a smaller rank, other alpha or fewer targets fits the same inputs: A's extra rows and B's extra
    columns are zeros (they add nothing), and a site it leaves alone gets zeros (onnxruntime's default).
    """
    from .lower.onnx import _to_numpy, adapter_tensors

    b = bank(cm)
    _known(b, [name], "export_onnx_adapter")
    if b.bindable(name):
        with serving_slots(cm, name):
            return adapter_tensors(cm)
    adapter = b.adapters[name]
    rule = adapter.lora_rule()
    if rule is None or rule.use_dora or rule.lora_bias or rule.slices:
        raise AdapterError(f"adapter `{name}`: an ONNX adapter file of another structure than the compiled adapter "
                           f"needs plain LoRA (one rule, no DoRA, lora_bias or slices)")
    inputs = {p.name: p.tensor for p in cm.params if p.role == ADAPTER}
    out = {}
    for slot, t in adapter.tensors.items():
        if slot not in inputs:
            raise AdapterError(f"adapter `{name}` has `{slot}`, which is not an adapter input of the compiled model "
                               f"(it adapts a module the compiled spec does not)")
        value = t.detach()
        if ".lora_B." in slot:
            value = value * rule.scaling_for(slot.rpartition(".lora_B.")[0], None)
        full = inputs[slot].shape
        if any(n > m for n, m in zip(value.shape, full)):
            raise AdapterError(f"adapter `{name}`: `{slot}` has shape {tuple(value.shape)}, larger than the compiled "
                               f"input {tuple(full)}; compile with a rank at least the largest adapter's")
        padded = torch.zeros(full, dtype=inputs[slot].dtype)
        padded[tuple(slice(0, n) for n in value.shape)] = value
        out[slot] = _to_numpy(padded)
    for slot, t in inputs.items():
        out.setdefault(slot, _to_numpy(torch.zeros_like(t.detach())))
    return out


def export_onnx_adapter(cm, path, name: str, onnx_model=None) -> int:
    """CompiledModel.export_onnx_adapter(path, name=...): adapter `name` as an `.onnx_adapter` file."""
    from .lower.onnx import write_checked_adapter

    return write_checked_adapter(cm, path, onnx_adapter_tensors(cm, name), onnx_model)


# ---- combining ---------------------------------------------------------------------------------------------------
def add_weighted_adapter(cm, adapters: Sequence[str], weights: Sequence[float], combination_type: str = "svd", *,
                         name: str, **options: Any) -> None:
    """HF PEFT's add_weighted_adapter: a new adapter `name` combined from loaded LoRA adapters (peftc/combine.py
    does the math on their tensors and PEFT configs), loaded inactive and frozen like any other."""
    from .combine import combine_lora
    from .peft_format import spec_from_peft

    _check_name(name)
    b = bank(cm)
    adapters = [adapters] if isinstance(adapters, str) else list(adapters)
    _known(b, adapters, "add_weighted_adapter")
    if name in b.adapters:
        raise AdapterError(f"add_weighted_adapter: an adapter named `{name}` is loaded already; pick another name")
    states, configs = [], []
    for n in adapters:
        adapter = b.adapters[n]
        rule = adapter.lora_rule()
        if rule is None:
            raise AdapterError(f"add_weighted_adapter: adapter `{n}` is not a LoRA adapter of one rule "
                               f"({adapter.spec!r})")
        states.append({k: t.detach() for k, t in adapter.tensors.items()})
        configs.append(peft_lora_config(cm, adapter, rule))
    order = [m for m, _ in cm._source.named_modules()]
    state, config = combine_lora(states, configs, list(weights), combination_type, module_order=order, **options)
    register_adapter(cm, name, spec_from_peft({**config, "peft_type": "LORA"}, saved=state), state)


def peft_lora_config(cm, adapter: LoadedAdapter, rule: LoRA) -> dict:
    """The PEFT LoraConfig dict that puts exactly `adapter`'s tensors on the model: its modules by path, each
    module's rank and alpha as patterns where they differ from r and lora_alpha."""
    modules = sorted({k.rpartition(".lora_A.")[0] for k in adapter.tensors if ".lora_A." in k})
    ranks = {m: adapter.tensors[f"{m}.lora_A.weight"].shape[0] for m in modules}
    root = math.sqrt if rule.use_rslora else float
    alphas = {m: rule.scaling_for(m, None) * root(ranks[m]) for m in modules}
    if rule.slices:
        raise AdapterError(f"add_weighted_adapter: adapter `{adapter.name}` has per-slice adapters, which PEFT has no "
                           f"config for")
    r, alpha = rule.r, rule.alpha
    return {"peft_type": "LORA", "r": r, "lora_alpha": alpha, "use_rslora": rule.use_rslora,
            "target_modules": modules, "lora_dropout": rule.dropout,
            "rank_pattern": {re.escape(m): v for m, v in ranks.items() if v != r},
            "alpha_pattern": {re.escape(m): v for m, v in alphas.items() if not math.isclose(v, alpha)},
            "fan_in_fan_out": any(cm._info.module_types.get(m) == "Conv1D" for m in modules)}


# ---- saving ------------------------------------------------------------------------------------------------------
def save_pretrained(cm, directory, format: str | None, *, selected_adapters: Sequence[str] | None = None,
                    state_dict=None, **options: Any) -> str:
    """cm.save_pretrained with HF PEFT's layout for several adapters: "default" at `directory`, every other selected
    adapter (all loaded ones by default) in `directory/<name>/`, each as one adapter would be saved. Returns the
    format of the first adapter written."""
    from .peft_format import save_pretrained as save_one

    b = cm.__dict__.get("_adapter_bank")
    if b is None:  # one adapter, "default": peft_format checks selected_adapters
        if selected_adapters is not None:
            options["selected_adapters"] = selected_adapters
        return save_one(cm, directory, format, state_dict=state_dict, **options)
    names = list(b.adapters) if selected_adapters is None else \
        [selected_adapters] if isinstance(selected_adapters, str) else list(selected_adapters)
    _known(b, names, "save_pretrained(selected_adapters=...)")
    written = []
    for name in names:
        out = Path(directory) if name == DEFAULT else Path(directory) / name
        # a trainer's state_dict holds the bound adapter at the slot names and every adapter under its bank name:
        # another adapter's values go in the slots
        given = state_dict if state_dict is None or name == b.bound else {
            **state_dict, **{slot: state_dict[bank_name(name, slot)] for slot in b.adapters[name].tensors
                             if bank_name(name, slot) in state_dict}}
        if b.bindable(name):
            with serving_slots(cm, name):
                written.append(save_one(cm, out, format, state_dict=given, **options))
        else:
            written.append(_save_other_structure(cm, b.adapters[name], out, format, given, **options))
    return written[0] if written else (format or "peft")


def _save_other_structure(cm, adapter: LoadedAdapter, directory, format: str | None, state_dict,
                          **options: Any) -> str:
    """An adapter the compiled slots cannot hold (another rank, block size, length or targets), written by the
    same writers as the compiled adapter (peft_format.save_pretrained: HF PEFT's format, or peftc's layout) from its
    own spec and its own tensors (`state_dict`'s values where it has them)."""
    from .peft_format import save_pretrained as save_one

    if adapter.spec is None:
        raise AdapterError(f"save_pretrained: adapter `{adapter.name}` was loaded without a spec, so nothing says "
                           f"what its tensors are; save it from the directory it was loaded from")
    rule = adapter.lora_rule()
    if rule is not None and rule.target_parameters:
        raise AdapterError(f"save_pretrained: adapter `{adapter.name}` has LoRA on parameters (target_parameters) "
                           f"and another structure than the compiled adapter: HF PEFT's keys for it come from the "
                           f"graphs compiled for it, which it has none of; save it from the directory it was loaded "
                           f"from, or leave it out of selected_adapters")
    tensors = {k: state_dict[k] if state_dict is not None and k in state_dict else t
               for k, t in adapter.tensors.items()}
    return save_one(_AsCompiled(cm, adapter), directory, format, state_dict=tensors, **options)


class _AsCompiled:
    """`cm` as peft_format's writers read it with loaded adapter `adapter` in the compiled adapter's place: its
    spec, and a parameter table of the base's entries plus its tensors under the slot names. The writers take the
    adapted modules from those tensors; no graph is compiled for it."""

    def __init__(self, cm, adapter: LoadedAdapter) -> None:
        object.__setattr__(self, "_cm", cm)
        table = ParamTable()
        for p in cm.params:
            if p.role != ADAPTER:
                table.insert(dataclasses.replace(p))
        for slot, t in adapter.tensors.items():
            table.insert(Param(slot, t, ADAPTER, adapter.trains[slot], adapter.methods[slot], "load-adapter"))
        self.params = table
        self.spec = adapter.spec
        self._graphs: dict = {}  # none compiled for this adapter: no LoRA target_parameters keys to read off them

    def __getattr__(self, name: str) -> Any:
        return getattr(self._cm, name)
