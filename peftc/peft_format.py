"""HF PEFT's adapter format, both ways, and peftc's own layout for what PEFT has no format for.

Out: `save_pretrained(cm, dir)` writes `adapter_config.json` + `adapter_model.safetensors` as HF PEFT 0.21 saves them
(keys `base_model.model.<module>.lora_A.weight`, ...; `prompt_embeddings` for prompt learning) when the spec is one
PEFT method (LoRA, IA3, prefix tuning, prompt tuning, norm tuning as LN tuning), optionally with ModulesToSave, and
every choice it made is one PEFT can state. Otherwise it writes peftc's layout: `peftc_spec.json` (Spec.to_dict)
plus `peftc_adapter.safetensors` (the adapter state dict under peftc's names).

In: `spec_from_peft(config)` maps a PEFT config to a Spec with PEFT's selection rules; `read_adapter(dir)` gives the
spec and the adapter state dict under peftc's names, which `CompiledModel.load_adapter_state_dict` loads.

Selectors are translated so that both libraries select the same modules: a peftc regex (full match of the path or
of a dotted suffix) becomes `(?:.*\\.)?(?:R)` for PEFT (a full match of the path); a PEFT regex R becomes peftc's
anchored `^(?:R)`. Before writing a selector, its PEFT reading is worked out on the model (`peft_selects`, PEFT's
`check_target_module_exists`); when it differs from what peftc adapted, the explicit module paths are written.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from pathlib import Path
from typing import Any, Iterable

import torch

from . import lora_parameters
from .capture import ModelInfo
from .delta import aliases_of
from .errors import AdapterError, SpecError
from .match import _matches, all_linear_modules
from .params import ADAPTER
from .spec import IA3, LoRA, ModulesToSave, NormTuning, Prefix, PromptTuning, Rule, Spec, Target

ADAPTER_CONFIG, ADAPTER_WEIGHTS = "adapter_config.json", "adapter_model.safetensors"
PEFTC_SPEC, PEFTC_WEIGHTS = "peftc_spec.json", "peftc_adapter.safetensors"
MODEL_PREFIX = "base_model.model."  # PEFT's key prefix for module adapters (prompt learning saves bare keys)
SEQ_CLS_HEADS = ("classifier", "score")  # what PeftModelForSequenceClassification adds to modules_to_save
PROMPT_LEARNING = ("PREFIX_TUNING", "PROMPT_TUNING")

# Keys PEFT writes that describe the file, not the adapter.
_METADATA = {"peft_type", "auto_mapping", "base_model_name_or_path", "revision", "inference_mode", "peft_version",
             "task_type"}
# Keys peftc maps, per PEFT type.
_SUPPORTED = {
    "LORA": {"target_modules", "exclude_modules", "r", "lora_alpha", "use_rslora", "use_dora", "rank_pattern",
             "alpha_pattern", "lora_dropout", "modules_to_save", "layers_to_transform", "layers_pattern",
             "fan_in_fan_out", "init_lora_weights", "trainable_token_indices", "target_parameters", "lora_bias"},
    "IA3": {"target_modules", "exclude_modules", "feedforward_modules", "modules_to_save", "fan_in_fan_out",
            "init_ia3_weights"},
    "PREFIX_TUNING": {"num_virtual_tokens", "prefix_projection", "encoder_hidden_size", "token_dim",
                      "num_layers", "num_attention_heads", "num_transformer_submodules", "modules_to_save"},
    "PROMPT_TUNING": {"num_virtual_tokens", "prompt_tuning_init", "token_dim", "num_layers", "num_attention_heads",
                      "num_transformer_submodules", "modules_to_save"},
    "LN_TUNING": {"target_modules", "exclude_modules", "modules_to_save"},
    "TRAINABLE_TOKENS": {"target_modules", "token_indices", "init_weights"},
    "P_TUNING": {"num_virtual_tokens", "encoder_reparameterization_type", "encoder_hidden_size",
                 "encoder_num_layers", "encoder_dropout", "token_dim", "num_layers", "num_attention_heads",
                 "num_transformer_submodules", "modules_to_save"},
    "ADAPTION_PROMPT": {"target_modules", "adapter_len", "adapter_layers"},
}
# Non-empty PEFT defaults that change nothing (any key not listed is accepted only when empty: None, False, [], {}).
_INERT_DEFAULTS = {"bias": "none", "megatron_core": "megatron.core", "qalora_group_size": 16}


# ---- selectors ---------------------------------------------------------------------------------------------------
def _alternation(names: Iterable[str]) -> str:
    return "|".join(re.escape(n) for n in names)


def peft_regex(target: str) -> str:
    """A peftc regex ==> the PEFT regex (full match of the module path) that selects the same paths."""
    return target if target.startswith("^") else rf"(?:.*\.)?(?:{target})"


def _layer_check(layers: Iterable[int], pattern: str | list[str] | None) -> str:
    """A lookahead true when PEFT's layer index of the path is in `layers`: the first `.<name>.<digits>.` segment
    (`layers_pattern` names which), as check_target_module_exists reads it."""
    index = rf"0*(?:{'|'.join(str(i) for i in sorted(set(layers)))})\."
    if not pattern:
        first = r"[^.]*\.(?:(?![^.]*\.\d+\.)[^.]*\.)*?"  # the first dot, then skip starts with no index after them
        return rf"(?={first}[^.]*\.{index})"
    patterns = [pattern] if isinstance(pattern, str) else list(pattern)
    # PEFT takes the first pattern that occurs anywhere, then its first occurrence (at the start or after a dot).
    check = r"(?!)"
    for p in reversed(patterns):
        occurs = rf"(?:^|.*\.)(?:{p})\.\d+\."
        first = rf"(?:(?!(?:{p})\.\d+\.)[^.]*\.)*?"
        check = rf"(?:(?=(?s:{occurs}))(?={first}(?:{p})\.{index})|(?!(?s:{occurs})){check})"
    return check


def _target_from_peft(value: Any, layers: Any = None, pattern: Any = None) -> Target:
    """PEFT `target_modules` (+ layers_to_transform / layers_pattern) ==> a peftc target selecting the same paths."""
    if value is None:
        return None
    if isinstance(value, str):
        return "all-linear" if value.lower() == "all-linear" else f"^(?:{value})"
    names = sorted(value) if isinstance(value, (set, frozenset)) else list(value)
    if layers is None or layers == []:
        return tuple(names)
    layers = [layers] if isinstance(layers, int) else list(layers)
    alt = _alternation(names)
    # A name given exactly is taken whatever its layer; a dotted suffix only in the chosen layers.
    return rf"^(?:(?:{alt})|{_layer_check(layers, pattern)}.*\.(?:{alt}))"


def _exclude_from_peft(exclude: Any, modules_to_save: list[str] | None) -> Target:
    """PEFT's exclusions (exclude_modules, and every module inside a modules_to_save module) as one peftc target."""
    parts = []
    if isinstance(exclude, str):
        parts.append(exclude)
    elif exclude:
        if not modules_to_save:
            return tuple(exclude)
        parts.append(rf"(?:.*\.)?(?:{_alternation(exclude)})")
    for m in modules_to_save or []:
        parts.append(rf"(?:.*\.)?(?:{m})(?:\..*)?")  # PEFT's r"(^|.*\.){m}($|\..*)", m as a regex
    return f"^(?:{'|'.join(parts)})" if parts else None


def _endswith_from_peft(names: list[str]) -> str:
    """PEFT's `key.endswith(name)` (modules_to_save, IA3's feedforward_modules list) as a peftc regex."""
    return rf"^.*(?:{_alternation(names)})"


