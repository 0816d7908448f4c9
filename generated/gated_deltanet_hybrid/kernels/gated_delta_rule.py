"""Gated DeltaNet (the gated delta rule) as chunked Triton kernels, forward and backward: the kernels, the launchers,
the custom ops, the references.

Per batch b and value head h (of HV = H·R, reading key head h // R), with a (K, V) state S::

    S_t = exp(g_t) (I − β_t k_t k_tᵀ) S_{t-1} + β_t k_t v_tᵀ        S_{-1} = initial_state, or 0
    o_t = scale · S_tᵀ q_t

Shapes and arguments as templates/runtime/gated_delta.py's `gated_delta_rule` (ops/gated_delta.py of a generated
package): q and k (B, T, H, K), L2-normalised; v (B, T, HV, V); g = log α ≤ 0 and β (B, T, HV); initial_state and
the final state (B, HV, K, V), float32. q, k, v and β may be float32, float16 or bfloat16 and strided (the layer
hands over views of its convolution's output); o comes back in v's dtype.

The algorithm is the reference's chunked WY form (its docstring derives it). Split time into chunks of L positions;
within a chunk let c_t = Σ_{i≤t} g_i (≤ 0, decreasing), so the decay from s to t is exp(c_t − c_s) ≤ 1. With S_c the
state entering chunk c and T⁻¹ = (I + A)⁻¹ for A[t, s] = β_t exp(c_t − c_s) k_t·k_s (s < t):

    W = T⁻¹ (β exp(c) ⊙ k),   U = T⁻¹ (β ⊙ v)                               per chunk, no state needed
    u = U − W S_c                                                          the chunk's pseudo-values
    S_{c+1} = exp(c_{L-1}) S_c + (exp(c_{L-1} − c) ⊙ k)ᵀ u                  state passing
    o = scale · (exp(c) ⊙ (q S_c) + ((q kᵀ) ⊙ exp(c_t − c_s) [s ≤ t]) u)     outputs

Three launches:
  1. `_chunk_wy_kernel`, per (chunk, batch × value head): the prefix sums c, A, T⁻¹ by block doubling (log2 L − 1 rounds
     of two (L, L) products after a first round without any, exact: the reference's `_unit_lower_inverse`), then W and
     U. Or, the tuner's other choice, `_chunk_wy_tiled_kernel`: the same from (16, 16) tiles, each diagonal tile's
     inverse by doubling and two merges of tiles, so that the chain of dependent products is of (16, 16) ones.
  2. `_state_kernel`, per (block of V columns, batch × value head): a loop over the chunks that stores S_c, computes
     and stores u, and advances the state, float32 in registers; the last state is the final state. A head's blocks
     of V are neighbouring programs, so they run together and read its W and k through L2 once.
  3. `_output_kernel`, per (block of V columns, chunk, batch × value head): the outputs.
Every product runs on the tensor cores with float32 accumulation. The intermediates W, U, u and the chunk states are
stored in, and multiplied as, the inputs' dtype (T⁻¹ is computed in float32 at tf32, then rounded likewise), as
flash-linear-attention does: on the H200 at B4 T4096 H16 HV32 K128 V128 in bf16 that gave the output 3.4e-3 and the
final state 2.7e-3 relative error against float32 math, fla's own figures to two digits, in 1.70 ms against 2.90 ms
with float32 intermediates (then at tf32;
2.0e-3 and 9.6e-4; they now multiply at full float32, unmeasured), bench/gdn_check.py, GPU call 3 of session 5 (with
8-warp configs; the 4-warp ones took the forward to 0.92 ms against fla's 0.85 in session 6). The launcher's
`intermediates=torch.float32` keeps the more accurate form. Every exponent is masked to ≤ 0 before its exp. T need
not be a multiple of L: positions past T load β = 0 and g = 0 (the identity step) and are never stored.

The backward (`gated_delta_rule_backward`, the op's autograd; forward + backward 4.33 ms on the H200 in GPU call 1 of
session 8, fla's 3.74 beside it, the reference's 129.6 in session 6) runs the WY and state kernels again, storing T⁻¹
as well (recomputing them costs less than keeping a state per chunk from the forward, as fla does), then three
launches:
  4. `_intra_chunk_dpseudo_kernel`, per (block of V columns, chunk, batch × value head): the part of u's gradient
     that needs no state, du_local = scale ((q kᵀ) ⊙ D)ᵀ dO, every chunk at once (fla's chunk_bwd_dv_local does the
     same): the state loop below then takes no (L, K) × (K, L) product per chunk and block of V.
  5. `_state_backward_kernel`, per (block of V columns, batch × value head): the state passing backwards, from the
     last chunk to the first, dS (the gradient of the state leaving the chunk, float32 in registers) and
     du = du_local + (exp(c_{L-1} − c) ⊙ k) dS; stores both per chunk; the last is the initial state's gradient.
  6. `_chunk_backward_kernel`, per (chunk, batch × key head): every input's gradient in the chunk, a value head at a
     time, each one's dq and dk added to the last's in dq and dk (no per-value-head copies to sum). The adjoint of
     T⁻¹ needs no (L, L) inverse of its own: with û = T⁻¹ᵀ du, the gradient of A is −û uᵀ below the diagonal
     (since T⁻¹ (β v − β exp(c) ⊙ k S_c) = u), and dv = β ⊙ û. The prefix sums' gradient dc collects each exp(c)'s
     share (q ⊙ dq, k ⊙ dk and β-weighted rows summed over K, as fla does), and dg is its reverse prefix sum.
dq and dk are each key head's sum over its value heads, a value head's share rounded to q's dtype when added (the
per-value-head copies in memory and their summing launch took 0.10 ms at the bench shape, GPU call 2 of session 9).

Decoding has its own kernel, `gated_delta_step`: one position for one (batch, value head, block of V columns) per
program, the state read once and written once (the reference's is a chain of small ops over the whole state).

Contents: `gated_delta_rule` (the entry point, CUDA tensors), the custom op `archgen_v1::gated_delta_rule` (one graph
node under torch.compile / torch.export, with a fake implementation; its autograd calls the op
`archgen_v1::gated_delta_rule_backward`), the launchers `gated_delta_rule_forward` and `gated_delta_rule_backward`, the
autotune spaces and their tuners (named gated_delta_rule.<kernel> in triton_support's tuning tables) with the build-time
hook `autotune`, `gated_delta_rule_reference` (the recurrence one position at a time with the same signature: the
tests' ground truth and the op's CPU path) and `gated_delta_rule_backward_reference` (autograd through it), the decode
step's `gated_delta_step` (op `archgen_v1::gated_delta_step`,
launcher `gated_delta_step_forward`, reference `gated_delta_step_reference`), and `decomposition` (each op written with
ops/gated_delta.py's function of its name, for ONNX). Needs triton and triton_support.py next to it.
"""

from dataclasses import dataclass

import torch
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
    strided,
    triton_on_cpu,
)

CHUNK_SIZE = 64
"""The default chunk length L (the reference's and flash-linear-attention's): the (L, L) products per chunk against
the states stored once per chunk."""
MAX_CHUNK = 64
"""The longest chunk the kernels take: A, T⁻¹ and the output's (L, L) decays live in registers."""
MAX_HEAD_DIM = 256
"""K and V at most: the state loop holds all K rows of a (K, BLOCK_V) state block in registers."""
SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

# Autotune spaces, kept small: every config of a kernel is compiled once per process on the first call of a key.
# BLOCK_K tiles K in the loops over it (the WY, output and chunk-backward kernels), BLOCK_V tiles V (every kernel);
# the state loops hold all K rows of their state block. Each config's registers per thread and shared memory per
# program at K = V = 128, L = 64, bf16 come from triton 3.6 compiles for sm_90 with the run-time specializations
# (docs/design.md says how, no GPU needed); the milliseconds are that kernel alone on the H200 at B4 T4096 H16 HV32
# (bench/gdn_check.py, GPU call 3 of session 6, kernel_tuning). The first config of each list is that run's winner, the
# one a package without a tuning table launches. How many programs fit on an SM at once (registers × threads within
# 64K, shared memory within 228 KB) decided every kernel: the 4-warp configs won all but the output kernel's tuning,
# the state loops most (one program per (head, block of V), sequential over the chunks: fewer waves of that loop).
# TILED picks the WY kernel: 0 the whole chunk's T⁻¹ by doubling (_chunk_wy_kernel: a chain of 10 dependent (64, 64)
# products, the forward's largest kernel; at 8 warps, one program per SM, it took 0.86 ms: dropped), 1 from (16, 16)
# tiles (_chunk_wy_tiled_kernel: its chains are of (16, 16) products; 255 registers at every block size and warp
# count, no spills at 16-column blocks in the forward, 12-16 bytes where the backward stores T⁻¹). GPU call 4 of
# session 7 (H200, B4 T4096 H16 HV32, bf16): the tiled kernel at 1 warp, 8 programs per SM, 0.252 ms against the
# doubling kernel's 0.426, and the forward 0.750 ms (0.921 in session 6), o and final state 3.5e-3 / 2.7e-3 from
# float32 as before.
WY_CONFIGS = [
    {"TILED": 1, "BLOCK_K": 16, "BLOCK_V": 16, "num_warps": 1, "num_stages": 2},  # 255, no spills, 2 KB: 8; 0.252 ms
    {"TILED": 1, "BLOCK_K": 32, "BLOCK_V": 32, "num_warps": 2, "num_stages": 2},  # 255, 16 bytes spilled, 5 KB: 4; 0.301
    {"TILED": 1, "BLOCK_K": 16, "BLOCK_V": 16, "num_warps": 2, "num_stages": 2},  # 255, no spills, 2 KB: 4; 0.376
    {"TILED": 0, "BLOCK_K": 64, "BLOCK_V": 64, "num_warps": 4, "num_stages": 2},  # 185 registers, 32 KB: 2 per SM; 0.426
]
# The state loops run B·HV·V/BLOCK_V programs: at BLOCK_V 32 and two per SM, 512 programs are two waves on the H200's
# 132 SMs, at 64 one (fla's forward state loop takes 64 columns, 0.21 ms against this one's 0.28 in GPU call 1 of
# session 8). GPU call 2 of session 8: 0.222 ms at 64 columns against 0.287 at 32, the forward 0.687 ms (0.747).
STATE_CONFIGS = [
    {"BLOCK_V": 64, "num_warps": 4, "num_stages": 2},  # 254, no spills, 96 KB: 2, one wave; 0.222 ms
    {"BLOCK_V": 32, "num_warps": 4, "num_stages": 2},  # 156, 80 KB: 2; 0.287 ms
    {"BLOCK_V": 16, "num_warps": 4, "num_stages": 2},  # 94, 72 KB: 3, twice the programs re-reading W; 0.42 ms
    {"BLOCK_V": 32, "num_warps": 4, "num_stages": 1},  # 151, 28 KB: 3, nothing prefetched; 0.43 ms
]
OUTPUT_CONFIGS = [
    {"BLOCK_K": 64, "BLOCK_V": 128, "num_warps": 8, "num_stages": 2},  # 118, 64 KB; q kᵀ once per chunk; 0.22 ms
    {"BLOCK_K": 64, "BLOCK_V": 64, "num_warps": 8, "num_stages": 2},  # 80, 48 KB; 0.25 ms
    {"BLOCK_K": 64, "BLOCK_V": 64, "num_warps": 4, "num_stages": 2},  # 151, 48 KB; 0.23 ms
]
# The backward's state loop holds dS like the forward's state and loads q, k and W whole per chunk; its chunk kernel
# holds (L, L) and (L, BLOCK_K) float32 tiles (255 registers at 4 warps, and still the winner: two programs per SM).
# Session 8 took the state-free part of du (a q kᵀ per chunk and block of V) out of the state loop into a kernel of
# its own, the output kernel's shape without the states (its configs are that kernel's): the loop's registers fell
# from 209 to 152 at its old winner and its time from 0.81 ms (GPU call 1 of session 8; fla's 0.46, plus 0.12 for
# fla's kernel of the state-free part) to 0.517 plus 0.138 (call 3). The milliseconds below are call 3's.
# The chunk kernel also ran as two launches (what sums over V, then dq and dk over K, the (L, L) tiles through
# memory): 1.83 ms against 1.68 in one at 32-column blocks, and at 16-row K blocks an illegal address (triton 3.6,
# bench/gdn_check.py config_check): dropped.
INTRA_CHUNK_DPSEUDO_CONFIGS = [
    {"BLOCK_K": 64, "BLOCK_V": 128, "num_warps": 8, "num_stages": 2},  # 74, 32 KB: 3; k qᵀ once per chunk; 0.138
    {"BLOCK_K": 64, "BLOCK_V": 64, "num_warps": 4, "num_stages": 2},  # 96, 32 KB: 5; 0.151
]
STATE_BACKWARD_CONFIGS = [
    {"BLOCK_V": 32, "num_warps": 4, "num_stages": 1},  # 180, 40 KB: 2, half the programs re-reading q, k and W; 0.517
    {"BLOCK_V": 16, "num_warps": 4, "num_stages": 2},  # 152, 106 KB: 2; 0.542 ms
    {"BLOCK_V": 64, "num_warps": 8, "num_stages": 1},  # 228, 48 KB: 1, two waves of 8 warps (4 warps spill); 0.547
    {"BLOCK_V": 16, "num_warps": 4, "num_stages": 1},  # 138, 36 KB: 3; 0.808 ms
]
# GROUPED 1 (session 9): a program per key head's chunk sums dq and dk over its value heads itself, where GROUPED 0
# stores them per value head for `_group_sum_kernel` (0.10 ms at the bench shape, GPU call 2 of session 9); the
# tuner times the kernel and that launch together. Not timed on a GPU yet: GROUPED 1 costs the first config 24 bytes
# of stack (255 registers), the 8-warp one 112 (255 registers against 214: not offered).
CHUNK_BACKWARD_CONFIGS = [
    {"GROUPED": 0, "BLOCK_K": 32, "BLOCK_V": 32, "num_warps": 4, "num_stages": 1},  # 255, no spills, 32 KB: 2; 1.68 ms
    {"GROUPED": 1, "BLOCK_K": 32, "BLOCK_V": 32, "num_warps": 4, "num_stages": 1},  # 255, 24 bytes of stack: 2
    {"GROUPED": 0, "BLOCK_K": 32, "BLOCK_V": 64, "num_warps": 8, "num_stages": 1},  # 214, 64 KB: 1; 2.23 ms (session 6)
]
INTERPRETER_CONFIGS = {
    "wy": {"TILED": 1, "BLOCK_K": 16, "BLOCK_V": 16, "num_warps": 4, "num_stages": 1},
    "state": {"BLOCK_V": 16, "num_warps": 4, "num_stages": 1},
    "output": {"BLOCK_K": 16, "BLOCK_V": 16, "num_warps": 4, "num_stages": 1},
    "intra_chunk_dpseudo": {"BLOCK_K": 16, "BLOCK_V": 16, "num_warps": 4, "num_stages": 1},
    "state_backward": {"BLOCK_V": 16, "num_warps": 4, "num_stages": 1},
    "chunk_backward": {"GROUPED": 1, "BLOCK_K": 16, "BLOCK_V": 16, "num_warps": 4, "num_stages": 1},
}
"""The configs under TRITON_INTERPRET=1: blocks of 16, so the tests' small heads still span several blocks."""


