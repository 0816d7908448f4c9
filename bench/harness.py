"""What the bench scripts share: a run's metadata, its sections under a time budget, its JSON, its bar rows, timers.

A script makes one `Run` (or a subclass holding its sections), calls `run.section(name, fn, needs_s)` for each part
and `run.bar(...)` for each figure that has a bar. After every section the run rewrites <out>/<name>.json
({"meta": ..., "sections": {name: record}}) and, once it has any, <out>/<name>.bars.json (rows in the form of
bench/results/bars.json), so a call cut short keeps what it measured. A section is `fn(record)`, filling the dict it
is given; one that raises is recorded (error and traceback) and the others still run; one that would not finish
inside --budget-s (its estimate `needs_s`) is skipped and says so, except in a dry run, which exists to run every
code path.

Timers: `median_ms` (CUDA events around each call, the median; the host clock on the CPU) and `bench_ms` (triton's
do_bench: the L2 cache flushed between runs, for kernels whose inputs would otherwise stay in L2).

Importing it puts this checkout first on sys.path (archgen, tests/, templates/ are this checkout's) and imports only
the standard library (torch when a Run starts), so a script can still set TRITON_INTERPRET before triton is imported.
"""

from __future__ import annotations

import datetime
import importlib.util
import json
import math
import platform
import statistics
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

ROOT = Path(__file__).resolve().parents[1]
if sys.path[:1] != [str(ROOT)]:  # first, also where PYTHONPATH holds it
    sys.path.insert(0, str(ROOT))  # archgen, tests/ and templates/ of this checkout, not of an installed copy


def command_line(argv: list[str] | None = None) -> str:
    """How this script was started, as a row's `command`: `python bench/x.py --out ...`."""
    script = Path(sys.argv[0]).resolve()
    name = script.relative_to(ROOT).as_posix() if script.is_relative_to(ROOT) else script.name
    return " ".join(["python", name, *(sys.argv[1:] if argv is None else argv)])


def run_metadata(command: str, dry_run: bool) -> dict:
    """date (UTC), command, dry run or not, torch / triton / python versions, and the GPU when there is one."""
    import torch

    meta = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"), "command": command,
            "dry_run": dry_run, "torch": torch.__version__, "triton": package_version("triton"),
            "python": platform.python_version()}
    if torch.cuda.is_available() and not dry_run:
        meta["gpu"] = torch.cuda.get_device_name()
        meta["capability"] = list(torch.cuda.get_device_capability())
    return meta


def package_version(distribution: str) -> str | None:
    """An installed distribution's version (triton, liger-kernel, flash-linear-attention), None when absent."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(distribution)
    except PackageNotFoundError:
        return None


GPU_STATE_FIELDS = ("clocks.sm", "clocks.mem", "clocks_throttle_reasons.active", "power.draw", "temperature.gpu",
                    "utilization.gpu", "memory.used")


def gpu_state() -> dict:
    """What nvidia-smi says of GPU 0 now (clocks, throttle reasons, power, temperature, utilisation, memory used), to
    record beside a timing: two runs of the same step that differ (Hymba+'s decode read 1.556 and 2.172 ms/token in
    fresh processes 30 s apart in session 12) can then be told apart by the GPU's state. {"error": ...} without one."""
    try:
        line = subprocess.run(["nvidia-smi", f"--query-gpu={','.join(GPU_STATE_FIELDS)}", "--format=csv,noheader",
                               "--id=0"], capture_output=True, text=True, timeout=10, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError) as error:
        return {"error": f"{type(error).__name__}: {error}"[:200]}
    return dict(zip(GPU_STATE_FIELDS, (value.strip() for value in line.split(",")), strict=False))


def bar_ratio(ratio: float, bar: float) -> float:
    """A bar row's ratio, rounded to 4 decimals but never up onto its bar: a figure 0.1% short of its bar (Hymba+'s
    decode, 2.002x its floor, was 0.49953 of it) must not read as a pass after rounding (0.5 at 3 decimals did)."""
    rounded = round(ratio, 4)
    return math.floor(ratio * 1e4) / 1e4 if ratio < bar <= rounded else rounded


