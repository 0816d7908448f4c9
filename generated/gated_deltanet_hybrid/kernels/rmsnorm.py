"""RMSNorm, optionally fused with the residual add before it, as Triton kernels: forward, backward, the custom ops,
their autotune spaces, and the reference.

For rows x (R, N) of any leading shape flattened, weight w (N,)::

    rms_norm:      y = x / sqrt(mean(x², -1) + eps) * w
    add_rms_norm:  s = x + residual   (rounded to x's dtype, as the unfused `x + residual` would be)
                   y = rms_norm(s),   returns (y, s): s is the new residual stream

Everything inside runs in float32; y and s come back in x's dtype; the weight may be float32 or x's dtype. With
x̂ = s · rstd, rstd = 1 / sqrt(mean(s²) + eps) and dx̂ = dy · w, the backward is::

    ds = rstd · (dx̂ - x̂ · mean(dx̂ · x̂))  (+ ds_out, the gradient reaching s directly, for add_rms_norm)
    dw = Σ_rows dy · x̂                    dx = dresidual = ds

Why a kernel: unfused, the add, the square-mean, the scale and the weight are separate passes over the rows (eager
PyTorch reads and writes the (R, N) tensor several times over); here the forward reads x (and the residual) once and
writes y (and s) once; the backward reads dy, s (and ds_out) once and writes ds once. rstd (R,) float32 is saved by
the forward for the backward. The op is memory-bound: its floor is the copy bandwidth of the bytes it moves.

How. Forward: each program normalises a (BLOCK_R, BLOCK_N) tile, BLOCK_R whole rows (BLOCK_N = next_pow2(N) ≤ 65536)
held in registers: one row per program for wide rows, several for narrow ones, so every program moves enough bytes
to keep loads in flight (a program of one 64-wide row would be all launch overhead), with num_warps sized to the
tile; the weight is loaded once per program. Backward: programs take ROWS consecutive rows each, accumulate their
part of dw in registers, a (BLOCK_R, BLOCK_N) tile of rows at a time, and write it to a (programs, N) float32
buffer that torch sums: deterministic, no atomics.
When N is a power of two the column masks are compiled out (EVEN_N).

Tuning. The tuners `rms_norm.forward` and `rms_norm.backward` (triton_support.Autotuner) choose per shape bucket
(`shape_key`: width, rows (a power-of-two bucket), dtype, with or without the residual), from candidates sized to the
row (`forward_candidates` / `backward_candidates`, the untuned default first). `autotune(config, params, ...)` is the
hook `archgen build --autotune` calls: it runs both kernels at a model's shapes inside a tuning session.

Contents: `rms_norm` (with an optional residual: the generated model's call) and `add_rms_norm` (entry points,
differentiable: in eager mode through torch.autograd.Functions that call the ops' implementations directly, which
spares the host the custom ops' dispatch), the custom ops `archgen_v1::rms_norm`,
`archgen_v1::add_rms_norm` and `archgen_v1::rms_norm_backward` (one graph node each under torch.compile /
torch.export, with fake implementations and autograd), the launchers `rms_norm_forward` / `rms_norm_backward`,
`rms_norm_reference` / `add_rms_norm_reference`, and `decomposition` for ONNX. CPU tensors take the reference unless
TRITON_INTERPRET=1 and ARCHGEN_TRITON_ON_CPU=1 (the tests), as in kernels/selective_scan.py.
"""

import functools

import torch
import triton
import triton.language as tl
from torch import Tensor

from .triton_support import (
    Autotuner,
    calls_implementation_directly,
    dtype_name,
    gdc_launch_dependents,
    gdc_wait,
    on_device,
    op_overload,
    programmatic_launch,
    register_op,
    triton_on_cpu,
)

MAX_BLOCK_N = 65536
"""Widest row a program holds in registers (elements); wider rows raise (call the reference)."""
PDL_MAX_ROWS = 64
"""Forwards of at most this many rows (a decoding step's) launch programmatically where the device allows it
(triton_support.programmatic_launch); larger ones (prefill, training) do not: there a launch is long beside its start,
and the wait's ordering cost 7-8 more registers a thread in the 8-warp tiles (ptxas for sm_90, triton 3.6)."""

MAX_TILE = 16384
"""Most elements a forward program holds (BLOCK_R × BLOCK_N): beyond it the float32 tile spills registers."""