def _peft_module_match(config: dict, key: str) -> bool:
    """HF PEFT's check_target_module_exists, on `config` as PEFT holds it (all-linear already resolved)."""
    exclude = config.get("exclude_modules")
    if exclude:
        if isinstance(exclude, str):
            if re.fullmatch(exclude, key):
                return False
        elif key in exclude or any(key.endswith(f".{e}") for e in exclude):
            return False
    if any(re.match(rf"(^|.*\.){m}($|\..*)", key) for m in config.get("modules_to_save") or []):
        return False
    target = config.get("target_modules")
    if isinstance(target, str):
        return re.fullmatch(target, key) is not None
    if key in target:
        return True
    found = any(key.endswith(f".{t}") for t in target)
    layers, pattern = config.get("layers_to_transform"), config.get("layers_pattern")
    if found and layers not in (None, []):
        if not pattern:
            match = re.match(r".*?\.[^.]*\.(?P<idx>\d+)\.", key)
        else:
            match = None
            for p in [pattern] if isinstance(pattern, str) else pattern:
                match = re.match(rf"(?:^|.*?\.){p}\.(?P<idx>\d+)\.", key)
                if match is not None:
                    break
        if match is None:
            return False
        index = int(match.group("idx"))
        return index == layers if isinstance(layers, int) else index in layers
    return found


def _with_seq_cls_heads(config: dict) -> list[str] | None:
    mts = list(config.get("modules_to_save") or [])
    if config.get("task_type") == "SEQ_CLS":
        mts += [h for h in SEQ_CLS_HEADS if h not in mts]
    return mts or None


def peft_selects(config: dict, info: ModelInfo) -> set[str]:
    """The module paths HF PEFT adapts with `config` (LoRA, IA3, LN tuning) on the model `info` describes."""
    config = {**config, "modules_to_save": _with_seq_cls_heads(config)}
    target = config.get("target_modules")
    if isinstance(target, str) and target.lower() == "all-linear":
        config["target_modules"] = all_linear_modules(dataclasses.replace(info, task_type=config.get("task_type")))
    return {key for key in info.module_types if key and _peft_module_match(config, key)}


def peft_modules_to_save(names: list[str], info: ModelInfo) -> set[str]:
    """The modules HF PEFT wraps for `modules_to_save` names: every path that ends with one of them."""
    return {key for key in info.module_types if key and any(key.endswith(n) for n in names)}


# ---- PEFT config ==> Spec --------------------------------------------------------------------------------------
def read_config(source: Any) -> dict:
    """A PEFT config as a plain dict, from a directory, an adapter_config.json path, a config object or a dict."""
    if isinstance(source, dict):
        return dict(source)
    if isinstance(source, (str, Path)):
        path = Path(source)
        if path.is_dir():
            path = path / ADAPTER_CONFIG
        try:
            return json.loads(path.read_text())
        except FileNotFoundError:
            raise SpecError(f"{path} does not exist; give a PEFT adapter directory (with {ADAPTER_CONFIG}), the "
                            f"file itself, a peft config object or a dict") from None
        except json.JSONDecodeError as e:
            raise SpecError(f"{path}:{e.lineno}: invalid JSON: {e.msg}") from None
    to_dict = getattr(source, "to_dict", None)
    if callable(to_dict):
        return dict(to_dict())
    raise SpecError(f"Spec.from_peft needs a PEFT adapter directory, an {ADAPTER_CONFIG} path, a peft config or a "
                    f"dict, not {type(source).__name__}")


def _plain(value: Any) -> Any:
    """Enums (PeftType.LORA) and sets as JSON would hold them."""
    if hasattr(value, "value") and isinstance(getattr(value, "value"), str):
        return value.value
    if isinstance(value, (set, frozenset)):
        return sorted(value)
    return value


def _is_empty(value: Any) -> bool:
    if isinstance(value, dict):
        return all(_is_empty(v) for v in value.values())
    return value in (None, False, [], {}, "") or (hasattr(value, "__dataclass_fields__") and _is_empty(vars(value)))


def _check_keys(config: dict, peft_type: str, where: str, supported: set[str] | None = None) -> None:
    supported = _SUPPORTED[peft_type] if supported is None else supported
    for key, value in config.items():
        if key in supported or key in _METADATA or _is_empty(value) or _INERT_DEFAULTS.get(key) == value:
            continue
        raise SpecError(f"{where}: PEFT key `{key}` = {value!r} is not supported by peftc for {peft_type}; "
                        f"supported keys: {', '.join(sorted(supported))} (other keys may only have their "
                        f"default values)")


def spec_from_peft(source: Any, *, saved: dict[str, torch.Tensor] | None = None) -> Spec:
    """A PEFT config ==> the Spec that selects and initializes what HF PEFT would (docs/huggingface.md).

    `saved` (the tensors of a saved adapter) resolves what the config leaves to PEFT's per-architecture tables
    (`target_modules=None`) from the saved keys, and makes a projected prefix load as the prefixes PEFT saved.
    """
    config = {k: _plain(v) for k, v in read_config(source).items()}
    peft_type = config.get("peft_type")
    where = f"PEFT config ({peft_type})"
    methods = _peft_methods()
    if peft_type in methods:
        return _method_from_peft(methods[peft_type], config, where)
    if peft_type not in _SUPPORTED:
        raise SpecError(f"PEFT config: peft_type {peft_type!r} is not supported; peftc reads "
                        f"{', '.join([*_SUPPORTED, *methods])}")
    _check_keys(config, peft_type, where)
    task_type = config.get("task_type")
    mts = _with_seq_cls_heads(config)
    keys = sorted(saved) if saved is not None else None
    rules: list[Rule] = []
    if peft_type == "LORA":
        parameters = config.get("target_parameters") or None
        if parameters and keys is not None:
            keys = [k for k in keys if not _parameter_key(k, parameters)]
        if parameters and config.get("target_modules") is None and keys is not None \
                and not any(".lora_A." in k for k in keys):
            target = None  # the saved adapter has no module adapter
        else:
            target = _module_target(config, keys, ".lora_A.", where)
        rules.append(LoRA(target=target, target_parameters=parameters, r=config.get("r", 8),
                          init=config.get("init_lora_weights", True),
                          alpha=config.get("lora_alpha", 8), dropout=config.get("lora_dropout") or 0.0,
                          use_rslora=bool(config.get("use_rslora")), use_dora=bool(config.get("use_dora")),
                          lora_bias=bool(config.get("lora_bias")), exclude=_exclude_from_peft(config.get("exclude_modules"), mts),
                          rank_pattern=config.get("rank_pattern") or None,
                          alpha_pattern=config.get("alpha_pattern") or None))
    elif peft_type == "IA3":
        ff = config.get("feedforward_modules")
        if ff is None and saved is not None:  # feed-forward vectors are saved [1, in], output ones [out, 1]
            ff = [_owner_before(k, ".ia3_l") for k, v in saved.items()
                  if k.endswith(".ia3_l") and v.dim() == 2 and v.shape[0] == 1]
        if isinstance(ff, str):
            feedforward = f"^(?:{ff})"
        else:
            feedforward = _endswith_from_peft(ff) if ff else None
        rules.append(IA3(target=_module_target(config, keys, ".ia3_l", where), feedforward=feedforward,
                         exclude=_exclude_from_peft(config.get("exclude_modules"), mts)))
    elif peft_type == "PREFIX_TUNING":
        if (config.get("num_transformer_submodules") or 1) != 1:
            raise SpecError(f"{where}: num_transformer_submodules={config['num_transformer_submodules']} "
                            f"(encoder-decoder prefixes) is not supported; peftc reads decoder-only and encoder-only "
                            f"prefix tuning")
        projection = bool(config.get("prefix_projection")) and keys is None  # PEFT saves the projected prefixes
        rules.append(Prefix(length=_required(config, "num_virtual_tokens", where), projection=projection,
                            encoder_hidden_size=config.get("encoder_hidden_size") if projection else None))
    elif peft_type == "ADAPTION_PROMPT":
        from .soft_prompts import AdaptionPrompt

        rules.append(AdaptionPrompt(adapter_len=_required(config, "adapter_len", where),
                                    adapter_layers=_required(config, "adapter_layers", where),
                                    target=config.get("target_modules")))
    elif peft_type == "P_TUNING":
        # PEFT saves a P-tuning adapter as its encoder's output and loads it (inference mode) as the prompt
        if (config.get("num_transformer_submodules") or 1) != 1:
            raise SpecError(f"{where}: num_transformer_submodules={config['num_transformer_submodules']} "
                            f"(encoder-decoder prompts) is not supported")
        rules.append(PromptTuning(length=_required(config, "num_virtual_tokens", where)))
    elif peft_type == "PROMPT_TUNING":
        init = config.get("prompt_tuning_init", "RANDOM")
        if init != "RANDOM" and keys is None:
            raise SpecError(f"{where}: prompt_tuning_init={init!r} needs a tokenizer; peftc initializes prompts "
                            f"RANDOM (load a saved adapter to start from trained embeddings)")
        if (config.get("num_transformer_submodules") or 1) != 1:
            raise SpecError(f"{where}: num_transformer_submodules={config['num_transformer_submodules']} "
                            f"(encoder-decoder prompts) is not supported")
        rules.append(PromptTuning(length=_required(config, "num_virtual_tokens", where)))
    elif peft_type == "TRAINABLE_TOKENS":
        rules.append(_trainable_tokens_rule(config.get("token_indices"), config.get("target_modules"), where))
    else:  # LN_TUNING
        target = config.get("target_modules")
        if target is None and keys is not None:
            target = sorted({_owner_before(k, ".ln_tuning_layers.") for k in keys})
        from .passes.insert_ln_tuning import LNTuning

        # HF's LN tuning copies whatever modules it targets; with no target (PEFT's per-architecture norm names)
        # peftc's NormTuning selects every norm.
        rule_type = NormTuning if target is None else LNTuning
        rules.append(rule_type(target=_target_from_peft(target),
                               exclude=_exclude_from_peft(config.get("exclude_modules"), mts)))
    tokens = config.get("trainable_token_indices") if peft_type == "LORA" else None
    if isinstance(tokens, dict):
        rules += [_trainable_tokens_rule(idx, [module], where) for module, idx in tokens.items()]
    elif tokens:
        rules.append(_trainable_tokens_rule(tokens, None, where))
    if mts:
        rules.append(ModulesToSave(target=_endswith_from_peft(mts)))
    return Spec(*rules, task_type=task_type)


