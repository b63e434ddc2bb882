"""ONNX lowering: torch.onnx (dynamo) ==> onnxscript optimizer + peftc rules ==> verified, atomically written file.

Two forms:
- merged: LoRA folded into the base weights; the graph is the base model's, node for node.
- adapters as inputs: the base model with every LoRA A / B as a named graph input whose default (an initializer of
  the same name) is zero, so one onnxruntime session serves any number of `.onnx_adapter` files, switched per call
  with `RunOptions.add_active_adapter`. The LoRA scaling is folded into B, so an adapter file holds
  `{<module>.lora_A.weight: A, <module>.lora_B.weight: s·B}` under HF PEFT's names.

torch.onnx.export runs with optimize=False, because its built-in optimizer renames weights (`val_2`); peftc runs
onnxscript's optimizer itself and never folds a node that reads a parameter, so every initializer keeps its
parameter's name *and* layout (onnxruntime folds the remaining weight transposes when it loads the model).
"""

from __future__ import annotations

import inspect
import os
import re
import shutil
import tempfile
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np
import torch
from torch import nn
from torch.export import Dim
from torch.fx import GraphModule
from torch.utils import _pytree as pytree

from ..errors import AdapterError, ExportError
from .onnx_solve import exportable_solves

aten = torch.ops.aten
# `<module>.lora_A.weight`, and `<module>.lora_B.<slice>.weight` for LoRA on column slices
LORA_A, LORA_B = re.compile(r"\.lora_A(\.[^.]+)?\.weight$"), re.compile(r"\.lora_B(\.[^.]+)?\.weight$")

# Relative tolerance of the ORT-vs-eager check: |ort - ref| <= tol * max(1, max|ref|).
TOLERANCE = {torch.float32: 1e-4, torch.float64: 1e-8, torch.float16: 1e-2, torch.bfloat16: 3e-2}
EXTERNAL_DATA_THRESHOLD = 2 * 1024 ** 3  # protobuf's hard limit on one message


@dataclass
class ExportReport:
    """What export_onnx did: node counts around the optimizer, the verification result, the file written."""

    path: Path
    nodes_exported: int  # straight out of torch.onnx.export (optimize=False)
    nodes_optimized: int  # after onnxscript's optimizer and peftc's rules
    file_bytes: int  # the .onnx plus its external data
    inputs: list[str]
    outputs: list[str]
    adapter_inputs: list[str] = field(default_factory=list)
    rules: dict[str, int] = field(default_factory=dict)  # peftc rewrite rule -> times it fired
    max_abs_diff: float | None = None  # worst |ort - eager| over the verification runs; None when not verified
    tolerance: float | None = None
    shapes_checked: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        lines = [f"wrote {self.path} ({_human_bytes(self.file_bytes)})",
                 f"nodes: {self.nodes_exported} exported -> {self.nodes_optimized} optimized",
                 f"inputs: {', '.join(self.inputs)}; outputs: {', '.join(self.outputs)}"]
        if self.adapter_inputs:
            lines.append(f"adapter inputs: {len(self.adapter_inputs)} (LoRA A / scaled B, default zero)")
        if self.rules:
            lines.append("peftc rules: " + ", ".join(f"{k} x{v}" for k, v in self.rules.items()))
        if self.max_abs_diff is None:
            lines.append("verification: skipped")
        else:
            lines.append(f"verified against eager on {', '.join(self.shapes_checked)}: max |diff| "
                         f"{self.max_abs_diff:.3g} <= {self.tolerance:.3g}")
        return "\n".join(lines)


def _human_bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"


# ---- inputs and outputs -----------------------------------------------------------------------------------------
def _key_name(path: tuple) -> str:
    parts = []
    for k in path:
        for attr in ("key", "name", "idx"):
            if hasattr(k, attr):
                parts.append(str(getattr(k, attr)))
                break
    return "_".join(parts) or "output"


def _tensor_leaves(tree: Any) -> list[tuple[str, torch.Tensor]]:
    flat, _ = pytree.tree_flatten_with_path(tree)
    return [(_key_name(path), x) for path, x in flat if isinstance(x, torch.Tensor)]