FORWARD_CONFIGS = [{"BLOCK_R": rows, "num_warps": warps} for rows in (1, 2, 4, 8, 16, 32) for warps in (2, 4, 8, 16)]
# A row of 4096 at 8 warps takes 38 registers a thread on sm_90, as Liger-Kernel's forward does (six programs per SM);
# capped at 32 (eight programs, no spills) it ran 135.6 µs against 134.7 (GPU call 3 of session 7): not tried further.
# One program per SM left the H200 idle (0.33 ms against 0.24 at 32768 × 4096 bf16) and a third stage never helped
# (GPU call 1 of session 6): those candidates only cost compiles.
# PREFETCH (the next tile loaded before this one's reduction) won every pairing at 32768 × 4096 bf16 on the H200,
# 0.234 ms against 0.254 (GPU call 2 of session 6); num_stages 2 never beat 1 (calls 1 and 2): tried no more.
BACKWARD_CONFIGS = [{"PER_SM": per_sm, "BLOCK_R": tile_rows, "num_warps": warps, "num_stages": 1, "PREFETCH": prefetch}
                    for per_sm in (2, 4) for tile_rows in (1, 2, 4, 8, 16) for warps in (4, 8, 16)
                    for prefetch in (0, 1)]
# The H200's choice (tiles of 2 rows at 16 warps, prefetched) takes 126 registers a thread on sm_90: one program per
# SM whatever PER_SM says. One row at 16 warps capped at 64 registers (two programs per SM, no spills) ran 231.6 µs
# against 226.5 (GPU call 3 of session 7): not tried further.
MAX_BACKWARD_TILE = 8192
"""Most elements a backward tile holds: it keeps four float32 tiles live (s, dy, ds and the dw accumulator)."""
MAX_STAGED_BYTES = 160 * 1024
"""Most shared memory the backward's software pipelining may stage (an H100/H200 SM has 228 KB)."""
INTERPRETER_CONFIG = {"BLOCK_R": 2, "PER_SM": 1, "num_warps": 4, "num_stages": 1, "PREFETCH": 1}
DW_TILE = 8192
"""Elements of the dw reduction's tile: every partial row (a power of two above the backward's programs) of
DW_TILE / rows columns, all loaded at once. At 32768 × 4096 bf16 on the H200 the partials are 264 rows: 16 columns
a program, 256 programs with one round trip each, where 128 programs of 32 columns walking 64 rows a step (five
dependent loads) took 7 µs, 2% of forward+backward (GPU call 3 of session 6)."""
INTERPRETER_MULTIPROCESSORS = 2
"""The SM count backward grids are sized for under the interpreter: small, so that programs take several rows."""
SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


# ---------------------------------------------------------------------------------------------------------------
# Kernels
# ---------------------------------------------------------------------------------------------------------------


@triton.jit
def _load_row(ptr, cols, N, EVEN_N: tl.constexpr):
    if EVEN_N:
        value = tl.load(ptr + cols)
    else:
        value = tl.load(ptr + cols, mask=cols < N, other=0.0)
    return value


@triton.jit
def _store_row(ptr, cols, value, N, EVEN_N: tl.constexpr):
    if EVEN_N:
        tl.store(ptr + cols, value)
    else:
        tl.store(ptr + cols, value, mask=cols < N)


@triton.jit
def _await_inputs(PDL: tl.constexpr):
    """Under programmatic launch: wait for the kernels ahead (before the first read of what they wrote and before any
    store), then let the next kernel launch: its programs start as this one's finish, its weights in flight."""
    if PDL:
        gdc_wait()
        gdc_launch_dependents()


@triton.jit
def _rms_norm_fwd_row(x_ptr, res_ptr, w_ptr, y_ptr, s_ptr, rstd_ptr, N, stride_x, stride_res, eps,
                      HAS_RESIDUAL: tl.constexpr, EVEN_N: tl.constexpr, BLOCK_N: tl.constexpr, PDL: tl.constexpr):
    """The forward of one row per program (BLOCK_R = 1) addressed as Liger-Kernel's is: the row's base a scalar
    pointer, 1-D column offsets, no cache hints. At 32768 × 4096 bf16 on the H200 Liger's forward ran in 0.133 ms and
    the 2-D tile of one row in 0.141 (GPU call 1 of session 6); the tuner measures both forms."""
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_N)
    w = _load_row(w_ptr, cols, N, EVEN_N).to(tl.float32)
    _await_inputs(PDL)
    x = _load_row(x_ptr + row * stride_x, cols, N, EVEN_N)
    if HAS_RESIDUAL:
        r = _load_row(res_ptr + row * stride_res, cols, N, EVEN_N)
        s = (x.to(tl.float32) + r.to(tl.float32)).to(x.dtype)  # rounded like the unfused add
        _store_row(s_ptr + row * N, cols, s, N, EVEN_N)
    else:
        s = x
    s = s.to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(s * s, axis=0) / N + eps)
    _store_row(y_ptr + row * N, cols, (s * rstd * w).to(y_ptr.dtype.element_ty), N, EVEN_N)
    tl.store(rstd_ptr + row, rstd)


