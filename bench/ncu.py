"""Nsight Compute (ncu) on a bench's kernels: what a timing alone cannot tell apart between two kernels that move the
same bytes (DRAM throughput, bytes moved, occupancy, registers, instructions, and why warps stall).

A bench script names workloads: a workload warms its kernels up (compiles, tunes) and then runs each variant once
inside `profiled()`, returning the variants' labels and how many profiled launches each makes. `profile()` runs the
script again as a child under ncu (`python SCRIPT --ncu-child WORKLOAD --out DIR`), which collects only between
cudaProfilerStart and cudaProfilerStop (`--profile-from-start off`), and only kernels whose names match; then it reads
the report back:
  <out>/<name>.ncu.txt   ncu's details page: every section's table for every profiled launch, for a person
  <out>/<name>.ncu.csv   every raw metric of every launch
  return value           per launch: the variant, the kernel, and the metrics of KEY_METRICS and the stall reasons
                         (cycles a warp spends stalled per issued instruction, by reason), for the bench's JSON
Clocks are left alone (`--clock-control none`), so durations compare with the bench's timings; caches are flushed
before every replay (ncu's default), as triton's do_bench flushes L2.

Standard library only: the child imports torch itself, and the parent needs no GPU.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

NCU_PATHS = ("ncu", "/usr/local/cuda/bin/ncu")
SECTION_SET = "detailed"
"""ncu's section set: speed of light, memory workload (with its chart and tables), occupancy, launch statistics,
warp states, scheduler, instruction statistics and source counters."""
METRICS = ("dram__bytes_read.sum", "dram__bytes_write.sum")
"""Collected on top of the set: the bytes each launch moved to and from DRAM, against the bytes it must move."""
KEY_METRICS = {
    "gpu__time_duration.sum": "duration_ns",
    "dram__bytes_read.sum": "dram_read_bytes",
    "dram__bytes_write.sum": "dram_write_bytes",
    "dram__throughput.avg.pct_of_peak_sustained_elapsed": "dram_pct_of_peak",
    "gpu__compute_memory_throughput.avg.pct_of_peak_sustained_elapsed": "memory_pct_of_peak",
    "sm__throughput.avg.pct_of_peak_sustained_elapsed": "sm_pct_of_peak",
    "lts__t_sector_hit_rate.pct": "l2_hit_pct",
    "launch__grid_size": "grid",
    "launch__block_size": "block",
    "launch__registers_per_thread": "registers",
    "launch__waves_per_multiprocessor": "waves",
    "sm__maximum_warps_per_active_cycle_pct": "theoretical_occupancy_pct",
    "sm__warps_active.avg.pct_of_peak_sustained_active": "achieved_occupancy_pct",
    "smsp__inst_executed.sum": "instructions",
    "smsp__issue_active.avg.pct_of_peak_sustained_active": "issue_active_pct",
    "smsp__average_warp_latency_per_inst_issued.ratio": "cycles_per_issue",
}
STALL = re.compile(r"smsp__average_warps?_issue_stalled_(\w+?)_per_issue_active\.ratio")
"""The warp-state sampling's stall reasons: cycles per issued instruction a warp spends stalled for each reason."""


def ncu_executable() -> str | None:
    return next((found for name in NCU_PATHS if (found := shutil.which(name))), None)


@contextlib.contextmanager
def profiled(device: str):
    """The region ncu collects in (the child's cudaProfilerStart .. cudaProfilerStop); everything queued before it
    (warm-up, tuning) has finished when it starts. On the CPU (a dry run exercising a workload) it marks nothing."""
    import torch

    if device != "cuda":
        yield
        return
    torch.cuda.synchronize()
    torch.cuda.profiler.start()
    try:
        yield
    finally:
        torch.cuda.synchronize()
        torch.cuda.profiler.stop()


def child_main(workloads: dict, name: str, out: Path) -> None:
    """The child's side: run workload `name` on the GPU, write its variants ([label, profiled launches], in launch
    order) as <out>/<name>.variants.json for the parent."""
    variants = workloads[name]("cuda")
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.variants.json").write_text(json.dumps(variants) + "\n")


