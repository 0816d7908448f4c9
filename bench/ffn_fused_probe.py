"""Probe: a decoding step's SwiGLU feed-forward (gate/up GEMV, then down GEMV plus the residual) as one persistent
kernel with a grid barrier between the two products, against the two launches a generated package runs now.

Why: at Hymba+'s batch-1 shapes every kernel of the step costs ~2.5 us beyond its bytes over the bandwidth
(bench/results/gemv_persistent_probe_s15.h200.json: 5 MB in 3.5 us, 102 MB in 24.6), and the step runs ~12 of them
a layer. One kernel for the feed-forward pays that once, and its programs load their first down-projection tile
before they wait at the barrier, so that tile's HBM latency hides behind the gate/up tail.

Session 15 ran the same design as a shipped op (kernels/swiglu_ffn.py, on a branch) in Hymba+'s step: 20.35 us a
layer at 2 x 2048 tiles and four programs an SM, against 18.2 for the two launches (docs/design.md, "Session 15"):
this probe's config sweep is the next step.

    python bench/ffn_fused_probe.py --out DIR             (GPU)
    python bench/ffn_fused_probe.py --out DIR --dry-run   (CPU interpreter: the two phases as two launches)
"""

from __future__ import annotations

import argparse
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

STREAM_BYTES = 256 * 2**20


@triton.jit
def _grid_barrier(sync_ptr, programs):
    """Every program of the launch past this point only once all have reached it (they must all be resident)."""
    generation = tl.atomic_add(sync_ptr + 1, 0, sem="acquire", scope="gpu")
    tl.debug_barrier()
    arrived = tl.atomic_add(sync_ptr, 1, sem="acq_rel", scope="gpu")
    if arrived == programs - 1:
        tl.atomic_xchg(sync_ptr, 0, sem="relaxed", scope="gpu")
        tl.atomic_add(sync_ptr + 1, 1, sem="release", scope="gpu")
    else:
        seen = tl.atomic_add(sync_ptr + 1, 0, sem="acquire", scope="gpu")
        while seen == generation:
            seen = tl.atomic_add(sync_ptr + 1, 0, sem="acquire", scope="gpu")
    tl.debug_barrier()