def _trainable_tokens_rule(indices: Any, target: Any, where: str) -> Rule:
    from .passes.insert_trainable_tokens import TrainableTokens

    if not indices:
        raise SpecError(f"{where}: trainable tokens need `token_indices`")
    return TrainableTokens(indices=list(indices), target=_target_from_peft(target))


# ---- methods written with peftc.Method that name their HF PEFT type (OFT, BOFT, ...) --------------------------------
_SELECTION_KEYS = {"target_modules", "exclude_modules", "modules_to_save", "layers_to_transform", "layers_pattern",
                   "fan_in_fan_out"}


def _peft_methods() -> dict[str, type]:
    from .method import Method
    from .spec import RULE_KINDS

    return {cls.peft_type: cls for cls in RULE_KINDS.values() if issubclass(cls, Method) and cls.peft_type}


def _option_names(cls) -> dict[str, str]:
    """{PEFT config key: field} for the method's options."""
    to_hf = {field: key for key, field in cls.hf_names.items()}
    return {to_hf.get(f.name, f.name): f.name for f in dataclasses.fields(cls) if f.name not in ("target", "exclude")}


def _method_from_peft(cls, config: dict, where: str) -> Spec:
    options = _option_names(cls)
    inert = {k for k, v in cls.peft_defaults.items() if v is None or config.get(k) == v}
    _check_keys({k: v for k, v in config.items() if k not in inert}, config["peft_type"], where,
                {*options, *_SELECTION_KEYS})
    mts = _with_seq_cls_heads(config)
    rule = cls(target=_module_target(config, None, "", where),
               exclude=_exclude_from_peft(config.get("exclude_modules"), mts),
               **{field: config[key] for key, field in options.items() if key in config and config[key] is not None})
    return Spec(rule, *([ModulesToSave(target=_endswith_from_peft(mts))] if mts else []),
                task_type=config.get("task_type"))


def owning_module(name: str, info: ModelInfo) -> str:
    """The module an adapter tensor `<module>.<key>` sits on: the longest module path its name starts with
    (`<module>.oft_R.weight`), else the part before its last dot."""
    parts = name.split(".")
    owners = [".".join(parts[:i]) for i in range(len(parts) - 1, 0, -1)]
    return next((o for o in owners if o in info.module_types), owners[0])


def _tensor_modules(cm, method: str) -> set[str]:
    """The modules `method`'s tensors sit on; a shared tensor (VeRA's `vera_A`) sits on none."""
    return {owning_module(p.name, cm._info) for p in cm.params
            if p.role == ADAPTER and p.method == method and "." in p.name}


def _method(cm, rule) -> tuple[dict, dict]:
    adapted = _tensor_modules(cm, rule.kind)
    swappable = ("Linear", "Conv1D", "Conv1d", "Conv2d", "Conv3d")
    odd = sorted(m for m in adapted if cm._info.module_types.get(m, "") not in swappable)
    if odd:
        raise NotPeftExpressible(f"{type(rule).__name__} on `{odd[0]}`, which is not an nn.Linear, Conv1D or "
                                 f"convolution module (a weight read functionally), has no PEFT format: PEFT swaps "
                                 f"modules")
    config = {**_base_config(cm, rule.peft_type, cm.spec.task_type), "bias": "none", "peft_version": "0.21.2",
              **{key: getattr(rule, field) for key, field in _option_names(type(rule)).items()},
              "fan_in_fan_out": any(cm._info.module_types.get(m) == "Conv1D" for m in adapted)}
    # a shared tensor (no module: VeRA's `vera_A`) is HF's `base_model.vera_A`
    tensors = {(MODEL_PREFIX if "." in p.name else "base_model.") + p.name: p.tensor.detach() for p in cm.params
               if p.role == ADAPTER and p.method == rule.kind}
    _with_modules_to_save(cm, config, tensors, MODEL_PREFIX)
    return _choose_targets(cm, config, rule.target, rule.exclude, adapted, "modules"), tensors


def _required(config: dict, key: str, where: str) -> Any:
    if config.get(key) is None:
        raise SpecError(f"{where}: `{key}` is required")
    return config[key]


def _owner_before(key: str, marker: str) -> str:
    return key.removeprefix(MODEL_PREFIX).split(marker)[0]


def _parameter_key(key: str, parameters: list[str]) -> bool:
    """A saved key of a target_parameters adapter: its module (HF's `.base_layer` nesting removed) owns a name."""
    module = _owner_before(key, ".lora_").replace(".base_layer", "")
    owners = [t.rpartition(".")[0] for t in parameters]
    return any(module == o or module.endswith("." + o) for o in owners if o)


