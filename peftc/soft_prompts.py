"""Rules of the soft-prompt methods built on prompt tuning and attention matching: P-tuning and adaption prompts."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from .errors import SpecError
from .spec import Rule, Target, _as_target, _positive_int, _shown, register_rule

ENCODERS = ("MLP", "LSTM")


@register_rule
@dataclass(frozen=True)
class PTuning(Rule):
    """P-tuning (HF PEFT's `p_tuning`): prompt tuning whose `length` virtual tokens come from a prompt encoder.

    prompt = mlp_head(E) with `encoder="MLP"` (Linear-ReLU-Linear-ReLU-Linear, hidden `encoder_hidden_size`), or
    mlp_head(biLSTM(E)) with `encoder="LSTM"` (`encoder_num_layers` layers, `encoder_dropout` between them, then
    Linear-ReLU-Linear from 2·hidden). E [length, hidden] is `prompt_encoder.embedding.weight`. The prompt is then
    prepended exactly as PromptTuning prepends its own. `encoder_hidden_size` defaults to the model's hidden size.
    """

    kind: ClassVar[str] = "p_tuning"
    hf_names: ClassVar[dict[str, str]] = {**Rule.hf_names, "num_virtual_tokens": "length",
                                          "encoder_reparameterization_type": "encoder"}

    length: int = 16
    encoder: str = "MLP"
    encoder_hidden_size: int | None = None
    encoder_num_layers: int = 2
    encoder_dropout: float = 0.0

    def __post_init__(self) -> None:
        where = self._where()
        _positive_int(self.length, "length", where)
        if self.encoder not in ENCODERS:
            raise SpecError(f"{where}: `encoder` must be 'MLP' or 'LSTM' (HF's encoder_reparameterization_type), "
                            f"got {_shown(self.encoder)}")
        if self.encoder_hidden_size is not None:
            _positive_int(self.encoder_hidden_size, "encoder_hidden_size", where)
        _positive_int(self.encoder_num_layers, "encoder_num_layers", where)
        if self.encoder == "MLP" and self.encoder_num_layers != 2:
            raise SpecError(f"{where}: the MLP encoder has exactly HF PEFT's 3 linear layers; `encoder_num_layers` "
                            f"sizes the LSTM only (HF ignores it with a warning here). Drop it or use encoder='LSTM'")
        d = self.encoder_dropout
        if isinstance(d, bool) or not isinstance(d, (int, float)) or not 0 <= d < 1:
            raise SpecError(f"{where}: `encoder_dropout` must be in [0, 1), got {_shown(d)}")


@register_rule
@dataclass(frozen=True)
class AdaptionPrompt(Rule):
    """Adaption prompts (HF PEFT's `adaption_prompt`, LLaMA-Adapter): on the top `adapter_layers` attentions,
    `adapter_len` learned tokens whose keys and values the attention's own K/V projections compute, attended to by
    every query apart from the model's own keys (their own softmax, no mask), scaled by a zero-init gate.

    `target` selects attention by module path (LoRA's selector forms); None: every attention. Of those selected,
    the last `adapter_layers` in graph order get prompts.
    """

    kind: ClassVar[str] = "adaption_prompt"

    adapter_len: int = 10
    adapter_layers: int = 1
    target: Target = None

    def __post_init__(self) -> None:
        where = self._where()
        _positive_int(self.adapter_len, "adapter_len", where)
        _positive_int(self.adapter_layers, "adapter_layers", where)
        if self.target == "all-linear":
            raise SpecError(f"{where}: `target` selects attention modules; leave it unset for every attention")
        object.__setattr__(self, "target", _as_target(self.target, "target", where))
