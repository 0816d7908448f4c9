"""Where a generated model's GPU time goes: per-kernel CUDA time of one training step and of eager decoding.

Not a speed claim (the timed figures are bench/whole_model.py's and bench/decode.py's): these tables are the profiles
that bench/results/README.md points to where a bar is missed.

For each model it builds the package (Triton kernels on), then profiles with torch.profiler, after two warm-up calls:
  train   one bf16 training step (forward, backward, fused AdamW) at batch × 2048 tokens, as bench/whole_model.py's
          variant (a) runs it, with the step's kernel count, summed kernel time, wall time and the MFU at that wall time
  decode  `generate` of 9 new tokens after a 128-token prompt without the CUDA graph, kernels grouped by input shape
          (the decode step's GEMV shapes)

    python bench/profile_step.py --out $OUT --only train:hymba_plus,decode:bamba_1b
    python bench/profile_step.py --dry-run --out /tmp/profile   # CPU, tiny presets: checks the script only

Writes $OUT/profile_step.json (totals) and $OUT/<part>_<model>.txt (torch.profiler's table, by CUDA time).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from whole_model import DRY_BAMBA  # noqa: E402  (Bamba's spec has no tiny preset: the same toy sizes as that bench)

from archgen.benchmark import BenchConfig, describe_error, device_name, free_memory, next_token_loss, prepare_bench  # noqa: E402

MODELS = {  # name: (spec, preset, training batch of 2048-token rows)
    "bamba_1b": ("bench/specs/bamba_1b.yaml", None, 8),
    "hymba_plus": ("specs/hymba_plus.yaml", None, 8),
    "nexus": ("specs/nexus.yaml", None, 8),
    "hns_ss_jepa_moe_1b": ("specs/hns_ss_jepa_moe.yaml", "1b", 2),
}
PARTS = ("train", "decode")
DEFAULT_ONLY = "train:hymba_plus,train:nexus,train:hns_ss_jepa_moe_1b,train:bamba_1b,decode:bamba_1b,decode:hymba_plus"


def profiled(fn, device: str, group_by_shape: bool) -> tuple[dict, str]:
    """Totals and the per-kernel table of one call of fn, after two untimed calls."""
    for _ in range(2):
        fn()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    if device == "cuda":
        torch.cuda.synchronize()
    started = time.perf_counter()
    with profile(activities=activities, record_shapes=group_by_shape) as prof:
        fn()
        if device == "cuda":
            torch.cuda.synchronize()
    wall_s = time.perf_counter() - started
    kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    totals = {"kernels": len(kernels), "kernel_ms": sum(e.device_time for e in kernels) / 1e3,
              "wall_ms": wall_s * 1e3}
    sort_by = "cuda_time_total" if device == "cuda" else "cpu_time_total"
    table = prof.key_averages(group_by_input_shape=group_by_shape).table(
        sort_by=sort_by, row_limit=60, max_name_column_width=80, max_shapes_column_width=60)
    return totals, table


def bench_config(name: str, dry_run: bool) -> BenchConfig:
    spec, preset, batch = MODELS[name]
    if dry_run:
        preset, overrides = (None, DRY_BAMBA) if name == "bamba_1b" else ("tiny", ())
        return BenchConfig(ROOT / spec, preset, overrides, device="cpu", dtype="float32", batch=1, seq_len=32)
    return BenchConfig(ROOT / spec, preset, (), batch=batch, seq_len=2048)


def profile_train(config: BenchConfig, directory: Path) -> tuple[dict, str]:
    prepared = prepare_bench(config, directory)
    with torch.device(config.device):
        model = prepared.package.Model().to(prepared.dtype)
    model.train()
    tokens = torch.randint(0, model.lm_head.weight.size(0), (config.batch, config.seq_len + 1), device=config.device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=config.device == "cuda")

    def step():
        next_token_loss(model, tokens).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    totals, table = profiled(step, config.device, group_by_shape=False)
    flops = config.batch * config.seq_len * prepared.result.train_flops_per_token
    totals["mfu_at_wall"] = flops / (totals["wall_ms"] / 1e3) / prepared.result.matmul_flops_per_s
    totals["tokens"] = config.batch * config.seq_len
    return totals, table


def profile_decode(config: BenchConfig, directory: Path) -> tuple[dict, str]:
    prepared = prepare_bench(config, directory)
    with torch.device(config.device):
        model = prepared.package.Model().to(prepared.dtype).eval()
    prompt = torch.randint(0, model.lm_head.weight.size(0), (1, 128 if config.device == "cuda" else 8),
                           device=config.device)

    def generate():
        with torch.no_grad():
            model.generate(prompt, max_new_tokens=9, cuda_graph=False)

    return profiled(generate, config.device, group_by_shape=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--only", default=DEFAULT_ONLY, help="comma-separated part:model pairs, in order "
                        f"(parts: {', '.join(PARTS)}; models: {', '.join(MODELS)})")
    parser.add_argument("--budget-s", type=float, default=150.0, help="start no part after this many seconds")
    parser.add_argument("--dry-run", action="store_true", help="CPU, tiny presets: checks the script only")
    args = parser.parse_args()
    jobs = [tuple(item.split(":")) for item in args.only.split(",")]
    for job in jobs:
        if len(job) != 2 or job[0] not in PARTS or job[1] not in MODELS:
            raise SystemExit(f"--only: {':'.join(job)!r} is not part:model (parts: {', '.join(PARTS)}; "
                             f"models: {', '.join(MODELS)})")
    device = "cpu" if args.dry_run else "cuda"
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no CUDA device: run on a GPU machine, or pass --dry-run")
    args.out.mkdir(parents=True, exist_ok=True)
    results: dict = {"command": " ".join(["python", *sys.argv]), "device": device_name(device),
                     "torch": torch.__version__, "date": time.strftime("%Y-%m-%d"), "parts": {}}
    started = time.perf_counter()
    for part, name in jobs:
        key = f"{part}_{name}"
        if time.perf_counter() - started > args.budget_s:
            results["parts"][key] = {"skipped": "time budget spent"}
            continue
        with tempfile.TemporaryDirectory() as directory:
            try:
                function = profile_train if part == "train" else profile_decode
                totals, table = function(bench_config(name, args.dry_run), Path(directory))
                results["parts"][key] = totals
                (args.out / f"{key}.txt").write_text(table)
            except Exception as error:  # noqa: BLE001 — one failed part is a finding; the others still run
                results["parts"][key] = {"error": describe_error(error)}
        free_memory(device)
        print(key, results["parts"][key], flush=True)
        (args.out / "profile_step.json").write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
