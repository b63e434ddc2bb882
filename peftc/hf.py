"""The Hugging Face model surface of CompiledModel: what transformers.Trainer and TRL read, each with HF's meaning.

`config`, `generation_config`, `main_input_name`, `device`, `dtype`, `get_input_embeddings()` and
`get_output_embeddings()` are the source model's; `forward`'s signature, as `inspect` reads it, is the source's
(Trainer keeps only dataset columns that are forward parameters); `base_model` runs the source's backbone through
the compiler with the same adapters (TRL's fused LM head calls it, then applies the output layer itself).
Activation checkpointing is schedule-recompute on the model's repeated blocks.

Each compiled model's class is made for its source model's class (compiled_class): `CompiledModel[LlamaForCausalLM]`,
whose class-level `forward` signature is the source class's, and which, for a transformers model with peft installed,
is also a `peft.PeftModel`, so that transformers.Trainer saves and resumes checkpoints in PEFT's format.
"""

from __future__ import annotations

import importlib.util
import inspect
import sys
import threading
from typing import Any

import torch
from torch import nn
from torch.utils import _pytree as pytree

from .errors import PeftcError
from .params import ADAPTER

# What `checkpoint` options mean for schedule-recompute: it always runs blocks non-reentrantly, which gives the
# same gradients as reentrant checkpointing.
_CHECKPOINT_KWARGS = {"use_reentrant"}


def autocast_state(args: tuple, kwargs: dict[str, Any]) -> tuple:
    """(device type, autocast dtype) for each device the call's tensors are on where autocast is enabled.

    A graph captured under autocast bakes the dtypes autocast chose, so it serves only calls under the same state.
    """
    types = sorted({x.device.type for x in pytree.tree_leaves((args, kwargs)) if isinstance(x, torch.Tensor)})
    return tuple((t, torch.get_autocast_dtype(t)) for t in types
                 if torch.amp.is_autocast_available(t) and torch.is_autocast_enabled(t))


class source_signature:
    """A `forward` whose signature, read on an instance, is the source model's forward's."""

    def __init__(self, func):
        self.func = func
        self.__doc__ = func.__doc__

    def __get__(self, obj, cls=None):
        if obj is None:  # on the class: the source class's signature, when the class was made for one
            source = getattr(cls, "source_class", None)
            return self.func if source is None else _class_signed(self.func, source)
        return _SignedForward(self.func, obj)


def _class_signed(func, source_cls: type):
    """`func` as a function with the signature of `source_cls.forward` (self included), for inspect on the class."""
    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return func(self, *args, **kwargs)

    forward.__doc__, forward.__qualname__ = func.__doc__, func.__qualname__
    try:
        forward.__signature__ = inspect.signature(source_cls.forward)
    except (TypeError, ValueError):
        forward.__signature__ = inspect.signature(func)
    return forward


class _SignedForward:
    """`forward` bound to a CompiledModel, with the source model's signature for `inspect.signature`."""

    def __init__(self, func, module: nn.Module):
        self._func, self._module = func, module

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self._func(self._module, *args, **kwargs)

    @property
    def __signature__(self) -> inspect.Signature:
        try:
            return inspect.signature(self._module._source.forward)
        except (TypeError, ValueError):  # a forward inspect cannot read: CompiledModel.forward's, without self
            return inspect.Signature(list(inspect.signature(self._func).parameters.values())[1:])

    def __repr__(self) -> str:
        return f"<bound forward of {type(self._module).__name__}({type(self._module._source).__name__})>"


def _repeated_block_paths(module_types: dict[str, str]) -> list[str]:
    """ModuleList children that no other ModuleList child contains, in module order (schedule-recompute's
    blocks: decoder layers, encoder layers)."""
    blocks: list[str] = []
    for path in module_types:
        parent, _, index = path.rpartition(".")
        if index.isdigit() and module_types.get(parent) == "ModuleList" and \
                not any(path.startswith(b + ".") for b in blocks):
            blocks.append(path)
    return blocks


class CompiledBackbone:
    """`cm.base_model`: the source model's backbone (HF's `base_model`, e.g. `model` of a LlamaForCausalLM) run
    through the compiler. Its graphs share the CompiledModel's parameter table: the same adapters train."""

    def __init__(self, cm, entry: str):
        self._cm, self._entry = cm, entry

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self._cm._call(self._entry, args, kwargs)

    forward = __call__

    def __repr__(self) -> str:
        return f"CompiledBackbone({self._entry!r} of {type(self._cm._source).__name__})"