@triton.jit
def _ffn_kernel(x_ptr, gate_ptr, up_ptr, down_ptr, r_ptr, hidden_ptr, y_ptr, sync_ptr, D, H,
                PHASES: tl.constexpr,  # 3: both products and the barrier; 1 or 2: that phase only (interpreter)
                BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                FOLD: tl.constexpr):
    pid = tl.program_id(0)
    programs = tl.num_programs(0)
    cols = tl.arange(0, BLOCK_D)  # the whole input row in one tile (D <= BLOCK_D)
    if PHASES != 2:
        x = tl.load(x_ptr + cols, mask=cols < D, other=0.0).to(tl.float32)[None, :]
        blocks = tl.cdiv(H, BLOCK_H)
        rows = pid * BLOCK_H + tl.arange(0, BLOCK_H)
        at = rows.to(tl.int64)[:, None] * D + cols[None, :]
        mask = (rows < H)[:, None] & (cols < D)[None, :]
        g = tl.load(gate_ptr + at, mask=mask, other=0.0)
        u = tl.load(up_ptr + at, mask=mask, other=0.0)
        for block in range(pid, blocks, programs):
            rows = block * BLOCK_H + tl.arange(0, BLOCK_H)
            following = (block + programs) * BLOCK_H + tl.arange(0, BLOCK_H)
            at = following.to(tl.int64)[:, None] * D + cols[None, :]
            mask = (following < H)[:, None] & (cols < D)[None, :]
            next_g = tl.load(gate_ptr + at, mask=mask, other=0.0)
            next_u = tl.load(up_ptr + at, mask=mask, other=0.0)
            gate = tl.sum(gemv._folded(g.to(tl.float32), x, BLOCK_H, BLOCK_D, FOLD), axis=1)
            up = tl.sum(gemv._folded(u.to(tl.float32), x, BLOCK_H, BLOCK_D, FOLD), axis=1)
            hidden = gate * tl.sigmoid(gate) * up
            tl.store(hidden_ptr + rows, hidden.to(hidden_ptr.dtype.element_ty), mask=rows < H)
            g = next_g
            u = next_u
    # phase 2: the down rows' (row block, K tile) pairs pid, pid + programs, ... in order, one tile ahead; the first
    # tile is loaded before the barrier (the weights do not depend on phase 1)
    k = tl.arange(0, BLOCK_K)
    r_ = tl.arange(0, BLOCK_N)
    tiles = tl.cdiv(H, BLOCK_K)
    total = tl.cdiv(tl.cdiv(D, BLOCK_N) - pid, programs) * tiles
    outs = pid * BLOCK_N + r_
    w = tl.load(down_ptr + outs.to(tl.int64)[:, None] * H + k[None, :], mask=(outs < D)[:, None] & (k < H)[None, :],
                other=0.0)
    if PHASES == 3:
        _grid_barrier(sync_ptr, programs)
    if PHASES != 1:
        acc = tl.zeros((BLOCK_N, BLOCK_K // FOLD), dtype=tl.float32)
        for t in range(1, total + 1):
            next_outs = (pid + (t // tiles) * programs) * BLOCK_N + r_
            next_cols = (t % tiles) * BLOCK_K + k
            rows_left = tl.where(t < total, D, 0)
            next_w = tl.load(down_ptr + next_outs.to(tl.int64)[:, None] * H + next_cols[None, :],
                             mask=(next_outs < rows_left)[:, None] & (next_cols < H)[None, :], other=0.0)
            cols_now = ((t - 1) % tiles) * BLOCK_K + k
            h = tl.load(hidden_ptr + cols_now, mask=cols_now < H, other=0.0, cache_modifier=".cg")
            acc += gemv._folded(w.to(tl.float32), h.to(tl.float32)[None, :], BLOCK_N, BLOCK_K, FOLD)
            if t % tiles == 0:
                done = (pid + ((t - 1) // tiles) * programs) * BLOCK_N + r_
                y = tl.sum(acc, axis=1).to(y_ptr.dtype.element_ty)
                res = tl.load(r_ptr + done, mask=done < D, other=0.0)
                tl.store(y_ptr + done, (res.to(tl.float32) + y.to(tl.float32)).to(y_ptr.dtype.element_ty),
                         mask=done < D)
                acc = tl.zeros((BLOCK_N, BLOCK_K // FOLD), dtype=tl.float32)
            w = next_w


_SYNC = {}


def ffn(x, gate, up, down, residual, cfg, interpret=False):
    D, H = x.shape[-1], gate.shape[0]
    hidden = torch.empty(H, device=x.device, dtype=x.dtype)
    y = torch.empty(D, device=x.device, dtype=x.dtype)
    sync = _SYNC.setdefault(str(x.device), torch.zeros(2, dtype=torch.int32, device=x.device))
    programs = min(cfg["programs"], triton.cdiv(D, cfg["BLOCK_N"]), triton.cdiv(H, cfg["BLOCK_H"]))
    common = dict(BLOCK_H=cfg["BLOCK_H"], BLOCK_D=triton.next_power_of_2(D), BLOCK_N=cfg["BLOCK_N"],
                  BLOCK_K=cfg["BLOCK_K"], FOLD=8, num_warps=cfg["num_warps"])
    args = (x, gate, up, down, residual, hidden, y, sync, D, H)
    if interpret:
        _ffn_kernel[(programs,)](*args, PHASES=1, **common)
        _ffn_kernel[(programs,)](*args, PHASES=2, **common)
    else:
        _ffn_kernel[(programs,)](*args, PHASES=3, launch_cooperative_grid=cfg.get("cooperative", True), **common)
    return y


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--dry-run", action="store_true")
    args = parser.parse_args()
    dry = args.dry_run
    device = "cpu" if dry else "cuda"
    dtype = torch.float32 if dry else torch.bfloat16
    D, H = (40, 72) if dry else (1600, 5504)
    g = torch.Generator(device=device).manual_seed(0)
    layer_bytes = 3 * D * H * 2
    copies = 2 if dry else max(2, -(-STREAM_BYTES // layer_bytes))
    layers = [tuple((torch.randn(shape, generator=g, device=device) / shape[1] ** 0.5).to(dtype)
                    for shape in ((H, D), (H, D), (D, H))) for _ in range(copies)]
    x = torch.randn(D, generator=g, device=device).to(dtype)
    r = torch.randn(D, generator=g, device=device).to(dtype)
    result = {"meta": run_metadata(command_line(), dry),
              "D": D, "H": H, "layer_MB": layer_bytes / 1e6, "copies": copies, "variants": {}, "errors": {}}
    if not dry:
        result["copy_TBps"] = copy_bandwidth(device) / 1e12
        result["floor_us"] = layer_bytes / (result["copy_TBps"] * 1e12) * 1e6

    def separate(i):
        gw, uw, dw = layers[i]
        hidden = gemv.gemv_forward(x[None], gw, up_weight=uw)
        return gemv.gemv_forward(hidden, dw, residual=r[None])[0]

    gw, uw, dw = layers[0]
    expected = gemv.residual_linear_reference(gemv.swiglu_linear_reference(x[None], gw, uw), dw, None, r[None])[0]
    result["variants"]["separate"] = graph_us_per_call(separate, copies, dry, rep_ms=30)
    result["errors"]["separate"] = (separate(0).double() - expected.double()).abs().max().item()
    sms = 2 if dry else torch.cuda.get_device_properties(0).multi_processor_count
    configs = [{"BLOCK_H": 2, "BLOCK_N": 2, "BLOCK_K": 32, "num_warps": 2, "programs": 3}] if dry else [
        {"BLOCK_H": bh, "BLOCK_N": bn, "BLOCK_K": bk, "num_warps": w, "programs": sms * per_sm}
        for bh, bn, bk, w, most in ((2, 2, 2048, 4, 4), (1, 1, 2048, 4, 7), (2, 1, 2048, 4, 4), (1, 2, 1024, 2, 8))
        for per_sm in range(1, most + 1)] + [
        {"BLOCK_H": 2, "BLOCK_N": 2, "BLOCK_K": 2048, "num_warps": 4, "programs": sms * 2, "cooperative": False},
        {"BLOCK_H": 1, "BLOCK_N": 1, "BLOCK_K": 2048, "num_warps": 4, "programs": sms * 4, "cooperative": False}]
    for cfg in configs:
        name = ",".join(f"{k}={v}" for k, v in cfg.items())
        try:
            got = ffn(x, gw, uw, dw, r, cfg, interpret=dry)
            result["errors"][name] = (got.double() - expected.double()).abs().max().item()
            result["variants"][name] = graph_us_per_call(lambda i, c=cfg: ffn(x, *layers[i], r, c, interpret=dry), copies, dry,
                                                             rep_ms=30)
        except Exception as error:  # noqa: BLE001 - a config that fails is a result
            result["variants"][name] = f"{type(error).__name__}: {str(error)[:300]}"
        print(name, result["variants"][name], result["errors"].get(name), flush=True)
    result["expected_max_abs"] = expected.abs().max().item()
    print("separate", result["variants"]["separate"], result["errors"]["separate"])
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "ffn_fused_probe.json").write_text(json.dumps(result, indent=1) + "\n")
    if dry and max(v for v in result["errors"].values()) > 1e-4:
        raise SystemExit(f"off: {result['errors']}")


if __name__ == "__main__":
    main()