def _bind(module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> dict[str, Any]:
    """The example inputs by forward-parameter name (input names of the ONNX graph)."""
    try:
        return dict(inspect.signature(module.forward).bind(*args, **kwargs).arguments)
    except (TypeError, ValueError):
        return {**{f"input_{i}": a for i, a in enumerate(args)}, **kwargs}


def _dynamic_shapes(module: nn.Module, args: tuple, kwargs: dict[str, Any], dynamic: bool):
    """Batch (dim 0) and sequence (dim 1 of a tensor with at most 3 dims) are Dim.AUTO; every other dim is static.

    AUTO rather than named Dims: export keeps what the model lets vary and specializes the rest (HF attention
    branches on seq > 1) instead of failing.
    """
    if not dynamic:
        return None

    def spec(x):
        if not isinstance(x, torch.Tensor) or x.dim() == 0:
            return None
        return {i: Dim.AUTO for i in range(min(x.dim(), 2 if x.dim() <= 3 else 1))}

    bound = _bind(module, args, kwargs)
    return {name: pytree.tree_map(spec, value) for name, value in bound.items()}


def _resized(x: torch.Tensor, dims: dict[int, int]) -> torch.Tensor:
    """`x` with the given dims grown or shrunk to new sizes by repeating its own data (token ids stay valid)."""
    for d, size in dims.items():
        reps = -(-size // x.shape[d])
        x = torch.cat([x] * reps, dim=d).narrow(d, 0, size)
    return x.contiguous()


# ---- the export itself -----------------------------------------------------------------------------------------
def _torch_export(module: nn.Module, args: tuple, kwargs: dict[str, Any], *, dynamic: bool, opset: int | None,
                  output_names: list[str]):
    import contextlib
    import io
    import logging

    torch_onnx_log = logging.getLogger("torch.onnx")
    level = torch_onnx_log.level
    torch_onnx_log.setLevel(logging.ERROR)  # "torchvision is not installed" and the like
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):  # its progress lines
        warnings.simplefilter("ignore")
        try:
            program = torch.onnx.export(module, tuple(args), kwargs=dict(kwargs), dynamo=True, optimize=False,
                                        opset_version=opset, output_names=output_names, verify=False,
                                        dynamic_shapes=_dynamic_shapes(module, args, kwargs, dynamic))
        except Exception as e:
            first = next((ln for ln in str(e).splitlines() if ln.strip()), type(e).__name__)
            raise ExportError(f"torch.onnx.export failed on {type(module).__name__}: {type(e).__name__}: "
                              f"{first[:300]}. Check that the model runs eagerly on the example inputs; "
                              f"try dynamic=False if the failure names a shape") from e
        finally:
            torch_onnx_log.setLevel(level)
    return program.model  # an onnx_ir.Model


def _promote_to_inputs(model, names: Iterable[str]) -> list[str]:
    """Initializers ==> graph inputs with a zero default (onnxruntime's overridable initializers)."""
    import onnx_ir as ir

    graph = model.graph
    promoted = []
    for name in names:
        value = graph.initializers.get(name)
        if value is None:
            raise ExportError(f"adapter `{name}` is not an initializer of the exported graph; the LoRA path was "
                              f"optimized away or renamed")
        const = value.const_value.numpy()
        value.const_value = ir.tensor(np.zeros_like(const), name=name)
        graph.inputs.append(value)
        promoted.append(name)
    return promoted


def _optimize(model, keep: set[str]) -> dict[str, int]:
    """onnxscript's optimizer, then peftc's rules; never fold a node that reads one of `keep` (parameters).

    The same passes as `onnxscript.optimizer.optimize_ir` minus DeduplicateInitializersPass: two parameters that
    happen to hold equal values (fresh LayerNorm weights) must keep their own names.
    """
    import onnx_ir as ir
    import onnx_ir.passes.common as common
    from onnxscript import rewriter
    from onnxscript.optimizer import _constant_folding

    from .onnx_rules import apply_rules

    def should_fold(node):
        for v in node.inputs:
            if v is not None and v.name in keep and (v.is_initializer() or v.is_graph_input()):
                return False
        return None

    def loop():
        ir.passes.Sequential(
            common.InlinePass(),
            ir.passes.PassManager([
                _constant_folding.FoldConstantsPass(shape_inference=True, input_size_limit=8192,
                                                    output_size_limit=262144, should_fold=should_fold),
                rewriter.RewritePass(rewriter._DEFAULT_REWRITE_RULES),
                common.RemoveUnusedNodesPass(),
                common.RemoveUnusedFunctionsPass(),
                common.RemoveUnusedOpsetsPass(),
            ], steps=2, early_stop=True),
            common.RemoveUnusedNodesPass(),
            common.LiftConstantsToInitializersPass(lift_all_constants=True, size_limit=0),
            common.CommonSubexpressionEliminationPass(),
            common.OutputFixPass(),
            common.NameFixPass(),
        )(model)

    loop()
    counts = apply_rules(model)
    if counts:
        loop()  # clean up what the rules exposed
    return counts


def _readable_dims(model) -> None:
    """Name the dynamic dims of the inputs `batch`, `sequence`, `<input>_dim<i>` instead of torch's `s72`."""
    import onnx_ir as ir

    rename: dict[str, str] = {}
    for value in model.graph.inputs:
        if value.shape is None:
            continue
        for i, d in enumerate(value.shape):
            if isinstance(d, ir.SymbolicDim) and d.value and d.value not in rename:
                rename[d.value] = {0: "batch", 1: "sequence"}.get(i, f"{value.name}_dim{i}")
    used: set[str] = set()
    for old, new in list(rename.items()):  # two different symbols may not share a name
        rename[old] = new if new not in used else f"{new}_{old}"
        used.add(rename[old])

    def fix(value):
        if value is not None and value.shape is not None and any(
                isinstance(d, ir.SymbolicDim) and d.value in rename for d in value.shape):
            value.shape = ir.Shape([ir.SymbolicDim(rename[d.value]) if isinstance(d, ir.SymbolicDim)
                                    and d.value in rename else d for d in value.shape])

    for value in [*model.graph.inputs, *model.graph.outputs]:
        fix(value)
    for node in model.graph.all_nodes():
        for value in node.outputs:
            fix(value)


def _count_nodes(model) -> int:
    return sum(1 for _ in model.graph)


def _save_atomic(model, path: Path, check: Callable[[Path], None] | None = None) -> int:
    """Save into a staging dir next to `path`, run `check` on it, then rename into place. Returns bytes written.

    A failure at any point (save, check, interrupt) leaves nothing at `path`. A process killed outright leaves its
    staging dir, `.peftc-staging-<pid>-<random>`, whose model file is named `*.unverified` so it cannot pass for
    output; the next export into that directory removes every staging dir whose process is gone.
    """
    import onnx_ir as ir

    path = Path(path)
    parent = path.parent if str(path.parent) else Path(".")
    if not parent.is_dir():
        raise ExportError(f"cannot write {path}: directory {parent} does not exist")
    for stale in parent.glob(".peftc-staging-*"):
        pid = stale.name.split("-")[2]
        if pid.isdigit() and not _process_alive(int(pid)):
            shutil.rmtree(stale, ignore_errors=True)
    try:
        tmp = Path(tempfile.mkdtemp(prefix=f".peftc-staging-{os.getpid()}-", dir=parent))
    except OSError as e:
        raise ExportError(f"cannot write {path}: {e.strerror} (is {parent} writable?)") from None
    try:
        staged = tmp / f"{path.name}.unverified"
        size = sum(v.const_value.nbytes for v in model.graph.initializers.values() if v.const_value is not None)
        data_name = f"{path.name}.data"
        if size > EXTERNAL_DATA_THRESHOLD:
            ir.save(model, staged, external_data=data_name)
        else:
            ir.save(model, staged)
        if check is not None:
            check(staged)
        written = [p for p in tmp.iterdir()]
        total = sum(p.stat().st_size for p in written)
        # data before model: the model only appears once all it references is in place
        for p in sorted(written, key=lambda p: p == staged):
            os.replace(p, parent / (path.name if p == staged else p.name))
        return total
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # alive, another user's
        return True
    return True


# ---- verification ----------------------------------------------------------------------------------------------
def _to_numpy(x: torch.Tensor) -> np.ndarray:
    x = x.detach().cpu()
    return (x.float() if x.dtype == torch.bfloat16 else x).numpy()


def _verify(onnx_path: Path, reference: Callable[..., Any], runs: list[tuple[tuple, dict[str, Any]]],
            module: nn.Module, feeds_extra: dict[str, np.ndarray] | None = None) -> tuple[float, float, list[str]]:
    """Run onnxruntime on each (args, kwargs) and compare with `reference(*args, **kwargs)`; raise if off."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 2
    opts.log_severity_level = 3
    try:
        session = ort.InferenceSession(str(onnx_path), opts, providers=["CPUExecutionProvider"])
    except Exception as e:
        raise ExportError(f"onnxruntime cannot load the exported model: {' '.join(str(e).split())[:300]}") from e
    worst, worst_tol, shapes = 0.0, 0.0, []
    for args, kwargs in runs:
        with torch.no_grad():
            ref = _tensor_leaves(reference(*args, **kwargs))
        named = _tensor_leaves(_bind(module, args, kwargs))  # the graph's input order and names
        tensors = [x for _, x in named]
        feeds = {name: _to_numpy(x) for name, x in named}
        feeds.update(feeds_extra or {})
        try:
            got = session.run(None, feeds)
        except Exception as e:
            raise ExportError(f"onnxruntime failed to run the exported model: {' '.join(str(e).split())[:300]}") \
                from e
        if len(got) != len(ref):
            raise ExportError(f"the ONNX model returns {len(got)} outputs, eager returns {len(ref)}")
        shape = "x".join(map(str, tensors[0].shape)) if tensors else "()"
        shapes.append(shape)
        for (name, r), g in zip(ref, got):
            r_np = _to_numpy(r).astype(np.float64)
            if r_np.shape != g.shape:
                raise ExportError(f"output `{name}` has shape {g.shape} in onnxruntime, {r_np.shape} in eager "
                                  f"(inputs {shape})")
            tol = TOLERANCE.get(r.dtype, 1e-4) * max(1.0, float(np.abs(r_np).max()) if r_np.size else 1.0)
            diff = float(np.abs(g.astype(np.float64) - r_np).max()) if r_np.size else 0.0
            if not diff <= tol:  # NaN fails too
                raise ExportError(f"onnxruntime disagrees with eager PyTorch on output `{name}` (inputs {shape}): "
                                  f"max |diff| = {diff:.3g} > tolerance {tol:.3g}. The file was not written; "
                                  f"pass verify=False (--no-verify) to write it anyway")
            worst, worst_tol = max(worst, diff), max(worst_tol, tol)
    return worst, worst_tol, shapes


def _second_inputs(model, module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> tuple[tuple, dict[str, Any]]:
    """The example inputs with every dynamic dim of the exported graph changed (batch +1, others +3)."""
    import onnx_ir as ir

    dyn: dict[str, list[int]] = {}
    for value in model.graph.inputs:
        if value.shape is not None:
            dyn[value.name] = [i for i, d in enumerate(value.shape) if isinstance(d, ir.SymbolicDim)]
    name_of = {id(x): name for name, x in _tensor_leaves(_bind(module, args, kwargs))}
    leaves, spec = pytree.tree_flatten((args, kwargs))
    out = []
    for leaf in leaves:
        if isinstance(leaf, torch.Tensor):
            dims = dyn.get(name_of.get(id(leaf), ""), [])
            leaf = _resized(leaf, {d: leaf.shape[d] + (1 if d == 0 else 3) for d in dims})
        out.append(leaf)
    args2, kwargs2 = pytree.tree_unflatten(out, spec)
    return tuple(args2), kwargs2


# ---- entry points ----------------------------------------------------------------------------------------------
def export_module(module: nn.Module, args: tuple, kwargs: dict[str, Any], path: str | Path, *,
                  reference: Callable[..., Any] | None = None, dynamic: bool = True, opset: int | None = None,
                  verify: bool = True, params: Iterable[str] | None = None, adapter_inputs: Iterable[str] = (),
                  adapter_feeds: dict[str, np.ndarray] | None = None,
                  progress: Callable[[str], None] | None = None) -> ExportReport:
    """Export `module(*args, **kwargs)` to an optimized ONNX file at `path`, verified against `reference`.

    `params` are the initializer names that must survive optimization unchanged (default: the module's
    parameters and buffers); `adapter_inputs` become graph inputs with a zero default, and verification feeds
    them `adapter_feeds`.
    """
    step = progress or (lambda msg: None)
    path = Path(path)
    if not path.parent.is_dir():  # fail before the slow part; _save_atomic checks writability
        raise ExportError(f"cannot write {path}: directory {path.parent} does not exist")
    module.eval()
    reference = reference or module
    with torch.no_grad():
        example_out = reference(*args, **kwargs)
    output_names = [name for name, _ in _tensor_leaves(example_out)]
    input_names = [name for name, _ in _tensor_leaves(_bind(module, args, kwargs))]

    step("lowering with torch.onnx.export (dynamo)")
    exported = exportable_solves(module) if isinstance(module, GraphModule) else module
    model = _torch_export(exported, args, kwargs, dynamic=dynamic, opset=opset, output_names=output_names)
    graph_inputs = [v.name for v in model.graph.inputs]
    if len(graph_inputs) != len(input_names):
        raise ExportError(f"the exported graph takes {len(graph_inputs)} inputs ({', '.join(graph_inputs)}), the "
                          f"model {len(input_names)} tensors; peftc cannot map them")
    if set(graph_inputs) != set(input_names):  # torch names inputs after forward's parameters; when it did not,
        for value, name in zip(model.graph.inputs, input_names):  # its order is the bound order
            value.name = name
    input_names = [v.name for v in model.graph.inputs]
    adapters = _promote_to_inputs(model, adapter_inputs)
    nodes_exported = _count_nodes(model)

    step("optimizing (onnxscript optimizer + peftc rules)")
    keep = set(params) if params is not None else {n for n, _ in module.named_parameters()} | {
        n for n, _ in module.named_buffers()}
    rules = _optimize(model, keep | set(adapters))
    _readable_dims(model)
    report = ExportReport(path, nodes_exported, _count_nodes(model), 0, input_names, output_names, adapters, rules)

    def check(staged: Path) -> None:
        if not verify:
            return
        step("verifying with onnxruntime")
        runs = [(tuple(args), dict(kwargs))]
        if dynamic:
            runs.append(_second_inputs(model, module, tuple(args), dict(kwargs)))
        worst = _verify(staged, reference, runs, module, adapter_feeds)
        report.max_abs_diff, report.tolerance, report.shapes_checked = worst

    step(f"writing {path}")
    report.file_bytes = _save_atomic(model, path, check=check)
    return report


# ---- adapters as inputs ----------------------------------------------------------------------------------------
def _lora_scale_nodes(gm: GraphModule) -> dict[str, Any]:
    """B's name ==> the `delta * s` node insert-lora emitted after the matmul that reads B."""
    out = {}
    for node in gm.graph.nodes:
        if node.op != "get_attr" or not LORA_B.search(str(node.target)):
            continue
        for matmul in node.users:
            for user in matmul.users:
                if user.target == aten.mul.Tensor and user.meta.get("peftc.role") == "lora" \
                        and isinstance(user.args[1], (int, float)):
                    out.setdefault(node.target, []).append(user)
    return out


def _check_lora_only(names: Iterable[str]) -> None:
    """Adapters as inputs default to zero, which is a no-op only for LoRA's A/B (B = 0 adds nothing); a DoRA
    magnitude or an IA3 vector of zeros would wipe the layer out."""
    other = [n for n in names if not (LORA_A.search(n) or LORA_B.search(n))]
    if other:
        raise ExportError(f"adapters='inputs' supports LoRA A/B only: `{other[0]}` has no zero default that leaves "
                          f"the base model unchanged. Export with merged=True instead")


def adapter_inputs_module(gm: GraphModule, adapter_names: list[str]) -> tuple[GraphModule, dict[str, float]]:
    """A copy of the eval graph with each LoRA scaling folded into its B (`s·B` stored, the mul removed).

    Returns the module and the scaling per B name.
    """
    import copy

    from ..params import get_attr_path, set_attr_path

    _check_lora_only(adapter_names)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch's own pytree deprecation, from deepcopy
        graph = copy.deepcopy(gm.graph)
    new = GraphModule(gm, graph, class_name=type(gm).__name__)
    found = _lora_scale_nodes(new)
    scales = {b_name: _one_scaling(b_name, muls) for b_name, muls in found.items()}
    for b_name, muls in found.items():
        for m in muls:
            m.replace_all_uses_with(m.args[0])
            graph.erase_node(m)
        b = get_attr_path(new, b_name)
        set_attr_path(new, b_name, (b.detach() * scales[b_name]).contiguous())
    missing = [n for n in adapter_names if LORA_B.search(n) and n not in scales]
    if missing:
        raise ExportError(f"could not find the scaling of `{missing[0]}` in the graph")
    new.recompile()
    new.eval()
    return new, scales


def read_adapter_inputs(onnx_path: str | Path) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    """The adapter inputs of an exported model: name ==> (shape, dtype), read from its overridable initializers."""
    import onnx

    model = onnx.load(str(onnx_path), load_external_data=False)
    init = {t.name: t for t in model.graph.initializer}
    out = {}
    for inp in model.graph.input:
        if inp.name in init:
            t = init[inp.name]
            out[inp.name] = (tuple(t.dims), onnx.helper.tensor_dtype_to_np_dtype(t.data_type))
    return out


def check_adapter(tensors: dict[str, np.ndarray], expected: dict[str, tuple[tuple[int, ...], Any]],
                  where: str, complete: bool = True) -> None:
    """Names, shapes and dtypes of an adapter against a model's adapter inputs (onnxruntime checks none).

    `complete=False` allows an adapter that sets only some inputs (the rest keep their zero default).
    """
    for name, arr in tensors.items():
        if name not in expected:
            import difflib

            close = difflib.get_close_matches(name, list(expected), n=1)
            hint = f"; did you mean `{close[0]}`?" if close else ""
            raise AdapterError(f"adapter tensor `{name}` is not an adapter input of {where}{hint}")
        shape, dtype = expected[name]
        if tuple(arr.shape) != tuple(shape) or np.dtype(arr.dtype) != np.dtype(dtype):
            raise AdapterError(f"adapter tensor `{name}` is {tuple(arr.shape)} {np.dtype(arr.dtype)}; {where} "
                               f"expects {tuple(shape)} {np.dtype(dtype)}")
    missing = [n for n in expected if n not in tensors]
    if missing and complete:
        raise AdapterError(f"adapter lacks `{missing[0]}`" + (f" and {len(missing) - 1} more" if len(missing) > 1
                                                              else "") + f", which {where} expects")


def write_adapter(path: str | Path, tensors: dict[str, np.ndarray], *, model_version: int = 1,
                  adapter_version: int = 1) -> int:
    """Write an onnxruntime `.onnx_adapter` file atomically. Returns its size in bytes."""
    import onnxruntime as ort

    path = Path(path)
    parent = path.parent if str(path.parent) else Path(".")
    if not parent.is_dir():
        raise ExportError(f"cannot write {path}: directory {parent} does not exist")
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=parent)
    except OSError as e:
        raise ExportError(f"cannot write {path}: {e.strerror} (is {parent} writable?)") from None
    os.close(fd)
    try:
        fmt = ort.AdapterFormat()
        fmt.set_adapter_version(adapter_version)
        fmt.set_model_version(model_version)
        fmt.set_parameters({k: ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(v)) for k, v in tensors.items()})
        fmt.export_adapter(tmp)
        os.replace(tmp, path)
        return path.stat().st_size
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _one_scaling(b_name: str, muls) -> float:
    values = {float(m.args[1]) for m in muls}
    if len(values) != 1:
        raise ExportError(f"`{b_name}` is scaled by {sorted(values)} at different sites; cannot fold one "
                          f"scaling into it")
    return values.pop()


