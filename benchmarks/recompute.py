"""Memory budgets, side by side: what each way of recomputing activations holds and costs for one training step.

    python -m benchmarks.recompute            # full size (minutes on a 2-core CPU); writes a section of
                                              # docs/benchmarks.md and docs/benchmarks_recompute.png
    python -m benchmarks.recompute --quick    # tiny sizes; prints the table only

Per model (Llama, LoRA r=16 on all seven projections; the same with LoRA on the top half of the layers; 8 layers)
and per budget (fractions of HF PEFT's unscheduled peak, plus the smallest budget peftc finds feasible):
- HF PEFT without checkpointing; HF PEFT with `gradient_checkpointing_enable(use_reentrant=False)`;
- HF PEFT with the best uniform every-k checkpointing (layers 0, k, 2k, ...; the fewest FLOPs that fit);
- peftc.compile(..., memory_budget=budget).
- torch.compile (aot_eager_decomp_partition) of the HF PEFT model, with `activation_memory_budget` bisected to
  fit each byte budget. Its peak comes from the CPU allocator's own events (torch.profiler, profile_memory):
  the live-storage tracker is a TorchDispatchMode, and under one the step does not run the graph the
  partitioner chose. Its FLOPs are counted inside the forward and backward graphs it runs.
Peaks are device bytes as a budget counts them (peftc.memory.StepReport.device_peak_bytes: parameters, buffers,
inputs, AdamW state, activation peak), measured with the same live-storage tracker for every method; FLOPs by
FlopCounterMode; step time is the median of timed steps; parity is the largest relative gradient difference from
the same library's unscheduled step.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import time
from pathlib import Path

import torch

import peftc
from peftc.memory import _fmt_bytes, measure_step
from peftc.recompute import plan_recompute

from . import models

PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
FRACTIONS = (1.0, 0.8, 0.6, 0.5, 0.4, 0.3)
BEGIN, END = "<!-- benchmarks.recompute: begin -->", "<!-- benchmarks.recompute: end -->"
MIB = 2 ** 20
NOTE = ("torch.compile rows: the step's peak is the CPU allocator's (torch.profiler with profile_memory: every "
        "allocation and free, in order), because the live-storage tracker is a TorchDispatchMode, and a compiled step "
        "run under one does not run the graph the partitioner chose (every ratio measured eager's peak to the byte). "
        "Parameters, inputs and optimizer state are added as for HF PEFT. The line above each table compares the two "
        "instruments on HF PEFT's eager step. FLOPs are counted inside the forward and backward graphs the compiled "
        "step runs. For each budget, `activation_memory_budget` is bisected (5 steps, from 1.0) and the fitting ratio "
        "with the fewest FLOPs among those tried is shown: its peak is not monotone in the ratio. Step times come "
        "from a 2-core machine shared with other jobs and are noisy; peaks and FLOPs are exact.")


def cases(quick: bool) -> list[dict]:
    size = dict(hidden=64, heads=4, vocab=256, intermediate=128, batch=2, seq=32) if quick else \
        dict(hidden=256, heads=8, vocab=4000, intermediate=688, batch=2, seq=256)
    layers = 2 if quick else 4
    top = "|".join(str(i) for i in range(layers // 2, layers))
    return [
        dict(key="llama4", title=f"Llama {layers}x{size['hidden']}, LoRA r=16 on all projections", layers=layers,
             target=PROJECTIONS, **size),
        dict(key="llama4_top", title=f"the same, LoRA only on layers {top.replace('|', ', ')}", layers=layers,
             target=rf"model\.layers\.({top})\..*({'|'.join(PROJECTIONS)})", **size),
        dict(key="llama8", title=f"Llama {2 * layers}x{size['hidden']}, LoRA r=16 on all projections",
             layers=2 * layers, target=PROJECTIONS, **size),
    ]


def _model(case: dict):
    torch.manual_seed(0)
    return models.llama(case["layers"], case["hidden"], case["heads"], case["vocab"], case["intermediate"]).train()


def _inputs(case: dict) -> dict:
    ids = torch.randint(0, case["vocab"], (case["batch"], case["seq"]), generator=torch.Generator().manual_seed(0))
    return {"input_ids": ids, "labels": ids}


def _adapters_nonzero(module) -> None:
    torch.manual_seed(1)
    with torch.no_grad():
        for p in module.parameters():
            if p.requires_grad:
                p.uniform_(-0.05, 0.05)


def _grads(module, inputs) -> list[torch.Tensor]:
    for p in module.parameters():
        p.grad = None
    module(**inputs).loss.backward()
    grads = [p.grad.clone() for p in module.parameters() if p.requires_grad]
    for p in module.parameters():
        p.grad = None
    return grads


def _parity(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    return max(float((x - y).abs().max() / x.abs().max().clamp_min(1e-30)) for x, y in zip(a, b))


def _step_time(module, inputs, steps: int) -> float:
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        module(**inputs).loss.backward()
        times.append(time.perf_counter() - t)
    for p in module.parameters():
        p.grad = None
    return statistics.median(times)


def _row(module, inputs, reference, steps: int, **extra) -> dict:
    step = measure_step(module, (), inputs)
    row = {"peak": step.device_peak_bytes, "activations": step.peak_bytes,
           "flops": step.forward_flops + step.backward_flops, "step_s": _step_time(module, inputs, steps),
           "parity": _parity(reference, _grads(module, inputs)) if reference is not None else 0.0}
    row.update(extra)
    return row


def hf_rows(case: dict, steps: int) -> dict:
    """HF PEFT without checkpointing, with HF's per-layer checkpointing, and with every k-th layer checkpointed."""
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(_model(case), LoraConfig(target_modules=case["target"], r=16, lora_alpha=32)).train()
    _adapters_nonzero(model)
    inputs = _inputs(case)
    plain = _grads(model, inputs)
    rows = {"none": _row(model, inputs, None, steps)}
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.enable_input_require_grads()  # as HF's Trainer does for PEFT models
    layers = model.base_model.model.model.layers
    rows["hf"] = _row(model, inputs, plain, steps)
    for k in range(2, len(layers) + 1):
        for i, layer in enumerate(layers):
            layer.gradient_checkpointing = i % k == 0
        rows[f"every{k}"] = _row(model, inputs, plain, steps, k=k)
    rows["every1"] = dict(rows["hf"], k=1)
    return rows


