"""insert-p-tuning: embed(ids)  ==>  [encoder(E); embed(ids)], prompt tuning with HF PEFT's prompt encoder."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn
from torch.fx import GraphModule, Node, Proxy
from torch.fx.proxy import GraphAppendingTracer

from peftc.pipeline import PassContext, register_pass
from peftc.rewrite import NodeBuilder
from peftc.soft_prompts import PTuning

from .insert_prompt_tuning import InsertPromptTuning

ENCODER = "prompt_encoder"


def _uniform(bound: float):
    return lambda t: nn.init.uniform_(t, -bound, bound)


def encoder_params(rule: PTuning, hidden: int) -> dict[str, tuple[tuple[int, ...], object]]:
    """{name: (shape, init)} of the prompt encoder, named and initialized as HF PEFT's PromptEncoder."""
    h = rule.encoder_hidden_size or hidden
    out: dict = {"embedding.weight": ((rule.length, hidden), nn.init.normal_)}

    def linear(name: str, fan_in: int, fan_out: int) -> None:  # nn.Linear's own init
        out[f"{name}.weight"] = ((fan_out, fan_in), lambda t: nn.init.kaiming_uniform_(t, a=math.sqrt(5)))
        out[f"{name}.bias"] = ((fan_out,), _uniform(1 / math.sqrt(fan_in)))

    if rule.encoder == "MLP":
        linear("mlp_head.0", hidden, h)
        linear("mlp_head.2", h, h)
        linear("mlp_head.4", h, hidden)
        return out
    for layer in range(rule.encoder_num_layers):  # nn.LSTM(bidirectional=True): uniform(±1/√hidden) everywhere
        for suffix in ("", "_reverse"):
            fan_in = hidden if layer == 0 else 2 * h
            for kind, shape in (("weight_ih", (4 * h, fan_in)), ("weight_hh", (4 * h, h)), ("bias_ih", (4 * h,)),
                                ("bias_hh", (4 * h,))):
                out[f"lstm_head.{kind}_l{layer}{suffix}"] = (shape, _uniform(1 / math.sqrt(h)))
    linear("mlp_head.0", 2 * h, 2 * h)
    linear("mlp_head.2", 2 * h, hidden)
    return out


@register_pass
@dataclass(frozen=True)
class InsertPTuning(InsertPromptTuning):
    """insert-p-tuning: e = embedding(W, ids)  ==>  e = [encoder(E); embedding(W, ids)], as HF PEFT's p-tuning.

    Everything but the prompt is insert-prompt-tuning's (the same lengthened inputs and outputs). The prompt is
    HF PEFT's PromptEncoder on its embedding table E = `prompt_encoder.embedding.weight` [length, hidden]:
    MLP: Linear(hidden, h)-ReLU-Linear(h, h)-ReLU-Linear(h, hidden) (`prompt_encoder.mlp_head.{0,2,4}`);
    LSTM: a bidirectional `encoder_num_layers`-layer LSTM (`prompt_encoder.lstm_head.*`, dropout between layers
    in training graphs), then Linear(2h, 2h)-ReLU-Linear(2h, hidden) (`prompt_encoder.mlp_head.{0,2}`).
    The encoder reads parameters only, so merge and export fold it into a constant prompt.
    """

    name: ClassVar[str] = "insert-p-tuning"
    rule_type: ClassVar[type] = PTuning
    rule: PTuning = None  # type: ignore[assignment]

    def _add_params(self, gm: GraphModule, ctx: PassContext, hidden: int, dtype: torch.dtype, device) -> None:
        # _prompt_table runs next in the same run() and needs these: dropout is live in training graphs only
        object.__setattr__(self, "_sizes", (ctx.training, self.rule.encoder_hidden_size or hidden))
        for key, (shape, init) in encoder_params(self.rule, hidden).items():
            ctx.params.add(gm, f"{ENCODER}.{key}", lambda s=shape, f=init: f(torch.empty(s, dtype=dtype,
                                                                                          device=device)),
                           method="p_tuning", added_by=self.name)

    def _prompt_table(self, b: NodeBuilder) -> Node:
        training, h = self._sizes
        tracer = GraphAppendingTracer(b.graph)
        p = {k: Proxy(b.attr(f"{ENCODER}.{k}"), tracer) for k in encoder_params(self.rule, 1)}
        before = set(b.graph.nodes)
        with b.graph.inserting_before(b.anchor):
            prompt = encode(self.rule, p, h, training)
        for node in b.graph.nodes:
            if node not in before:
                b._tag(node)
        return prompt.node


def encode(rule: PTuning, p: dict, h: int, training: bool = False):
    """HF PEFT's PromptEncoder.forward on the table (tensors, or the graph's proxies): the [length, hidden] prompt."""
    x = p["embedding.weight"]
    if rule.encoder == "LSTM":
        flat = [p[k] for k in p if k.startswith("lstm_head.")]
        zeros = x.new_zeros((2 * rule.encoder_num_layers, 1, h))
        x = torch.lstm(x.unsqueeze(0), (zeros, zeros), flat, True, rule.encoder_num_layers,
                       float(rule.encoder_dropout), training, True, True)[0][0]
        return F.linear(F.relu(F.linear(x, p["mlp_head.0.weight"], p["mlp_head.0.bias"])),
                        p["mlp_head.2.weight"], p["mlp_head.2.bias"])
    for i in (0, 2, 4):
        x = F.linear(x, p[f"mlp_head.{i}.weight"], p[f"mlp_head.{i}.bias"])
        x = F.relu(x) if i < 4 else x
    return x
