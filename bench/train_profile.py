"""Where the time of a whole-model training step goes, per seed model: what a step's MFU is lost to.

One step (forward + backward + fused AdamW, bf16, the sizes of bench/whole_model.py: 8 × 2048, HNS `1b` 2 × 2048) of
each model's package as generated (`kernels`), and on request with its layers under torch.compile
(`kernels_compiled`, archgen.benchmark.compile_layers), is timed and then profiled once:
  - wall ms (median of unprofiled steps) and MFU at it; the ms the host takes to enqueue a step (no sync) and the ms
    the GPU is busy (the union of kernel intervals in the profiled step): busy ≪ wall means the GPU waits on the host
    or on syncs;
  - kernel count and summed kernel time, the 25 busiest kernels;
  - every matmul op (mm, addmm, bmm, _grouped_mm, linear's) grouped by input shapes with the kernels it ran and their
    time: shows which products run which cuBLAS kernels (an sm75 fallback names its shape); and every op by input
    shapes with its own kernels' time (the copies, casts and elementwise ops between the kernels);
  - the host-device syncs: torch.cuda's sync debug mode's warnings during a step, by the source line that caused them;
  - where the host's time goes in one step (cProfile: the functions by their own time), for a step the host paces;
  - the profiler's per-op table (text, sorted by CUDA time).

Run on the GPU from the repository root:
    python bench/train_profile.py --out $OUT --only hymba_plus,nexus --budget-s 100
and at another shape (no bar row then: the MFU bar is set at 16k tokens a step), e.g. the one the references train
at in bench/whole_model.py, where (a) must be at least as fast as (b) and (c):
    python bench/train_profile.py --out $OUT --only hymba_plus --shape 1x512 --budget-s 100
Writes $OUT/train_profile.json (bench/harness.py's Run: a section per model and per model and variant),
$OUT/train_profile.bars.json (the MFU bar row of each model's `kernels` variant) and
$OUT/train_profile_<model>_<variant>.txt. `--dry-run`: the CPU, toy sizes, the
profiler's CPU side only (checks the script; the figures mean nothing).
"""

from __future__ import annotations

import argparse
import cProfile
import dataclasses
import functools
import json
import math
import pstats
import tempfile
import time
import warnings
from collections import Counter, defaultdict
from pathlib import Path

import torch
from harness import Run  # before archgen: it puts this checkout on sys.path
from torch.profiler import ProfilerActivity, profile

from archgen.benchmark import (
    COMPILED_VARIANTS,
    compile_layers,
    free_memory,
    next_token_loss,
    prepare_bench,
    sync,
    timed,
    timed_once,
)
from bench.whole_model import MODELS, bench_config

MATMULS = frozenset({"aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::_grouped_mm", "aten::matmul"})
# seconds per model on an H200 (HNS 1b, 10.8 B parameters: twice that)
ESTIMATE_S = {"kernels": 35, "kernels_compiled": 60, "kernels_graphed": 70}


def training_step(model, tokens: torch.Tensor, device: str):
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device == "cuda")

    def step():
        torch.compiler.cudagraph_mark_step_begin()  # a new step for CUDA-graph trees (kernels_graphed); else nothing
        next_token_loss(model, tokens).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def busy_ms(kernels) -> float:
    """The union of the kernels' [start, end) intervals: the time the GPU ran anything."""
    total, reach = 0.0, -float("inf")
    for start, end in sorted((k.time_range.start, k.time_range.end) for k in kernels):
        if end > reach:
            total += end - max(start, reach)
            reach = end
    return total / 1e3


def matmuls_by_shape(events) -> list[dict]:
    """Each matmul op's input shapes with the kernels it launched (its own, not its children's) and their time."""
    groups: dict = defaultdict(lambda: {"calls": 0, "device_ms": 0.0, "kernels": Counter()})
    for event in events:
        if event.name in MATMULS and event.kernels:
            group = groups[(event.name, str(event.input_shapes))]
            group["calls"] += 1
            for kernel in event.kernels:
                group["device_ms"] += kernel.duration / 1e3
                group["kernels"][kernel.name[:90]] += 1
    rows = [{"op": op, "shapes": shapes, "calls": g["calls"], "device_ms": g["device_ms"], "kernels": dict(g["kernels"])}
            for (op, shapes), g in groups.items()]
    return sorted(rows, key=lambda row: -row["device_ms"])


