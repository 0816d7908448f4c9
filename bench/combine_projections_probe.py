"""Probe: the end of a Hymba+ layer's decoding step with the parallel combine in the epilogue of the branches' output
projections (kernels/combine_projections.py) against what a package runs now: o_proj's and out_proj's GEMVs on two
streams, then normalized_mean_add_norm, each followed by the feed-forward (the SwiGLU GEMV, then the down
projection with the residual add), at every config the probe lists for the new kernel.

Each variant is timed from one CUDA graph over enough copies of the weights that L2 holds none of them
(harness.graph_us_per_call), at batch 1, bf16; the branches fork onto a side stream and join as the generated mixer's
do (ops/decoding.py branch_stream), so the projections run side by side.

    python bench/combine_projections_probe.py --out DIR             (GPU)
    python bench/combine_projections_probe.py --out DIR --dry-run   (CPU interpreter, small shapes: the plumbing)
"""

from __future__ import annotations

import argparse
import contextlib
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
from archgen.resources import kernels_package  # noqa: E402

kernels_package()  # this checkout's kernels/ folder, as archgen_kernels
from archgen_kernels import combine_projections, gemv, normalized_mean  # noqa: E402

STREAM_BYTES = 256 * 2**20
CONFIGS = [{"BLOCK_N": n, "BLOCK_K": k, "num_warps": w}
           for n, k, w in ((1, 2048, 8), (2, 2048, 8), (4, 2048, 8), (2, 1024, 8), (4, 1024, 8), (8, 1024, 8),
                           (2, 2048, 4), (4, 1024, 4))]


class Fork:
    """The side stream of branch 0, as branch_stream records it: waits for the current stream, joined back after."""

    def __init__(self, device: str):
        self.side = torch.cuda.Stream() if device == "cuda" else None

    @contextlib.contextmanager
    def branch(self):
        if self.side is None:
            yield
            return
        origin = torch.cuda.current_stream()
        self.side.wait_stream(origin)
        with torch.cuda.stream(self.side):
            yield
        self.join = lambda: origin.wait_stream(self.side)

    def joined(self):
        if self.side is not None:
            self.join()


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--dry-run", action="store_true")
    args = parser.parse_args()
    dry = args.dry_run
    device = "cpu" if dry else "cuda"
    dtype = torch.float32 if dry else torch.bfloat16
    D, INNER, H = (40, 72, 96) if dry else (1600, 3200, 5504)  # Hymba+: d_model, Mamba's d_inner, the SwiGLU's width
    g = torch.Generator(device=device).manual_seed(0)

    def rand(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g, device=device) * scale).to(dtype)

    layer_bytes = 2 * (D * D + D * INNER + 3 * D * H)
    copies = 2 if dry else max(2, -(-STREAM_BYTES // layer_bytes))
    layers = [{"o": rand(D, D, scale=D ** -0.5), "out": rand(D, INNER, scale=0.2 * INNER ** -0.5),
               "gate": rand(H, D, scale=D ** -0.5), "up": rand(H, D, scale=D ** -0.5),
               "down": rand(D, H, scale=H ** -0.5)} for _ in range(copies)]
    x_attn, x_ssm, residual = rand(1, D, scale=3), rand(1, INNER), rand(1, D, scale=4)
    vectors = [(1 + torch.randn(D, generator=g, device=device) / 2).to(dtype) for _ in range(5)]
    fork = Fork(device)

    def ffn(layer, h, s, with_ffn):
        if not with_ffn:
            return h
        return gemv.residual_linear(gemv.swiglu_linear(h, layer["gate"], layer["up"]), layer["down"], None, s)

    def separate(i, with_ffn=True):  # what a package launches now
        layer = layers[i]
        with fork.branch():
            a = gemv.linear(x_attn, layer["o"])
        b = gemv.linear(x_ssm, layer["out"])
        fork.joined()
        h, s = normalized_mean.normalized_mean_add_norm(a, b, *vectors[:4], 1e-6, residual, vectors[4], 1e-5)
        return ffn(layer, h, s, with_ffn)

    def combined(i, config=None, with_ffn=True):
        layer = layers[i]
        a, b, h, s = (torch.empty_like(residual) for _ in range(4))
        arrivals = combine_projections.arrival_counter(residual.device)
        common = (a, b, *vectors[:4], 1e-6, residual, vectors[4], 1e-5, h, s, arrivals)
        with fork.branch():
            combine_projections.combining_linear_forward(x_attn, layer["o"], a, *common, config=config)
        combine_projections.combining_linear_forward(x_ssm, layer["out"], b, *common, config=config)
        fork.joined()
        return ffn(layer, h, s, with_ffn)

    result = {"meta": run_metadata(command_line(), dry), "D": D, "d_inner": INNER, "H": H, "copies": copies,
              "default_configs": {"o_proj": combine_projections.launch_config(D, D),
                                  "out_proj": combine_projections.launch_config(D, INNER)},
              "us": {}, "max_abs_diff_vs_separate": {}}
    if not dry:
        result["copy_TBps"] = copy_bandwidth(device) / 1e12
    expected = separate(0, with_ffn=False)
    timings = {"separate+ffn": separate, "separate": lambda i: separate(i, with_ffn=False)}
    for config in (None, *CONFIGS):
        name = "combined" if config is None else "combined[" + ",".join(f"{k}={v}" for k, v in config.items()) + "]"
        got = combined(0, config, with_ffn=False)
        if device == "cuda":
            torch.cuda.synchronize()
        result["max_abs_diff_vs_separate"][name] = (got.double() - expected.double()).abs().max().item()
        timings[name + "+ffn"] = lambda i, c=config: combined(i, c)
        timings[name] = lambda i, c=config: combined(i, c, with_ffn=False)
    for name, fn in timings.items():
        result["us"][name] = graph_us_per_call(fn, copies, dry, rep_ms=40)
        print(f"{name}: {result['us'][name]:.2f} us", flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "combine_projections_probe.json").write_text(json.dumps(result, indent=1) + "\n")
    worst = max(result["max_abs_diff_vs_separate"].values())
    print("max |combined - separate| of h:", worst, "of", expected.abs().max().item())
    if worst > (1e-4 if dry else 0.05) * expected.abs().max().item():
        raise SystemExit(f"the combined pair is off the separate launches: {result['max_abs_diff_vs_separate']}")


if __name__ == "__main__":
    main()
