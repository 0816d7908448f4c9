"""Does the Triton selective scan speed up a generated model, and does it change what the model computes?

A Mamba-1-heavy seed (specs/nexus.yaml at its full preset: 48 layers, 40 of them Mamba-1 with d_inner 1024,
d_state 16), built by archgen, run in bfloat16 on one GPU twice with the same weights and inputs: once with the
generated package's Triton kernel (model.USE_KERNELS = True, what a user gets) and once with its reference ops
(USE_KERNELS = False, the pure-PyTorch chunked scan). The peer is therefore the package's own reference path,
measured in the same run:
  forward    no grad, batch 4 x 2048: tokens/s each way, the ratio, and max |Δ logits| / max |logits|
  training   forward + backward of the next-token loss, batch 2 x 2048, with gradient checkpointing on both sides
             (the reference path keeps (B, T, D, N) float32 tensors per layer for autograd, which without
             checkpointing does not fit): tokens/s each way, the ratio, the losses, and the relative difference
             of every parameter's gradient (worst and median); --dtype float32 separates the kernel's agreement
             from bfloat16 rounding
The Titans memory and the symbolic module are dropped (memory=null, symbolic=null) and the JEPA head too
(heads={}): this measures the backbone the kernel serves.

    python bench/kernel_in_model.py --out bench/results/kernel_in_model.h100.json
    TRITON_INTERPRET=1 ARCHGEN_TRITON_ON_CPU=1 python bench/kernel_in_model.py --smoke --out /tmp/m.json   # on a CPU
"""

from __future__ import annotations

import argparse
import json
import tempfile
import traceback
from pathlib import Path

import torch
from harness import ROOT, command_line, median_ms, run_metadata

from archgen.testing import relative_error

OVERRIDES = ("heads={}", "memory=null", "symbolic=null")
SIZES = {"device": "cuda", "preset": None, "forward": (4, 2048), "train": (2, 2048), "warmup": 1, "iters": 3}
SMOKE = {"device": "cpu", "preset": "tiny", "forward": (1, 16), "train": (1, 16), "warmup": 0, "iters": 1,
         "overrides": ("model.d_model=32", "layout.n_layers=8")}  # the interpreter runs ~5 s per scan at width 256


def build(preset: str | None, out_root: Path, extra_overrides: tuple[str, ...] = ()):
    from archgen.testing import build_generated

    return build_generated(ROOT / "specs/nexus.yaml", out_root, preset, OVERRIDES + extra_overrides)[0]


def timed_ms(fn, sizes) -> float:
    """Median ms of fn after warm-up calls (the first one also autotunes)."""
    return median_ms(fn, sizes["device"], sizes["iters"], sizes["warmup"])


def compare_forward(package, model, sizes) -> dict:
    batch, length = sizes["forward"]
    tokens = torch.randint(0, 32000 if sizes["preset"] is None else 256, (batch, length), device=sizes["device"])
    entry = {"batch": batch, "length": length}
    logits = {}
    for use in (True, False):
        package.model.USE_KERNELS = use
        with torch.no_grad():
            logits[use] = model(tokens).logits
            ms = timed_ms(lambda: model(tokens), sizes)
        entry["kernel" if use else "reference"] = {"ms": ms, "tokens_per_s": batch * length / (ms / 1e3)}
    entry["speedup_kernel_over_reference"] = entry["reference"]["ms"] / entry["kernel"]["ms"]
    entry["logits_relative_difference"] = relative_error(logits[True], logits[False])
    return entry


def compare_training(package, model, sizes) -> dict:
    batch, length = sizes["train"]
    vocab = 32000 if sizes["preset"] is None else 256
    tokens = torch.randint(0, vocab, (batch, length + 1), device=sizes["device"])
    model.train()
    model.gradient_checkpointing = True
    entry = {"batch": batch, "length": length, "gradient_checkpointing": True}
    losses, grads = {}, {}

    def step():
        model.zero_grad(set_to_none=True)
        loss = model(tokens[:, :-1], targets=tokens[:, 1:]).loss
        loss.backward()
        return loss

    for use in (True, False):
        package.model.USE_KERNELS = use
        losses[use] = step().item()
        grads[use] = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
        ms = timed_ms(step, sizes)
        entry["kernel" if use else "reference"] = {"ms": ms, "tokens_per_s": batch * length / (ms / 1e3),
                                                   "loss": losses[use]}
        if sizes["device"] == "cuda":
            entry["kernel" if use else "reference"]["peak_memory_gib"] = torch.cuda.max_memory_allocated() / 2**30
            torch.cuda.reset_peak_memory_stats()
    entry["speedup_kernel_over_reference"] = entry["reference"]["ms"] / entry["kernel"]["ms"]
    entry["loss_difference"] = abs(losses[True] - losses[False])
    differences = {n: relative_error(grads[True][n], grads[False][n]) for n in grads[True]}
    worst = max(differences, key=differences.get)
    entry["worst_gradient_relative_difference"] = {"parameter": worst, "value": differences[worst]}
    entry["median_gradient_relative_difference"] = sorted(differences.values())[len(differences) // 2]
    model.eval()
    return entry


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--smoke", action="store_true",
                        help="tiny preset on the CPU (set TRITON_INTERPRET=1 ARCHGEN_TRITON_ON_CPU=1)")
    parser.add_argument("--only", choices=("forward", "training"), help="run one section")
    parser.add_argument("--dtype", choices=("bfloat16", "float32"), default="bfloat16", help="model dtype on the GPU")
    parser.add_argument("--batch", type=int, help="batch of both sections (default: 4 forward, 2 training)")
    args = parser.parse_args()
    sizes = dict(SMOKE if args.smoke else SIZES)
    if args.batch:
        sizes["forward"], sizes["train"] = (args.batch, sizes["forward"][1]), (args.batch, sizes["train"][1])
    dtype = torch.float32 if args.smoke else getattr(torch, args.dtype)
    torch.manual_seed(0)
    results = {
        **run_metadata(command_line(), dry_run=args.smoke),
        "device": torch.cuda.get_device_name() if sizes["device"] == "cuda" else "cpu",
        "spec": "specs/nexus.yaml" + (f" --preset {sizes['preset']}" if sizes["preset"] else "")
                + "".join(f" --set {o}" for o in OVERRIDES + sizes.get("overrides", ())),
        "dtype": str(dtype).removeprefix("torch."),
    }
    with tempfile.TemporaryDirectory() as tmp:
        package = build(sizes["preset"], Path(tmp), sizes.get("overrides", ()))
        if package.kernels.selective_scan is None:
            raise SystemExit("triton could not be imported: the generated package has no kernel to compare")
        with torch.device(sizes["device"]):
            model = package.Model()
        model = model.to(dtype).eval()
        if sizes["device"] == "cpu":  # the kernel runs on CPU tensors only in Triton's interpreter
            package.model.use_kernel = lambda kernel, x: package.model.USE_KERNELS and kernel is not None
        for name, section in (("forward", compare_forward), ("training", compare_training)):
            if args.only not in (None, name):
                continue
            try:
                results[name] = section(package, model, sizes)
            except Exception as error:  # one section failing keeps the other's figures
                results[name] = {"error": f"{type(error).__name__}: {error}"[:2000],
                                 "trace": traceback.format_exc()[-3000:]}
            args.out.write_text(json.dumps(results, indent=2) + "\n")
            print(json.dumps({name: results[name]}, indent=2), flush=True)


if __name__ == "__main__":
    main()