def ops_by_shape(profiler) -> list[dict]:
    """Every op by input shapes with the device time of the kernels it launched itself (copies, casts and elementwise
    ops included, not only matmuls), the busiest first."""
    rows = [{"op": row.key, "shapes": str(row.input_shapes), "calls": row.count,
             "self_device_ms": row.self_device_time_total / 1e3}
            for row in profiler.key_averages(group_by_input_shape=True) if row.self_device_time_total > 0]
    return sorted(rows, key=lambda row: -row["self_device_ms"])


def host_functions(step, device: str, top: int = 30) -> list[dict]:
    """Where the host's time in one step goes (cProfile, the step then synchronised): the `top` functions by their own
    time, each with its calls and its own and cumulative ms. A step whose host enqueue time is near its wall time
    (Hymba+ at 1 × 512: 202 of 248 ms) is paced by these, not by its kernels."""
    profiler = cProfile.Profile()
    profiler.enable()
    step()
    sync(device)
    profiler.disable()
    stats = pstats.Stats(profiler).stats
    rows = [{"function": f"{Path(file).name}:{line}({name})", "calls": calls, "own_ms": own * 1e3,
             "cumulative_ms": cumulative * 1e3}
            for (file, line, name), (_, calls, own, cumulative, _) in stats.items()]
    return sorted(rows, key=lambda row: -row["own_ms"])[:top]


def syncs_by_line(step, device: str) -> dict[str, int]:
    """The synchronizing CUDA calls one step makes, counted by the line of the package (or of torch) that made them."""
    if device != "cuda":
        return {}
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            step()
            sync(device)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    lines = Counter(f"{Path(w.filename).name}:{w.lineno}" for w in caught if "synchroniz" in str(w.message))
    return dict(lines.most_common())


def profile_model(record: dict, prepared, variant: str, device: str, steps: int, budget_left, out: Path, name: str,
                  bar):
    """One variant of one model into `record`: timings first, then (budget permitting) the profiled step. The package
    as generated (`kernels`) gives issue 12's MFU bar row through `bar` (bench/harness.py's Run.bar)."""
    config, result = prepared.config, prepared.result
    model_module = prepared.package.model
    if hasattr(model_module, "USE_KERNELS"):
        model_module.USE_KERNELS = COMPILED_VARIANTS.get(variant, (variant, None))[0] == "kernels"
    with torch.device(device):
        model = prepared.package.Model().to(prepared.dtype)
    if variant in COMPILED_VARIANTS:
        compile_layers(model, COMPILED_VARIANTS[variant][1])
    model.train()
    tokens = torch.randint(0, model.lm_head.weight.size(0), (config.batch, config.seq_len + 1), device=device)
    step = training_step(model, tokens, device)
    tokens_per_step = config.batch * config.seq_len
    record["first_step_s"] = timed_once(step, device)  # autotuning, compiling
    wall = timed(step, device, steps, warmup=1)
    sync(device)
    started = time.perf_counter()
    step()
    record["host_enqueue_ms"] = (time.perf_counter() - started) * 1e3
    sync(device)
    record.update(wall_ms=wall * 1e3, tokens_per_s=tokens_per_step / wall,
                  mfu=tokens_per_step * result.train_flops_per_token / wall / result.matmul_flops_per_s)
    if device == "cuda":
        record["peak_memory_gib"] = torch.cuda.max_memory_allocated() / 2**30
    if variant == "kernels" and tokens_per_step >= 16384:
        bar(f"{name} training MFU, {config.batch} x {config.seq_len} tokens", record["mfu"],
            "fraction of measured bf16 matmul rate", "bf16 matmul rate", result.matmul_flops_per_s, record["mfu"], 0.4)
    if budget_left() < 3 * wall + 5:  # the profiled step, the sync-debug step and the host-profiled step
        record["profile_skipped"] = "time budget spent"
        return
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    with profile(activities=activities, record_shapes=True) as profiler:
        step()
        sync(device)
    events = profiler.events()
    # the GPU timeline's events but its user annotations (the optimizer's step range), which are not kernels
    kernels = [e for e in events if e.device_type == torch.autograd.DeviceType.CUDA and not e.is_user_annotation]
    by_kernel = Counter()
    calls = Counter()
    for kernel in kernels:
        by_kernel[kernel.name[:90]] += kernel.device_time / 1e3
        calls[kernel.name[:90]] += 1
    record.update(
        kernels=len(kernels), kernel_ms=sum(by_kernel.values()), gpu_busy_ms=busy_ms(kernels),
        busiest_kernels=[{"kernel": k, "calls": calls[k], "ms": ms} for k, ms in by_kernel.most_common(25)],
        matmuls=matmuls_by_shape(events)[:40], ops_by_shape=ops_by_shape(profiler)[:40], syncs=syncs_by_line(step, device),
        host_functions=host_functions(step, device))
    table = profiler.key_averages().table(sort_by="cuda_time_total" if device == "cuda" else "cpu_time_total",
                                          row_limit=60, max_name_column_width=90)
    (out / f"train_profile_{name}_{variant}.txt").write_text(table)
    del model, step
    free_memory(device)


