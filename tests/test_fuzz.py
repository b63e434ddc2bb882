"""Fuzzing (hypothesis): random spec texts (TOML, JSON), rule constructor arguments, adapter state dicts and CLI
argument vectors. The property everywhere: nothing but a PeftcError escapes, and every rejection names the
offending key or file. `make test` runs a few hundred examples; `make fuzz` (FUZZ_EXAMPLES=...) runs thousands.
Each test records its counts; tests/conftest.py prints them in the terminal summary.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import peftc
from peftc.cli import main
from peftc.pipeline import Pipeline
from peftc.spec import RULE_KINDS

# make test: 100 per target (6 targets); make fuzz sets FUZZ_EXAMPLES (thousands per target). Test-only knob.
EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "100"))
FUZZ = settings(max_examples=EXAMPLES, deadline=None, database=None, print_blob=True,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                       HealthCheck.function_scoped_fixture, HealthCheck.filter_too_much])
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "examples"))
from tiny_models import tiny_mlp  # noqa: E402


def report(record_property, target: str, counts: Counter) -> None:
    """Counts for the terminal summary: tried, accepted, rejected cleanly (a defect fails the test instead)."""
    for key, value in counts.items():
        record_property(f"fuzz:{target}:{key}", value)


# ---- values a user (or a careless converter) might write -----------------------------------------------------
HOSTILE_REGEXES = ["a{4294967296}", "(" * 3000 + ")" * 3000, "(?i)q_proj", "q_proj(?i)", "[", "(?P<x>a)(?P<x>b)",
                   "\\", "a**", "(?<=a+)b", "\\p{L}", "x" * 5000, "q_proj|v_proj", ".*", "all-linear", ""]
FIELD_NAMES = sorted({f.name for cls in RULE_KINDS.values() for f in dataclasses.fields(cls)}
                     | {k for cls in RULE_KINDS.values() for k in cls.hf_names})

scalars = st.one_of(
    st.integers(), st.integers(min_value=-2, max_value=70).map(lambda e: 2 ** e if e >= 0 else -1),
    st.just(10 ** 400), st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from([0, 1, 2, 8, 0.5, 1e-300, 1e308, 1e38, -0.0, float("nan"), float("inf"), True, False]),
    st.text(max_size=12), st.sampled_from(HOSTILE_REGEXES), st.sampled_from(["random", "magnitude", "mask",
                                                                             "fisher", "rows", "columns"]),
)
values = st.recursive(scalars, lambda inner: st.one_of(
    st.lists(inner, max_size=4),
    st.dictionaries(st.one_of(st.text(max_size=8), st.sampled_from(HOSTILE_REGEXES)), inner, max_size=3),
), max_leaves=8)
keys = st.one_of(st.sampled_from(FIELD_NAMES), st.text(max_size=10))
entries = st.dictionaries(keys, values, max_size=5)
kinds = st.one_of(st.sampled_from(sorted(RULE_KINDS)), st.text(max_size=8))
# Values a real spec would hold, so that a good share of the documents is valid (and junk then hides in one key).
PLAUSIBLE = {
    "target": st.sampled_from(["q_proj|v_proj", ["q_proj", "v_proj"], "all-linear", ".*proj", "(?i)Q_PROJ"]),
    "exclude": st.sampled_from(["lm_head", ["k_proj"], ".*layers\\.0\\..*"]),
    "feedforward": st.just("q_proj"), "r": st.integers(1, 64), "alpha": st.floats(0.5, 64),
    "length": st.integers(1, 32),
    "dropout": st.floats(0, 0.9), "density": st.floats(0.001, 1), "seed": st.integers(0, 2 ** 31),
    "use_rslora": st.booleans(), "use_dora": st.booleans(), "freeze_a": st.booleans(), "projection": st.booleans(),
    "select": st.sampled_from(["random", "magnitude"]), "structure": st.sampled_from(["rows", "columns"]),
    "rank_pattern": st.dictionaries(st.sampled_from(["q_proj", "layers\\.0\\.v_proj"]), st.integers(1, 16),
                                    max_size=2),
    "alpha_pattern": st.dictionaries(st.sampled_from(["q_proj", "v_proj"]), st.floats(0.5, 32), max_size=2),
    "encoder_hidden_size": st.integers(1, 64),
}


@st.composite
def plausible_entry(draw, cls):
    names = [f.name for f in dataclasses.fields(cls) if f.init and f.name in PLAUSIBLE]
    chosen = draw(st.lists(st.sampled_from(names), unique=True, max_size=4)) if names else []
    entry = {k: draw(PLAUSIBLE[k]) for k in chosen}
    if "target" in names and draw(st.booleans()):
        entry["target"] = draw(PLAUSIBLE["target"])
    if draw(st.integers(0, 3)) == 0:  # one wrong key or value
        entry[draw(keys)] = draw(values)
    return entry


plausible = st.sampled_from(sorted(RULE_KINDS)).flatmap(
    lambda kind: st.lists(plausible_entry(RULE_KINDS[kind]), min_size=1, max_size=2).map(lambda es: {kind: es}))
documents = st.one_of(
    plausible, plausible,
    st.dictionaries(kinds, st.one_of(st.lists(entries, max_size=3), entries, values), max_size=3),
    values,
)


def to_toml(doc) -> str:
    """A TOML rendering of a generated document (inline tables); what TOML cannot say comes out invalid,
    which is a fine input too."""
    def val(v) -> str:
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, int):
            return str(v) if abs(v) < 10 ** 300 else "1" + "0" * 400
        if isinstance(v, float):
            return "nan" if math.isnan(v) else ("inf" if v > 0 else "-inf") if math.isinf(v) else repr(v)
        if isinstance(v, str):
            return json.dumps(v)
        if isinstance(v, list):
            return "[" + ", ".join(val(x) for x in v) + "]"
        if isinstance(v, dict):
            return "{" + ", ".join(f"{json.dumps(str(k))} = {val(x)}" for k, x in v.items()) + "}"
        return json.dumps(str(v))

    if not isinstance(doc, dict):
        return f"x = {val(doc)}\n"
    return "".join(f"{json.dumps(str(k))} = {val(v)}\n" for k, v in doc.items())


def mutate(text: str, data) -> bytes:
    raw = text.encode("utf-8", "surrogatepass")
    for _ in range(data.draw(st.integers(0, 3), label="mutations")):
        op = data.draw(st.sampled_from(["insert", "delete", "flip", "truncate", "nest"]))
        at = data.draw(st.integers(0, len(raw)))
        if op == "insert":
            raw = raw[:at] + data.draw(st.binary(min_size=1, max_size=4)) + raw[at:]
        elif op == "delete":
            raw = raw[:at] + raw[at + 1:]
        elif op == "flip" and raw:
            i = min(at, len(raw) - 1)
            raw = raw[:i] + bytes([raw[i] ^ data.draw(st.integers(1, 255))]) + raw[i + 1:]
        elif op == "truncate":
            raw = raw[:at]
        else:
            raw = raw[:at] + b"[" * data.draw(st.sampled_from([10, 2000, 50_000])) + raw[at:]
    return raw


def load_or_reject(raw: bytes | str, fmt: str, counts: Counter) -> None:
    source = f"fuzz/spec.{fmt}"
    try:
        spec = peftc.Spec.loads(raw, fmt, source)
    except peftc.PeftcError as e:
        assert str(e).startswith(source), f"the rejection does not name the file: {e}"
        assert "\n" not in str(e).strip() or fmt == "toml", str(e)
        counts["rejected cleanly"] += 1
    else:
        Pipeline.for_spec(spec)  # an accepted spec builds its pipeline
        counts["accepted"] += 1
    counts["tried"] += 1


@pytest.mark.parametrize("fmt", ["toml", "json"])
@pytest.mark.filterwarnings("ignore::FutureWarning")  # re: "possible nested set" in generated regexes
def test_fuzz_spec_texts(fmt, record_property):
    counts: Counter = Counter()

    @FUZZ
    @given(doc=documents, data=st.data())
    def check(doc, data):
        text = to_toml(doc) if fmt == "toml" else json.dumps(doc, allow_nan=True, default=str)
        load_or_reject(mutate(text, data) if data.draw(st.booleans(), label="mutate") else text, fmt, counts)

    check()
    report(record_property, f"spec texts ({fmt})", counts)
    assert counts["tried"] >= min(EXAMPLES, 100)


def _named_keys(message: str) -> set[str]:
    return set(re.findall(r"`([^`]+)`", message))


@pytest.mark.filterwarnings("ignore::FutureWarning")
def test_fuzz_rule_constructors(record_property):
    counts: Counter = Counter()
    rules = sorted(RULE_KINDS.values(), key=lambda c: c.__name__)

    @FUZZ
    @given(cls=st.sampled_from(rules), data=st.data(), args=st.lists(values, max_size=2))
    def check(cls, data, args):
        kwargs = data.draw(st.one_of(plausible_entry(cls), st.dictionaries(keys, values, max_size=4)))
        args = args if data.draw(st.integers(0, 4)) == 0 else []
        counts["tried"] += 1
        kwargs = {k: v for k, v in kwargs.items() if k != "masks"}  # masks are tensors: SparseDelta's own tests
        try:
            rule = cls(*args, **kwargs)
        except peftc.PeftcError as e:
            names = {f.name for f in dataclasses.fields(cls)} | set(kwargs)
            assert any(f"`{k}" in str(e) or repr(k) in str(e) for k in names) or "positional" in str(e), \
                f"names no key: {e}"
            assert str(e).startswith(cls.__name__), str(e)
            counts["rejected cleanly"] += 1
            return
        counts["accepted"] += 1
        Pipeline.for_spec(peftc.Spec(rule))
        if isinstance(rule, peftc.LoRA) and not isinstance(rule.r, dict):
            for module in ("q_proj", "model.layers.0.v_proj"):
                assert 0 < rule.scaling_for(module) < float("inf")

    check()
    report(record_property, "rule constructors", counts)


# ---- adapter state dicts --------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def compiled_mlp():
    model, args = tiny_mlp()
    return peftc.compile(model, peftc.LoRA(target="up|down", r=2), args)


DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.int64, torch.int8, torch.bool,
          torch.complex64]


def adapter_values(shape):
    def build(draw):
        kind = draw(st.sampled_from(["tensor", "tensor", "tensor", "wrong shape", "meta", "numpy", "list", "none"]))
        dtype = draw(st.sampled_from(DTYPES))
        if kind == "meta":
            return torch.empty(shape, device="meta")
        if kind == "numpy":
            return torch.zeros(shape).numpy()
        if kind == "list":
            return [0.0] * shape[0]
        if kind == "none":
            return None
        size = shape if kind == "tensor" else tuple(draw(st.lists(st.integers(0, 5), max_size=3)))
        if not (dtype.is_floating_point or dtype.is_complex):
            return torch.randint(0, 2, size).to(dtype)
        t = torch.randn(size, dtype=torch.float64)
        if t.numel() and draw(st.booleans()):  # set in float64: 1e300 becomes inf in the narrower dtypes
            t.view(-1)[draw(st.integers(0, t.numel() - 1))] = draw(st.sampled_from(
                [float("nan"), float("inf"), -float("inf"), 1e300, 65504.0]))
        return t.to(dtype)
    return st.composite(lambda draw: build(draw))()


def test_fuzz_adapter_state_dicts(compiled_mlp, record_property):
    cm = compiled_mlp
    ours = cm.adapter_state_dict()
    counts: Counter = Counter()

    @st.composite
    def state_dicts(draw):
        shape_of = {k: tuple(v.shape) for k, v in ours.items()}
        picked = draw(st.lists(st.sampled_from(sorted(ours)), unique=True, min_size=len(ours) - 1))
        sd = {k: draw(adapter_values(shape_of[k])) if draw(st.booleans()) else torch.randn(shape_of[k])
              for k in picked}
        for extra in draw(st.lists(st.one_of(st.text(max_size=20), st.integers(), st.none()), max_size=1)):
            sd[extra] = torch.zeros(2)
        form = draw(st.sampled_from(["dict", "dict", "dict", "items", "none"]))
        return sd if form == "dict" else list(sd.items()) if form == "items" else None

    @FUZZ
    @given(sd=state_dicts())
    def check(sd):
        counts["tried"] += 1
        before = {k: v.clone() for k, v in cm.adapter_state_dict().items()}
        try:
            cm.load_adapter_state_dict(sd)
        except peftc.AdapterError as e:
            after = cm.adapter_state_dict()
            assert all(torch.equal(before[k], after[k]) for k in before), f"half-loaded after: {e}"
            named = isinstance(sd, dict) and any(f"`{k}`" in str(e) or repr(k) in str(e) for k in [*sd, *before])
            assert named or "must be a mapping" in str(e), f"names no key: {e}"
            counts["rejected cleanly"] += 1
            return
        counts["accepted"] += 1
        for k, v in sd.items():  # accepted: every value landed, cast to the adapter's dtype
            got = cm.adapter_state_dict()[k]
            assert torch.equal(got, v.to(got.dtype)) and torch.isfinite(got).all()

    check()
    report(record_property, "adapter state dicts", counts)


# ---- CLI argument vectors -------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def cli_files(tmp_path_factory):
    """Inputs a CLI fuzz case may name: spec files good and bad, models that cannot load (no example compiles a
    model: that would take seconds), adapter directories good and bad."""
    d = tmp_path_factory.mktemp("cli")
    (d / "good.toml").write_text('[[lora]]\ntarget = "up"\nr = 2\n')
    (d / "good.json").write_text('{"lora": [{"target": "up"}]}')
    (d / "bad.toml").write_text('[[lora]]\ntarget = "up"\nrank = 2\n')
    (d / "bin.toml").write_bytes(b"\xff\xfe\x00")
    (d / "deep.json").write_text("[" * 100_000)
    (d / "regex.json").write_text('{"lora": [{"target": "a{4294967296}"}]}')
    (d / "spec.yaml").write_text("lora: []\n")
    (d / "fac.py").write_text("def boom():\n    raise RuntimeError('factory boom')\n\ndef wrong():\n    return 3\n\n"
                              "def inputs():\n    import torch\n    return torch.nn.Linear(2, 2), 5\n")
    (d / "syntax.py").write_text("def f(:\n")
    (d / "nocfg").mkdir()
    (d / "badcfg").mkdir()
    (d / "badcfg" / "config.json").write_text('{"model_type": ')
    (d / "plain.txt").write_text("not a model\n")
    (d / "adapter").mkdir()
    (d / "adapter" / "adapter_model.safetensors").write_bytes(b"\x00" * 16)
    (d / "adapter2").mkdir()
    (d / "adapter2" / "adapter_config.json").write_text("{")
    return d


def argvs(d: Path):
    models = [f"{d}/fac.py:boom", f"{d}/fac.py:wrong", f"{d}/fac.py:inputs", f"{d}/fac.py:missing",
              f"{d}/syntax.py:f", f"{d}/none.py:f", "no_such_module_xyz:f", "os:getcwd", str(d / "nocfg"),
              str(d / "badcfg"), str(d / "plain.txt"), str(d / "absent"), "", ":", "x:"]
    specs = [str(d / n) for n in ("good.toml", "good.json", "bad.toml", "bin.toml", "deep.json", "regex.json",
                                  "spec.yaml", "missing.toml", "nocfg")]
    pipelines = st.one_of(st.sampled_from(["insert-lora{r=2,target=up}", "insert-lorra", "insert-lora{r=[[[[1]]]]}",
                                           "insert-lora{r=" + "[" * 3000 + "}", "prune-grads{x=1}",
                                           "schedule-recompute{blocks=-1}", "insert-lora{r=1e999}",
                                           "insert-lora{alpha=nan}", "insert-lora{", ",,", "freeze-base"]),
                          st.text(max_size=30))
    sizes = st.one_of(st.sampled_from(["2GiB", "0", "-1", "", "9" * 400, "1e9", "2 parsecs", "nan", "1.5GB"]),
                      st.text(max_size=8))
    option = st.one_of(
        st.tuples(st.just("--spec"), st.sampled_from(specs)),
        st.tuples(st.just("-p"), pipelines),
        st.tuples(st.just("--memory-budget"), sizes),
        st.tuples(st.just("-o"), st.sampled_from([f"{d}/o.onnx", f"{d}/nodir/o.onnx", f"{d}/o.txt", "/proc/o.onnx"])),
        st.tuples(st.just("--adapter"), st.sampled_from([str(d / "adapter"), str(d / "adapter2"), str(d / "absent"),
                                                         str(d)])),
        st.tuples(st.sampled_from(["--inputs", "--seq-len", "--batch", "--opset", "--export-adapter", "--pass",
                                   "--dump-dir"]), st.one_of(st.sampled_from(["input_ids,attention_mask", "0", "1",
                                                                              "3", "x", "pixel_values"]),
                                                             st.text(max_size=8))),
        st.tuples(st.sampled_from(["-q", "--no-verify", "--adapters-as-inputs", "--time-passes",
                                   "--print-ir-after-change", "--bogus", "-h"])),
        st.tuples(st.text(max_size=6)),
    )
    # most vectors get past the spec and output checks, so that the model loading behind them is fuzzed too
    usual = st.lists(st.sampled_from([("--spec", f"{d}/good.toml"), ("-p", "insert-lora{r=2,target=up}"),
                                      ("-o", f"{d}/o.onnx")]), unique=True)
    compile_like = st.tuples(st.sampled_from(["compile", "diff", "explain"]), st.sampled_from(models), usual,
                             st.lists(option, max_size=4)).map(
        lambda t: [t[0], t[1], *[x for opt in t[2] + t[3] for x in opt]])
    others = st.one_of(
        st.just(["passes"]), st.just(["--version"]), st.just([]),
        st.lists(st.text(max_size=8), max_size=3).filter(lambda a: not a or a[0] not in ("demo", "compile", "diff",
                                                                                          "explain")),
        st.tuples(st.just("demo"), st.sampled_from(["--steps", "--help"]),
                  st.sampled_from(["0", "-3", "x", "1e3", ""])).map(list),
    )
    return st.one_of(compile_like, compile_like, others)


RAW_EXCEPTION = re.compile(r"^peftc: error: [A-Za-z_.]*(Error|Exception|Interrupt|Exit)\b:")


@pytest.mark.filterwarnings("ignore::FutureWarning")
def test_fuzz_cli_argument_vectors(cli_files, capsys, record_property):
    counts: Counter = Counter()

    @FUZZ
    @given(argv=argvs(cli_files))
    def check(argv):
        counts["tried"] += 1
        if "-h" in argv and "demo" in argv[:1]:
            return
        code = main(list(argv))
        out, err = capsys.readouterr()
        assert code in (0, 1, 2), (argv, code, err)
        if code == 0:
            assert not [ln for ln in err.splitlines() if ln.startswith("peftc: error")], (argv, err)
            counts["accepted (help, version, passes)"] += 1
            return
        lines = [ln for ln in err.splitlines() if ln.strip()]
        assert len(lines) == 1 and lines[0].startswith("peftc: error: "), (argv, err)
        assert not RAW_EXCEPTION.match(lines[0]), f"a raw exception reached the user: {argv} -> {lines[0]}"
        assert "Traceback" not in err and len(lines[0]) < 600, (argv, lines[0])
        counts[f"rejected cleanly (exit {code})"] += 1

    check()
    report(record_property, "CLI argument vectors", counts)
    assert list(cli_files.glob(".peftc-staging-*")) == [] and not (cli_files / "o.onnx").exists()
