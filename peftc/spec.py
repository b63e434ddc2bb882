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

# Sizes (r, length, ...) become tensor dimensions, which torch stores as int64.
MAX_SIZE = 2 ** 63 - 1
# LoRA scalings multiply float32 (or wider) adapter outputs: outside this range they become inf or vanish.
FLOAT32_MAX, FLOAT32_TINY = 3.4028234663852886e38, 1.1754943508222875e-38


def _shown(value: Any, limit: int = 60) -> str:
    """repr(value), shortened: an error message quotes a 100,000-character regex by its start."""
    try:
        text = repr(value)
    except ValueError:  # an int past Python's 4300-digit str() limit
        return f"an integer of {value.bit_length():,} bits"
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text):,} characters)"


def check_regex(pattern: Any, what: str, where: str, template: str = "{}") -> None:
    """Compile `pattern` the way its matcher will (placed into `template`), so a bad regex fails where it is written.

    Python's `re` raises more than re.error on hostile input: OverflowError for `a{4294967296}`, RecursionError
    for thousands of nested groups; a global flag such as `(?i)` is valid alone but not inside a template.
    """
    if not isinstance(pattern, str):
        raise SpecError(f"{where}: {what} {_shown(pattern)} must be a regex string, not {type(pattern).__name__}")
    try:
        re.compile(template.format(pattern))
    except re.error as e:
        reason = str(e) + (" (flags such as (?i) are not allowed here: write (?i:...) around the part they apply to)"
                          if "global flags" in str(e) else "")
        raise SpecError(f"{where}: {what} {_shown(pattern)} is not a valid regular expression ({reason})") \
            from None
    except (OverflowError, RecursionError, MemoryError, ValueError) as e:
        reason = "nested too deeply" if isinstance(e, RecursionError) else \
            "a repeat count or group is too large" if isinstance(e, (OverflowError, MemoryError)) else str(e)
        raise SpecError(f"{where}: {what} {_shown(pattern)} is not a usable regular expression ({reason})") \
            from None