def batch_by_length(text: str) -> tuple[int, int]:
    """--shape's "BxL" (e.g. 1x512) as (batch, length)."""
    try:
        batch, length = (int(part) for part in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not BATCHxLENGTH, e.g. 1x512") from None
    if batch < 1 or length < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: batch and length must be positive")
    return batch, length


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="out")
    parser.add_argument("--only", default=",".join(MODELS), help="comma-separated: " + ", ".join(MODELS))
    parser.add_argument("--variants", default="kernels", help="comma-separated: kernels, kernels_compiled, kernels_graphed")
    parser.add_argument("--steps", type=int, default=3, help="timed steps (after the first and one warm-up)")
    parser.add_argument("--budget-s", type=float, default=100.0, help="no model or profile starts after this many seconds")
    parser.add_argument("--shape", type=batch_by_length, default=None, metavar="BxL",
                        help="train at batch x length instead of the whole-model sizes, e.g. 1x512")
    parser.add_argument("--dry-run", action="store_true", help="toy sizes on the CPU: checks the script only")
    args = parser.parse_args()
    names, variants = args.only.split(","), tuple(args.variants.split(","))
    for chosen, known, what in ((names, MODELS, "model"), (variants, tuple(ESTIMATE_S), "variant")):
        unknown = sorted(set(chosen) - set(known))
        if unknown:
            parser.error(f"unknown {what}s {unknown}: choose from {', '.join(known)}")
    run = Run("train_profile", Path(args.out), dry_run=args.dry_run, budget_s=args.budget_s)

    def budget_left() -> float:
        return math.inf if run.dry_run else run.budget_s - run.elapsed()  # a dry run runs every code path
    with tempfile.TemporaryDirectory() as tmp:
        for name in names:
            prepared = {}

            def prepare(record: dict, name=name, prepared=prepared) -> None:
                config = bench_config(name, args.dry_run, variants)
                if args.shape:
                    config = dataclasses.replace(config, batch=args.shape[0], seq_len=args.shape[1])
                prepared["bench"] = bench = prepare_bench(config, Path(tmp) / name)
                record.update(parameters=bench.result.parameters, batch=bench.config.batch, seq_len=bench.config.seq_len,
                              matmul_flops_per_s=bench.result.matmul_flops_per_s,
                              train_flops_per_token=bench.result.train_flops_per_token)

            run.section(name, prepare, needs_s=5)
            if "bench" not in prepared:
                continue
            for variant in variants:
                estimate = ESTIMATE_S[variant] * (2 if name.startswith("hns") else 1)
                run.section(f"{name} {variant}", functools.partial(
                    profile_model, prepared=prepared["bench"], variant=variant, device=run.device, steps=args.steps,
                    budget_left=budget_left, out=run.out, name=name, bar=run.bar), needs_s=estimate)
                free_memory(run.device)
    summary = {key: {k: record[k] for k in ("wall_ms", "gpu_busy_ms", "host_enqueue_ms", "kernels", "mfu") if k in record}
               for key, record in run.sections.items()}
    print(json.dumps(summary, indent=1), flush=True)
    print(run.summary())


if __name__ == "__main__":
    main()