def _module_target(config: dict, keys: list[str] | None, marker: str, where: str) -> Target:
    target = config.get("target_modules")
    if target is None:
        if keys is None:
            raise SpecError(f"{where}: target_modules is not set (PEFT then uses its per-architecture defaults); "
                            f"give target_modules ([] for target_parameters alone), or load a saved adapter "
                            f"directory")
        modules = sorted({_owner_before(k, marker) for k in keys if marker in k})
        return f"^(?:{_alternation(modules)})"
    return _target_from_peft(target, config.get("layers_to_transform"), config.get("layers_pattern"))


# ---- CompiledModel ==> PEFT ------------------------------------------------------------------------------------
class NotPeftExpressible(SpecError):
    """The compiled spec has no HF PEFT format (peftc's own layout still saves it)."""


_TASK_BY_CLASS = (("ForCausalLM", "CAUSAL_LM"), ("LMHeadModel", "CAUSAL_LM"), ("ForSequenceClassification", "SEQ_CLS"),
                  ("ForTokenClassification", "TOKEN_CLS"), ("ForQuestionAnswering", "QUESTION_ANS"),
                  ("ForConditionalGeneration", "SEQ_2_SEQ_LM"), ("Seq2SeqLM", "SEQ_2_SEQ_LM"))


def _prompt_task_type(cm) -> str:
    """Prompt learning needs a task type (it picks PEFT's model class); the spec's, else read off the class name."""
    if cm.spec.task_type is not None:
        return cm.spec.task_type
    name = type(cm._source).__name__
    return next((task for suffix, task in _TASK_BY_CLASS if suffix in name), "FEATURE_EXTRACTION")


def _base_config(cm, peft_type: str, task_type: str | None) -> dict:
    hf = getattr(cm._source, "config", None)
    return {"peft_type": peft_type, "task_type": task_type, "inference_mode": True,
            "base_model_name_or_path": getattr(hf, "_name_or_path", None) or None}


def _module_params(cm, module: str) -> list[tuple[str, str]]:
    """(name under `module`, table name) of every parameter of `module` and its submodules."""
    out = []
    for table_name, aliases in cm._info.aliases.items():
        for alias in aliases:
            if alias.startswith(module + "."):
                out.append((alias, table_name))
    return out


def _base_tensor(cm, table_name: str) -> torch.Tensor:
    """A base weight, whole: gathered when FSDP2 sharded it (a collective, reached in the same order on every rank,
    which all run the same code)."""
    from .distributed import whole_tensor

    if table_name in cm.params:
        return whole_tensor(cm.params[table_name].tensor.detach())
    return whole_tensor(cm._source.get_parameter(table_name).detach())


def _delta_name(alias: str, method: str) -> str:
    owner, _, leaf = alias.rpartition(".")
    return f"{owner}.{method}.{leaf}" if owner else f"{method}.{leaf}"


def _trained_module(cm, module: str, method: str) -> dict[str, torch.Tensor]:
    """Every parameter of `module` as trained: base + its dense delta (`<owner>.<method>.<leaf>`) where it has one."""
    out = {}
    for alias, table_name in _module_params(cm, module):
        value = _base_tensor(cm, table_name)
        delta = _delta_name(alias, method)
        if delta in cm.params:
            value = (value.to(cm.params[delta].tensor.dtype) + cm.params[delta].tensor.detach()).to(value.dtype)
        out[alias] = value
    return out


def _adapted(cm, method: str, marker: str) -> set[str]:
    return {p.name.split(marker)[0] for p in cm.params if p.role == ADAPTER and p.method == method and marker in p.name}


def _outermost(modules: set[str]) -> set[str]:
    return {m for m in modules if not any(m.startswith(o + ".") for o in modules)}


def _selector_candidates(target: Target, exclude: Target) -> list[tuple[Any, Any]]:
    def peft(t: Target) -> Any:
        if t is None or t == "all-linear":
            return t
        return peft_regex(t) if isinstance(t, str) else list(t)

    return [(peft(target), peft(exclude))] if target is not None else []


def _choose_targets(cm, config: dict, target: Target, exclude: Target, adapted: set[str], what: str) -> dict:
    """target_modules/exclude_modules that PEFT reads as exactly `adapted`: the spec's own selectors when PEFT
    selects the same modules with them, else the module paths."""
    for t, e in [*_selector_candidates(target, exclude), (sorted(adapted), None)]:
        trial = {**config, "target_modules": t, "exclude_modules": e}
        if peft_selects(trial, cm._info) == adapted:
            return trial
    chosen = peft_selects({**config, "target_modules": sorted(adapted), "exclude_modules": None}, cm._info)
    extra, missing = sorted(chosen - adapted), sorted(adapted - chosen)
    raise NotPeftExpressible(f"PEFT cannot select exactly the {what} peftc adapted: it would "
                             + (f"also adapt {extra[0]}" if extra else f"not adapt {missing[0]}")
                             + " (modules inside modules_to_save and paths that end with another path are what "
                               "PEFT reads differently)")


def _modules_to_save(cm) -> tuple[set[str], list[str] | None]:
    """(the modules trained in full, the `modules_to_save` names PEFT reads as exactly those)."""
    trained = {_delta_owner(p.name, "modules_to_save") for p in cm.params
               if p.role == ADAPTER and p.method == "modules_to_save"}
    if not trained:
        return set(), None
    rules = [r for r in cm.spec.rules if isinstance(r, ModulesToSave)]
    modules = _outermost({m for m in _enclosing_all(trained)
                          if any(_rule_selects_module(r, m) for r in rules)}) if rules else \
        {m for m in _enclosing_all(trained) if m in SEQ_CLS_HEADS}
    heads = list(SEQ_CLS_HEADS) if cm.spec.task_type == "SEQ_CLS" else []
    candidates = []
    if rules and all(isinstance(r.target, tuple) and r.exclude is None for r in rules):
        candidates.append([n for r in rules for n in r.target])
    candidates.append(sorted(modules))
    for names in candidates:
        if peft_modules_to_save(names + [h for h in heads if h not in names], cm._info) == modules:
            return modules, names
    raise NotPeftExpressible(f"PEFT cannot name exactly the modules trained in full ({', '.join(sorted(modules))}): "
                             f"modules_to_save matches every module path that ends with a name")


def _delta_owner(name: str, method: str) -> str:
    """`classifier.dense.modules_to_save.weight` ==> `classifier.dense` (the module the parameter belongs to)."""
    return name.rsplit(f".{method}.", 1)[0]


def _enclosing_all(modules: set[str]) -> set[str]:
    out = set()
    for m in modules:
        parts = m.split(".")
        out.update(".".join(parts[:i]) for i in range(1, len(parts) + 1))
    return out


def _rule_selects_module(rule: ModulesToSave, module: str) -> bool:
    return _matches(rule.target, module) and not (rule.exclude is not None and _matches(rule.exclude, module))


def _with_modules_to_save(cm, config: dict, tensors: dict[str, torch.Tensor], prefix: str) -> None:
    modules, names = _modules_to_save(cm)
    config["modules_to_save"] = names
    for m in sorted(modules):
        for alias, value in _trained_module(cm, m, "modules_to_save").items():
            tensors[prefix + alias] = value