def peftc_rows(case: dict, budgets: dict[str, int], steps: int) -> dict:
    """peftc without recomputation, without a budget (the default: recompute-cheap), with memory_budget="auto", and
    at each budget."""
    spec = peftc.LoRA(target=case["target"], r=16, alpha=32)
    inputs = _inputs(case)
    cm = peftc.compile(_model(case), spec, kwargs=inputs, recompute=False)
    _adapters_nonzero(cm)
    adapters = cm.adapter_state_dict()
    plain = _grads(cm, inputs)
    rows = {"off": _row(cm, inputs, None, steps)}
    default = peftc.compile(_model(case), spec, kwargs=inputs)
    default.load_adapter_state_dict(adapters)
    rows["default"] = _row(default, inputs, plain, steps)
    for name, budget in {"auto": "auto", **budgets}.items():
        planned = peftc.compile(_model(case), spec, kwargs=inputs, recompute=False)
        t = time.perf_counter()  # planning alone: what memory_budget= adds to peftc.compile
        try:
            plan_recompute(planned, budget)
        except peftc.BudgetError as e:
            rows[name] = {"infeasible": e.smallest, "plan_s": time.perf_counter() - t}
            continue
        plan_s = time.perf_counter() - t
        planned.load_adapter_state_dict(adapters)
        plan = planned.recompute_plan
        rows[name] = _row(planned, inputs, plain, steps, plan_s=plan_s, predicted=plan.predicted_peak,
                          planned_peak=plan.measured_peak, regions=len(plan.recomputed))
    return rows


def smallest_budget(case: dict) -> int:
    """The smallest budget peftc finds feasible (from the BudgetError of a budget nothing fits)."""
    try:
        peftc.compile(_model(case), peftc.LoRA(target=case["target"], r=16, alpha=32), kwargs=_inputs(case),
                      memory_budget=1)
    except peftc.BudgetError as e:
        return e.smallest
    raise AssertionError("a one-byte budget fitted")


_GRAPH_FLOPS = [0]  # FLOPs that the compiled graphs ran since the last reset, counted while _COUNT_FLOPS is set
_COUNT_FLOPS = [False]