# ---------------------------------------------------------------------------------------------------------------
# Kernels
# ---------------------------------------------------------------------------------------------------------------


_EMULATE_HALF_DOT = tl.constexpr(interpreting())
"""Triton's interpreter computes tl.dot on bfloat16 operands as integers (it stores them as uint16): there the
operands are rounded to their half dtype and multiplied in float32, which is what the tensor cores compute."""


@triton.jit
def _operand(value, dot_ty: tl.constexpr):
    """value as a tl.dot operand of type dot_ty (see _EMULATE_HALF_DOT)."""
    if _EMULATE_HALF_DOT:
        operand = rounded(value, dot_ty).to(tl.float32)
    else:
        operand = value.to(dot_ty)
    return operand


@triton.jit
def _unit_lower_inverse(A, N: tl.constexpr, LOG2_N: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """(I + A)⁻¹ of a strictly lower triangular (N, N) float32 A, N = 2^LOG2_N, by block doubling: X holds the
    inverses of the diagonal blocks of size `block`; the inverse over blocks of twice the size is X − X E X, E the
    lower-left quarters of A in them. From X = I (blocks of 1) that is I − E: the first level needs no product, which
    shortens the chain of dependent ones by two."""
    t = tl.arange(0, N)
    pairs = (t[:, None] // 2 == t[None, :] // 2) & (t[:, None] != t[None, :])
    inverse = (t[:, None] == t[None, :]).to(tl.float32) - tl.where(pairs, A, 0.0)
    for level in tl.static_range(1, LOG2_N):
        block = 1 << level
        same_pair = (t[:, None] // (2 * block)) == (t[None, :] // (2 * block))
        other_half = (t[:, None] // block) != (t[None, :] // block)
        lower_left = tl.where(same_pair & other_half, A, 0.0)
        inverse -= tl.dot(tl.dot(inverse, lower_left, input_precision=DOT_PRECISION), inverse,
                          input_precision=DOT_PRECISION)
    return inverse


@triton.jit
def _chunk_wy_kernel(
    k_ptr, k_stride_b, k_stride_t, k_stride_h, k_stride_k,
    v_ptr, v_stride_b, v_stride_t, v_stride_h, v_stride_v,
    g_ptr, g_stride_b, g_stride_t, g_stride_h,
    beta_ptr, beta_stride_b, beta_stride_t, beta_stride_h,
    w_ptr,  # (B, HV, c·L, K) in the intermediates' dtype, contiguous: W
    u_ptr,  # (B, HV, c·L, V) in the intermediates' dtype, contiguous: U
    cum_ptr,  # (B, HV, c·L) float32, contiguous: the in-chunk prefix sums c
    inverse_ptr,  # (B, HV, c·L, L) in the intermediates' dtype, contiguous: T⁻¹, for the backward (STORE_INVERSE)
    seqlen, nv_heads, value_heads_per_key, dk, dv, padded_len,
    STORE_INVERSE: tl.constexpr, DOT_PRECISION: tl.constexpr, CHUNK: tl.constexpr, LOG2_CHUNK: tl.constexpr,
    BLOCK_K: tl.constexpr, BLOCK_V: tl.constexpr,
):
    chunk = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // nv_heads).to(tl.int64)
    h = pid_bh % nv_heads
    h_key = h // value_heads_per_key
    dot_ty = k_ptr.dtype.element_ty
    t = tl.arange(0, CHUNK)
    pos = chunk * CHUNK + t
    t_in = pos < seqlen
    g = tl.load(g_ptr + b * g_stride_b + pos * g_stride_t + h * g_stride_h, mask=t_in, other=0.0).to(tl.float32)
    beta = tl.load(beta_ptr + b * beta_stride_b + pos * beta_stride_t + h * beta_stride_h, mask=t_in,
                   other=0.0).to(tl.float32)
    cum = tl.cumsum(g, axis=0)
    row = pid_bh.to(tl.int64) * padded_len + pos  # this chunk's rows of the (B, HV, c·L) buffers
    tl.store(cum_ptr + row, cum)

    # A[t, s] = β_t exp(c_t − c_s) k_t·k_s for s < t.
    k_base = k_ptr + b * k_stride_b + h_key * k_stride_h + pos[:, None] * k_stride_t
    kk = tl.zeros((CHUNK, CHUNK), dtype=tl.float32)
    for k0 in range(0, dk, BLOCK_K):
        cols = k0 + tl.arange(0, BLOCK_K)
        k_blk = _operand(tl.load(k_base + cols[None, :] * k_stride_k, mask=t_in[:, None] & (cols < dk)[None, :],
                                 other=0.0), dot_ty)
        kk = tl.dot(k_blk, tl.trans(k_blk), kk, input_precision=DOT_PRECISION)
    strictly_lower = t[:, None] > t[None, :]
    A = kk * tl.exp(tl.where(strictly_lower, cum[:, None] - cum[None, :], float("-inf"))) * beta[:, None]
    inverse = _unit_lower_inverse(A, CHUNK, LOG2_CHUNK, DOT_PRECISION)

    # W = T⁻¹ (β exp(c) ⊙ k) and U = T⁻¹ (β ⊙ v), a block of columns at a time.
    inter_ty = w_ptr.dtype.element_ty
    if STORE_INVERSE:
        tl.store(inverse_ptr + row[:, None] * CHUNK + t[None, :], rounded(inverse, inter_ty))
    k_weight = (beta * tl.exp(cum))[:, None]
    for k0 in range(0, dk, BLOCK_K):
        cols = k0 + tl.arange(0, BLOCK_K)
        k_blk = tl.load(k_base + cols[None, :] * k_stride_k, mask=t_in[:, None] & (cols < dk)[None, :], other=0.0)
        w = tl.dot(_operand(inverse, inter_ty), _operand(k_blk.to(tl.float32) * k_weight, inter_ty),
                   input_precision=DOT_PRECISION)
        tl.store(w_ptr + row[:, None] * dk + cols[None, :], rounded(w, inter_ty), mask=(cols < dk)[None, :])
    v_base = v_ptr + b * v_stride_b + h * v_stride_h + pos[:, None] * v_stride_t
    for v0 in range(0, dv, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V)
        v_blk = tl.load(v_base + cols[None, :] * v_stride_v, mask=t_in[:, None] & (cols < dv)[None, :], other=0.0)
        u = tl.dot(_operand(inverse, inter_ty), _operand(v_blk.to(tl.float32) * beta[:, None], inter_ty),
                   input_precision=DOT_PRECISION)
        tl.store(u_ptr + row[:, None] * dv + cols[None, :], rounded(u, inter_ty), mask=(cols < dv)[None, :])


_TILE = tl.constexpr(16)
"""Rows per tile of the tiled WY kernel: the smallest tensor-core product, four to a chunk of 64."""


@triton.jit
def _dot(a, b, DOT_PRECISION: tl.constexpr):
    return tl.dot(a, b, input_precision=DOT_PRECISION)


@triton.jit
def _tile_gates(g_ptr, g_stride_t, beta_ptr, beta_stride_t, chunk, tile: tl.constexpr, seqlen, CHUNK: tl.constexpr):
    """Row tile `tile` of a chunk (g_ptr, beta_ptr at the head's): its offsets in the chunk, positions, which rows
    hold a position, g and β (rows past the chunk, L < 64, or past T load g = β = 0: the identity step)."""
    t = tile * _TILE + tl.arange(0, _TILE)
    pos = chunk * CHUNK + t
    valid = (t < CHUNK) & (pos < seqlen)
    g = tl.load(g_ptr + pos * g_stride_t, mask=valid, other=0.0).to(tl.float32)
    beta = tl.load(beta_ptr + pos * beta_stride_t, mask=valid, other=0.0).to(tl.float32)
    return t, pos, valid, g, beta


@triton.jit
def _store_tile(ptr, row_stride, rows_t, cols_t, tile, CHUNK: tl.constexpr):
    """One (16, 16) tile of the (L, L) T⁻¹ of a chunk, at chunk offsets rows_t × cols_t (those past L dropped)."""
    tl.store(ptr + rows_t[:, None] * row_stride + cols_t[None, :], tile,
             mask=(rows_t < CHUNK)[:, None] & (cols_t < CHUNK)[None, :])


@triton.jit
def _store_rows(ptr, head_row, width, rows_t, cols, value, CHUNK: tl.constexpr):
    """Rows rows_t (chunk offsets, those past L dropped) and columns cols (< width) of a (B, HV, c·L, width) buffer."""
    tl.store(ptr + (head_row + rows_t)[:, None] * width + cols[None, :], rounded(value, ptr.dtype.element_ty),
             mask=(rows_t < CHUNK)[:, None] & (cols < width)[None, :])


@triton.jit
def _chunk_wy_tiled_kernel(
    k_ptr, k_stride_b, k_stride_t, k_stride_h, k_stride_k,
    v_ptr, v_stride_b, v_stride_t, v_stride_h, v_stride_v,
    g_ptr, g_stride_b, g_stride_t, g_stride_h,
    beta_ptr, beta_stride_b, beta_stride_t, beta_stride_h,
    w_ptr, u_ptr, cum_ptr, inverse_ptr,  # as _chunk_wy_kernel's
    seqlen, nv_heads, value_heads_per_key, dk, dv, padded_len,
    STORE_INVERSE: tl.constexpr, DOT_PRECISION: tl.constexpr, CHUNK: tl.constexpr,
    BLOCK_K: tl.constexpr, BLOCK_V: tl.constexpr,
):
    """_chunk_wy_kernel's results (L ≤ 64) with T⁻¹ built from (16, 16) tiles, four row tiles to a chunk: each diagonal
    tile's inverse by doubling within 16 (four independent chains of 16-wide products), then two merges, inv of
    [[P, 0], [Q, R]] = [[P⁻¹, 0], [−R⁻¹ Q P⁻¹, R⁻¹]]: tiles 0-1 and 2-3, then the halves. The dependent products are
    (16, 16) ones, and W and U come from the ten non-zero tiles, each row tile of them a sum of (16, 16) × (16, B)
    products. A chunk shorter than 64 runs its missing rows as identity steps and stores none of them."""
    chunk = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // nv_heads).to(tl.int64)
    h = pid_bh % nv_heads
    h_key = h // value_heads_per_key
    dot_ty = k_ptr.dtype.element_ty
    inter_ty = w_ptr.dtype.element_ty
    g_ptr += b * g_stride_b + h * g_stride_h
    beta_ptr += b * beta_stride_b + h * beta_stride_h
    t0, pos0, in0, g0, beta0 = _tile_gates(g_ptr, g_stride_t, beta_ptr, beta_stride_t, chunk, 0, seqlen, CHUNK)
    t1, pos1, in1, g1, beta1 = _tile_gates(g_ptr, g_stride_t, beta_ptr, beta_stride_t, chunk, 1, seqlen, CHUNK)
    t2, pos2, in2, g2, beta2 = _tile_gates(g_ptr, g_stride_t, beta_ptr, beta_stride_t, chunk, 2, seqlen, CHUNK)
    t3, pos3, in3, g3, beta3 = _tile_gates(g_ptr, g_stride_t, beta_ptr, beta_stride_t, chunk, 3, seqlen, CHUNK)
    # The in-chunk prefix sums c, each tile's carried over from the tiles before it.
    cum0 = tl.cumsum(g0, axis=0)
    cum1 = tl.cumsum(g1, axis=0) + tl.sum(g0, axis=0)
    cum2 = tl.cumsum(g2, axis=0) + (tl.sum(g0, axis=0) + tl.sum(g1, axis=0))
    cum3 = tl.cumsum(g3, axis=0) + (tl.sum(g0, axis=0) + tl.sum(g1, axis=0) + tl.sum(g2, axis=0))
    head_row = pid_bh.to(tl.int64) * padded_len + chunk * CHUNK  # the chunk's first row of the (B, HV, c·L) buffers
    tl.store(cum_ptr + head_row + t0, cum0, mask=t0 < CHUNK)
    tl.store(cum_ptr + head_row + t1, cum1, mask=t1 < CHUNK)
    tl.store(cum_ptr + head_row + t2, cum2, mask=t2 < CHUNK)
    tl.store(cum_ptr + head_row + t3, cum3, mask=t3 < CHUNK)

    # k_i k_jᵀ for the ten tiles on and below the diagonal.
    k_base = k_ptr + b * k_stride_b + h_key * k_stride_h
    kk00 = tl.zeros((_TILE, _TILE), dtype=tl.float32)
    kk10 = tl.zeros((_TILE, _TILE), dtype=tl.float32)
    kk11 = tl.zeros((_TILE, _TILE), dtype=tl.float32)
    kk20 = tl.zeros((_TILE, _TILE), dtype=tl.float32)
    kk21 = tl.zeros((_TILE, _TILE), dtype=tl.float32)
    kk22 = tl.zeros((_TILE, _TILE), dtype=tl.float32)
    kk30 = tl.zeros((_TILE, _TILE), dtype=tl.float32)
    kk31 = tl.zeros((_TILE, _TILE), dtype=tl.float32)
    kk32 = tl.zeros((_TILE, _TILE), dtype=tl.float32)
    kk33 = tl.zeros((_TILE, _TILE), dtype=tl.float32)
    for k0 in range(0, dk, BLOCK_K):
        cols = k0 + tl.arange(0, BLOCK_K)
        col_in = (cols < dk)[None, :]
        k_cols = k_base + cols[None, :] * k_stride_k
        ka = _operand(tl.load(k_cols + pos0[:, None] * k_stride_t, mask=in0[:, None] & col_in, other=0.0), dot_ty)
        kb = _operand(tl.load(k_cols + pos1[:, None] * k_stride_t, mask=in1[:, None] & col_in, other=0.0), dot_ty)
        kc = _operand(tl.load(k_cols + pos2[:, None] * k_stride_t, mask=in2[:, None] & col_in, other=0.0), dot_ty)
        kd = _operand(tl.load(k_cols + pos3[:, None] * k_stride_t, mask=in3[:, None] & col_in, other=0.0), dot_ty)
        kk00 = tl.dot(ka, tl.trans(ka), kk00, input_precision=DOT_PRECISION)
        kk10 = tl.dot(kb, tl.trans(ka), kk10, input_precision=DOT_PRECISION)
        kk11 = tl.dot(kb, tl.trans(kb), kk11, input_precision=DOT_PRECISION)
        kk20 = tl.dot(kc, tl.trans(ka), kk20, input_precision=DOT_PRECISION)
        kk21 = tl.dot(kc, tl.trans(kb), kk21, input_precision=DOT_PRECISION)
        kk22 = tl.dot(kc, tl.trans(kc), kk22, input_precision=DOT_PRECISION)
        kk30 = tl.dot(kd, tl.trans(ka), kk30, input_precision=DOT_PRECISION)
        kk31 = tl.dot(kd, tl.trans(kb), kk31, input_precision=DOT_PRECISION)
        kk32 = tl.dot(kd, tl.trans(kc), kk32, input_precision=DOT_PRECISION)
        kk33 = tl.dot(kd, tl.trans(kd), kk33, input_precision=DOT_PRECISION)

    # A[t, s] = β_t exp(c_t − c_s) k_t·k_s for s < t: below the diagonal tiles every entry has s < t.
    r = tl.arange(0, _TILE)
    strictly_lower = r[:, None] > r[None, :]
    A00 = kk00 * tl.exp(tl.where(strictly_lower, cum0[:, None] - cum0[None, :], float("-inf"))) * beta0[:, None]
    A11 = kk11 * tl.exp(tl.where(strictly_lower, cum1[:, None] - cum1[None, :], float("-inf"))) * beta1[:, None]
    A22 = kk22 * tl.exp(tl.where(strictly_lower, cum2[:, None] - cum2[None, :], float("-inf"))) * beta2[:, None]
    A33 = kk33 * tl.exp(tl.where(strictly_lower, cum3[:, None] - cum3[None, :], float("-inf"))) * beta3[:, None]
    A10 = kk10 * tl.exp(cum1[:, None] - cum0[None, :]) * beta1[:, None]
    A20 = kk20 * tl.exp(cum2[:, None] - cum0[None, :]) * beta2[:, None]
    A21 = kk21 * tl.exp(cum2[:, None] - cum1[None, :]) * beta2[:, None]
    A30 = kk30 * tl.exp(cum3[:, None] - cum0[None, :]) * beta3[:, None]
    A31 = kk31 * tl.exp(cum3[:, None] - cum1[None, :]) * beta3[:, None]
    A32 = kk32 * tl.exp(cum3[:, None] - cum2[None, :]) * beta3[:, None]

    # T⁻¹'s tiles X: the diagonal ones, then the merges of 0-1 and 2-3, then of the halves (see the docstring).
    X00 = _unit_lower_inverse(A00, _TILE, 4, DOT_PRECISION)
    X11 = _unit_lower_inverse(A11, _TILE, 4, DOT_PRECISION)
    X22 = _unit_lower_inverse(A22, _TILE, 4, DOT_PRECISION)
    X33 = _unit_lower_inverse(A33, _TILE, 4, DOT_PRECISION)
    X10 = -_dot(_dot(X11, A10, DOT_PRECISION), X00, DOT_PRECISION)
    X32 = -_dot(_dot(X33, A32, DOT_PRECISION), X22, DOT_PRECISION)
    M20 = _dot(A21, X10, DOT_PRECISION) + _dot(A20, X00, DOT_PRECISION)  # Q P⁻¹ of the halves, by tiles
    M21 = _dot(A21, X11, DOT_PRECISION)
    M30 = _dot(A31, X10, DOT_PRECISION) + _dot(A30, X00, DOT_PRECISION)
    M31 = _dot(A31, X11, DOT_PRECISION)
    X20 = -_dot(X22, M20, DOT_PRECISION)
    X21 = -_dot(X22, M21, DOT_PRECISION)
    X30 = -(_dot(X32, M20, DOT_PRECISION) + _dot(X33, M30, DOT_PRECISION))
    X31 = -(_dot(X32, M21, DOT_PRECISION) + _dot(X33, M31, DOT_PRECISION))

    if STORE_INVERSE:
        inverse = inverse_ptr + (head_row * CHUNK)
        zero = tl.zeros((_TILE, _TILE), dtype=inter_ty)
        _store_tile(inverse, CHUNK, t0, t0, rounded(X00, inter_ty), CHUNK)
        _store_tile(inverse, CHUNK, t0, t1, zero, CHUNK)
        _store_tile(inverse, CHUNK, t0, t2, zero, CHUNK)
        _store_tile(inverse, CHUNK, t0, t3, zero, CHUNK)
        _store_tile(inverse, CHUNK, t1, t0, rounded(X10, inter_ty), CHUNK)
        _store_tile(inverse, CHUNK, t1, t1, rounded(X11, inter_ty), CHUNK)
        _store_tile(inverse, CHUNK, t1, t2, zero, CHUNK)
        _store_tile(inverse, CHUNK, t1, t3, zero, CHUNK)
        _store_tile(inverse, CHUNK, t2, t0, rounded(X20, inter_ty), CHUNK)
        _store_tile(inverse, CHUNK, t2, t1, rounded(X21, inter_ty), CHUNK)
        _store_tile(inverse, CHUNK, t2, t2, rounded(X22, inter_ty), CHUNK)
        _store_tile(inverse, CHUNK, t2, t3, zero, CHUNK)
        _store_tile(inverse, CHUNK, t3, t0, rounded(X30, inter_ty), CHUNK)
        _store_tile(inverse, CHUNK, t3, t1, rounded(X31, inter_ty), CHUNK)
        _store_tile(inverse, CHUNK, t3, t2, rounded(X32, inter_ty), CHUNK)
        _store_tile(inverse, CHUNK, t3, t3, rounded(X33, inter_ty), CHUNK)

    # W = T⁻¹ (β exp(c) ⊙ k) and U = T⁻¹ (β ⊙ v): row tile i is Σ_{j ≤ i} X_ij (tile j of the right-hand side).
    x00 = _operand(X00, inter_ty)
    x10 = _operand(X10, inter_ty)
    x11 = _operand(X11, inter_ty)
    x20 = _operand(X20, inter_ty)
    x21 = _operand(X21, inter_ty)
    x22 = _operand(X22, inter_ty)
    x30 = _operand(X30, inter_ty)
    x31 = _operand(X31, inter_ty)
    x32 = _operand(X32, inter_ty)
    x33 = _operand(X33, inter_ty)
    weight0 = (beta0 * tl.exp(cum0))[:, None]
    weight1 = (beta1 * tl.exp(cum1))[:, None]
    weight2 = (beta2 * tl.exp(cum2))[:, None]
    weight3 = (beta3 * tl.exp(cum3))[:, None]
    for k0 in range(0, dk, BLOCK_K):
        cols = k0 + tl.arange(0, BLOCK_K)
        col_in = (cols < dk)[None, :]
        k_cols = k_base + cols[None, :] * k_stride_k
        ka = tl.load(k_cols + pos0[:, None] * k_stride_t, mask=in0[:, None] & col_in, other=0.0).to(tl.float32)
        kb = tl.load(k_cols + pos1[:, None] * k_stride_t, mask=in1[:, None] & col_in, other=0.0).to(tl.float32)
        kc = tl.load(k_cols + pos2[:, None] * k_stride_t, mask=in2[:, None] & col_in, other=0.0).to(tl.float32)
        kd = tl.load(k_cols + pos3[:, None] * k_stride_t, mask=in3[:, None] & col_in, other=0.0).to(tl.float32)
        ra = _operand(ka * weight0, inter_ty)
        rb = _operand(kb * weight1, inter_ty)
        rc = _operand(kc * weight2, inter_ty)
        rd = _operand(kd * weight3, inter_ty)
        _store_rows(w_ptr, head_row, dk, t0, cols, _dot(x00, ra, DOT_PRECISION), CHUNK)
        _store_rows(w_ptr, head_row, dk, t1, cols, _dot(x11, rb, DOT_PRECISION) + _dot(x10, ra, DOT_PRECISION), CHUNK)
        _store_rows(w_ptr, head_row, dk, t2, cols, _dot(x22, rc, DOT_PRECISION) + _dot(x21, rb, DOT_PRECISION)
                    + _dot(x20, ra, DOT_PRECISION), CHUNK)
        _store_rows(w_ptr, head_row, dk, t3, cols, _dot(x33, rd, DOT_PRECISION) + _dot(x32, rc, DOT_PRECISION)
                    + _dot(x31, rb, DOT_PRECISION) + _dot(x30, ra, DOT_PRECISION), CHUNK)
    v_base = v_ptr + b * v_stride_b + h * v_stride_h
    for v0 in range(0, dv, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V)
        col_in = (cols < dv)[None, :]
        v_cols = v_base + cols[None, :] * v_stride_v
        va = tl.load(v_cols + pos0[:, None] * v_stride_t, mask=in0[:, None] & col_in, other=0.0).to(tl.float32)
        vb = tl.load(v_cols + pos1[:, None] * v_stride_t, mask=in1[:, None] & col_in, other=0.0).to(tl.float32)
        vc = tl.load(v_cols + pos2[:, None] * v_stride_t, mask=in2[:, None] & col_in, other=0.0).to(tl.float32)
        vd = tl.load(v_cols + pos3[:, None] * v_stride_t, mask=in3[:, None] & col_in, other=0.0).to(tl.float32)
        ra = _operand(va * beta0[:, None], inter_ty)
        rb = _operand(vb * beta1[:, None], inter_ty)
        rc = _operand(vc * beta2[:, None], inter_ty)
        rd = _operand(vd * beta3[:, None], inter_ty)
        _store_rows(u_ptr, head_row, dv, t0, cols, _dot(x00, ra, DOT_PRECISION), CHUNK)
        _store_rows(u_ptr, head_row, dv, t1, cols, _dot(x11, rb, DOT_PRECISION) + _dot(x10, ra, DOT_PRECISION), CHUNK)
        _store_rows(u_ptr, head_row, dv, t2, cols, _dot(x22, rc, DOT_PRECISION) + _dot(x21, rb, DOT_PRECISION)
                    + _dot(x20, ra, DOT_PRECISION), CHUNK)
        _store_rows(u_ptr, head_row, dv, t3, cols, _dot(x33, rd, DOT_PRECISION) + _dot(x32, rc, DOT_PRECISION)
                    + _dot(x31, rb, DOT_PRECISION) + _dot(x30, ra, DOT_PRECISION), CHUNK)


@triton.jit
def _state_kernel(
    k_ptr, k_stride_b, k_stride_t, k_stride_h, k_stride_k,
    w_ptr, u_ptr, cum_ptr,
    init_ptr, init_stride_b, init_stride_h, init_stride_k, init_stride_v,
    enter_ptr,  # (B, HV, c, K, V) in the intermediates' dtype, contiguous: the state entering each chunk
    pseudo_ptr,  # (B, HV, c·L, V) in the intermediates' dtype, contiguous: u = U − W S_c
    final_ptr,  # (B, HV, K, V) float32, contiguous
    seqlen, nv_heads, value_heads_per_key, dk, dv, nchunks, padded_len,
    HAS_INIT: tl.constexpr, DOT_PRECISION: tl.constexpr, CHUNK: tl.constexpr,
    BLOCK_K: tl.constexpr, BLOCK_V: tl.constexpr,  # BLOCK_K: all K rows of the state, a power of two
):
    pid_bh = tl.program_id(1)
    b = (pid_bh // nv_heads).to(tl.int64)
    h = pid_bh % nv_heads
    h_key = h // value_heads_per_key
    inter_ty = w_ptr.dtype.element_ty
    rows_k = tl.arange(0, BLOCK_K)
    cols_v = tl.program_id(0) * BLOCK_V + tl.arange(0, BLOCK_V)
    k_in = rows_k < dk
    v_in = cols_v < dv
    kv_in = k_in[:, None] & v_in[None, :]
    if HAS_INIT:
        state = tl.load(init_ptr + b * init_stride_b + h * init_stride_h + rows_k[:, None] * init_stride_k
                        + cols_v[None, :] * init_stride_v, mask=kv_in, other=0.0).to(tl.float32)
    else:
        state = tl.zeros((BLOCK_K, BLOCK_V), dtype=tl.float32)
    t = tl.arange(0, CHUNK)
    head_rows = pid_bh.to(tl.int64) * padded_len
    state_offs = rows_k[:, None] * dv + cols_v[None, :]
    k_base = k_ptr + b * k_stride_b + h_key * k_stride_h + rows_k[None, :] * k_stride_k
    for chunk in range(nchunks):
        tl.store(enter_ptr + (pid_bh.to(tl.int64) * nchunks + chunk) * dk * dv + state_offs,
                 rounded(state, inter_ty), mask=kv_in)
        row = head_rows + chunk * CHUNK + t
        W = tl.load(w_ptr + row[:, None] * dk + rows_k[None, :], mask=k_in[None, :], other=0.0)  # (L, K)
        U = tl.load(u_ptr + row[:, None] * dv + cols_v[None, :], mask=v_in[None, :], other=0.0)  # (L, BV)
        pseudo = U.to(tl.float32) - tl.dot(_operand(W, inter_ty), _operand(state, inter_ty),
                                           input_precision=DOT_PRECISION)
        tl.store(pseudo_ptr + row[:, None] * dv + cols_v[None, :], rounded(pseudo, inter_ty), mask=v_in[None, :])
        cum = tl.load(cum_ptr + row)
        cum_last = tl.load(cum_ptr + head_rows + chunk * CHUNK + CHUNK - 1)
        pos = chunk * CHUNK + t
        k = tl.load(k_base + pos[:, None] * k_stride_t, mask=(pos < seqlen)[:, None] & k_in[None, :], other=0.0)
        # The decays scale the (L, BV) rows of u, not the (L, K) keys: no float32 copy of k.
        decayed = pseudo * tl.exp(cum_last - cum)[:, None]
        state = state * tl.exp(cum_last) + tl.dot(tl.trans(_operand(k, inter_ty)), _operand(decayed, inter_ty),
                                                  input_precision=DOT_PRECISION)
    tl.store(final_ptr + pid_bh.to(tl.int64) * dk * dv + state_offs, state, mask=kv_in)


@triton.jit
def _output_kernel(
    q_ptr, q_stride_b, q_stride_t, q_stride_h, q_stride_k,
    k_ptr, k_stride_b, k_stride_t, k_stride_h, k_stride_k,
    pseudo_ptr, cum_ptr, enter_ptr,
    o_ptr, o_stride_b, o_stride_t, o_stride_h, o_stride_v,
    scale, seqlen, nv_heads, value_heads_per_key, dk, dv, nchunks, padded_len,
    DOT_PRECISION: tl.constexpr, CHUNK: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_V: tl.constexpr,
):
    cols_v = tl.program_id(0) * BLOCK_V + tl.arange(0, BLOCK_V)
    chunk = tl.program_id(1)
    pid_bh = tl.program_id(2)
    b = (pid_bh // nv_heads).to(tl.int64)
    h = pid_bh % nv_heads
    h_key = h // value_heads_per_key
    dot_ty = q_ptr.dtype.element_ty
    inter_ty = enter_ptr.dtype.element_ty
    t = tl.arange(0, CHUNK)
    pos = chunk * CHUNK + t
    t_in = pos < seqlen
    v_in = cols_v < dv
    row = pid_bh.to(tl.int64) * padded_len + pos
    cum = tl.load(cum_ptr + row)

    # q S_c and q kᵀ, a block of K at a time.
    q_base = q_ptr + b * q_stride_b + h_key * q_stride_h + pos[:, None] * q_stride_t
    k_base = k_ptr + b * k_stride_b + h_key * k_stride_h + pos[:, None] * k_stride_t
    enter_base = enter_ptr + (pid_bh.to(tl.int64) * nchunks + chunk) * dk * dv
    from_state = tl.zeros((CHUNK, BLOCK_V), dtype=tl.float32)
    qk = tl.zeros((CHUNK, CHUNK), dtype=tl.float32)
    for k0 in range(0, dk, BLOCK_K):
        cols_k = k0 + tl.arange(0, BLOCK_K)
        tk_in = t_in[:, None] & (cols_k < dk)[None, :]
        q_blk = _operand(tl.load(q_base + cols_k[None, :] * q_stride_k, mask=tk_in, other=0.0), dot_ty)
        k_blk = _operand(tl.load(k_base + cols_k[None, :] * k_stride_k, mask=tk_in, other=0.0), dot_ty)
        enter = tl.load(enter_base + cols_k[:, None] * dv + cols_v[None, :],
                        mask=(cols_k < dk)[:, None] & v_in[None, :], other=0.0)  # (BK, BV)
        from_state = tl.dot(_operand(q_blk, inter_ty), _operand(enter, inter_ty), from_state,
                            input_precision=DOT_PRECISION)
        qk = tl.dot(q_blk, tl.trans(k_blk), qk, input_precision=DOT_PRECISION)

    causal = t[:, None] >= t[None, :]
    P = qk * tl.exp(tl.where(causal, cum[:, None] - cum[None, :], float("-inf")))
    pseudo = tl.load(pseudo_ptr + row[:, None] * dv + cols_v[None, :], mask=v_in[None, :], other=0.0)  # (L, BV)
    o = from_state * tl.exp(cum)[:, None]
    o = tl.dot(_operand(P, inter_ty), _operand(pseudo, inter_ty), o, input_precision=DOT_PRECISION) * scale
    tl.store(o_ptr + b * o_stride_b + pos[:, None] * o_stride_t + h * o_stride_h + cols_v[None, :] * o_stride_v,
             rounded(o, o_ptr.dtype.element_ty), mask=t_in[:, None] & v_in[None, :])


@triton.jit
def _intra_chunk_dpseudo_kernel(
    q_ptr, q_stride_b, q_stride_t, q_stride_h, q_stride_k,
    k_ptr, k_stride_b, k_stride_t, k_stride_h, k_stride_k,
    do_ptr, do_stride_b, do_stride_t, do_stride_h, do_stride_v,
    cum_ptr,
    dlocal_ptr,  # (B, HV, c·L, V) in the intermediates' dtype, contiguous: u's gradient from its own chunk's outputs
    scale, seqlen, nv_heads, value_heads_per_key, dk, dv, padded_len,
    DOT_PRECISION: tl.constexpr, CHUNK: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_V: tl.constexpr,
):
    """The part of du that needs no state, per (block of V columns, chunk, batch × value head), all chunks at once:

        du_local = scale · ((q kᵀ) ⊙ exp(c_t − c_s) [s ≤ t])ᵀ dO

    so that the sequential state loop backwards does not take a (L, K) × (K, L) product per chunk and per block of V.
    (q kᵀ)ᵀ is taken as k qᵀ: no transposed accumulator."""
    cols_v = tl.program_id(0) * BLOCK_V + tl.arange(0, BLOCK_V)
    chunk = tl.program_id(1)
    pid_bh = tl.program_id(2)
    b = (pid_bh // nv_heads).to(tl.int64)
    h = pid_bh % nv_heads
    h_key = h // value_heads_per_key
    dot_ty = q_ptr.dtype.element_ty
    inter_ty = dlocal_ptr.dtype.element_ty
    t = tl.arange(0, CHUNK)
    pos = chunk * CHUNK + t
    t_in = pos < seqlen
    v_in = cols_v < dv
    row = pid_bh.to(tl.int64) * padded_len + pos
    cum = tl.load(cum_ptr + row)
    q_base = q_ptr + b * q_stride_b + h_key * q_stride_h + pos[:, None] * q_stride_t
    k_base = k_ptr + b * k_stride_b + h_key * k_stride_h + pos[:, None] * k_stride_t
    kq = tl.zeros((CHUNK, CHUNK), dtype=tl.float32)
    for k0 in range(0, dk, BLOCK_K):
        cols_k = k0 + tl.arange(0, BLOCK_K)
        tk_in = t_in[:, None] & (cols_k < dk)[None, :]
        q_blk = _operand(tl.load(q_base + cols_k[None, :] * q_stride_k, mask=tk_in, other=0.0), dot_ty)
        k_blk = _operand(tl.load(k_base + cols_k[None, :] * k_stride_k, mask=tk_in, other=0.0), dot_ty)
        kq = tl.dot(k_blk, tl.trans(q_blk), kq, input_precision=DOT_PRECISION)
    # Row s, column t: the weight of u_s in o_t.
    P_T = kq * tl.exp(tl.where(t[:, None] <= t[None, :], cum[None, :] - cum[:, None], float("-inf"))) * scale
    do = tl.load(do_ptr + b * do_stride_b + h * do_stride_h + pos[:, None] * do_stride_t + cols_v[None, :] * do_stride_v,
                 mask=t_in[:, None] & v_in[None, :], other=0.0)
    dlocal = tl.dot(_operand(P_T, inter_ty), _operand(do, inter_ty), input_precision=DOT_PRECISION)
    tl.store(dlocal_ptr + row[:, None] * dv + cols_v[None, :], rounded(dlocal, inter_ty), mask=v_in[None, :])


@triton.jit
def _state_backward_kernel(
    q_ptr, q_stride_b, q_stride_t, q_stride_h, q_stride_k,
    k_ptr, k_stride_b, k_stride_t, k_stride_h, k_stride_k,
    do_ptr, do_stride_b, do_stride_t, do_stride_h, do_stride_v,
    w_ptr, cum_ptr,
    dlocal_ptr,  # (B, HV, c·L, V) in the intermediates' dtype, contiguous: _intra_chunk_dpseudo_kernel's du_local
    dfinal_ptr, dfinal_stride_b, dfinal_stride_h, dfinal_stride_k, dfinal_stride_v,
    dleave_ptr,  # (B, HV, c, K, V) in the intermediates' dtype, contiguous: the gradient of the state leaving each chunk
    dpseudo_ptr,  # (B, HV, c·L, V) in the intermediates' dtype, contiguous: du, the gradient of u
    dinit_ptr,  # (B, HV, K, V) float32, contiguous: the initial state's gradient
    scale, seqlen, nv_heads, value_heads_per_key, dk, dv, nchunks, padded_len,
    HAS_DFINAL: tl.constexpr, DOT_PRECISION: tl.constexpr, CHUNK: tl.constexpr,
    BLOCK_K: tl.constexpr, BLOCK_V: tl.constexpr,  # BLOCK_K: all K rows of the state, a power of two
):
    """The state passing backwards, per (block of V columns, batch × value head): from the last chunk to the first,
    with dS the gradient of the state leaving the chunk,

        du   = du_local + (exp(c_{L-1} − c) ⊙ k) dS
        dS_c = exp(c_{L-1}) dS + scale · (exp(c) ⊙ q)ᵀ dO − Wᵀ du

    storing each dS and du; the last dS_c is the initial state's gradient."""
    pid_bh = tl.program_id(1)
    b = (pid_bh // nv_heads).to(tl.int64)
    h = pid_bh % nv_heads
    h_key = h // value_heads_per_key
    dot_ty = q_ptr.dtype.element_ty
    inter_ty = w_ptr.dtype.element_ty
    rows_k = tl.arange(0, BLOCK_K)
    cols_v = tl.program_id(0) * BLOCK_V + tl.arange(0, BLOCK_V)
    k_in = rows_k < dk
    v_in = cols_v < dv
    kv_in = k_in[:, None] & v_in[None, :]
    if HAS_DFINAL:
        dstate = tl.load(dfinal_ptr + b * dfinal_stride_b + h * dfinal_stride_h + rows_k[:, None] * dfinal_stride_k
                         + cols_v[None, :] * dfinal_stride_v, mask=kv_in, other=0.0).to(tl.float32)
    else:
        dstate = tl.zeros((BLOCK_K, BLOCK_V), dtype=tl.float32)
    t = tl.arange(0, CHUNK)
    head_rows = pid_bh.to(tl.int64) * padded_len
    state_offs = rows_k[:, None] * dv + cols_v[None, :]
    q_base = q_ptr + b * q_stride_b + h_key * q_stride_h + rows_k[None, :] * q_stride_k
    k_base = k_ptr + b * k_stride_b + h_key * k_stride_h + rows_k[None, :] * k_stride_k
    do_base = do_ptr + b * do_stride_b + h * do_stride_h + cols_v[None, :] * do_stride_v
    for step in range(nchunks):
        chunk = nchunks - 1 - step
        tl.store(dleave_ptr + (pid_bh.to(tl.int64) * nchunks + chunk) * dk * dv + state_offs,
                 rounded(dstate, inter_ty), mask=kv_in)
        pos = chunk * CHUNK + t
        t_in = pos < seqlen
        row = head_rows + pos
        cum = tl.load(cum_ptr + row)
        cum_last = tl.load(cum_ptr + head_rows + chunk * CHUNK + CHUNK - 1)
        tk_in = t_in[:, None] & k_in[None, :]
        # The decays scale the (L, BV) rows of the products, not the (L, K) operands: no float32 copy of q or k.
        q = _operand(tl.load(q_base + pos[:, None] * q_stride_t, mask=tk_in, other=0.0), dot_ty)  # (L, K)
        k = _operand(tl.load(k_base + pos[:, None] * k_stride_t, mask=tk_in, other=0.0), dot_ty)  # (L, K)
        do = tl.load(do_base + pos[:, None] * do_stride_t, mask=t_in[:, None] & v_in[None, :], other=0.0)  # (L, BV)
        dlocal = tl.load(dlocal_ptr + row[:, None] * dv + cols_v[None, :], mask=v_in[None, :], other=0.0)
        dpseudo = tl.dot(_operand(k, inter_ty), _operand(dstate, inter_ty), input_precision=DOT_PRECISION)
        dpseudo = rounded(dpseudo * tl.exp(cum_last - cum)[:, None] + dlocal.to(tl.float32), inter_ty)
        tl.store(dpseudo_ptr + row[:, None] * dv + cols_v[None, :], dpseudo, mask=v_in[None, :])
        W = tl.load(w_ptr + row[:, None] * dk + rows_k[None, :], mask=k_in[None, :], other=0.0)  # (L, K)
        do_decayed = do.to(tl.float32) * (scale * tl.exp(cum))[:, None]
        dstate = dstate * tl.exp(cum_last) + tl.dot(tl.trans(_operand(q, inter_ty)), _operand(do_decayed, inter_ty),
                                                    input_precision=DOT_PRECISION)
        dstate -= tl.dot(tl.trans(_operand(W, inter_ty)), _operand(dpseudo, inter_ty), input_precision=DOT_PRECISION)
    tl.store(dinit_ptr + pid_bh.to(tl.int64) * dk * dv + state_offs, dstate, mask=kv_in)


@triton.jit
def _pairs_backward(
    v_rows, v_stride_v,  # (L, 1) pointers: the chunk's rows of v at this (batch, value head)
    do_rows, do_stride_v,  # likewise of dO
    dv_rows,  # likewise of dv (row stride nv_heads·V, contiguous columns)
    pseudo_ptr, dpseudo_ptr, du_hat_ptr, row, inverse, t, t_in, cum, beta, scale, dv,
    DOT_PRECISION: tl.constexpr, CHUNK: tl.constexpr, BLOCK_V: tl.constexpr,
):
    """The chunk's gradients that sum over V, a block of V at a time: û = T⁻¹ᵀ du (stored for the keys' loop), dv,
    dβ's value term Σ_v û ⊙ v, and the (L, L) gradients of q kᵀ (dO uᵀ ⊙ D, its diagonal apart) and of β ⊙ k kᵀ
    (dA ⊙ D). Returns (dPD, dPD_diagonal, dAD, dbeta_values)."""
    inter_ty = pseudo_ptr.dtype.element_ty
    do_u = tl.zeros((CHUNK, CHUNK), dtype=tl.float32)
    neg_dA = tl.zeros((CHUNK, CHUNK), dtype=tl.float32)
    dbeta = tl.zeros((CHUNK,), dtype=tl.float32)
    for v0 in range(0, dv, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V)
        v_in = cols < dv
        tv_in = t_in[:, None] & v_in[None, :]
        rows_v = row[:, None] * dv + cols[None, :]
        do = _operand(tl.load(do_rows + cols[None, :] * do_stride_v, mask=tv_in, other=0.0), inter_ty)
        u = _operand(tl.load(pseudo_ptr + rows_v, mask=v_in[None, :], other=0.0), inter_ty)
        du = _operand(tl.load(dpseudo_ptr + rows_v, mask=v_in[None, :], other=0.0), inter_ty)
        du_hat = tl.dot(tl.trans(inverse), du, input_precision=DOT_PRECISION)  # (L, BV)
        tl.store(du_hat_ptr + rows_v, rounded(du_hat, inter_ty), mask=v_in[None, :])
        do_u = tl.dot(do, tl.trans(u), do_u, input_precision=DOT_PRECISION)
        neg_dA = tl.dot(_operand(du_hat, inter_ty), tl.trans(u), neg_dA, input_precision=DOT_PRECISION)
        v_blk = tl.load(v_rows + cols[None, :] * v_stride_v, mask=tv_in, other=0.0).to(tl.float32)
        dbeta += tl.sum(du_hat * v_blk, axis=1)
        tl.store(dv_rows + cols[None, :], rounded(du_hat * beta[:, None], dv_rows.dtype.element_ty), mask=tv_in)
    # The gradient of q kᵀ. Its diagonal is kept apart: its shares of dc (via q ⊙ dq and k ⊙ dk) cancel exactly, and
    # under strong decay they dwarf what remains.
    decay = tl.exp(tl.where(t[:, None] >= t[None, :], cum[:, None] - cum[None, :], float("-inf")))
    diagonal = t[:, None] == t[None, :]
    dPD = tl.where(diagonal, 0.0, do_u * decay * scale)
    dPD_diagonal = tl.sum(tl.where(diagonal, do_u, 0.0), axis=1) * scale
    dAD = -tl.where(t[:, None] > t[None, :], neg_dA * decay, 0.0)  # dA ⊙ D, the gradient of β ⊙ (k kᵀ)
    return dPD, dPD_diagonal, dAD, dbeta


@triton.jit
def _keys_backward(
    q_rows, q_stride_k,  # (L, 1) pointers: the chunk's rows of q at this (batch, key head)
    k_rows, k_stride_k,  # likewise of k
    do_rows, do_stride_v,  # the chunk's rows of dO at this (batch, value head)
    dq_rows, dk_rows,  # likewise of dq and dk (B, T, H, K) at this (batch, key head) (contiguous columns)
    accumulate,  # GROUPED: whether dq and dk hold an earlier value head's share already (added to, not overwritten)
    pseudo_ptr, du_hat_ptr, row,
    enter_ptr, dleave_ptr,  # at this chunk's (K, V) states
    t, t_in, cum, cum_last, beta, dPD_op, dPD_diagonal, dAD_op, scale, dk, dv,
    DOT_PRECISION: tl.constexpr, CHUNK: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_V: tl.constexpr,
    GROUPED: tl.constexpr,
):
    """dq and dk of the chunk, a block of K at a time (an inner loop over V for the three products with the states:
    dO S_cᵀ, û S_cᵀ, u dSᵀ), given _pairs_backward's (L, L) tiles as operands, added to the key head's dq and dk
    where `accumulate`. Returns (dbeta_keys, dc): dβ's key terms and the gradient of the prefix sums c."""
    inter_ty = pseudo_ptr.dtype.element_ty
    dbeta = tl.zeros((CHUNK,), dtype=tl.float32)
    dc = tl.zeros((CHUNK,), dtype=tl.float32)
    state_dot = 0.0  # Σ S_c ⊙ dS: exp(c_{L-1}) S_c in the state passing
    decayed_dot = 0.0  # Σ (exp(c_{L-1} − c) ⊙ k) ⊙ (u dSᵀ): the decayed keys of the state passing
    decay_to_end = tl.exp(cum_last - cum)
    weight = beta * tl.exp(cum)
    for k0 in range(0, dk, BLOCK_K):
        cols_k = k0 + tl.arange(0, BLOCK_K)
        k_in = cols_k < dk
        do_S = tl.zeros((CHUNK, BLOCK_K), dtype=tl.float32)
        du_hat_S = tl.zeros((CHUNK, BLOCK_K), dtype=tl.float32)
        u_dS = tl.zeros((CHUNK, BLOCK_K), dtype=tl.float32)
        for v0 in range(0, dv, BLOCK_V):
            cols = v0 + tl.arange(0, BLOCK_V)
            v_in = cols < dv
            kv_offs = cols_k[:, None] * dv + cols[None, :]
            kv_in = k_in[:, None] & v_in[None, :]
            enter = tl.load(enter_ptr + kv_offs, mask=kv_in, other=0.0)  # (BK, BV)
            dleave = tl.load(dleave_ptr + kv_offs, mask=kv_in, other=0.0)
            state_dot += tl.sum(enter.to(tl.float32) * dleave.to(tl.float32))
            rows_v = row[:, None] * dv + cols[None, :]
            do = _operand(tl.load(do_rows + cols[None, :] * do_stride_v, mask=t_in[:, None] & v_in[None, :],
                                  other=0.0), inter_ty)
            u = _operand(tl.load(pseudo_ptr + rows_v, mask=v_in[None, :], other=0.0), inter_ty)
            du_hat = _operand(tl.load(du_hat_ptr + rows_v, mask=v_in[None, :], other=0.0), inter_ty)
            enter_T = tl.trans(_operand(enter, inter_ty))
            do_S = tl.dot(do, enter_T, do_S, input_precision=DOT_PRECISION)
            du_hat_S = tl.dot(du_hat, enter_T, du_hat_S, input_precision=DOT_PRECISION)
            u_dS = tl.dot(u, tl.trans(_operand(dleave, inter_ty)), u_dS, input_precision=DOT_PRECISION)
        # Each (L, BLOCK_K) term is summed into dq or dk, and its row sums into dβ and dc, as soon as it is made:
        # few float32 tiles live at once (made all first, they spilled at 32-column blocks).
        tk_in = t_in[:, None] & k_in[None, :]
        q_blk = tl.load(q_rows + cols_k[None, :] * q_stride_k, mask=tk_in, other=0.0).to(tl.float32)
        k_blk = tl.load(k_rows + cols_k[None, :] * k_stride_k, mask=tk_in, other=0.0).to(tl.float32)
        k_op = _operand(k_blk, inter_ty)
        dq_blk = tl.dot(dPD_op, k_op, do_S * (scale * tl.exp(cum))[:, None], input_precision=DOT_PRECISION)
        dc += tl.sum(q_blk * dq_blk, axis=1)
        dq_blk += dPD_diagonal[:, None] * k_blk
        if GROUPED:
            dq_blk += tl.load(dq_rows + cols_k[None, :], mask=tk_in & accumulate, other=0.0).to(tl.float32)
        tl.store(dq_rows + cols_k[None, :], rounded(dq_blk, dq_rows.dtype.element_ty), mask=tk_in)
        decayed = tl.sum(k_blk * u_dS, axis=1) * decay_to_end
        k_dk_weighted = -tl.sum(k_blk * du_hat_S, axis=1)  # û S_cᵀ is minus the gradient of β exp(c) ⊙ k
        dk_blk = u_dS * decay_to_end[:, None] - du_hat_S * weight[:, None] + dPD_diagonal[:, None] * q_blk
        # The earlier value heads' share is added here, where fewer tiles are live than at the store (sm_90, triton 3.6:
        # 48 bytes of stack against 80).
        if GROUPED:
            dk_blk += tl.load(dk_rows + cols_k[None, :], mask=tk_in & accumulate, other=0.0).to(tl.float32)
        dAD_k = tl.dot(dAD_op, k_op, input_precision=DOT_PRECISION)
        k_dAD_k = tl.sum(k_blk * dAD_k, axis=1)
        dk_blk += dAD_k * beta[:, None]
        # (dO uᵀ ⊙ D)ᵀ q and (β ⊙ dA ⊙ D)ᵀ k = (dA ⊙ D)ᵀ (β ⊙ k), one accumulator: no third (L, L) tile.
        dk_transposed = tl.dot(tl.trans(dPD_op), _operand(q_blk, inter_ty), input_precision=DOT_PRECISION)
        dk_transposed = tl.dot(tl.trans(dAD_op), _operand(k_blk * beta[:, None], inter_ty), dk_transposed,
                               input_precision=DOT_PRECISION)
        dk_blk += dk_transposed
        tl.store(dk_rows + cols_k[None, :], rounded(dk_blk, dk_rows.dtype.element_ty), mask=tk_in)
        dbeta += tl.exp(cum) * k_dk_weighted + k_dAD_k
        dc += weight * k_dk_weighted - decayed + beta * k_dAD_k - tl.sum(k_blk * dk_transposed, axis=1)
        decayed_dot += tl.sum(decayed)
    dc += tl.where(t == CHUNK - 1, tl.exp(cum_last) * state_dot + decayed_dot, 0.0)
    return dbeta, dc


@triton.jit
def _chunk_backward_kernel(
    q_ptr, q_stride_b, q_stride_t, q_stride_h, q_stride_k,
    k_ptr, k_stride_b, k_stride_t, k_stride_h, k_stride_k,
    v_ptr, v_stride_b, v_stride_t, v_stride_h, v_stride_v,
    beta_ptr, beta_stride_b, beta_stride_t, beta_stride_h,
    do_ptr, do_stride_b, do_stride_t, do_stride_h, do_stride_v,
    cum_ptr, inverse_ptr, enter_ptr, pseudo_ptr, dleave_ptr, dpseudo_ptr,
    du_hat_ptr,  # (B, HV, c·L, V) in the intermediates' dtype, contiguous: scratch for û
    dq_ptr, dk_ptr,  # GROUPED: (B, T, H, K) in q's dtype, each key head's sum over its value heads; else (B, T, HV, K)
                     # in the intermediates' dtype, per value head (summed by _group_sum_kernel); contiguous
    dv_ptr,  # (B, T, HV, V) in v's dtype, contiguous
    dbeta_ptr, dg_ptr,  # (B, T, HV) float32, contiguous
    scale, seqlen, nv_heads, value_heads_per_key, dk, dv, nchunks, padded_len,
    DOT_PRECISION: tl.constexpr, CHUNK: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_V: tl.constexpr,
    GROUPED: tl.constexpr,
):
    """Every gradient of one chunk of one (batch, value head), given S_c, u, dS (of the state leaving it) and du.
    With D[t, s] = exp(c_t − c_s) and û = T⁻¹ᵀ du (the reference derives the rest):

        dv = β ⊙ û                 dA = −(û uᵀ) [s < t]            (the adjoint of T⁻¹ through W and U)
        dq = scale · (exp(c) ⊙ dO S_cᵀ + (dO uᵀ ⊙ D [s ≤ t]) k)
        dk = scale · (dO uᵀ ⊙ D [s ≤ t])ᵀ q + exp(c_{L-1} − c) ⊙ (u dSᵀ) − β exp(c) ⊙ û S_cᵀ
             + (β ⊙ dA ⊙ D) k + (β ⊙ dA ⊙ D)ᵀ k
        dβ = Σ_v û ⊙ v − exp(c) Σ_k k ⊙ û S_cᵀ + Σ_k k ⊙ (dA ⊙ D) k

    and dc, the gradient of the prefix sums, from every exp(c) above; dg is its reverse prefix sum. `_pairs_backward`
    takes what sums over V (a loop over V), `_keys_backward` dq and dk (a loop over K), the (L, L) tiles between them
    held as operands. T⁻¹ is needed in the first only: û S_cᵀ, not T⁻¹ᵀ (du S_cᵀ), so û goes through a scratch
    buffer (L2-resident: the program reads back what it wrote).

    GROUPED (the tuner's choice): a program takes one key head's chunk and its value heads one after the other,
    adding each one's dq and dk to the last's (read back from dq and dk: the barrier before the keys' loop orders
    them), so that no per-value-head copy of dq and dk goes through memory to be summed by another launch. Else a
    program takes one value head's chunk, and `_group_sum_kernel` sums dq and dk over each key head's value heads."""
    chunk = tl.program_id(0)
    inter_ty = enter_ptr.dtype.element_ty
    t = tl.arange(0, CHUNK)
    if GROUPED:
        heads_per_program = value_heads_per_key
        grad_heads = nv_heads // value_heads_per_key  # dq and dk's heads: the key heads
    else:
        heads_per_program = 1
        grad_heads = nv_heads
    for r in range(heads_per_program):
        # (batch × key head) · R + r is batch × value head; everything below is derived from it inside the loop, so
        # that nothing is hoisted out of it to stay live across both value heads (triton 3.6 for sm_90: 48 bytes of
        # stack at the first config, and 144 at 8 warps, when the batch, key head and positions came from outside).
        pid_bh = tl.program_id(1).to(tl.int64) * heads_per_program + r
        b = pid_bh // nv_heads
        h = pid_bh % nv_heads
        h_key = h // value_heads_per_key
        pos = chunk * CHUNK + t
        t_in = pos < seqlen
        row = pid_bh * padded_len + pos
        cum = tl.load(cum_ptr + row)
        cum_last = tl.load(cum_ptr + pid_bh * padded_len + chunk * CHUNK + CHUNK - 1)
        beta = tl.load(beta_ptr + b * beta_stride_b + pos * beta_stride_t + h * beta_stride_h, mask=t_in,
                       other=0.0).to(tl.float32)
        inverse = _operand(tl.load(inverse_ptr + row[:, None] * CHUNK + t[None, :]), inter_ty)  # (L, L)
        do_rows = do_ptr + b * do_stride_b + h * do_stride_h + pos[:, None] * do_stride_t
        out_rows = (b * seqlen + pos) * nv_heads + h  # the chunk's rows of the (B, T, HV) gradients
        dPD, dPD_diagonal, dAD, dbeta_values = _pairs_backward(
            v_ptr + b * v_stride_b + h * v_stride_h + pos[:, None] * v_stride_t, v_stride_v, do_rows, do_stride_v,
            dv_ptr + out_rows[:, None] * dv, pseudo_ptr, dpseudo_ptr, du_hat_ptr, row, inverse, t, t_in, cum, beta,
            scale, dv, DOT_PRECISION, CHUNK, BLOCK_V,
        )
        dPD_op = _operand(dPD, inter_ty)
        dAD_op = _operand(dAD, inter_ty)
        # û (and the last value head's dq and dk) are read back below by other threads of the program than wrote them.
        tl.debug_barrier()
        states = (pid_bh * nchunks + chunk) * dk * dv
        if GROUPED:
            grad_head = h_key
        else:
            grad_head = h
        grad_rows = ((b * seqlen + pos) * grad_heads + grad_head)[:, None] * dk  # the chunk's rows of dq and dk
        dbeta_keys, dc = _keys_backward(
            q_ptr + b * q_stride_b + h_key * q_stride_h + pos[:, None] * q_stride_t, q_stride_k,
            k_ptr + b * k_stride_b + h_key * k_stride_h + pos[:, None] * k_stride_t, k_stride_k,
            do_rows, do_stride_v, dq_ptr + grad_rows, dk_ptr + grad_rows, r > 0,
            pseudo_ptr, du_hat_ptr, row, enter_ptr + states, dleave_ptr + states,
            t, t_in, cum, cum_last, beta, dPD_op, dPD_diagonal, dAD_op, scale, dk, dv,
            DOT_PRECISION, CHUNK, BLOCK_K, BLOCK_V, GROUPED,
        )
        dg = tl.cumsum(dc, axis=0, reverse=True)  # g_i enters every c_t with t ≥ i
        tl.store(dg_ptr + out_rows, dg, mask=t_in)
        tl.store(dbeta_ptr + out_rows, dbeta_values + dbeta_keys, mask=t_in)


@triton.jit
def _group_sum_kernel(
    dq_heads_ptr, dk_heads_ptr,  # (B·T·H, R, K) in the intermediates' dtype, contiguous: per value head
    dq_ptr, dk_ptr,  # (B·T·H, K) in q's dtype, contiguous
    rows, value_heads_per_key, dk,
    BLOCK_ROWS: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """dq and dk of each key head: the sums, in float32, of its value heads' (rounded once into q's dtype)."""
    rows_r = tl.program_id(0) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    cols = tl.arange(0, BLOCK_K)
    mask = (rows_r < rows)[:, None] & (cols < dk)[None, :]
    heads = rows_r.to(tl.int64)[:, None] * value_heads_per_key * dk + cols[None, :]
    dq = tl.zeros((BLOCK_ROWS, BLOCK_K), dtype=tl.float32)
    dk_sum = tl.zeros((BLOCK_ROWS, BLOCK_K), dtype=tl.float32)
    for r in range(value_heads_per_key):
        dq += tl.load(dq_heads_ptr + heads + r * dk, mask=mask, other=0.0).to(tl.float32)
        dk_sum += tl.load(dk_heads_ptr + heads + r * dk, mask=mask, other=0.0).to(tl.float32)
    out = rows_r.to(tl.int64)[:, None] * dk + cols[None, :]
    tl.store(dq_ptr + out, rounded(dq, dq_ptr.dtype.element_ty), mask=mask)
    tl.store(dk_ptr + out, rounded(dk_sum, dk_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _step_kernel(
    state_ptr, state_stride_b, state_stride_h, state_stride_k, state_stride_v,
    q_ptr, q_stride_b, q_stride_h, q_stride_k,
    k_ptr, k_stride_b, k_stride_h, k_stride_k,
    v_ptr, v_stride_b, v_stride_h, v_stride_v,
    g_ptr, g_stride_b, g_stride_h,
    beta_ptr, beta_stride_b, beta_stride_h,
    o_ptr, o_stride_b, o_stride_h, o_stride_v,
    new_state_ptr,  # (B, HV, K, V) float32, contiguous
    scale, nv_heads, value_heads_per_key, dk, dv,
    BLOCK_K: tl.constexpr, BLOCK_V: tl.constexpr,  # BLOCK_K: all K rows of the state, a power of two
):
    """One position of the recurrence for one (batch, value head, block of V columns): the state read once, written
    once."""
    pid_bh = tl.program_id(0)
    b = (pid_bh // nv_heads).to(tl.int64)
    h = pid_bh % nv_heads
    h_key = h // value_heads_per_key
    rows_k = tl.arange(0, BLOCK_K)
    cols_v = tl.program_id(1) * BLOCK_V + tl.arange(0, BLOCK_V)
    k_in = rows_k < dk
    v_in = cols_v < dv
    kv_in = k_in[:, None] & v_in[None, :]
    state = tl.load(state_ptr + b * state_stride_b + h * state_stride_h + rows_k[:, None] * state_stride_k
                    + cols_v[None, :] * state_stride_v, mask=kv_in, other=0.0).to(tl.float32)
    q = tl.load(q_ptr + b * q_stride_b + h_key * q_stride_h + rows_k * q_stride_k, mask=k_in, other=0.0).to(tl.float32)
    k = tl.load(k_ptr + b * k_stride_b + h_key * k_stride_h + rows_k * k_stride_k, mask=k_in, other=0.0).to(tl.float32)
    v = tl.load(v_ptr + b * v_stride_b + h * v_stride_h + cols_v * v_stride_v, mask=v_in, other=0.0).to(tl.float32)
    g = tl.load(g_ptr + b * g_stride_b + h * g_stride_h).to(tl.float32)
    beta = tl.load(beta_ptr + b * beta_stride_b + h * beta_stride_h).to(tl.float32)
    state = tl.exp(g) * state
    pseudo = beta * (v - tl.sum(state * k[:, None], axis=0))  # (BV,)
    state += k[:, None] * pseudo[None, :]
    o = scale * tl.sum(state * q[:, None], axis=0)
    tl.store(o_ptr + b * o_stride_b + h * o_stride_h + cols_v * o_stride_v, rounded(o, o_ptr.dtype.element_ty),
             mask=v_in)
    tl.store(new_state_ptr + pid_bh.to(tl.int64) * dk * dv + rows_k[:, None] * dv + cols_v[None, :], state, mask=kv_in)


# ---------------------------------------------------------------------------------------------------------------
# Launcher and tuning
# ---------------------------------------------------------------------------------------------------------------


TUNERS = {
    name: Autotuner(f"gated_delta_rule.{name}", configs, INTERPRETER_CONFIGS[name])
    for name, configs in (("wy", WY_CONFIGS), ("state", STATE_CONFIGS), ("output", OUTPUT_CONFIGS),
                          ("intra_chunk_dpseudo", INTRA_CHUNK_DPSEUDO_CONFIGS),
                          ("state_backward", STATE_BACKWARD_CONFIGS), ("chunk_backward", CHUNK_BACKWARD_CONFIGS))
}
"""The kernels' autotuners (triton_support.Autotuner, named gated_delta_rule.<kernel>: tuning tables pin their winners)."""


def _launch_options(config: dict) -> dict:
    return {k: v for k, v in config.items() if k in ("num_warps", "num_stages")}


def _config(name: str, key: str, launch, explicit: dict | None) -> dict:
    """The config to launch: explicit, the interpreter's or a pinned / earlier choice; else tune now."""
    tuner = TUNERS[name]
    known = tuner.known(key, explicit)
    return known if known is not None else tuner.tune(key, launch)


def tuned_configs() -> dict:
    """{kernel: {key: config}} chosen so far, JSON-ready (triton_support.tuning_table() has them too)."""
    return {name: {key: dict(c) for key, c in tuner.chosen.items()} for name, tuner in TUNERS.items()}


def _dot_precision(dtype: torch.dtype) -> str:
    """float32 operands (float32 inputs, or the float32 intermediates asked for as the more accurate form) get full
    float32 products (tf32 would cost them ~1e-3 relative error); half operands take the tensor cores' native half ×
    half -> float32 whatever this says (checked for sm_90 under triton 3.6: a bf16 dot at "ieee" is still a wgmma)."""
    return "ieee" if dtype == torch.float32 else "tf32"


@dataclass
class _Chunks:
    """What the WY and state kernels leave behind, for the output kernel and the backward: the sizes, the tuning key,
    and the buffers (the module docstring names them)."""

    nchunks: int
    padded: int
    shared: tuple[int, int, int, int]  # nv_heads, value_heads_per_key, dk, dv: every kernel's arguments
    precision: str
    key: str
    cum: Tensor
    W: Tensor
    inverse: Tensor | None
    pseudo: Tensor
    enter: Tensor
    final_state: Tensor


def _intermediates_dtype(q: Tensor, intermediates: torch.dtype | None) -> torch.dtype:
    intermediates = q.dtype if intermediates is None else intermediates
    if intermediates not in (torch.float32, q.dtype):
        raise ValueError(f"intermediates must be torch.float32 or q's dtype {q.dtype}, got {intermediates}")
    return intermediates


def _chunk_states(q: Tensor, k: Tensor, v: Tensor, g: Tensor, beta: Tensor, initial_state: Tensor | None,
                  chunk: int, intermediates: torch.dtype, configs: dict, store_inverse: bool) -> _Chunks:
    """Launch the WY and state kernels (T > 0, B > 0): each chunk's W, U, prefix sums (and T⁻¹ for the backward),
    then the entering states, the pseudo-values and the final state."""
    batch, seqlen, nheads, dk = q.shape
    nv_heads, dv = v.shape[-2:]
    nchunks = triton.cdiv(seqlen, chunk)
    padded = nchunks * chunk
    f32 = {"dtype": torch.float32, "device": q.device}
    inter = {"dtype": intermediates, "device": q.device}
    chunks = _Chunks(
        nchunks=nchunks, padded=padded, shared=(nv_heads, nv_heads // nheads, dk, dv), precision=_dot_precision(intermediates),
        key="-".join(map(str, (chunk, dk, dv, dtype_name(q.dtype), dtype_name(intermediates)))),
        cum=torch.empty((batch, nv_heads, padded), **f32),
        W=torch.empty((batch, nv_heads, padded, dk), **inter),
        inverse=torch.empty((batch, nv_heads, padded, chunk), **inter) if store_inverse else None,
        pseudo=torch.empty((batch, nv_heads, padded, dv), **inter),
        enter=torch.empty((batch, nv_heads, nchunks, dk, dv), **inter),
        final_state=torch.empty((batch, nv_heads, dk, dv), **f32),
    )
    U = torch.empty((batch, nv_heads, padded, dv), **inter)

    def launch_wy(cfg):
        kernel, inverse_by = ((_chunk_wy_tiled_kernel, {}) if cfg["TILED"] else
                              (_chunk_wy_kernel, {"LOG2_CHUNK": chunk.bit_length() - 1}))
        kernel[(nchunks, batch * nv_heads)](
            *strided(k, 4), *strided(v, 4), *strided(g, 3), *strided(beta, 3), chunks.W, U, chunks.cum,
            chunks.inverse, seqlen, *chunks.shared, padded,
            STORE_INVERSE=store_inverse, DOT_PRECISION=chunks.precision, CHUNK=chunk, **inverse_by,
            BLOCK_K=cfg["BLOCK_K"], BLOCK_V=cfg["BLOCK_V"], **_launch_options(cfg),
        )

    launch_wy(_config("wy", chunks.key, launch_wy, configs.get("wy")))

    def launch_state(cfg):
        _state_kernel[(triton.cdiv(dv, cfg["BLOCK_V"]), batch * nv_heads)](
            *strided(k, 4), chunks.W, U, chunks.cum, *strided(initial_state, 4), chunks.enter, chunks.pseudo,
            chunks.final_state, seqlen, *chunks.shared, nchunks, padded,
            HAS_INIT=initial_state is not None, DOT_PRECISION=chunks.precision, CHUNK=chunk,
            BLOCK_K=max(16, triton.next_power_of_2(dk)), BLOCK_V=cfg["BLOCK_V"], **_launch_options(cfg),
        )

    launch_state(_config("state", chunks.key, launch_state, configs.get("state")))
    return chunks


def gated_delta_rule_forward(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    g: Tensor,
    beta: Tensor,
    scale: float,
    initial_state: Tensor | None = None,
    chunk_size: int = CHUNK_SIZE,
    *,
    configs: dict | None = None,
    intermediates: torch.dtype | None = None,
) -> tuple[Tensor, Tensor]:
    """Run the three kernels: (o (B, T, HV, V) in v's dtype, final_state (B, HV, K, V) float32).

    configs: {kernel name: config} to bypass the autotuner (the keys of TUNERS).
    intermediates: the dtype W, U, u and the chunk states are stored in and multiplied as: q's dtype (None, the op's
    choice, see the module docstring) or float32 (more accurate, 1.7x slower on the H200 in bf16 in session 5)."""
    _check_inputs(q, k, v, g, beta, initial_state, chunk_size)
    batch, seqlen, _, dk = q.shape
    nv_heads, dv = v.shape[-2:]
    o = torch.empty((batch, seqlen, nv_heads, dv), dtype=v.dtype, device=q.device)
    if seqlen == 0 or batch == 0:
        final_state = initial_state if initial_state is not None else q.new_zeros((batch, nv_heads, dk, dv))
        return o, final_state.float().clone()
    configs = configs or {}
    with on_device(q):
        chunks = _chunk_states(q, k, v, g, beta, initial_state, chunk_size, _intermediates_dtype(q, intermediates),
                               configs, store_inverse=False)

        def launch_output(cfg):
            _output_kernel[(triton.cdiv(dv, cfg["BLOCK_V"]), chunks.nchunks, batch * nv_heads)](
                *strided(q, 4), *strided(k, 4), chunks.pseudo, chunks.cum, chunks.enter, *strided(o, 4),
                scale, seqlen, *chunks.shared, chunks.nchunks, chunks.padded,
                DOT_PRECISION=chunks.precision, CHUNK=chunk_size, BLOCK_K=cfg["BLOCK_K"], BLOCK_V=cfg["BLOCK_V"],
                **_launch_options(cfg),
            )

        launch_output(_config("output", chunks.key, launch_output, configs.get("output")))
    return o, chunks.final_state


def gated_delta_rule_backward(
    do: Tensor,
    dfinal_state: Tensor | None,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    g: Tensor,
    beta: Tensor,
    scale: float,
    initial_state: Tensor | None = None,
    chunk_size: int = CHUNK_SIZE,
    *,
    configs: dict | None = None,
    intermediates: torch.dtype | None = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor | None]:
    """The gradients of `gated_delta_rule_forward`'s inputs, given do (B, T, HV, V) and dfinal_state (B, HV, K, V) or
    None: (dq, dk, dv, dg, dbeta, dinitial_state), each in its input's dtype (dinitial_state float32, None without an
    initial state).

    The forward's WY and state kernels run again (storing T⁻¹ too: recomputing beats keeping a (K, V) state per chunk
    from the forward), then `_state_backward_kernel` passes dS back over the chunks and `_chunk_backward_kernel` takes
    each chunk's gradients. configs and intermediates as for the forward; the backward kernels' configs are named
    state_backward and chunk_backward."""
    _check_inputs(q, k, v, g, beta, initial_state, chunk_size)
    batch, seqlen, nheads, dk = q.shape
    nv_heads, dv = v.shape[-2:]
    if tuple(do.shape) != tuple(v.shape) or (dfinal_state is not None and dfinal_state.shape != (batch, nv_heads, dk, dv)):
        raise ValueError(f"do must have v's shape {tuple(v.shape)} and dfinal_state (B, HV, K, V) = "
                         f"{(batch, nv_heads, dk, dv)}, got {tuple(do.shape)} and "
                         f"{None if dfinal_state is None else tuple(dfinal_state.shape)}")
    f32 = {"dtype": torch.float32, "device": q.device}
    inter_dtype = _intermediates_dtype(q, intermediates)
    dq = torch.empty_like(q, memory_format=torch.contiguous_format)  # each key head's sum over its value heads
    dk_ = torch.empty_like(k, memory_format=torch.contiguous_format)
    dv_ = torch.empty((batch, seqlen, nv_heads, dv), dtype=v.dtype, device=q.device)
    dg = torch.empty((batch, seqlen, nv_heads), **f32)
    dbeta = torch.empty((batch, seqlen, nv_heads), **f32)
    dinit = torch.empty((batch, nv_heads, dk, dv), **f32)
    if seqlen == 0 or batch == 0:
        dinit.copy_(dfinal_state if dfinal_state is not None else torch.zeros_like(dinit))
    else:
        configs = configs or {}
        with on_device(q):
            chunks = _chunk_states(q, k, v, g, beta, initial_state, chunk_size, inter_dtype, configs, store_inverse=True)
            dleave = torch.empty_like(chunks.enter)
            dlocal = torch.empty_like(chunks.pseudo)
            dpseudo = torch.empty_like(chunks.pseudo)
            du_hat = torch.empty_like(chunks.pseudo)
            common = (scale, seqlen, *chunks.shared, chunks.nchunks, chunks.padded)

            def launch_intra_chunk_dpseudo(cfg):
                _intra_chunk_dpseudo_kernel[(triton.cdiv(dv, cfg["BLOCK_V"]), chunks.nchunks, batch * nv_heads)](
                    *strided(q, 4), *strided(k, 4), *strided(do, 4), chunks.cum, dlocal,
                    scale, seqlen, *chunks.shared, chunks.padded,
                    DOT_PRECISION=chunks.precision, CHUNK=chunk_size, BLOCK_K=cfg["BLOCK_K"], BLOCK_V=cfg["BLOCK_V"],
                    **_launch_options(cfg),
                )

            launch_intra_chunk_dpseudo(_config("intra_chunk_dpseudo", chunks.key, launch_intra_chunk_dpseudo,
                                               configs.get("intra_chunk_dpseudo")))

            def launch_state_backward(cfg):
                _state_backward_kernel[(triton.cdiv(dv, cfg["BLOCK_V"]), batch * nv_heads)](
                    *strided(q, 4), *strided(k, 4), *strided(do, 4), chunks.W, chunks.cum, dlocal,
                    *strided(dfinal_state, 4), dleave, dpseudo, dinit, *common,
                    HAS_DFINAL=dfinal_state is not None, DOT_PRECISION=chunks.precision, CHUNK=chunk_size,
                    BLOCK_K=max(16, triton.next_power_of_2(dk)), BLOCK_V=cfg["BLOCK_V"], **_launch_options(cfg),
                )

            launch_state_backward(_config("state_backward", chunks.key, launch_state_backward,
                                          configs.get("state_backward")))

            def launch_chunk_backward(cfg):
                # GROUPED: dq and dk summed over a key head's value heads in the kernel; else per value head, then
                # summed by _group_sum_kernel (launched here, so that the tuner times both launches against one).
                grouped = bool(cfg.get("GROUPED", 0))
                per_head = not grouped and (nv_heads != nheads or inter_dtype != q.dtype)
                dq_out, dk_out = ((torch.empty((batch, seqlen, nv_heads, dk), dtype=inter_dtype, device=q.device)
                                   for _ in range(2)) if per_head else (dq, dk_))
                _chunk_backward_kernel[(chunks.nchunks, batch * (nheads if grouped else nv_heads))](
                    *strided(q, 4), *strided(k, 4), *strided(v, 4), *strided(beta, 3), *strided(do, 4),
                    chunks.cum, chunks.inverse, chunks.enter, chunks.pseudo, dleave, dpseudo, du_hat,
                    dq_out, dk_out, dv_, dbeta, dg, *common,
                    DOT_PRECISION=chunks.precision, CHUNK=chunk_size, BLOCK_K=cfg["BLOCK_K"], BLOCK_V=cfg["BLOCK_V"],
                    GROUPED=grouped, **_launch_options(cfg),
                )
                if per_head:
                    _sum_over_groups(dq_out, dk_out, dq, dk_)

            launch_chunk_backward(_config("chunk_backward", chunks.key, launch_chunk_backward,
                                          configs.get("chunk_backward")))
    return dq, dk_, dv_, dg.to(g.dtype), dbeta.to(beta.dtype), dinit if initial_state is not None else None


GROUP_SUM_ROWS = 16
"""Rows (batch, position, key head) per program of `_group_sum_kernel`: (16, K) tiles, whole rows a load, 56 registers
at K = 128 (sm_90, triton 3.6): eight programs per SM to keep loads in flight."""


def _sum_over_groups(dq_heads: Tensor, dk_heads: Tensor, dq: Tensor, dk: Tensor) -> None:
    """dq_heads and dk_heads (B, T, HV, K) per value head, in the intermediates' dtype (as fla keeps them) -> dq and dk
    (B, T, H, K, contiguous), each key head's sum over the value heads that read it, in float32, in one launch
    (torch's strided adds and a copy took 0.53 ms for the two at the bench shape in GPU call 3 of session 8; `.sum`
    over the group of float32 ones 0.39 in call 1; this kernel 0.10 in call 2 of session 9)."""
    batch, seqlen, nv_heads, head_dim = dq_heads.shape
    nheads = dq.shape[2]
    rows = batch * seqlen * nheads
    if rows:
        with on_device(dq):
            _group_sum_kernel[(triton.cdiv(rows, GROUP_SUM_ROWS),)](
                dq_heads, dk_heads, dq, dk, rows, nv_heads // nheads, head_dim,
                BLOCK_ROWS=GROUP_SUM_ROWS, BLOCK_K=max(16, triton.next_power_of_2(head_dim)), num_warps=4,
            )


STEP_CONFIG = {"BLOCK_V": 32, "num_warps": 4}
"""Columns of a head's state per program of the decode step. The step reads the state once and writes it once; blocks
of 32 keep a (128, 32) state block in registers and give B·HV·V/32 programs (128 at batch 1 for 32 heads of 128)."""


def gated_delta_step_forward(state: Tensor, q: Tensor, k: Tensor, v: Tensor, g: Tensor, beta: Tensor,
                             scale: float) -> tuple[Tensor, Tensor]:
    """Run the decode-step kernel: (o (B, HV, V) in v's dtype, new_state (B, HV, K, V) float32)."""
    if q.dim() != 3 or v.dim() != 3:
        raise ValueError(f"one position: q must be (B, H, K) and v (B, HV, V), got {tuple(q.shape)} and {tuple(v.shape)}")
    batch, nheads, dk = q.shape
    nv_heads, dv = v.shape[1:]
    expected = {"k": (k, (batch, nheads, dk)), "g": (g, (batch, nv_heads)), "beta": (beta, (batch, nv_heads)),
                "state": (state, (batch, nv_heads, dk, dv))}
    for name, (t, shape) in expected.items():
        if tuple(t.shape) != shape:
            raise ValueError(f"{name} must have shape {shape} for q (B, H, K) = {tuple(q.shape)} and v (B, HV, V) = "
                             f"{tuple(v.shape)}, got {tuple(t.shape)}")
    if nheads == 0 or nv_heads % nheads or max(dk, dv) > MAX_HEAD_DIM:
        raise ValueError(f"the value heads HV = {nv_heads} must be a multiple of the key heads H = {nheads}, and K = {dk}"
                         f", V = {dv} at most {MAX_HEAD_DIM}")
    o = torch.empty((batch, nv_heads, dv), dtype=v.dtype, device=v.device)
    new_state = torch.empty((batch, nv_heads, dk, dv), dtype=torch.float32, device=v.device)
    if batch == 0:
        return o, new_state
    block_v = min(STEP_CONFIG["BLOCK_V"], max(16, triton.next_power_of_2(dv)))
    with on_device(q):
        _step_kernel[(batch * nv_heads, triton.cdiv(dv, block_v))](
            *strided(state, 4), *strided(q, 3), *strided(k, 3), *strided(v, 3), *strided(g, 2), *strided(beta, 2),
            *strided(o, 3), new_state, scale, nv_heads, nv_heads // nheads, dk, dv,
            BLOCK_K=max(16, triton.next_power_of_2(dk)), BLOCK_V=block_v, num_warps=STEP_CONFIG["num_warps"],
        )
    return o, new_state


def autotune(config: dict, params: dict[str, tuple[int, ...]], batch: int, seqlen: int, dtype: torch.dtype,
             device: torch.device | str) -> None:
    """The build-time tuning hook (`archgen build --autotune`): run the five kernels a gated_deltanet op of this
    resolved config (heads, head dims, chunk) runs at batch × seqlen, forward and backward, with an initial state as
    after a cached prefix, so that inside triton_support.tuning_session() each tuner tunes its shape bucket."""
    H, K = config["n_heads"], config["head_dim"]
    HV, V = config["n_v_heads"], config["head_v_dim"]
    generator = torch.Generator(device=device).manual_seed(0)

    def randn(*shape):
        return torch.randn(shape, generator=generator, device=device)

    q, k = (torch.nn.functional.normalize(randn(batch, seqlen, H, K), dim=-1).to(dtype) for _ in range(2))
    v = randn(batch, seqlen, HV, V).to(dtype)
    g = -torch.nn.functional.softplus(randn(batch, seqlen, HV))
    beta = torch.sigmoid(randn(batch, seqlen, HV)).to(dtype)
    initial_state = randn(batch, HV, K, V)
    gated_delta_rule_forward(q, k, v, g, beta, K**-0.5, initial_state, config["chunk_size"])
    gated_delta_rule_backward(torch.randn_like(v), torch.randn_like(initial_state), q, k, v, g, beta, K**-0.5,
                              initial_state, config["chunk_size"])


# ---------------------------------------------------------------------------------------------------------------
# Custom op: one graph node for torch.compile / torch.export
# ---------------------------------------------------------------------------------------------------------------


def _forward_impl(q: Tensor, k: Tensor, v: Tensor, g: Tensor, beta: Tensor, scale: float,
                  initial_state: Tensor | None, chunk_size: int) -> tuple[Tensor, Tensor]:
    """archgen_v1::gated_delta_rule -> (o, final_state). CPU tensors take the reference (see `triton_on_cpu`): an
    exported graph runs anywhere."""
    if not (q.is_cuda or triton_on_cpu()):
        o, final_state = gated_delta_rule_reference(q, k, v, g, beta, scale, initial_state)
        return o, final_state.float()
    return gated_delta_rule_forward(q, k, v, g, beta, scale, initial_state, chunk_size)


def _forward_fake(q, k, v, g, beta, scale, initial_state, chunk_size):
    batch, seqlen, _, dk = q.shape
    nv_heads, dv = v.shape[-2:]
    return v.new_empty((batch, seqlen, nv_heads, dv)), v.new_empty((batch, nv_heads, dk, dv), dtype=torch.float32)


def _backward_impl(do: Tensor, dfinal_state: Tensor | None, q: Tensor, k: Tensor, v: Tensor, g: Tensor, beta: Tensor,
                   scale: float, initial_state: Tensor | None, chunk_size: int) -> list[Tensor]:
    """archgen_v1::gated_delta_rule_backward -> [dq, dk, dv, dg, dbeta, dinitial_state] (an empty (0,) tensor without
    an initial state); CPU tensors take the reference's autograd."""
    backward = gated_delta_rule_backward if q.is_cuda or triton_on_cpu() else gated_delta_rule_backward_reference
    grads = backward(do, dfinal_state, q, k, v, g, beta, scale, initial_state, chunk_size)
    return [grad if grad is not None else q.new_empty((0,)) for grad in grads]


def _backward_fake(do, dfinal_state, q, k, v, g, beta, scale, initial_state, chunk_size):
    def like(t):
        return torch.empty_like(t, memory_format=torch.contiguous_format)

    dinit = initial_state.new_empty(initial_state.shape, dtype=torch.float32) if initial_state is not None else None
    return [like(q), like(k), like(v), like(g), like(beta), dinit if dinit is not None else q.new_empty((0,))]


def _setup_context(ctx, inputs, output):
    q, k, v, g, beta, scale, initial_state, chunk_size = inputs
    ctx.save_for_backward(q, k, v, g, beta, initial_state)
    ctx.scale, ctx.chunk_size = scale, chunk_size
    ctx.set_materialize_grads(False)


def _backward(ctx, do, dfinal_state):
    q, k, v, g, beta, initial_state = ctx.saved_tensors
    if do is None:
        do = torch.zeros_like(v)
    dq, dk, dv, dg, dbeta, dinit = gated_delta_rule_backward_op(do, dfinal_state, q, k, v, g, beta, ctx.scale,
                                                                initial_state, ctx.chunk_size)
    return dq, dk, dv, dg, dbeta, None, dinit if initial_state is not None else None, None


gated_delta_rule_backward_op = register_op("gated_delta_rule_backward", _backward_impl, _backward_fake)
gated_delta_rule_op = register_op("gated_delta_rule", _forward_impl, _forward_fake, backward=_backward,
                                  setup_context=_setup_context)


def _step_impl(state: Tensor, q: Tensor, k: Tensor, v: Tensor, g: Tensor, beta: Tensor,
               scale: float) -> tuple[Tensor, Tensor]:
    """archgen_v1::gated_delta_step -> (o, new_state); CPU tensors take the reference."""
    if not (q.is_cuda or triton_on_cpu()):
        o, new_state = gated_delta_step_reference(state, q, k, v, g, beta, scale)
        return o, new_state.float()
    return gated_delta_step_forward(state, q, k, v, g, beta, scale)


def _step_fake(state, q, k, v, g, beta, scale):
    return torch.empty_like(v), state.new_empty(state.shape, dtype=torch.float32)


gated_delta_step_op = register_op("gated_delta_step", _step_impl, _step_fake)


# ---------------------------------------------------------------------------------------------------------------
# Entry point and reference
# ---------------------------------------------------------------------------------------------------------------


def gated_delta_rule(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    g: Tensor,
    beta: Tensor,
    scale: float | None = None,
    initial_state: Tensor | None = None,
    chunk_size: int = CHUNK_SIZE,
    max_seqlen: int | None = None,
) -> tuple[Tensor, Tensor]:
    """The gated delta rule over a whole sequence, differentiable: (o (B, T, HV, V) in v.dtype, final_state (B, HV, K, V)
    float32).

    The signature of ops/gated_delta.py's `gated_delta_rule` (max_seqlen is unused: the kernels take any T).
    chunk_size: a power of two from 16 to 64 (the kernels' L; the result does not depend on it beyond rounding).
    Needs CUDA tensors (or TRITON_INTERPRET=1); on anything else it raises, and the caller runs the reference.
    Gradients flow to q, k, v, g, β and initial_state through `gated_delta_rule_backward`.
    """
    if not (q.is_cuda or triton_on_cpu() or torch.compiler.is_exporting()):
        raise RuntimeError(
            f"the Triton gated_delta_rule kernel needs CUDA tensors, got q on {q.device}: call the reference "
            "(ops/gated_delta.py gated_delta_rule) instead, or set TRITON_INTERPRET=1 before importing triton to run "
            "the kernels in Triton's CPU interpreter (slow; for tests)"
        )
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    return gated_delta_rule_op(q, k, v, g, beta, float(scale), initial_state, chunk_size)


def gated_delta_rule_reference(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    g: Tensor,
    beta: Tensor,
    scale: float | None = None,
    initial_state: Tensor | None = None,
    chunk_size: int = CHUNK_SIZE,
    max_seqlen: int | None = None,
) -> tuple[Tensor, Tensor]:
    """The recurrence as written, one position at a time, in float32 (float64 for float64 inputs).

    Same signature and results as `gated_delta_rule` (chunk_size and max_seqlen are unused: there are no chunks).
    Slow (a Python loop over T) and independent of both the kernels and the chunked algorithm of
    templates/runtime/gated_delta.py."""
    acc = torch.float64 if any(t.dtype == torch.float64 for t in (q, k, v, g, beta)) else torch.float32
    batch, seqlen, nheads, dk = q.shape
    nv_heads, dv = v.shape[-2:]
    scale = dk**-0.5 if scale is None else scale
    q_, k_ = (t.to(acc).repeat_interleave(nv_heads // nheads, dim=2) for t in (q, k))  # (B, T, HV, K)
    v_, g_, beta_ = v.to(acc), g.to(acc), beta.to(acc)
    if initial_state is not None:
        state = initial_state.to(acc)
    else:
        state = v_.new_zeros(batch, nv_heads, dk, dv)  # (B, HV, K, V)
    outputs = []
    for t in range(seqlen):
        state = torch.exp(g_[:, t])[..., None, None] * state
        pseudo = beta_[:, t, :, None] * (v_[:, t] - torch.einsum("bhkv,bhk->bhv", state, k_[:, t]))  # (B, HV, V)
        state = state + k_[:, t, :, :, None] * pseudo[:, :, None, :]
        outputs.append(scale * torch.einsum("bhkv,bhk->bhv", state, q_[:, t]))
    o = torch.stack(outputs, dim=1) if outputs else v_.new_zeros(batch, 0, nv_heads, dv)  # (B, T, HV, V)
    return o.to(v.dtype), state


def gated_delta_rule_backward_reference(
    do: Tensor,
    dfinal_state: Tensor | None,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    g: Tensor,
    beta: Tensor,
    scale: float | None = None,
    initial_state: Tensor | None = None,
    chunk_size: int = CHUNK_SIZE,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor | None]:
    """`gated_delta_rule_backward`'s signature and results, by autograd through `gated_delta_rule_reference`."""
    with torch.enable_grad():
        inputs = [t.detach().requires_grad_() if t is not None else None for t in (q, k, v, g, beta, initial_state)]
        o, final_state = gated_delta_rule_reference(*inputs[:5], scale, inputs[5])
        outputs = [(o, do), (final_state, dfinal_state if dfinal_state is not None else torch.zeros_like(final_state))]
        connected = [(out, grad.to(out.dtype)) for out, grad in outputs if out.requires_grad]  # none at T = 0 from 0
        present = [t for t in inputs if t is not None]
        found = iter(torch.autograd.grad([out for out, _ in connected], present, [grad for _, grad in connected],
                                         allow_unused=True) if connected else [None] * len(present))
    grads = [(next(found), t) if t is not None else (None, None) for t in inputs]
    dq, dk, dv, dg, dbeta, dinit = (grad if grad is not None or t is None else torch.zeros_like(t) for grad, t in grads)
    return (dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), dg.to(g.dtype), dbeta.to(beta.dtype),
            dinit.float() if dinit is not None else None)


def gated_delta_step(state: Tensor, q: Tensor, k: Tensor, v: Tensor, g: Tensor, beta: Tensor,
                     scale: float | None = None) -> tuple[Tensor, Tensor]:
    """One decoding step, in one launch: (o (B, HV, V) in v.dtype, new_state (B, HV, K, V) float32).

    The signature of ops/gated_delta.py's `gated_delta_step`: state (B, HV, K, V), q and k (B, H, K), v (B, HV, V),
    g and beta (B, HV). `state` is left untouched (copy the result into the cache). Needs CUDA tensors (or
    TRITON_INTERPRET=1); decoding does not train, so there is no backward."""
    if not (q.is_cuda or triton_on_cpu() or torch.compiler.is_exporting()):
        raise RuntimeError(
            f"the Triton gated_delta_step kernel needs CUDA tensors, got q on {q.device}: call the reference "
            "(ops/gated_delta.py gated_delta_step) instead, or set TRITON_INTERPRET=1 before importing triton"
        )
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    return gated_delta_step_op(state, q, k, v, g, beta, float(scale))


def gated_delta_step_reference(state: Tensor, q: Tensor, k: Tensor, v: Tensor, g: Tensor, beta: Tensor,
                               scale: float | None = None) -> tuple[Tensor, Tensor]:
    """One position of `gated_delta_rule_reference`, with the signature and results of `gated_delta_step`."""
    o, new_state = gated_delta_rule_reference(q[:, None], k[:, None], v[:, None], g[:, None], beta[:, None], scale,
                                              state)
    return o[:, 0], new_state


def decomposition(reference, max_seqlen: int) -> dict:
    """{the custom op `reference` is the reference of: that op written with it}: how exporters that cannot run Triton
    (ONNX) lower it. This file holds two ops, and a generated package calls this once per op it uses, with the
    ops/gated_delta.py function of the op's name: `gated_delta_rule` (chunked, no loop over time; max_seqlen bounds
    its rounds of state passing when T is symbolic, see its docstring) or `gated_delta_step`."""

    def gated_delta_rule_decomposed(q, k, v, g, beta, scale, initial_state, chunk_size):
        o, final_state = reference(q, k, v, g, beta, scale=scale, initial_state=initial_state, chunk_size=chunk_size,
                                   max_seqlen=max_seqlen)
        return o, final_state.float()

    def gated_delta_step_decomposed(state, q, k, v, g, beta, scale):
        o, new_state = reference(state, q, k, v, g, beta, scale=scale)
        return o, new_state.float()

    lowerings = {"gated_delta_rule": gated_delta_rule_decomposed, "gated_delta_step": gated_delta_step_decomposed}
    if reference.__name__ not in lowerings:
        raise ValueError(f"gated_delta_rule.py has no op whose reference is {reference.__name__!r}; it lowers "
                         f"{', '.join(lowerings)}")
    return {op_overload(reference.__name__): lowerings[reference.__name__]}


def _check_inputs(q, k, v, g, beta, initial_state, chunk_size) -> None:
    """Shapes, dtypes, devices and the chunk size, each error naming what was expected and what came."""
    if q.dim() != 4 or v.dim() != 4:
        raise ValueError(f"q must be (B, T, H, K) and v (B, T, HV, V), got q {tuple(q.shape)} and v {tuple(v.shape)}")
    batch, seqlen, nheads, dk = q.shape
    nv_heads, dv = v.shape[-2:]
    if nheads == 0 or nv_heads % nheads:
        raise ValueError(f"the value heads HV = {nv_heads} must be a multiple of the key heads H = {nheads}")
    expected = {
        "k": (k, (batch, seqlen, nheads, dk)), "v": (v, (batch, seqlen, nv_heads, dv)),
        "g": (g, (batch, seqlen, nv_heads)), "beta": (beta, (batch, seqlen, nv_heads)),
        "initial_state": (initial_state, (batch, nv_heads, dk, dv)),
    }
    for name, (t, shape) in {"q": (q, tuple(q.shape)), **expected}.items():
        if t is None:
            continue
        if tuple(t.shape) != shape:
            raise ValueError(f"{name} must have shape {shape} for q (B, T, H, K) = {tuple(q.shape)} and v (B, T, HV, V) "
                             f"= {tuple(v.shape)}, got {tuple(t.shape)}")
        if t.dtype not in SUPPORTED_DTYPES:
            raise TypeError(f"{name} is {t.dtype}; the kernels take {', '.join(map(str, SUPPORTED_DTYPES))}: use "
                            "gated_delta_rule_reference for float64")
        if t.device != q.device:
            raise ValueError(f"{name} is on {t.device}, q on {q.device}: all inputs must be on one device")
    if k.dtype != q.dtype:
        raise TypeError(f"q and k must have one dtype (the products' operands), got {q.dtype} and {k.dtype}")
    if not (16 <= chunk_size <= MAX_CHUNK and chunk_size & (chunk_size - 1) == 0):
        raise ValueError(f"chunk_size must be a power of two from 16 to {MAX_CHUNK}, got {chunk_size}")
    if dk > MAX_HEAD_DIM or dv > MAX_HEAD_DIM:
        raise ValueError(f"head dims K = {dk} and V = {dv} must each be at most {MAX_HEAD_DIM} (the state's rows are "
                         "one register tile)")
    if q.device.type != "cuda" and not interpreting():
        raise RuntimeError(f"the Triton kernels need CUDA tensors, got {q.device} (or set TRITON_INTERPRET=1 before "
                           "importing triton)")


__all__ = ["decomposition", "gated_delta_rule", "gated_delta_rule_backward", "gated_delta_rule_backward_reference",
           "gated_delta_rule_forward", "gated_delta_rule_reference",
           "gated_delta_step", "gated_delta_step_forward", "gated_delta_step_reference", "tuned_configs"]
