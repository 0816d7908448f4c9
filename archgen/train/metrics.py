"""What a run reports: a rich progress bar, metrics as JSON lines, and loss / learning-rate curves as a PNG.

MFU is model FLOPs utilisation: 3 × the cost model's forward FLOPs per token (forward + backward ≈ 3 forwards)
times tokens per second, over the device's dense peak. The peak is known for common GPUs in bfloat16 (or given by
ARCHGEN_PEAK_FLOPS); on other devices MFU is not shown, the achieved FLOP/s are.
"""

from __future__ import annotations

import json
import math
import os
import resource
import sys
from pathlib import Path

import torch

# Dense bfloat16 tensor-core peaks (no sparsity), FLOP/s per device.
PEAK_BF16 = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "A10G": 70e12, "L4": 121e12, "B200": 2250e12}


def peak_flops(device: torch.device) -> float | None:
    if os.environ.get("ARCHGEN_PEAK_FLOPS"):
        return float(os.environ["ARCHGEN_PEAK_FLOPS"])
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in PEAK_BF16.items() if key in name), None)


def memory_gib(device: torch.device) -> float:
    """Peak memory so far: the CUDA allocator's on a GPU, the process's resident set on a CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / (2**30 if sys.platform == "darwin" else 2**20)


class MetricsLog:
    """Appends one JSON object per line; the main process only."""

    def __init__(self, path: Path, enabled: bool):
        self.path = path
        self.enabled = enabled
        if enabled:
            path.parent.mkdir(parents=True, exist_ok=True)

    def write(self, record: dict) -> None:
        if self.enabled:
            with self.path.open("a") as out:
                out.write(json.dumps(record) + "\n")


def read_metrics(path: Path, up_to_step: int | None = None) -> list[dict]:
    if not path.exists():
        return []
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [r for r in rows if up_to_step is None or r.get("step", 0) <= up_to_step]


def truncate_metrics(path: Path, after_step: int) -> None:
    """Drop records past a resumed step, so a resumed run's log reads as one run."""
    if path.exists():
        kept = [json.dumps(r) for r in read_metrics(path, after_step)]
        path.write_text("".join(line + "\n" for line in kept))


def plot_curves(metrics_path: Path, output: Path) -> Path | None:
    """Training and held-out loss, and the learning rate, against steps. None when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    rows = read_metrics(metrics_path)
    train = [r for r in rows if "loss" in r]
    held_out = [r for r in rows if "eval_loss" in r]
    figure, (loss_axes, lr_axes) = plt.subplots(1, 2, figsize=(11, 4))
    loss_axes.plot([r["step"] for r in train], [r["next_token_loss"] for r in train], label="train (next token)")
    if any(r["loss"] != r["next_token_loss"] for r in train):
        loss_axes.plot([r["step"] for r in train], [r["loss"] for r in train], label="train (total)", alpha=0.6)
    if held_out:
        loss_axes.plot([r["step"] for r in held_out], [r["eval_loss"] for r in held_out], "o-", label="held out")
    loss_axes.set_xlabel("step")
    loss_axes.set_ylabel("loss (nats/token)")
    loss_axes.legend()
    loss_axes.grid(alpha=0.3)
    lr_axes.plot([r["step"] for r in train], [r["lr"] for r in train])
    lr_axes.set_xlabel("step")
    lr_axes.set_ylabel("learning rate")
    lr_axes.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(output, dpi=100)
    plt.close(figure)
    return output


def format_count(value: float) -> str:
    for unit, size in (("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(value) >= size:
            return f"{value / size:.1f}{unit}"
    return f"{value:.0f}"


def perplexity(loss: float) -> float:
    return math.exp(min(loss, 700.0))