def _lora(cm, rule: LoRA) -> tuple[dict, dict]:
    if rule.slices:
        raise NotPeftExpressible("per-slice LoRA (`slices`) has no PEFT format")
    parameter_keys = lora_parameters.peft_names(cm)  # target_parameters adapters, keyed by HF's nesting
    adapted = _adapted(cm, "lora", ".lora_A") | _adapted(cm, "lora", ".lora_embedding_A")
    adapted -= {n.removesuffix(".lora_A.weight") for n in parameter_keys}
    # an MultiheadAttention's out-projection comes with the MHA (`<mha>.base_layer.out_proj`, HF's key)
    adapted = {m for m in adapted if not (m.endswith(".base_layer.out_proj") and
                                          cm._info.module_types.get(m.rsplit(".", 2)[0]) == "MultiheadAttention")}
    convs = {m for m in adapted if cm._info.module_types.get(m, "") in ("Conv1d", "Conv2d", "Conv3d", "Embedding",
                                                                         "MultiheadAttention")}
    odd = sorted(m for m in adapted if m not in cm._info.linear_modules and m not in convs)
    if odd:
        raise NotPeftExpressible(f"LoRA on `{odd[0]}`, which is not an nn.Linear, Conv1D, convolution or "
                                 f"nn.Embedding module (a weight read functionally), has no PEFT format: PEFT swaps "
                                 f"modules")
    config = {**_base_config(cm, "LORA", cm.spec.task_type), "r": rule.r, "lora_alpha": rule.alpha,
              "lora_dropout": rule.dropout, "use_rslora": rule.use_rslora, "use_dora": rule.use_dora,
              "rank_pattern": dict(rule.rank_pattern or {}), "alpha_pattern": dict(rule.alpha_pattern or {}),
              "bias": "none", "init_lora_weights": rule.init, "lora_bias": rule.lora_bias,
              "fan_in_fan_out": any(cm._info.module_types.get(m) == "Conv1D" for m in adapted)}
    if parameter_keys:
        config["target_parameters"] = lora_parameters.peft_target_parameters(cm, rule)
    tensors = {MODEL_PREFIX + parameter_keys.get(p.name, p.name): p.tensor.detach() for p in cm.params
               if p.role == ADAPTER and p.method == "lora"}
    _with_modules_to_save(cm, config, tensors, MODEL_PREFIX)
    tokens = _token_rows(cm)
    if tokens:  # HF's LoraConfig.trainable_token_indices {module: indices}, rows under `token_adapter.`
        config["trainable_token_indices"] = {}
        for rows, weight in tokens.items():
            module = rows.removesuffix(".trainable_tokens_delta")
            config["trainable_token_indices"][module] = cm.params[module + ".trainable_tokens_index"].tensor.tolist()
            tensors[f"{MODEL_PREFIX}{module}.token_adapter.trainable_tokens_delta"] = \
                cm.params[rows].tensor.detach().to(_base_tensor(cm, weight).dtype)
    return _choose_targets(cm, config, rule.target, rule.exclude, adapted, "modules"), tensors


def _trainable_tokens(cm, rule) -> tuple[dict, dict]:
    """HF's TRAINABLE_TOKENS adapter: `<module>.trainable_tokens_delta` (the rows), and HF's copy for a tied
    output layer."""
    tokens = _token_rows(cm)
    if len(tokens) != 1:
        raise NotPeftExpressible(f"a TRAINABLE_TOKENS adapter holds one embedding; this one has {len(tokens)}")
    rows, weight = next(iter(tokens.items()))
    module = rows.removesuffix(".trainable_tokens_delta")
    value = cm.params[rows].tensor.detach().to(_base_tensor(cm, weight).dtype)
    config = {**_base_config(cm, "TRAINABLE_TOKENS", cm.spec.task_type), "target_modules": module,
              "token_indices": cm.params[module + ".trainable_tokens_index"].tensor.tolist(), "init_weights": True}
    tensors = {f"{MODEL_PREFIX}{module}.trainable_tokens_delta": value}
    for alias in aliases_of(cm._info, weight):
        owner_module = alias.removesuffix(".weight")
        if owner_module != module and cm._info.module_types.get(owner_module) == "Linear":
            tensors[f"{MODEL_PREFIX}{owner_module}.trainable_tokens_delta"] = value
    return config, tensors


def _ia3(cm, rule: IA3) -> tuple[dict, dict]:
    adapted = _adapted(cm, "ia3", ".ia3_l")
    odd = sorted(m for m in adapted if m not in cm._info.linear_modules
                 and cm._info.module_types.get(m) not in ("Conv2d", "Conv3d"))
    if odd:
        raise NotPeftExpressible(f"IA3 on `{odd[0]}`, which is not an nn.Linear, Conv1D, Conv2d or Conv3d module, has "
                                 f"no PEFT format")
    # insert-ia3's choice: the adapted modules `feedforward` selects
    feedforward = set() if rule.feedforward is None else adapted & all_linear_modules(cm._info) \
        if rule.feedforward == "all-linear" else {m for m in adapted if _matches(rule.feedforward, m)}
    config = {**_base_config(cm, "IA3", cm.spec.task_type), "init_ia3_weights": True,
              "fan_in_fan_out": any(cm._info.module_types.get(m) == "Conv1D" for m in adapted)}
    tensors = {MODEL_PREFIX + p.name: p.tensor.detach() for p in cm.params if p.role == ADAPTER and p.method == "ia3"}
    _with_modules_to_save(cm, config, tensors, MODEL_PREFIX)
    config = _choose_targets(cm, config, rule.target, rule.exclude, adapted, "modules")
    ff_candidates = [sorted(feedforward)]
    if rule.feedforward is not None:
        ff_candidates.insert(0, peft_regex(rule.feedforward) if isinstance(rule.feedforward, str)
                             else list(rule.feedforward))
    for ff in ff_candidates:
        chosen = {m for m in adapted
                  if (re.fullmatch(ff, m) if isinstance(ff, str) else any(m.endswith(f) for f in ff))}
        if chosen != feedforward:
            continue
        if isinstance(ff, list) and isinstance(config["target_modules"], list) \
                and not set(ff) <= set(config["target_modules"]):
            # PEFT wants listed feed-forward names among the listed targets: list both as module paths
            config = _choose_targets(cm, config, None, None, adapted, "modules")
            ff = sorted(feedforward)
        config["feedforward_modules"] = ff
        return config, tensors
    raise NotPeftExpressible("PEFT's feedforward_modules (a name matches every path that ends with it) cannot name "
                             f"exactly the feed-forward modules {sorted(feedforward)}")


def _norm_tuning(cm, rule: NormTuning, method: str = "norm_tuning") -> tuple[dict, dict]:
    adapted = {_delta_owner(p.name, method) for p in cm.params if p.role == ADAPTER and p.method == method}
    config = _base_config(cm, "LN_TUNING", cm.spec.task_type)
    tensors = {}
    for m in sorted(adapted):
        for alias, value in _trained_module(cm, m, method).items():
            tensors[f"{MODEL_PREFIX}{m}.ln_tuning_layers{alias[len(m):]}"] = value
    _with_modules_to_save(cm, config, tensors, MODEL_PREFIX)
    return _choose_targets(cm, config, rule.target, rule.exclude, adapted, "norm modules"), tensors


def _hf_config_value(cm, *keys: str) -> Any:
    hf = getattr(cm._source, "config", None)
    return next((getattr(hf, k) for k in keys if getattr(hf, k, None) is not None), None)