def lora_scalings(gm: GraphModule) -> dict[str, float]:
    """B's name ==> the LoRA scaling s the graph multiplies B's output by."""
    return {b_name: _one_scaling(b_name, muls) for b_name, muls in _lora_scale_nodes(gm).items()}


def adapter_tensors(cm) -> dict[str, np.ndarray]:
    """The current adapter as onnxruntime feeds: `lora_A` as is, `lora_B` times its scaling."""
    from ..params import ADAPTER

    args, kwargs = cm.example_inputs
    with _eval(cm):
        scales = lora_scalings(cm.method_graph_for(*args, **kwargs))
    _check_lora_only(p.name for p in cm.params if p.role == ADAPTER)
    out = {}
    for p in cm.params:
        if p.role != ADAPTER:
            continue
        t = p.tensor.detach()
        out[p.name] = _to_numpy(t * scales[p.name] if p.name in scales else t)
    return out


class _eval:
    """Put a CompiledModel in eval mode for the block (exports are inference graphs), then restore its mode."""

    def __init__(self, cm):
        self.cm = cm

    def __enter__(self):
        self.was = self.cm.training
        self.cm.eval()

    def __exit__(self, *exc):
        self.cm.train(self.was)


def export_compiled(cm, path: str | Path, *, merged: bool = True, adapters: str | None = None,
                    dynamic: bool = True, opset: int | None = None, verify: bool = True,
                    progress: Callable[[str], None] | None = None) -> ExportReport:
    """CompiledModel.export_onnx: see there."""
    from ..params import ADAPTER

    if adapters not in (None, "inputs"):
        raise ExportError(f"adapters={adapters!r}: use None (adapters stay initializers) or 'inputs'")
    if merged and adapters is not None:
        raise ExportError("adapters='inputs' needs merged=False: a merged model has no adapter tensors left")
    args, kwargs = cm.example_inputs
    names = [p.name for p in cm.params if p.role == ADAPTER]
    keep = {p.name for p in cm.params}
    with _eval(cm):
        if merged:
            merge = getattr(cm, "merge", None)
            if merge is None:
                raise ExportError("this peftc build has no CompiledModel.merge(); export with merged=False")
            if progress is not None:
                progress("merging adapters into the base weights")
            merged_cm = merge()
            merged_cm.eval()
            gm = merged_cm.method_graph_for(*args, **kwargs)
            gm.eval()
            return export_module(gm, args, kwargs, path, reference=cm, dynamic=dynamic, opset=opset,
                                 verify=verify, params={p.name for p in merged_cm.params}, progress=progress)
        gm = cm.method_graph_for(*args, **kwargs)
        if adapters == "inputs":
            module, _ = adapter_inputs_module(gm, names)
            return export_module(module, args, kwargs, path, reference=cm, dynamic=dynamic, opset=opset,
                                 verify=verify, params=keep, adapter_inputs=names,
                                 adapter_feeds=adapter_tensors(cm), progress=progress)
        gm.eval()
        return export_module(gm, args, kwargs, path, reference=cm, dynamic=dynamic, opset=opset, verify=verify,
                             params=keep, progress=progress)


