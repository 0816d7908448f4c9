"""`archgen train` on GPUs: single-GPU throughput and MFU with torch.compile, and 1 GPU against 2 (FSDP2) at the same
global batch, with a checkpoint written on 2 GPUs resumed on 1.

Everything runs through the command line a user runs (`python -m archgen train`, `torchrun … -m archgen train`), on
the documentation topics that ship with Python (pydoc_data), bytes as tokens (the spec's vocabulary is set to 256).
Each figure is a ratio against a peer or a floor measured in the same run:

  matmul         the bf16 dense matmul rate of GPU 0 (8192² × 8192 products), measured first: MFU's denominator
  compiled       bench/specs/bamba_1b.yaml, torch.compile, bf16 autocast, AdamW fused, global batch 8 × 2048 (16k
                 tokens) on GPU 0 for `--steps` steps: tokens/s and MFU = 3 × the cost model's forward FLOPs per token ×
                 tokens/s ÷ the measured matmul rate, medians past the first 20% of steps (compilation, warm-up)
  one_gpu        the same model and batch eager on one GPU: the compiled run's peer, and the 2-GPU run's
  two_gpus       the same global batch as micro-batch 4 on each of 2 GPUs (torchrun, FSDP2, bf16 mixed precision):
                 every step's loss against one GPU's (bf16 tolerance), scaling efficiency = tokens/s₂ ÷ (2 · tokens/s₁);
                 it saves a torch.distributed.checkpoint at half its steps
  resume_2_to_1  that checkpoint resumed on ONE GPU without torchrun: its losses after the resume against the
                 straight 2-GPU run's

    python bench/train_gpu.py --out $OUT                 # a machine with 2 GPUs (nvidia-h200-x2), about 300 s
    python bench/train_gpu.py --out $OUT --budget-s 200  # one GPU: the compiled and eager runs (2-GPU parts skipped)
    python bench/train_gpu.py --dry-run --out /tmp/bench # a CPU: tiny HSPMN, gloo, a few steps (checks the plumbing)

A run that reaches its share of --budget-s is stopped and reported with the steps it logged. Writes
$OUT/train_gpu.json after every part (a timeout keeps what finished) and each run's directory under $OUT/train_gpu/.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import signal
import statistics
import subprocess
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

import yaml
from harness import ROOT, median_ms, run_metadata


@dataclass(frozen=True)
class Setup:
    spec: str
    preset: str | None
    overrides: tuple[str, ...]
    seq_len: int
    micro_batch: int  # one GPU's sequences per step; 2 GPUs take half each
    compiled_steps: int
    scaling_steps: int
    compile: bool
    device_args: tuple[str, ...]  # passed to `archgen train`
    matmul_size: int
    # Losses of 1 and 2 processes may differ by this much (relative): bf16 rounds each product to 8 bits of mantissa
    # (2⁻⁸ ≈ 0.4%), and the two runs reduce in a different order, which a few steps of training amplify.
    loss_tolerance: float


GPU = Setup(str(ROOT / "bench/specs/bamba_1b.yaml"), None, ("model.vocab_size=256",), seq_len=2048, micro_batch=8,
            compiled_steps=200, scaling_steps=20, compile=True, device_args=(), matmul_size=8192, loss_tolerance=0.02)
DRY = Setup(str(ROOT / "specs/hspmn.yaml"), "tiny", (), seq_len=32, micro_batch=4, compiled_steps=4, scaling_steps=4,
            compile=False, device_args=("--device", "cpu"), matmul_size=256, loss_tolerance=0.02)


def write_data(work: Path) -> Path:
    from pydoc_data import topics

    path = work / "pydoc_topics.jsonl"
    path.write_text("".join(json.dumps({"text": text}) + "\n" for text in topics.topics.values()))
    return path


def write_recipe(work: Path, name: str, setup: Setup, data: Path, steps: int, micro: int, compile_: bool,
                 checkpoint_interval: int = 0) -> Path:
    body = {
        "schema_version": 1,
        "spec": {"path": setup.spec, "preset": setup.preset, "set": list(setup.overrides)},
        "data": {"train": [str(data)], "validation": {"fraction": 0.05}, "seq_len": setup.seq_len,
                 "cache_dir": str(work / "cache")},
        "tokenizer": {"kind": "bytes"},
        "optimizer": {"lr": 3.0e-4, "weight_decay": 0.1},
        "schedule": {"kind": "cosine", "warmup_steps": max(1, steps // 10), "min_lr_ratio": 0.1},
        "batch": {"tokens": setup.micro_batch * setup.seq_len, "micro_batch": micro},
        "steps": steps,
        "compile": compile_,
        "eval": {"interval": steps, "batches": 1},
        "checkpoint": {"interval": checkpoint_interval, "keep": 2},
        "log_interval": 1,
        "seed": 0,
        "output": str(work / name),
    }
    path = work / f"{name}.yaml"
    path.write_text(yaml.safe_dump(body, sort_keys=False))
    return path


def train_command(recipe: Path, processes: int, setup: Setup, extra: tuple[str, ...] = ()) -> list[str]:
    launcher = ([sys.executable] if processes == 1 else
                [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={processes}"])
    return [*launcher, "-m", "archgen", "train", str(recipe), "--no-progress", *setup.device_args, *extra]


@dataclass
class Ran:
    seconds: float
    timed_out: bool  # stopped at its time limit; its metrics hold the steps it logged


def run(command: list[str], timeout: float, env: dict[str, str] | None = None) -> Ran:
    """Run a training command; at `timeout` seconds stop it and every process it started (torchrun's workers)."""
    started = time.perf_counter()
    with subprocess.Popen(command, cwd=ROOT, env={**os.environ, **(env or {})}, stdout=subprocess.DEVNULL,
                          stderr=subprocess.PIPE, text=True, start_new_session=True) as process:
        try:
            _, stderr = process.communicate(timeout=max(1.0, timeout))
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.communicate()
            return Ran(time.perf_counter() - started, True)
    if process.returncode != 0:
        raise RuntimeError(f"{shlex.join(command)} exited {process.returncode}:\n{stderr[-4000:]}")
    return Ran(time.perf_counter() - started, False)


def step_rows(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []
    return [r for r in rows if "loss" in r]


def throughput(rows: list[dict], matmul_flops: float) -> dict:
    """Medians past the first 20% of steps (compilation and allocator warm-up)."""
    if not rows:
        raise RuntimeError("the run logged no step")
    steady = rows[max(1, len(rows) // 5):] or rows
    flops = statistics.median(r["flops_per_s"] for r in steady)
    return {"steps_logged": len(rows), "steps_measured": len(steady),
            "tokens_per_s": statistics.median(r["tokens_per_s"] for r in steady), "model_flops_per_s": flops,
            "mfu": flops / matmul_flops, "peak_memory_gib": max(r["memory_gib"] for r in rows),
            "first_loss": rows[0]["next_token_loss"], "last_loss": rows[-1]["next_token_loss"]}


def compare_losses(reference: list[dict], other: list[dict]) -> dict:
    """Step-by-step next-token losses of two runs over the steps both logged: the largest difference relative to the
    reference's loss at that step."""
    by_step = {r["step"]: r["next_token_loss"] for r in reference}
    pairs = [(by_step[r["step"]], r["next_token_loss"]) for r in other if r["step"] in by_step]
    if not pairs:
        raise RuntimeError("the two runs have no step in common")
    relative = [abs(b - a) / abs(a) for a, b in pairs]
    return {"steps_compared": len(pairs), "max_relative_delta": max(relative),
            "max_abs_delta": max(abs(b - a) for a, b in pairs), "mean_relative_delta": sum(relative) / len(relative),
            "reference_final": pairs[-1][0], "final": pairs[-1][1]}


def matmul_rate(device: str, size: int) -> dict:
    """Dense matmul FLOP/s on `device` (bfloat16 on a GPU, float32 on a CPU): the median of timed products."""
    import torch

    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    seconds = median_ms(lambda: a @ b, device, reps=20, warmup=5) / 1e3  # warm-up: cuBLAS heuristics, clocks
    return {"flops_per_s": 2 * size**3 / seconds, "dtype": str(dtype).removeprefix("torch."), "size": size}


def figure(name: str, value: float, unit: str, peer: str, peer_value: float, ratio: float | None) -> dict:
    return {"figure": name, "value": value, "unit": unit, "peer": peer, "peer_value": peer_value, "ratio": ratio}


def visible_gpus() -> int:
    import torch

    return torch.cuda.device_count()


def headroom(tolerance: float, delta: float) -> float | None:
    """tolerance ÷ difference: above 1 is within the tolerance; None when the runs agree exactly."""
    return tolerance / delta if delta else None


def environment(dry_run: bool) -> dict:
    import torch

    info = {**run_metadata(shlex.join([sys.executable, *sys.argv]), dry_run), "host": platform.node()}
    if torch.cuda.is_available() and not dry_run:
        info["device"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    else:
        info["device"] = [f"cpu ({os.cpu_count()} cores)"]
    return info


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "bench-out")))
    parser.add_argument("--dry-run", action="store_true", help="CPU, tiny HSPMN, gloo: checks the plumbing")
    parser.add_argument("--budget-s", type=float, default=300.0,
                        help="wall-clock seconds for everything; the compiled run may take half")
    parser.add_argument("--steps", type=int, default=None, help="steps of the compiled run (default 200)")
    parser.add_argument("--skip", default="", help="comma-separated parts to skip: compiled, scaling")
    args = parser.parse_args()
    began = time.perf_counter()
    setup = DRY if args.dry_run else GPU
    work = args.out / "train_gpu"
    work.mkdir(parents=True, exist_ok=True)
    data = write_data(work)
    device = "cpu" if args.dry_run else "cuda"
    one_gpu = {} if args.dry_run else {"CUDA_VISIBLE_DEVICES": "0"}
    result: dict = {**environment(args.dry_run), "budget_s": args.budget_s,
                    "spec": setup.spec, "preset": setup.preset, "set": list(setup.overrides),
                    "batch": [setup.micro_batch, setup.seq_len], "loss_tolerance": setup.loss_tolerance, "figures": []}
    report = args.out / "train_gpu.json"

    def save() -> None:
        report.write_text(json.dumps(result, indent=2) + "\n")

    def left() -> float:
        return args.budget_s - (time.perf_counter() - began)

    rate = matmul_rate(device, setup.matmul_size)
    result["matmul"] = rate
    flops = rate["flops_per_s"]
    skip = set(filter(None, args.skip.split(",")))
    compiled = None
    if "compiled" not in skip:
        steps = args.steps or setup.compiled_steps
        try:
            path = write_recipe(work, "compiled", setup, data, steps, setup.micro_batch, setup.compile)
            ran = run(train_command(path, 1, setup), left() / 2, one_gpu)
            compiled = {"steps": steps, "torch_compile": setup.compile, "wall_s": ran.seconds, "timed_out": ran.timed_out,
                        **throughput(step_rows(work / "compiled"), flops)}
            result["figures"].append(figure("compiled training MFU, 1 GPU", compiled["mfu"], "fraction",
                                            "bf16 matmul rate measured in this run (FLOP/s)", flops, compiled["mfu"]))
        except Exception:  # noqa: BLE001 (each part is reported on its own)
            compiled = {"error": traceback.format_exc()}
        result["compiled"] = compiled
        save()
    if "scaling" not in skip:
        steps, half = setup.scaling_steps, setup.scaling_steps // 2
        try:
            path = write_recipe(work, "one_gpu", setup, data, steps, setup.micro_batch, False)
            two_gpu_parts = args.dry_run or visible_gpus() >= 2
            ran = run(train_command(path, 1, setup), left() / 3 if two_gpu_parts else left(), one_gpu)
            rows_one = step_rows(work / "one_gpu")
            one = result["one_gpu"] = {"wall_s": ran.seconds, "timed_out": ran.timed_out, **throughput(rows_one, flops)}
            if compiled and "tokens_per_s" in compiled:
                result["figures"].append(figure("compiled training tokens/s, 1 GPU", compiled["tokens_per_s"], "tokens/s",
                                                "the same model and batch eager, 1 GPU", one["tokens_per_s"],
                                                compiled["tokens_per_s"] / one["tokens_per_s"]))
            save()
            if not two_gpu_parts:
                result["two_gpus"] = {"skipped": f"{visible_gpus()} GPU visible: the 2-GPU parts need 2"}
            else:
                path = write_recipe(work, "two_gpus", setup, data, steps, setup.micro_batch // 2, False, half)
                ran = run(train_command(path, 2, setup), left() / 2)
                rows_two = step_rows(work / "two_gpus")
                two = result["two_gpus"] = {"wall_s": ran.seconds, "timed_out": ran.timed_out, **throughput(rows_two, flops)}
                efficiency = two["tokens_per_s"] / (2 * one["tokens_per_s"])
                result["figures"].append(figure("training tokens/s, 2 GPUs FSDP2", two["tokens_per_s"], "tokens/s",
                                                "2 × one GPU's tokens/s at the same global batch", 2 * one["tokens_per_s"],
                                                efficiency))
                losses = result["loss_1_vs_2"] = compare_losses(rows_one, rows_two)
                delta = losses["max_relative_delta"]
                result["figures"].append(figure("next-token loss, 2 GPUs against 1: largest relative difference", delta,
                                                "fraction", "bf16 tolerance", setup.loss_tolerance,
                                                headroom(setup.loss_tolerance, delta)))
                save()
                checkpoint = work / "two_gpus" / "checkpoints" / f"step-{half:08d}"
                trainer = json.loads((checkpoint / "trainer.json").read_text())
                resumed = result["resume_2_to_1"] = {"checkpoint": str(checkpoint), "saved_by": trainer["world_size"],
                                                     "distributed_checkpoint": (checkpoint / "distributed").is_dir()}
                ran = run(train_command(path, 1, setup, ("--resume-from", str(checkpoint))), left(), one_gpu)
                after = [r for r in step_rows(work / "two_gpus") if r["step"] > half]
                resumed.update({"wall_s": ran.seconds, "timed_out": ran.timed_out, **compare_losses(rows_two, after)})
                delta = resumed["max_relative_delta"]
                result["figures"].append(figure("next-token loss resumed on 1 GPU from 2 GPUs' checkpoint: largest relative "
                                                "difference", delta, "fraction", "bf16 tolerance", setup.loss_tolerance,
                                                headroom(setup.loss_tolerance, delta)))
        except Exception:  # noqa: BLE001
            result["scaling_error"] = traceback.format_exc()
        save()
    result["wall_s"] = time.perf_counter() - began
    save()
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