@triton.jit
def _rms_norm_fwd_tile(x_ptr, res_ptr, w_ptr, y_ptr, s_ptr, rstd_ptr, R, N, stride_x, stride_res, eps,
                       HAS_RESIDUAL: tl.constexpr, EVEN_N: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr,
                       PDL: tl.constexpr):
    """The forward of BLOCK_R rows per program, a 2-D tile."""
    rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.arange(0, BLOCK_N)
    row_inside = rows < R
    if EVEN_N:
        inside = row_inside[:, None]
        w = tl.load(w_ptr + cols).to(tl.float32)
    else:
        inside = row_inside[:, None] & (cols < N)[None, :]
        w = tl.load(w_ptr + cols, mask=cols < N, other=0.0).to(tl.float32)
    _await_inputs(PDL)
    x = tl.load(x_ptr + rows[:, None] * stride_x + cols[None, :], mask=inside, other=0.0, eviction_policy="evict_first")
    if HAS_RESIDUAL:
        r = tl.load(res_ptr + rows[:, None] * stride_res + cols[None, :], mask=inside, other=0.0,
                    eviction_policy="evict_first")
        s = (x.to(tl.float32) + r.to(tl.float32)).to(x.dtype)  # rounded like the unfused add
        tl.store(s_ptr + rows[:, None] * N + cols[None, :], s, mask=inside)
    else:
        s = x
    s = s.to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(s * s, axis=1) / N + eps)
    y = s * rstd[:, None] * w[None, :]
    tl.store(y_ptr + rows[:, None] * N + cols[None, :], y.to(y_ptr.dtype.element_ty), mask=inside)
    tl.store(rstd_ptr + rows, rstd, mask=row_inside)


@triton.jit
def _rms_norm_fwd_kernel(
    x_ptr, res_ptr, w_ptr, y_ptr, s_ptr, rstd_ptr,
    R, N, stride_x, stride_res, eps,
    HAS_RESIDUAL: tl.constexpr, EVEN_N: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr,
    PDL: tl.constexpr,  # launched programmatically (triton_support.programmatic_launch): the weight loads first
):
    if BLOCK_R == 1:
        _rms_norm_fwd_row(x_ptr, res_ptr, w_ptr, y_ptr, s_ptr, rstd_ptr, N, stride_x, stride_res, eps, HAS_RESIDUAL,
                          EVEN_N, BLOCK_N, PDL)
    else:
        _rms_norm_fwd_tile(x_ptr, res_ptr, w_ptr, y_ptr, s_ptr, rstd_ptr, R, N, stride_x, stride_res, eps,
                           HAS_RESIDUAL, EVEN_N, BLOCK_R, BLOCK_N, PDL)


@triton.jit
def _tile_inside(row_inside, col_inside, EVEN_N: tl.constexpr):
    """The mask of a (rows, BLOCK_N) tile; with EVEN_N the columns need none (the loads stay vectorised)."""
    if EVEN_N:
        inside = row_inside[:, None]
    else:
        inside = row_inside[:, None] & col_inside[None, :]
    return inside


@triton.jit
def _rms_norm_bwd_tile(s_ptr, dy_ptr, rstd_ptr, rows, cols, inside, R, stride_s, stride_dy):
    """The backward's inputs for one tile of rows, as stored (s and dy in their dtype, rstd float32)."""
    s = tl.load(s_ptr + rows[:, None] * stride_s + cols[None, :], mask=inside, other=0.0, eviction_policy="evict_first")
    dy = tl.load(dy_ptr + rows[:, None] * stride_dy + cols[None, :], mask=inside, other=0.0,
                 eviction_policy="evict_first")
    rstd = tl.load(rstd_ptr + rows, mask=rows < R, other=0.0)
    return s, dy, rstd


