"""The `peftc` command line: one-line errors (tracebacks with --verbose); exit 0 ok, 2 usage/spec/adapter error,
1 failure, 130 interrupted."""

from __future__ import annotations

import argparse
import sys
import time
import traceback
from pathlib import Path

from .errors import AdapterError, PeftcError, SpecError

# The inputs a model directory's example inputs may name (--inputs), and how each is made.
EXAMPLE_INPUTS = ("input_ids", "attention_mask", "token_type_ids", "position_ids", "decoder_input_ids",
                  "decoder_attention_mask", "pixel_values")


class UsageError(PeftcError):
    """Bad command-line usage (exit 2)."""


class _ParserExit(Exception):
    """argparse finished (--help, --version): main returns its status instead of raising SystemExit."""

    def __init__(self, status: int):
        self.status = status


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # argparse would exit 2 with usage text; keep our one-line format
        raise UsageError(message)

    def exit(self, status: int = 0, message: str | None = None):
        if message:
            print(message, end="", file=sys.stderr)
        raise _ParserExit(status)


def _size(minimum: int):
    """argparse type: an integer >= minimum (example-input sizes of 1 specialize at capture)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text[:40]!r} is not an integer") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"{value} is less than {minimum}"
                                             + (" (a size-1 dimension would be captured as fixed)" if minimum == 2
                                                else ""))
        return value

    return parse


def _cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    run_demo(steps=args.steps)
    return 0


# ---- shared pieces of compile / diff / explain ------------------------------------------------------------------
def parse_bytes(text: str) -> int | str:
    """`2GiB`, `512MiB`, `1.5GB`, `1048576` ==> bytes (peftc.recompute.parse_bytes, named for the option); `auto`."""
    from .recompute import parse_bytes as parse

    return "auto" if text == "auto" else parse(text, "--memory-budget")


class Progress:
    """Steps on stderr: a live spinner on a terminal, one `✓ step (time)` line per finished step everywhere."""

    def __init__(self, quiet: bool = False):
        from rich.console import Console

        self.console = Console(stderr=True, highlight=False, soft_wrap=True)  # a long path stays on its line
        self.quiet = quiet
        self._status = None
        self._step: str | None = None
        self._start = 0.0
        self.timings: list[tuple[str, float]] = []

    def step(self, message: str) -> None:
        self.done()
        self._step, self._start = message, time.perf_counter()
        if not self.quiet and self.console.is_terminal:
            self._status = self.console.status(message)
            self._status.start()

    def done(self) -> None:
        if self._status is not None:
            self._status.stop()
            self._status = None
        if self._step is not None:
            seconds = time.perf_counter() - self._start
            self.timings.append((self._step, seconds))
            if not self.quiet:
                self.console.print(f"[green]✓[/] {self._step} [dim]({seconds:.2f}s)[/]")
            self._step = None

    def abort(self) -> None:
        if self._status is not None:
            self._status.stop()
            self._status = None
        self._step = None

    # the pipeline instrument protocol: a step per pass
    def before(self, index, p, gm, ctx):
        self.step(f"pass #{index + 1} {p.name}")

    def after(self, index, p, result, ctx):
        pass

    def failed(self, index, p, gm, ctx, error):
        self.abort()


def _import_factory(target: str):
    """`package.module:factory` or `path/to/file.py:factory` ==> the callable."""
    import importlib
    import importlib.util

    module_name, _, attr = target.rpartition(":")
    if not module_name or not attr:
        raise UsageError(f"MODEL {target!r}: give a Hugging Face model directory or `package.module:factory`")
    if module_name.endswith(".py"):
        path = Path(module_name)
        if not path.is_file():
            raise UsageError(f"MODEL {target!r}: file {path} does not exist")
        spec = importlib.util.spec_from_file_location(path.stem, path)
        module = importlib.util.module_from_spec(spec)
        try:
            spec.loader.exec_module(module)
        except Exception as e:
            raise UsageError(f"MODEL {target!r}: importing {path} failed: {type(e).__name__}: {e}") from e
    else:
        if "" not in sys.path and str(Path.cwd()) not in sys.path:  # as `python -m` would
            sys.path.insert(0, str(Path.cwd()))
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as e:
            raise UsageError(f"MODEL {target!r}: cannot import `{module_name}` ({e}); is it on PYTHONPATH?") from e
        except Exception as e:
            raise UsageError(f"MODEL {target!r}: importing `{module_name}` failed: {type(e).__name__}: {e}") from e
    factory = getattr(module, attr, None)
    if not callable(factory):
        raise UsageError(f"MODEL {target!r}: `{module_name}` has no callable `{attr}`")
    return factory


def _from_factory(target: str):
    from torch import nn

    factory = _import_factory(target)
    try:
        result = factory()
    except Exception as e:
        raise PeftcError(f"MODEL {target!r}: the factory raised {type(e).__name__}: {e}") from e
    if not (isinstance(result, tuple) and len(result) == 2 and isinstance(result[0], nn.Module)):
        raise UsageError(f"MODEL {target!r}: the factory must return (model, example_inputs), got "
                         f"{type(result).__name__}")
    model, inputs = result
    if isinstance(inputs, dict):
        return model, (), inputs
    if isinstance(inputs, (tuple, list)):
        return model, tuple(inputs), {}
    raise UsageError(f"MODEL {target!r}: example_inputs must be a tuple of args or a dict of kwargs, got "
                     f"{type(inputs).__name__}")


def _from_hf_dir(directory: Path, inputs: list[str] | None = None, seq_len: int | None = None, batch: int = 2):
    """A local Hugging Face model directory (config.json + weights), loaded offline; example inputs from its config:
    `inputs` (default input_ids, plus decoder_input_ids for encoder-decoders, or pixel_values for vision models),
    `batch` x `seq_len` (default min(16, max_position_embeddings))."""
    import os

    if not (directory / "config.json").is_file():
        raise UsageError(f"MODEL {directory}: a model directory needs config.json (save it with save_pretrained)")
    os.environ["HF_HUB_OFFLINE"] = "1"  # a local directory must never reach the network
    import transformers

    try:
        config = transformers.AutoConfig.from_pretrained(directory, local_files_only=True)
    except Exception as e:  # transformers raises OSError, ValueError or KeyError for a config it cannot read
        raise UsageError(f"MODEL {directory}: cannot read its config.json: {_one_line(e)[:300]}") from None
    arch = (getattr(config, "architectures", None) or [None])[0]
    cls = getattr(transformers, arch, None) if arch else None
    if cls is None:
        cls = transformers.AutoModel
    # the inputs are checked before the (slow) weights load, against the class's forward when it is known
    kwargs = _example_inputs(getattr(cls, "forward", None), config, directory, inputs, seq_len, batch)
    try:
        model = cls.from_pretrained(directory, local_files_only=True).eval()
    except OSError as e:
        raise UsageError(f"MODEL {directory}: cannot load weights: {str(e).splitlines()[0]}") from None
    except Exception as e:  # weights that do not fit the config, an unsupported architecture, ...
        raise PeftcError(f"MODEL {directory}: transformers cannot load it: {type(e).__name__}: "
                         f"{_one_line(e)[:300]}") from e
    _check_accepted(model.forward, kwargs, type(model).__name__)
    return model, (), kwargs


def _check_accepted(forward, names, owner: str) -> None:
    import inspect

    accepted = inspect.signature(forward).parameters
    for name in names:
        if name not in accepted:
            raise UsageError(f"--inputs: {owner}.forward takes no `{name}`")


def _example_inputs(forward, config, directory: Path, inputs: list[str] | None, seq_len: int | None, batch: int):
    import torch

    gen = torch.Generator().manual_seed(0)
    vocab = getattr(config, "vocab_size", None)
    vision = hasattr(config, "image_size") and hasattr(config, "num_channels")
    if inputs is None:
        if vocab:
            inputs = ["input_ids"] + (["decoder_input_ids"] if getattr(config, "is_encoder_decoder", False) else [])
        elif vision:
            inputs = ["pixel_values"]
        else:
            raise UsageError(f"MODEL {directory}: cannot derive example inputs from its config (no vocab_size or "
                             f"image_size); use a `module:factory` instead")
    max_len = getattr(config, "max_position_embeddings", None) or 16
    seq = seq_len if seq_len is not None else min(16, max_len)
    if seq > max_len:
        raise UsageError(f"--seq-len {seq}: the model's max_position_embeddings is {max_len}")
    if forward is not None:
        _check_accepted(forward, inputs, forward.__qualname__.split(".")[0])
    kwargs = {}
    for name in inputs:
        if name in ("input_ids", "decoder_input_ids"):
            if not vocab:
                raise UsageError(f"--inputs {name}: the model's config has no vocab_size")
            kwargs[name] = torch.randint(0, vocab, (batch, seq), generator=gen)
        elif name in ("attention_mask", "decoder_attention_mask"):
            kwargs[name] = torch.ones(batch, seq, dtype=torch.long)
        elif name == "token_type_ids":
            kwargs[name] = torch.zeros(batch, seq, dtype=torch.long)
        elif name == "position_ids":
            kwargs[name] = torch.arange(seq).expand(batch, seq).contiguous()
        else:  # pixel_values
            if not vision:
                raise UsageError("--inputs pixel_values: the model's config has no image_size / num_channels")
            kwargs[name] = torch.randn(batch, config.num_channels, config.image_size, config.image_size,
                                       generator=gen)
    return kwargs


def _input_names(text: str) -> list[str]:
    """argparse type of --inputs: comma-separated names from EXAMPLE_INPUTS."""
    names = [n.strip() for n in text.split(",") if n.strip()]
    if not names:
        raise argparse.ArgumentTypeError("give comma-separated input names, e.g. input_ids,attention_mask")
    for name in names:
        if name not in EXAMPLE_INPUTS:
            import difflib

            close = difflib.get_close_matches(name, EXAMPLE_INPUTS, n=1)
            raise argparse.ArgumentTypeError(f"unknown input {name[:40]!r}" + (f"; did you mean {close[0]}?" if close
                                             else f"; known: {', '.join(EXAMPLE_INPUTS)}"))
    if len(set(names)) != len(names):
        raise argparse.ArgumentTypeError(f"{text[:60]!r} names an input twice")
    return names


def load_model(target: str, inputs: list[str] | None = None, seq_len: int | None = None, batch: int | None = None):
    """MODEL ==> (model, args, kwargs); `inputs`, `seq_len`, `batch` shape a model directory's example inputs."""
    path = Path(target)
    if path.is_dir():
        return _from_hf_dir(path, inputs, seq_len, 2 if batch is None else batch)
    if (inputs, seq_len, batch) != (None, None, None):
        raise UsageError("--inputs, --seq-len and --batch shape a model directory's example inputs; a factory "
                         "returns its own")
    if ":" in target and not path.exists():
        return _from_factory(target)
    if path.exists():
        raise UsageError(f"MODEL {target!r} is a file; give a model directory or `module:factory`")
    raise UsageError(f"MODEL {target!r} does not exist; give a Hugging Face model directory or "
                     f"`package.module:factory`")