def _prefix(cm, rule: Prefix) -> tuple[dict, dict]:
    from .passes.insert_prefix import ENCODER

    keys = [p for p in cm.params if p.role == ADAPTER and p.method == "prefix" and p.name.endswith("prefix_key")]
    if keys:
        values = [cm.params[p.name[:-len("prefix_key")] + "prefix_value"].tensor.detach() for p in keys]
        keys_t = [p.tensor.detach() for p in keys]
        kv_heads, length, head_dim = keys_t[0].shape
        # PEFT's prompt_embeddings [length, layers·2·kv_dim]: per layer, keys then values, heads flattened.
        columns = [t.permute(1, 0, 2).reshape(length, -1) for pair in zip(keys_t, values) for t in pair]
        embeddings = torch.cat(columns, dim=1)
        if any(v.shape != keys_t[0].shape for v in [*keys_t, *values]):
            raise NotPeftExpressible("PEFT's prefix has one key/value width for every layer; this model's differ")
        layers = len(keys)
    else:  # projection: PEFT saves the MLP's output, as peftc's merge folds it
        def param(name: str) -> torch.Tensor:
            return cm.params[f"{ENCODER}.{name}"].tensor.detach()

        hidden = torch.tanh(torch.nn.functional.linear(param("embedding.weight"), param("transform.0.weight"),
                                                       param("transform.0.bias")))
        embeddings = torch.nn.functional.linear(hidden, param("transform.2.weight"), param("transform.2.bias"))
        kv_dim = param("embedding.weight").shape[1]
        layers = embeddings.shape[1] // (2 * kv_dim)
        from .attention import attention_sites
        site = attention_sites(cm.graph_module)[0]
        kv_heads, head_dim, length = site.kv_heads, site.head_dim, rule.length
    model_layers = _hf_config_value(cm, "num_hidden_layers", "n_layer", "num_layers")
    if model_layers is not None and layers != model_layers:
        raise NotPeftExpressible(f"PEFT's prefix tuning puts a prefix on every layer ({model_layers}); peftc's is "
                                 f"on {layers} attention modules")
    config = {**_base_config(cm, "PREFIX_TUNING", _prompt_task_type(cm)), "num_virtual_tokens": length,
              "token_dim": kv_heads * head_dim, "num_layers": layers, "num_attention_heads": kv_heads,
              "num_transformer_submodules": 1, "prefix_projection": False, "encoder_hidden_size": kv_heads * head_dim}
    tensors = {"prompt_embeddings": embeddings}
    _with_modules_to_save(cm, config, tensors, "base_model.")
    return config, tensors


def _prompt(cm, rule: PromptTuning) -> tuple[dict, dict]:
    from .passes.insert_prompt_tuning import PROMPT

    prompt = cm.params[PROMPT].tensor.detach()
    config = {**_base_config(cm, "PROMPT_TUNING", _prompt_task_type(cm)), "num_virtual_tokens": rule.length,
              "token_dim": prompt.shape[1], "num_transformer_submodules": 1, "prompt_tuning_init": "RANDOM",
              "num_layers": _hf_config_value(cm, "num_hidden_layers", "n_layer", "num_layers"),
              "num_attention_heads": _hf_config_value(cm, "num_attention_heads", "n_head")}
    tensors = {"prompt_embeddings": prompt}
    _with_modules_to_save(cm, config, tensors, "base_model.")
    return config, tensors


def _p_tuning(cm, rule) -> tuple[dict, dict]:
    """PEFT's P-tuning file: the encoder's output as `prompt_embeddings` (what PEFT saves and loads)."""
    from .passes.insert_p_tuning import ENCODER, encode, encoder_params

    table = cm.params[f"{ENCODER}.embedding.weight"].tensor
    hidden = table.shape[1]
    p = {k: cm.params[f"{ENCODER}.{k}"].tensor.detach() for k in encoder_params(rule, hidden)}
    with torch.no_grad():
        prompt = encode(rule, p, rule.encoder_hidden_size or hidden)
    config = {**_base_config(cm, "P_TUNING", _prompt_task_type(cm)), "num_virtual_tokens": rule.length,
              "token_dim": hidden, "num_transformer_submodules": 1,
              "encoder_reparameterization_type": rule.encoder, "encoder_hidden_size": rule.encoder_hidden_size or hidden,
              "encoder_num_layers": rule.encoder_num_layers, "encoder_dropout": rule.encoder_dropout,
              "num_layers": _hf_config_value(cm, "num_hidden_layers", "n_layer", "num_layers"),
              "num_attention_heads": _hf_config_value(cm, "num_attention_heads", "n_head")}
    tensors = {"prompt_embeddings": prompt}
    _with_modules_to_save(cm, config, tensors, "base_model.")
    return config, tensors


def _adaption_prompt(cm, rule) -> tuple[dict, dict]:
    names = [p.name for p in cm.params if p.role == ADAPTER and p.method == "adaption_prompt"]
    modules = sorted({n.rsplit(".", 1)[0] for n in names})
    leaves = {m.rsplit(".", 1)[-1] for m in modules}
    if len(leaves) != 1:
        raise NotPeftExpressible(f"PEFT's adaption prompts name one attention submodule; these are {sorted(leaves)}")
    config = {**_base_config(cm, "ADAPTION_PROMPT", cm.spec.task_type or _prompt_task_type(cm)),
              "adapter_len": rule.adapter_len, "adapter_layers": rule.adapter_layers, "target_modules": leaves.pop()}
    return config, {MODEL_PREFIX + n: cm.params[n].tensor for n in names}


def _ln_tuning(cm, rule) -> tuple[dict, dict]:
    return _norm_tuning(cm, rule, "ln_tuning")


def _writers() -> dict:
    from .passes.insert_ln_tuning import LNTuning
    from .passes.insert_trainable_tokens import TrainableTokens
    from .soft_prompts import AdaptionPrompt, PTuning

    return {**_WRITERS, PTuning: _p_tuning, AdaptionPrompt: _adaption_prompt, TrainableTokens: _trainable_tokens,
            LNTuning: _ln_tuning}


_WRITERS = {LoRA: _lora, IA3: _ia3, NormTuning: _norm_tuning, Prefix: _prefix, PromptTuning: _prompt}


def peft_adapter(cm) -> tuple[dict, dict[str, torch.Tensor]]:
    """(adapter_config.json contents, adapter_model.safetensors tensors) as HF PEFT saves them; raises
    NotPeftExpressible saying why when the compiled spec has no PEFT format."""
    if cm.spec is None:
        raise NotPeftExpressible("the model was compiled from a pipeline, not a spec; compile it with a spec to save")
    from .passes.insert_trainable_tokens import TrainableTokens

    methods = [r for r in cm.spec.rules if not isinstance(r, ModulesToSave)]
    if any(isinstance(r, LoRA) for r in methods):  # LoRA carries trainable tokens (trainable_token_indices)
        methods = [r for r in methods if not isinstance(r, TrainableTokens)]
    if len(methods) != 1:
        raise NotPeftExpressible(f"a PEFT adapter holds one method; this spec has {len(methods)} "
                                 f"({', '.join(type(r).__name__ for r in methods)})")
    rule = methods[0]
    writer = _writers().get(type(rule)) or (_method if getattr(rule, "peft_type", None) else None)
    if writer is None:
        raise NotPeftExpressible(f"PEFT has no format for {type(methods[0]).__name__}")
    config, tensors = writer(cm, methods[0])
    return config, {k: v.detach().cpu().contiguous().clone() for k, v in tensors.items()}