def is_positive_number(value: Any) -> bool:
    """A finite number > 0 (not a bool, not NaN or inf, not an int beyond float range)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    try:
        return math.isfinite(float(value)) and value > 0
    except OverflowError:  # an int beyond float range
        return False


def _as_target(value: Any, key: str, where: str) -> Target:
    if value is None:
        return None
    if isinstance(value, str):
        if value != "all-linear":
            check_regex(value, f"`{key}` =", where)
        return value
    if isinstance(value, (list, tuple, set, frozenset)) and all(isinstance(v, str) for v in value):
        if not value:
            raise SpecError(f"{where}: `{key}` is an empty list; give module names or a regex string")
        return tuple(sorted(value)) if isinstance(value, (set, frozenset)) else tuple(value)
    raise SpecError(f"{where}: `{key}` must be a regex string, a list of module names or 'all-linear', "
                    f"not {type(value).__name__}")


def unknown_key_message(cls: type, key: Any, where: str) -> str:
    """`where: unknown key `lora_alpha`; did you mean alpha?` (HF PEFT's names map to ours; else close matches)."""
    known = sorted(f.name for f in dataclasses.fields(cls) if f.init)
    hf_names = getattr(cls, "hf_names", {})
    close = [hf_names[key]] if key in hf_names else difflib.get_close_matches(str(key), known, n=3)
    hint = f"; did you mean {', '.join(close)}?" if close else f"; known keys: {', '.join(known)}"
    shown = key if isinstance(key, str) and key.isidentifier() else _shown(key)
    return f"{where}: unknown key `{shown}`{hint}"


class _KeywordChecked(type):
    """Rule constructors answer a keyword they do not take the way spec files do (a SpecError with peftc's name for
    it), not with Python's TypeError."""

    def __call__(cls, *args: Any, **kwargs: Any):
        fields = [f.name for f in dataclasses.fields(cls) if f.init]
        if len(args) > len(fields):
            raise SpecError(f"{cls.__name__}: takes at most {len(fields)} positional arguments "
                            f"({', '.join(fields)}), got {len(args)}; pass options by name")
        for key in kwargs:
            if key not in fields:
                raise SpecError(unknown_key_message(cls, key, cls.__name__))
            if key in fields[:len(args)]:
                raise SpecError(f"{cls.__name__}: `{key}` is given both by position and by name")
        return super().__call__(*args, **kwargs)


@dataclass(frozen=True)
class Rule(metaclass=_KeywordChecked):
    """Base of every method rule. `kind` is the spec-file table name (`[[lora]]`)."""

    kind: ClassVar[str] = ""
    # HF PEFT's names for our keys, so a ported config gets told what the key is called here.
    hf_names: ClassVar[dict[str, str]] = {"target_modules": "target", "exclude_modules": "exclude"}

    def _where(self) -> str:
        return f"{type(self).__name__}"

    def _check_targets(self, where: str) -> None:
        """Validate and normalize the `target` / `exclude` selectors of a rule that has both."""
        object.__setattr__(self, "target", _as_target(self.target, "target", where))
        object.__setattr__(self, "exclude", _as_target(self.exclude, "exclude", where))

    @classmethod
    def from_dict(cls, data: dict[str, Any], where: str) -> "Rule":
        known = {f.name for f in dataclasses.fields(cls) if f.init}
        for key in data:
            if key not in known:
                raise SpecError(unknown_key_message(cls, key, where))
        try:
            return cls(**data)
        except SpecError as e:
            raise SpecError(f"{where}: {e}") from None


@dataclass(frozen=True)
class LoRA(Rule):
    """Low-rank adaptation on matched matmuls: `y = x W^T  ==>  y + s·B(A·dropout(x))`, s = alpha/r.

    `target` takes HF PEFT's `target_modules` forms: a regex string full-matched against the module path (or one of
    its dotted suffixes, so "q_proj|v_proj" works; with a leading `^`, the whole path only, as HF PEFT), a list of names
    matched exactly or as a dotted suffix, or "all-linear" (HF PEFT's rule: every Linear/Conv1D module but the output
    layer, and but the classifier head with task_type="SEQ_CLS"). `exclude`
    takes the same forms. With `use_rslora`, s = alpha/sqrt(r).

    `target_parameters` (HF PEFT's): parameter names, each matched exactly or as a dotted suffix, whose reads become
    `W + s·ΔW(A, B)` wherever the graph reads them (2-d weights and 3-d mixture-of-experts stacks; peftc/
    lora_parameters.py). `target` then defaults to no module at all; give it too to adapt modules as well.
    """

    kind: ClassVar[str] = "lora"
    hf_names: ClassVar[dict[str, str]] = {**Rule.hf_names, "lora_alpha": "alpha", "lora_dropout": "dropout",
                                          "rank": "r", "init_lora_weights": "init"}

    target: Target = None  # "all-linear", or no module when only target_parameters are given
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
    # HF PEFT's init_lora_weights: True, False, "gaussian", "pissa", "pissa_niter_<k>", "olora" (peftc/lora_init.py).
    init: bool | str = True
    # HF PEFT's target_parameters: LoRA on raw parameters, W ==> W + s·ΔW at every read (peftc/lora_parameters.py).
    target_parameters: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        where = self._where()
        from .lora_init import check as check_init
        from .lora_parameters import check_rule as check_parameters

        check_init(self.init)
        if self.target is None and not self.target_parameters:
            object.__setattr__(self, "target", "all-linear")
        elif self.target_parameters and self.target in ([], ()):  # HF's target_modules=[]: parameters only
            object.__setattr__(self, "target", None)
        if not isinstance(self.lora_bias, bool) or (self.lora_bias and (self.use_dora or self.slices)):
            raise SpecError(f"{where}: `lora_bias` must be true or false, and does not combine with use_dora or "
                            f"slices; got lora_bias={self.lora_bias!r}")
        self._check_targets(where)
        self._check_variants(where)
        for name, r in self._per_slice(self.r, "r").items():
            if isinstance(r, bool) or not isinstance(r, int) or r <= 0:
                raise SpecError(f"{where}: `r`{name} must be a positive integer, got {_shown(r)}")
            if r > MAX_SIZE:
                raise SpecError(f"{where}: `r`{name} = {_shown(r)} is larger than any tensor dimension (2**63 - 1)")
        for name, alpha in self._per_slice(self.alpha, "alpha").items():
            if not is_positive_number(alpha):
                raise SpecError(f"{where}: `alpha`{name} must be a positive number (finite), got {_shown(alpha)}")
        if isinstance(self.dropout, bool) or not isinstance(self.dropout, (int, float)) or not 0 <= self.dropout < 1:
            raise SpecError(f"{where}: `dropout` must be in [0, 1), got {self.dropout!r}")
        if not isinstance(self.use_rslora, bool):
            raise SpecError(f"{where}: `use_rslora` must be true or false, got {self.use_rslora!r}")
        self._check_scalings(where)
        check_parameters(self, where)

    def _check_scalings(self, where: str) -> None:
        """Every scaling alpha/r this rule can give must be a normal float32: the adapter computes in float32 (or
        wider), where alpha=1e308 with r=1 is inf (NaN logits) and 1e-300 is 0 (an adapter that trains nothing)."""
        ranks = {**self._per_slice(self.r, "r"), **{f" (rank_pattern[{k!r}])": v
                                                     for k, v in (self.rank_pattern or {}).items()}}
        alphas = {**self._per_slice(self.alpha, "alpha"), **{f" (alpha_pattern[{k!r}])": v
                                                             for k, v in (self.alpha_pattern or {}).items()}}
        root = math.sqrt if self.use_rslora else float
        per_slice = isinstance(self.r, dict) and isinstance(self.alpha, dict)  # slice q's alpha meets slice q's r
        for a_name, alpha in alphas.items():
            for r_name, r in ranks.items():
                if per_slice and a_name != r_name:
                    continue
                scaling = float(alpha) / root(r)
                if not FLOAT32_TINY <= scaling <= FLOAT32_MAX:
                    raise SpecError(f"{where}: `alpha`{a_name} = {alpha:g} with `r`{r_name} = {r} gives scaling "
                                    f"{scaling:g}, which float32 adapters cannot hold (it would be "
                                    f"{'inf' if scaling > 1 else 'denormal or 0'}); keep alpha/r between 1e-38 "
                                    f"and 3e38")

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
        for key in ("rank_pattern", "alpha_pattern"):
            pattern = getattr(self, key)
            if pattern is None:
                continue
            if not isinstance(pattern, dict):
                raise SpecError(f"{where}: `{key}` must be a table {{regex: value}}, got {type(pattern).__name__}")
            for k, v in pattern.items():
                # pattern_value() matches keys inside a larger regex; compile them the same way
                check_regex(k, f"`{key}` key", where, template=PATTERN_TEMPLATE)
                if key == "rank_pattern" and (isinstance(v, bool) or not isinstance(v, int) or not 0 < v <= MAX_SIZE):
                    raise SpecError(f"{where}: `{key}[{_shown(k)}]` must be a positive integer rank, got {_shown(v)}")
                if key == "alpha_pattern" and not is_positive_number(v):
                    raise SpecError(f"{where}: `{key}[{_shown(k)}]` must be a positive number (finite), got "
                                    f"{_shown(v)}")
            object.__setattr__(self, key, dict(pattern))
        if self.slices is None:
            return
        if not isinstance(self.slices, dict) or not self.slices:
            raise SpecError(f"{where}: `slices` must be a non-empty table {{name: [start, end]}}, e.g. "
                            f"{{'q': [0, 768], 'v': [1536, 2304]}}")
        spans = {}
        for name, span in self.slices.items():
            if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name):
                raise SpecError(f"{where}: `slices` name {_shown(name)} must be an identifier (it names "
                                f"`<module>.lora_A.<name>.weight`)")
            ints = isinstance(span, (list, tuple)) and len(span) == 2 and \
                all(isinstance(i, int) and not isinstance(i, bool) for i in span)
            if not ints or not 0 <= span[0] < span[1] <= MAX_SIZE:
                raise SpecError(f"{where}: `slices` entry `{name}` must be [start, end) output columns with "
                                f"0 <= start < end, got {_shown(span)}")
            spans[name] = (span[0], span[1])
        ordered = sorted(spans.items(), key=lambda kv: kv[1])
        for (n0, (_, e0)), (n1, (s1, _)) in zip(ordered, ordered[1:]):
            if s1 < e0:
                raise SpecError(f"{where}: `slices` entries `{n0}` and `{n1}` overlap; per-slice adapters need "
                                f"disjoint column ranges")
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


