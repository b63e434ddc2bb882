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
    # Variants (see docs/methods.md). DoRA: HF PEFT's weight-decomposed LoRA, `<module>.lora_magnitude_vector`.
    use_dora: bool = False
    # LoRA-FA: A stays frozen at its random init, so the adapter's input need not be stored for A's gradient.
    freeze_a: bool = False
    # HF PEFT's per-module overrides: {regex: value}, a key matches a module path that ends with it (after a dot).
    rank_pattern: dict[str, int] | None = None
    alpha_pattern: dict[str, float] | None = None
    # Per-slice adapters on output-column slices of one fused weight: {name: (start, end)}; `r` and `alpha` may
    # then be {name: value}. Adapters are named `<module>.lora_A.<name>.weight`.
    slices: dict[str, tuple[int, int]] | None = None
    # HF PEFT's lora_bias: B gets a trainable bias `<module>.lora_B.bias` (zeros), scaled with B, merged into W's bias.
    lora_bias: bool = False

    def __post_init__(self) -> None:
        where = self._where()
        if not isinstance(self.lora_bias, bool) or (self.lora_bias and (self.use_dora or self.slices)):
            raise SpecError(f"{where}: `lora_bias` must be true or false, and does not combine with use_dora or "
                            f"slices; got lora_bias={self.lora_bias!r}")
        object.__setattr__(self, "target", _as_target(self.target, "target", where))
        object.__setattr__(self, "exclude", _as_target(self.exclude, "exclude", where))
        if self.target is None:
            raise SpecError(f"{where}: `target` is required (a regex, a list of module names or 'all-linear')")
        self._check_variants(where)
        for name, r in self._per_slice(self.r, "r").items():
            if isinstance(r, bool) or not isinstance(r, int) or r <= 0:
                raise SpecError(f"{where}: `r`{name} must be a positive integer, got {r!r}")
        for name, alpha in self._per_slice(self.alpha, "alpha").items():
            if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not math.isfinite(alpha) \
                    or alpha <= 0:
                raise SpecError(f"{where}: `alpha`{name} must be a positive number, got {alpha!r}")
        if isinstance(self.dropout, bool) or not isinstance(self.dropout, (int, float)) or not 0 <= self.dropout < 1:
            raise SpecError(f"{where}: `dropout` must be in [0, 1), got {self.dropout!r}")
        if not isinstance(self.use_rslora, bool):
            raise SpecError(f"{where}: `use_rslora` must be true or false, got {self.use_rslora!r}")

    @property
    def scaling(self) -> float:
        if isinstance(self.r, dict) or isinstance(self.alpha, dict):
            raise SpecError(f"{self._where()}: per-slice ranks have one scaling per slice; use scaling_for()")
        return self.alpha / math.sqrt(self.r) if self.use_rslora else self.alpha / self.r

    def _per_slice(self, value: Any, key: str) -> dict[str, Any]:
        """{'': value}, or {'[name]': value} per slice when `value` is a per-slice dict."""
        if isinstance(value, dict):
            if not self.slices:
                raise SpecError(f"{self._where()}: `{key}` is a dict, which only per-slice LoRA takes; give "
                                f"`slices` too, or a single number")
            if set(value) != set(self.slices):
                raise SpecError(f"{self._where()}: `{key}` names slices {sorted(value)} but `slices` has "
                                f"{sorted(self.slices)}; give one value per slice")
            return {f"[{k!r}]": v for k, v in value.items()}
        return {"": value}

    def _check_variants(self, where: str) -> None:
        for key in ("use_dora", "freeze_a"):
            if not isinstance(getattr(self, key), bool):
                raise SpecError(f"{where}: `{key}` must be true or false, got {getattr(self, key)!r}")
        for key, kind in (("rank_pattern", int), ("alpha_pattern", (int, float))):
            pattern = getattr(self, key)
            if pattern is None:
                continue
            if not isinstance(pattern, dict):
                raise SpecError(f"{where}: `{key}` must be a table {{regex: value}}, got {type(pattern).__name__}")
            for k, v in pattern.items():
                try:
                    re.compile(k)
                except (re.error, TypeError) as e:
                    raise SpecError(f"{where}: `{key}` key {k!r} is not a valid regular expression ({e})") from None
                if isinstance(v, bool) or not isinstance(v, kind) or v <= 0:
                    raise SpecError(f"{where}: `{key}[{k!r}]` must be a positive number, got {v!r}")
            object.__setattr__(self, key, dict(pattern))
        if self.slices is None:
            return
        if not isinstance(self.slices, dict) or not self.slices:
            raise SpecError(f"{where}: `slices` must be a non-empty table {{name: [start, end]}}, e.g. "
                            f"{{'q': [0, 768], 'v': [1536, 2304]}}")
        spans = {}
        for name, span in self.slices.items():
            if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name):
                raise SpecError(f"{where}: slice name {name!r} must be an identifier (it names "
                                f"`<module>.lora_A.<name>.weight`)")
            ints = isinstance(span, (list, tuple)) and len(span) == 2 and \
                all(isinstance(i, int) and not isinstance(i, bool) for i in span)
            if not ints or not 0 <= span[0] < span[1]:
                raise SpecError(f"{where}: slice `{name}` must be [start, end) output columns with "
                                f"0 <= start < end, got {span!r}")
            spans[name] = (span[0], span[1])
        ordered = sorted(spans.items(), key=lambda kv: kv[1])
        for (n0, (_, e0)), (n1, (s1, _)) in zip(ordered, ordered[1:]):
            if s1 < e0:
                raise SpecError(f"{where}: slices `{n0}` and `{n1}` overlap; per-slice adapters need disjoint "
                                f"column ranges")
        if self.use_dora:
            raise SpecError(f"{where}: `use_dora` needs one magnitude per output row of the whole weight; it "
                            f"does not combine with `slices`")
        if self.rank_pattern or self.alpha_pattern:
            raise SpecError(f"{where}: with `slices`, give per-slice `r`/`alpha` dicts instead of "
                            f"`rank_pattern`/`alpha_pattern`")
        object.__setattr__(self, "slices", spans)

    def rank_for(self, module: str, slice_name: str | None = None) -> int:
        """The rank of the adapter on `module` (HF PEFT's rank_pattern rule), or on one of its slices."""
        if slice_name is not None and isinstance(self.r, dict):
            return self.r[slice_name]
        return pattern_value(self.rank_pattern, module, self.r)

    def scaling_for(self, module: str, slice_name: str | None = None) -> float:
        r = self.rank_for(module, slice_name)
        if slice_name is not None and isinstance(self.alpha, dict):
            alpha = self.alpha[slice_name]
        else:
            alpha = pattern_value(self.alpha_pattern, module, self.alpha)
        return alpha / math.sqrt(r) if self.use_rslora else alpha / r


