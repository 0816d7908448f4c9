"""`archgen train` on GPUs: single-GPU throughput with torch.compile, and 1 GPU against 2 (FSDP2) at the same batch.

Everything runs through the command line a user runs (`python -m archgen train`, `torchrun … -m archgen train`), on
the documentation topics that ship with Python (pydoc_data), bytes as tokens (the spec's vocabulary is set to 256).

  compiled     bench/specs/bamba_1b.yaml, torch.compile, bf16 autocast, AdamW fused, batch 4 × 2048, `--steps` steps
               on GPU 0: tokens/s and MFU (3 × the cost model's forward FLOPs per token, over the bf16 peak) from
               the run's metrics.jsonl, past the first 20% of steps (compilation and warm-up)
  one_gpu      the same model eager, global batch 8 × 2048 as micro-batch 8 on one GPU …
  two_gpus     … and as micro-batch 4 on each of 2 GPUs (torchrun, FSDP2 with bf16 mixed precision): the loss of
               every step side by side (max and mean |Δ|), tokens/s each, scaling efficiency = tps₂ / (2 · tps₁)
  resume_2_to_1  the 2-GPU run stopped at half its steps (a torch.distributed.checkpoint), resumed on ONE GPU
               without torchrun to the end: its losses after the resume against the straight 2-GPU run's

    python bench/train_gpu.py --out $OUT                  # on a machine with 2 GPUs (about 6 minutes)
    python bench/train_gpu.py --dry-run --out /tmp/bench  # on a CPU: tiny HSPMN, gloo, a few steps (checks the plumbing)

Writes $OUT/train_gpu.json (after every part, so a timeout keeps what finished) and each run's directory.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import time
import traceback
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]

GPU = {"spec": str(ROOT / "bench/specs/bamba_1b.yaml"), "preset": None, "set": ["model.vocab_size=256"], "seq_len": 2048,
       "device": "cuda"}
DRY = {"spec": str(ROOT / "specs/hspmn.yaml"), "preset": "tiny", "set": [], "seq_len": 32, "device": "cpu"}


def write_data(work: Path) -> Path:
    from pydoc_data import topics

    path = work / "pydoc_topics.jsonl"
    path.write_text("".join(json.dumps({"text": text}) + "\n" for text in topics.topics.values()))
    return path


def recipe(work: Path, name: str, config: dict, data: Path, steps: int, micro: int, tokens: int, compile_: bool) -> Path:
    body = {
        "schema_version": 1,
        "spec": {"path": config["spec"], "preset": config["preset"], "set": config["set"]},
        "data": {"train": [str(data)], "validation": {"fraction": 0.05}, "seq_len": config["seq_len"],
                 "cache_dir": str(work / "cache")},
        "tokenizer": {"kind": "bytes"},
        "optimizer": {"lr": 1.0e-3, "weight_decay": 0.1},
        "schedule": {"kind": "cosine", "warmup_steps": max(1, steps // 10), "min_lr_ratio": 0.1},
        "batch": {"tokens": tokens, "micro_batch": micro},
        "steps": steps,
        "compile": compile_,
        "eval": {"interval": steps, "batches": 2},
        "checkpoint": {"interval": 0, "keep": 1},
        "log_interval": 1,
        "seed": 0,
        "output": str(work / name),
    }
    path = work / f"{name}.yaml"
    path.write_text(yaml.safe_dump(body, sort_keys=False))
    return path


def run(command: list[str], env: dict | None = None, timeout: float = 540) -> float:
    started = time.perf_counter()
    done = subprocess.run(command, cwd=ROOT, env={**os.environ, **(env or {})}, capture_output=True, text=True, timeout=timeout,
                          check=False)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} exited {done.returncode}:\n{done.stderr[-4000:]}")
    return time.perf_counter() - started


def train_command(recipe_path: Path, processes: int, extra: list[str] = ()) -> list[str]:
    if processes == 1:
        return [sys.executable, "-m", "archgen", "train", str(recipe_path), "--no-progress", *extra]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={processes}",
            "-m", "archgen", "train", str(recipe_path), "--no-progress", *extra]


def metrics(run_dir: Path) -> tuple[list[dict], list[dict]]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return [r for r in rows if "loss" in r], [r for r in rows if "eval_loss" in r]


def throughput(rows: list[dict]) -> dict:
    steady = rows[max(1, len(rows) // 5):] or rows
    summary = {"tokens_per_s": statistics.median(r["tokens_per_s"] for r in steady),
               "peak_memory_gib": max(r["memory_gib"] for r in rows), "steps_measured": len(steady)}
    if "mfu" in steady[0]:
        summary["mfu"] = statistics.median(r["mfu"] for r in steady)
    summary["model_flops_per_s"] = statistics.median(r["flops_per_s"] for r in steady)
    return summary


def compare(a: list[dict], b: list[dict], key: str = "next_token_loss") -> dict:
    by_step = {r["step"]: r[key] for r in a}
    deltas = [abs(by_step[r["step"]] - r[key]) for r in b if r["step"] in by_step]
    return {"steps_compared": len(deltas), "max_abs_delta": max(deltas), "mean_abs_delta": sum(deltas) / len(deltas),
            "final": [a[-1][key], b[-1][key]]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "bench-out")))
    parser.add_argument("--dry-run", action="store_true", help="CPU, tiny HSPMN, gloo: checks the plumbing in a few minutes")
    parser.add_argument("--steps", type=int, default=None, help="steps of the compiled single-GPU run (default 200)")
    parser.add_argument("--skip", default="", help="comma-separated parts to skip: compiled, scaling")
    args = parser.parse_args()
    config = DRY if args.dry_run else GPU
    out = args.out
    work = out / "train_gpu"
    work.mkdir(parents=True, exist_ok=True)
    data = write_data(work)
    env = {"CUDA_VISIBLE_DEVICES": "0"} if not args.dry_run else {}
    device = [] if not args.dry_run else ["--device", "cpu"]
    result: dict = {"when": datetime.datetime.now(datetime.timezone.utc).isoformat(), "host": platform.node(),
                    "dry_run": args.dry_run, "spec": config["spec"], "set": config["set"], "seq_len": config["seq_len"]}
    try:
        import torch

        result["torch"] = torch.__version__
        result["gpus"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    except Exception as error:  # noqa: BLE001 (recorded, not fatal)
        result["torch_error"] = repr(error)
    report = out / "train_gpu.json"

    def save():
        report.write_text(json.dumps(result, indent=2) + "\n")

    skip = set(filter(None, args.skip.split(",")))
    seq = config["seq_len"]
    if "compiled" not in skip:
        steps = args.steps or (4 if args.dry_run else 200)
        try:
            path = recipe(work, "compiled", config, data, steps, 4, 4 * seq, compile_=not args.dry_run)
            seconds = run(train_command(path, 1, device), env)
            rows, evals = metrics(work / "compiled")
            result["compiled"] = {"steps": steps, "batch": [4, seq], "wall_s": seconds, **throughput(rows),
                                  "first_loss": rows[0]["next_token_loss"], "last_loss": rows[-1]["next_token_loss"],
                                  "eval_loss": evals[-1]["eval_loss"]}
        except Exception:  # noqa: BLE001 (each part is reported on its own)
            result["compiled"] = {"error": traceback.format_exc()}
        save()
    if "scaling" not in skip:
        steps = 4 if args.dry_run else 40
        try:
            one = recipe(work, "one_gpu", config, data, steps, 8, 8 * seq, compile_=False)
            result_one = run(train_command(one, 1, device), env)
            two = recipe(work, "two_gpus", config, data, steps, 4, 8 * seq, compile_=False)
            result_two = run(train_command(two, 2, device), {} if not args.dry_run else env)
            rows_one, _ = metrics(work / "one_gpu")
            rows_two, _ = metrics(work / "two_gpus")
            t1, t2 = throughput(rows_one), throughput(rows_two)
            result["one_gpu"] = {"wall_s": result_one, **t1}
            result["two_gpus"] = {"wall_s": result_two, **t2}
            result["scaling_efficiency"] = t2["tokens_per_s"] / (2 * t1["tokens_per_s"])
            result["loss_1_vs_2"] = compare(rows_one, rows_two)
            save()
            split = recipe(work, "resume_2_to_1", config, data, steps, 4, 8 * seq, compile_=False)
            run(train_command(split, 2, [*device, "--stop-after", str(steps // 2)]), {} if not args.dry_run else env)
            checkpoint = max((work / "resume_2_to_1" / "checkpoints").glob("step-*"))
            result["resume_2_to_1"] = {"saved_by": json.loads((checkpoint / "trainer.json").read_text())["world_size"],
                                       "distributed_checkpoint": (checkpoint / "distributed").is_dir()}
            run(train_command(split, 1, [*device, "--resume"]), env)
            rows_resumed, _ = metrics(work / "resume_2_to_1")
            after = [r for r in rows_resumed if r["step"] > steps // 2]
            result["resume_2_to_1"].update(compare(rows_two, after))
        except Exception:  # noqa: BLE001
            result["scaling_error"] = traceback.format_exc()
        save()
    save()
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
