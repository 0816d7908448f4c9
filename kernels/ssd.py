"""Mamba-2 SSD (state space duality) chunked scan as Triton kernels: forward, backward, the custom ops, the reference.

Per batch b and head h (of H = G·R heads in G groups of R; head h reads B and C of group h // R)::

    Δ_t = softplus(dt_t + dt_bias)            (dt_t + dt_bias without dt_softplus; dt_t alone without a bias)
    h_t = exp(Δ_t A) · h_{t-1} + Δ_t · x_t ⊗ B_t          h_t (P, N), h_{-1} = initial_state or 0
    y_t = h_t C_t + D · x_t

Shapes as in templates/runtime/ssd.py (ops/ssd.py of a generated package, which applies the softplus itself and
passes Δ): x (B, T, H, P), dt (B, T, H), A (H,), B and C (B, T, G, N), D and dt_bias (H,), initial_state and the final
state (B, H, P, N). x, B and C may be float32, float16 or bfloat16 and strided (the Mamba-2 block hands over views of
its projection); y comes back in x's dtype, the final state in float32.

The algorithm is the SSD paper's chunked form (Dao & Gu, 2024, section 6). Split time into chunks of L positions;
within a chunk let cum_t = Σ_{i≤t} Δ_i A (a prefix sum, ≤ 0 and decreasing) so that the decay from s to t is
exp(cum_t - cum_s) ≤ 1. With H_c the state entering chunk c:

    y_t = Σ_{s≤t} (C_t·B_s) exp(cum_t - cum_s) Δ_s x_s  +  exp(cum_t) H_c C_t  +  D x_t        (intra + from state)
    H_{c+1} = exp(cum_{L-1}) H_c  +  Σ_s exp(cum_{L-1} - cum_s) Δ_s x_s ⊗ B_s                  (state passing)

Every product of x, B, C and the states runs as a matrix product on the tensor cores (tl.dot, float32 accumulation;
full float32 for float32 inputs), every decay and sum in float32. For half inputs an input (x, B, C, dy) is an operand
as it came; a float32 operand (a chunk state, or an input weighted by decays) is split in two half parts, the rounded
value and what rounding lost (`_split_dot`), wherever the gradients of the decays need it (below). Forward, four
launches:

  1. `_dt_cumsum_kernel`: Δ (bias, softplus) and the in-chunk prefix sums cum, (B, H, c·L) float32 each.
  2. `_chunk_cb_kernel`: C_c B_c^T per group and chunk (B, c, G, L, L), zeros above the diagonal; it is shared by the
     R heads of a group (a group of 64 heads computes it once, not 64 times), and the backward reuses it.
  3. `_state_fwd_kernel`: per (batch, head, tile of the (P, N) state), a loop over the chunks that stores H_c and
     adds the chunk's x^T (B ⊙ decay·Δ) product: the inter-chunk recurrence and the chunk states in one pass, so the
     chunk states never reach memory. H_c is stored split (`_store_state`: as its two half parts for half inputs).
  4. `_output_fwd_kernel`: per (head, chunk, block of rows): exp(cum) C H_c^T, then the causal blocks of
     (CB ⊙ decay ⊙ Δ) x, plus D x.

Backward, with dy the output's gradient and G_c = dL/dH_{c+1} (the gradient of the state after chunk c):

  1. `_state_bwd_kernel`: the adjoint of state passing, chunks in reverse: stores G_c and advances
     G_{c-1} = exp(cum_{L-1}) G_c + Σ_t exp(cum_t) dy_t ⊗ C_t; what leaves chunk 0 is dL/d initial_state.
  2. `_dx_bwd_kernel` (rows s of a chunk, one head): dx_s = Δ_s·inner_s + D dy_s with
     inner_s = Σ_{t≥s} (C_t·B_s) exp(cum_t - cum_s) dy_t + exp(cum_{L-1} - cum_s) G_c B_s, and the direct part of
     dΔ_s (x_s·inner_s).
  3. `_dcb_bwd_kernel` (one (t, s) tile of a chunk, looping over the heads of a group): dCB[t, s] = Σ_h M_h[t, s],
     M[t, s] = (dy_t·x_s) Δ_s exp(cum_t - cum_s), the gradient of C_t·B_s summed over the group's heads; from the same
     dy·x products each head's pair terms of the log-decay gradient (below).
  4. `_db_bwd_kernel` (rows s) and `_dc_bwd_kernel` (rows t): dB and dC, per group: the state terms summed over the
     heads in registers (x_s G_c, dy_t H_c, one product per head), the intra-chunk terms once per group (dCB^T C,
     dCB B), not once per head as the forward's structure would have it. A split of the heads and of the blocks per
     program; the splits are added after.
  5. `_dt_bwd_kernel`: the gradient of the log decays Δ_i A, and from it dΔ (through the softplus), dA, d dt_bias.
One accumulator per kernel: fused further, the same work spilled registers on sm_90.

The log-decay gradient is summed the stable way: cum_t - cum_s = Σ_{s<i≤t} Δ_i A, so d(Δ_i A) collects, for every
pair s < i ≤ t, Q[t, s] = dy_t·(the (t, s) term of y) = M[t, s] CB[t, s], never as a difference of large row and
column sums that would cancel. Kernel 3 sums the pairs of each tile apart: a diagonal tile's as a running prefix
sum along its rows; an off-diagonal tile's column sums (for i in the s block) and row sums (i in the t block and
the blocks strictly between) go to kernel 5, which takes exclusive prefix sums of the column sums within each block
and, per s block, a reverse prefix sum of the row sums of its tiles over the rest of the chunk (a row suffix in the
tile's own t block and, past it, whole tiles' totals); likewise exclusive / reverse prefix sums for the state
terms. Reductions are deterministic (no atomics): per-program partial sums that torch or the next
kernel adds up.

That sum still nearly cancels against dΔ's direct part x_s·inner_s (a dt_bias gradient is much smaller than either),
so both must come from the same float32 values: the chunk states H_c and G_c are float32 sums of split products (the
state kernels split x's weights B ⊙ decay·Δ and dy ⊙ exp(cum)), stored as their two half parts (split once, where
they are built), which the dx, dB and dC kernels multiply part by part, and dx splits CB ⊙ decay. Rounding any one
of them to bf16 left d dt_bias and dA at 5e-4 - 8e-4 from float64 where the float32 reference is at 1e-6 (3 chunks
of 64, P 64, N 128).

T need not be a multiple of the chunk: positions past T get Δ = 0 (decay 1, no input) and every load past T is
masked. L (chunk_size) must be a power of two ≥ 16; the result does not depend on it beyond rounding.

Contents: `ssd_scan` (the entry point, CUDA tensors), the custom ops `archgen_v1::ssd_scan` and
`archgen_v1::ssd_scan_backward` (one graph node each under torch.compile / torch.export, with fake implementations and
autograd), the launchers `ssd_scan_forward` / `ssd_scan_backward`, the autotune spaces and their tuners (TUNERS, named
ssd.<kernel> in triton_support's tuning tables), `ssd_scan_reference` (a plain loop over time with the same signature:
the tests' ground truth and the op's CPU path), and `decomposition` (the op written with ops/ssd.py's `ssd_scan`, for
ONNX). Needs triton and triton_support.py next to it.
"""

import math

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from torch import Tensor

from .triton_support import (
    Autotuner,
    dtype_name,
    interpreting,
    on_device,
    op_overload,
    register_op,
    rounded,
    softplus,
    strided,
    triton_on_cpu,
)

CHUNK_SIZE = 256
"""The default chunk length L: the intra-chunk products are (L, L) per head, the states are stored once per chunk."""

SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

# Autotune spaces, kept small: every config of every kernel is compiled once per process on the first call of a key.
# Each holds configs that compile for sm_90 at P = 64, N = 128 without register spills, or with few (checked ahead of
# time with triton.compile for GPUTarget("cuda", 90, 32) and cuobjdump -res-usage; no GPU needed). The first config of
# each is the one the H200 chose at Bamba's shape (B8 L4096 H64x64 N128 chunk 256 bf16; bench/ssm_kernels.py
# ssd_timing): a package that does not tune at run time launches it. A 64-row tile is one warpgroup's wgmma: at
# 8 warps every kernel with 64-row tiles ran 1.2-1.9x slower there, and 128-row tiles at 8 warps 1.2-1.5x slower.
# With the states stored split (`_store_state`) the state kernels' first configs take 238 and 248 registers, BLOCK_L 32
# at 4 warps 176 and 232, no spills (triton 3.6); the H200 chose BLOCK_L 64 forward, 32 backward (session 9, call 2).
# BLOCK_T is the rows of the (L, L) intra-chunk tiles; BLOCK_P, BLOCK_N, BLOCK_L tile the (P, N) state loops; HEAD_SPLIT
# splits a group's heads over that many programs (more parallelism when B·c·G is small; partial sums are added after).
# BLOCK_N 32 halves the registers (state_fwd 102 at BLOCK_L 64, 96 at 32; state_bwd 138 and 104) and doubles the
# programs (B·H·2 = 1024 at Bamba's shape, four waves of two an SM), for x (dy) read once more per program.
STATE_CONFIGS = [
    {"BLOCK_P": 64, "BLOCK_N": 64, "BLOCK_L": 64, "num_warps": 4, "num_stages": 3},
    {"BLOCK_P": 64, "BLOCK_N": 64, "BLOCK_L": 32, "num_warps": 8, "num_stages": 3},
    {"BLOCK_P": 64, "BLOCK_N": 64, "BLOCK_L": 32, "num_warps": 4, "num_stages": 3},
    {"BLOCK_P": 64, "BLOCK_N": 32, "BLOCK_L": 64, "num_warps": 4, "num_stages": 3},
    {"BLOCK_P": 64, "BLOCK_N": 32, "BLOCK_L": 32, "num_warps": 4, "num_stages": 3},
]
CB_CONFIGS = [{"BLOCK_T": 64, "num_warps": 4, "num_stages": 2}, {"BLOCK_T": 128, "num_warps": 8, "num_stages": 2}]
OUTPUT_CONFIGS = [
    {"BLOCK_T": 64, "num_warps": 4, "num_stages": 2},
    {"BLOCK_T": 64, "num_warps": 4, "num_stages": 3},
    {"BLOCK_T": 32, "num_warps": 4, "num_stages": 2},
]
STATE_BWD_CONFIGS = [
    {"BLOCK_P": 64, "BLOCK_N": 64, "BLOCK_L": 64, "num_warps": 4, "num_stages": 3},
    {"BLOCK_P": 64, "BLOCK_N": 64, "BLOCK_L": 64, "num_warps": 8, "num_stages": 3},
    {"BLOCK_P": 64, "BLOCK_N": 64, "BLOCK_L": 32, "num_warps": 4, "num_stages": 3},
    {"BLOCK_P": 64, "BLOCK_N": 32, "BLOCK_L": 32, "num_warps": 4, "num_stages": 3},
    {"BLOCK_P": 64, "BLOCK_N": 32, "BLOCK_L": 64, "num_warps": 4, "num_stages": 3},
]
# dx: 168 registers at BLOCK_T 64, 4 warps, 2 stages (x and dy reread at the end rather than held: 247 before), so
# three programs share an SM where two did; 3 stages 208, 1 stage 166, BLOCK_T 32 168 (triton 3.6, no spills).
DX_BWD_CONFIGS = [
    {"BLOCK_T": 64, "num_warps": 4, "num_stages": 2},
    {"BLOCK_T": 64, "num_warps": 4, "num_stages": 3},
    {"BLOCK_T": 64, "num_warps": 4, "num_stages": 1},
    {"BLOCK_T": 32, "num_warps": 4, "num_stages": 2},
]
GROUP_BWD_CONFIGS = [
    {"BLOCK_T": 64, "HEAD_SPLIT": 4, "num_warps": 4, "num_stages": 2},
    {"BLOCK_T": 64, "HEAD_SPLIT": 8, "num_warps": 4, "num_stages": 2},
    {"BLOCK_T": 32, "HEAD_SPLIT": 8, "num_warps": 4, "num_stages": 2},
]
# dcb (registers of the diagonal / the other tiles' launch, triton 3.6, no spills): BLOCK_T 64 at 4 warps 255 / 189
# (either HEAD_SPLIT, 2 or 3 stages), at 8 warps 162 / 128; BLOCK_T 32 at 4 warps 120 / 96.
DCB_BWD_CONFIGS = [
    {"BLOCK_T": 64, "HEAD_SPLIT": 4, "num_warps": 4, "num_stages": 2},
    {"BLOCK_T": 64, "HEAD_SPLIT": 8, "num_warps": 4, "num_stages": 2},
    {"BLOCK_T": 64, "HEAD_SPLIT": 4, "num_warps": 8, "num_stages": 2},
    {"BLOCK_T": 64, "HEAD_SPLIT": 4, "num_warps": 4, "num_stages": 3},
    {"BLOCK_T": 32, "HEAD_SPLIT": 4, "num_warps": 4, "num_stages": 2},
]
INTERPRETER_CONFIGS = {
    "state": {"BLOCK_P": 16, "BLOCK_N": 16, "BLOCK_L": 16, "num_warps": 4, "num_stages": 1},
    "cb": {"BLOCK_T": 16, "num_warps": 4, "num_stages": 1},
    "output": {"BLOCK_T": 16, "num_warps": 4, "num_stages": 1},
    "group_bwd": {"BLOCK_T": 16, "HEAD_SPLIT": 2, "num_warps": 4, "num_stages": 1},
}
"""The configs under TRITON_INTERPRET=1: small blocks, so the tests' small chunks still hold several blocks."""


