"""The declarative spec: what to fine-tune and how.

A `Spec` is an ordered tuple of method rules (`LoRA`, ...). Each rule is a frozen dataclass validated in
`__post_init__`, so an invalid spec fails where it is written, not deep inside a pass. The same spec loads from
TOML or JSON, one array of tables per method (`[[lora]]`).
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Union

from .errors import SpecError

# A target is what HF PEFT's `target_modules` accepts: a regex string (full match), a list of names (exact or
# dotted suffix), or "all-linear".
Target = Union[str, tuple[str, ...], None]


def _as_target(value: Any, key: str, where: str) -> Target:
    if value is None:
        return None
    if isinstance(value, str):
        if value != "all-linear":
            try:
                re.compile(value)
            except re.error as e:
                raise SpecError(f"{where}: `{key}` = {value!r} is not a valid regular expression ({e})") from None
        return value
    if isinstance(value, (list, tuple, set, frozenset)) and all(isinstance(v, str) for v in value):
        if not value:
            raise SpecError(f"{where}: `{key}` is an empty list; give module names or a regex string")
        return tuple(sorted(value)) if isinstance(value, (set, frozenset)) else tuple(value)
    raise SpecError(f"{where}: `{key}` must be a regex string, a list of module names or 'all-linear', "
                    f"not {type(value).__name__}")


@dataclass(frozen=True)
class Rule:
    """Base of every method rule. `kind` is the spec-file table name (`[[lora]]`)."""

    kind: ClassVar[str] = ""
    # HF PEFT's names for our keys, so a ported config gets told what the key is called here.
    hf_names: ClassVar[dict[str, str]] = {"target_modules": "target", "exclude_modules": "exclude"}

    def _where(self) -> str:
        return f"{type(self).__name__}"

    @classmethod
    def from_dict(cls, data: dict[str, Any], where: str) -> "Rule":
        known = {f.name for f in dataclasses.fields(cls) if f.init}
        for key in data:
            if key not in known:
                close = [cls.hf_names[key]] if key in cls.hf_names else difflib.get_close_matches(key, sorted(known), n=3)
                hint = f"; did you mean {', '.join(close)}?" if close else f"; known keys: {', '.join(sorted(known))}"
                raise SpecError(f"{where}: unknown key `{key}`{hint}")
        try:
            return cls(**data)
        except SpecError as e:
            raise SpecError(f"{where}: {e}") from None


@dataclass(frozen=True)
class LoRA(Rule):
    """Low-rank adaptation on matched matmuls: `y = x W^T  ==>  y + s·B(A·dropout(x))`, s = alpha/r.

    `target` takes HF PEFT's `target_modules` forms: a regex string full-matched against the module path (or one of
    its dotted suffixes, so "q_proj|v_proj" works), a list of names matched exactly or as a dotted suffix, or "all-linear" (every matmul except the output layer). `exclude`
    takes the same forms. With `use_rslora`, s = alpha/sqrt(r).
    """

    kind: ClassVar[str] = "lora"
    hf_names: ClassVar[dict[str, str]] = {**Rule.hf_names, "lora_alpha": "alpha", "lora_dropout": "dropout",
                                          "rank": "r"}

    target: Target = "all-linear"
    r: int = 8
    alpha: float = 8.0
    dropout: float = 0.0
    use_rslora: bool = False
    exclude: Target = None

    def __post_init__(self) -> None:
        where = self._where()
        object.__setattr__(self, "target", _as_target(self.target, "target", where))
        object.__setattr__(self, "exclude", _as_target(self.exclude, "exclude", where))
        if self.target is None:
            raise SpecError(f"{where}: `target` is required (a regex, a list of module names or 'all-linear')")
        if isinstance(self.r, bool) or not isinstance(self.r, int) or self.r <= 0:
            raise SpecError(f"{where}: `r` must be a positive integer, got {self.r!r}")
        if isinstance(self.alpha, bool) or not isinstance(self.alpha, (int, float)) or not math.isfinite(self.alpha) \
                or self.alpha <= 0:
            raise SpecError(f"{where}: `alpha` must be a positive number, got {self.alpha!r}")
        if isinstance(self.dropout, bool) or not isinstance(self.dropout, (int, float)) or not 0 <= self.dropout < 1:
            raise SpecError(f"{where}: `dropout` must be in [0, 1), got {self.dropout!r}")
        if not isinstance(self.use_rslora, bool):
            raise SpecError(f"{where}: `use_rslora` must be true or false, got {self.use_rslora!r}")

    @property
    def scaling(self) -> float:
        return self.alpha / math.sqrt(self.r) if self.use_rslora else self.alpha / self.r


RULE_KINDS: dict[str, type[Rule]] = {LoRA.kind: LoRA}


def register_rule(cls: type[Rule]) -> type[Rule]:
    """Make a method rule loadable from spec files under its `kind` table name."""
    RULE_KINDS[cls.kind] = cls
    return cls


@dataclass(frozen=True)
class Spec:
    """An ordered set of method rules: `Spec(LoRA(target="q_proj|v_proj", r=8, alpha=16))`."""

    rules: tuple[Rule, ...] = field(default_factory=tuple)

    def __init__(self, *rules: Rule):
        flat: list[Rule] = []
        for rule in rules:
            if isinstance(rule, (list, tuple)):
                flat.extend(rule)
            else:
                flat.append(rule)
        for i, rule in enumerate(flat):
            if not isinstance(rule, Rule):
                raise SpecError(f"Spec rule #{i} is a {type(rule).__name__}; expected peftc.LoRA(...) or another "
                                f"method rule")
        if not flat:
            raise SpecError("the spec is empty: give at least one rule, e.g. Spec(LoRA(target='q_proj|v_proj'))")
        object.__setattr__(self, "rules", tuple(flat))

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "spec") -> "Spec":
        if not isinstance(data, dict):
            raise SpecError(f"{source}: expected a table of methods ({', '.join(RULE_KINDS)}), got "
                            f"{type(data).__name__}")
        rules: list[Rule] = []
        for kind, entries in data.items():
            if kind not in RULE_KINDS:
                close = difflib.get_close_matches(kind, list(RULE_KINDS), n=3)
                hint = f"; did you mean {', '.join(close)}?" if close else f"; known: {', '.join(RULE_KINDS)}"
                raise SpecError(f"{source}: unknown method table `{kind}`{hint}")
            if isinstance(entries, dict):
                entries = [entries]
            if not isinstance(entries, list):
                raise SpecError(f"{source}: `{kind}` must be an array of tables ([[{kind}]])")
            for i, entry in enumerate(entries):
                if not isinstance(entry, dict):
                    raise SpecError(f"{source}: [[{kind}]] #{i + 1} must be a table")
                rules.append(RULE_KINDS[kind].from_dict(entry, f"{source}: [[{kind}]] #{i + 1}"))
        return cls(*rules)

    @classmethod
    def load(cls, path: str | Path) -> "Spec":
        """Load a spec from a `.toml` or `.json` file."""
        path = Path(path)
        try:
            text = path.read_text()
        except FileNotFoundError:
            raise SpecError(f"spec file {path} does not exist") from None
        except OSError as e:
            raise SpecError(f"cannot read spec file {path}: {e.strerror}") from None
        if path.suffix == ".json":
            try:
                data = json.loads(text)
            except json.JSONDecodeError as e:
                raise SpecError(f"{path}:{e.lineno}: invalid JSON: {e.msg}") from None
        elif path.suffix == ".toml":
            try:
                import tomllib
            except ModuleNotFoundError:  # Python 3.10
                import tomli as tomllib
            try:
                data = tomllib.loads(text)
            except tomllib.TOMLDecodeError as e:
                raise SpecError(f"{path}: invalid TOML: {e}") from None
        else:
            raise SpecError(f"{path}: unknown spec format `{path.suffix}`; use .toml or .json")
        return cls.from_dict(data, str(path))

    def to_dict(self) -> dict[str, list[dict[str, Any]]]:
        out: dict[str, list[dict[str, Any]]] = {}
        for rule in self.rules:
            entry = {k: (list(v) if isinstance(v, tuple) else v) for k, v in dataclasses.asdict(rule).items()
                     if v is not None}
            out.setdefault(rule.kind, []).append(entry)
        return out


def _positive_int(value: Any, key: str, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise SpecError(f"{where}: `{key}` must be a positive integer, got {value!r}")
    return value


@register_rule
@dataclass(frozen=True)
class Prefix(Rule):
    """Prefix tuning on matched attention: `length` learned key/value positions per KV head, placed before the keys.

    `target` selects attention by module path with LoRA's selector forms; None (the default) selects every
    attention. `projection=True` trains the prefix through HF PEFT's reparameterization MLP (embedding → Linear →
    Tanh → Linear, hidden size `encoder_hidden_size`, default the KV width heads·head_dim), shared by all sites.
    """

    kind: ClassVar[str] = "prefix"

    length: int = 16
    target: Target = None
    projection: bool = False
    encoder_hidden_size: int | None = None

    def __post_init__(self) -> None:
        where = self._where()
        _positive_int(self.length, "length", where)
        if self.target == "all-linear":
            raise SpecError(f"{where}: `target` selects attention modules; 'all-linear' is for matmul methods. "
                            f"Leave it unset to select every attention")
        object.__setattr__(self, "target", _as_target(self.target, "target", where))
        if not isinstance(self.projection, bool):
            raise SpecError(f"{where}: `projection` must be true or false, got {self.projection!r}")
        if self.encoder_hidden_size is not None:
            _positive_int(self.encoder_hidden_size, "encoder_hidden_size", where)
            if not self.projection:
                raise SpecError(f"{where}: `encoder_hidden_size` sizes the projection MLP; set projection=true "
                                f"or drop it")


@register_rule
@dataclass(frozen=True)
class PromptTuning(Rule):
    """Prompt tuning: `length` learned virtual-token embeddings prepended after the input embedding lookup.

    As in HF PEFT, the attention mask gets `length` ones prepended, labels `length` times -100, position ids are
    recomputed over the longer sequence, and the outputs (logits) include the virtual positions.
    """

    kind: ClassVar[str] = "prompt_tuning"

    length: int = 16

    def __post_init__(self) -> None:
        _positive_int(self.length, "length", self._where())


@register_rule
@dataclass(frozen=True)
class IA3(Rule):
    """(IA)³: learned scaling vectors, initialized to 1, on matched matmuls (HF PEFT's IA3).

    `y = x W^T ==> y · l` (l: [out]) on every `target` matmul, or `y = (x · l) W^T` (l: [in]) on those also named by
    `feedforward`, which must be a subset of `target`. Both take LoRA's selector forms.
    """

    kind: ClassVar[str] = "ia3"

    target: Target = None
    feedforward: Target = None
    exclude: Target = None

    def __post_init__(self) -> None:
        where = self._where()
        for key in ("target", "feedforward", "exclude"):
            object.__setattr__(self, key, _as_target(getattr(self, key), key, where))
        if self.target is None:
            raise SpecError(f"{where}: `target` is required, e.g. IA3(target='k_proj|v_proj|down_proj', "
                            f"feedforward='down_proj')")