class HFModelMixin:
    """The parts of transformers' PreTrainedModel surface that trainers read, for CompiledModel."""

    supports_gradient_checkpointing = True
    model_tags: list[str] | None = None
    _checkpointing = None  # (the pipeline before, {scheduled graph: graph it replaced}) while enabled

    # ---- what the source model says --------------------------------------------------------------------------
    @property
    def config(self):
        """The source model's config object (shared: a change to it reaches the source model)."""
        try:
            return self._source.config
        except AttributeError:
            raise AttributeError(f"{type(self._source).__name__} has no `config`") from None

    @property
    def generation_config(self):
        return getattr(self._source, "generation_config", None)

    @property
    def loss_type(self):
        """The source's loss type (Trainer counts `num_items_in_batch` over `labels[..., 1:]` when it is a causal LM
        loss, which shifts labels: without it the loss would be scaled by the wrong token count)."""
        try:
            return self._source.loss_type
        except AttributeError:
            raise AttributeError(f"{type(self._source).__name__} has no `loss_type`") from None

    @property
    def main_input_name(self) -> str:
        name = getattr(self._source, "main_input_name", None)
        if name is not None:
            return name
        params = list(inspect.signature(self._source.forward).parameters)
        return params[0] if params else "input_ids"

    @property
    def device(self) -> torch.device:
        return next(p.device for p in self.parameters())

    @property
    def dtype(self) -> torch.dtype:
        return next(p.dtype for p in self.parameters() if p.is_floating_point())

    @property
    def accepts_loss_kwargs(self) -> bool:
        """Whether Trainer should pass `num_items_in_batch`: the source's own answer, else whether its forward
        takes it (by name or through `**kwargs`), as Trainer decides for a plain model."""
        own = getattr(self._source, "accepts_loss_kwargs", None)
        if own is not None:
            return bool(own)
        params = inspect.signature(self._source.forward).parameters.values()
        return any(p.name == "num_items_in_batch" or p.kind == p.VAR_KEYWORD for p in params)

    def get_input_embeddings(self) -> nn.Module:
        return self._source.get_input_embeddings()

    def get_output_embeddings(self) -> nn.Module | None:
        """The source's output layer. A caller that applies its weight itself (TRL's fused LM head) bypasses the
        graph, so an output layer that the spec changes raises PeftcError instead of silently losing its adapter."""
        layer = self._source.get_output_embeddings()
        path = self._info.output_layer
        if layer is not None and path is not None:
            changed = [p.name for p in self.params if p.name.startswith(path + ".") and (p.trainable or
                       p.role == ADAPTER)]
            if changed:
                raise PeftcError(f"the output layer `{path}` is fine-tuned (`{changed[0]}`), so its weight alone does "
                                 f"not compute what the compiled model does; leave `{path}` out of the spec's targets, "
                                 f"or call the compiled model for its logits")
        return layer

    @property
    def base_model(self):
        """HF's `base_model`: the backbone (`getattr(model, model.base_model_prefix)`), compiled with the same
        adapters; the model itself when the source has no separate backbone."""
        prefix = getattr(self._source, "base_model_prefix", "")
        if prefix and isinstance(getattr(self._source, prefix, None), nn.Module):
            return CompiledBackbone(self, prefix)
        return self

    # ---- what peft.PeftModel's callers read (transformers.Trainer, TRL) ------------------------------------------
    def get_base_model(self) -> nn.Module:
        """The model itself. PEFT's base model is the model with its adapters injected, the module that computes
        the fine-tuned function; for a compiled model that module is this one (Trainer reads its forward signature
        and `accepts_loss_kwargs` through it, TRL wraps its forward with a fused LM head)."""
        return self

    def add_model_tags(self, tags: list[str] | str) -> None:
        """Add tags for the Hub model card, keeping existing ones (HF's add_model_tags)."""
        tags = [tags] if isinstance(tags, str) else list(tags)
        if self.model_tags is None:
            self.model_tags = []
        self.model_tags.extend(t for t in tags if t not in self.model_tags)

    # ---- activation checkpointing == schedule-recompute ------------------------------------------------------
    def activation_checkpointing_enable(self, activation_checkpointing_kwargs: dict | None = None,
                                        every_n_layers: int = 1, offload: bool = False) -> None:
        """Recompute every `every_n_layers`-th repeated block (decoder/encoder layer) in backward: the
        schedule-recompute pass on every training graph, cached and future, in place of the default recompute-cheap
        (whole blocks recompute what it would). Gradients are unchanged."""
        from .adapters import config_stage
        from .instrument import Verify
        from .passes.recompute_cheap import RecomputeCheap
        from .passes.schedule_recompute import ScheduleRecompute
        from .pipeline import PassContext, Pipeline

        unknown = sorted(set(activation_checkpointing_kwargs or {}) - _CHECKPOINT_KWARGS)
        if unknown:
            raise PeftcError(f"activation checkpointing option `{unknown[0]}` is not supported: peftc recomputes blocks "
                             f"with schedule-recompute (non-reentrant); supported: {', '.join(sorted(_CHECKPOINT_KWARGS))}")
        if offload:
            raise PeftcError("activation checkpointing with offload=True is not supported; use offload=False, or "
                             "peftc.compile(..., memory_budget=...) to fit a memory budget")
        if not isinstance(every_n_layers, int) or every_n_layers < 1:
            raise PeftcError(f"every_n_layers must be an integer >= 1, got {every_n_layers!r}")
        self.activation_checkpointing_disable()
        blocks = _repeated_block_paths(self._info.module_types)
        if not blocks:
            raise PeftcError(f"{type(self._source).__name__} has no repeated blocks (ModuleList children) to "
                             f"recompute")
        p = ScheduleRecompute(blocks=None if every_n_layers == 1 else tuple(blocks[::every_n_layers]))
        before = self.pipeline
        self.pipeline = Pipeline((*(q for q in before.passes if not isinstance(q, RecomputeCheap)), p))
        # The training stage again, from each graph's method graph: the one served ran recompute-cheap.
        training = Pipeline(tuple(q for q in self.pipeline.passes if q.stage == "training"))
        replaced = {}
        for key, graphs in list(self._graphs.items()):
            if key[0]:  # training graphs; eval graphs keep nothing for backward
                params = self.params if key[-1] is None else config_stage(self, key[-1])[1]
                ctx = PassContext(params, self._info, training=True)
                for gm, method in zip(list(graphs), self._method_graphs[key]):
                    scheduled = training.run_stages(method, ctx, [Verify()] if self.verify else []).training
                    self._replace_graph(gm, scheduled)
                    replaced[scheduled] = gm
        self._checkpointing = (before, replaced)

    def activation_checkpointing_disable(self) -> None:
        """Undo activation_checkpointing_enable: the graphs it scheduled are served as before again."""
        if self._checkpointing is None:
            return
        before, replaced = self._checkpointing
        for key, graphs in list(self._graphs.items()):
            if key[0]:
                # Graphs captured while it was enabled ran the pass during capture: drop them (and their method
                # graphs, which stay paired with them), to be captured again.
                kept = [(replaced[gm], m) for gm, m in zip(graphs, self._method_graphs[key]) if gm in replaced]
                graphs[:] = [gm for gm, _ in kept]
                self._method_graphs[key][:] = [m for _, m in kept]
        if self.graph_module in replaced:
            object.__setattr__(self, "graph_module", replaced[self.graph_module])
        self.pipeline = before
        self._checkpointing = None

    def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs: dict | None = None, **kwargs: Any) -> None:
        """HF's older name for activation_checkpointing_enable."""
        self.activation_checkpointing_enable(gradient_checkpointing_kwargs, **kwargs)

    def gradient_checkpointing_disable(self) -> None:
        self.activation_checkpointing_disable()

    @property
    def is_activation_checkpointing(self) -> bool:
        from .passes.schedule_recompute import ScheduleRecompute

        return any(isinstance(p, ScheduleRecompute) for p in self.pipeline.passes)

    is_gradient_checkpointing = is_activation_checkpointing

    def enable_input_require_grads(self) -> None:
        """A no-op. HF needs it so that checkpointed blocks see an input that requires grad; prune-grads and
        schedule-recompute already give gradients to exactly the trainable tensors."""

    def disable_input_require_grads(self) -> None:
        """A no-op, like enable_input_require_grads."""