def _counting_compiler(gm: torch.fx.GraphModule, example_inputs):
    """aot_autograd's forward/backward compiler: run the partitioned graph as it is (aot_eager), counting its FLOPs
    when asked to, so the count is of what the compiled step runs."""
    from torch._functorch.aot_autograd import make_boxed_func
    from torch.utils.flop_counter import FlopCounterMode

    def run(*args):
        if not _COUNT_FLOPS[0]:
            return gm(*args)
        with FlopCounterMode(display=False) as counter:
            out = gm(*args)
        _GRAPH_FLOPS[0] += counter.get_total_flops()
        return out

    return make_boxed_func(run)


def _aot_eager_decomp_partition(gm, example_inputs):
    """torch's aot_eager_decomp_partition backend (inductor's decompositions and min-cut partitioner, graphs run
    eagerly), with counting graph compilers."""
    from functools import partial

    from functorch.compile import min_cut_rematerialization_partition
    from torch._dynamo.backends.common import aot_autograd
    from torch._inductor.compile_fx import select_decomp_table

    with torch._functorch.config.patch(unlift_effect_tokens=True):
        return aot_autograd(fw_compiler=_counting_compiler, bw_compiler=_counting_compiler,
                            decompositions=select_decomp_table(),
                            partition_fn=partial(min_cut_rematerialization_partition, compiler="inductor"),
                            )(gm, example_inputs)


def allocator_peak(module, inputs) -> int:
    """The activation peak of one training step (gradients included) from the CPU allocator's events: every
    allocation and free in the order they happened, whatever ran them. As in measure_step, gradients start as None
    and the output stays referenced during backward."""
    import gc

    from torch.profiler import ProfilerActivity, profile

    for p in module.parameters():
        p.grad = None
    gc.collect()
    gc.disable()
    try:
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            output = module(**inputs)
            output.loss.backward()
            del output
    finally:
        gc.enable()
    events, pending = [], list(prof.profiler.kineto_results.experimental_event_tree())
    while pending:
        node = pending.pop()
        pending.extend(node.children)
        if node.tag == torch._C._profiler._EventType.Allocation:
            events.append((node.start_time_ns, node.extra_fields.alloc_size))
    live = peak = 0
    for _, size in sorted(events):
        live += size
        peak = max(peak, live)
    return peak


BISECT_STEPS = 5


def compile_rows(case: dict, budgets: dict[str, int], hf_none: dict, steps: int) -> dict:
    """torch.compile of the HF PEFT model at each budget: `activation_memory_budget` bisected to fit it. Also the
    instrument check: the allocator's peak of HF PEFT's eager step, against the tracker's."""
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(_model(case), LoraConfig(target_modules=case["target"], r=16, lora_alpha=32)).train()
    _adapters_nonzero(model)
    inputs = _inputs(case)
    plain = _grads(model, inputs)
    fixed = hf_none["peak"] - hf_none["activations"]  # parameters, buffers, inputs, optimizer state
    tried: dict[float, dict] = {}

    def at(ratio: float) -> dict:
        if ratio not in tried:
            torch._dynamo.reset()
            compiled = torch.compile(model, backend=_aot_eager_decomp_partition)
            t = time.perf_counter()
            with torch._functorch.config.patch(activation_memory_budget=ratio):
                grads = _grads(compiled, inputs)  # compiles, partitioning at this ratio
            compile_s = time.perf_counter() - t
            activations = allocator_peak(compiled, inputs)
            _GRAPH_FLOPS[0], _COUNT_FLOPS[0] = 0, True
            try:
                _grads(compiled, inputs)
            finally:
                _COUNT_FLOPS[0] = False
            tried[ratio] = {"peak": fixed + activations, "activations": activations, "flops": _GRAPH_FLOPS[0],
                            "step_s": _step_time(compiled, inputs, steps), "parity": _parity(plain, grads),
                            "ratio": ratio, "compile_s": compile_s}
        return tried[ratio]

    rows = {"eager_allocator": allocator_peak(model, inputs)}
    for name, budget in budgets.items():
        if not _fits(at(1.0), budget):
            lo, hi = 0.0, 1.0
            for _ in range(BISECT_STEPS):
                mid = (lo + hi) / 2
                lo, hi = (mid, hi) if _fits(at(mid), budget) else (lo, mid)
        fitting = [row for row in tried.values() if _fits(row, budget)]
        rows[name] = min(fitting, key=lambda row: row["flops"]) if fitting else None
    rows["tried"] = sorted(tried.values(), key=lambda row: row["ratio"])
    torch._dynamo.reset()
    return rows