@triton.jit
def _rms_norm_bwd_kernel(
    dy_ptr, ds_out_ptr, s_ptr, w_ptr, rstd_ptr, ds_ptr, dw_partial_ptr,
    R, N, rows_per_program, stride_dy, stride_ds_out, stride_s,
    HAS_DS_OUT: tl.constexpr, EVEN_N: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr,
    PREFETCH: tl.constexpr,  # load the next tile before reducing this one (its loads in flight across the reduction)
):
    program = tl.program_id(0)
    cols = tl.arange(0, BLOCK_N)
    col_inside = cols < N
    if EVEN_N:
        w = tl.load(w_ptr + cols).to(tl.float32)
    else:
        w = tl.load(w_ptr + cols, mask=col_inside, other=0.0).to(tl.float32)
    dw = tl.zeros((BLOCK_R, BLOCK_N), dtype=tl.float32)
    first = program.to(tl.int64) * rows_per_program
    last = tl.minimum(first + rows_per_program, R)  # this program's rows end here
    if PREFETCH:
        rows = first + tl.arange(0, BLOCK_R)
        s_next, dy_next, rstd_next = _rms_norm_bwd_tile(s_ptr, dy_ptr, rstd_ptr, rows, cols,
                                                        _tile_inside(rows < last, col_inside, EVEN_N), R, stride_s,
                                                        stride_dy)
    # tiles of BLOCK_R rows (rows_per_program is a multiple of BLOCK_R): rows past R load zeros and add nothing to
    # dw. Each row's reduction is a barrier across the program's warps: without PREFETCH no load of the next tile is
    # in flight while it waits (num_stages' software pipelining did not change that on the H200)
    for start in range(0, rows_per_program, BLOCK_R):
        rows = first + start + tl.arange(0, BLOCK_R)
        inside = _tile_inside(rows < R, col_inside, EVEN_N)
        if PREFETCH:
            s, dy, rstd = s_next, dy_next, rstd_next
            following = rows + BLOCK_R
            s_next, dy_next, rstd_next = _rms_norm_bwd_tile(s_ptr, dy_ptr, rstd_ptr, following, cols,
                                                            _tile_inside(following < last, col_inside, EVEN_N), R,
                                                            stride_s, stride_dy)
        else:
            s, dy, rstd = _rms_norm_bwd_tile(s_ptr, dy_ptr, rstd_ptr, rows, cols, inside, R, stride_s, stride_dy)
        x_hat = s.to(tl.float32) * rstd[:, None]
        dx_hat = dy.to(tl.float32) * w[None, :]
        ds = rstd[:, None] * (dx_hat - x_hat * (tl.sum(dx_hat * x_hat, axis=1) / N)[:, None])
        if HAS_DS_OUT:
            ds += tl.load(ds_out_ptr + rows[:, None] * stride_ds_out + cols[None, :], mask=inside, other=0.0,
                          eviction_policy="evict_first").to(tl.float32)
        tl.store(ds_ptr + rows[:, None] * N + cols[None, :], ds.to(ds_ptr.dtype.element_ty), mask=inside)
        dw += dy.to(tl.float32) * x_hat
    tl.store(dw_partial_ptr + program * N + cols, tl.sum(dw, axis=0), mask=col_inside)