PATTERN_TEMPLATE = r"(.*\.)?({})$"


def pattern_value(pattern: dict[str, Any] | None, module: str, default: Any) -> Any:
    """HF PEFT's `get_pattern_key`: the first key `k` (in order) with re.match(rf"(.*\\.)?({k})$", module)."""
    for key, value in (pattern or {}).items():
        if re.match(PATTERN_TEMPLATE.format(key), module):
            return value
    return default


RULE_KINDS: dict[str, type[Rule]] = {LoRA.kind: LoRA}


def register_rule(cls: type[Rule]) -> type[Rule]:
    """Make a method rule loadable from spec files under its `kind` table name."""
    RULE_KINDS[cls.kind] = cls
    return cls


# HF PEFT's TaskType names. "SEQ_CLS" changes what the spec means (HF PEFT's rule): "all-linear" leaves out the
# classifier head (`score` / `classifier`), which is trained as a full copy instead (modules_to_save).
TASK_TYPES = ("SEQ_CLS", "SEQ_2_SEQ_LM", "CAUSAL_LM", "TOKEN_CLS", "QUESTION_ANS", "FEATURE_EXTRACTION")


@dataclass(frozen=True)
class Memory:
    """A spec's `[memory]` table: what one training step may hold on the device.

    `budget`: bytes, a size such as "1.5GiB" (binary units with `i`, decimal without), or "auto" (the lowest peak
    within 2% more FLOPs); peftc.compile plans recomputation for it (`memory_budget=` overrides it).
    `optimizer_state_bytes`: what the optimizer keeps, counted in the budget (default: AdamW's two fp32 moments per
    trainable parameter).
    """

    budget: int | str | None = None
    optimizer_state_bytes: int | None = None

    def __post_init__(self):
        from .recompute import parse_bytes

        if self.budget is not None and self.budget != "auto":
            parse_bytes(self.budget, "[memory] budget")
        if self.optimizer_state_bytes is not None and (isinstance(self.optimizer_state_bytes, bool) or not isinstance(
                self.optimizer_state_bytes, int) or not 0 <= self.optimizer_state_bytes <= MAX_SIZE):
            raise SpecError(f"[memory] optimizer_state_bytes must be a number of bytes >= 0, got "
                            f"{_shown(self.optimizer_state_bytes)}")

    @classmethod
    def from_dict(cls, data: Any, where: str) -> "Memory":
        if not isinstance(data, dict):
            raise SpecError(f"{where}: [memory] must be a table (budget = \"1.5GiB\"), got {type(data).__name__}")
        known = [f.name for f in dataclasses.fields(cls)]
        for key in data:
            if key not in known:
                close = difflib.get_close_matches(key, known, n=1)
                raise SpecError(f"{where}: [memory] has no key `{key}`" + (f"; did you mean `{close[0]}`?" if close
                                                                           else f"; keys: {', '.join(known)}"))
        try:
            return cls(**data)
        except SpecError as e:
            raise SpecError(f"{where}: {e}") from None