# ---- the class of a compiled model ---------------------------------------------------------------------------------
class UnsupportedPeftAPI(PeftcError, AttributeError):
    """A peft.PeftModel attribute that a CompiledModel does not have (an AttributeError, so `hasattr` is False)."""


# What a CompiledModel gives of peft.PeftModel's own API; the rest raises UnsupportedPeftAPI.
PEFT_API = ("save_pretrained", "load_adapter", "from_pretrained", "get_base_model", "active_adapter",
            "active_adapters", "set_adapter", "delete_adapter", "add_weighted_adapter", "disable_adapter",
            "print_trainable_parameters", "generate", "forward")

_CLASSES: dict[tuple[type, type], type] = {}
_CLASSES_LOCK = threading.Lock()


def _peft_model_class(source_cls: type) -> type | None:
    """peft.PeftModel when `source_cls` is a transformers model and peft is installed, else None."""
    transformers = sys.modules.get("transformers")
    if transformers is None or not issubclass(source_cls, transformers.PreTrainedModel):
        return None
    if importlib.util.find_spec("peft") is None:
        return None
    from peft import PeftModel

    return PeftModel


def _unsupported(name: str, member: Any) -> Any:
    message = (f"`{name}` is peft.PeftModel machinery that a CompiledModel does not have (it is a PeftModel so that "
               f"transformers.Trainer saves and resumes its checkpoints in PEFT's format); of PeftModel's API it has "
               f"{', '.join(PEFT_API)}. The spec says what is fine-tuned (cm.spec); load a different adapter with "
               f"cm.load_adapter(dir), or compile the model again")

    if isinstance(member, property):
        def missing(self):
            raise UnsupportedPeftAPI(message)
        return property(missing)

    def refused(self, *args: Any, **kwargs: Any) -> Any:
        raise UnsupportedPeftAPI(message)

    refused.__name__ = refused.__qualname__ = name
    return refused