# ---------------------------------------------------------------------------------------------------------------
# Kernels
# ---------------------------------------------------------------------------------------------------------------


_EMULATE_HALF_DOT = tl.constexpr(interpreting())
"""Triton's interpreter computes tl.dot on bfloat16 operands as integers (it stores them as uint16): there the
operands are rounded to their half dtype (to nearest, `rounded`) and multiplied in float32, which is what the tensor
cores compute."""


@triton.jit
def _operand(value, dot_ty: tl.constexpr):
    """value as a tl.dot operand of type dot_ty (see _EMULATE_HALF_DOT)."""
    if _EMULATE_HALF_DOT:
        operand = rounded(value, dot_ty).to(tl.float32)
    else:
        operand = value.to(dot_ty)
    return operand


@triton.jit
def _halves(value, dot_ty: tl.constexpr):
    """A float32 value as two dot_ty operands: high = value rounded and low = what that rounding lost."""
    high = rounded(value, dot_ty)
    low = rounded(value - high.to(tl.float32), dot_ty)
    return _operand(high, dot_ty), _operand(low, dot_ty)


@triton.jit
def _split_dot(a, b, acc, dot_ty: tl.constexpr, DOT_PRECISION: tl.constexpr, SPLIT: tl.constexpr):
    """acc + a·b where the float32 operand SPLIT ("a" or "b") is computed or stored and the other is held in dot_ty.
    For half inputs the float32 operand is split in two half parts (`_halves`) and both are multiplied: a·b to about
    16 significant bits of it (bfloat16 alone keeps 8) for a second half product, which costs the tensor cores what
    one tf32 product of float32 operands would (and keeps the other operand in half registers)."""
    if dot_ty == tl.float32:
        acc = tl.dot(_operand(a, dot_ty), _operand(b, dot_ty), acc, input_precision=DOT_PRECISION)
    elif SPLIT == "a":
        high, low = _halves(a, dot_ty)
        acc = tl.dot(high, _operand(b, dot_ty), acc, input_precision=DOT_PRECISION)
        acc = tl.dot(low, _operand(b, dot_ty), acc, input_precision=DOT_PRECISION)
    else:
        high, low = _halves(b, dot_ty)
        acc = tl.dot(_operand(a, dot_ty), high, acc, input_precision=DOT_PRECISION)
        acc = tl.dot(_operand(a, dot_ty), low, acc, input_precision=DOT_PRECISION)
    return acc


@triton.jit
def _store_state(ptr, index, offs, value, mask, size):
    """Store the float32 state `value` (one tile of state number `index`, `size` elements each) as the products that
    read it take it: for half inputs (ptr of their half dtype) its two parts (`_halves`: the rounded value at
    2·index·size, what rounding lost at (2·index + 1)·size), split once here rather than by every program that
    multiplies it; for float32 inputs as is, at index·size."""
    ty = ptr.dtype.element_ty
    if ty == tl.float32:
        tl.store(ptr + index * size + offs, value, mask=mask)
    else:
        high = rounded(value, ty)
        tl.store(ptr + 2 * index * size + offs, high, mask=mask)
        tl.store(ptr + (2 * index + 1) * size + offs, rounded(value - high.to(tl.float32), ty), mask=mask)


@triton.jit
def _load_state(ptr, index, offs, mask, size, HIGH_ONLY: tl.constexpr):
    """A tile of a state stored by `_store_state`, in float32: the sum of its parts, or HIGH_ONLY its rounded part."""
    ty = ptr.dtype.element_ty
    if ty == tl.float32:
        value = tl.load(ptr + index * size + offs, mask=mask, other=0.0)
    else:
        value = tl.load(ptr + 2 * index * size + offs, mask=mask, other=0.0).to(tl.float32)
        if not HIGH_ONLY:
            value += tl.load(ptr + (2 * index + 1) * size + offs, mask=mask, other=0.0).to(tl.float32)
    return value


@triton.jit
def _state_dot(a, ptr, index, offs, mask, size, acc, DOT_PRECISION: tl.constexpr):
    """acc + a·S for a tile S of a state stored by `_store_state` (offs index it as the second operand): for half
    inputs a times each part, as `_split_dot` would multiply the float32 state, with the parts loaded straight into
    the product (no float32 tile and no rounding in registers)."""
    ty = ptr.dtype.element_ty
    if ty == tl.float32:
        acc = tl.dot(_operand(a, ty), tl.load(ptr + index * size + offs, mask=mask, other=0.0), acc,
                     input_precision=DOT_PRECISION)
    else:
        a = _operand(a, ty)
        high = tl.load(ptr + 2 * index * size + offs, mask=mask, other=0.0)
        acc = tl.dot(a, _operand(high, ty), acc, input_precision=DOT_PRECISION)
        low = tl.load(ptr + (2 * index + 1) * size + offs, mask=mask, other=0.0)
        acc = tl.dot(a, _operand(low, ty), acc, input_precision=DOT_PRECISION)
    return acc


@triton.jit
def _dt_cumsum_kernel(
    dt_ptr, dt_stride_b, dt_stride_t, dt_stride_h,
    A_ptr, bias_ptr,
    dtp_ptr, cum_ptr,  # (B, H, c·L) float32, contiguous
    seqlen, nheads, padded_len,
    HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr, CHUNK: tl.constexpr,
):
    pid_bh = tl.program_id(0)
    chunk = tl.program_id(1)
    b = pid_bh // nheads
    h = pid_bh % nheads
    pos = chunk * CHUNK + tl.arange(0, CHUNK)
    t_in = pos < seqlen
    dt = tl.load(dt_ptr + b.to(tl.int64) * dt_stride_b + pos * dt_stride_t + h * dt_stride_h, mask=t_in,
                 other=0.0).to(tl.float32)
    if HAS_BIAS:
        dt += tl.load(bias_ptr + h).to(tl.float32)
    if SOFTPLUS:
        dt = softplus(dt)
    dt = tl.where(t_in, dt, 0.0)  # positions past T: decay 1, no input
    cum = tl.cumsum(dt * tl.load(A_ptr + h).to(tl.float32), axis=0)
    base = pid_bh.to(tl.int64) * padded_len
    tl.store(dtp_ptr + base + pos, dt)
    tl.store(cum_ptr + base + pos, cum)


@triton.jit
def _chunk_cb_kernel(
    C_ptr, C_stride_b, C_stride_t, C_stride_g, C_stride_n,
    B_ptr, B_stride_b, B_stride_t, B_stride_g, B_stride_n,
    cb_ptr,  # (B, c, G, L, L) float32, contiguous
    seqlen, ngroups, nchunks, dstate,
    DOT_PRECISION: tl.constexpr, CHUNK: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_T: tl.constexpr,
):
    n_blocks: tl.constexpr = CHUNK // BLOCK_T
    tile = tl.program_id(0)
    chunk_group = tl.program_id(1)
    b = tl.program_id(2)
    tb = tile // n_blocks
    sb = tile % n_blocks
    chunk = chunk_group // ngroups
    g = chunk_group % ngroups
    t_loc = tb * BLOCK_T + tl.arange(0, BLOCK_T)
    s_loc = sb * BLOCK_T + tl.arange(0, BLOCK_T)
    cb_base = ((b.to(tl.int64) * nchunks + chunk) * ngroups + g) * CHUNK * CHUNK
    cb_ptrs = cb_ptr + cb_base + t_loc[:, None] * CHUNK + s_loc[None, :]
    if sb > tb:  # above the diagonal the decay mask is zero: zeros, for the kernels tiling the chunk at other sizes
        tl.store(cb_ptrs, tl.zeros((BLOCK_T, BLOCK_T), dtype=tl.float32))
        return
    n = tl.arange(0, BLOCK_N)
    n_in = n < dstate
    pos_t = chunk * CHUNK + t_loc
    pos_s = chunk * CHUNK + s_loc
    C_t = tl.load(C_ptr + b.to(tl.int64) * C_stride_b + pos_t[:, None] * C_stride_t + g * C_stride_g
                  + n[None, :] * C_stride_n, mask=(pos_t < seqlen)[:, None] & n_in[None, :], other=0.0)
    B_sT = tl.load(B_ptr + b.to(tl.int64) * B_stride_b + pos_s[None, :] * B_stride_t + g * B_stride_g
                   + n[:, None] * B_stride_n, mask=(pos_s < seqlen)[None, :] & n_in[:, None], other=0.0)
    dot_ty = C_ptr.dtype.element_ty
    cb = tl.dot(_operand(C_t, dot_ty), _operand(B_sT, dot_ty), input_precision=DOT_PRECISION)
    tl.store(cb_ptrs, cb)


@triton.jit
def _state_fwd_kernel(
    x_ptr, x_stride_b, x_stride_t, x_stride_h, x_stride_p,
    B_ptr, B_stride_b, B_stride_t, B_stride_g, B_stride_n,
    dtp_ptr, cum_ptr,
    init_ptr, init_stride_b, init_stride_h, init_stride_p, init_stride_n,
    enter_ptr,  # (B, c, H, [2,] P, N), contiguous: the state entering each chunk (`_store_state`)
    final_ptr,  # (B, H, P, N) float32, contiguous
    seqlen, nheads, heads_per_group, headdim, dstate, nchunks, padded_len,
    HAS_INIT: tl.constexpr, DOT_PRECISION: tl.constexpr, CHUNK: tl.constexpr,
    BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_L: tl.constexpr,
):
    pid_bh = tl.program_id(0)
    b = pid_bh // nheads
    h = pid_bh % nheads
    g = h // heads_per_group
    p = tl.program_id(1) * BLOCK_P + tl.arange(0, BLOCK_P)
    n = tl.program_id(2) * BLOCK_N + tl.arange(0, BLOCK_N)
    p_in = p < headdim
    n_in = n < dstate
    pn_in = p_in[:, None] & n_in[None, :]
    dot_ty = x_ptr.dtype.element_ty
    if HAS_INIT:
        state = tl.load(init_ptr + b.to(tl.int64) * init_stride_b + h * init_stride_h + p[:, None] * init_stride_p
                        + n[None, :] * init_stride_n, mask=pn_in, other=0.0).to(tl.float32)
    else:
        state = tl.zeros((BLOCK_P, BLOCK_N), dtype=tl.float32)
    dt_base = pid_bh.to(tl.int64) * padded_len
    x_base = x_ptr + b.to(tl.int64) * x_stride_b + h * x_stride_h
    B_base = B_ptr + b.to(tl.int64) * B_stride_b + g * B_stride_g
    state_offs = p[:, None] * dstate + n[None, :]
    # One loop over the pieces of every chunk, not a loop over the pieces inside a loop over the chunks: the loads
    # stream through the software pipeline without draining it at each chunk boundary.
    steps: tl.constexpr = CHUNK // BLOCK_L
    chunk_state = tl.zeros((BLOCK_P, BLOCK_N), dtype=tl.float32)
    for i in range(nchunks * steps):
        chunk = i // steps
        l0 = (i % steps) * BLOCK_L
        if l0 == 0:
            _store_state(enter_ptr, (b.to(tl.int64) * nchunks + chunk) * nheads + h, state_offs, state, pn_in,
                         headdim * dstate)
        cum_last = tl.load(cum_ptr + dt_base + chunk * CHUNK + CHUNK - 1)
        pos = chunk * CHUNK + l0 + tl.arange(0, BLOCK_L)
        t_in = pos < seqlen
        x_T = tl.load(x_base + pos[None, :] * x_stride_t + p[:, None] * x_stride_p,
                      mask=p_in[:, None] & t_in[None, :], other=0.0)  # (P, L)
        B_l = tl.load(B_base + pos[:, None] * B_stride_t + n[None, :] * B_stride_n,
                      mask=t_in[:, None] & n_in[None, :], other=0.0)  # (L, N)
        weight = tl.exp(cum_last - tl.load(cum_ptr + dt_base + pos)) * tl.load(dtp_ptr + dt_base + pos)
        chunk_state = _split_dot(x_T, B_l.to(tl.float32) * weight[:, None], chunk_state, dot_ty, DOT_PRECISION,
                                 SPLIT="b")
        if l0 == CHUNK - BLOCK_L:
            state = state * tl.exp(cum_last) + chunk_state
            chunk_state = tl.zeros((BLOCK_P, BLOCK_N), dtype=tl.float32)
    tl.store(final_ptr + pid_bh.to(tl.int64) * headdim * dstate + state_offs, state, mask=pn_in)