@dataclass(frozen=True)
class Spec:
    """An ordered set of method rules: `Spec(LoRA(target="q_proj|v_proj", r=8, alpha=16))`.

    `task_type` is HF PEFT's (`"SEQ_CLS"`, `"CAUSAL_LM"`, ...); see TASK_TYPES. `memory` is the `[memory]` table
    (`Memory(budget="1.5GiB")`): the training memory budget peftc.compile plans for.
    """

    rules: tuple[Rule, ...] = field(default_factory=tuple)
    task_type: str | None = None
    memory: Memory | None = None

    def __init__(self, *rules: Rule, task_type: str | None = None, memory: Memory | None = None):
        if task_type is not None and task_type not in TASK_TYPES:
            raise SpecError(f"Spec: unknown task_type {task_type!r}; HF PEFT's task types are "
                            f"{', '.join(TASK_TYPES)}")
        if memory is not None and not isinstance(memory, Memory):
            raise SpecError(f"Spec: memory must be a peftc.Memory(budget=...), got {type(memory).__name__}")
        object.__setattr__(self, "task_type", task_type)
        object.__setattr__(self, "memory", memory)
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
        task_type = data.get("task_type")
        memory = Memory.from_dict(data["memory"], source) if "memory" in data else None
        for kind, entries in data.items():
            if kind in ("task_type", "memory"):
                continue
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
        if not rules:
            raise SpecError(f"{source}: the spec is empty: give at least one method table, e.g. [[lora]]")
        return cls(*rules, task_type=task_type, memory=memory)

    @classmethod
    def from_peft(cls, config: Any) -> "Spec":
        """The spec of an HF PEFT adapter: a directory, its adapter_config.json, a peft config object or a dict
        (LoRA, IA3, prefix tuning, prompt tuning, LN tuning; docs/huggingface.md)."""
        from .peft_format import spec_from_peft

        return spec_from_peft(config)

    @classmethod
    def load(cls, path: str | Path) -> "Spec":
        """Load a spec from a `.toml` or `.json` file."""
        path = Path(path)
        if path.suffix not in (".json", ".toml"):
            raise SpecError(f"{path}: unknown spec format `{path.suffix}`; use .toml or .json")
        try:
            raw = path.read_bytes()
        except FileNotFoundError:
            raise SpecError(f"spec file {path} does not exist") from None
        except OSError as e:
            raise SpecError(f"cannot read spec file {path}: {e.strerror or e}") from None
        return cls.loads(raw, path.suffix.lstrip("."), str(path))

    @classmethod
    def loads(cls, text: str | bytes, format: str, source: str = "spec") -> "Spec":
        """Parse spec text ("toml" or "json"); `source` names it in errors (Spec.load passes the file path)."""
        if isinstance(text, bytes):
            try:
                text = text.decode("utf-8")
            except UnicodeDecodeError as e:
                raise SpecError(f"{source}: not UTF-8 text (byte {e.object[e.start]:#04x} at offset {e.start}); "
                                f"save the spec as UTF-8") from None
        try:
            if format == "json":
                try:
                    data = json.loads(text)
                except json.JSONDecodeError as e:
                    raise SpecError(f"{source}:{e.lineno}: invalid JSON: {e.msg}") from None
            elif format == "toml":
                try:
                    import tomllib
                except ModuleNotFoundError:  # Python 3.10
                    import tomli as tomllib
                try:
                    data = tomllib.loads(text)
                except tomllib.TOMLDecodeError as e:
                    raise SpecError(f"{source}: invalid TOML: {e}") from None
            else:
                raise SpecError(f"{source}: unknown spec format {format!r}; use toml or json")
        except SpecError:
            raise
        except RecursionError:
            raise SpecError(f"{source}: invalid {format.upper()}: nested too deeply (a spec is a table of method "
                            f"tables)") from None
        except ValueError as e:  # json: an integer literal past Python's digit limit
            raise SpecError(f"{source}: invalid {format.upper()}: {str(e).split(';')[0]}") from None
        return cls.from_dict(data, source)

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"task_type": self.task_type} if self.task_type is not None else {}
        if self.memory is not None:
            out["memory"] = {k: v for k, v in dataclasses.asdict(self.memory).items() if v is not None}
        for rule in self.rules:
            entry = {k: (list(v) if isinstance(v, tuple) else v) for k, v in dataclasses.asdict(rule).items()
                     if v is not None}
            out.setdefault(rule.kind, []).append(entry)
        return out