class _WithAdapters:
    """`cm` as the writers read it: its parameter table with every adapter tensor whole, taken from `state_dict`
    where given (what a trainer gathered: its base weights are used too, so nothing is gathered), else gathered from
    FSDP2 shards (a collective: every rank calls it)."""

    def __init__(self, cm, state_dict):
        from .distributed import adopt_registered, whole_tensor
        from .lower.modules import live_tensor

        adopt_registered(cm)  # the tensors FSDP2 or load_state_dict(assign=True) registered
        object.__setattr__(self, "_cm", cm)
        self.params = cm.params.copy()
        for p in self.params:
            if state_dict is not None and p.name in state_dict:  # base weights too: a trainer gathered them already
                p.tensor = state_dict[p.name]
            elif p.role == ADAPTER:
                p.tensor = whole_tensor(live_tensor(cm, cm.params[p.name]))
        missing = [] if state_dict is None else [p.name for p in self.params if p.role == ADAPTER and
                                                 p.name not in state_dict]
        if state_dict is not None and missing:
            raise AdapterError(f"save_pretrained: the state_dict given has no `{missing[0]}`; pass the model's "
                               f"state_dict() (or none)")

    def __getattr__(self, name: str) -> Any:
        return getattr(self._cm, name)

    def adapter_state_dict(self) -> dict[str, torch.Tensor]:
        return {p.name: p.tensor.detach() for p in self.params if p.role == ADAPTER}