def load_peft_adapter(directory: str) -> dict:
    """A Hugging Face PEFT adapter directory ==> state dict keyed as peftc names adapters."""
    from safetensors.torch import load_file

    path = Path(directory)
    weights = path / "adapter_model.safetensors"
    if not path.is_dir():
        raise UsageError(f"--adapter {directory}: no such directory")
    if not weights.is_file():
        raise UsageError(f"--adapter {directory}: no adapter_model.safetensors in it (save it with PEFT's "
                         f"save_pretrained)")
    try:
        tensors = load_file(str(weights))
    except Exception as e:  # safetensors raises its own SafetensorError, or OSError
        raise AdapterError(f"--adapter {directory}: {weights} is not a readable safetensors file "
                           f"({_one_line(e)[:200]})") from None
    prefix = "base_model.model."
    return {k.removeprefix(prefix): v for k, v in tensors.items()}


def _adapter_config(directory: Path) -> dict | None:
    """adapter_config.json, checked for the keys peftc reads; None when there is none."""
    import json

    from .spec import is_positive_number

    path = directory / "adapter_config.json"
    if not path.is_file():
        return None
    try:
        config = json.loads(path.read_bytes().decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        reason = e.msg if isinstance(e, json.JSONDecodeError) else "not UTF-8" if isinstance(e, UnicodeDecodeError) \
            else "nested too deeply" if isinstance(e, RecursionError) else str(e).split(";")[0]
        raise AdapterError(f"--adapter {directory}: {path} is not valid JSON ({reason})") from None
    except OSError as e:
        raise AdapterError(f"--adapter {directory}: cannot read {path}: {e.strerror or e}") from None
    if not isinstance(config, dict):
        raise AdapterError(f"--adapter {directory}: {path} must hold a JSON object, got {type(config).__name__}")
    r, alpha = config.get("r"), config.get("lora_alpha")
    if r is not None and (isinstance(r, bool) or not isinstance(r, int) or not 0 < r < 2 ** 63):
        raise AdapterError(f"--adapter {directory}: {path}: `r` must be a positive integer, got {str(r)[:40]!r}")
    if alpha is not None and not is_positive_number(alpha):
        raise AdapterError(f"--adapter {directory}: {path}: `lora_alpha` must be a positive number, got "
                           f"{str(alpha)[:40]!r}")
    if not isinstance(config.get("use_rslora", False), bool):
        raise AdapterError(f"--adapter {directory}: {path}: `use_rslora` must be true or false")
    return config


def _check_adapter_scaling(cm, directory: Path) -> None:
    """The scaling the adapter was trained with (adapter_config.json) must be the one the spec compiles in:
    shapes pin r, but a different lora_alpha would silently scale every update."""
    import math

    from .lower.onnx import _eval, lora_scalings

    config = _adapter_config(directory)
    if config is None:
        return
    if config.get("rank_pattern") or config.get("alpha_pattern"):
        return  # per-module scalings: only the shapes are checked (by load_adapter_state_dict)
    r, alpha = config.get("r"), config.get("lora_alpha")
    if not r or alpha is None:
        return
    trained = alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r
    args, kwargs = cm.example_inputs
    with _eval(cm):
        compiled = lora_scalings(cm.method_graph_for(*args, **kwargs))
    for name, s in compiled.items():
        if not math.isclose(s, trained, rel_tol=1e-6):
            raise SpecError(f"--adapter {directory} was trained with r={r}, lora_alpha={alpha}"
                            f"{', use_rslora' if config.get('use_rslora') else ''} (scaling {trained:g}), but the "
                            f"spec compiles scaling {s:g} for `{name.removesuffix('.lora_B.weight')}`; set alpha "
                            f"(and use_rslora) in the spec to match")


def _compile(args: argparse.Namespace, progress: Progress):
    import peftc
    from .instrument import PrintIR
    from .spec import Spec

    if args.spec is None and args.pipeline is None:
        raise UsageError("give --spec FILE or a pipeline (-p \"insert-lora{r=8,target=q_proj|v_proj}\")")
    budget = parse_bytes(args.memory_budget) if args.memory_budget is not None else None
    spec = Spec.load(args.spec) if args.spec is not None else None
    pipeline = peftc.Pipeline.parse(args.pipeline) if args.pipeline is not None else None
    adapter_dir = getattr(args, "adapter", None)
    adapter = load_peft_adapter(adapter_dir) if adapter_dir is not None else None
    if adapter is not None:
        _adapter_config(Path(adapter_dir))  # a broken config fails now, not after compiling
    progress.step(f"loading {args.model}")
    model, margs, mkwargs = load_model(args.model, args.inputs, args.seq_len, args.batch)
    progress.step("capturing with torch.export")
    instruments = [progress, *([PrintIR()] if args.print_ir_after_change else [])]
    if budget is not None or (spec is not None and spec.memory is not None and spec.memory.budget is not None):
        progress.step("capturing, then planning recomputation for the memory budget")
    cm = peftc.compile(model, spec, margs, mkwargs, pipeline=pipeline, instruments=instruments,
                       memory_budget=budget)
    progress.done()
    if adapter is not None:
        _check_adapter_scaling(cm, Path(adapter_dir))
        try:
            cm.load_adapter_state_dict(adapter)
        except AdapterError as e:
            raise AdapterError(f"--adapter {adapter_dir}: {e}") from None
    if args.time_passes:
        from rich.console import Console
        from rich.table import Table

        t = Table(title="pass timings")
        t.add_column("pass")
        t.add_column("ms", justify="right")
        for r in cm.report().records:
            t.add_row(f"#{r.index + 1} {r.name}", f"{r.seconds * 1e3:.2f}")
        for name, seconds in progress.timings:
            if not name.startswith("pass #"):
                t.add_row(f"[dim]{name}[/]", f"{seconds * 1e3:.0f}")
        Console(stderr=True).print(t)
    return cm


def _check_writable(out: Path) -> None:
    """Fail before minutes of compiling, not after, when the output cannot be written."""
    import tempfile

    parent = out.parent if str(out.parent) else Path(".")
    if not parent.is_dir():
        raise UsageError(f"-o {out}: directory {parent} does not exist")
    try:
        with tempfile.TemporaryFile(dir=parent):
            pass
    except OSError as e:
        raise PeftcError(f"-o {out}: cannot write to {parent}: {e.strerror}") from None


def _cmd_compile(args: argparse.Namespace) -> int:
    out = Path(args.output)
    if out.suffix != ".onnx":
        raise UsageError(f"-o {out}: the output must be a .onnx file")
    _check_writable(out)
    if args.export_adapter:
        _check_writable(Path(args.export_adapter))
    progress = Progress(args.quiet)
    try:
        cm = _compile(args, progress)
        report = cm.export_onnx(out, merged=not args.adapters_as_inputs,
                                adapters="inputs" if args.adapters_as_inputs else None, verify=not args.no_verify,
                                opset=args.opset, progress=progress.step)
        progress.done()
        if args.export_adapter:
            progress.step(f"writing adapter {args.export_adapter}")
            cm.export_onnx_adapter(args.export_adapter, onnx_model=out if args.adapters_as_inputs else None)
            progress.done()
    finally:
        progress.abort()
    print(report)
    trainable, total = cm.parameter_counts()
    print(f"trainable params: {trainable:,} of {total:,}")
    if cm.recompute_plan is not None:
        print(cm.recompute_plan)
    return 0


def _cmd_diff(args: argparse.Namespace) -> int:
    progress = Progress(args.quiet)
    try:
        cm = _compile(args, progress)
    finally:
        progress.abort()
    if args.dump_dir:
        if args.pass_name:
            cm.diff(args.pass_name)  # raises when no such pass ran
        try:
            written = cm.diff_ir.dump(args.dump_dir)
        except OSError as e:
            raise PeftcError(f"cannot write diffs to {args.dump_dir}: {e.strerror}") from None
        if args.pass_name:
            written = [p for p in written if p.stem.split("-", 1)[-1] == args.pass_name]
        for path in written:
            print(path)
        return 0
    text = cm.diff(args.pass_name)
    print(text if text else "no pass changed anything", end="" if text else "\n")
    return 0


def _measure_training_step(cm):
    """One measured forward + backward in training mode on the example inputs (peftc.memory.measure_step)."""
    from .memory import measure_step

    args, kwargs = cm.example_inputs
    was = cm.training
    cm.train()
    try:
        cm.graph_for(*args, **kwargs)  # capture the training graph first: torch.export must not run under the meter
        return measure_step(cm, args, kwargs)
    finally:
        cm.train(was)
        for p in cm.trainable_parameters():
            p.grad = None


def _cmd_explain(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    from .params import BUFFER

    progress = Progress(args.quiet)
    try:
        cm = _compile(args, progress)
        progress.step("measuring one training step")
        step = _measure_training_step(cm)
        progress.done()
    finally:
        progress.abort()
    console = Console(width=110, highlight=False)
    t = Table(title="parameters")
    for col in ("role", "method", "tensors", "params", "trainable"):
        t.add_column(col, justify="left" if col in ("role", "method") else "right")
    groups: dict[tuple[str, str], list] = {}
    for p in cm.params:
        if p.role != BUFFER:
            groups.setdefault((p.role, p.method or "-"), []).append(p)
    for (role, method), ps in groups.items():
        t.add_row(role, method, str(len(ps)), f"{sum(p.tensor.numel() for p in ps):,}",
                  f"{sum(p.tensor.numel() for p in ps if p.trainable):,}")
    console.print(t)
    trainable, total = cm.parameter_counts()
    console.print(f"trainable: {trainable:,} of {total:,} ({100 * trainable / max(total, 1):.3f}%)")
    console.print(cm.report())
    console.print("memory of one training step (measured on the example inputs; saved = what the forward leaves "
                  "alive for backward, outputs and loss included):")
    console.print(str(step))
    plan = cm.recompute_plan
    if plan is not None:
        console.print(f"recomputed in backward: {', '.join(plan.recomputed) or 'nothing'}\n{plan}")
    else:
        from .recompute import recomputed_regions

        regions = recomputed_regions(cm)
        console.print(f"recomputed in backward: {', '.join(regions) or 'nothing'} (the default recompute-cheap: norms, "
                      f"activations, rotary, low-rank products; give --memory-budget to plan for a budget)")
    return 0


def _cmd_passes(args: argparse.Namespace) -> int:
    from .pipeline import PASSES, TRAINING

    for name in sorted(PASSES):
        cls = PASSES[name]
        doc = (cls.__doc__ or "").strip().splitlines()
        stage = " [training stage: never exported]" if cls.stage == TRAINING else ""
        print(f"{name}{stage}: {doc[0].removeprefix(name + ':').strip() if doc else ''}")
        for opt, typ, default in cls.options():
            print(f"    {opt}: {typ} = {default!r}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = _Parser(prog="peftc", description="A compiler for parameter-efficient fine-tuning of PyTorch models.")
    parser.add_argument("--version", action="version", version=f"peftc {__version__}")
    parser.add_argument("--verbose", action="store_true", help="print tracebacks on errors")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    demo = sub.add_parser("demo", help="compile a built-in small Llama with LoRA and train it briefly")
    demo.add_argument("--steps", type=_size(1), default=50, help="training steps to run (default 50)")
    demo.set_defaults(func=_cmd_demo)

    common = _Parser(add_help=False)
    common.add_argument("model", metavar="MODEL",
                        help="a local Hugging Face model directory, or package.module:factory / file.py:factory "
                             "returning (model, example_inputs)")
    common.add_argument("--spec", help="spec file (.toml or .json)")
    common.add_argument("-p", "--pipeline", help='explicit pass pipeline, e.g. "insert-lora{r=8,target=q_proj}"')
    common.add_argument("--print-ir-after-change", action="store_true", help="print the graph after each pass "
                        "that changed it")
    common.add_argument("--time-passes", action="store_true", help="print how long each pass took")
    common.add_argument("-q", "--quiet", action="store_true", help="no progress display")
    common.add_argument("--memory-budget", help="training memory budget (e.g. 2GiB, or auto): what one training step "
                        "may hold (parameters, optimizer state, activations); backward recomputes what fits it at "
                        "the fewest extra FLOPs")
    common.add_argument("--inputs", type=_input_names, metavar="NAMES",
                        help="a model directory's example inputs, comma-separated (default input_ids; e.g. "
                             "input_ids,attention_mask,token_type_ids for BERT): " + ", ".join(EXAMPLE_INPUTS))
    common.add_argument("--seq-len", type=_size(2), metavar="N", help="sequence length of a model directory's "
                        "example inputs (default min(16, max_position_embeddings))")
    common.add_argument("--batch", type=_size(2), metavar="N", help="batch size of a model directory's example "
                        "inputs (default 2)")
    common.add_argument("--verbose", action="store_true", help="print tracebacks on errors")

    comp = sub.add_parser("compile", parents=[common], help="compile and lower to a verified, optimized ONNX file")
    comp.add_argument("-o", "--output", required=True, help="the .onnx file to write")
    comp.add_argument("--adapter", help="a Hugging Face PEFT adapter directory to load before exporting")
    comp.add_argument("--no-verify", action="store_true", help="skip the onnxruntime-vs-eager check")
    comp.add_argument("--adapters-as-inputs", action="store_true", help="export the base model with LoRA A/B as "
                      "graph inputs (onnxruntime multi-LoRA) instead of merging them")
    comp.add_argument("--export-adapter", metavar="FILE", help="also write the adapter as an .onnx_adapter file")
    comp.add_argument("--opset", type=_size(1), metavar="N", help="ONNX opset version (default: torch.onnx's)")
    comp.set_defaults(func=_cmd_compile)

    diff = sub.add_parser("diff", parents=[common], help="show what each pass changed (code and parameter table)")
    diff.add_argument("--pass", dest="pass_name", metavar="NAME", help="only this pass")
    diff.add_argument("--dump-dir", metavar="DIR", help="write one .diff file per pass into DIR")
    diff.set_defaults(func=_cmd_diff)

    explain = sub.add_parser("explain", parents=[common], help="trainable parameters, pass report, memory")
    explain.add_argument("--adapter", help="a Hugging Face PEFT adapter directory to load")
    explain.set_defaults(func=_cmd_explain)

    passes = sub.add_parser("passes", help="list every registered pass and its options")
    passes.set_defaults(func=_cmd_passes)
    return parser


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split())


class _Interrupts:
    """While the CLI runs in the main thread, Ctrl-C raises KeyboardInterrupt and is remembered: a library that turns
    the KeyboardInterrupt into another error (importing onnxruntime's extension gives "ImportError: initialization
    failed") must still end as an interrupt."""

    def __init__(self):
        self.seen = False
        self.previous = None

    def __enter__(self):
        import signal
        import threading

        if threading.current_thread() is threading.main_thread():
            self.previous = signal.signal(signal.SIGINT, self._on_sigint)
        return self

    def _on_sigint(self, signum, frame):
        self.seen = True
        raise KeyboardInterrupt

    def __exit__(self, *exc):
        if self.previous is not None:
            import signal

            signal.signal(signal.SIGINT, self.previous)


def _interrupted() -> int:
    print("peftc: interrupted", file=sys.stderr)
    return 130


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    verbose = "--verbose" in argv
    with _Interrupts() as interrupts:
        try:
            args = build_parser().parse_args(argv)
            return args.func(args)
        except _ParserExit as e:
            return e.status
        except KeyboardInterrupt:
            return _interrupted()
        except BrokenPipeError:  # `peftc passes | head`: the reader left; nothing to report to it
            import os

            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            return 1
        except (UsageError, SpecError, AdapterError) as e:
            if verbose:
                traceback.print_exc()
            if interrupts.seen:
                return _interrupted()
            print(f"peftc: error: {_one_line(e)}", file=sys.stderr)
            return 2
        except Exception as e:  # every other failure: one line, exit 1
            if verbose:
                traceback.print_exc()
            if interrupts.seen:
                return _interrupted()
            print(f"peftc: error: {type(e).__name__ + ': ' if not isinstance(e, PeftcError) else ''}"
                  f"{_one_line(e)}", file=sys.stderr)
            return 1


if __name__ == "__main__":
    sys.exit(main())
