"""Instruments observe every pass: Verify checks the IR, DiffIR records what each pass changed.

A diff covers the generated code *and* the parameter table, because some passes (freezing) change only the table.
"""

from __future__ import annotations

import difflib
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TextIO

import torch
from torch.fx import GraphModule

from .errors import PassError
from .params import ADAPTER, get_attr_path
from .pipeline import Pass, PassContext, PassResult


def verify(gm: GraphModule, ctx: PassContext) -> None:
    """Graph lint, every get_attr resolves to the table's tensor, autograd agrees with the table, ranks agree."""
    try:
        gm.graph.lint()
    except Exception as e:
        raise PassError(f"graph lint failed: {e}") from e
    for node in gm.graph.nodes:
        if node.op != "get_attr":
            continue
        try:
            obj = get_attr_path(gm, node.target)
        except AttributeError:
            raise PassError(f"node `{node.name}` reads `{node.target}`, which the module does not have") from None
        if isinstance(obj, torch.Tensor):
            if node.target not in ctx.params:
                raise PassError(f"node `{node.name}` reads `{node.target}`, which is not in the parameter table")
            if obj is not ctx.params[node.target].tensor:
                raise PassError(f"`{node.target}` in the graph is not the parameter table's tensor")
    for p in ctx.params:
        if p.tensor.requires_grad != p.trainable:
            raise PassError(f"`{p.name}`: the table says {'trainable' if p.trainable else 'frozen'} but "
                            f"requires_grad={p.tensor.requires_grad}")
        if ctx.base_frozen and p.trainable and p.role != ADAPTER:
            raise PassError(f"`{p.name}` is a frozen base {p.role} but is trainable")
        if ".lora_A." in p.name:  # `<module>.lora_A.weight`, or `<module>.lora_A.<slice>.weight`
            head, _, tail = p.name.rpartition(".lora_A.")
            b_name = f"{head}.lora_B.{tail}"
            if b_name not in ctx.params:
                raise PassError(f"`{p.name}` has no matching `{b_name}`")
            r_a, r_b = p.tensor.shape[0], ctx.params[b_name].tensor.shape[1]
            if r_a != r_b:
                raise PassError(f"rank mismatch: `{p.name}` has r={r_a}, `{b_name}` has r={r_b}")


class Verify:
    """Run `verify` after every pass; a failure names the pass that broke the IR."""

    def before(self, index, p, gm, ctx):
        pass

    def after(self, index: int, p: Pass, result: PassResult, ctx: PassContext) -> None:
        verify(result.gm, ctx)

    def failed(self, index, p, gm, ctx, error):
        pass


@dataclass
class PassRecord:
    index: int
    name: str
    modified: bool
    nodes_added: int
    nodes_removed: int
    params_added: int
    trainable: int  # trainable parameter count after the pass
    seconds: float
    diff: str  # unified diff of code and parameter table; empty when nothing changed
    notes: tuple[str, ...] = ()  # what the pass said through PassContext.note


def _snapshot(gm: GraphModule, ctx: PassContext) -> tuple[str, str, set[str], int, int]:
    return gm.code, ctx.params.render(), {n.name for n in gm.graph.nodes}, len(ctx.params), len(ctx.notes)


def unified(before: str, after: str, label: str) -> str:
    return "".join(difflib.unified_diff(before.splitlines(True), after.splitlines(True),
                                        f"a/{label}", f"b/{label}", n=2))


@dataclass
class DiffIR:
    """Record, per pass, what it changed: a diff of the code and of the parameter table, and counts."""

    records: list[PassRecord] = field(default_factory=list)
    failure: str | None = None  # the graph at the point a pass failed
    _before: tuple | None = None
    _start: float = 0.0

    def before(self, index: int, p: Pass, gm: GraphModule, ctx: PassContext) -> None:
        self._before = _snapshot(gm, ctx)
        self._start = time.perf_counter()

    def after(self, index: int, p: Pass, result: PassResult, ctx: PassContext) -> None:
        seconds = time.perf_counter() - self._start
        code0, table0, nodes0, nparams0, nnotes0 = self._before
        code1, table1, nodes1, nparams1, _ = _snapshot(result.gm, ctx)
        label = f"{index + 1:02d}-{p.name}"
        notes = tuple(ctx.notes[nnotes0:])
        diff = unified(code0, code1, f"{label}/code.py") + unified(table0, table1, f"{label}/params.txt")
        if diff and notes:  # the diff says what the code alone does not: what the pass gave up, and why
            diff = "".join(f"# {label}: {note}\n" for note in notes) + diff
        self.records.append(PassRecord(index, p.name, result.modified, len(nodes1 - nodes0), len(nodes0 - nodes1),
                                       nparams1 - nparams0, ctx.params.count(trainable=True), seconds, diff,
                                       notes))

    def failed(self, index: int, p: Pass, gm: GraphModule, ctx: PassContext, error: BaseException) -> None:
        self.failure = f"# pass #{index + 1} `{p.name}` failed: {error}\n{gm.code}"

    def dump(self, directory: str | Path) -> list[Path]:
        """One file per pass that changed something (`02-insert-lora.diff`), plus the graph of a failed pass."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        written = []
        for r in self.records:
            if r.diff:
                path = directory / f"{r.index + 1:02d}-{r.name}.diff"
                path.write_text(r.diff)
                written.append(path)
        if self.failure:
            path = directory / "failed.py"
            path.write_text(self.failure)
            written.append(path)
        return written


class PrintIR:
    """Print the code after every pass that changed it (`--print-ir-after-change`)."""

    def __init__(self, stream: TextIO | None = None):
        self.stream = stream

    def before(self, index, p, gm, ctx):
        pass

    def after(self, index: int, p: Pass, result: PassResult, ctx: PassContext) -> None:
        if result.modified:
            print(f"// ----- IR after #{index + 1} {p.name} -----\n{result.gm.code}", file=self.stream or sys.stdout)

    def failed(self, index, p, gm, ctx, error):
        pass