@triton.jit
def _output_fwd_kernel(
    x_ptr, x_stride_b, x_stride_t, x_stride_h, x_stride_p,
    C_ptr, C_stride_b, C_stride_t, C_stride_g, C_stride_n,
    D_ptr,
    dtp_ptr, cum_ptr, cb_ptr, enter_ptr,
    y_ptr, y_stride_b, y_stride_t, y_stride_h, y_stride_p,
    seqlen, nheads, heads_per_group, ngroups, headdim, dstate, nchunks, padded_len,
    HAS_D: tl.constexpr, DOT_PRECISION: tl.constexpr, CHUNK: tl.constexpr,
    BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_T: tl.constexpr,
):
    n_blocks: tl.constexpr = CHUNK // BLOCK_T
    h = tl.program_id(0)  # heads vary fastest: the programs of one group share the CB and C tiles in L2
    chunk = tl.program_id(1) // n_blocks
    tb = tl.program_id(1) % n_blocks
    b = tl.program_id(2)
    g = h // heads_per_group
    dot_ty = x_ptr.dtype.element_ty
    t_loc = tb * BLOCK_T + tl.arange(0, BLOCK_T)
    pos_t = chunk * CHUNK + t_loc
    t_in = pos_t < seqlen
    p = tl.arange(0, BLOCK_P)
    n = tl.arange(0, BLOCK_N)
    p_in = p < headdim
    n_in = n < dstate
    dt_base = (b.to(tl.int64) * nheads + h) * padded_len
    cum_t = tl.load(cum_ptr + dt_base + pos_t)

    # From the state entering the chunk: exp(cum_t) C_t H_c^T.
    C_t = tl.load(C_ptr + b.to(tl.int64) * C_stride_b + pos_t[:, None] * C_stride_t + g * C_stride_g
                  + n[None, :] * C_stride_n, mask=t_in[:, None] & n_in[None, :], other=0.0)
    enter_T = _load_state(enter_ptr, (b.to(tl.int64) * nchunks + chunk) * nheads + h, n[:, None] + p[None, :] * dstate,
                          n_in[:, None] & p_in[None, :], headdim * dstate, HIGH_ONLY=True)  # (N, P)
    # One half product of the float32 state (its rounded part), not a split one: no gradient reads y, and y is at the
    # references' own error without the split (1.7e-3 from float64 at 3 chunks of 64, P 64, N 128, bf16).
    acc = tl.dot(_operand(C_t, dot_ty), _operand(enter_T, dot_ty), input_precision=DOT_PRECISION) * tl.exp(cum_t)[:, None]

    # Within the chunk: the causal blocks of (CB ⊙ decay ⊙ Δ) x. The earlier blocks' decay factors through r, the
    # last position before this block (s ≤ r < t, so both factors are ≤ 1): (CB[t, s] exp(cum_t - cum_r)) ·
    # (exp(cum_r - cum_s) Δ_s x_s), with no exp per pair; this block's own pairs take theirs.
    x_base = x_ptr + b.to(tl.int64) * x_stride_b + h * x_stride_h
    cb_base = cb_ptr + ((b.to(tl.int64) * nchunks + chunk) * ngroups + g) * CHUNK * CHUNK
    cum_r = tl.load(cum_ptr + dt_base + chunk * CHUNK + tl.maximum(tb * BLOCK_T - 1, 0))
    decay_t = tl.exp(cum_t - cum_r)
    for sb in range(tb):
        s_loc = sb * BLOCK_T + tl.arange(0, BLOCK_T)
        pos_s = chunk * CHUNK + s_loc
        cb = tl.load(cb_base + t_loc[:, None] * CHUNK + s_loc[None, :])
        weight = tl.exp(cum_r - tl.load(cum_ptr + dt_base + pos_s)) * tl.load(dtp_ptr + dt_base + pos_s)
        x_s = tl.load(x_base + pos_s[:, None] * x_stride_t + p[None, :] * x_stride_p,
                      mask=(pos_s < seqlen)[:, None] & p_in[None, :], other=0.0)
        x_w = x_s.to(tl.float32) * weight[:, None]
        acc = tl.dot(_operand(cb * decay_t[:, None], dot_ty), _operand(x_w, dot_ty), acc, input_precision=DOT_PRECISION)
    tp_in = t_in[:, None] & p_in[None, :]
    cb = tl.load(cb_base + t_loc[:, None] * CHUNK + t_loc[None, :])
    causal = t_loc[None, :] <= t_loc[:, None]
    decay = tl.exp(tl.where(causal, cum_t[:, None] - cum_t[None, :], float("-inf")))
    x_t = tl.load(x_base + pos_t[:, None] * x_stride_t + p[None, :] * x_stride_p, mask=tp_in, other=0.0)
    dt_t = tl.load(dtp_ptr + dt_base + pos_t)
    acc = tl.dot(_operand(cb * decay * dt_t[None, :], dot_ty), _operand(x_t, dot_ty), acc, input_precision=DOT_PRECISION)
    if HAS_D:
        acc += tl.load(D_ptr + h).to(tl.float32) * x_t.to(tl.float32)
    tl.store(y_ptr + b.to(tl.int64) * y_stride_b + pos_t[:, None] * y_stride_t + h * y_stride_h
             + p[None, :] * y_stride_p, rounded(acc, y_ptr.dtype.element_ty), mask=tp_in)


@triton.jit
def _state_bwd_kernel(
    dy_ptr, dy_stride_b, dy_stride_t, dy_stride_h, dy_stride_p,
    C_ptr, C_stride_b, C_stride_t, C_stride_g, C_stride_n,
    cum_ptr, enter_ptr,
    dfinal_ptr, dfinal_stride_b, dfinal_stride_h, dfinal_stride_p, dfinal_stride_n,
    grad_after_ptr,  # like enter: G_c = dL/d(state after chunk c)
    k_part_ptr,  # (B, H, c, tiles) float32: exp(cum_{L-1}) Σ H_c ⊙ G_c per tile of the state
    dinit_ptr,  # (B, H, P, N) float32
    seqlen, nheads, heads_per_group, headdim, dstate, nchunks, padded_len,
    HAS_DFINAL: tl.constexpr, HAS_INIT: tl.constexpr, DOT_PRECISION: tl.constexpr, CHUNK: tl.constexpr,
    BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_L: tl.constexpr,
):
    pid_bh = tl.program_id(0)
    b = pid_bh // nheads
    h = pid_bh % nheads
    g = h // heads_per_group
    p = tl.program_id(1) * BLOCK_P + tl.arange(0, BLOCK_P)
    n = tl.program_id(2) * BLOCK_N + tl.arange(0, BLOCK_N)
    tile = tl.program_id(1) * tl.num_programs(2) + tl.program_id(2)
    n_tiles = tl.num_programs(1) * tl.num_programs(2)
    p_in = p < headdim
    n_in = n < dstate
    pn_in = p_in[:, None] & n_in[None, :]
    dot_ty = C_ptr.dtype.element_ty
    if HAS_DFINAL:
        grad = tl.load(dfinal_ptr + b.to(tl.int64) * dfinal_stride_b + h * dfinal_stride_h
                       + p[:, None] * dfinal_stride_p + n[None, :] * dfinal_stride_n, mask=pn_in, other=0.0)
        grad = grad.to(tl.float32)
    else:
        grad = tl.zeros((BLOCK_P, BLOCK_N), dtype=tl.float32)
    dt_base = pid_bh.to(tl.int64) * padded_len
    dy_base = dy_ptr + b.to(tl.int64) * dy_stride_b + h * dy_stride_h
    C_base = C_ptr + b.to(tl.int64) * C_stride_b + g * C_stride_g
    state_offs = p[:, None] * dstate + n[None, :]
    # One loop over the pieces of every chunk (last chunk first), as in the forward's state kernel.
    steps: tl.constexpr = CHUNK // BLOCK_L
    from_outputs = tl.zeros((BLOCK_P, BLOCK_N), dtype=tl.float32)
    for i in range(nchunks * steps):
        chunk = nchunks - 1 - i // steps
        l0 = (i % steps) * BLOCK_L
        cum_last = tl.load(cum_ptr + dt_base + chunk * CHUNK + CHUNK - 1)
        if l0 == 0:
            state_index = (b.to(tl.int64) * nchunks + chunk) * nheads + h
            _store_state(grad_after_ptr, state_index, state_offs, grad, pn_in, headdim * dstate)
            enter = _load_state(enter_ptr, state_index, state_offs, pn_in, headdim * dstate, HIGH_ONLY=False)
            tl.store(k_part_ptr + (pid_bh.to(tl.int64) * nchunks + chunk) * n_tiles + tile,
                     tl.exp(cum_last) * tl.sum(tl.sum(enter * grad, axis=1), axis=0))
        pos = chunk * CHUNK + l0 + tl.arange(0, BLOCK_L)
        t_in = pos < seqlen
        dy_T = tl.load(dy_base + pos[None, :] * dy_stride_t + p[:, None] * dy_stride_p,
                       mask=p_in[:, None] & t_in[None, :], other=0.0)  # (P, L)
        C_l = tl.load(C_base + pos[:, None] * C_stride_t + n[None, :] * C_stride_n,
                      mask=t_in[:, None] & n_in[None, :], other=0.0)  # (L, N)
        dy_w = dy_T.to(tl.float32) * tl.exp(tl.load(cum_ptr + dt_base + pos))[None, :]
        from_outputs = _split_dot(dy_w, C_l, from_outputs, dot_ty, DOT_PRECISION, SPLIT="a")
        if l0 == CHUNK - BLOCK_L:
            grad = grad * tl.exp(cum_last) + from_outputs
            from_outputs = tl.zeros((BLOCK_P, BLOCK_N), dtype=tl.float32)
    if HAS_INIT:
        tl.store(dinit_ptr + pid_bh.to(tl.int64) * headdim * dstate + state_offs, grad, mask=pn_in)


