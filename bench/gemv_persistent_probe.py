"""Probe: does a persistent, software-pipelined GEMV read a decoding step's weights faster than kernels/gemv.py?

Issue 12's Hymba+ decode bar (2x the HBM floor) is missed by ~8%; the step's feed-forward GEMVs run at 0.67-0.74 of
the copy rate (bench/results/gemv_hymba_plus_s11.h200.json). In kernels/gemv.py each program loads one K tile and
waits for it before loading the next (the SASS for sm_90 shows the loop's LDG.E.128s, then the FFMAs that wait on
them, then the branch back), and a SwiGLU's 2,752 one-tile programs run in ~2.3 waves. This probe times, at
Hymba+'s batch-1 shapes from CUDA graphs over distinct weights (as bench/gemv.py does):

- `gemv`: kernels/gemv.py as shipped (its untuned config);
- `stream`: one kernel, `_stream_gemv_kernel`, whose G programs walk the (row block, K tile) pairs pid, pid + G, ...
  with the next pair's tiles loaded before the current pair's products are summed (one tile ahead, in registers),
  so a program's loads are in flight while it reduces and stores; G = the row blocks (one pass each: only the
  prefetch across K tiles differs from gemv) or a multiple of the SM count (persistent);
- `read`: the same bytes summed by a grid-stride kernel that does nothing else: what reading them can cost.

It writes JSON with each variant's microseconds and fraction of the copy rate measured in the run. Not a shipped
kernel: if a variant wins, kernels/gemv.py takes its loop.

    python bench/gemv_persistent_probe.py --out DIR            (GPU)
    python bench/gemv_persistent_probe.py --out DIR --dry-run  (CPU interpreter, tiny shapes: checks the sums)
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
from pathlib import Path

if "--dry-run" in sys.argv:
    os.environ["TRITON_INTERPRET"] = "1"

import torch  # noqa: E402
import triton  # noqa: E402
import triton.language as tl  # noqa: E402
from harness import command_line, graph_us_per_call, run_metadata  # noqa: E402

from archgen.benchmark import copy_bandwidth  # noqa: E402
from archgen.resources import kernels_package  # noqa: E402

kernels_package()  # this checkout's kernels/ folder, as archgen_kernels
from archgen_kernels import gemv  # noqa: E402

HYMBA_PLUS = {"mlp.gate_up": (5504, 1600, True), "mlp.down_proj": (1600, 5504, False),
              "mamba.in_proj": (6400, 1600, False), "mamba.out_proj": (1600, 3200, False),
              "attn.o_proj": (1600, 1600, False), "attn.qkv": (2240, 1600, False), "lm_head": (32001, 1600, False)}
DRY = {"gate_up": (24, 40, True), "down": (20, 72, False)}
STREAM_BYTES = 256 * 2**20


@triton.jit
def _stream_gemv_kernel(x_ptr, w_ptr, u_ptr, y_ptr, N, K, K_TILES, GATED: tl.constexpr, BLOCK_N: tl.constexpr,
                        BLOCK_K: tl.constexpr, FOLD: tl.constexpr):
    pid = tl.program_id(0)
    programs = tl.num_programs(0)
    row_blocks = tl.cdiv(N, BLOCK_N)
    total = tl.cdiv(row_blocks - pid, programs) * K_TILES
    r = tl.arange(0, BLOCK_N)
    c = tl.arange(0, BLOCK_K)
    outs = pid * BLOCK_N + r
    mask = (outs < N)[:, None] & (c < K)[None, :]
    offsets = outs.to(tl.int64)[:, None] * K + c[None, :]
    tile = tl.load(w_ptr + offsets, mask=mask, other=0.0)
    up_tile = tl.load(u_ptr + offsets, mask=mask, other=0.0) if GATED else tile
    x = tl.load(x_ptr + c, mask=c < K, other=0.0)
    acc = tl.zeros((BLOCK_N, BLOCK_K // FOLD), dtype=tl.float32)
    up_acc = tl.zeros((BLOCK_N, BLOCK_K // FOLD), dtype=tl.float32)
    for t in range(1, total + 1):
        next_outs = (pid + (t // K_TILES) * programs) * BLOCK_N + r
        next_cols = (t % K_TILES) * BLOCK_K + c
        rows_left = tl.where(t < total, N, 0)  # the last pass loads nothing
        next_mask = (next_outs < rows_left)[:, None] & (next_cols < K)[None, :]
        next_offsets = next_outs.to(tl.int64)[:, None] * K + next_cols[None, :]
        next_tile = tl.load(w_ptr + next_offsets, mask=next_mask, other=0.0)
        next_up = tl.load(u_ptr + next_offsets, mask=next_mask, other=0.0) if GATED else next_tile
        next_x = tl.load(x_ptr + next_cols, mask=next_cols < K, other=0.0)
        x32 = x.to(tl.float32)[None, :]
        acc += gemv._folded(tile.to(tl.float32), x32, BLOCK_N, BLOCK_K, FOLD)
        if GATED:
            up_acc += gemv._folded(up_tile.to(tl.float32), x32, BLOCK_N, BLOCK_K, FOLD)
        if t % K_TILES == 0:
            y = tl.sum(acc, axis=1)
            if GATED:
                y = y * tl.sigmoid(y) * tl.sum(up_acc, axis=1)
            done = (pid + ((t - 1) // K_TILES) * programs) * BLOCK_N + r
            tl.store(y_ptr + done, y.to(y_ptr.dtype.element_ty), mask=done < N)
            acc = tl.zeros((BLOCK_N, BLOCK_K // FOLD), dtype=tl.float32)
            up_acc = tl.zeros((BLOCK_N, BLOCK_K // FOLD), dtype=tl.float32)
        tile = next_tile
        up_tile = next_up
        x = next_x


@triton.jit
def _read_kernel(w_ptr, out_ptr, numel, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    programs = tl.num_programs(0)
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    for start in range(pid * BLOCK, numel, programs * BLOCK):
        offs = start + tl.arange(0, BLOCK)
        acc += tl.load(w_ptr + offs, mask=offs < numel, other=0.0).to(tl.float32)
    tl.store(out_ptr + pid, tl.sum(acc, axis=0))


def stream_gemv(x, w, up, config):
    N, K = w.shape
    y = torch.empty((N,), device=x.device, dtype=x.dtype)
    tiles = triton.cdiv(K, config["BLOCK_K"])
    row_blocks = triton.cdiv(N, config["BLOCK_N"])
    programs = min(row_blocks, config["programs"]) if config["programs"] else row_blocks
    _stream_gemv_kernel[(programs,)](x, w, up if up is not None else w, y, N, K, tiles, GATED=up is not None,
                                     BLOCK_N=config["BLOCK_N"], BLOCK_K=config["BLOCK_K"], FOLD=8,
                                     num_warps=config["num_warps"])
    return y


def read_all(w, out, programs, block):
    _read_kernel[(programs,)](w, out, w.numel(), BLOCK=block, num_warps=8)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--dry-run", action="store_true")
    args = parser.parse_args()
    dry = args.dry_run
    device = "cpu" if dry else "cuda"
    dtype = torch.float32 if dry else torch.bfloat16
    sms = 4 if dry else torch.cuda.get_device_properties(0).multi_processor_count
    copy = 1.0 if dry else copy_bandwidth(device)
    result = {"meta": run_metadata(command_line(), dry), "copy_TBps": copy / 1e12, "sms": sms, "shapes": {}}
    shapes = DRY if dry else HYMBA_PLUS
    blocks = [(2, 32, 2)] if dry else [(1, 1024, 2), (1, 2048, 4), (2, 512, 2), (2, 1024, 2), (2, 1024, 4),
                                       (2, 2048, 4), (4, 512, 4), (4, 1024, 4), (4, 1024, 8)]
    program_counts = [0, 3] if dry else [0, sms * 2, sms * 4, sms * 6, sms * 8, sms * 12, sms * 16]
    for name, (N, K, gated) in shapes.items():
        result["shapes"][name] = row = measure_shape(N, K, gated, dry, device, dtype, sms, copy, blocks, program_counts)
        timed = {k: v for k, v in row["variants"].items() if isinstance(v, float) and v > 0}
        print(name, json.dumps({k: row[k] for k in ("max_abs_error", "best_stream") if k in row}),
              {k: round(v, 2) for k, v in timed.items() if not k.startswith("stream") or k == row.get("best_stream")},
              flush=True)
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "gemv_persistent_probe.json").write_text(json.dumps(result, indent=1) + "\n")
        if dry and row["max_abs_error"] > 1e-4:
            raise SystemExit(f"{name}: stream kernel off by {row['max_abs_error']}")


def measure_shape(N, K, gated, dry, device, dtype, sms, copy, blocks, program_counts) -> dict:
    """One weight shape: gemv, the read kernel and every stream config, microseconds a call from CUDA graphs."""
    g = torch.Generator(device=device).manual_seed(N + K)
    matrices = 2 if gated else 1
    nbytes = N * K * 2 * matrices
    copies = 2 if dry else max(2, -(-STREAM_BYTES // nbytes))
    ws = [(torch.randn((N, K), generator=g, device=device) / K**0.5).to(dtype) for _ in range(copies * matrices)]
    x = torch.randn((K,), generator=g, device=device).to(dtype)
    pair = (lambda i: (ws[2 * i], ws[2 * i + 1])) if gated else (lambda i: (ws[i], None))
    w0, u0 = pair(0)
    expected = gemv.swiglu_linear_reference(x[None], w0, u0)[0] if gated else gemv.linear_reference(x[None], w0)[0]
    row = {"N": N, "K": K, "gated": gated, "MB": nbytes / 1e6, "floor_us": nbytes / copy * 1e6, "variants": {}}
    row["variants"]["gemv"] = graph_us_per_call(lambda i: gemv.gemv_forward(x[None], pair(i)[0], up_weight=pair(i)[1]),
                                          copies, dry)
    sums = torch.empty(sms * 16, device=device, dtype=torch.float32)
    for programs in ([sms * 4] if dry else [sms * 4, sms * 8, sms * 16]):
        row["variants"][f"read programs={programs}"] = graph_us_per_call(
            lambda i, p=programs: [read_all(w, sums, p, 2048) for w in pair(i) if w is not None], copies, dry)
    errors = {}
    for (bn, bk, warps), programs in itertools.product(blocks, program_counts):
        if bk > 2 * triton.next_power_of_2(K):
            continue
        cfg = {"BLOCK_N": bn, "BLOCK_K": bk, "num_warps": warps, "programs": programs}
        label = f"stream BLOCK_N={bn},BLOCK_K={bk},warps={warps},programs={programs or 'row blocks'}"
        try:
            got = stream_gemv(x, w0, u0, cfg)
            errors[label] = (got.double() - expected.double()).abs().max().item()
            row["variants"][label] = graph_us_per_call(lambda i, c=cfg: stream_gemv(x, *pair(i), c), copies, dry)
        except Exception as error:  # noqa: BLE001 - a config that fails is a result
            row["variants"][label] = f"{type(error).__name__}: {str(error)[:200]}"
    row["max_abs_error"] = max(errors.values()) if errors else None
    row["max_abs_expected"] = expected.abs().max().item()
    timed = {k: v for k, v in row["variants"].items() if isinstance(v, float) and v > 0}
    if timed:
        best = min((k for k in timed if k.startswith("stream")), key=timed.get, default=None)
        row["best_stream"] = best
        row["fraction_of_copy"] = {k: round(row["floor_us"] / v, 3) for k, v in timed.items()}
    return row


if __name__ == "__main__":
    main()