@triton.jit
def _rms_norm_dw_kernel(partial_ptr, dw_ptr, programs, N, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
    """dw = the backward programs' (programs, N) float32 partials summed over programs, in a fixed order
    (deterministic), stored in dw's dtype: one launch where torch took a sum and a cast (two ops of host time)."""
    cols = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    col_inside = cols < N
    acc = tl.zeros((BLOCK_P, BLOCK_C), dtype=tl.float32)
    for first in range(0, programs, BLOCK_P):
        rows = first + tl.arange(0, BLOCK_P)
        acc += tl.load(partial_ptr + rows[:, None] * N + cols[None, :],
                       mask=(rows < programs)[:, None] & col_inside[None, :], other=0.0)
    tl.store(dw_ptr + cols, tl.sum(acc, axis=0).to(dw_ptr.dtype.element_ty), mask=col_inside)


# ---------------------------------------------------------------------------------------------------------------
# Launchers and their tuning
# ---------------------------------------------------------------------------------------------------------------


def _cdiv(a: int, b: int) -> int:
    """⌈a / b⌉ in plain Python: triton.cdiv costs microseconds of host time a call, and the launchers are on the
    host's critical path (see _EagerRMSNorm)."""
    return -(-a // b)


@functools.lru_cache(maxsize=256)
def _block_n(N: int) -> int:
    block = triton.next_power_of_2(N)
    if block > MAX_BLOCK_N:
        raise ValueError(f"rms_norm kernel holds rows of up to {MAX_BLOCK_N} elements, got {N}: use the reference")
    return block


@functools.lru_cache(maxsize=1024)
def shape_key(N: int, R: int, dtype: torch.dtype, fused: bool) -> str:
    """The tuners' shape bucket: width, rows as a power of two in [2^10, 2^17] (how many programs fill the GPU),
    dtype, and whether the residual is fused in (forward) or its gradient added (backward)."""
    rows = min(max(triton.next_power_of_2(max(R, 1)), 1 << 10), 1 << 17)
    return f"N{N}-R{rows}-{dtype_name(dtype)}-{'fused' if fused else 'plain'}"


def _warps_for(elements: int) -> int:
    """Warps for a tile of this many elements: about 8 to 16 elements per thread, 2 to 16 warps."""
    return min(max(elements // (32 * 16), 2), 16)


def forward_candidates(N: int) -> list[dict]:
    """The forward configs that suit rows of width N, the untuned default first: tiles of at most MAX_TILE elements
    (or one row), the default with enough rows that its tile holds ~4096 elements, warps with 4 to 32 elements per
    thread (each candidate is one more compile when tuning: the space stays small)."""
    block = _block_n(N)
    default_rows = min(max(4096 // block, 1), 32)
    default = {"BLOCK_R": default_rows, "num_warps": _warps_for(default_rows * block)}
    fitting = [c for c in FORWARD_CONFIGS if c["BLOCK_R"] * block <= max(MAX_TILE, block)
               and 4 <= max(c["BLOCK_R"] * block, 128) // (c["num_warps"] * 32) <= 32]
    return [default, *(c for c in fitting if c != default)]


def backward_candidates(N: int, itemsize: int = 4) -> list[dict]:
    """The backward configs that suit rows of width N and elements of `itemsize` bytes, the untuned default first:
    PER_SM programs per multiprocessor, each taking an equal run of rows (the dw partials torch sums are PER_SM × SMs
    rows, whatever R), in tiles of BLOCK_R rows of at most MAX_BACKWARD_TILE elements (or one row), warps with 4 to
    16 elements per thread, num_stages tiles in flight (software pipelining of the row loop) as far as the staged
    tiles fit in shared memory (MAX_STAGED_BYTES)."""
    block = _block_n(N)
    # The H200's choice at 32768 × 4096 bf16, plain and fused (GPU call 2 of session 6): tiles of 8192 elements,
    # 16 per thread, two programs per SM, the next tile prefetched
    tile_rows = min(max(8192 // block, 1), 16)
    warps = min(max(tile_rows * block // (32 * 16), 2), 16)
    default = {"PER_SM": 2, "BLOCK_R": tile_rows, "num_warps": warps, "num_stages": 1, "PREFETCH": 1}
    fitting = [c for c in BACKWARD_CONFIGS if c["BLOCK_R"] * block <= max(MAX_BACKWARD_TILE, block)
               and 4 <= max(c["BLOCK_R"] * block, 128) // (c["num_warps"] * 32) <= 16
               and _staged_bytes(c["BLOCK_R"] * block, itemsize, c["num_stages"]) <= MAX_STAGED_BYTES]
    return [default, *(c for c in fitting if c != default)]


def _staged_bytes(tile: int, itemsize: int, stages: int) -> int:
    """Shared memory a pipelined backward may stage: `stages` tiles of each streamed input (s, dy and ds_out)."""
    return 3 * tile * itemsize * stages if stages > 1 else 0


@functools.cache
def _multiprocessors(device: torch.device) -> int:
    if device.type != "cuda":
        return INTERPRETER_MULTIPROCESSORS
    return torch.cuda.get_device_properties(device).multi_processor_count


def backward_grid(R: int, device: torch.device, config: dict) -> tuple[int, int]:
    """(programs, rows_per_program) of a backward launch: at most PER_SM programs per multiprocessor, each taking
    an equal run of whole tiles (rows_per_program is a multiple of BLOCK_R), the last one possibly shorter."""
    return _backward_grid(R, _multiprocessors(device), config["BLOCK_R"], config["PER_SM"])


@functools.lru_cache(maxsize=1024)
def _backward_grid(R: int, multiprocessors: int, tile_rows: int, per_sm: int) -> tuple[int, int]:
    programs = max(min(_cdiv(R, tile_rows), multiprocessors * per_sm), 1)
    rows_per_program = _cdiv(_cdiv(R, programs), tile_rows) * tile_rows
    return _cdiv(R, rows_per_program), rows_per_program


@functools.lru_cache(maxsize=64)
def _dw_tile(programs: int) -> tuple[int, int]:
    """(partial rows, columns) of a dw reduction program: every partial row at once, DW_TILE elements in all."""
    rows = min(triton.next_power_of_2(programs), DW_TILE)
    return rows, max(DW_TILE // rows, 1)


FORWARD_TUNER = Autotuner("rms_norm.forward", FORWARD_CONFIGS, {"BLOCK_R": INTERPRETER_CONFIG["BLOCK_R"], "num_warps": 4})
BACKWARD_TUNER = Autotuner("rms_norm.backward", BACKWARD_CONFIGS, INTERPRETER_CONFIG)


def _rows(t: Tensor) -> tuple[Tensor, int]:
    """(t as rows of unit column stride, the stride between rows): t itself when contiguous (no view op on the host's
    path: the launchers are on it, see _EagerRMSNorm), else an (R, N) view, a copy when the last dim is strided."""
    if t.is_contiguous():
        return t, t.shape[-1]
    t = t.reshape(-1, t.shape[-1])
    t = t if t.stride(-1) == 1 else t.contiguous()
    return t, t.stride(0)


def rms_norm_forward(x: Tensor, residual: Tensor | None, weight: Tensor, eps: float,
                     config: dict | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """(y, s, rstd): y like x, contiguous (the kernels write rows N apart); s = x + residual likewise (x itself when
    residual is None); rstd (R,) float32.

    config: {"BLOCK_R": …, "num_warps": …} to bypass the tuner."""
    N = x.shape[-1]
    R = x.numel() // N
    x2, stride_x = _rows(x)
    res2, stride_res = _rows(residual) if residual is not None else (x2, 0)
    y = torch.empty(x.shape, device=x.device, dtype=x.dtype)  # contiguous: rows N apart
    s = torch.empty(x.shape, device=x.device, dtype=x.dtype) if residual is not None else x
    rstd = torch.empty((R,), device=x.device, dtype=torch.float32)
    block = _block_n(N)
    pdl = R <= PDL_MAX_ROWS and programmatic_launch(x.device)

    def launch(cfg):
        _rms_norm_fwd_kernel[(_cdiv(R, cfg["BLOCK_R"]),)](
            x2, res2, weight, y, s, rstd, R, N, stride_x, stride_res, eps,
            HAS_RESIDUAL=residual is not None, EVEN_N=N == block, BLOCK_R=cfg["BLOCK_R"], BLOCK_N=block, PDL=pdl,
            num_warps=cfg["num_warps"], launch_pdl=pdl,
        )

    key = shape_key(N, R, x.dtype, residual is not None)
    with on_device(x):
        if R:
            launch(FORWARD_TUNER.known(key, config) or FORWARD_TUNER.tune(key, launch, forward_candidates(N)))
    return y, s, rstd


def rms_norm_backward(dy: Tensor, ds_out: Tensor | None, s: Tensor, weight: Tensor, rstd: Tensor,
                      config: dict | None = None) -> tuple[Tensor, Tensor]:
    """(ds like s, dw like weight): the gradient reaching the normalised input (plus ds_out) and the weight's.

    config: {"PER_SM": …, "BLOCK_R": …, "num_warps": …, "num_stages": …, "PREFETCH": 0 or 1} to bypass the tuner.
    A launch, as the tuner times it, includes summing the dw partials: more programs per SM mean more partial rows
    (on the H200 torch summed 528 × 4096 of them in 16.5 µs, 7% of the kernel's time)."""
    N = s.shape[-1]
    R = s.numel() // N
    s2, stride_s = _rows(s)
    dy2, stride_dy = _rows(dy)
    ds_out2, stride_ds_out = _rows(ds_out) if ds_out is not None else (dy2, 0)
    ds = torch.empty(s.shape, device=s.device, dtype=s.dtype)  # contiguous: rows N apart
    dw = torch.empty_like(weight)
    block = _block_n(N)

    def launch(cfg):
        programs, rows_per_program = backward_grid(R, s.device, cfg)
        dw_partial = torch.empty((programs, N), device=s.device, dtype=torch.float32)
        _rms_norm_bwd_kernel[(programs,)](
            dy2, ds_out2, s2, weight, rstd, ds, dw_partial, R, N, rows_per_program, stride_dy, stride_ds_out, stride_s,
            HAS_DS_OUT=ds_out is not None, EVEN_N=N == block, BLOCK_R=cfg["BLOCK_R"], BLOCK_N=block,
            PREFETCH=bool(cfg.get("PREFETCH", 0)), num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
        )
        partial_rows, columns = _dw_tile(programs)
        _rms_norm_dw_kernel[(_cdiv(N, columns),)](
            dw_partial, dw, programs, N, BLOCK_P=partial_rows, BLOCK_C=columns, num_warps=4)

    key = shape_key(N, R, s.dtype, ds_out is not None)
    with on_device(s):
        if not R:
            return ds, torch.zeros_like(weight)
        launch(BACKWARD_TUNER.known(key, config)
               or BACKWARD_TUNER.tune(key, launch, backward_candidates(N, s.element_size())))
    return ds, dw


def autotune(config: dict, params: dict[str, tuple[int, ...]], batch: int, seqlen: int, dtype: torch.dtype,
             device: torch.device | str) -> None:
    """The build-time tuning hook (`archgen build --autotune`): run every kernel a norm op of this resolved config
    (eps) and these parameter shapes (weight (N,)) runs on batch × seqlen rows — forward and backward, plain and
    with the residual fused — so that inside triton_support.tuning_session() each tuner tunes that shape bucket."""
    (N,) = params["weight"]
    rows = batch * seqlen
    generator = torch.Generator(device=device).manual_seed(0)
    x, residual, dy = (torch.randn((rows, N), generator=generator, device=device).to(dtype) for _ in range(3))
    weight = torch.ones(N, device=device)
    for fused in (None, residual):
        _, s, rstd = rms_norm_forward(x, fused, weight, config["eps"])
        rms_norm_backward(dy, dy if fused is not None else None, s, weight, rstd)


# ---------------------------------------------------------------------------------------------------------------
# Custom ops
# ---------------------------------------------------------------------------------------------------------------


def _use_kernel(t: Tensor) -> bool:
    return t.is_cuda or triton_on_cpu()


def _rms_norm_impl(x: Tensor, weight: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    """archgen_v1::rms_norm -> (y, rstd); CPU tensors take the reference (rstd then computed alongside)."""
    if not _use_kernel(x):
        return rms_norm_reference(x, weight, eps), _rstd(x, eps)
    y, _, rstd = rms_norm_forward(x, None, weight, eps)
    return y, rstd


def _rms_norm_fake(x, weight, eps):  # the kernels' outputs are contiguous whatever x's layout
    return x.new_empty(x.shape), x.new_empty((x.numel() // x.shape[-1],), dtype=torch.float32)


def _add_rms_norm_impl(x: Tensor, residual: Tensor, weight: Tensor, eps: float) -> tuple[Tensor, Tensor, Tensor]:
    """archgen_v1::add_rms_norm -> (y, s, rstd)."""
    if not _use_kernel(x):
        y, s = add_rms_norm_reference(x, residual, weight, eps)
        return y, s, _rstd(s, eps)
    return rms_norm_forward(x, residual, weight, eps)


def _add_rms_norm_fake(x, residual, weight, eps):
    return x.new_empty(x.shape), x.new_empty(x.shape), x.new_empty((x.numel() // x.shape[-1],), dtype=torch.float32)


def _backward_impl(dy: Tensor, ds_out: Tensor | None, s: Tensor, weight: Tensor, rstd: Tensor) -> tuple[Tensor, Tensor]:
    """archgen_v1::rms_norm_backward -> (ds, dw)."""
    if not _use_kernel(s):
        return _backward_reference(dy, ds_out, s, weight, rstd)
    return rms_norm_backward(dy, ds_out, s, weight, rstd)


def _backward_fake(dy, ds_out, s, weight, rstd):
    return s.new_empty(s.shape), torch.empty_like(weight)


def _rstd(s: Tensor, eps: float) -> Tensor:
    s32 = s.reshape(-1, s.shape[-1]).float()
    return torch.rsqrt(s32.pow(2).mean(dim=-1) + eps)


def _backward_reference(dy, ds_out, s, weight, rstd):
    shape = s.shape
    s32, dy32 = s.reshape(-1, shape[-1]).float(), dy.reshape(-1, shape[-1]).float()
    x_hat = s32 * rstd[:, None]
    dx_hat = dy32 * weight.float()
    ds = rstd[:, None] * (dx_hat - x_hat * (dx_hat * x_hat).mean(dim=-1, keepdim=True))
    if ds_out is not None:
        ds = ds + ds_out.reshape(-1, shape[-1]).float()
    return ds.to(s.dtype).view(shape), (dy32 * x_hat).sum(dim=0).to(weight.dtype)


def _setup_rms_norm(ctx, inputs, output):
    x, weight, _eps = inputs
    _, rstd = output
    ctx.save_for_backward(x, weight, rstd)
    ctx.mark_non_differentiable(rstd)
    ctx.set_materialize_grads(False)  # rstd's gradient would be a zero-filled (R,) tensor the backward never reads
    ctx.backward = backward_op


def _rms_norm_grad(ctx, dy, _drstd):
    x, weight, rstd = ctx.saved_tensors
    dx, dw = ctx.backward(dy, None, x, weight, rstd)
    return dx, dw, None


def _setup_add_rms_norm(ctx, inputs, output):
    _x, _residual, weight, _eps = inputs
    _, s, rstd = output
    ctx.save_for_backward(s, weight, rstd)
    ctx.mark_non_differentiable(rstd)
    ctx.set_materialize_grads(False)
    ctx.backward = backward_op


def _add_rms_norm_grad(ctx, dy, ds_out, _drstd):
    s, weight, rstd = ctx.saved_tensors
    if dy is None:
        dy = torch.zeros_like(s)
    ds, dw = ctx.backward(dy, ds_out, s, weight, rstd)
    return ds, ds, dw, None


backward_op = register_op("rms_norm_backward", _backward_impl, _backward_fake)
rms_norm_op = register_op("rms_norm", _rms_norm_impl, _rms_norm_fake, backward=_rms_norm_grad,
                          setup_context=_setup_rms_norm)
add_rms_norm_op = register_op("add_rms_norm", _add_rms_norm_impl, _add_rms_norm_fake, backward=_add_rms_norm_grad,
                              setup_context=_setup_add_rms_norm)


class _EagerRMSNorm(torch.autograd.Function):
    """archgen_v1::rms_norm's implementation and autograd without the custom ops' dispatch, for eager mode. Through
    the custom ops (Python layers forward and again backward) a forward+backward at 32768 × 4096 bf16 took 0.59 ms on
    the H200 where its kernels summed 0.39 ms: the host, not the GPU, set the pace (Liger's autograd.Function: 0.57
    and 0.48). bench/norm_rope_router.py times both paths. torch.compile and torch.export take the custom ops, one
    graph node each."""

    @staticmethod
    def forward(ctx, x, weight, eps):
        y, rstd = _rms_norm_impl(x, weight, eps)
        _setup_rms_norm(ctx, (x, weight, eps), (y, rstd))
        ctx.backward = _backward_impl
        return y, rstd

    backward = staticmethod(_rms_norm_grad)


class _EagerAddRMSNorm(torch.autograd.Function):
    """archgen_v1::add_rms_norm's implementation and autograd without the custom ops' dispatch (see _EagerRMSNorm)."""

    @staticmethod
    def forward(ctx, x, residual, weight, eps):
        y, s, rstd = _add_rms_norm_impl(x, residual, weight, eps)
        _setup_add_rms_norm(ctx, (x, residual, weight, eps), (y, s, rstd))
        ctx.backward = _backward_impl
        return y, s, rstd

    backward = staticmethod(_add_rms_norm_grad)



# ---------------------------------------------------------------------------------------------------------------
# Entry points and references
# ---------------------------------------------------------------------------------------------------------------


def _check(x: Tensor, weight: Tensor, residual: Tensor | None = None) -> None:
    if x.dtype not in SUPPORTED_DTYPES:
        raise ValueError(f"rms_norm takes {SUPPORTED_DTYPES}, got x of {x.dtype}")
    if weight.shape != (x.shape[-1],):
        raise ValueError(f"weight must be ({x.shape[-1]},) for x of shape {tuple(x.shape)}, got {tuple(weight.shape)}")
    if residual is not None and (residual.shape != x.shape or residual.dtype != x.dtype):
        raise ValueError(f"residual must match x: {tuple(residual.shape)} {residual.dtype} vs "
                         f"{tuple(x.shape)} {x.dtype}")


def rms_norm(x: Tensor, weight: Tensor, eps: float, residual: Tensor | None = None):
    """y = x / sqrt(mean(x², -1) + eps) * weight, differentiable; x (..., N), weight (N,); y like x. Given the
    residual stream: `add_rms_norm(x, residual, weight, eps)`, (y, s) with s = x + residual, in one kernel. The
    signature of the generated package's reference (ops/norm.py `rms_norm`)."""
    if residual is not None:
        return add_rms_norm(x, residual, weight, eps)
    _check(x, weight)
    y, _ = _EagerRMSNorm.apply(x, weight, eps) if calls_implementation_directly(x) else rms_norm_op(x, weight, eps)
    return y


def add_rms_norm(x: Tensor, residual: Tensor, weight: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    """(rms_norm(s), s) with s = x + residual, differentiable in x, residual and weight; both in the dtype of x + residual.

    Under bf16 autocast a layer's bf16 output meets a float32 residual stream: as the reference's sum does, both go up
    to the promoted dtype first (the kernel reads one dtype)."""
    if x.dtype != residual.dtype:
        dtype = torch.promote_types(x.dtype, residual.dtype)
        x, residual = x.to(dtype), residual.to(dtype)
    _check(x, weight, residual)
    op = _EagerAddRMSNorm.apply if calls_implementation_directly(x) else add_rms_norm_op
    y, s, _ = op(x, residual, weight, eps)
    return y, s


def rms_norm_reference(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    """The definition, in float32 (float64 stays float64), one cast back to x's dtype."""
    dtype = torch.promote_types(x.dtype, torch.float32)
    x32 = x.to(dtype)
    return (x32 * torch.rsqrt(x32.pow(2).mean(dim=-1, keepdim=True) + eps) * weight.to(dtype)).to(x.dtype)


def add_rms_norm_reference(x: Tensor, residual: Tensor, weight: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    s = x + residual
    return rms_norm_reference(s, weight, eps), s


def decomposition(reference=None, max_seqlen: int | None = None) -> dict:
    """{archgen_v1::rms_norm, archgen_v1::add_rms_norm: the op written with the references}: how exporters that
    cannot run Triton (ONNX) lower them (program.run_decompositions(table)). reference: a generated package's
    `rms_norm` reference op (x, weight, eps) -> y (default: this file's); max_seqlen is not needed (rows are
    independent) and accepted for the common signature of kernels' decompositions."""
    reference = rms_norm_reference if reference is None else reference

    def rms_norm_decomposed(x, weight, eps):
        return reference(x, weight, eps), _rstd(x, eps)

    def add_rms_norm_decomposed(x, residual, weight, eps):
        s = x + residual
        return reference(s, weight, eps), s, _rstd(s, eps)

    return {op_overload("rms_norm"): rms_norm_decomposed, op_overload("add_rms_norm"): add_rms_norm_decomposed}