@triton.jit
def _dx_bwd_kernel(
    x_ptr, x_stride_b, x_stride_t, x_stride_h, x_stride_p,
    B_ptr, B_stride_b, B_stride_t, B_stride_g, B_stride_n,
    D_ptr,
    dy_ptr, dy_stride_b, dy_stride_t, dy_stride_h, dy_stride_p,
    dtp_ptr, cum_ptr, cb_ptr, grad_after_ptr,
    dx_ptr, dx_stride_b, dx_stride_t, dx_stride_h, dx_stride_p,
    ddt_direct_ptr,  # (B, H, c·L) float32: Σ_p x_s ⊙ inner_s, the part of dΔ_s not through the decays
    state_term_ptr,  # (B, H, c·L) float32: R_s = Δ_s x_s·(exp(cum_{L-1} - cum_s) G_c B_s), for the decay gradient
    dD_part_ptr,  # (B, c·blocks, H) float32
    seqlen, nheads, heads_per_group, ngroups, headdim, dstate, nchunks, padded_len,
    HAS_D: tl.constexpr, DOT_PRECISION: tl.constexpr, CHUNK: tl.constexpr,
    BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_T: tl.constexpr,
):
    """Rows s of one chunk and head: dx, the direct part of dΔ, the state term R and D's partial gradient."""
    n_blocks: tl.constexpr = CHUNK // BLOCK_T
    chunk = tl.program_id(0) // n_blocks
    sb = tl.program_id(0) % n_blocks
    h = tl.program_id(1)
    b = tl.program_id(2)
    g = h // heads_per_group
    dot_ty = x_ptr.dtype.element_ty
    s_loc = sb * BLOCK_T + tl.arange(0, BLOCK_T)
    pos_s = chunk * CHUNK + s_loc
    s_in = pos_s < seqlen
    p = tl.arange(0, BLOCK_P)
    n = tl.arange(0, BLOCK_N)
    p_in = p < headdim
    n_in = n < dstate
    sp_in = s_in[:, None] & p_in[None, :]
    dt_base = (b.to(tl.int64) * nheads + h) * padded_len
    cum_s = tl.load(cum_ptr + dt_base + pos_s)
    dt_s = tl.load(dtp_ptr + dt_base + pos_s)
    cum_last = tl.load(cum_ptr + dt_base + chunk * CHUNK + CHUNK - 1)
    dy_base = dy_ptr + b.to(tl.int64) * dy_stride_b + h * dy_stride_h
    cb_base = cb_ptr + ((b.to(tl.int64) * nchunks + chunk) * ngroups + g) * CHUNK * CHUNK

    # Through the chunk's contribution to the state after it: exp(cum_{L-1} - cum_s) B_s G_c^T.
    B_s = tl.load(B_ptr + b.to(tl.int64) * B_stride_b + pos_s[:, None] * B_stride_t + g * B_stride_g
                  + n[None, :] * B_stride_n, mask=s_in[:, None] & n_in[None, :], other=0.0)
    inner = _state_dot(B_s, grad_after_ptr, (b.to(tl.int64) * nchunks + chunk) * nheads + h,
                       n[:, None] + p[None, :] * dstate, n_in[:, None] & p_in[None, :], headdim * dstate,
                       tl.zeros((BLOCK_T, BLOCK_P), dtype=tl.float32), DOT_PRECISION)  # G_c^T: (N, P)
    inner = inner * tl.exp(cum_last - cum_s)[:, None]  # (T, P)
    x_s = tl.load(x_ptr + b.to(tl.int64) * x_stride_b + pos_s[:, None] * x_stride_t + h * x_stride_h
                  + p[None, :] * x_stride_p, mask=sp_in, other=0.0)
    tl.store(state_term_ptr + dt_base + pos_s, dt_s * tl.sum(x_s.to(tl.float32) * inner, axis=1))

    # Through the outputs of this chunk at t ≥ s: Σ_t (C_t·B_s) exp(cum_t - cum_s) dy_t. In this block, t ≥ s pair
    # by pair; in the later blocks the decay factors through r, the block's last position (s ≤ r < t, so both
    # factors are ≤ 1): Σ_t CB[t, s] exp(cum_r - cum_s) exp(cum_t - cum_r) dy_t, with no exp per pair, and dy_t as
    # loaded (the product's other operand is split, _split_dot).
    dy_s = tl.load(dy_base + pos_s[:, None] * dy_stride_t + p[None, :] * dy_stride_p, mask=sp_in, other=0.0)
    cb_T = tl.load(cb_base + s_loc[:, None] + s_loc[None, :] * CHUNK)  # (s, t) = CB[t, s]
    causal = s_loc[None, :] >= s_loc[:, None]
    decay = tl.exp(tl.where(causal, cum_s[None, :] - cum_s[:, None], float("-inf")))  # (s, t)
    # CB ⊙ decay split in two half parts, not rounded to one (_split_dot): dΔ_s's direct part x_s·inner_s nearly
    # cancels its log-decay part (pairs of the same CB ⊙ decay kept in float32 in _dcb_bwd_kernel), and one bf16
    # operand here left d dt_bias 8e-3 from float64 where the float32 reference on the same bf16 inputs is at 6e-7
    # (Bamba-1B's dt_bias gradients were the kernels' only ones farther from a float32 model than the bf16
    # references, GPU call 1 of session 7).
    inner = _split_dot(cb_T * decay, dy_s, inner, dot_ty, DOT_PRECISION, SPLIT="a")
    cum_r = tl.load(cum_ptr + dt_base + chunk * CHUNK + sb * BLOCK_T + BLOCK_T - 1)
    decay_s = tl.exp(cum_r - cum_s)
    for tb in range(sb + 1, n_blocks):
        t_loc = tb * BLOCK_T + tl.arange(0, BLOCK_T)
        pos_t = chunk * CHUNK + t_loc
        cum_t = tl.load(cum_ptr + dt_base + pos_t)
        dy_t = tl.load(dy_base + pos_t[:, None] * dy_stride_t + p[None, :] * dy_stride_p,
                       mask=(pos_t < seqlen)[:, None] & p_in[None, :], other=0.0)
        cb_T = tl.load(cb_base + s_loc[:, None] + t_loc[None, :] * CHUNK)
        decay_t = tl.exp(cum_t - cum_r)
        inner = _split_dot(cb_T * decay_s[:, None] * decay_t[None, :], dy_t, inner, dot_ty, DOT_PRECISION,
                            SPLIT="a")

    # x_s and dy_s again, from L1 or L2, rather than held in registers through the products above (the most
    # registers this kernel holds at once, which decides how many of its programs share an SM).
    x_f = tl.load(x_ptr + b.to(tl.int64) * x_stride_b + pos_s[:, None] * x_stride_t + h * x_stride_h
                  + p[None, :] * x_stride_p, mask=sp_in, other=0.0).to(tl.float32)
    dx = dt_s[:, None] * inner
    if HAS_D:
        dy_s = tl.load(dy_base + pos_s[:, None] * dy_stride_t + p[None, :] * dy_stride_p, mask=sp_in,
                       other=0.0).to(tl.float32)
        dx += tl.load(D_ptr + h).to(tl.float32) * dy_s
        tl.store(dD_part_ptr + (b.to(tl.int64) * tl.num_programs(0) + tl.program_id(0)) * nheads + h,
                 tl.sum(tl.sum(x_f * dy_s, axis=1), axis=0))
    tl.store(dx_ptr + b.to(tl.int64) * dx_stride_b + pos_s[:, None] * dx_stride_t + h * dx_stride_h
             + p[None, :] * dx_stride_p, rounded(dx, dx_ptr.dtype.element_ty), mask=sp_in)
    tl.store(ddt_direct_ptr + dt_base + pos_s, tl.sum(x_f * inner, axis=1))


@triton.jit
def _x_dy_tile(x_ptr, x_stride_b, x_stride_t, x_stride_h, x_stride_p, dy_ptr, dy_stride_b, dy_stride_t, dy_stride_h,
               dy_stride_p, b, h, pos_s, pos_t, p, p_in, seqlen, DOT_PRECISION: tl.constexpr):
    """x_s·dy_t of one head, (s, t) float32."""
    dot_ty = x_ptr.dtype.element_ty
    x_s = tl.load(x_ptr + b.to(tl.int64) * x_stride_b + pos_s[:, None] * x_stride_t + h * x_stride_h
                  + p[None, :] * x_stride_p, mask=(pos_s < seqlen)[:, None] & p_in[None, :], other=0.0)
    dy_t = tl.load(dy_ptr + b.to(tl.int64) * dy_stride_b + pos_t[:, None] * dy_stride_t + h * dy_stride_h
                   + p[None, :] * dy_stride_p, mask=(pos_t < seqlen)[:, None] & p_in[None, :], other=0.0)
    return tl.trans(tl.dot(_operand(dy_t, dot_ty), tl.trans(_operand(x_s, dot_ty)), input_precision=DOT_PRECISION))