def compiled_class(cls: type, source_cls: type) -> type:
    """`cls` (CompiledModel or a subclass) made for a source model class, e.g. `CompiledModel[LlamaForCausalLM]`.

    transformers.Trainer reads the model's *class*: `find_labels` and `can_return_loss` inspect the class's `forward`,
    which here carries the source class's signature, so `labels` is found and evaluate() reports eval_loss with
    default arguments. For a transformers model with peft installed the class is also a `peft.PeftModel`: Trainer then
    saves checkpoints with `save_pretrained` (PEFT's adapter_config.json + adapter_model.safetensors, not the base
    weights) and resumes them with `load_adapter`. Nothing of PeftModel runs: CompiledModel comes first in the
    method order, nn.Module's `__getattr__` is kept, and each PeftModel member outside PEFT_API raises
    UnsupportedPeftAPI. One class per (cls, source class), made once.
    """
    if "source_class" in vars(cls):
        return cls
    from .distributed import _fsdp_module_type

    fsdp = _fsdp_module_type()
    if fsdp is not None and issubclass(source_cls, fsdp):  # FSDP2's class for a sharded source: FSDP<cls>(FSDPModule, cls)
        source_cls = next(c for c in source_cls.__mro__[1:] if c is not fsdp and not issubclass(c, fsdp))
    key = (cls, source_cls)
    with _CLASSES_LOCK:
        made = _CLASSES.get(key)
        if made is None:
            peft_model = _peft_model_class(source_cls)
            name = f"{cls.__name__}[{source_cls.__name__}]"
            namespace: dict[str, Any] = {"__module__": cls.__module__, "__qualname__": name,
                                         "source_class": source_cls, "__doc__": cls.__doc__}
            bases: tuple[type, ...] = (cls,)
            if peft_model is not None:
                bases = (cls, peft_model)
                namespace["__getattr__"] = nn.Module.__getattr__  # not PeftModel's, which reads its base model
                for attr, member in vars(peft_model).items():
                    if not attr.startswith("__") and attr not in PEFT_API and not hasattr(cls, attr):
                        namespace[attr] = _unsupported(attr, member)
            made = _CLASSES[key] = type(name, bases, namespace)
        return made
