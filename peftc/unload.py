"""merge_and_unload: CompiledModel  ==>  a copy of the original model, of its class, with the adapters in its weights.

The merged tensors are CompiledModel.merge()'s (merge-reparam + fold-params: LoRA and its variants, DoRA, IA3, deltas),
which fold-params names after the weights they replace; here they are copied into a deep copy of the source model.
So the result is a plain transformers (or torch) model: its class, its parameter names, no peftc module, hook or
graph inside, and `save_pretrained`, `generate` and `load_state_dict(strict=True)` work as on the original.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from .errors import PeftcError
from .merge import KEPT_AS_CONSTANTS
from .params import ADAPTER, get_attr_path


def merge_and_unload(cm: nn.Module) -> nn.Module:
    source = cm._source
    activations = sorted({p.method for p in cm.params if p.role == ADAPTER and p.method in KEPT_AS_CONSTANTS})
    if activations:
        raise PeftcError(f"merge_and_unload: {', '.join(activations)} adds learned activations (virtual keys/values "
                         f"or tokens), not a change of weights, so {type(source).__name__} has no place for it. Use "
                         f"cm.merge() (keeps them as constants) or cm.generate(), or save the adapter instead")
    merged = cm.merge()
    model = copy.deepcopy(source)
    own = {name for name, _ in model.named_parameters(remove_duplicate=False)} \
        | {name for name, _ in model.named_buffers(remove_duplicate=False)}
    # Every tensor the merged graph reads must be one of the model's: a merged weight under another name (a weight
    # tied to one that is read unmerged elsewhere) has no place in the original class.
    foreign = sorted({n.target for n in merged.graph_module.graph.nodes if n.op == "get_attr"
                      and isinstance(get_attr_path(merged.graph_module, n.target), torch.Tensor)} - own)
    if foreign:
        raise PeftcError(f"merge_and_unload: the merged model reads `{foreign[0]}`, which {type(source).__name__} "
                         f"has no parameter for (a merged weight that is tied to a weight read unmerged elsewhere?); "
                         f"leave that module out of the spec's target, or use cm.merge()")
    with torch.no_grad():
        for p in merged.params:
            if p.name in own:
                get_attr_path(model, p.name).copy_(p.tensor)
    return model