@triton.jit
def _dcb_bwd_kernel(
    x_ptr, x_stride_b, x_stride_t, x_stride_h, x_stride_p,
    dy_ptr, dy_stride_b, dy_stride_t, dy_stride_h, dy_stride_p,
    dtp_ptr, cum_ptr, cb_ptr,
    dcb_part_ptr,  # (B, c, HEAD_SPLIT, G, L, L) float32
    cross_ptr,  # (B, H, blocks, c·L) float32: the log-decay gradient's pair terms, one slot per tile (see below)
    seqlen, nheads, heads_per_group, ngroups, headdim, nchunks, padded_len,
    DOT_PRECISION: tl.constexpr, CHUNK: tl.constexpr,
    BLOCK_P: tl.constexpr, BLOCK_T: tl.constexpr, HEAD_SPLIT: tl.constexpr, DIAGONAL: tl.constexpr,
):
    """One (t, s) tile of a chunk, summed over (a split of) the group's heads: dCB[t, s] = Σ_h M_h[t, s] with
    M[t, s] = (dy_t·x_s) Δ_s exp(cum_t - cum_s), the gradient of C_t·B_s, which dB and dC then multiply by C and B
    once per group instead of once per head. The same dy·x products give each head's Q = M ⊙ CB, whose pair sums
    d(Δ_i A) += Σ_{s < i ≤ t} Q[t, s] split by tile: a diagonal tile's own pairs at i in its block, summed here; an
    off-diagonal tile's column sums (its pairs with i in the s block) and row sums (i in the t block and the blocks
    strictly between), which _dt_bwd_kernel turns into prefix sums once per head and chunk (a prefix sum along a
    vector here costs layout conversions through shared memory, with barriers, per head and tile). Positions of
    block k take the row sums of tile (k, j) in slot j < k, the diagonal's pairs in slot k and the column sums of
    tile (j, k) in slot j > k: every slot is written once, no atomics.

    The tiles are held transposed, (s, t): a vector along a tile's columns costs each thread 16 registers at 64-row
    tiles, one along its rows 2, and the per-head vectors along s (the prefix sums, Δ) outnumber those along t
    (255 registers and spills for sm_90 (t, s), 190 (s, t), triton 3.6). The next head's vectors are loaded while
    this head's tile is computed, and CB is reloaded (from L1) for each head rather than held in registers.

    Two launches: DIAGONAL, the n_blocks diagonal tiles of each chunk; else the others (those above the diagonal
    store zeros). The diagonal tiles' prefix sum within the tile takes 255 registers, the other tiles 189 (sm_90,
    triton 3.6, Bamba's shape): apart, those do not run at the diagonal's occupancy."""
    n_blocks: tl.constexpr = CHUNK // BLOCK_T
    if DIAGONAL:
        chunk = tl.program_id(0) // n_blocks
        tb = tl.program_id(0) % n_blocks
        sb = tb
    else:  # every tile, the diagonal's returning at once (indexing only the others took 255 registers, not 189)
        chunk = tl.program_id(0) // (n_blocks * n_blocks)
        tile = tl.program_id(0) % (n_blocks * n_blocks)
        tb = tile // n_blocks
        sb = tile % n_blocks
        if sb == tb:
            return
    g = tl.program_id(1) // HEAD_SPLIT
    split = tl.program_id(1) % HEAD_SPLIT
    b = tl.program_id(2)
    t_loc = tb * BLOCK_T + tl.arange(0, BLOCK_T)
    s_loc = sb * BLOCK_T + tl.arange(0, BLOCK_T)
    dcb_base = ((b.to(tl.int64) * nchunks + chunk) * HEAD_SPLIT + split) * ngroups + g
    dcb_ptrs = dcb_part_ptr + dcb_base * CHUNK * CHUNK + t_loc[None, :] * CHUNK + s_loc[:, None]  # (s, t)
    if sb > tb:  # above the diagonal the decay mask is zero: zeros, for dB and dC tiling the chunk otherwise
        tl.store(dcb_ptrs, tl.zeros((BLOCK_T, BLOCK_T), dtype=tl.float32))
        return
    pos_t = chunk * CHUNK + t_loc
    pos_s = chunk * CHUNK + s_loc
    p = tl.arange(0, BLOCK_P)
    p_in = p < headdim
    group_base = (b.to(tl.int64) * nchunks + chunk) * ngroups + g
    cb_ptrs = cb_ptr + group_base * CHUNK * CHUNK + t_loc[None, :] * CHUNK + s_loc[:, None]  # (s, t) = CB[t, s]
    dcb = tl.zeros((BLOCK_T, BLOCK_T), dtype=tl.float32)
    per_split = tl.cdiv(heads_per_group, HEAD_SPLIT)
    first = split * per_split
    last = tl.minimum(first + per_split, heads_per_group)
    dt_base = (b.to(tl.int64) * nheads + g * heads_per_group + tl.minimum(first, last - 1)) * padded_len
    cum_s = tl.load(cum_ptr + dt_base + pos_s)
    cum_t = tl.load(cum_ptr + dt_base + pos_t)
    dt_s = tl.load(dtp_ptr + dt_base + pos_s)
    # The diagonal and off-diagonal tiles loop apart (a branch inside the loop over heads fails Triton 3.6's
    # software pipeliner at 64-row tiles).
    if DIAGONAL:
        causal = s_loc[:, None] <= t_loc[None, :]
        for j in range(first, last):
            h = g * heads_per_group + j
            x_dy = _x_dy_tile(x_ptr, x_stride_b, x_stride_t, x_stride_h, x_stride_p, dy_ptr, dy_stride_b, dy_stride_t,
                              dy_stride_h, dy_stride_p, b, h, pos_s, pos_t, p, p_in, seqlen, DOT_PRECISION)
            m = x_dy * tl.exp(tl.where(causal, cum_t[None, :] - cum_s[:, None], float("-inf"))) * dt_s[:, None]
            next_base = (b.to(tl.int64) * nheads + g * heads_per_group + tl.minimum(j + 1, last - 1)) * padded_len
            cum_s = tl.load(cum_ptr + next_base + pos_s)
            cum_t = tl.load(cum_ptr + next_base + pos_t)
            dt_s = tl.load(dtp_ptr + next_base + pos_s)
            dcb += m
            q = m * tl.load(cb_ptrs)
            before = tl.cumsum(q, axis=0) - q  # Σ_{s < i} Q[t, s] at row i
            cross_base = cross_ptr + (b.to(tl.int64) * nheads + h) * n_blocks * padded_len
            tl.store(cross_base + tb * padded_len + pos_s, tl.sum(tl.where(causal, before, 0.0), axis=1))
    else:
        r = chunk * CHUNK + sb * BLOCK_T + BLOCK_T - 1  # the s block's last position
        cum_r = tl.load(cum_ptr + dt_base + r)
        for j in range(first, last):
            h = g * heads_per_group + j
            x_dy = _x_dy_tile(x_ptr, x_stride_b, x_stride_t, x_stride_h, x_stride_p, dy_ptr, dy_stride_b, dy_stride_t,
                              dy_stride_h, dy_stride_p, b, h, pos_s, pos_t, p, p_in, seqlen, DOT_PRECISION)
            # The decay factors through r (s ≤ r < t): both factors are ≤ 1.
            m = x_dy * (tl.exp(cum_r - cum_s) * dt_s)[:, None] * tl.exp(cum_t - cum_r)[None, :]
            next_base = (b.to(tl.int64) * nheads + g * heads_per_group + tl.minimum(j + 1, last - 1)) * padded_len
            cum_r = tl.load(cum_ptr + next_base + r)
            cum_s = tl.load(cum_ptr + next_base + pos_s)
            cum_t = tl.load(cum_ptr + next_base + pos_t)
            dt_s = tl.load(dtp_ptr + next_base + pos_s)
            dcb += m
            q = m * tl.load(cb_ptrs)
            cross_base = cross_ptr + (b.to(tl.int64) * nheads + h) * n_blocks * padded_len
            tl.store(cross_base + tb * padded_len + pos_s, tl.sum(q, axis=1))
            tl.store(cross_base + sb * padded_len + pos_t, tl.sum(q, axis=0))
    tl.store(dcb_ptrs, dcb)


@triton.jit
def _load_dcb(dcb_part_ptr, b, chunk, g, t_loc, s_loc, ngroups, nchunks, dcb_splits, CHUNK: tl.constexpr):
    """dCB[t, s] (t_loc rows, s_loc columns) of one chunk and group: the dcb kernel's head splits added up."""
    dcb = tl.zeros((t_loc.shape[0], s_loc.shape[0]), dtype=tl.float32)
    offs = t_loc[:, None] * CHUNK + s_loc[None, :]
    for k in range(dcb_splits):
        dcb += tl.load(dcb_part_ptr + (((b.to(tl.int64) * nchunks + chunk) * dcb_splits + k) * ngroups + g)
                       * CHUNK * CHUNK + offs)
    return dcb


@triton.jit
def _db_bwd_kernel(
    x_ptr, x_stride_b, x_stride_t, x_stride_h, x_stride_p,
    C_ptr, C_stride_b, C_stride_t, C_stride_g, C_stride_n,
    dtp_ptr, cum_ptr, grad_after_ptr, dcb_part_ptr,
    dB_part_ptr,  # (B, T, HEAD_SPLIT, G, N) float32
    seqlen, nheads, heads_per_group, ngroups, headdim, dstate, nchunks, padded_len, dcb_splits,
    DOT_PRECISION: tl.constexpr, CHUNK: tl.constexpr,
    BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_T: tl.constexpr, HEAD_SPLIT: tl.constexpr,
):
    """Rows s of one chunk and group, one split of the work: dB_s = Σ_h exp(cum_{L-1} - cum_s) Δ_s x_s G_c (this
    split's heads) + Σ_{t≥s} dCB[t, s] C_t (this split's share of the t blocks)."""
    n_blocks: tl.constexpr = CHUNK // BLOCK_T
    chunk = tl.program_id(0) // n_blocks
    sb = tl.program_id(0) % n_blocks
    g = tl.program_id(1) // HEAD_SPLIT
    split = tl.program_id(1) % HEAD_SPLIT
    b = tl.program_id(2)
    dot_ty = x_ptr.dtype.element_ty
    s_loc = sb * BLOCK_T + tl.arange(0, BLOCK_T)
    pos_s = chunk * CHUNK + s_loc
    s_in = pos_s < seqlen
    p = tl.arange(0, BLOCK_P)
    n = tl.arange(0, BLOCK_N)
    p_in = p < headdim
    n_in = n < dstate
    dB_acc = tl.zeros((BLOCK_T, BLOCK_N), dtype=tl.float32)
    per_split = tl.cdiv(heads_per_group, HEAD_SPLIT)
    first = split * per_split
    for j in range(first, tl.minimum(first + per_split, heads_per_group)):
        h = g * heads_per_group + j
        dt_base = (b.to(tl.int64) * nheads + h) * padded_len
        cum_s = tl.load(cum_ptr + dt_base + pos_s)
        dt_s = tl.load(dtp_ptr + dt_base + pos_s)
        cum_last = tl.load(cum_ptr + dt_base + chunk * CHUNK + CHUNK - 1)
        x_s = tl.load(x_ptr + b.to(tl.int64) * x_stride_b + pos_s[:, None] * x_stride_t + h * x_stride_h
                      + p[None, :] * x_stride_p, mask=s_in[:, None] & p_in[None, :], other=0.0)
        x_w = x_s.to(tl.float32) * (tl.exp(cum_last - cum_s) * dt_s)[:, None]
        dB_acc = _state_dot(x_w, grad_after_ptr, (b.to(tl.int64) * nchunks + chunk) * nheads + h,
                            p[:, None] * dstate + n[None, :], p_in[:, None] & n_in[None, :], headdim * dstate, dB_acc,
                            DOT_PRECISION)  # G_c: (P, N)
    C_base = C_ptr + b.to(tl.int64) * C_stride_b + g * C_stride_g
    for tb in range(sb + split, n_blocks, HEAD_SPLIT):
        t_loc = tb * BLOCK_T + tl.arange(0, BLOCK_T)
        pos_t = chunk * CHUNK + t_loc
        dcb = _load_dcb(dcb_part_ptr, b, chunk, g, t_loc, s_loc, ngroups, nchunks, dcb_splits, CHUNK)
        C_t = tl.load(C_base + pos_t[:, None] * C_stride_t + n[None, :] * C_stride_n,
                      mask=(pos_t < seqlen)[:, None] & n_in[None, :], other=0.0)
        dB_acc = tl.dot(_operand(tl.trans(dcb), dot_ty), _operand(C_t, dot_ty), dB_acc, input_precision=DOT_PRECISION)
    dB_offs = (((b.to(tl.int64) * seqlen + pos_s[:, None]) * HEAD_SPLIT + split) * ngroups + g) * dstate + n[None, :]
    tl.store(dB_part_ptr + dB_offs, dB_acc, mask=s_in[:, None] & n_in[None, :])


@triton.jit
def _dc_bwd_kernel(
    C_ptr, C_stride_b, C_stride_t, C_stride_g, C_stride_n,
    B_ptr, B_stride_b, B_stride_t, B_stride_g, B_stride_n,
    dy_ptr, dy_stride_b, dy_stride_t, dy_stride_h, dy_stride_p,
    cum_ptr, enter_ptr, dcb_part_ptr,
    dC_part_ptr,  # (B, T, HEAD_SPLIT, G, N) float32
    off_term_ptr,  # (B, H, c·L) float32: v_t = dy_t·(exp(cum_t) H_c C_t), the from-state output's decay term
    seqlen, nheads, heads_per_group, ngroups, headdim, dstate, nchunks, padded_len, dcb_splits,
    DOT_PRECISION: tl.constexpr, CHUNK: tl.constexpr,
    BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_T: tl.constexpr, HEAD_SPLIT: tl.constexpr,
):
    """Rows t of one chunk and group, one split of the work: dC_t = Σ_h exp(cum_t) dy_t H_c (this split's heads,
    each also giving its v_t) + Σ_{s≤t} dCB[t, s] B_s (this split's share of the s blocks)."""
    n_blocks: tl.constexpr = CHUNK // BLOCK_T
    chunk = tl.program_id(0) // n_blocks
    tb = tl.program_id(0) % n_blocks
    g = tl.program_id(1) // HEAD_SPLIT
    split = tl.program_id(1) % HEAD_SPLIT
    b = tl.program_id(2)
    dot_ty = dy_ptr.dtype.element_ty
    t_loc = tb * BLOCK_T + tl.arange(0, BLOCK_T)
    pos_t = chunk * CHUNK + t_loc
    t_in = pos_t < seqlen
    p = tl.arange(0, BLOCK_P)
    n = tl.arange(0, BLOCK_N)
    p_in = p < headdim
    n_in = n < dstate
    C_t = tl.load(C_ptr + b.to(tl.int64) * C_stride_b + pos_t[:, None] * C_stride_t + g * C_stride_g
                  + n[None, :] * C_stride_n, mask=t_in[:, None] & n_in[None, :], other=0.0).to(tl.float32)
    dC_acc = tl.zeros((BLOCK_T, BLOCK_N), dtype=tl.float32)
    per_split = tl.cdiv(heads_per_group, HEAD_SPLIT)
    first = split * per_split
    for j in range(first, tl.minimum(first + per_split, heads_per_group)):
        h = g * heads_per_group + j
        dt_base = (b.to(tl.int64) * nheads + h) * padded_len
        cum_t = tl.load(cum_ptr + dt_base + pos_t)
        dy_t = tl.load(dy_ptr + b.to(tl.int64) * dy_stride_b + pos_t[:, None] * dy_stride_t + h * dy_stride_h
                       + p[None, :] * dy_stride_p, mask=t_in[:, None] & p_in[None, :], other=0.0)
        from_state = _state_dot(dy_t, enter_ptr, (b.to(tl.int64) * nchunks + chunk) * nheads + h,
                                p[:, None] * dstate + n[None, :], p_in[:, None] & n_in[None, :], headdim * dstate,
                                tl.zeros((BLOCK_T, BLOCK_N), dtype=tl.float32), DOT_PRECISION)  # H_c: (P, N)
        from_state = from_state * tl.exp(cum_t)[:, None]
        tl.store(off_term_ptr + dt_base + pos_t, tl.sum(from_state * C_t, axis=1))
        dC_acc += from_state
    B_base = B_ptr + b.to(tl.int64) * B_stride_b + g * B_stride_g
    for sb in range(split, tb + 1, HEAD_SPLIT):
        s_loc = sb * BLOCK_T + tl.arange(0, BLOCK_T)
        pos_s = chunk * CHUNK + s_loc
        dcb = _load_dcb(dcb_part_ptr, b, chunk, g, t_loc, s_loc, ngroups, nchunks, dcb_splits, CHUNK)
        B_s = tl.load(B_base + pos_s[:, None] * B_stride_t + n[None, :] * B_stride_n,
                      mask=(pos_s < seqlen)[:, None] & n_in[None, :], other=0.0)
        dC_acc = tl.dot(_operand(dcb, dot_ty), _operand(B_s, dot_ty), dC_acc, input_precision=DOT_PRECISION)
    dC_offs = (((b.to(tl.int64) * seqlen + pos_t[:, None]) * HEAD_SPLIT + split) * ngroups + g) * dstate + n[None, :]
    tl.store(dC_part_ptr + dC_offs, dC_acc, mask=t_in[:, None] & n_in[None, :])


