"""`archgen train` with `cuda_graph: false` against `cuda_graph: true` on one GPU, in one process: the step time of
the eager loop (no host sync between records since session 13) and of the loop replaying one recorded step.

At small shapes a training step is host-bound (Hymba+ at 1 × 512 on an H200: ~3,460 kernel launches, 41 ms of GPU
work in 250-380 ms of wall, session 12). Both variants train the same recipe from the same seed: --model at
micro-batch --micro-batch × --seq-len, 2 micro-batches per step (accumulation, which the recorded step includes),
bf16 autocast, fused AdamW, --steps steps with a record every --log-interval steps (the record's own sync is the
only one). The runs alternate (eager, graphed, eager, graphed, ... --rounds pairs) so drift hits both.

  eager_N, graphed_N  per run: ms per step from each record's window (its synchronised wall ÷ its steps; the
                      first window, which holds warm-up, the recording and Triton's compilation, is left out), the
                      median over the windows, and the logged losses
  ab                  the medians over rounds, speedup = eager ÷ graphed, and the largest relative difference of
                      the two variants' logged losses (the same steps; bf16 autocast: expect ~1e-3 at most)

    python bench/train_graph.py --out $OUT                          # one GPU (nvidia-h200), Hymba+ 1 × 512, ~3 min
    python bench/train_graph.py --out $OUT --model bamba_1b --seq-len 2048
    python bench/train_graph.py --dry-run --out /tmp/bench          # a CPU: tiny Hymba+, checks the plumbing

Writes $OUT/train_graph.json ({"meta", "sections"}) after every section.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
from pathlib import Path

import yaml
from harness import ROOT, Run

MODELS = {  # spec, its --set overrides for a byte vocabulary (as bench/train_gpu.py)
    "hymba_plus": ("specs/hymba_plus.yaml", ["model.vocab_size=256", "heads.forecaster.n_bins=256"]),
    "bamba_1b": ("bench/specs/bamba_1b.yaml", ["model.vocab_size=256"]),
}


def write_recipe(work: Path, name: str, args, data: Path, cuda_graph: bool) -> Path:
    spec, overrides = MODELS[args.model]
    body = {
        "schema_version": 1,
        "spec": {"path": str(ROOT / spec), "preset": "tiny" if args.dry_run else None, "set": [] if args.dry_run else overrides},
        "data": {"train": [str(data)], "validation": {"fraction": 0.05}, "seq_len": args.seq_len,
                 "cache_dir": str(work / "cache")},
        "tokenizer": {"kind": "bytes"},
        "optimizer": {"lr": 3.0e-4, "weight_decay": 0.1},
        "schedule": {"kind": "cosine", "warmup_steps": 2, "min_lr_ratio": 0.1},
        "batch": {"tokens": 2 * args.micro_batch * args.seq_len, "micro_batch": args.micro_batch},
        "steps": args.steps,
        "cuda_graph": cuda_graph,
        "eval": {"interval": args.steps, "batches": 1},
        "log_interval": args.log_interval,
        "seed": 0,
        "output": str(work / name),
    }
    path = work / f"{name}.yaml"
    path.write_text(yaml.safe_dump(body, sort_keys=False))
    return path


def train_once(run: Run, record: dict, args, work: Path, data: Path, name: str, cuda_graph: bool) -> None:
    from archgen.train.loop import train
    from archgen.train.metrics import read_metrics

    result = train(write_recipe(work, name, args, data, cuda_graph), device=run.device, show_progress=False)
    rows = [r for r in read_metrics(result.output_dir / "metrics.jsonl") if "loss" in r]
    tokens_per_step = 2 * args.micro_batch * args.seq_len
    step_ms = [1000 * tokens_per_step / r["tokens_per_s"] for r in rows[1:]]
    record.update({"cuda_graph": cuda_graph, "step_ms_per_window": [round(ms, 2) for ms in step_ms],
                   "step_ms": round(statistics.median(step_ms), 2) if step_ms else None,
                   "losses": [r["loss"] for r in rows], "memory_gib": rows[-1]["memory_gib"] if rows else None})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "bench-out")))
    parser.add_argument("--dry-run", action="store_true", help="CPU, tiny Hymba+: checks the plumbing")
    parser.add_argument("--budget-s", type=float, default=540.0)
    parser.add_argument("--model", choices=sorted(MODELS), default="hymba_plus")
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--micro-batch", type=int, default=1)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--log-interval", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=2, help="eager/graphed pairs")
    args = parser.parse_args()
    if args.dry_run:
        args.seq_len, args.steps, args.log_interval, args.rounds = 16, 6, 2, 1
    run = Run("train_graph", args.out, dry_run=args.dry_run, budget_s=args.budget_s)
    run.meta.update({"model": args.model, "seq_len": args.seq_len, "micro_batch": args.micro_batch, "accumulation": 2,
                     "steps": args.steps, "log_interval": args.log_interval})
    with tempfile.TemporaryDirectory() as scratch:
        work = Path(scratch)
        from train_gpu import write_data

        data, run.meta["data"] = write_data(work, 2_000_000)
        for n in range(1, args.rounds + 1):
            for name, graphed in (("eager", False), ("graphed", True)):
                run.section(f"{name}_{n}", lambda record, name=name, graphed=graphed, n=n: train_once(
                    run, record, args, work, data, f"{name}_{n}", graphed), needs_s=60)

    def ab(record: dict) -> None:
        done = {name: [s["step_ms"] for key, s in run.sections.items() if key.startswith(name) and s.get("step_ms")]
                for name in ("eager", "graphed")}
        eager, graphed = (statistics.median(done[k]) if done[k] else None for k in ("eager", "graphed"))
        record.update({"eager_step_ms": eager, "graphed_step_ms": graphed,
                       "speedup": round(eager / graphed, 3) if eager and graphed else None})
        pairs = [(run.sections.get(f"eager_{n}", {}).get("losses"), run.sections.get(f"graphed_{n}", {}).get("losses"))
                 for n in range(1, args.rounds + 1)]
        record["loss_max_relative_difference"] = max(
            (abs(a - b) / max(abs(a), 1e-12) for x, y in pairs if x and y for a, b in zip(x, y, strict=False)),
            default=None)

    run.section("ab", ab)
    print(yaml.safe_dump(run.sections["ab"], sort_keys=False))


if __name__ == "__main__":
    main()