def profile(script: Path, workload: str, kernels: str, out: Path, timeout_s: float) -> dict:
    """Run `script --ncu-child workload --out out` under ncu, collecting the kernels whose names match the regex
    `kernels`; {"launches": [{"variant", "kernel", metrics...}], "files": [...]} or {"error": ...}."""
    ncu = ncu_executable()
    if ncu is None:
        return {"error": f"ncu not found (looked for {', '.join(NCU_PATHS)})"}
    out.mkdir(parents=True, exist_ok=True)
    report = out / f"{workload}.ncu-rep"
    command = [ncu, "--profile-from-start", "off", "--kernel-name", f"regex:{kernels}", "--clock-control", "none",
               "--set", SECTION_SET, "--metrics", ",".join(METRICS), "--export", str(report),
               "--force-overwrite", sys.executable, str(script), "--ncu-child", workload, "--out", str(out)]
    try:
        run = subprocess.run(command, capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        return {"error": f"ncu ran past {timeout_s:.0f} s", "command": " ".join(command)}
    log = (run.stdout + run.stderr)[-3000:]
    if run.returncode != 0 or not report.exists():
        return {"error": f"ncu exited with {run.returncode}", "log": log, "command": " ".join(command)}
    details = subprocess.run([ncu, "--import", str(report), "--page", "details"], capture_output=True, text=True)
    (out / f"{workload}.ncu.txt").write_text(details.stdout)
    raw = subprocess.run([ncu, "--import", str(report), "--csv", "--page", "raw", "--print-units", "base"],
                         capture_output=True, text=True)
    (out / f"{workload}.ncu.csv").write_text(raw.stdout)
    report.unlink()  # the two pages hold what it has; the binary report only opens in ncu
    variants = json.loads((out / f"{workload}.variants.json").read_text())
    launches = [_key_metrics(row) for row in _raw_rows(raw.stdout)]
    labels = [label for label, count in variants for _ in range(count)]
    for launch, label in zip(launches, labels, strict=False):
        launch["variant"] = label
    result = {"launches": launches, "files": [f"{workload}.ncu.txt", f"{workload}.ncu.csv"]}
    if len(labels) != len(launches):
        result["mismatch"] = f"the workload declared {len(labels)} launches, ncu profiled {len(launches)}"
    return result


def _raw_rows(text: str) -> list[dict]:
    """The raw page's rows as {metric: value}: a header row, a units row, then one row per launch (ncu's own messages,
    lines starting with ==, skipped)."""
    lines = [line for line in text.splitlines() if line.startswith('"')]
    rows = list(csv.reader(io.StringIO("\n".join(lines))))
    if len(rows) < 3:
        return []
    header = rows[0]
    return [dict(zip(header, row, strict=False)) for row in rows[2:]]


def _key_metrics(row: dict) -> dict:
    launch = {"kernel": row.get("Kernel Name", "?")[:120]}
    for metric, short in KEY_METRICS.items():
        if metric in row:
            launch[short] = _number(row[metric])
    stalls = {match.group(1): _number(value) for metric, value in row.items() if (match := STALL.fullmatch(metric))}
    launch["stalls_cycles_per_issue"] = dict(sorted(((k, v) for k, v in stalls.items() if isinstance(v, float) and v >= 0.05),
                                                    key=lambda kv: -kv[1]))
    return launch


def _number(text: str) -> float | str:
    try:
        return float(text.replace(",", ""))
    except ValueError:
        return text


def summary_lines(record: dict) -> list[str]:
    """One line per profiled launch of a bench's ncu record: time, DRAM, occupancy, registers, the top stalls."""
    lines = []
    for launch in record.get("launches", []):
        stalls = ", ".join(f"{k} {v:.1f}" for k, v in list(launch.get("stalls_cycles_per_issue", {}).items())[:3])
        lines.append(f"ncu {launch.get('variant', '?')} [{launch['kernel'][:40]}]: {launch.get('duration_ns', 0) / 1e3:.1f}"
                     f" us, DRAM {launch.get('dram_pct_of_peak', 0):.0f}% of peak, occupancy "
                     f"{launch.get('achieved_occupancy_pct', 0):.0f}%, {launch.get('registers', 0):.0f} regs; "
                     f"stalls: {stalls}")
    if "mismatch" in record:
        lines.append(f"ncu: {record['mismatch']}")
    return lines