def export_compiled_adapter(cm, path: str | Path, onnx_model: str | Path | None = None) -> int:
    """CompiledModel.export_onnx_adapter: see there."""
    return write_checked_adapter(cm, path, adapter_tensors(cm), onnx_model)


def write_checked_adapter(cm, path: str | Path, tensors: dict, onnx_model: str | Path | None) -> int:
    """`tensors` as an `.onnx_adapter` file, once their names, shapes and dtypes are those of `onnx_model`'s adapter
    inputs (or, without one, of cm's adapter slots). Returns the file size."""
    from ..params import ADAPTER

    if onnx_model is not None:
        check_adapter(tensors, read_adapter_inputs(onnx_model), str(onnx_model))
    else:
        expected = {p.name: (tuple(p.tensor.shape), _to_numpy(p.tensor[:0]).dtype) for p in cm.params
                    if p.role == ADAPTER}
        check_adapter(tensors, expected, "the compiled model")
    return write_adapter(path, tensors)


def run_options(adapters: Iterable[str | Path], onnx_model: str | Path | None = None):
    """onnxruntime RunOptions with these `.onnx_adapter` files active, after checking what onnxruntime does not.

    Each file must fit `onnx_model`'s adapter inputs (names, shapes, dtypes) when given, and no two files may set
    the same tensor: onnxruntime would silently let one win.
    """
    import onnxruntime as ort

    class AdapterRunOptions(ort.RunOptions):
        """RunOptions that keep their LoraAdapters alive: onnxruntime holds only a raw pointer to each."""

    expected = read_adapter_inputs(onnx_model) if onnx_model is not None else None
    options = AdapterRunOptions()
    options.adapters = []
    owner: dict[str, str] = {}
    for path in map(str, adapters):
        try:
            params = ort.AdapterFormat.read_adapter(path).get_parameters()
        except Exception as e:
            raise AdapterError(f"cannot read adapter file {path}: {' '.join(str(e).split())}") from None
        tensors = {name: value.numpy() for name, value in params.items()}
        if expected is not None:
            check_adapter(tensors, expected, str(onnx_model), complete=False)
        for name in tensors:
            if name in owner:
                raise AdapterError(f"adapters {owner[name]} and {path} both set `{name}`; onnxruntime would "
                                   f"silently use one of them. Activate one, or split them by module")
            owner[name] = path
        adapter = ort.LoraAdapter()
        adapter.Load(path)
        options.add_active_adapter(adapter)
        options.adapters.append(adapter)
    return options
