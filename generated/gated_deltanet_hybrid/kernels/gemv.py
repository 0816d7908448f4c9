"""Linear layers on a few rows (a decoding step's tokens) as a Triton GEMV, plain and SwiGLU-gated: the kernel, its
autotune space, the custom ops and the reference.

For rows x (M, K), weight w (N, K) (nn.Linear's layout) and an optional bias b (N,)::

    linear:         y = x · wᵀ + b
    residual_linear y = r + (x · wᵀ + b)                                      (the product rounded first, as eager r + y)
    swiglu_linear:  y = silu(x · w_gateᵀ + b_gate) · (x · w_upᵀ + b_up)      silu(g) = g · σ(g)
    qkv_linear:     y = [x · w_qᵀ + b_q, x · w_kᵀ + b_k, x · w_vᵀ + b_v]      (concatenated along the features)

accumulated in float32, stored once in x's dtype. swiglu_linear is a SwiGLU feed-forward's gate and up projections
and its gate in one launch (three with cuBLAS and kernels/silu_mul.py), on the two weights as the checkpoint holds them;
qkv_linear is an attention's q, k and v projections in one launch (three), each program taking its rows from one of
the three weights, so they need not be concatenated (the checkpoint, importers and tensor-parallel plans keep them).

Why a kernel: a batch-1 decoding step multiplies one row by each weight matrix, so the step is the weights' bytes
over the memory bandwidth. cuBLAS's kernels for M = 1 (nvjet 64x8 tiles with a split-K reduction kernel) read
Bamba-1B's weights at about 60% of the H200's copy bandwidth (GPU call 1 of session 6: 8-11 µs per 2048 × 5632
matrix), and a matrix of a megabyte still takes 4-5 µs. Here each program streams BLOCK_N whole weight rows,
BLOCK_K columns at a time, and multiplies them by the row of x (a few kilobytes, served from L2). Each thread loads its
weights 16 bytes at a time and adds each such vector's FOLD products up in its own registers before accumulating, so the
float32 accumulator is BLOCK_N × BLOCK_K / FOLD and nothing crosses threads until the end. Why FOLD: the registers
bound how many programs an SM holds, and so how many bytes it has in flight (an H200 needs ~30 KB per SM); with a full
(BLOCK_N, BLOCK_K) float32 tile, a 4 × 1024 tile over 4 warps took 56 registers a thread (9 programs per SM), folded
32 (16), and a gated 4 × 2048 tile over 8 warps 128 (2 per SM) against 40 (6) (ptxas for sm_90a, Triton 3.9).
Programs are ordered with the rows of x fastest, so the programs of one weight tile run together and read it from HBM
once (L2 serves the other rows). Nothing is reused across the K loop, so no shared memory and no tensor cores: for
more than FEW_ROWS rows cuBLAS's tiled GEMM is the right tool, and the generated layers call this only for up to
FEW_ROWS rows (prefill and training stay on cuBLAS).

Tuning. The tuner `gemv.forward` (triton_support.Autotuner) chooses BLOCK_N, BLOCK_K and num_warps per shape bucket
(`shape_key`: N, K, the row count, dtype, gated or not), from CONFIGS and the shape's own config (`shape_config`),
which goes first: it is what a package that does not tune runs. `autotune(config, params, ...)` is
the hook `archgen build --autotune` calls: it runs the kernel on every weight matrix of an op at its decoding batch.

RMSNorm folded in (in_proj_conv's and qkv_rope's decoding steps, where a parallel layer's branches start from the
block's norm): Σ_k w[n, k] · (x[k] · rstd · g[k]) = rstd · Σ_k w[n, k] · (x[k] · g[k]), so `_row_products` with NORM
multiplies each chunk of x by the norm's weight g as it loads it, sums x² beside the products and scales the row sums
by rstd at the end: no pass over x before the products (session 14's prologue took one, a dependent L2 round trip
and a reduction in every program, and measured 3.8% slower on Hymba+) and no norm launch on the layer's chain. The
normed x is not rounded to x's dtype before the products, as the norm kernel stores it: the result is within
rounding of norm-then-GEMV, not its bits (`rms_norm_fold_reference` is the tests' truth).

Gradients (a training batch of one token) are computed with torch matmuls from the saved inputs: that path is
correct, not fast. CPU tensors take the reference unless TRITON_INTERPRET=1 and ARCHGEN_TRITON_ON_CPU=1 (the tests).
"""

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from torch import Tensor

from .triton_support import (
    Autotuner,
    dtype_name,
    gdc_launch_dependents,
    gdc_wait,
    on_device,
    op_overload,
    prefetch_l2,
    programmatic_launch,
    register_op,
    rounded,
    triton_on_cpu,
)

SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
FEW_ROWS = 4
"""The most rows the generated layers send here (a decoding step of up to 4 sequences); beyond, cuBLAS."""

