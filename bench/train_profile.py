"""Where the time of a whole-model training step goes, per seed model: what a step's MFU is lost to.

One step (forward + backward + fused AdamW, bf16, the sizes of bench/whole_model.py: 8 × 2048, HNS `1b` 2 × 2048) of
each model's package as generated (`kernels`), and on request with its layers under torch.compile
(`kernels_compiled`, archgen.benchmark.compile_layers), is timed and then profiled once:
  - wall ms (median of unprofiled steps) and MFU at it; the ms the host takes to enqueue a step (no sync) and the ms
    the GPU is busy (the union of kernel intervals in the profiled step): busy ≪ wall means the GPU waits on the host
    or on syncs;
  - kernel count and summed kernel time, the 25 busiest kernels;
  - every matmul op (mm, addmm, bmm, _grouped_mm, linear's) grouped by input shapes with the kernels it ran and their
    time: shows which products run which cuBLAS kernels (an sm75 fallback names its shape);
  - the host-device syncs: torch.cuda's sync debug mode's warnings during a step, by the source line that caused them;
  - the profiler's per-op table (text, sorted by CUDA time).

Run on the GPU from the repository root:
    python bench/train_profile.py --out $OUT --only hymba_plus,nexus --budget-s 100
Writes $OUT/train_profile.json and $OUT/train_profile_<model>_<variant>.txt. `--dry-run`: the CPU, toy sizes, the
profiler's CPU side only (checks the script; the figures mean nothing).
"""

from __future__ import annotations

import argparse
import datetime
import functools
import json
import sys
import tempfile
import time
import warnings
from collections import Counter, defaultdict
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from archgen.benchmark import (  # noqa: E402
    COMPILED_VARIANTS,
    attempt,
    compile_layers,
    describe_error,
    free_memory,
    next_token_loss,
    prepare_bench,
    sync,
    timed,
    timed_once,
)
from bench.whole_model import MODELS, bench_config  # noqa: E402

MATMULS = frozenset({"aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::_grouped_mm", "aten::matmul"})
ESTIMATE_S = {"kernels": 25, "kernels_compiled": 80}  # per model on an H200; HNS 1b (10.8 B parameters) twice that


def training_step(model, tokens: torch.Tensor, device: str):
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device == "cuda")

    def step():
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


def profile_model(prepared, variant: str, device: str, steps: int, deadline: float, out: Path, name: str) -> dict:
    config, result = prepared.config, prepared.result
    model_module = prepared.package.model
    if hasattr(model_module, "USE_KERNELS"):
        model_module.USE_KERNELS = COMPILED_VARIANTS.get(variant, variant) == "kernels"
    with torch.device(device):
        model = prepared.package.Model().to(prepared.dtype)
    if variant in COMPILED_VARIANTS:
        compile_layers(model)
    model.train()
    tokens = torch.randint(0, model.lm_head.weight.size(0), (config.batch, config.seq_len + 1), device=device)
    step = training_step(model, tokens, device)
    tokens_per_step = config.batch * config.seq_len
    figures: dict = {"first_step_s": timed_once(step, device)}  # autotuning, compiling
    wall = timed(step, device, steps, warmup=1)
    sync(device)
    started = time.perf_counter()
    step()
    figures["host_enqueue_ms"] = (time.perf_counter() - started) * 1e3
    sync(device)
    figures.update(wall_ms=wall * 1e3, tokens_per_s=tokens_per_step / wall,
                   mfu=tokens_per_step * result.train_flops_per_token / wall / result.matmul_flops_per_s)
    if time.perf_counter() > deadline:
        figures["profile_skipped"] = "time budget spent"
        return figures
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    with profile(activities=activities, record_shapes=True) as profiler:
        step()
        sync(device)
    events = profiler.events()
    kernels = [e for e in events if e.device_type == torch.autograd.DeviceType.CUDA]
    by_kernel = Counter()
    calls = Counter()
    for kernel in kernels:
        by_kernel[kernel.name[:90]] += kernel.device_time / 1e3
        calls[kernel.name[:90]] += 1
    figures.update(
        kernels=len(kernels), kernel_ms=sum(by_kernel.values()), gpu_busy_ms=busy_ms(kernels),
        busiest_kernels=[{"kernel": k, "calls": calls[k], "ms": ms} for k, ms in by_kernel.most_common(25)],
        matmuls=matmuls_by_shape(events)[:40], syncs=syncs_by_line(step, device))
    table = profiler.key_averages().table(sort_by="cuda_time_total" if device == "cuda" else "cpu_time_total",
                                          row_limit=60, max_name_column_width=90)
    (out / f"train_profile_{name}_{variant}.txt").write_text(table)
    del model, step
    free_memory(device)
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="out")
    parser.add_argument("--only", default=",".join(MODELS), help="comma-separated: " + ", ".join(MODELS))
    parser.add_argument("--variants", default="kernels", help="comma-separated: kernels, kernels_compiled")
    parser.add_argument("--steps", type=int, default=3, help="timed steps (after the first and one warm-up)")
    parser.add_argument("--budget-s", type=float, default=100.0, help="no model or profile starts after this many seconds")
    parser.add_argument("--dry-run", action="store_true", help="toy sizes on the CPU: checks the script only")
    args = parser.parse_args()
    started = time.perf_counter()
    deadline = started + args.budget_s
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    device = "cpu" if args.dry_run else "cuda"
    command = "python bench/train_profile.py " + " ".join(sys.argv[1:])
    results: dict = {"date": datetime.date.today().isoformat(), "command": command, "torch": torch.__version__,
                     "device": torch.cuda.get_device_name() if device == "cuda" else "cpu (dry run)",
                     "budget_s": args.budget_s, "models": {}}

    def save() -> None:
        results["elapsed_s"] = time.perf_counter() - started
        (out / "train_profile.json").write_text(json.dumps(results, indent=2, default=str) + "\n")

    variants = tuple(args.variants.split(","))
    unknown = set(variants) - {"kernels", "kernels_compiled"}
    if unknown:
        parser.error(f"unknown variants {sorted(unknown)}: choose from kernels, kernels_compiled")
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.only.split(","):
            if name not in MODELS:
                parser.error(f"unknown model {name!r}: choose from {', '.join(MODELS)}")
            entry = results["models"].setdefault(name, {})
            try:
                prepared = prepare_bench(bench_config(name, args.dry_run, variants), Path(tmp) / name)
            except Exception as error:  # noqa: BLE001 — one model failing must not lose the others
                entry["error"] = describe_error(error)
                continue
            entry.update(parameters=prepared.result.parameters, batch=prepared.config.batch, seq_len=prepared.config.seq_len,
                         matmul_flops_per_s=prepared.result.matmul_flops_per_s,
                         train_flops_per_token=prepared.result.train_flops_per_token)
            for variant in variants:
                estimate = ESTIMATE_S[variant] * (2 if name.startswith("hns") else 1)
                if not args.dry_run and deadline - time.perf_counter() < estimate:
                    entry[variant + "_skipped"] = f"{deadline - time.perf_counter():.0f} s left, it takes about {estimate} s"
                    continue
                print(f"[{time.perf_counter() - started:5.0f}s] {name} {variant}", flush=True)
                attempt(entry, variant, device, functools.partial(profile_model, prepared, variant, device, args.steps,
                                                                  deadline, out, name))
                free_memory(device)
                save()
    save()
    summary = {name: {v: {k: e[v][k] for k in ("wall_ms", "gpu_busy_ms", "host_enqueue_ms", "kernels", "mfu") if k in e[v]}
                      for v in variants if v in e} for name, e in results["models"].items()}
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