def run_case(case: dict, steps: int, earlier: dict | None = None) -> dict:
    """Every row for one model; `earlier` (this case from an earlier run's JSON, same sizes) supplies the HF PEFT and
    torch.compile rows, which do not depend on peftc, so that only peftc's are measured again."""
    if earlier is not None:
        hf, compiled = earlier["hf"], earlier["compile"]
    else:
        hf = hf_rows(case, steps)
    base = hf["none"]["peak"]
    budgets = {f"{f:.1f}x": int(base * f) for f in FRACTIONS}
    budgets["smallest"] = smallest_budget(case)
    if earlier is None:
        compiled = compile_rows(case, budgets, hf["none"], steps)
    else:  # the smallest budget is peftc's, measured again: pick among the ratios the earlier run tried
        compiled = dict(compiled, smallest=min((r for r in compiled["tried"] if _fits(r, budgets["smallest"])),
                                               key=lambda r: r["flops"], default=None))
    return {"title": case["title"], "budgets": budgets, "hf": hf, "peftc": peftc_rows(case, budgets, steps),
            "compile": compiled}


def _fits(row: dict, budget: int) -> bool:
    return "peak" in row and row["peak"] <= budget


def _cell(row: dict | None, base_flops: int) -> str:
    if row is None:
        return "does not fit | | | "
    extra = row["flops"] / base_flops - 1
    return (f"{row['peak'] / MIB:.1f} | {extra:+.1%} | {row['step_s'] * 1e3:.0f} | {row['parity']:.0e}")


def render(results: dict, meta: dict) -> str:
    lines = [BEGIN, "## Memory budgets: recomputation, side by side (`python -m benchmarks.recompute`)", "",
             "One training step per method on the same model and inputs. Peak = what a memory budget counts: "
             "parameters, buffers, inputs, AdamW state (2 fp32 per trainable parameter) and the activation peak, "
             "all from the same live-storage tracker (peftc.memory.measure_step); extra FLOPs against HF PEFT's step "
             "without checkpointing (FlopCounterMode); step time is the median of "
             f"{meta['steps']} steps on {meta['threads']} CPU threads; parity = the largest gradient difference "
             "from the same library's unscheduled step, relative to the gradient's largest entry. For every-k, each "
             "budget gets the cheapest k that fits.", "",
             NOTE, ""]
    for key, r in results.items():
        base_flops = r["hf"]["none"]["flops"]
        lines += [f"### {r['title']}", "",
                  f"HF PEFT without checkpointing: {r['hf']['none']['peak'] / MIB:.1f} MiB "
                  f"({r['hf']['none']['activations'] / MIB:.1f} MiB activations); HF per-layer checkpointing: "
                  f"{r['hf']['hf']['peak'] / MIB:.1f} MiB ({r['hf']['hf']['activations'] / MIB:.1f} MiB activations, "
                  f"{r['hf']['hf']['flops'] / base_flops - 1:+.1%} FLOPs); peftc `recompute=False`: "
                  f"{r['peftc']['off']['peak'] / MIB:.1f} MiB ({r['peftc']['off']['activations'] / MIB:.1f} MiB "
                  f"activations, step {r['peftc']['off']['step_s'] * 1e3:.0f} ms); peftc default (no budget: "
                  f"recompute-cheap): {r['peftc']['default']['peak'] / MIB:.1f} MiB "
                  f"({r['peftc']['default']['activations'] / MIB:.1f} MiB activations, "
                  f"{r['peftc']['default']['flops'] / base_flops - 1:+.1%} FLOPs, step "
                  f"{r['peftc']['default']['step_s'] * 1e3:.0f} ms: "
                  f"{r['peftc']['default']['step_s'] / r['peftc']['off']['step_s']:.2f}x `recompute=False`'s); peftc "
                  f"`memory_budget=\"auto\"`: {_auto(r, base_flops)}.", "",
                  f"Instruments on HF PEFT's eager step: the tracker counts {r['hf']['none']['activations'] / MIB:.2f} "
                  f"MiB of activations, the CPU allocator {r['compile']['eager_allocator'] / MIB:.2f} MiB. torch.compile "
                  f"at the ratios tried: " + ", ".join(f"{row['ratio']:.3g}: {row['activations'] / MIB:.1f} MiB, "
                                                     f"{row['flops'] / base_flops - 1:+.0%}"
                                                     for row in r["compile"]["tried"]) + ".", "",
                  "| budget | MiB | method | peak MiB | extra FLOPs | step ms | parity |",
                  "|---|---|---|---|---|---|---|"]
        for name, budget in r["budgets"].items():
            ours = r["peftc"][name]
            every = min((row for k, row in r["hf"].items() if k.startswith("every") and _fits(row, budget)),
                        key=lambda row: row["flops"], default=None)
            cells = [("HF PEFT, no checkpointing", r["hf"]["none"] if _fits(r["hf"]["none"], budget) else None),
                     ("HF per-layer checkpointing", r["hf"]["hf"] if _fits(r["hf"]["hf"], budget) else None),
                     (f"HF every-k (k={every['k']})" if every else "HF every-k", every)]
            plan = ("peftc" if "infeasible" in ours else
                    f"peftc ({ours['regions']} regions, planned in {ours['plan_s']:.1f} s, predicted "
                    f"{ours['predicted'] / MIB:.2f})")
            compiled = r["compile"][name]
            cells.insert(3, (f"torch.compile (ratio {compiled['ratio']:.3g})" if compiled else "torch.compile",
                             compiled))
            cells.append((plan, None if "infeasible" in ours else ours))
            for i, (method, row) in enumerate(cells):
                lines.append(f"| {name if i == 0 else ''} | {budget / MIB:.1f} | {method} | "
                             f"{_cell(row, base_flops)} |" if i == 0 else f"| | | {method} | {_cell(row, base_flops)} |")
        lines.append("")
    lines += ["![device peak vs extra FLOPs, 4-layer Llama](benchmarks_recompute.png)", "",
              f"This run: torch {torch.__version__}, {meta['seconds']:.0f} s"
              + (f"; the HF PEFT and torch.compile rows of {', '.join(meta['reused'])} are an earlier run's "
                 f"(`--reuse`), peftc's were measured again" if meta.get("reused") else "") + ".", END]
    return "\n".join(lines) + "\n"