# What the tuner times at each shape, after the shape's own config (shape_config: what an untuned package runs; GPU
# call 2 of session 7 timed all of them at Bamba-1B's shapes, bench/gemv.py). Each program's tile is BLOCK_N ×
# BLOCK_K: 1K-8K elements, 32-64 bytes of weight in flight per thread per iteration.
# An H200 needs about 3-4 MB in flight to stream at its bandwidth (latency ~0.7 µs × 4.8 TB/s): N × BLOCK_K weights
# when every program is resident at once, which the folded accumulator allows (32-48 registers a thread).
CONFIGS = [{"BLOCK_N": n, "BLOCK_K": k, "num_warps": w}
           for n, k, w in ((1, 1024, 2), (1, 2048, 4), (2, 1024, 2), (2, 2048, 4), (4, 512, 2), (4, 1024, 4),
                           (4, 2048, 8), (8, 1024, 8))]
INTERPRETER_CONFIG = {"BLOCK_N": 4, "BLOCK_K": 32, "num_warps": 4}


@triton.jit
def _folded(tile, x, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, FOLD: tl.constexpr):
    """tile · x (BLOCK_N, BLOCK_K) with each run of FOLD columns (one thread's 16-byte load) summed: (BLOCK_N, BLOCK_K / FOLD)."""
    return tl.sum(tl.reshape(tile * x, (BLOCK_N, BLOCK_K // FOLD, FOLD)), axis=2)


@triton.jit
def _tile_products(x, w_rows, rows_inside, cols, cols_inside, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                   FOLD: tl.constexpr):
    """One step of _row_products' loop on one weight: the (BLOCK_N, BLOCK_K) tile at columns `cols` of rows w_rows
    (0 outside), times x (1, BLOCK_K) in float32, folded (_folded). A kernel summing two weights' rows side by side
    (the gated GEMV, kernels/qkv_rope.py) calls it on each, so each sum is _row_products' code, not a copy of it."""
    tile = tl.load(w_rows + cols[None, :], mask=rows_inside[:, None] & cols_inside[None, :], other=0.0)
    return _folded(tile.to(tl.float32), x, BLOCK_N, BLOCK_K, FOLD)


@triton.jit
def _prefetch_first_tile(w_ptr, outs, N, K, stride_wn, BLOCK_K: tl.constexpr):
    """Ask L2 for the 128-byte lines of rows `outs` (clamped to the N rows), columns [0, BLOCK_K) (clamped to the K),
    one prefetch a line: no registers wait for them (holding the tile itself across gdc_wait took 6-8 more registers a
    thread, 12 -> 10 programs an SM for the default tile, ptxas for sm_90), and the loop's first loads hit L2."""
    LINE: tl.constexpr = 1024 // w_ptr.dtype.element_ty.primitive_bitwidth  # elements of a 128-byte line
    columns = tl.arange(0, BLOCK_K // LINE if BLOCK_K > LINE else 1) * LINE
    if K > 0:
        rows = tl.minimum(outs, N - 1).to(tl.int64)
        prefetch_l2(w_ptr + rows[:, None] * stride_wn + tl.minimum(columns, K - 1)[None, :])


@triton.jit
def _x_chunk(x_row, cols, cols_inside, norm_ptr, squares, BLOCK_K: tl.constexpr, FOLD: tl.constexpr,
             NORM: tl.constexpr):
    """One BLOCK_K chunk of x in float32 (1, BLOCK_K), and with NORM the running sums of its squares, folded as the
    products are (1, BLOCK_K / FOLD), and the chunk times RMSNorm's weight (norm_ptr): the caller scales its sums by
    _rstd(squares) at the end, so x's RMSNorm costs no pass of its own (Σ_k w·x·g·rstd = rstd · Σ_k w·(x·g); the
    module's docstring, "RMSNorm folded in"). With NORM the chunk loads as a (1, BLOCK_K) tile, in the weight tile's
    layout: loaded as a vector, the compiler kept it in a second layout for the squares, through shared memory (16-22
    more registers a thread, ptxas for sm_90)."""
    if NORM:
        x = tl.load(x_row + cols[None, :], mask=cols_inside[None, :], other=0.0).to(tl.float32)
        squares += _folded(x, x, 1, BLOCK_K, FOLD)
        x = x * tl.load(norm_ptr + cols[None, :], mask=cols_inside[None, :], other=0.0).to(tl.float32)
    else:
        x = tl.load(x_row + cols, mask=cols_inside, other=0.0).to(tl.float32)[None, :]
    return x, squares


@triton.jit
def _rstd(squares, K, eps):
    """RMSNorm's 1 / sqrt(mean(x²) + eps) (1,) from _x_chunk's running squares, as kernels/rmsnorm.py has it."""
    return 1.0 / tl.sqrt(tl.sum(squares, axis=1) / K + eps)


@triton.jit
def _row_products(x_row, w_ptr, outs, outs_inside, N, K, stride_wn, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                  FOLD: tl.constexpr, PDL: tl.constexpr, norm_ptr, eps, NORM: tl.constexpr):
    """Σ_k x[k] · w[outs, k] in float32 (BLOCK_N,): each thread's FOLD products first (_folded), then the BLOCK_K
    tiles along K, then across a tile. Every plain GEMV here sums through this (gemv, qkv, in_proj_conv), so a kernel
    with an epilogue gives gemv_forward's bits. With PDL: the first tile prefetched, then the wait for the kernel ahead
    (before x is read) and the trigger for the one after. With NORM: of RMSNorm(x) with weight norm_ptr and eps,
    folded into the loop (_x_chunk), not x's RMSNorm rounded to its dtype first: within rounding of norm-then-GEMV."""
    w_rows = w_ptr + outs.to(tl.int64)[:, None] * stride_wn
    products = tl.zeros((BLOCK_N, BLOCK_K // FOLD), dtype=tl.float32)
    squares = tl.zeros((1, BLOCK_K // FOLD), dtype=tl.float32)
    if PDL:  # the first tile's weights (no kernel of a step writes them) on their way to L2 while the kernel ahead runs
        _prefetch_first_tile(w_ptr, outs, N, K, stride_wn, BLOCK_K)
        gdc_wait()  # every program, before reading x and before any store (see programmatic_launch)
        gdc_launch_dependents()  # after the wait: the next kernel starts no earlier than this one's inputs are ready
    for k0 in range(0, K, BLOCK_K):
        cols = k0 + tl.arange(0, BLOCK_K)
        cols_inside = cols < K
        x, squares = _x_chunk(x_row, cols, cols_inside, norm_ptr, squares, BLOCK_K, FOLD, NORM)
        products += _tile_products(x, w_rows, outs_inside, cols, cols_inside, BLOCK_N, BLOCK_K, FOLD)
    sums = tl.sum(products, axis=1)
    if NORM:
        sums = sums * _rstd(squares, K, eps)
    return sums


@triton.jit
def _gemv_kernel(x_ptr, w_ptr, b_ptr, w_up_ptr, b_up_ptr, y_ptr, M, N, K, stride_xm, stride_wn, stride_upn, stride_ym,
                 r_ptr, stride_rm,  # the residual (M, N) added in the epilogue (HAS_RESIDUAL)
                 HAS_BIAS: tl.constexpr,  # add b (and b_up) to the products
                 GATED: tl.constexpr,  # y = silu(x·wᵀ + b) · (x·w_upᵀ + b_up)
                 BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, FOLD: tl.constexpr,
                 PDL: tl.constexpr,  # launched programmatically: the first weight tile prefetched before gdc_wait
                 HAS_RESIDUAL: tl.constexpr = False):  # y = r + (the product rounded to y's dtype), rounded once more
    row = tl.program_id(0)  # the row of x: fastest, so the programs sharing a weight tile run together
    outs = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    outs_inside = outs < N
    x_row = x_ptr + row.to(tl.int64) * stride_xm
    if GATED:  # _row_products' sums for both weights, their tiles loaded side by side
        w_rows = w_ptr + outs.to(tl.int64)[:, None] * stride_wn
        up_rows = w_up_ptr + outs.to(tl.int64)[:, None] * stride_upn
        products = tl.zeros((BLOCK_N, BLOCK_K // FOLD), dtype=tl.float32)
        up_products = tl.zeros((BLOCK_N, BLOCK_K // FOLD), dtype=tl.float32)
        if PDL:  # as _row_products
            _prefetch_first_tile(w_ptr, outs, N, K, stride_wn, BLOCK_K)
            _prefetch_first_tile(w_up_ptr, outs, N, K, stride_upn, BLOCK_K)
            gdc_wait()
            gdc_launch_dependents()
        for k0 in range(0, K, BLOCK_K):
            cols = k0 + tl.arange(0, BLOCK_K)
            cols_inside = cols < K
            x = tl.load(x_row + cols, mask=cols_inside, other=0.0).to(tl.float32)[None, :]
            products += _tile_products(x, w_rows, outs_inside, cols, cols_inside, BLOCK_N, BLOCK_K, FOLD)
            up_products += _tile_products(x, up_rows, outs_inside, cols, cols_inside, BLOCK_N, BLOCK_K, FOLD)
        y = tl.sum(products, axis=1)
    else:
        y = _row_products(x_row, w_ptr, outs, outs_inside, N, K, stride_wn, BLOCK_N, BLOCK_K, FOLD, PDL, w_ptr, 0.0,
                          False)
    if HAS_BIAS:
        y += tl.load(b_ptr + outs, mask=outs_inside, other=0.0).to(tl.float32)
    if GATED:
        up = tl.sum(up_products, axis=1)
        if HAS_BIAS:
            up += tl.load(b_up_ptr + outs, mask=outs_inside, other=0.0).to(tl.float32)
        y = y * tl.sigmoid(y) * up
    y = rounded(y, y_ptr.dtype.element_ty)
    if HAS_RESIDUAL:  # as eager `r + y`: y rounded to its dtype first, the sum in float32, rounded once
        r = tl.load(r_ptr + row.to(tl.int64) * stride_rm + outs, mask=outs_inside, other=0.0)
        y = rounded(r.to(tl.float32) + y.to(tl.float32), y_ptr.dtype.element_ty)
    tl.store(y_ptr + row.to(tl.int64) * stride_ym + outs, y, mask=outs_inside)


@triton.jit
def _qkv_gemv_kernel(x_ptr, q_ptr, k_ptr, v_ptr, bq_ptr, bk_ptr, bv_ptr, y_ptr, M, NQ, NKV, K, stride_xm, stride_ym,
                     HAS_BIAS: tl.constexpr,  # add the biases to the products
                     BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, FOLD: tl.constexpr,
                     PDL: tl.constexpr):  # as _gemv_kernel's
    """y = [x·w_qᵀ, x·w_kᵀ, x·w_vᵀ] (+ biases): the programs along axis 1 take BLOCK_N rows of w_q (NQ rows), then of
    w_k, then of w_v (NKV rows each), so each program reads one weight; the weights are contiguous, K columns."""
    row = tl.program_id(0)
    block = tl.program_id(1)
    q_blocks = tl.cdiv(NQ, BLOCK_N)
    kv_blocks = tl.cdiv(NKV, BLOCK_N)
    in_k = block >= q_blocks
    in_v = block >= q_blocks + kv_blocks
    w_ptr = tl.where(in_v, v_ptr, tl.where(in_k, k_ptr, q_ptr))
    b_ptr = tl.where(in_v, bv_ptr, tl.where(in_k, bk_ptr, bq_ptr))
    n = tl.where(in_k, NKV, NQ)
    first_block = tl.where(in_v, q_blocks + kv_blocks, tl.where(in_k, q_blocks, 0))
    first_feature = tl.where(in_v, NQ + NKV, tl.where(in_k, NQ, 0))  # where this weight's products go in y
    outs = (block - first_block) * BLOCK_N + tl.arange(0, BLOCK_N)
    outs_inside = outs < n
    x_row = x_ptr + row.to(tl.int64) * stride_xm
    y = _row_products(x_row, w_ptr, outs, outs_inside, n, K, K, BLOCK_N, BLOCK_K, FOLD, PDL, w_ptr, 0.0, False)
    if HAS_BIAS:
        y += tl.load(b_ptr + outs, mask=outs_inside, other=0.0).to(tl.float32)
    y_row = y_ptr + row.to(tl.int64) * stride_ym + first_feature
    tl.store(y_row + outs, y.to(y_ptr.dtype.element_ty), mask=outs_inside)


FORWARD_TUNER = Autotuner("gemv.forward", CONFIGS, INTERPRETER_CONFIG)


def shape_config(N: int, K: int, M: int, multiprocessors: int) -> dict:
    """The config an untuned package runs at (N, K) with M rows of x, first among the candidates: two weight rows
    per program, of 2048 columns over 4 warps for one row of x and of 1024 over 2 warps for more (GPU call 2 of
    session 7, every config timed from a CUDA graph at Bamba-1B's shapes: these were the fastest or within 5% at
    every shape, 0.87 of the copy rate for the SwiGLU pair against 0.64 with the 8 × 1024 tiles of 8 warps, which
    resident programs bound: fewer, larger tiles leave a tail). Short rows (K below the columns) take more rows,
    and a matrix too small for two programs per SM fewer (GPU call 3 of session 6: Hymba+'s 132- and 320-row
    matrices on 17 and 40 programs averaged 7.5 µs), down to one row. A row longer than an iteration then takes 4
    warps: Hymba+'s x_proj (132 rows of 3200) took its row in one 4096-column pass over 4 warps until session 22,
    when 1 × 2048 over 4 warps made the whole decoding step 6 µs shorter (bench/mamba_chain_probe.py; 1 × 4096 over
    8 warps and 1 × 1024 over 2 were slower)."""
    most_columns = 2048 if M == 1 else 1024
    columns = min(triton.next_power_of_2(max(K, 1)), most_columns)
    rows = 2 * most_columns // columns
    while rows > 1 and triton.cdiv(N, rows) < 2 * multiprocessors:
        rows //= 2
    long_rows = triton.cdiv(N, rows) < 2 * multiprocessors and K > columns  # few programs, each looping over K
    warps = 4 if long_rows else min(max(rows * columns // 1024, 2), 8)
    return {"BLOCK_N": rows, "BLOCK_K": columns, "num_warps": warps}


def _multiprocessors(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 1


def _fold(cfg: dict, x: Tensor) -> int:
    """The products each thread sums before accumulating: one 16-byte load's elements, unless cfg names FOLD."""
    return cfg.get("FOLD", min(16 // x.element_size(), cfg["BLOCK_K"]))


def tuned_config(key: str, N: int, K: int, M: int, x: Tensor, config: dict | None, time_launch,
                 own: dict | None = None) -> dict:
    """config, the tuned config of key, or (tuning with time_launch(cfg)) the shape's own config (`own` where the
    caller's kernel has another: in_proj_conv's folded form) first, then CONFIGS. kernels/in_proj_conv.py runs the
    bucket's config too, timing the plain GEMV for it."""
    known = FORWARD_TUNER.known(key, config)
    if known is not None:
        return known
    own = own if own is not None else shape_config(N, K, M, _multiprocessors(x.device))
    candidates = [own, *(c for c in CONFIGS if c != own)]  # untuned: the shape's own config
    return FORWARD_TUNER.tune(key, time_launch, candidates)


def _launch_tuned(launch, key: str, N: int, K: int, M: int, x: Tensor, config: dict | None) -> None:
    """launch(cfg) with the config tuned_config chooses."""
    launch(tuned_config(key, N, K, M, x, config, launch))


def shape_key(N: int, K: int, M: int, dtype: torch.dtype, gated: bool) -> str:
    """The tuning bucket: the exact weight shape (a model has a handful), the row count and dtype."""
    return f"N{N}-K{K}-M{M}-{dtype_name(dtype)}{'-gated' if gated else ''}"


def _rows(t: Tensor) -> Tensor:
    """(M, K) view with unit stride along K (a copy only when the last dim is strided)."""
    t = t.reshape(-1, t.shape[-1])
    return t if t.stride(-1) == 1 else t.contiguous()


def _check(x: Tensor, weight: Tensor, bias: Tensor | None, name: str) -> None:
    if x.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"{name} takes {', '.join(map(str, SUPPORTED_DTYPES))}, got {x.dtype}")
    if weight.dim() != 2 or weight.shape[1] != x.shape[-1]:
        raise ValueError(f"{name}: weight must be (out, in) with in = x.shape[-1] = {x.shape[-1]}, got "
                         f"{tuple(weight.shape)}")
    if weight.dtype != x.dtype or (bias is not None and bias.shape != weight.shape[:1]):
        raise ValueError(f"{name}: weight must have x's dtype ({x.dtype}, got {weight.dtype}) and bias "
                         f"({weight.shape[0]},) (got {None if bias is None else tuple(bias.shape)})")


def gemv_forward(x: Tensor, weight: Tensor, bias: Tensor | None = None, up_weight: Tensor | None = None,
                 up_bias: Tensor | None = None, config: dict | None = None, residual: Tensor | None = None) -> Tensor:
    """Run the kernel: x (..., K) -> (..., N) in x's dtype; gated (silu(x·wᵀ + b) · (x·w_upᵀ + b_up)) when up_weight
    is given; plus residual (..., N) in x's dtype when given, added in the epilogue as eager `residual + y` adds (y
    rounded to x's dtype, the sum in float32, rounded once: the same bits). Biases come both or neither when gated.
    config: {"BLOCK_N", "BLOCK_K", "num_warps"} bypasses the tuner;
    its optional "FOLD" overrides the products summed per thread before accumulating (1: a full float32 tile, the
    kernel of session 6, which bench/gemv.py times against)."""
    gated = up_weight is not None
    x2 = _rows(x)
    M, K = x2.shape
    N = weight.shape[0]
    w = weight if weight.stride(-1) == 1 else weight.contiguous()
    w_up = (up_weight if up_weight.stride(-1) == 1 else up_weight.contiguous()) if gated else w
    y = torch.empty((M, N), device=x.device, dtype=x.dtype)
    r = _rows(residual) if residual is not None else y
    pdl = programmatic_launch(x.device)

    def launch(cfg):
        _gemv_kernel[(M, triton.cdiv(N, cfg["BLOCK_N"]))](
            x2, w, bias if bias is not None else w, w_up, up_bias if up_bias is not None else w, y, M, N, K,
            x2.stride(0), w.stride(0), w_up.stride(0), y.stride(0), r, r.stride(0), HAS_BIAS=bias is not None,
            GATED=gated, BLOCK_N=cfg["BLOCK_N"], BLOCK_K=cfg["BLOCK_K"], FOLD=_fold(cfg, x), PDL=pdl,
            HAS_RESIDUAL=residual is not None, num_warps=cfg["num_warps"], launch_pdl=pdl)

    with on_device(x):
        if M and N:
            _launch_tuned(launch, shape_key(N, K, M, x.dtype, gated), N, K, M, x, config)
    return y.view(*x.shape[:-1], N)


def qkv_gemv_forward(x: Tensor, q_weight: Tensor, k_weight: Tensor, v_weight: Tensor, q_bias: Tensor | None = None,
                     k_bias: Tensor | None = None, v_bias: Tensor | None = None, config: dict | None = None) -> Tensor:
    """Run the q/k/v kernel: x (..., K) -> (..., NQ + 2·NKV) in x's dtype, the q, k and v products side by side; the
    biases come all or none. config as gemv_forward's; tuned in the bucket of the three weights stacked."""
    x2 = _rows(x)
    M, K = x2.shape
    NQ, NKV = q_weight.shape[0], k_weight.shape[0]
    wq, wk, wv = (w.contiguous() for w in (q_weight, k_weight, v_weight))
    y = torch.empty((M, NQ + 2 * NKV), device=x.device, dtype=x.dtype)
    biases = (q_bias, k_bias, v_bias) if q_bias is not None else (wq, wq, wq)
    pdl = programmatic_launch(x.device)

    def launch(cfg):
        blocks = triton.cdiv(NQ, cfg["BLOCK_N"]) + 2 * triton.cdiv(NKV, cfg["BLOCK_N"])
        _qkv_gemv_kernel[(M, blocks)](
            x2, wq, wk, wv, *biases, y, M, NQ, NKV, K, x2.stride(0), y.stride(0), HAS_BIAS=q_bias is not None,
            BLOCK_N=cfg["BLOCK_N"], BLOCK_K=cfg["BLOCK_K"], FOLD=_fold(cfg, x), PDL=pdl, num_warps=cfg["num_warps"],
            launch_pdl=pdl)

    N = NQ + 2 * NKV
    with on_device(x):
        if M:
            _launch_tuned(launch, shape_key(N, K, M, x.dtype, gated=False) + "-qkv", N, K, M, x, config)
    return y.view(*x.shape[:-1], NQ + 2 * NKV)


def autotune(config: dict, params: dict[str, tuple[int, ...]], batch: int, seqlen: int, dtype: torch.dtype,
             device: torch.device | str) -> None:
    """The build-time tuning hook (`archgen build --autotune`): run the kernel on every weight matrix of the op (its
    2-D `weight` parameters, (out, in)) with `batch` rows, a decoding step's (seqlen is the prefill's, which stays on
    cuBLAS), so that inside triton_support.tuning_session() the tuner tunes each shape bucket; a gate_proj with an
    up_proj of its shape is also tuned gated, as a SwiGLU feed-forward runs the pair."""
    if batch > FEW_ROWS:
        return
    generator = torch.Generator(device=device).manual_seed(0)
    matrices = {name: shape for name, shape in params.items() if name.rpartition(".")[2] == "weight" and len(shape) == 2}
    for name, (N, K) in matrices.items():
        x = torch.randn((batch, K), generator=generator, device=device).to(dtype)
        weight = torch.randn((N, K), generator=generator, device=device).to(dtype)
        gemv_forward(x, weight)
        if name.endswith("gate_proj.weight") and matrices.get(name.replace("gate_proj", "up_proj")) == (N, K):
            gemv_forward(x, weight, up_weight=weight)
        kv = matrices.get(name.replace("q_proj", "k_proj")) if name.endswith("q_proj.weight") else None
        if kv is not None and kv[1] == K and matrices.get(name.replace("q_proj", "v_proj")) == kv:
            kv_weight = weight.new_zeros(kv)
            qkv_gemv_forward(x, weight, kv_weight, kv_weight)


# ---------------------------------------------------------------------------------------------------------------
# Custom ops
# ---------------------------------------------------------------------------------------------------------------


def _runs_kernel(x: Tensor) -> bool:
    return x.is_cuda or triton_on_cpu()


def _linear_impl(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """archgen_v1::linear -> x · weightᵀ + bias, like x."""
    if not _runs_kernel(x):
        return linear_reference(x, weight, bias)
    _check(x, weight, bias, "linear")
    return gemv_forward(x, weight, bias)


def _swiglu_linear_impl(x: Tensor, gate_weight: Tensor, up_weight: Tensor, gate_bias: Tensor | None,
                        up_bias: Tensor | None) -> Tensor:
    """archgen_v1::swiglu_linear -> silu(x · gate_weightᵀ + gate_bias) · (x · up_weightᵀ + up_bias), like x."""
    if not _runs_kernel(x):
        return swiglu_linear_reference(x, gate_weight, up_weight, gate_bias, up_bias)
    _check(x, gate_weight, gate_bias, "swiglu_linear")
    _check(x, up_weight, up_bias, "swiglu_linear")
    if gate_weight.shape != up_weight.shape or (gate_bias is None) != (up_bias is None):
        raise ValueError(f"swiglu_linear: the gate and up projections must have one shape and both or neither a bias, "
                         f"got {tuple(gate_weight.shape)} and {tuple(up_weight.shape)}")
    return gemv_forward(x, gate_weight, gate_bias, up_weight, up_bias)


def _qkv_linear_impl(x: Tensor, q_weight: Tensor, k_weight: Tensor, v_weight: Tensor, q_bias: Tensor | None,
                     k_bias: Tensor | None, v_bias: Tensor | None) -> Tensor:
    """archgen_v1::qkv_linear -> [x · q_weightᵀ + q_bias, x · k_weightᵀ + k_bias, x · v_weightᵀ + v_bias], like x."""
    if not _runs_kernel(x):
        return qkv_linear_reference(x, q_weight, k_weight, v_weight, q_bias, k_bias, v_bias)
    for weight, bias in ((q_weight, q_bias), (k_weight, k_bias), (v_weight, v_bias)):
        _check(x, weight, bias, "qkv_linear")
    if k_weight.shape != v_weight.shape or len({q_bias is None, k_bias is None, v_bias is None}) > 1:
        raise ValueError(f"qkv_linear: the k and v projections must have one shape and q, k and v all or none a bias, "
                         f"got {tuple(k_weight.shape)} and {tuple(v_weight.shape)}")
    return qkv_gemv_forward(x, q_weight, k_weight, v_weight, q_bias, k_bias, v_bias)


def _residual_linear_impl(x: Tensor, weight: Tensor, bias: Tensor | None, residual: Tensor) -> Tensor:
    """archgen_v1::residual_linear -> residual + (x · weightᵀ + bias), like x: the product rounded to x's dtype, then
    the sum (as eager `residual + linear(x)`)."""
    if not _runs_kernel(x):
        return residual_linear_reference(x, weight, bias, residual)
    _check(x, weight, bias, "residual_linear")
    if residual.shape != (*x.shape[:-1], weight.shape[0]) or residual.dtype != x.dtype:
        raise ValueError(f"residual_linear: residual must be {(*x.shape[:-1], weight.shape[0])} in {x.dtype}, got "
                         f"{tuple(residual.shape)} in {residual.dtype}")
    return gemv_forward(x, weight, bias, residual=residual)


def _linear_fake(x, weight, bias):
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


def _residual_linear_fake(x, weight, bias, residual):
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


def _swiglu_linear_fake(x, gate_weight, up_weight, gate_bias, up_bias):
    return x.new_empty((*x.shape[:-1], gate_weight.shape[0]))


def _qkv_linear_fake(x, q_weight, k_weight, v_weight, q_bias, k_bias, v_bias):
    return x.new_empty((*x.shape[:-1], q_weight.shape[0] + k_weight.shape[0] + v_weight.shape[0]))


def _save_inputs(ctx, inputs, output):
    ctx.save_for_backward(*(t for t in inputs if t is not None))
    ctx.has_bias = inputs[-1] is not None


def _linear_grad(ctx, dy):
    x, weight, *bias = ctx.saved_tensors
    dy2, x2 = dy.reshape(-1, dy.shape[-1]), x.reshape(-1, x.shape[-1])
    return dy @ weight, dy2.t() @ x2, dy2.sum(dim=0) if ctx.has_bias else None


def _save_residual_linear_inputs(ctx, inputs, output):
    x, weight, bias, _ = inputs
    _save_inputs(ctx, (x, weight, bias), output)


def _residual_linear_grad(ctx, dy):
    return (*_linear_grad(ctx, dy), dy)


def _swiglu_linear_grad(ctx, dy):
    x, gate_weight, up_weight, *biases = ctx.saved_tensors
    gate_bias, up_bias = biases if ctx.has_bias else (None, None)
    x32 = x.reshape(-1, x.shape[-1]).float()
    g = F.linear(x32, gate_weight.float(), gate_bias.float() if gate_bias is not None else None)
    u = F.linear(x32, up_weight.float(), up_bias.float() if up_bias is not None else None)
    sig = torch.sigmoid(g)
    dy32 = dy.reshape(-1, dy.shape[-1]).float()
    dg = dy32 * u * sig * (1 + g * (1 - sig))
    du = dy32 * g * sig
    dx = (dg @ gate_weight.float() + du @ up_weight.float()).to(x.dtype).view(x.shape)
    grads = (dx, (dg.t() @ x32).to(gate_weight.dtype), (du.t() @ x32).to(up_weight.dtype))
    if not ctx.has_bias:
        return (*grads, None, None)
    return (*grads, dg.sum(dim=0).to(gate_bias.dtype), du.sum(dim=0).to(up_bias.dtype))


def _qkv_linear_grad(ctx, dy):
    x, *weights_and_biases = ctx.saved_tensors
    weights = weights_and_biases[:3]
    x2 = x.reshape(-1, x.shape[-1])
    dys = dy.reshape(-1, dy.shape[-1]).split([w.shape[0] for w in weights], dim=-1)
    dx = sum(d @ w for d, w in zip(dys, weights, strict=True)).view(x.shape)
    weight_grads = tuple(d.t() @ x2 for d in dys)
    bias_grads = tuple(d.sum(dim=0) for d in dys) if ctx.has_bias else (None, None, None)
    return (dx, *weight_grads, *bias_grads)


linear_op = register_op("linear", _linear_impl, _linear_fake, backward=_linear_grad, setup_context=_save_inputs)
residual_linear_op = register_op("residual_linear", _residual_linear_impl, _residual_linear_fake,
                                backward=_residual_linear_grad, setup_context=_save_residual_linear_inputs)
swiglu_linear_op = register_op("swiglu_linear", _swiglu_linear_impl, _swiglu_linear_fake, backward=_swiglu_linear_grad,
                               setup_context=_save_inputs)
qkv_linear_op = register_op("qkv_linear", _qkv_linear_impl, _qkv_linear_fake, backward=_qkv_linear_grad,
                            setup_context=_save_inputs)


def linear(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """x (..., K) · weight (N, K)ᵀ + bias (N,) -> (..., N), differentiable, as F.linear. As the generated package's
    reference (ops/linear.py `linear`)."""
    return linear_op(x, weight, bias)


def residual_linear(x: Tensor, weight: Tensor, bias: Tensor | None, residual: Tensor) -> Tensor:
    """residual + (x (..., K) · weight (N, K)ᵀ + bias (N,)) -> (..., N), differentiable: a block's residual add in
    the epilogue of its feed-forward's last product (one launch where the add took another), the same bits as eager
    `residual + linear(x, weight, bias)`. As the generated package's reference (ops/linear.py `residual_linear`)."""
    return residual_linear_op(x, weight, bias, residual)


def swiglu_linear(x: Tensor, gate_weight: Tensor, up_weight: Tensor, gate_bias: Tensor | None = None,
                  up_bias: Tensor | None = None) -> Tensor:
    """silu(x · gate_weightᵀ + gate_bias) · (x · up_weightᵀ + up_bias): x (..., K), weights (H, K) -> (..., H),
    differentiable. As the generated package's reference (ops/linear.py `swiglu_linear`)."""
    return swiglu_linear_op(x, gate_weight, up_weight, gate_bias, up_bias)


def qkv_linear(x: Tensor, q_weight: Tensor, k_weight: Tensor, v_weight: Tensor, q_bias: Tensor | None = None,
               k_bias: Tensor | None = None, v_bias: Tensor | None = None) -> Tensor:
    """[x · q_weightᵀ + q_bias, x · k_weightᵀ + k_bias, x · v_weightᵀ + v_bias] side by side: x (..., K), q_weight
    (NQ, K), k_weight and v_weight (NKV, K) -> (..., NQ + 2·NKV), differentiable. As the generated package's reference
    (ops/linear.py `qkv_linear`)."""
    return qkv_linear_op(x, q_weight, k_weight, v_weight, q_bias, k_bias, v_bias)


def check_norm_weight(norm_weight: Tensor | None, x: Tensor, name: str) -> None:
    """A folded RMSNorm's weight: one value per feature of x, on its device."""
    if norm_weight is not None and (norm_weight.shape != x.shape[-1:] or norm_weight.device != x.device):
        raise ValueError(f"{name}: the norm's weight must be ({x.shape[-1]},) on {x.device}, got "
                         f"{tuple(norm_weight.shape)} on {norm_weight.device}")


def rms_norm_fold_reference(x: Tensor, norm_weight: Tensor, eps: float) -> Tensor:
    """RMSNorm(x) as the folded kernels apply it: in float32 (float64 for float64 inputs) and not rounded to x's
    dtype; a linear reference on it, rounded to x's dtype, is the folded product's truth."""
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    xf = x.to(acc)
    return xf * torch.rsqrt(xf.square().mean(-1, keepdim=True) + eps) * norm_weight.to(acc)


def linear_reference(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """The same in float32 (float64 for float64 inputs), rounded once to x's dtype."""
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    return F.linear(x.to(acc), weight.to(acc), bias.to(acc) if bias is not None else None).to(x.dtype)


def residual_linear_reference(x: Tensor, weight: Tensor, bias: Tensor | None, residual: Tensor) -> Tensor:
    """linear_reference rounded to x's dtype, then residual added in float32 (float64) and rounded once: eager
    `residual + y`'s arithmetic."""
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    return (residual.to(acc) + linear_reference(x, weight, bias).to(acc)).to(x.dtype)


def swiglu_linear_reference(x: Tensor, gate_weight: Tensor, up_weight: Tensor, gate_bias: Tensor | None = None,
                            up_bias: Tensor | None = None) -> Tensor:
    """The same in float32 (float64 for float64 inputs), rounded once to x's dtype."""
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    gate = F.linear(x.to(acc), gate_weight.to(acc), gate_bias.to(acc) if gate_bias is not None else None)
    up = F.linear(x.to(acc), up_weight.to(acc), up_bias.to(acc) if up_bias is not None else None)
    return (F.silu(gate) * up).to(x.dtype)


def qkv_linear_reference(x: Tensor, q_weight: Tensor, k_weight: Tensor, v_weight: Tensor, q_bias: Tensor | None = None,
                         k_bias: Tensor | None = None, v_bias: Tensor | None = None) -> Tensor:
    """The same in float32 (float64 for float64 inputs), rounded once to x's dtype."""
    products = [linear_reference(x, w, b) for w, b in ((q_weight, q_bias), (k_weight, k_bias), (v_weight, v_bias))]
    return torch.cat(products, dim=-1)


def decomposition(reference, max_seqlen: int) -> dict:
    """{archgen_v1::<op>: ops/linear.py's function of the same name}, for ONNX (the kernels file hands each kernel
    function's reference in turn: `linear`, `residual_linear`, `swiglu_linear` or `qkv_linear`)."""
    return {op_overload(reference.__name__): reference}
