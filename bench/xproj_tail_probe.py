"""Probe: can a Hymba+ layer's x_proj run in the tail of in_proj_conv, one launch fewer on the Mamba branch?

Session 20's timeline (docs/design.md, "Session 21") has each layer wait on its Mamba branch, ~4 µs longer than its
attention branch, and on that branch x_proj (132 × 3,200, 0.84 MB) takes 3.5 µs plus a ~0.4 µs gap for ~0.2 µs of
bytes: a kernel's fixed cost. x_proj needs the whole conv output (3,200 channels), which in_proj_conv's 3,200 programs
(two in_proj rows each) produce piecewise, so no single program of in_proj_conv can compute it, and the last one to
finish alone would read the 0.84 MB through one SM (~5 µs). This kernel instead makes the **last 132 programs to
finish** x_proj's rows: each program, after its stores, a barrier and an acq_rel increment of a counter (the
ordering of kernels/combine_projections.py), draws a ticket; a program whose ticket is among the last 132 loads its
x_proj row (weights: they need no input), polls the counter (an atomic read with acquire) until every program has
arrived, then reads the conv output from L2 (.cg), takes the dot product and stores its row; the last of them zeroes
the counters for the next launch. Spinning cannot deadlock: the programs still running hold or will get SM slots,
since the spinners take 132 of the GPU's thousands.

It cannot run under Triton's interpreter (programs run one after another there, so the first spinner would wait
forever): `--dry-run` checks the plumbing with the two-launch path only, and `--compile-only` compiles the kernel for
sm_90 on a CPU (bench/sm90_audit.py's driver stub) and prints its registers.

On the GPU it checks, then times (CUDA graphs, Hymba+'s shapes, 8 weight sets so L2 holds none):
- `two_launches`: in_proj_conv (archgen_kernels.in_proj_conv, the model's kernel) then x_proj's GEMV, as today;
- `tail_backoff<ns>`: this kernel, one launch, its spinners pausing 0, 100 or 400 ns between reads.
y and z must equal the model's kernel bit for bit (the same code), x_proj's rows equal the GEMV's within rounding (the
tail sums in another order), over repeated launches (the counters reset).

    cd bench && python xproj_tail_probe.py --out DIR            (GPU)
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
import triton  # noqa: E402
import triton.language as tl  # noqa: E402
from harness import ROOT, command_line, graph_us_per_call, run_metadata  # noqa: E402 - before archgen: the checkout

from archgen.benchmark import copy_bandwidth  # noqa: E402
from archgen.resources import kernels_package  # noqa: E402

kernels_package()  # this checkout's kernels/ folder, as archgen_kernels
from archgen_kernels import gemv, in_proj_conv  # noqa: E402
from archgen_kernels.causal_conv1d import _conv_step_shift  # noqa: E402
from archgen_kernels.gemv import _row_products  # noqa: E402
from archgen_kernels.triton_support import rounded  # noqa: E402

HYMBA = {"d_model": 1600, "d_inner": 3200, "x_proj_rows": 132, "width": 4}
TINY = {"d_model": 16, "d_inner": 32, "x_proj_rows": 6, "width": 4}
WEIGHT_SETS = 8
SMS = 132  # the H200's multiprocessors, which the untuned configs are sized for
BACKOFFS_NS = (0, 100, 400)  # the spinners' pause between reads of the counter


@triton.jit
def _in_proj_conv_x_proj_kernel(x_ptr, w_ptr, y_ptr, z_ptr, N, K, D, stride_wn,
                                conv_w_ptr, conv_w_stride_d, conv_w_stride_k, conv_b_ptr,
                                state_ptr, state_stride_d, state_stride_k,
                                x_proj_w_ptr, x_proj_stride, R, x_proj_ptr, counters_ptr, n_programs,
                                WIDTH: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                                FOLD: tl.constexpr, BLOCK_D: tl.constexpr,
                                BACKOFF_NS: tl.constexpr):  # a spinner's pause between reads of the counter; 0: none
    """One row of x (batch 1): in_proj_conv's product and conv step (its code), then x_proj's R rows in the tail of
    the last R programs to finish (see the module's docstring). counters: int32 (arrived, finished), zero between
    launches."""
    outs = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    outs_inside = outs < N
    p = _row_products(x_ptr, w_ptr, outs, outs_inside, N, K, stride_wn, BLOCK_N, BLOCK_K, FOLD, False, w_ptr, 0.0,
                      False)
    dtype = y_ptr.dtype.element_ty
    p = rounded(p, dtype)
    if tl.program_id(0) * BLOCK_N < D:
        d_in = outs < D
        conv = _conv_step_shift(p, state_ptr + outs * state_stride_d, state_stride_k, conv_w_ptr + outs * conv_w_stride_d,
                                conv_w_stride_k, conv_b_ptr, outs, d_in, True, True, WIDTH, dtype)
        tl.store(y_ptr + outs, conv.to(dtype), mask=d_in)
    tl.store(z_ptr + (outs - D), p, mask=outs_inside & (outs >= D))
    tl.debug_barrier()  # every thread's stores before the increment
    ticket = tl.atomic_add(counters_ptr, 1, sem="acq_rel", scope="gpu")
    row = ticket - (n_programs - R)
    if row >= 0:  # among the last R to arrive: x_proj's row `row`
        cols = tl.arange(0, BLOCK_D)
        weights = tl.load(x_proj_w_ptr + row * x_proj_stride + cols, mask=cols < D, other=0.0)  # before the wait
        arrived = ticket + 1
        while arrived < n_programs:
            if BACKOFF_NS > 0:  # fewer reads of the counter's line while the others' increments land there
                tl.inline_asm_elementwise(f"nanosleep.u32 {BACKOFF_NS}; mov.u32 $0, $1;", "=r,r", [arrived],
                                          dtype=tl.int32, is_pure=False, pack=1)
            arrived = tl.atomic_add(counters_ptr, 0, sem="acquire", scope="gpu")
        conv_out = tl.load(y_ptr + cols, mask=cols < D, other=0.0, cache_modifier=".cg")
        tl.store(x_proj_ptr + row, tl.sum(weights.to(tl.float32) * conv_out.to(tl.float32), 0).to(dtype))
        finished = tl.atomic_add(counters_ptr + 1, 1, sem="acq_rel", scope="gpu")
        if finished == R - 1:  # every row stored and no program reads the counters again
            tl.store(counters_ptr, 0)
            tl.store(counters_ptr + 1, 0)


def tail_launch(x, w, conv_w, conv_b, state, x_proj_w, counters, config, backoff_ns: int = 0):
    """x (1, K) -> (y (1, D), z (1, N - D), x_proj (1, R)) in one launch; state (1, D, W-1) shifted in place."""
    (N, K), (D, width), R = w.shape, conv_w.shape, x_proj_w.shape[0]
    y = torch.empty((1, D), device=x.device, dtype=x.dtype)
    z = torch.empty((1, N - D), device=x.device, dtype=x.dtype)
    x_proj = torch.empty((1, R), device=x.device, dtype=x.dtype)
    n_programs = triton.cdiv(N, config["BLOCK_N"])
    if R > n_programs:
        raise ValueError(f"x_proj's {R} rows need as many of in_proj's {n_programs} programs")
    _in_proj_conv_x_proj_kernel[(n_programs,)](
        x, w, y, z, N, K, D, w.stride(0), conv_w, conv_w.stride(0), conv_w.stride(1), conv_b,
        state, state.stride(1), state.stride(2), x_proj_w, x_proj_w.stride(0), R, x_proj, counters, n_programs,
        WIDTH=width, BLOCK_N=config["BLOCK_N"], BLOCK_K=config["BLOCK_K"], FOLD=8,
        BLOCK_D=triton.next_power_of_2(D), BACKOFF_NS=backoff_ns, num_warps=config["num_warps"])
    return y, z, x_proj


def two_launches(x, w, conv_w, conv_b, state, x_proj_w):
    """The model's step today, at an untuned package's configs: in_proj_conv's kernel, then x_proj's GEMV."""
    (N, K), (R, D) = w.shape, x_proj_w.shape
    y, z = in_proj_conv.in_proj_conv_step_forward(x.view(1, 1, -1), w, None, conv_w, conv_b, state, True,
                                                  config=gemv.shape_config(N, K, 1, SMS))
    x_proj = gemv.gemv_forward(y.view(1, -1), x_proj_w, config=gemv.shape_config(R, D, 1, SMS))
    return y.view(1, -1), z.view(1, -1), x_proj


def make_inputs(shape: dict, device: str, seed: int):
    g = torch.Generator(device="cpu").manual_seed(seed)

    def rand(*size, scale=1.0):
        return (torch.randn(*size, generator=g) * scale).to(device=device, dtype=torch.bfloat16)

    d, inner, rows, width = shape["d_model"], shape["d_inner"], shape["x_proj_rows"], shape["width"]
    return {"x": rand(1, d), "w": rand(2 * inner, d, scale=d**-0.5), "conv_w": rand(inner, width, scale=0.5),
            "conv_b": rand(inner, scale=0.1), "state": rand(1, inner, width - 1),
            "x_proj_w": rand(rows, inner, scale=inner**-0.5)}


def check(shape: dict, device: str, config: dict, launches: int = 5) -> dict:
    """The tail kernel against the two launches, over `launches` launches of each backoff on one counter (so its
    reset is exercised)."""
    counters = torch.zeros(2, dtype=torch.int32, device=device)
    inputs = make_inputs(shape, device, 0)
    worst = 0.0
    for launch in range(launches * len(BACKOFFS_NS)):
        state_two = inputs["state"].clone()
        y2, z2, x_proj2 = two_launches(inputs["x"], inputs["w"], inputs["conv_w"], inputs["conv_b"], state_two,
                                       inputs["x_proj_w"])
        y, z, x_proj = tail_launch(inputs["x"], inputs["w"], inputs["conv_w"], inputs["conv_b"], inputs["state"],
                                   inputs["x_proj_w"], counters, config, BACKOFFS_NS[launch % len(BACKOFFS_NS)])
        if not (torch.equal(y, y2) and torch.equal(z, z2) and torch.equal(inputs["state"], state_two)):
            raise AssertionError("the tail kernel's in_proj_conv part differs from the model's kernel")
        worst = max(worst, ((x_proj.float() - x_proj2.float()).abs().max() / x_proj2.float().abs().max()).item())
    return {"launches": launches * len(BACKOFFS_NS), "x_proj_relative_error": worst, "counters_after": counters.tolist()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True)
    parser.add_argument("--dry-run", action="store_true", help="the two-launch path under the interpreter, tiny shapes")
    parser.add_argument("--compile-only", action="store_true", help="compile the tail kernel for sm_90 on this CPU")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.compile_only:
        print(json.dumps(compile_for_sm90(), indent=2))
        return
    device = "cpu" if args.dry_run else "cuda"
    shape = TINY if args.dry_run else HYMBA
    config = gemv.shape_config(2 * shape["d_inner"], shape["d_model"], 1, SMS)  # in_proj's untuned config
    results = {**run_metadata(command_line(), args.dry_run), "shape": shape, "config": config}
    if args.dry_run:
        inputs = make_inputs(shape, device, 0)
        y, z, x_proj = two_launches(**inputs)
        results["two_launches_shapes"] = [list(y.shape), list(z.shape), list(x_proj.shape)]
    else:
        results["copy_bandwidth_bytes_per_s"] = copy_bandwidth("cuda")
        results["check"] = check(shape, device, config)
        sets = [make_inputs(shape, device, seed) for seed in range(WEIGHT_SETS)]
        counters = torch.zeros(2, dtype=torch.int32, device=device)
        results["two_launches_us"] = graph_us_per_call(lambda i: two_launches(**sets[i]), WEIGHT_SETS, False)
        for backoff in BACKOFFS_NS:
            results[f"tail_backoff{backoff}_us"] = graph_us_per_call(
                lambda i, backoff=backoff: tail_launch(**sets[i], counters=counters, config=config, backoff_ns=backoff),
                WEIGHT_SETS, False)
        results["in_proj_conv_alone_us"] = graph_us_per_call(
            lambda i: in_proj_conv.in_proj_conv_step_forward(sets[i]["x"].view(1, 1, -1), sets[i]["w"], None,
                                                             sets[i]["conv_w"], sets[i]["conv_b"], sets[i]["state"],
                                                             True, config=config), WEIGHT_SETS, False)
    (out / "xproj_tail_probe.json").write_text(json.dumps(results, indent=2))
    print(json.dumps({k: v for k, v in results.items() if k.endswith("_us") or k == "check"}))


def compile_for_sm90() -> dict:
    """Compile the tail kernel at Hymba+'s shapes for sm_90 with bench/sm90_audit.py's driver stub (launches nothing)."""
    sys.path.insert(0, str(ROOT / "bench"))
    import sm90_audit

    sm90_audit.install_driver()
    inputs = make_inputs(HYMBA, "cpu", 0)
    config = gemv.shape_config(2 * HYMBA["d_inner"], HYMBA["d_model"], 1, SMS)
    for backoff in BACKOFFS_NS:
        tail_launch(**inputs, counters=torch.zeros(2, dtype=torch.int32), config=config, backoff_ns=backoff)
    return {"config": config, "launches": [{k: v for k, v in vars(row).items() if k not in ("cases", "constexprs")}
                                            for row in sm90_audit.RECORDER.rows]}


if __name__ == "__main__":
    sys.exit(main())