def _auto(r: dict, base_flops: int) -> str:
    row = r["peftc"]["auto"]
    return (f"{row['peak'] / MIB:.1f} MiB ({row['activations'] / MIB:.1f} MiB activations, "
            f"{row['flops'] / base_flops - 1:+.1%} FLOPs)")


def render_chart(r: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    base_flops = r["hf"]["none"]["flops"]

    def point(row):
        return 100 * (row["flops"] / base_flops - 1), row["peak"] / MIB

    fig, ax = plt.subplots(figsize=(8, 4.5))
    series = {
        "HF PEFT (none / per-layer)": [r["hf"]["none"], r["hf"]["hf"]],
        "HF every-k": [row for k, row in r["hf"].items() if k.startswith("every")],
        "torch.compile (ratios)": r["compile"]["tried"],
        "peftc (budgets)": [row for k, row in r["peftc"].items() if k not in ("off", "default", "auto")
                            and "peak" in row],
        "peftc default / auto": [r["peftc"]["default"], r["peftc"]["auto"]],
    }
    for (label, rows), marker in zip(series.items(), "osx^*"):
        if rows:
            xs, ys = zip(*sorted(point(row) for row in rows))
            ax.plot(xs, ys, marker=marker, linestyle="-" if label.startswith("peftc (") else "", label=label)
    ax.set_xlabel("extra FLOPs vs HF PEFT without checkpointing (%)")
    ax.set_ylabel("device peak of one training step (MiB)")
    ax.set_title(r["title"])
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write_section(markdown: Path, section: str) -> None:
    """Replace this benchmark's section of docs/benchmarks.md (between its markers), or append it."""
    text = markdown.read_text() if markdown.exists() else ""
    pattern = re.compile(re.escape(BEGIN) + ".*?" + re.escape(END) + "\n?", re.S)
    text = pattern.sub(lambda m: section, text) if pattern.search(text) else text.rstrip("\n") + "\n\n" + section
    markdown.write_text(text)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.recompute", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes, nothing written")
    parser.add_argument("--steps", type=int, default=None, help="timed steps per row (default 3, quick 1)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--cases", default=None, help="comma-separated case keys (default: all)")
    parser.add_argument("--out", type=Path, default=None, help="folder with benchmarks.md (default docs/ at full "
                        "size, none with --quick)")
    parser.add_argument("--reuse", type=Path, default=None, help="an earlier run's benchmarks_recompute.json: take its "
                        "HF PEFT and torch.compile rows, measure peftc's again")
    opts = parser.parse_args(argv)
    earlier = json.loads(opts.reuse.read_text())["results"] if opts.reuse else {}
    torch.set_num_threads(opts.threads)
    steps = opts.steps or (1 if opts.quick else 3)
    chosen = [c for c in cases(opts.quick) if opts.cases is None or c["key"] in opts.cases.split(",")]
    start = time.perf_counter()
    results = {}
    for case in chosen:
        results[case["key"]] = run_case(case, steps, earlier.get(case["key"]))
        print(f"{case['key']} done ({time.perf_counter() - start:.0f} s)", flush=True)
    meta = {"steps": steps, "threads": opts.threads, "seconds": time.perf_counter() - start, "quick": opts.quick,
            "reused": sorted(k for k in results if k in earlier)}
    section = render(results, meta)
    print(section)
    for line in check_targets(results):
        print(line)
    out = opts.out if opts.out is not None else (None if opts.quick else Path("docs"))
    if out is not None:
        write_section(out / "benchmarks.md", section)
        first = next(iter(results.values()))
        render_chart(first, out / "benchmarks_recompute.png")
        (out / "benchmarks_recompute.json").write_text(json.dumps({"meta": meta, "results": results}, indent=1,
                                                                  default=str) + "\n")
    return results