def _positive_int(value: Any, key: str, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise SpecError(f"{where}: `{key}` must be a positive integer, got {_shown(value)}")
    if value > MAX_SIZE:
        raise SpecError(f"{where}: `{key}` = {_shown(value)} is larger than any tensor dimension (2**63 - 1)")
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
        self._check_targets(where)
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
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or not 0 <= self.seed < 2 ** 32:
            raise SpecError(f"{where}: `seed` must be an integer in [0, 2**32), got {_shown(self.seed)}")


@dataclass(frozen=True)
class _DenseDelta(Rule):
    """A dense-delta rule whose only options select the tensors it adapts: `target` and `exclude`."""

    target: Target = None
    exclude: Target = None

    def __post_init__(self) -> None:
        where = self._where()
        self._check_targets(where)


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


@register_rule
@dataclass(frozen=True)
class ModulesToSave(_DenseDelta):
    """HF PEFT's `modules_to_save`: every parameter of the selected modules (e.g. a classifier head) trains in full,
    `p  ==>  p + delta` (dense delta `<module>.modules_to_save.<leaf>`, zero at init), so the original stays as it
    was. `target` selects modules (and their submodules) with LoRA's selector forms; saved to PEFT as the trained
    copy `p + delta` under `<module>.<leaf>`."""

    kind: ClassVar[str] = "modules_to_save"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.target is None or self.target == "all-linear":
            raise SpecError(f"{self._where()}: `target` names the modules to train in full, e.g. "
                            f"ModulesToSave(target=['classifier'])")