@triton.jit
def _dt_bwd_kernel(
    dt_ptr, dt_stride_b, dt_stride_t, dt_stride_h,
    A_ptr, bias_ptr,
    dtp_ptr, ddt_direct_ptr, state_term_ptr, off_term_ptr, cross_ptr, k_ptr,
    ddt_ptr, ddt_stride_b, ddt_stride_t, ddt_stride_h,
    dA_part_ptr, dbias_part_ptr,  # (B, H, c) float32 each
    seqlen, nheads, nchunks, padded_len,
    HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr, CHUNK: tl.constexpr, CROSS_BLOCKS: tl.constexpr,
):
    pid_bh = tl.program_id(0)
    chunk = tl.program_id(1)
    b = pid_bh // nheads
    h = pid_bh % nheads
    pos = chunk * CHUNK + tl.arange(0, CHUNK)
    t_in = pos < seqlen
    base = pid_bh.to(tl.int64) * padded_len
    # The pair terms of _dcb_bwd_kernel's slots (position i in block k, slot j): the diagonal's own (k = j); the row
    # sums of tile (k', j) at every t ≥ i with k' > j, which is the row suffix of tile (k, j) and the totals of the
    # tiles (k' > k, j) whose pairs span block k, as one reverse prefix sum (k > j); and the column sums of tile (j, k)
    # at s < i within block k, as an exclusive prefix sum within each block of the slots' sum (k < j).
    block = tl.arange(0, CHUNK) // (CHUNK // CROSS_BLOCKS)
    cross = tl.zeros((CHUNK,), dtype=tl.float32)
    cols = tl.zeros((CHUNK,), dtype=tl.float32)
    for j in tl.static_range(CROSS_BLOCKS):
        slot = tl.load(cross_ptr + (pid_bh.to(tl.int64) * CROSS_BLOCKS + j) * padded_len + pos)
        rows = tl.where(block > j, slot, 0.0)
        cross += tl.where(block == j, slot, 0.0) + tl.where(block > j, tl.cumsum(rows, axis=0, reverse=True), 0.0)
        cols += tl.where(block < j, slot, 0.0)
    cols = tl.reshape(cols, (CROSS_BLOCKS, CHUNK // CROSS_BLOCKS))
    cross += tl.reshape(tl.cumsum(cols, axis=1) - cols, (CHUNK,))
    off_term = tl.load(off_term_ptr + base + pos)
    state_term = tl.load(state_term_ptr + base + pos)
    # d(Δ_i A): the pairs s < i ≤ t, the from-state outputs at t ≥ i, the chunk state's inputs at s < i, and the
    # decay of the whole chunk (every i).
    later_off = tl.sum(off_term, axis=0) - tl.cumsum(off_term, axis=0) + off_term
    earlier_state = tl.cumsum(state_term, axis=0) - state_term
    dlog = cross + later_off + earlier_state + tl.load(k_ptr + pid_bh.to(tl.int64) * nchunks + chunk)
    dtp = tl.load(dtp_ptr + base + pos)
    ddt = tl.load(ddt_direct_ptr + base + pos) + tl.load(A_ptr + h).to(tl.float32) * dlog
    tl.store(dA_part_ptr + pid_bh.to(tl.int64) * nchunks + chunk, tl.sum(dtp * dlog, axis=0))
    if SOFTPLUS:
        raw = tl.load(dt_ptr + b.to(tl.int64) * dt_stride_b + pos * dt_stride_t + h * dt_stride_h, mask=t_in,
                      other=0.0).to(tl.float32)
        if HAS_BIAS:
            raw += tl.load(bias_ptr + h).to(tl.float32)
        ddt = ddt * tl.sigmoid(raw)
    ddt = tl.where(t_in, ddt, 0.0)
    if HAS_BIAS:
        tl.store(dbias_part_ptr + pid_bh.to(tl.int64) * nchunks + chunk, tl.sum(ddt, axis=0))
    tl.store(ddt_ptr + b.to(tl.int64) * ddt_stride_b + pos * ddt_stride_t + h * ddt_stride_h,
             rounded(ddt, ddt_ptr.dtype.element_ty), mask=t_in)


# ---------------------------------------------------------------------------------------------------------------
# Launchers and tuning
# ---------------------------------------------------------------------------------------------------------------


def _launch_options(config: dict) -> dict:
    return {k: v for k, v in config.items() if k in ("num_warps", "num_stages")}


TUNERS = {
    name: Autotuner(f"ssd.{name}", configs, INTERPRETER_CONFIGS[interpreter])
    for name, configs, interpreter in (
        ("state_fwd", STATE_CONFIGS, "state"), ("cb", CB_CONFIGS, "cb"), ("output_fwd", OUTPUT_CONFIGS, "output"),
        ("state_bwd", STATE_BWD_CONFIGS, "state"), ("dx_bwd", DX_BWD_CONFIGS, "output"),
        ("dcb_bwd", DCB_BWD_CONFIGS, "group_bwd"), ("db_bwd", GROUP_BWD_CONFIGS, "group_bwd"),
        ("dc_bwd", GROUP_BWD_CONFIGS, "group_bwd"),
    )
}
"""The kernels' autotuners (triton_support.Autotuner, named ssd.<kernel>: tuning tables pin their winners)."""


def _config(name: str, key: str, launch, explicit: dict | None, fits) -> dict:
    """The config to launch: explicit, the interpreter's or a pinned/earlier choice; else tune now among the
    candidates that fit (the chunk must hold whole blocks)."""
    tuner = TUNERS[name]
    known = tuner.known(key, explicit)
    if known is not None:
        return known
    return tuner.tune(key, launch, [c for c in tuner.configs if fits(c)] or [fits.shrunk(tuner.configs[0])])


def tuned_configs() -> dict:
    """{kernel: {key: config}} chosen so far, JSON-ready (triton_support.tuning_table() has them too)."""
    return {name: {key: dict(c) for key, c in tuner.chosen.items()} for name, tuner in TUNERS.items()}


def _key(*parts) -> str:
    return "-".join(str(p).replace("torch.", "") for p in parts)


def _dot_precision(dtype: torch.dtype) -> str:
    """float32 inputs get full float32 products (tf32 would cost them ~1e-3 relative error); half inputs take
    the tensor cores' native half × half -> float32."""
    return "ieee" if dtype == torch.float32 else "tf32"


def _state_format(dtype: torch.dtype) -> tuple[int, torch.dtype]:
    """(parts, dtype) of the stored chunk states (`_store_state`): float32 inputs' states as they are, half inputs'
    as two parts in their dtype (the same bytes as float32)."""
    return (1, torch.float32) if dtype == torch.float32 else (2, dtype)


def _fits_chunk(chunk: int, *names: str):
    """Whether a config's blocks tile the chunk whole; `.shrunk(config)` is the config with its blocks cut to tile it,
    for a chunk smaller than every candidate's block (CB_CONFIGS' 64 rows against a 32-row chunk ran past the chunk
    on the GPU and gave NaN, gpu9/call4)."""

    def fits(config: dict) -> bool:
        return all(config[name] <= chunk and chunk % config[name] == 0 for name in names)

    def shrunk(config: dict) -> dict:
        return {**config, **{name: math.gcd(config[name], chunk) for name in names}}

    fits.shrunk = shrunk
    return fits


def ssd_scan_forward(
    x: Tensor,
    dt: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    chunk_size: int = CHUNK_SIZE,
    D: Tensor | None = None,
    initial_state: Tensor | None = None,
    dt_bias: Tensor | None = None,
    dt_softplus: bool = False,
    *,
    configs: dict | None = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Run the forward kernels: (y, final_state, dt_processed, cum, cb, enter_states).

    The last four are what the backward reuses: Δ and the in-chunk prefix sums (B, H, c·L) float32, C B^T per chunk
    and group (B, c, G, L, L) float32, and the state entering each chunk (B, c, H, P, N) float32 for float32 inputs,
    else (B, c, H, 2, P, N) in their dtype (`_store_state`), the last two flattened after the batch dimension.
    configs: {kernel name: config} to bypass the autotuner (the keys of TUNERS)."""
    _check_inputs(x, dt, A, B, C, chunk_size, D, initial_state, dt_bias)
    configs = configs or {}
    batch, seqlen, nheads, headdim = x.shape
    ngroups, dstate = B.shape[-2:]
    device = x.device
    chunk = chunk_size
    nchunks = triton.cdiv(seqlen, chunk)
    padded = nchunks * chunk
    block_p, block_n = max(16, triton.next_power_of_2(headdim)), max(16, triton.next_power_of_2(dstate))
    precision = _dot_precision(x.dtype)

    y = torch.empty((batch, seqlen, nheads, headdim), dtype=x.dtype, device=device)
    final_state = torch.empty((batch, nheads, headdim, dstate), dtype=torch.float32, device=device)
    dtp = torch.empty((batch, nheads, padded), dtype=torch.float32, device=device)
    cum = torch.empty((batch, nheads, padded), dtype=torch.float32, device=device)
    # Flat per batch row: a lone chunk-count dimension would make torch.export guard on it being 1.
    cb = torch.empty((batch, nchunks * ngroups * chunk * chunk), dtype=torch.float32, device=device)
    parts, state_dtype = _state_format(x.dtype)
    enter = torch.empty((batch, nchunks * nheads * parts * headdim * dstate), dtype=state_dtype, device=device)
    if seqlen == 0 or batch == 0 or nheads == 0 or headdim == 0 or dstate == 0:  # nothing to scan
        final_state.copy_(initial_state if initial_state is not None else torch.zeros_like(final_state))
        return y, final_state, dtp, cum, cb, enter
    dtype_name_ = dtype_name(x.dtype)

    with on_device(x):
        _dt_cumsum_kernel[(batch * nheads, nchunks)](
            *strided(dt, 3), A, dt_bias, dtp, cum, seqlen, nheads, padded,
            HAS_BIAS=dt_bias is not None, SOFTPLUS=bool(dt_softplus), CHUNK=chunk,
        )

        def launch_cb(cfg):
            tiles = (chunk // cfg["BLOCK_T"]) ** 2
            _chunk_cb_kernel[(tiles, nchunks * ngroups, batch)](
                *strided(C, 4), *strided(B, 4), cb, seqlen, ngroups, nchunks, dstate,
                DOT_PRECISION=precision, CHUNK=chunk, BLOCK_N=block_n, BLOCK_T=cfg["BLOCK_T"], **_launch_options(cfg),
            )

        launch_cb(_config("cb", _key("cb", chunk, dstate, dtype_name_), launch_cb, configs.get("cb"),
                                      _fits_chunk(chunk, "BLOCK_T")))

        def launch_state(cfg):
            grid = (batch * nheads, triton.cdiv(headdim, cfg["BLOCK_P"]), triton.cdiv(dstate, cfg["BLOCK_N"]))
            _state_fwd_kernel[grid](
                *strided(x, 4), *strided(B, 4), dtp, cum, *strided(initial_state, 4), enter, final_state,
                seqlen, nheads, nheads // ngroups, headdim, dstate, nchunks, padded,
                HAS_INIT=initial_state is not None, DOT_PRECISION=precision, CHUNK=chunk,
                BLOCK_P=cfg["BLOCK_P"], BLOCK_N=cfg["BLOCK_N"], BLOCK_L=cfg["BLOCK_L"], **_launch_options(cfg),
            )

        launch_state(_config("state_fwd", _key("state_fwd", chunk, headdim, dstate, dtype_name_), launch_state,
                                                configs.get("state_fwd"), _fits_chunk(chunk, "BLOCK_L")))

        def launch_output(cfg):
            grid = (nheads, nchunks * (chunk // cfg["BLOCK_T"]), batch)
            _output_fwd_kernel[grid](
                *strided(x, 4), *strided(C, 4), D, dtp, cum, cb, enter, *strided(y, 4),
                seqlen, nheads, nheads // ngroups, ngroups, headdim, dstate, nchunks, padded,
                HAS_D=D is not None, DOT_PRECISION=precision, CHUNK=chunk, BLOCK_P=block_p, BLOCK_N=block_n,
                BLOCK_T=cfg["BLOCK_T"], **_launch_options(cfg),
            )

        launch_output(_config("output_fwd", _key("output_fwd", chunk, headdim, dstate, dtype_name_),
                                                  launch_output, configs.get("output_fwd"),
                                                  _fits_chunk(chunk, "BLOCK_T")))
    return y, final_state, dtp, cum, cb, enter


def ssd_scan_backward(
    dy: Tensor,
    dfinal_state: Tensor | None,
    x: Tensor,
    dt: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    chunk_size: int,
    D: Tensor | None,
    initial_state: Tensor | None,
    dt_bias: Tensor | None,
    dt_softplus: bool,
    dtp: Tensor,
    cum: Tensor,
    cb: Tensor,
    enter: Tensor,
    *,
    configs: dict | None = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor | None, Tensor | None, Tensor | None]:
    """Run the backward kernels: (dx, ddt, dA, dB, dC, dD, dinitial_state, ddt_bias), each in its input's dtype,
    None for an absent input. dtp, cum, cb, enter: the forward's (`ssd_scan_forward`'s last four results)."""
    configs = configs or {}
    batch, seqlen, nheads, headdim = x.shape
    ngroups, dstate = B.shape[-2:]
    heads_per_group = nheads // ngroups
    device = x.device
    chunk = chunk_size
    nchunks = cum.shape[-1] // chunk
    padded = nchunks * chunk
    block_p, block_n = max(16, triton.next_power_of_2(headdim)), max(16, triton.next_power_of_2(dstate))
    precision = _dot_precision(x.dtype)
    dtype_name_ = dtype_name(x.dtype)
    f32 = {"dtype": torch.float32, "device": device}

    dx = torch.empty((batch, seqlen, nheads, headdim), dtype=x.dtype, device=device)
    ddt = torch.empty((batch, seqlen, nheads), dtype=dt.dtype, device=device)
    grad_after = torch.empty_like(enter)
    dinit = torch.empty((batch, nheads, headdim, dstate), **f32) if initial_state is not None else None
    ddt_direct = torch.empty((batch, nheads, padded), **f32)
    state_term = torch.empty((batch, nheads, padded), **f32)
    off_term = torch.empty((batch, nheads, padded), **f32)
    dA_part = torch.empty((batch, nheads, nchunks), **f32)
    dbias_part = torch.empty((batch, nheads, nchunks), **f32) if dt_bias is not None else None

    if nchunks == 0 or batch == 0 or nheads == 0 or headdim == 0 or dstate == 0:  # nothing was scanned
        def zeros(t):
            return torch.zeros_like(t, memory_format=torch.contiguous_format) if t is not None else None

        if initial_state is not None:
            dinit = dfinal_state.to(initial_state.dtype).clone() if dfinal_state is not None else zeros(initial_state)
        return zeros(x), zeros(dt), zeros(A), zeros(B), zeros(C), zeros(D), dinit, zeros(dt_bias)

    with on_device(x):
        state_cfg = _config(
            "state_bwd", _key("state_bwd", chunk, headdim, dstate, dtype_name_),
            lambda cfg: _launch_state_bwd(cfg, dy, dfinal_state, C, cum, enter, grad_after, dinit, seqlen, nheads,
                                          heads_per_group, headdim, dstate, nchunks, padded, precision, chunk),
            configs.get("state_bwd"), _fits_chunk(chunk, "BLOCK_L"))
        k_part = _launch_state_bwd(state_cfg, dy, dfinal_state, C, cum, enter, grad_after, dinit, seqlen, nheads,
                                   heads_per_group, headdim, dstate, nchunks, padded, precision, chunk)
        k_sum = k_part.sum(-1)  # (B, H, c)

        dims = (seqlen, nheads, heads_per_group, ngroups, headdim, dstate, nchunks, padded)

        def launch_dx(cfg):
            n_blocks = chunk // cfg["BLOCK_T"]
            dD_part = torch.empty((batch, nchunks * n_blocks, nheads), **f32) if D is not None else None
            _dx_bwd_kernel[(nchunks * n_blocks, nheads, batch)](
                *strided(x, 4), *strided(B, 4), D, *strided(dy, 4), dtp, cum, cb, grad_after, *strided(dx, 4),
                ddt_direct, state_term, dD_part, *dims,
                HAS_D=D is not None, DOT_PRECISION=precision, CHUNK=chunk, BLOCK_P=block_p, BLOCK_N=block_n,
                BLOCK_T=cfg["BLOCK_T"], **_launch_options(cfg),
            )
            return dD_part

        dD_part = launch_dx(_config("dx_bwd", _key("dx_bwd", chunk, headdim, dstate, dtype_name_), launch_dx,
                                                    configs.get("dx_bwd"), _fits_chunk(chunk, "BLOCK_T")))

        def launch_dcb(cfg):
            n_blocks = chunk // cfg["BLOCK_T"]
            split = min(cfg["HEAD_SPLIT"], heads_per_group)
            dcb_part = torch.empty((batch, nchunks * split * ngroups * chunk * chunk), **f32)
            cross = torch.empty((batch, nheads, n_blocks, padded), **f32)
            for diagonal, tiles in ((True, n_blocks), (False, n_blocks * n_blocks)):
                if diagonal or n_blocks > 1:
                    _dcb_bwd_kernel[(nchunks * tiles, ngroups * split, batch)](
                        *strided(x, 4), *strided(dy, 4), dtp, cum, cb, dcb_part, cross,
                        seqlen, nheads, heads_per_group, ngroups, headdim, nchunks, padded,
                        DOT_PRECISION=precision, CHUNK=chunk, BLOCK_P=block_p, BLOCK_T=cfg["BLOCK_T"],
                        HEAD_SPLIT=split, DIAGONAL=diagonal, **_launch_options(cfg),
                    )
            return dcb_part, split, cross

        dcb_part, dcb_splits, cross = launch_dcb(_config(
            "dcb_bwd", _key("dcb_bwd", chunk, headdim, heads_per_group, dtype_name_), launch_dcb,
            configs.get("dcb_bwd"), _fits_chunk(chunk, "BLOCK_T")))

        def launch_db(cfg):
            n_blocks = chunk // cfg["BLOCK_T"]
            split = min(cfg["HEAD_SPLIT"], heads_per_group)
            dB_part = torch.empty((batch, seqlen, split, ngroups, dstate), **f32)
            _db_bwd_kernel[(nchunks * n_blocks, ngroups * split, batch)](
                *strided(x, 4), *strided(C, 4), dtp, cum, grad_after, dcb_part, dB_part, *dims, dcb_splits,
                DOT_PRECISION=precision, CHUNK=chunk, BLOCK_P=block_p, BLOCK_N=block_n, BLOCK_T=cfg["BLOCK_T"],
                HEAD_SPLIT=split, **_launch_options(cfg),
            )
            return dB_part

        dB_part = launch_db(_config(
            "db_bwd", _key("db_bwd", chunk, headdim, dstate, heads_per_group, dtype_name_), launch_db,
            configs.get("db_bwd"), _fits_chunk(chunk, "BLOCK_T")))

        def launch_dc(cfg):
            n_blocks = chunk // cfg["BLOCK_T"]
            split = min(cfg["HEAD_SPLIT"], heads_per_group)
            dC_part = torch.empty((batch, seqlen, split, ngroups, dstate), **f32)
            _dc_bwd_kernel[(nchunks * n_blocks, ngroups * split, batch)](
                *strided(C, 4), *strided(B, 4), *strided(dy, 4), cum, enter, dcb_part, dC_part, off_term, *dims,
                dcb_splits, DOT_PRECISION=precision, CHUNK=chunk, BLOCK_P=block_p, BLOCK_N=block_n,
                BLOCK_T=cfg["BLOCK_T"], HEAD_SPLIT=split, **_launch_options(cfg),
            )
            return dC_part

        dC_part = launch_dc(_config(
            "dc_bwd", _key("dc_bwd", chunk, headdim, dstate, heads_per_group, dtype_name_), launch_dc,
            configs.get("dc_bwd"), _fits_chunk(chunk, "BLOCK_T")))

        _dt_bwd_kernel[(batch * nheads, nchunks)](
            *strided(dt, 3), A, dt_bias, dtp, ddt_direct, state_term, off_term, cross, k_sum,
            *strided(ddt, 3), dA_part, dbias_part, seqlen, nheads, nchunks, padded,
            HAS_BIAS=dt_bias is not None, SOFTPLUS=bool(dt_softplus), CHUNK=chunk, CROSS_BLOCKS=cross.shape[2],
        )

    dA = dA_part.sum((0, 2)).to(A.dtype)
    dB = dB_part.sum(2).to(B.dtype)
    dC = dC_part.sum(2).to(C.dtype)
    dD = dD_part.sum((0, 1)).to(D.dtype) if D is not None else None
    dbias = dbias_part.sum((0, 2)).to(dt_bias.dtype) if dt_bias is not None else None
    if dinit is not None:
        dinit = dinit.to(initial_state.dtype)
    return dx, ddt, dA, dB, dC, dD, dinit, dbias


def _launch_state_bwd(cfg, dy, dfinal_state, C, cum, enter, grad_after, dinit, seqlen, nheads, heads_per_group,
                      headdim, dstate, nchunks, padded, precision, chunk) -> Tensor:
    batch = dy.shape[0]
    tiles_p, tiles_n = triton.cdiv(headdim, cfg["BLOCK_P"]), triton.cdiv(dstate, cfg["BLOCK_N"])
    k_part = torch.empty((batch, nheads, nchunks, tiles_p * tiles_n), dtype=torch.float32, device=dy.device)
    _state_bwd_kernel[(batch * nheads, tiles_p, tiles_n)](
        *strided(dy, 4), *strided(C, 4), cum, enter, *strided(dfinal_state, 4), grad_after, k_part, dinit,
        seqlen, nheads, heads_per_group, headdim, dstate, nchunks, padded,
        HAS_DFINAL=dfinal_state is not None, HAS_INIT=dinit is not None, DOT_PRECISION=precision, CHUNK=chunk,
        BLOCK_P=cfg["BLOCK_P"], BLOCK_N=cfg["BLOCK_N"], BLOCK_L=cfg["BLOCK_L"], **_launch_options(cfg),
    )
    return k_part


# ---------------------------------------------------------------------------------------------------------------
# Custom ops: one graph node each for torch.compile / torch.export, with autograd
# ---------------------------------------------------------------------------------------------------------------


def _forward_impl(
    x: Tensor,
    dt: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    chunk_size: int,
    D: Tensor | None,
    initial_state: Tensor | None,
    dt_bias: Tensor | None,
    dt_softplus: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """archgen_v1::ssd_scan -> (y, final_state, dtp, cum, cb, enter): `ssd_scan_forward` as an operator; the last four
    are internal (for the backward) and non-differentiable. CPU tensors take the reference (see `triton_on_cpu`),
    with empty internals: an exported graph runs anywhere, but trains only on a GPU."""
    if not (x.is_cuda or triton_on_cpu()):
        y, final_state = ssd_scan_reference(x, dt, A, B, C, chunk_size, D, initial_state, dt_bias=dt_bias,
                                            dt_softplus=dt_softplus)
        empty = x.new_empty((0,), dtype=torch.float32)
        return y, final_state.float(), empty, empty.clone(), empty.clone(), empty.clone()
    return ssd_scan_forward(x, dt, A, B, C, chunk_size, D, initial_state, dt_bias, dt_softplus)


def _forward_fake(x, dt, A, B, C, chunk_size, D, initial_state, dt_bias, dt_softplus):
    batch, seqlen, nheads, headdim = x.shape
    ngroups, dstate = B.shape[-2:]
    nchunks = (seqlen + chunk_size - 1) // chunk_size
    f32 = {"dtype": torch.float32}
    parts, state_dtype = _state_format(x.dtype)
    return (
        x.new_empty((batch, seqlen, nheads, headdim)),
        x.new_empty((batch, nheads, headdim, dstate), **f32),
        x.new_empty((batch, nheads, nchunks * chunk_size), **f32),
        x.new_empty((batch, nheads, nchunks * chunk_size), **f32),
        x.new_empty((batch, nchunks * ngroups * chunk_size * chunk_size), **f32),
        x.new_empty((batch, nchunks * nheads * parts * headdim * dstate), dtype=state_dtype),
    )


def _backward_impl(
    dy: Tensor,
    dfinal_state: Tensor | None,
    x: Tensor,
    dt: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    chunk_size: int,
    D: Tensor | None,
    initial_state: Tensor | None,
    dt_bias: Tensor | None,
    dt_softplus: bool,
    dtp: Tensor,
    cum: Tensor,
    cb: Tensor,
    enter: Tensor,
) -> list[Tensor]:
    """archgen_v1::ssd_scan_backward -> [dx, ddt, dA, dB, dC, dD, dinitial_state, ddt_bias]; an absent input's gradient
    is an empty (0,) tensor (an operator cannot return None)."""
    if dtp.numel() == 0 and x.numel() > 0:
        raise RuntimeError("archgen_v1::ssd_scan has no backward for CPU tensors: train on a GPU, or with the reference "
                           "op (ops/ssd.py)")
    grads = ssd_scan_backward(dy, dfinal_state, x, dt, A, B, C, chunk_size, D, initial_state, dt_bias, dt_softplus,
                              dtp, cum, cb, enter)
    return [g if g is not None else x.new_empty((0,)) for g in grads]


def _backward_fake(dy, dfinal_state, x, dt, A, B, C, chunk_size, D, initial_state, dt_bias, dt_softplus, dtp, cum, cb,
                   enter):
    def like(t):
        return torch.empty_like(t, memory_format=torch.contiguous_format) if t is not None else x.new_empty((0,))

    return [like(x), like(dt), like(A), like(B), like(C), like(D), like(initial_state), like(dt_bias)]


def _setup_context(ctx, inputs, output):
    x, dt, A, B, C, chunk_size, D, initial_state, dt_bias, dt_softplus = inputs
    _, _, dtp, cum, cb, enter = output
    ctx.save_for_backward(x, dt, A, B, C, D, initial_state, dt_bias, dtp, cum, cb, enter)
    ctx.chunk_size = chunk_size
    ctx.dt_softplus = dt_softplus
    ctx.mark_non_differentiable(dtp, cum, cb, enter)
    ctx.set_materialize_grads(False)


def _backward(ctx, dy, dfinal_state, *_internal_grads):
    x, dt, A, B, C, D, initial_state, dt_bias, dtp, cum, cb, enter = ctx.saved_tensors
    if dy is None:  # only the final state was used
        dy = torch.zeros_like(x)
    dx, ddt, dA, dB, dC, dD, dinit, dbias = ssd_scan_backward_op(
        dy, dfinal_state, x, dt, A, B, C, ctx.chunk_size, D, initial_state, dt_bias, ctx.dt_softplus, dtp, cum, cb,
        enter,
    )

    def present(grad, t):
        return grad if t is not None else None

    return (dx, ddt, dA, dB, dC, None, present(dD, D), present(dinit, initial_state), present(dbias, dt_bias), None)


# The backward op first: the forward's autograd formula calls it.
ssd_scan_backward_op = register_op("ssd_scan_backward", _backward_impl, _backward_fake)
ssd_scan_op = register_op("ssd_scan", _forward_impl, _forward_fake, backward=_backward, setup_context=_setup_context)


# ---------------------------------------------------------------------------------------------------------------
# Entry point and reference
# ---------------------------------------------------------------------------------------------------------------


def ssd_scan(
    x: Tensor,
    dt: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    chunk_size: int = CHUNK_SIZE,
    D: Tensor | None = None,
    initial_state: Tensor | None = None,
    *,
    dt_bias: Tensor | None = None,
    dt_softplus: bool = False,
) -> tuple[Tensor, Tensor]:
    """The SSD chunked scan, differentiable: (y (B, T, H, P) in x.dtype, final_state (B, H, P, N) float32).

    The arguments of templates/runtime/ssd.py's `ssd_scan`, plus dt_bias / dt_softplus to fuse the step size's
    Δ = softplus(dt + dt_bias) (the runtime's caller applies it and passes Δ: leave both at their defaults then).
    chunk_size: a power of two ≥ 16 (the kernel's L; the result does not depend on it beyond rounding).
    Needs CUDA tensors (or TRITON_INTERPRET=1); on anything else it raises, and the caller runs the reference.
    """
    exporting = torch.compiler.is_exporting()
    if not (x.is_cuda or triton_on_cpu() or exporting):
        raise RuntimeError(
            f"the Triton ssd_scan kernel needs CUDA tensors, got x on {x.device}: call the reference (ops/ssd.py "
            "ssd_scan) instead, or set TRITON_INTERPRET=1 before importing triton to run the kernel in Triton's "
            "CPU interpreter (slow; for tests)"
        )
    y, final_state, *_ = ssd_scan_op(x, dt, A, B, C, chunk_size, D, initial_state, dt_bias, dt_softplus)
    return y, final_state


def ssd_scan_reference(
    x: Tensor,
    dt: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    chunk_size: int = CHUNK_SIZE,
    D: Tensor | None = None,
    initial_state: Tensor | None = None,
    *,
    dt_bias: Tensor | None = None,
    dt_softplus: bool = False,
) -> tuple[Tensor, Tensor]:
    """The recurrence as written, one position at a time, in float32 (float64 for float64 inputs).

    Same signature and results as `ssd_scan` (chunk_size is unused: there are no chunks). Slow (a Python loop over T)
    and independent of both the kernels and the chunked algorithm of templates/runtime/ssd.py."""
    acc = torch.float64 if any(t.dtype == torch.float64 for t in (x, dt, A, B, C)) else torch.float32
    batch, seqlen, nheads, headdim = x.shape
    ngroups, dstate = B.shape[-2:]
    step = dt.to(acc) + (dt_bias.to(acc) if dt_bias is not None else 0.0)
    step = F.softplus(step) if dt_softplus else step  # (B, T, H)
    x_, A_ = x.to(acc), A.to(acc)
    B_h = B.to(acc).repeat_interleave(nheads // ngroups, dim=2)  # (B, T, H, N): head h reads group h // R
    C_h = C.to(acc).repeat_interleave(nheads // ngroups, dim=2)
    if initial_state is not None:
        h = initial_state.to(acc)
    else:
        h = x_.new_zeros(batch, nheads, headdim, dstate)  # (B, H, P, N)
    ys = []
    for t in range(seqlen):
        decay = torch.exp(step[:, t] * A_)  # (B, H)
        h = decay[:, :, None, None] * h + (step[:, t, :, None] * x_[:, t])[..., None] * B_h[:, t, :, None, :]
        ys.append(torch.einsum("bhpn,bhn->bhp", h, C_h[:, t]))
    y = torch.stack(ys, dim=1) if ys else x_.new_zeros(batch, 0, nheads, headdim)  # (B, T, H, P)
    if D is not None:
        y = y + D.to(acc)[:, None] * x_
    return y.to(x.dtype), h


def decomposition(reference, max_seqlen: int) -> dict:
    """{archgen_v1::ssd_scan: the op written with `reference`}: how exporters that cannot run Triton (ONNX) lower it.

    reference: a generated package's ops/ssd.py `ssd_scan` (Δ already positive; the bias and softplus are applied
    here). max_seqlen is unused (the chunked reference traces any length); kept for the shared contract."""

    def ssd_scan_decomposed(x, dt, A, B, C, chunk_size, D, initial_state, dt_bias, dt_softplus):
        step = dt.float() + dt_bias.float() if dt_bias is not None else dt
        step = F.softplus(step) if dt_softplus else step
        y, final_state = reference(x, step, A, B, C, chunk_size, D=D, initial_state=initial_state)
        empty = x.new_empty((0,), dtype=torch.float32)
        return y, final_state.float(), empty, empty.clone(), empty.clone(), empty.clone()

    return {op_overload("ssd_scan"): ssd_scan_decomposed}


def _check_inputs(x, dt, A, B, C, chunk_size, D, initial_state, dt_bias) -> None:
    """Shapes, dtypes, devices and the chunk size, each error naming what was expected and what came."""
    if x.dim() != 4 or B.dim() != 4:
        raise ValueError(f"x must be (B, T, H, P) and B (B, T, G, N), got x {tuple(x.shape)} and B {tuple(B.shape)}")
    batch, seqlen, nheads, headdim = x.shape
    ngroups, dstate = B.shape[-2:]
    if ngroups == 0 or nheads % ngroups:
        raise ValueError(f"the number of heads H = {nheads} must be a multiple of the number of groups G = {ngroups}")
    expected = {
        "dt": (dt, (batch, seqlen, nheads)), "A": (A, (nheads,)), "B": (B, (batch, seqlen, ngroups, dstate)),
        "C": (C, (batch, seqlen, ngroups, dstate)), "D": (D, (nheads,)), "dt_bias": (dt_bias, (nheads,)),
        "initial_state": (initial_state, (batch, nheads, headdim, dstate)),
    }
    for name, (t, shape) in expected.items():
        if t is None:
            continue
        if tuple(t.shape) != shape:
            raise ValueError(f"{name} must have shape {shape} for x (B, T, H, P) = {tuple(x.shape)} and B (B, T, G, N) "
                             f"= {tuple(B.shape)}, got {tuple(t.shape)}")
        if t.dtype not in SUPPORTED_DTYPES:
            raise TypeError(f"{name} is {t.dtype}; the kernels take {', '.join(map(str, SUPPORTED_DTYPES))}: use "
                            "ssd_scan_reference for float64")
        if t.device != x.device:
            raise ValueError(f"{name} is on {t.device}, x on {x.device}: all inputs must be on one device")
    if x.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"x is {x.dtype}; the kernels take {', '.join(map(str, SUPPORTED_DTYPES))}")
    if chunk_size < 16 or chunk_size & (chunk_size - 1):
        raise ValueError(f"chunk_size must be a power of two of at least 16, got {chunk_size}")
    if headdim > 256 or dstate > 256:
        raise ValueError(f"head_dim {headdim} and d_state {dstate} must each be at most 256 (one register tile)")
    if x.device.type != "cuda" and not interpreting():
        raise RuntimeError(f"the Triton kernels need CUDA tensors, got {x.device} (or set TRITON_INTERPRET=1 before "
                           "importing triton)")


__all__ = ["decomposition", "ssd_scan", "ssd_scan_backward", "ssd_scan_forward", "ssd_scan_reference",
           "tuned_configs"]