class Run:
    """One bench run: metadata, results by section, bar rows and the budget; written to disk after every section."""

    def __init__(self, name: str, out: Path, *, dry_run: bool, budget_s: float, command: str | None = None):
        self.name = name
        self.out = Path(out)
        self.dry_run = dry_run
        self.budget_s = budget_s
        self.device = "cpu" if dry_run else "cuda"
        self.started = time.perf_counter()
        self.command = command or command_line()
        self.results: dict = {"meta": run_metadata(self.command, dry_run), "sections": {}}
        self.bars: list[dict] = []

    @property
    def meta(self) -> dict:
        return self.results["meta"]

    @property
    def sections(self) -> dict:
        return self.results["sections"]

    def elapsed(self) -> float:
        return time.perf_counter() - self.started

    def write(self) -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        (self.out / f"{self.name}.json").write_text(json.dumps(self.results, indent=2, default=str) + "\n")
        if self.bars:
            (self.out / f"{self.name}.bars.json").write_text(json.dumps(self.bars, indent=2) + "\n")

    def section(self, name: str, fn: Callable[[dict], None], needs_s: float = 0.0) -> dict:
        """Run fn(record) into results["sections"][name] and write; returns the record."""
        record = self.sections.setdefault(name, {})
        if not self.dry_run and self.elapsed() + needs_s > self.budget_s:
            record["skipped"] = (f"time budget: {self.elapsed():.0f} s of {self.budget_s:.0f} s used, the section "
                                 f"needs ~{needs_s:.0f} s")
        else:
            started = time.perf_counter()
            try:
                fn(record)
            except Exception as error:  # noqa: BLE001 -- a failing section is a finding; the others still run
                record["error"] = f"{type(error).__name__}: {error}"[:2000]
                record["traceback"] = traceback.format_exc()[-4000:]
            record["seconds"] = round(time.perf_counter() - started, 1)
        if self.device == "cuda":
            import torch

            torch.cuda.synchronize()
            torch.cuda.empty_cache()
        self.meta["elapsed_s"] = round(self.elapsed(), 1)
        self.write()
        status = record.get("error") or record.get("skipped") or "ok"
        print(f"[{self.elapsed():6.1f} s] {name}: {status[:300]}", flush=True)
        return record

    def guarded(self, record: dict, key: str, fn: Callable[[], object]):
        """record[key] = fn(), or its error: a sub-measurement failing keeps the rest of its section."""
        try:
            record[key] = fn()
        except Exception as error:  # noqa: BLE001 -- the error is the sub-measurement's result
            record[key] = {"error": f"{type(error).__name__}: {error}"[:1000],
                           "traceback": traceback.format_exc().splitlines()[-8:]}
        return record[key]

    def bar(self, figure: str, archgen: float, unit: str, reference: str, reference_value: float, ratio: float,
            bar: float) -> None:
        """A row of bench/results/bars.json: archgen's figure, its same-run reference (a peer or a floor), their
        ratio (> 1: archgen is better) and the issue's bar for it."""
        self.bars.append({
            "figure": figure, "archgen": round(archgen, 4), "unit": unit, "reference": reference,
            "reference_value": round(reference_value, 4), "ratio": bar_ratio(ratio, bar), "bar": bar,
            "device": self.meta.get("gpu", "cpu (dry run)"), "date": self.meta["date"][:10], "command": self.command,
        })

    def summary(self) -> str:
        """The bar rows with pass or miss, then every section that failed or was skipped."""
        lines = [f"{'figure':80s} {'archgen':>10s} {'ref':>10s} {'ratio':>6s} {'bar':>5s}"]
        for row in self.bars:
            lines.append(f"{row['figure'][:80]:80s} {row['archgen']:10.4g} {row['reference_value']:10.4g} "
                         f"{row['ratio']:6.3g} {row['bar']:5.2f} {'PASS' if row['ratio'] >= row['bar'] else 'miss'}")
        for name, record in self.sections.items():
            for key in ("error", "skipped"):
                if key in record:
                    lines.append(f"{key.upper()} in {name}: {str(record[key])[:200]}")
        return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------------------
# Timers and measures
# ---------------------------------------------------------------------------------------------------------------


def graph_us_per_call(fn: Callable[[int], object], calls: int, dry_run: bool, rep_ms: int = 20) -> float:
    """Microseconds per call of fn(i), i in range(calls) (each i its own weights, so L2 holds none of them), replayed
    from one CUDA graph as a decoding step runs; the calls run once first (compiling and tuning happen there, outside
    the capture). In a dry run they only run once (the plumbing): 0.0."""
    def run():
        for i in range(calls):
            fn(i)

    run()
    if dry_run:
        return 0.0
    import torch
    from triton.testing import do_bench_cudagraph

    torch.cuda.synchronize()
    return float(do_bench_cudagraph(run, rep=rep_ms, return_mode="median")) * 1e3 / calls


def median_ms(fn: Callable[[], object], device: str, reps: int, warmup: int = 2) -> float:
    """Median milliseconds of fn() over reps calls after warmup calls: CUDA events around each call on the GPU, the
    host clock on the CPU (where no warm-up runs: a dry run only exercises the code)."""
    import torch

    for _ in range(warmup if device == "cuda" else 0):
        fn()
    times = []
    for _ in range(reps):
        if device == "cuda":
            torch.cuda.synchronize()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        else:
            began = time.perf_counter()
            fn()
            times.append((time.perf_counter() - began) * 1e3)
    return statistics.median(times)


def bench_ms(fn: Callable[[], object], device: str, grad_to_none=None) -> float:
    """Median milliseconds of fn() by triton's do_bench on the GPU (L2 flushed between calls); one call timed by the
    host clock on the CPU."""
    if device != "cuda":
        began = time.perf_counter()
        fn()
        return (time.perf_counter() - began) * 1e3
    from triton.testing import do_bench

    return float(do_bench(fn, warmup=25, rep=100, grad_to_none=grad_to_none, return_mode="median"))


def relative_norm(actual, expected) -> float:
    """||actual - expected|| / ||expected|| in float64 (NaN when actual has a NaN)."""
    a, e = actual.detach().double(), expected.detach().double()
    if a.isnan().any():
        return float("nan")
    return float((a - e).norm() / e.norm().clamp_min(1e-30))


def relative_max(actual, expected) -> float:
    """max |actual - expected| / max |expected| in float64 (the tests' assert_close measure)."""
    a, e = actual.detach().double(), expected.detach().double()
    return float((a - e).abs().max() / e.abs().max().clamp_min(1e-30))


def load_module(name: str, relative_path: str) -> ModuleType:
    """A file of this checkout imported by path, once, as `name` (templates/runtime files are not a package on the
    GPU machine's path)."""
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, ROOT / relative_path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module