def _write_file(path: Path, write) -> None:
    """write(tmp) then rename over `path`: a reader sees the old file or the whole new one, never a part."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _write_adapter(directory: Path, weights: str, tensors: dict[str, torch.Tensor], config: str, text: str) -> None:
    from safetensors.torch import save_file

    directory.mkdir(parents=True, exist_ok=True)
    # The weights first: the config file is what marks the directory as an adapter.
    _write_file(directory / weights, lambda tmp: save_file(tensors, str(tmp), metadata={"format": "pt"}))
    _write_file(directory / config, lambda tmp: tmp.write_text(text))


def save_pretrained(cm, directory: str | Path, format: str | None = None, *, state_dict=None,
                    is_main_process: bool = True, path_initial_model_for_weight_conversion: str | Path | None = None,
                    **peft_options: Any) -> str:
    """Write the adapter to `directory` in HF PEFT's format, or peftc's layout when PEFT has none (or
    format="peftc"). format="peft" raises SpecError when PEFT has no format for the spec. Returns the format.

    `state_dict` (cm.state_dict() as a trainer gathered it) supplies the adapter tensors; without it a sharded
    adapter is gathered whole, so every rank must call this. Only `is_main_process` writes, each file atomically.
    `peft_options` are PEFT's save_pretrained options that mean what peftc does anyway (safe_serialization=True,
    selected_adapters=["default"]); any other value raises SpecError.
    `path_initial_model_for_weight_conversion` (HF's): the directory this PiSSA/OLoRA adapter was saved to at init;
    the adapter is then written as the plain LoRA of rank 2r that the original base needs (see _converted).
    """
    if format not in (None, "peft", "peftc"):
        raise SpecError(f"save_pretrained: format must be 'peft', 'peftc' or None (PEFT when it can), not {format!r}")
    _check_peft_options(peft_options)
    directory = Path(directory)
    if path_initial_model_for_weight_conversion is not None and format == "peftc":
        raise SpecError("save_pretrained: path_initial_model_for_weight_conversion writes HF PEFT's format; drop "
                        "format='peftc'")
    view = _WithAdapters(cm, state_dict)
    if format != "peftc":
        try:
            config, tensors = peft_adapter(view)
        except NotPeftExpressible as e:
            if format == "peft" or path_initial_model_for_weight_conversion is not None:
                raise NotPeftExpressible(f"save_pretrained(format='peft'): {e}; save with format='peftc'") from None
        else:
            if path_initial_model_for_weight_conversion is not None:
                config, tensors = _converted(config, tensors, path_initial_model_for_weight_conversion)
            if is_main_process:
                _write_adapter(directory, ADAPTER_WEIGHTS, tensors, ADAPTER_CONFIG,
                               json.dumps(config, indent=2, sort_keys=True) + "\n")
            return "peft"
    if cm.spec is None:
        raise SpecError("save_pretrained: the model was compiled from a pipeline, not a spec; compile it with a spec")
    spec, masks = _spec_without_masks(cm.spec)
    tensors = {**{k: v.detach().cpu().contiguous().clone() for k, v in view.adapter_state_dict().items()}, **masks}
    if is_main_process:
        _write_adapter(directory, PEFTC_WEIGHTS, tensors, PEFTC_SPEC, json.dumps(spec, indent=2) + "\n")
    return "peftc"


def _converted(config: dict, tensors: dict, initial: str | Path) -> tuple[dict, dict]:
    """A PiSSA/OLoRA adapter ==> the LoRA the original base W needs, as HF PEFT's subtract_mutated_init computes it:
    W_res + s·BA = W + s·(BA - B0A0) = W + s·[B, -B0][A; A0], so r and alpha double (alpha·√2 with rsLoRA) and
    init_lora_weights becomes true. Like HF, only lora_A/lora_B tensors are written."""
    from safetensors.torch import load_file

    from .lora_init import mutates_base

    if config.get("peft_type") != "LORA" or not mutates_base(config.get("init_lora_weights")):
        raise SpecError(f"save_pretrained: path_initial_model_for_weight_conversion converts a PiSSA/OLoRA LoRA "
                        f"adapter; this one has init_lora_weights={config.get('init_lora_weights')!r}")
    weights = Path(initial) / ADAPTER_WEIGHTS
    if not weights.exists():
        raise SpecError(f"save_pretrained: {weights} does not exist; save the adapter there right after compiling "
                        f"(before training) and pass that directory")
    init = load_file(str(weights))
    out = {}
    for key, value in tensors.items():
        is_a, is_b = ".lora_A." in key, ".lora_B." in key
        if not (is_a or is_b):
            continue
        if key not in init or init[key].shape != value.shape:
            raise AdapterError(f"save_pretrained: the initial adapter in {initial} has no `{key}` of shape "
                               f"{tuple(value.shape)}; it is not this adapter's initial state")
        out[key] = torch.cat([value, init[key]], 0) if is_a else torch.cat([value, -init[key]], 1)
    double = 2 ** 0.5 if config.get("use_rslora") else 2
    config = {**config, "init_lora_weights": True, "r": config["r"] * 2, "lora_alpha": config["lora_alpha"] * double,
              "rank_pattern": {k: 2 * v for k, v in (config.get("rank_pattern") or {}).items()},
              "alpha_pattern": {k: 2 * v for k, v in (config.get("alpha_pattern") or {}).items()}}
    return config, out


# PEFT's save_pretrained options, with the one value each can have here.
_PEFT_SAVE_OPTIONS = {"safe_serialization": (True,), "selected_adapters": (None, ["default"]),
                      "save_embedding_layers": ("auto", False)}


def _check_peft_options(options: dict[str, Any]) -> None:
    for key, value in options.items():
        allowed = _PEFT_SAVE_OPTIONS.get(key)
        if allowed is None or value not in allowed:
            raise SpecError(f"save_pretrained: {key}={value!r} is not supported (peftc writes one adapter, "
                            f"'default', as safetensors); supported PEFT options: "
                            + ", ".join(f"{k} in {v}" for k, v in _PEFT_SAVE_OPTIONS.items()))


_MASK = "peftc.masks."  # SparseDelta masks ride in the weights file: `peftc.masks.<kind>.<entry>.<parameter>`


def _spec_without_masks(spec: Spec) -> tuple[dict, dict[str, torch.Tensor]]:
    masks: dict[str, torch.Tensor] = {}
    data = spec.to_dict()
    seen: dict[str, int] = {}
    for rule in spec.rules:
        n = seen[rule.kind] = seen.get(rule.kind, -1) + 1
        for name, mask in (getattr(rule, "masks", None) or {}).items():
            masks[f"{_MASK}{rule.kind}.{n}.{name}"] = torch.as_tensor(mask).cpu().contiguous().clone()
        data[rule.kind][n].pop("masks", None)
    return data, masks


# ---- reading an adapter directory --------------------------------------------------------------------------------
def adapter_dir(path: str | Path) -> Path | None:
    """The adapter directory `path` names (the directory, or its adapter_config.json / peftc_spec.json), or None."""
    path = Path(path)
    if path.is_dir() and ((path / ADAPTER_CONFIG).exists() or (path / PEFTC_SPEC).exists()):
        return path
    if path.name in (ADAPTER_CONFIG, PEFTC_SPEC) and path.exists():
        return path.parent
    return None


def read_adapter(directory: str | Path) -> tuple[Spec, dict[str, torch.Tensor], str]:
    """(spec, saved tensors, "peft" | "peftc") of an adapter directory."""
    from safetensors.torch import load_file

    directory = Path(directory)
    found = adapter_dir(directory)
    if found is None:
        raise SpecError(f"{directory} is not an adapter directory: it has neither {ADAPTER_CONFIG} (HF PEFT) nor "
                        f"{PEFTC_SPEC} (peftc)")
    if (found / ADAPTER_CONFIG).exists():
        weights = found / ADAPTER_WEIGHTS
        if not weights.exists():
            raise SpecError(f"{found}: {ADAPTER_WEIGHTS} is missing (peftc reads safetensors adapters)")
        tensors = load_file(str(weights))
        return spec_from_peft(found / ADAPTER_CONFIG, saved=tensors), tensors, "peft"
    tensors = load_file(str(found / PEFTC_WEIGHTS))
    data = json.loads((found / PEFTC_SPEC).read_text())
    for key in [k for k in tensors if k.startswith(_MASK)]:
        kind, n, name = key[len(_MASK):].split(".", 2)
        data[kind][int(n)].setdefault("masks", {})[name] = tensors.pop(key)
    return Spec.from_dict(data, str(found / PEFTC_SPEC)), tensors, "peftc"


def _check_shape(key: str, saved: torch.Tensor, expected: torch.Size | tuple) -> None:
    if tuple(saved.shape) != tuple(expected):
        raise AdapterError(f"adapter `{key}` has shape {tuple(saved.shape)}; the model expects {tuple(expected)}")


def peftc_state_dict(cm, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """PEFT's saved tensors ==> cm's adapter tensors (what load_adapter_state_dict takes)."""
    base_of = {alias: table for table, aliases in cm._info.aliases.items() for alias in aliases}
    parameter_adapters = {key: name for name, key in lora_parameters.peft_names(cm).items()}
    out: dict[str, torch.Tensor] = {}
    for key, value in tensors.items():
        if key == "prompt_embeddings":
            out.update(_prompt_embeddings(cm, value))
            continue
        name = key.removeprefix(MODEL_PREFIX).removeprefix("base_model.")
        if name in parameter_adapters:  # before `.lora_A.`: HF's nested ParamWrapper keys name the module
            out[parameter_adapters[name]] = value
            continue
        if ".ln_tuning_layers." in name:
            module, _, leaf = name.partition(".ln_tuning_layers.")
            alias = f"{module}.{leaf}"
            method = "ln_tuning" if _delta_name(alias, "ln_tuning") in cm.params else "norm_tuning"
        elif name.endswith(".trainable_tokens_delta"):
            name = name.replace(".token_adapter.", ".")
            if name in cm.params:  # the rows; which rows is the config's (the compiled spec's) token_indices
                out[name] = value
                index = name.removesuffix("delta") + "index"
                out[index] = cm.params[index].tensor.detach().clone()
            elif not _tied_token_copy(cm, name):
                raise AdapterError(f"adapter `{key}` names no trainable-tokens embedding of the model")
            continue
        elif any(m in name for m in (".lora_A.", ".lora_B.", ".lora_magnitude_vector", ".ia3_l")) \
                or name.endswith((".ia3_l", ".lora_embedding_A", ".lora_embedding_B", ".adaption_prompt",
                                  ".adaption_gate")) \
                or (name in cm.params and cm.params[name].role == ADAPTER):
            out[name] = value
            continue
        elif name.endswith(".base_layer.weight"):  # PEFT's save_embedding_layers: the base embedding, as it was
            alias = name.replace(".base_layer.", ".")
            if alias not in base_of or not torch.equal(value, _base_tensor(cm, base_of[alias]).to(value.dtype)):
                raise AdapterError(f"adapter `{key}` is a changed (or unknown) base embedding weight; peftc loads "
                                   f"adapters onto the base as it is (load the changed base into the model first)")
            continue
        else:  # a modules_to_save copy, saved under the base parameter's name
            alias, method = name, "modules_to_save"
        if alias not in base_of:
            raise AdapterError(f"adapter `{key}` names no parameter of the model (`{alias}`)")
        base = _base_tensor(cm, base_of[alias])
        _check_shape(key, value, base.shape)
        delta = _delta_name(alias, method)
        dtype = cm.params[delta].tensor.dtype if delta in cm.params else base.dtype
        out[delta] = value.to(dtype) - base.to(dtype)
    return out


def _token_rows(cm) -> dict[str, str]:
    """{rows tensor name: the table name of the embedding weight it replaces rows of}."""
    return {p.name: p.name.removesuffix("trainable_tokens_delta") + "weight" for p in cm.params
            if p.role == ADAPTER and p.method == "trainable_tokens" and p.name.endswith(".trainable_tokens_delta")}


def _tied_token_copy(cm, name: str) -> bool:
    """`lm_head.trainable_tokens_delta`: HF's copy for an output layer tied to a trainable-tokens embedding."""
    weight = name.removesuffix("trainable_tokens_delta") + "weight"
    return any(weight in cm._info.aliases.get(w, ()) or w in next((v for v in cm._info.aliases.values()
                                                                     if weight in v), ())
               for w in _token_rows(cm).values())


def _prompt_embeddings(cm, value: torch.Tensor) -> dict[str, torch.Tensor]:
    from .passes.insert_prompt_tuning import PROMPT

    if PROMPT in cm.params:
        return {PROMPT: value}
    keys = [p.name for p in cm.params if p.role == ADAPTER and p.method == "prefix" and p.name.endswith("prefix_key")]
    if not keys:
        raise AdapterError("adapter `prompt_embeddings` (prompt learning) fits no prompt or per-layer prefix of the "
                           "model; compile it with PromptTuning, or Prefix(projection=False)")
    shapes = [cm.params[k].tensor.shape for k in keys]
    kv_heads, _, head_dim = shapes[0]
    length = value.shape[0] if value.dim() else 0  # another length fits another adapter; the slots check theirs
    _check_shape("prompt_embeddings", value, (length, len(keys) * 2 * kv_heads * head_dim))
    out = {}
    width = kv_heads * head_dim
    for i, k in enumerate(keys):
        for j, name in enumerate((k, k[:-len("prefix_key")] + "prefix_value")):
            cols = value[:, (2 * i + j) * width:(2 * i + j + 1) * width]
            out[name] = cols.reshape(length, kv_heads, head_dim).permute(1, 0, 2).contiguous()
    return out


def load_adapter(cm, directory: str | Path, *, is_trainable: bool | None = None) -> None:
    """Load a saved adapter (HF PEFT's format or peftc's layout) into cm's compiled slots; nothing changes when it
    does not fit. `is_trainable` is PEFT's: the slots train as the spec says."""
    if is_trainable is False:
        raise AdapterError("load_adapter: is_trainable=False (a frozen adapter) is not supported: the spec says what "
                           "trains; load it, then call cm.eval() for inference, or cm.merge() / merge_and_unload()")
    _, tensors, fmt = read_adapter(directory)
    state = peftc_state_dict(cm, tensors) if fmt == "peft" else tensors
    cm.load_adapter_state_dict(state)
