"""Probe: Hymba+'s decoding feed-forward with the parallel combine in the gate/up GEMV's prologue
(kernels/combine_swiglu.py, one launch) against the two launches a package ran before it (normalized_mean_add_norm,
then swiglu_linear), each followed by the down projection with the residual add, at every config of the new kernel;
and what a norm launch adds in front of a GEMV (rms_norm then in_proj's GEMV, against the GEMV alone), the figure that
says whether folding the mixer's norm into its first GEMVs is worth building.

Each variant is timed from one CUDA graph over enough copies of the weights that L2 holds none of them
(harness.graph_us_per_call), at batch 1, bf16.

    python bench/combine_probe.py --out DIR             (GPU)
    python bench/combine_probe.py --out DIR --dry-run   (CPU interpreter, small shapes: the plumbing and the sums)
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

if "--dry-run" in sys.argv:
    os.environ["TRITON_INTERPRET"] = "1"
    os.environ["ARCHGEN_TRITON_ON_CPU"] = "1"

import torch  # noqa: E402
from harness import command_line, graph_us_per_call, run_metadata  # noqa: E402

from archgen.benchmark import copy_bandwidth  # noqa: E402
from kernels import combine_swiglu, gemv, normalized_mean, rmsnorm  # noqa: E402

STREAM_BYTES = 256 * 2**20


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--dry-run", action="store_true")
    args = parser.parse_args()
    dry = args.dry_run
    device = "cpu" if dry else "cuda"
    dtype = torch.float32 if dry else torch.bfloat16
    D, H, IN_PROJ = (40, 72, 96) if dry else (1600, 5504, 6400)  # Hymba+: d_model, the SwiGLU's width, 2 x d_inner
    g = torch.Generator(device=device).manual_seed(0)

    def rand(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g, device=device) * scale).to(dtype)

    layer_bytes = 3 * D * H * 2
    copies = 2 if dry else max(2, -(-STREAM_BYTES // layer_bytes))
    ffns = [(rand(H, D, scale=D ** -0.5), rand(H, D, scale=D ** -0.5), rand(D, H, scale=H ** -0.5))
            for _ in range(copies)]
    in_projs = [rand(IN_PROJ, D, scale=D ** -0.5) for _ in range(max(2, -(-STREAM_BYTES // (IN_PROJ * D * 2))))]
    a, b, residual = rand(1, D, scale=3), rand(1, D, scale=0.2), rand(1, D, scale=4)
    vectors = [(1 + torch.randn(D, generator=g, device=device) / 2).to(dtype) for _ in range(5)]
    branches = (a, b, *vectors[:4], 1e-6, vectors[4], 1e-5)  # ops/norm.py ParallelBranches' order

    def two_launches(i, down=True):
        gate, up, down_w = ffns[i]
        h, s = normalized_mean.normalized_mean_add_norm(*branches[:7], residual, *branches[7:])
        hidden = gemv.swiglu_linear(h, gate, up)
        return gemv.residual_linear(hidden, down_w, None, s) if down else hidden

    def one_launch(i, config=None, down=True):
        gate, up, down_w = ffns[i]
        hidden, s = combine_swiglu.combined_swiglu_forward(*branches, residual, gate, up, None, None, config=config)
        return gemv.residual_linear(hidden, down_w, None, s) if down else hidden

    result = {"meta": run_metadata(command_line(), dry), "D": D, "H": H, "in_proj_rows": IN_PROJ, "copies": copies,
              "ffn_MB": layer_bytes / 1e6, "us": {}, "max_abs_diff_vs_two_launches": {}}
    if not dry:
        result["copy_TBps"] = copy_bandwidth(device) / 1e12
    expected = two_launches(0)
    timings = {"two_launches+down": lambda i: two_launches(i), "two_launches": lambda i: two_launches(i, down=False)}
    for config in (None, *combine_swiglu.CONFIGS):
        name = "one_launch" if config is None else "one_launch[" + ",".join(f"{k}={v}" for k, v in config.items()) + "]"
        got = one_launch(0, config)
        result["max_abs_diff_vs_two_launches"][name] = (got.double() - expected.double()).abs().max().item()
        timings[name + "+down"] = lambda i, c=config: one_launch(i, c)
        timings[name] = lambda i, c=config: one_launch(i, c, down=False)
    x = rand(1, D)
    timings["in_proj_gemv"] = lambda i: gemv.linear(x, in_projs[i])
    timings["rms_norm+in_proj_gemv"] = lambda i: gemv.linear(rmsnorm.rms_norm(x, vectors[4], 1e-5), in_projs[i])
    for name, fn in timings.items():
        calls = len(in_projs) if "in_proj" in name else copies
        result["us"][name] = graph_us_per_call(fn, calls, dry, rep_ms=40)
        print(f"{name}: {result['us'][name]:.2f} us", flush=True)
    result["default_config"] = combine_swiglu.launch_config(H, D, 1, 2 if dry else torch.cuda.get_device_properties(
        0).multi_processor_count)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "combine_probe.json").write_text(json.dumps(result, indent=1) + "\n")
    worst = max(result["max_abs_diff_vs_two_launches"].values())
    print("max |one - two launches|:", worst, "of", expected.abs().max().item())
    if worst > (1e-4 if dry else 0.05) * expected.abs().max().item():
        raise SystemExit(f"one launch is off the two: {result['max_abs_diff_vs_two_launches']}")


if __name__ == "__main__":
    main()