def check_targets(results: dict) -> list[str]:
    """The issue's targets on the first (4-layer) model, each as a line saying whether it holds."""
    r = next(iter(results.values()))
    hf, ours = r["hf"], r["peftc"]
    feasible = [(r["budgets"][k], ours[k]) for k in r["budgets"] if "peak" in ours[k]]
    out = []
    out.append(f"[{'ok' if all(row['peak'] <= b for b, row in feasible) else 'MISS'}] measured peak <= budget for "
               f"every feasible budget ({len(feasible)} of {len(r['budgets'])} feasible)")
    ordered = sorted(feasible, key=lambda br: -br[0])
    mono = all(a[1]["peak"] >= b[1]["peak"] and a[1]["flops"] <= b[1]["flops"] for a, b in zip(ordered, ordered[1:]))
    out.append(f"[{'ok' if mono else 'MISS'}] peak non-increasing and FLOPs non-decreasing as the budget tightens")
    smallest = ours["smallest"]
    if "activations" in smallest:
        ratio = smallest["activations"] / hf["hf"]["activations"]
        out.append(f"[{'ok' if ratio <= 0.5 else 'MISS'}] smallest feasible budget's activation peak "
                   f"{_fmt_bytes(smallest['activations'])} = {ratio:.2f}x HF per-layer checkpointing's (target 0.5x)")
    base_flops = hf["none"]["flops"]
    hf_extra = hf["hf"]["flops"] - base_flops
    at_hf = [row for b, row in feasible if b >= hf["hf"]["peak"]]
    if at_hf:
        cheapest = min(at_hf, key=lambda row: row["peak"])  # the tightest budget still at or above HF's peak
        out.append(f"[{'ok' if cheapest['flops'] - base_flops <= 0.5 * hf_extra else 'MISS'}] at HF per-layer "
                   f"checkpointing's peak, peftc's extra FLOPs are {(cheapest['flops'] - base_flops) / hf_extra:.2f}x "
                   f"HF's (target 0.5x)")
    default = ours["default"]
    met = default["activations"] <= 0.65 * hf["none"]["activations"] and default["flops"] <= 1.02 * base_flops
    out.append(f"[{'ok' if met else 'MISS'}] default "
               f"activation peak {default['activations'] / hf['none']['activations']:.2f}x HF PEFT's (target 0.65x) "
               f"at {default['flops'] / base_flops:.3f}x its FLOPs (target 1.02x)")
    plans = [row.get("plan_s", 0) for row in results.get("llama8", {}).get("peftc", {}).values()]
    if plans:
        out.append(f"[{'ok' if max(plans) <= 30 else 'MISS'}] planning the 8-layer model takes at most "
                   f"{max(plans):.1f} s (target 30 s)")
    return out


if __name__ == "__main__":
    main()