def pattern_value(pattern: dict[str, Any] | None, module: str, default: Any) -> Any:
    """HF PEFT's `get_pattern_key`: the first key `k` (in order) with re.match(rf"(.*\\.)?({k})$", module)."""
    for key, value in (pattern or {}).items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


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


SELECTIONS = ("random", "magnitude", "mask")
STRUCTURES = (None, "rows", "columns")


@register_rule
@dataclass(frozen=True)
class SparseDelta(Rule):
    """Selective fine-tuning: `W  ==>  W + scatter(idx, delta)`; only the selected entries of W train.

    `target` selects parameters (any: matmul weights, embeddings, norms) by name: a regex full-matched against the
    parameter name, its owning module path, or a dotted suffix of either; or a list of names matched exactly or
    as a dotted suffix. `select`: "random" (seeded), "magnitude" (largest |W|), or explicit boolean `masks`
    {parameter name: mask}, e.g. from `peftc.fisher_masks(...)` (FishMask). `structure` "rows"/"columns" trains
    whole slices along dim 0/1 of the stored tensor; `density` is the fraction of entries (or rows/columns).
    """

    kind: ClassVar[str] = "sparse_delta"

    target: Target = None
    density: float = 0.01
    select: str = "magnitude"
    structure: str | None = None
    seed: int = 0
    exclude: Target = None
    masks: dict[str, Any] | None = field(default=None, compare=False, repr=False)

    def __post_init__(self) -> None:
        where = self._where()
        object.__setattr__(self, "target", _as_target(self.target, "target", where))
        object.__setattr__(self, "exclude", _as_target(self.exclude, "exclude", where))
        if self.masks is not None:
            if not isinstance(self.masks, dict) or not self.masks:
                raise SpecError(f"{where}: `masks` must be a non-empty dict {{parameter name: bool tensor}}")
            if self.select not in ("magnitude", "mask"):
                raise SpecError(f"{where}: give either `masks` or select={self.select!r}, not both")
            object.__setattr__(self, "select", "mask")
            if self.target is None:
                object.__setattr__(self, "target", tuple(self.masks))
        if self.select == "fisher":
            raise SpecError(f"{where}: Fisher selection needs calibration data: compute masks with "
                            f"peftc.fisher_masks(model, batches, density=..., target=...) and pass "
                            f"SparseDelta(masks=...)")
        if self.select not in SELECTIONS:
            raise SpecError(f"{where}: `select` must be one of {', '.join(SELECTIONS)}, got {self.select!r}")
        if self.select == "mask" and self.masks is None:
            raise SpecError(f"{where}: select='mask' needs `masks` {{parameter name: bool tensor}}")
        if self.target is None:
            raise SpecError(f"{where}: `target` is required: parameter names or a regex, e.g. r'.*_proj\\.weight'")
        if isinstance(self.density, bool) or not isinstance(self.density, (int, float)) \
                or not 0 < self.density <= 1:
            raise SpecError(f"{where}: `density` must be in (0, 1], got {self.density!r}")
        if self.structure not in STRUCTURES:
            raise SpecError(f"{where}: `structure` must be 'rows', 'columns' or omitted, got {self.structure!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise SpecError(f"{where}: `seed` must be an integer, got {self.seed!r}")


@dataclass(frozen=True)
class _DenseDelta(Rule):
    """A dense-delta rule whose only options select the tensors it adapts: `target` and `exclude`."""

    target: Target = None
    exclude: Target = None

    def __post_init__(self) -> None:
        where = self._where()
        object.__setattr__(self, "target", _as_target(self.target, "target", where))
        object.__setattr__(self, "exclude", _as_target(self.exclude, "exclude", where))


@register_rule
@dataclass(frozen=True)
class BitFit(_DenseDelta):
    """BitFit: every bias `b  ==>  b + delta` (dense delta, zero at init). `target` narrows which biases."""

    kind: ClassVar[str] = "bitfit"


@register_rule
@dataclass(frozen=True)
class NormTuning(_DenseDelta):
    """Norm tuning: every weight and bias of a normalization module (LayerNorm, RMSNorm, GroupNorm, BatchNorm,
    any module class whose name contains "Norm") `p  ==>  p + delta` (dense delta, zero at init)."""

    kind: ClassVar[str] = "norm_tuning"
