"""Probe: what would one launch for both input projections of a Hymba+ layer's decoding step save?

A Hymba+ layer's decoding step starts with two GEMVs side by side on two streams: the attention's q, k and v
(2,240 × 1,600) and Mamba's in_proj (6,400 × 1,600), 27.7 MB of bf16 weights. Each GEMV costs its bytes at the
HBM's rate plus ~2.5 µs of ramp-up and tail (docs/design.md, "Session 15"); two at once pay two ramps, and the later
of the two ends the phase for the branch it feeds. One launch over the 8,640 rows (each program's epilogue chosen by
its rows, in the real kernel) pays one. This probe times the plain GEMVs (kernels/gemv.py, untuned defaults, no
epilogues) at those shapes from CUDA graphs, over 8 distinct weight sets so that L2 holds none:

- `two_streams`: qkv on a side stream beside in_proj on the recording stream, joined (the step's shape today);
- `serial`: qkv then in_proj on one stream;
- `one_launch`: one GEMV over the stacked 8,640 rows.

It writes JSON with each variant's µs per set and the copy bandwidth measured in the run.

    python bench/input_projections_probe.py --out DIR            (GPU)
    python bench/input_projections_probe.py --out DIR --dry-run  (CPU interpreter, tiny shapes: the plumbing)
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
from archgen.resources import kernels_package  # noqa: E402

kernels_package()  # this checkout's kernels/ folder, as archgen_kernels
from archgen_kernels import gemv  # noqa: E402

HYMBA_PLUS = {"qkv_rows": 2240, "in_proj_rows": 6400, "d_model": 1600, "sets": 8}
DRY = {"qkv_rows": 12, "in_proj_rows": 20, "d_model": 32, "sets": 2}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True)
    parser.add_argument("--dry-run", action="store_true")
    args = parser.parse_args()
    device = "cpu" if args.dry_run else "cuda"
    shapes = DRY if args.dry_run else HYMBA_PLUS
    dtype = torch.float32 if args.dry_run else torch.bfloat16
    d, sets = shapes["d_model"], shapes["sets"]
    x = torch.randn(1, d, device=device, dtype=dtype)
    qkv = [torch.randn(shapes["qkv_rows"], d, device=device, dtype=dtype) / d**0.5 for _ in range(sets)]
    in_proj = [torch.randn(shapes["in_proj_rows"], d, device=device, dtype=dtype) / d**0.5 for _ in range(sets)]
    stacked = [torch.cat([a, b]) for a, b in zip(qkv, in_proj, strict=True)]
    side = torch.cuda.Stream() if device == "cuda" else None

    def two_streams(i):
        if side is None:
            return serial(i)
        main = torch.cuda.current_stream()
        side.wait_stream(main)
        with torch.cuda.stream(side):
            first = gemv.gemv_forward(x, qkv[i])
        second = gemv.gemv_forward(x, in_proj[i])
        main.wait_stream(side)
        return first, second

    def serial(i):
        return gemv.gemv_forward(x, qkv[i]), gemv.gemv_forward(x, in_proj[i])

    def one_launch(i):
        return gemv.gemv_forward(x, stacked[i])

    first, second = serial(0)
    together = one_launch(0)
    results = {**run_metadata(command_line(), args.dry_run), "shapes": shapes,
               "copy_bandwidth_bytes_per_s": copy_bandwidth(device),
               "weight_bytes_per_set": stacked[0].numel() * stacked[0].element_size(),
               "one_launch_equals_the_two": bool(torch.equal(together, torch.cat([first, second], dim=-1)))}
    for name, fn in (("two_streams", two_streams), ("serial", serial), ("one_launch", one_launch)):
        results[f"{name}_us"] = graph_us_per_call(fn, sets, args.dry_run, rep_ms=40)
    bandwidth = results["copy_bandwidth_bytes_per_s"]
    results["copy_rate_us"] = results["weight_bytes_per_set"] / bandwidth * 1e6 if bandwidth else None
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "input_projections_probe.json").write_text(json.dumps(results, indent=2))
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
