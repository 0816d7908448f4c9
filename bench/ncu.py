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
import struct
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
SAMPLED_STALL = "smsp__pcsamp_warps_issue_stalled_"
"""The warp-state sampling's counters by stall reason, as a binary report holds them (read_report)."""
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
        partial = read_report(report) if report.exists() else []
        return {"error": f"ncu ran past {timeout_s:.0f} s", "command": " ".join(command), "launches": partial}
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


def read_report(path: Path) -> list[dict]:
    """The launches of a binary .ncu-rep, KEY_METRICS and the sampled stall reasons (percent of samples) each, without
    ncu: what is left of a run cut off before ncu printed its pages (`python bench/ncu.py REPORT` prints them). The
    layout, as ncu 2025 writes it: after a 4-byte magic, length-prefixed (uint32) protobuf messages; a launch's
    header carries the metric names (field 4, repeated strings), the launch itself its values (field 13: {1: name
    index, 2: value message})."""
    data = path.read_bytes()
    messages, at = [], 4
    while at + 4 <= len(data):
        size = struct.unpack_from("<I", data, at)[0]
        if size == 0 or at + 4 + size > len(data):
            break
        messages.append(data[at + 4:at + 4 + size])
        at += 4 + size
    launches, names = [], None
    for message in messages:
        fields = _fields(message) or []
        for number, value in fields:  # the name table: a field 4 of strings only
            entries = _fields(value) if number == 4 and isinstance(value, bytes) else None
            if names is None and entries and all(n == 1 and isinstance(v, bytes) for n, v in entries):
                names = [name.decode(errors="replace") for _, name in entries]
        values = [value for number, value in fields if number == 13]
        if not values or names is None:
            continue
        row = {}
        for entry in values:
            parts = dict(_fields(entry) or [])
            if isinstance(parts.get(1), int) and parts[1] < len(names) and isinstance(parts.get(2), bytes):
                row[names[parts[1]]] = next((v for _, v in _fields(parts[2]) or [] if not isinstance(v, bytes)), None)
        launch = {short: row[metric] for metric, short in KEY_METRICS.items() if row.get(metric) is not None}
        launch["stall_samples_pct"] = _stall_samples_pct(row)
        launches.append(launch)
    return launches


def _stall_samples_pct(row: dict) -> dict:
    """The warp-state sampling's share of samples by stall reason (percent, largest first) of a launch's
    {metric: count}."""
    samples = {metric.removeprefix(SAMPLED_STALL): count for metric, count in row.items()
               if metric.startswith(SAMPLED_STALL) and not metric.endswith("_not_issued")
               and isinstance(count, int | float) and count}
    total = sum(samples.values()) or 1
    return dict(sorted(((k, round(100 * v / total, 1)) for k, v in samples.items()), key=lambda kv: -kv[1]))


def _fields(message: bytes) -> list[tuple[int, int | float | bytes]] | None:
    """A protobuf message's (field number, value) pairs; None when the bytes are not one."""
    fields, at = [], 0
    try:
        while at < len(message):
            key, at = _varint(message, at)
            wire = key & 7
            if wire == 0:
                value, at = _varint(message, at)
            elif wire == 1:
                value, at = struct.unpack_from("<d", message, at)[0], at + 8
            elif wire == 5:
                value, at = struct.unpack_from("<f", message, at)[0], at + 4
            elif wire == 2:
                size, at = _varint(message, at)
                value, at = message[at:at + size], at + size
            else:
                return None
            fields.append((key >> 3, value))
    except (IndexError, struct.error):
        return None
    return fields if at == len(message) else None


def _varint(data: bytes, at: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        byte = data[at]
        at += 1
        value |= (byte & 0x7F) << shift
        shift += 7
        if byte < 0x80:
            return value, at


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
    # the raw page holds the sampled counters instead of the per-issue ratios on some ncu versions (ncu 2025 on the
    # H200 of session 8)
    launch["stall_samples_pct"] = _stall_samples_pct({metric: _number(value) for metric, value in row.items()
                                                      if metric.startswith(SAMPLED_STALL)})
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
        stalls = ", ".join(f"{k} {v:.1f}" for k, v in list(launch.get("stalls_cycles_per_issue", {}).items())[:3]) or \
            ", ".join(f"{k} {v:.0f}% of samples" for k, v in list(launch.get("stall_samples_pct", {}).items())[:3])
        lines.append(f"ncu {launch.get('variant', '?')} [{launch['kernel'][:40]}]: {launch.get('duration_ns', 0) / 1e3:.1f}"
                     f" us, DRAM {launch.get('dram_pct_of_peak', 0):.0f}% of peak, occupancy "
                     f"{launch.get('achieved_occupancy_pct', 0):.0f}%, {launch.get('registers', 0):.0f} regs; "
                     f"stalls: {stalls}")
    if "mismatch" in record:
        lines.append(f"ncu: {record['mismatch']}")
    return lines


if __name__ == "__main__":
    for launch in read_report(Path(sys.argv[1])):
        print(json.dumps(launch))
