"""Attention of packed queries at given positions against dense keys: Triton forward and backward, the custom op,
and the reference. HSPMN's contextual stream runs it for the queries its router selected (the "sparse queries").

For batch b, query head h (of H, reading key/value head h // G with G = H / Hkv: grouped-query attention by index,
K and V are never copied) and packed query row s at position p = q_positions[b, s]::

    visible(s, j) = j <= p  and  (window == 0 or p - j < window)  and  valid[b, s]
    out[b, h, s]  = sum_j softmax_j(scale * q[b, h, s] . k[b, h // G, j]  over visible j) * v[b, h // G, j]

Keys sit at positions 0, 1, .., Tk-1 (a sequence from its start, or a KVCache's slots, whose unwritten tail lies
past every query). A row that sees no key (not valid) gets zeros, and zero gradients. Shapes: q (B, H, S, D),
k (B, Hkv, Tk, D), v (B, Hkv, Tk, Dv), q_positions (B, S) integer, valid (B, S) bool; out (B, H, S, Dv) in q's dtype.
Inputs may be strided (the model hands over transposed views of its projections).

Why a kernel: the reference packs the selected queries but still needs a per-row causal bound, which SDPA takes only
as an explicit mask, off its flash path; on an H200 that ran at 0.67x of dense causal flash attention over ALL
queries. Here the bound is the row's position, read from a vector, and whole key blocks are skipped.

Scores are kept in base 2 (the scale is multiplied by log2 e once, so each exponential is one exp2 instruction).

How the forward works (flash attention with online softmax). The grid is (blocks of BLOCK_M packed rows, B * H),
the blocks of the latest rows first (they see the most keys, so they start first and the tail of the launch is
short); the programs running together are mostly of one head, so its K and V stay in L2 (or of a group of heads,
a tuning choice: see _block_and_head). A program loads its rows' positions,
p_min .. p_max, and walks the keys in BLOCK_N steps over [lo, p_max], lo = 0 (or p_min - window + 1 with a window):
the blocks every row sees entirely need no mask, the ones at the edges (the causal edge near p_min .. p_max, the
window's far edge) are masked per element. Rows are sorted by position within a sequence (pack_selected's order), so
a block's rows are close together and the masked edge is narrow; unsorted rows are still correct, only slower. The
log-sum-exp of every row (base 2) is kept for the backward.

Full-length tensors (`sparse_query_attention`: q (B, H, T, D) of every token and a (B, T) selection, as the reference
ops/routing.py sparse_query_attention takes them): the same kernels, with packed row s living at token row
rows[b, s] of q, dO and every result (INDEXED_ROWS). rows lists the selected tokens first (`selected_rows`), so the
blocks of selected rows are dense; the grid covers all T rows, and the programs past a sequence's selected count see
nothing and write zeros, so no count is read back to the host and no gather, scatter or zero fill runs around them.

How the backward works (two kernels, no atomics, as in flash-attention 2's Triton form). With P the probabilities
recomputed from the saved log-sum-exp, dP = dO V^T, delta = rowsum(dO * O) and dS = P * (dP - delta):
  dq   grid (query blocks, B * H): delta of its rows (written for the dkdv kernel, which runs after it), then
       dQ = scale * dS K over the same key range as the forward;
  dkdv grid (key blocks, B * Hkv): for each of the G query heads that read the kv head and each query block whose
       positions reach the key block, dV += P^T dO and dK += scale * dS^T Q; a kv head's gradient is summed in one
       program, so nothing is written twice. The query blocks come as ranges per key block (`query_block_ranges`,
       computed before the launch so the loops have no branch and their loads pipeline): the blocks every row of
       which sees the whole key block run without a mask, the rest (the causal edge, a window's far edge) masked.
One kernel adding dq atomically (5 matmuls per pair of blocks instead of 7, as flash-attention's CUDA kernels do)
measured slower on the H200 (docs/design.md), so dq keeps its own kernel.
delta is the one quantity the backward cannot take from bf16 values: where a row's softmax is peaked, dP_j and delta
nearly cancel, so O's rounding to bf16 would come back amplified (dq and dk 4x less precise); the forward keeps its
float32 output when a backward will follow (archgen_v2: the op returns it as a third output).

Contents: `packed_query_attention` (the entry point; same signature as templates/runtime/routing.py's, plus an
optional window), `sparse_query_attention` (full-length tensors) and `sliding_window_attention` (every token a query
within a window: what attention layers with a window run in training and cache-free forwards), the custom ops
`archgen_v2::packed_query_attention`, `..::sparse_query_attention`, `..::sliding_window_attention` and their
`..._backward` (one graph node each, with fake implementations and autograd), the launchers
`packed_query_attention_forward` / `..._backward` (autotuned on first use per shape bucket, see `shape_key`),
`packed_query_attention_reference` (a dense masked softmax in float32: the ground truth of the tests, and what the
ops compute for CPU tensors), and `decomposition` (each op written with the generated package's reference op, for
ONNX).
"""

import math

import torch
import triton
import triton.language as tl
from torch import Tensor
from triton.tools.tensor_descriptor import TensorDescriptor

from .triton_support import (
    Autotuner,
    calls_implementation_directly,
    dot,
    dtype_name,
    interpreting,
    on_device,
    op_overload,
    register_op,
    strided,
    triton_on_cpu,
)

_NEG_BIG = tl.constexpr(-1.0e30)  # the running max starts finite, so a row that sees nothing never computes inf - inf

# Autotune spaces: rows (BLOCK_M) and keys (BLOCK_N) per step, warps and software-pipelining stages, and the choices
# each kernel documents (HEAD_GROUP, MASK_EDGES_ONLY, EDGE_BRANCH, DP_EARLY, TMA). The first config that fits (see
# `candidates`) is what a bucket runs untuned (a generated package built without --autotune): each list starts with the
# H200's fastest at D 128 in bf16 for sparse queries. Beside each: ms of the kernel alone (session 9's call 3: sparse
# queries, then the window shape), registers per thread, shared memory, and so programs per SM (65536 registers,
# 227 KB), from triton 3.6 compiles for sm_90 with the run-time specializations (docs/design.md: counting a kernel's
# registers without a GPU). An 8-warp dkdv config holds one program per SM, so nothing hides its loads of K and V and
# its stores of dK and dV; the 4-warp ones with 64 keys fit two, and won by 12%. Three or four per SM lost (session 7,
# call 2; docs/design.md): under a register cap (maxnreg) the spills cost more than the third program gains, and tiles
# of 32 keys (dkdv) or 32 rows (dq) compile to mma.sync instead of Hopper's warpgroup MMA, which needs 64-row tiles, and
# ran 2-3x slower.
# TMA: the streamed tiles (k and v in the forward and dq kernels, q and dO in the dkdv kernel) come through Hopper's
# tensor memory accelerator (tensor descriptors, `tma_ready`) instead of per-thread asynchronous copies: no per-thread
# addresses or masks, so the forward drops from 255 registers to 161 and dq from 177 to 139 (a third program fits on
# an SM without spills); the dkdv kernel also takes its rows' lse, delta and positions as one block (the dq kernel
# writes them side by side), and its loop step shrinks by a third, mostly integer work (Nsight Compute, session 8's
# call 1: its busiest pipe was the integer ALU). Each copy into a stage's buffer waits on a CTA barrier (the buffer's
# last readers), so one copy of the three vectors instead of three (call 2's form) saves two barriers a step.
# Call 2 dropped the forward's 32-key (0.348, 0.649 ms) and 2-stage (0.382, 0.658) TMA forms, its head-by-head order
# (0.358, 0.713) and the same tiles without TMA (0.330, 0.713); dq without TMA (0.411, 0.855 and, 128 rows at 8 warps,
# 0.449, 0.890); and dkdv's three loops (MASK_EDGES_ONLY, 0.901, 1.285: slower in every run since session 6).
# Session 9's call 3 dropped dq at 2 stages with 32 keys (0.442, 0.779), dkdv without TMA (0.771, 1.295) and dkdv with
# 128 keys at 8 warps (0.867, 1.326). A config pinned without one of these keys gets the choice's older form (no TMA,
# three loops, dP^T after dV, every step masked, heads one by one).
FORWARD_CONFIGS = [
    {"BLOCK_M": m, "BLOCK_N": n, "num_warps": w, "num_stages": s, "HEAD_GROUP": g, "TMA": t, "EDGE_BRANCH": e}
    for m, n, w, s, g, t, e in (
        (64, 64, 4, 3, 16, 1, 0),  # 0.293, 0.622 ms; 161 registers, 113 KB: 2 (without TMA: 255)
        (64, 64, 4, 3, 16, 1, 1),  # 161 (window: 164, against 200), 113 KB: 2; one loop, a step of 342 unmasked
    )
]
BACKWARD_DQ_CONFIGS = [
    {"BLOCK_M": m, "BLOCK_N": n, "num_warps": w, "num_stages": s, "HEAD_GROUP": g, "TMA": t, "EDGE_BRANCH": e}
    for m, n, w, s, g, t, e in (
        (64, 32, 4, 4, 16, 1, 0),  # 0.383, 0.884 ms; 139, 97 KB: 2 (without TMA: 177)
        (64, 32, 4, 4, 16, 1, 1),  # 126, 97 KB: 2; one loop: 272 instructions a step, 215 unmasked
        (64, 64, 4, 2, 16, 1, 0),  # 0.391, 0.772; 176 (window: 192), 97 KB: 2 (half the steps: half the barriers)
        (64, 64, 4, 2, 16, 1, 1),  # 158 (window: 154), 97 KB: 2; one loop: 409 instructions a step, 294 unmasked
    )
]
BACKWARD_DKDV_CONFIGS = [
    {"BLOCK_M": m, "BLOCK_N": n, "num_warps": w, "num_stages": s, "MASK_EDGES_ONLY": 0, "TMA": 1, "DP_EARLY": d,
     "EDGE_BRANCH": e, "HEAD_GROUP": g}
    for m, n, w, s, d, e, g in (
        (32, 64, 4, 3, 1, 0, 1),  # 0.581, 1.024 ms; 218 registers, 81 KB: 2; a step of 306 instructions (476 in s8)
        (32, 64, 4, 3, 1, 1, 1),  # 224, 81 KB: 2; 303 instructions, 271 where the branch skips the mask
        (32, 64, 4, 3, 1, 1, 16),  # the same, heads in groups of 16 (the forward's and dq's order: 8% and 6% faster)
        (64, 64, 4, 2, 0, 1, 16),  # 0.595, 1.038 (every step masked, heads one by one); 255, 97 KB: 2; 432
        # instructions, 368 unmasked: a third fewer a row than 32 rows (with DP_EARLY it spills in the loop)
    )
]
"""Few candidates on purpose: each is a Triton compile of several seconds per shape bucket and dtype."""
SHARED_MEMORY_BUDGET = 160 * 1024
"""Bytes of streamed tiles a config may stage (num_stages of them; the held tile lives in registers): candidates above
it are left out for that head dim and dtype, so the untuned default always launches (an H100 / H200 has 227 KiB)."""
SMALLEST_CONFIG = {"BLOCK_M": 32, "BLOCK_N": 32, "num_warps": 4, "num_stages": 1}
"""What a bucket runs when no candidate fits (float32 or head dims above 128)."""
INTERPRETER_CONFIG = {"BLOCK_M": 16, "BLOCK_N": 16, "num_warps": 4, "num_stages": 1}
"""The config used under TRITON_INTERPRET=1: the interpreter has nothing to tune, and small blocks exercise the
block edges at the tests' small shapes."""

SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


# ---------------------------------------------------------------------------------------------------------------
# Kernels
# ---------------------------------------------------------------------------------------------------------------


@triton.jit
def _row_positions(pos_ptr, stride_pb, stride_ps, b, rows, S):
    """The positions of `rows` (-1: no row, or an invalid one)."""
    return tl.load(pos_ptr + b * stride_pb + rows * stride_ps, mask=rows < S, other=-1)


@triton.jit
def _token_rows(rows_ptr, stride_rb, stride_rs, b, rows, S, INDEXED_ROWS: tl.constexpr):
    """Where packed rows `rows` live in q, the output and the per-row tensors: at those rows, or with INDEXED_ROWS at
    the tokens rows_ptr[b, rows] of full-length tensors (sparse_query_attention)."""
    token_rows = rows
    if INDEXED_ROWS:
        token_rows = tl.load(rows_ptr + b * stride_rb + rows * stride_rs, mask=rows < S, other=0)
    return token_rows


@triton.jit
def _key_range(p, Tk, window, BLOCK_N: tl.constexpr, HAS_WINDOW: tl.constexpr):
    """For rows at positions p (-1: sees nothing), the keys they read, as bounds lo <= full_lo <= full_hi <= hi (all
    but hi block-aligned): [full_lo, full_hi) is seen by every row (no mask), [lo, full_lo) and [full_hi, hi) by some
    rows (masked). Keys stop at Tk (a position past the keys sees them all)."""
    p_max = tl.max(p, axis=0)
    p_min = tl.min(p, axis=0)  # -1 when a row sees nothing: then no block is seen by every row
    hi = tl.minimum(p_max + 1, Tk)
    full_hi = tl.minimum((p_min + 1) // BLOCK_N, Tk // BLOCK_N) * BLOCK_N
    if HAS_WINDOW:
        lo = (tl.maximum(p_min - window + 1, 0) // BLOCK_N) * BLOCK_N
        full_lo = ((tl.maximum(p_max - window + 1, 0) + BLOCK_N - 1) // BLOCK_N) * BLOCK_N
    else:
        lo = p_min * 0
        full_lo = lo
    no_full = full_hi <= full_lo
    full_lo = tl.where(no_full, lo, full_lo)
    full_hi = tl.where(no_full, lo, full_hi)
    return lo, full_lo, full_hi, hi


@triton.jit
def _key_tiles(k_ptr, v_ptr, b, kv_h, stride_kb, stride_kh, stride_vb, stride_vh, TMA: tl.constexpr):
    """Where the forward and dq kernels read the key blocks of kv head (b, kv_h) from. With TMA: k_ptr and v_ptr
    themselves, tensor descriptors of the whole (B, Hkv, Tk, D) k and v whose blocks are one kv head's BLOCK_N keys
    (the TMA unit copies a block to shared memory, keys past Tk and columns past D as zeros); else pointers at the
    head's first key."""
    if TMA:
        k_base, v_base = k_ptr, v_ptr
    else:
        k_base, v_base = k_ptr + b * stride_kb + kv_h * stride_kh, v_ptr + b * stride_vb + kv_h * stride_vh
    return k_base, v_base


@triton.jit
def _visible(p, keys, Tk, window, HAS_WINDOW: tl.constexpr):
    """(rows, keys) bool: key j is visible from a row at position p (p = -1 sees nothing)."""
    visible = (keys[None, :] <= p[:, None]) & (keys[None, :] < Tk)
    if HAS_WINDOW:
        visible = visible & (p[:, None] - keys[None, :] < window)
    return visible


@triton.jit
def _forward_steps(acc, l_i, m_i, q, p, k_base, v_base, b, kv_h, stride_kt, stride_kd, stride_vt, stride_vd,
                   offs_n, offs_d, offs_dv, Tk, D, Dv, start, end, full_start, full_end, qk_scale, window,
                   BLOCK_N: tl.constexpr, MASKED: tl.constexpr, EDGE_BRANCH: tl.constexpr, HAS_WINDOW: tl.constexpr,
                   DOT_PRECISION: tl.constexpr, TMA: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr):
    """Online softmax over the key blocks start, start + BLOCK_N, .. < end (MASKED: per element visibility; with
    EDGE_BRANCH only outside [full_start, full_end), one uniform branch a step). With TMA, k_base and v_base are tensor
    descriptors of k and v (see _key_tiles), else pointers at kv head (b, kv_h)."""
    for n0 in range(start, end, BLOCK_N):
        keys = n0 + offs_n
        if TMA:
            k = tl.trans(k_base.load([b, kv_h, n0, 0]).reshape(BLOCK_N, BLOCK_D))
        else:
            k = tl.load(k_base + keys[None, :] * stride_kt + offs_d[:, None] * stride_kd,
                        mask=(keys[None, :] < Tk) & (offs_d[:, None] < D), other=0.0)  # (BLOCK_D, BLOCK_N)
        qk = dot(q, k, None, DOT_PRECISION)  # (BLOCK_M, BLOCK_N), unscaled
        if MASKED:
            if EDGE_BRANCH:
                if (n0 < full_start) | (n0 >= full_end):
                    qk = tl.where(_visible(p, keys, Tk, window, HAS_WINDOW), qk, float("-inf"))
            else:
                qk = tl.where(_visible(p, keys, Tk, window, HAS_WINDOW), qk, float("-inf"))
        # the max is taken unscaled (the scale is positive), so the scaling and the shift are one FMA per score
        m_new = tl.maximum(m_i, tl.max(qk, axis=1) * qk_scale)  # log2 units
        probs = tl.math.exp2(qk * qk_scale - m_new[:, None])
        alpha = tl.math.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(probs, axis=1)
        if TMA:
            v = v_base.load([b, kv_h, n0, 0]).reshape(BLOCK_N, BLOCK_DV)
        else:
            v = tl.load(v_base + keys[:, None] * stride_vt + offs_dv[None, :] * stride_vd,
                        mask=(keys[:, None] < Tk) & (offs_dv[None, :] < Dv), other=0.0)  # (BLOCK_N, BLOCK_DV)
        acc = dot(probs.to(v.dtype), v, acc * alpha[:, None], DOT_PRECISION)
        m_i = m_new
    return acc, l_i, m_i


@triton.jit
def _block_and_head(HEAD_GROUP: tl.constexpr, LAST_BLOCK_FIRST: tl.constexpr):
    """(block, b * H + h) of this program of a (blocks, B * H) grid, in launch order (programs start in the order of
    their linear id, x fastest). The heaviest blocks start first: the forward's and dq's latest row blocks, which read
    the most keys (LAST_BLOCK_FIRST), the dkdv kernel's earliest key blocks, which the most rows see. HEAD_GROUP 1:
    one head's blocks after another's, so the programs running together mostly share a head's K and V (the dkdv
    kernel: Q and dO) in L2 (heads varying fastest over all B * H made the H200's forward 11% slower: every resident
    program read other keys). HEAD_GROUP g: the heads of each group of g vary fastest, so the heaviest blocks of a
    group start together and the last group's heavy blocks are not left to run alone at the end (the launch's tail),
    while the tensors being read stay those of about g heads."""
    n_blocks = tl.num_programs(0)
    n_heads = tl.num_programs(1)
    pid = tl.program_id(1) * n_blocks + tl.program_id(0)
    group_start = (pid // (HEAD_GROUP * n_blocks)) * HEAD_GROUP
    heads = tl.minimum(n_heads - group_start, HEAD_GROUP)
    within = pid - group_start * n_blocks
    block = within // heads
    if LAST_BLOCK_FIRST:
        block = n_blocks - 1 - block
    return block, group_start + within % heads


@triton.jit
def _forward_kernel(
    q_ptr, stride_qb, stride_qh, stride_qs, stride_qd,
    k_ptr, stride_kb, stride_kh, stride_kt, stride_kd,
    v_ptr, stride_vb, stride_vh, stride_vt, stride_vd,
    pos_ptr, stride_pb, stride_ps,
    rows_ptr, stride_rb, stride_rs,  # (B, S) int32, read with INDEXED_ROWS only
    out_ptr, stride_ob, stride_oh, stride_os, stride_od,
    out32_ptr, stride_o32b, stride_o32h, stride_o32s, stride_o32d,  # unused unless KEEP_FLOAT32_OUT
    lse_ptr, stride_lb, stride_lh, stride_ls,
    H, S, Tk, D, Dv, group, qk_scale, window,
    HAS_WINDOW: tl.constexpr,  # keys older than `window` positions are invisible too
    INDEXED_ROWS: tl.constexpr,  # packed row s is token rows_ptr[b, s] of full-length q, out, out32 and lse
    KEEP_FLOAT32_OUT: tl.constexpr,  # also write the output unrounded, for the backward's delta
    EDGE_BRANCH: tl.constexpr,  # one loop masking the edge blocks only (a branch a step), or three loops; a tuning choice
    DOT_PRECISION: tl.constexpr,  # "ieee" for float32 inputs (exact), "tf32" otherwise (ignored for half inputs)
    HEAD_GROUP: tl.constexpr,  # launch order, see _block_and_head
    TMA: tl.constexpr,  # k_ptr and v_ptr are tensor descriptors (see _key_tiles)
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
):
    block_m, bh = _block_and_head(HEAD_GROUP, True)
    b = bh // H
    h = bh % H
    kv_h = h // group
    rows = block_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)

    p = _row_positions(pos_ptr, stride_pb, stride_ps, b, rows, S)
    t_rows = _token_rows(rows_ptr, stride_rb, stride_rs, b, rows, S, INDEXED_ROWS)
    sees = (rows < S) & (p >= 0)  # the other rows' q is never read (most of sparse_query_attention's rows)
    q = tl.load(q_ptr + b * stride_qb + h * stride_qh + t_rows[:, None] * stride_qs + offs_d[None, :] * stride_qd,
                mask=sees[:, None] & (offs_d[None, :] < D), other=0.0)  # (BLOCK_M, BLOCK_D)
    k_base, v_base = _key_tiles(k_ptr, v_ptr, b, kv_h, stride_kb, stride_kh, stride_vb, stride_vh, TMA)

    acc = tl.zeros((BLOCK_M, BLOCK_DV), dtype=tl.float32)
    l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
    m_i = tl.zeros((BLOCK_M,), dtype=tl.float32) + _NEG_BIG
    lo, full_lo, full_hi, hi = _key_range(p, Tk, window, BLOCK_N, HAS_WINDOW)
    if EDGE_BRANCH:  # one loop (one pipeline fill), the edge blocks masked
        acc, l_i, m_i = _forward_steps(acc, l_i, m_i, q, p, k_base, v_base, b, kv_h, stride_kt, stride_kd, stride_vt,
                                       stride_vd, offs_n, offs_d, offs_dv, Tk, D, Dv, lo, hi, full_lo, full_hi,
                                       qk_scale, window, BLOCK_N, True, True, HAS_WINDOW, DOT_PRECISION, TMA, BLOCK_D,
                                       BLOCK_DV)
    else:  # three loops: the masked edges around the blocks every row sees whole
        acc, l_i, m_i = _forward_steps(acc, l_i, m_i, q, p, k_base, v_base, b, kv_h, stride_kt, stride_kd, stride_vt,
                                       stride_vd, offs_n, offs_d, offs_dv, Tk, D, Dv, lo, full_lo, lo, lo, qk_scale,
                                       window, BLOCK_N, True, False, HAS_WINDOW, DOT_PRECISION, TMA, BLOCK_D, BLOCK_DV)
        acc, l_i, m_i = _forward_steps(acc, l_i, m_i, q, p, k_base, v_base, b, kv_h, stride_kt, stride_kd, stride_vt,
                                       stride_vd, offs_n, offs_d, offs_dv, Tk, D, Dv, full_lo, full_hi, lo, lo,
                                       qk_scale, window, BLOCK_N, False, False, HAS_WINDOW, DOT_PRECISION, TMA, BLOCK_D,
                                       BLOCK_DV)
        acc, l_i, m_i = _forward_steps(acc, l_i, m_i, q, p, k_base, v_base, b, kv_h, stride_kt, stride_kd, stride_vt,
                                       stride_vd, offs_n, offs_d, offs_dv, Tk, D, Dv, full_hi, hi, lo, lo, qk_scale,
                                       window, BLOCK_N, True, False, HAS_WINDOW, DOT_PRECISION, TMA, BLOCK_D, BLOCK_DV)

    sees_any = l_i > 0.0
    out = acc / tl.where(sees_any, l_i, 1.0)[:, None]  # a row that sees nothing: acc is 0, out is 0
    lse = tl.where(sees_any, m_i + tl.math.log2(tl.where(sees_any, l_i, 1.0)), 0.0)  # base 2
    out_mask = (rows[:, None] < S) & (offs_dv[None, :] < Dv)
    tl.store(out_ptr + b * stride_ob + h * stride_oh + t_rows[:, None] * stride_os + offs_dv[None, :] * stride_od,
             out.to(out_ptr.dtype.element_ty), mask=out_mask)
    if KEEP_FLOAT32_OUT:  # rows that see nothing are left unwritten: the backward reads out32 where p >= 0 only
        tl.store(out32_ptr + b * stride_o32b + h * stride_o32h + t_rows[:, None] * stride_o32s
                 + offs_dv[None, :] * stride_o32d, out, mask=out_mask & (p >= 0)[:, None])
    tl.store(lse_ptr + b * stride_lb + h * stride_lh + t_rows * stride_ls, lse, mask=rows < S)


@triton.jit
def _dq_steps(dq, q, do, lse, delta, p, k_base, v_base, b, kv_h, stride_kt, stride_kd, stride_vt, stride_vd,
              offs_n, offs_d, offs_dv, Tk, D, Dv, start, end, full_start, full_end, qk_scale, window,
              BLOCK_N: tl.constexpr, MASKED: tl.constexpr, EDGE_BRANCH: tl.constexpr, HAS_WINDOW: tl.constexpr,
              DOT_PRECISION: tl.constexpr, TMA: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr):
    """dq += dS K over the key blocks start .. < end (without the final scale); k_base and v_base as in
    _forward_steps. MASKED with EDGE_BRANCH: only the blocks outside [full_start, full_end) are masked (one uniform
    branch a step)."""
    for n0 in range(start, end, BLOCK_N):
        keys = n0 + offs_n
        if TMA:
            kT = tl.trans(k_base.load([b, kv_h, n0, 0]).reshape(BLOCK_N, BLOCK_D))
            vT = tl.trans(v_base.load([b, kv_h, n0, 0]).reshape(BLOCK_N, BLOCK_DV))
        else:
            kT = tl.load(k_base + keys[None, :] * stride_kt + offs_d[:, None] * stride_kd,
                         mask=(keys[None, :] < Tk) & (offs_d[:, None] < D), other=0.0)  # (BLOCK_D, BLOCK_N)
            vT = tl.load(v_base + keys[None, :] * stride_vt + offs_dv[:, None] * stride_vd,
                         mask=(keys[None, :] < Tk) & (offs_dv[:, None] < Dv), other=0.0)  # (BLOCK_DV, BLOCK_N)
        qk = dot(q, kT, None, DOT_PRECISION) * qk_scale
        probs = tl.math.exp2(qk - lse[:, None])  # (BLOCK_M, BLOCK_N)
        if MASKED:
            if EDGE_BRANCH:
                if (n0 < full_start) | (n0 >= full_end):
                    probs = tl.where(_visible(p, keys, Tk, window, HAS_WINDOW), probs, 0.0)
            else:
                probs = tl.where(_visible(p, keys, Tk, window, HAS_WINDOW), probs, 0.0)
        dp = dot(do, vT, None, DOT_PRECISION)
        ds = probs * (dp - delta[:, None])
        dq = dot(ds.to(kT.dtype), tl.trans(kT), dq, DOT_PRECISION)
    return dq


@triton.jit
def _backward_dq_kernel(
    q_ptr, stride_qb, stride_qh, stride_qs, stride_qd,
    k_ptr, stride_kb, stride_kh, stride_kt, stride_kd,
    v_ptr, stride_vb, stride_vh, stride_vt, stride_vd,
    pos_ptr, stride_pb, stride_ps,
    rows_ptr, stride_rb, stride_rs,  # (B, S) int32, read with INDEXED_ROWS only
    do_ptr, stride_dob, stride_doh, stride_dos, stride_dod,
    lse_ptr, stride_lb, stride_lh, stride_ls,
    stats_ptr, stride_sb, stride_sh, stride_ss,  # (B, H, S, 4) float32 written here for the dkdv kernel (ROW_STATS)
    out_ptr, stride_ob, stride_oh, stride_os, stride_od,  # the forward's output (float32, or q's dtype)
    dq_ptr, stride_dqb, stride_dqh, stride_dqs, stride_dqd,
    H, S, Tk, D, Dv, group, qk_scale, sm_scale, window,
    HAS_WINDOW: tl.constexpr, INDEXED_ROWS: tl.constexpr, DOT_PRECISION: tl.constexpr,
    HEAD_GROUP: tl.constexpr,  # launch order, see _block_and_head
    TMA: tl.constexpr,  # k_ptr and v_ptr are tensor descriptors (see _key_tiles)
    ROW_STATS: tl.constexpr,  # also the rows' lse and positions beside delta, for the dkdv kernel's TMA choice
    EDGE_BRANCH: tl.constexpr,  # one loop masking the edge blocks only (a branch a step), or three loops; a tuning choice
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
):
    block_m, bh = _block_and_head(HEAD_GROUP, True)  # grid (row blocks, B * H), as the forward's
    b = bh // H
    h = bh % H
    kv_h = h // group
    rows = block_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    in_rows = rows < S

    p = _row_positions(pos_ptr, stride_pb, stride_ps, b, rows, S)
    t_rows = _token_rows(rows_ptr, stride_rb, stride_rs, b, rows, S, INDEXED_ROWS)
    sees = in_rows & (p >= 0)  # a row that sees nothing has dq = 0: its q, dO and O are never read
    q = tl.load(q_ptr + b * stride_qb + h * stride_qh + t_rows[:, None] * stride_qs + offs_d[None, :] * stride_qd,
                mask=sees[:, None] & (offs_d[None, :] < D), other=0.0)
    do = tl.load(do_ptr + b * stride_dob + h * stride_doh + t_rows[:, None] * stride_dos
                 + offs_dv[None, :] * stride_dod, mask=sees[:, None] & (offs_dv[None, :] < Dv), other=0.0)
    lse = tl.load(lse_ptr + b * stride_lb + h * stride_lh + t_rows * stride_ls, mask=in_rows, other=0.0)
    o = tl.load(out_ptr + b * stride_ob + h * stride_oh + t_rows[:, None] * stride_os + offs_dv[None, :] * stride_od,
                mask=sees[:, None] & (offs_dv[None, :] < Dv), other=0.0)
    delta = tl.sum(do.to(tl.float32) * o.to(tl.float32), axis=1)  # rowsum(dO * O); 0 for a row that sees nothing
    stats = stats_ptr + b * stride_sb + h * stride_sh + t_rows * stride_ss  # each row's [lse, delta, position, -]
    tl.store(stats + 1, delta, mask=in_rows)
    if ROW_STATS:
        tl.store(stats, lse, mask=in_rows)
        tl.store(stats + 2, p.to(tl.float32), mask=in_rows)  # exact: positions are below 2^24
    k_base, v_base = _key_tiles(k_ptr, v_ptr, b, kv_h, stride_kb, stride_kh, stride_vb, stride_vh, TMA)

    dq = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    lo, full_lo, full_hi, hi = _key_range(p, Tk, window, BLOCK_N, HAS_WINDOW)
    if EDGE_BRANCH:  # one loop (one pipeline fill), the edge blocks masked
        dq = _dq_steps(dq, q, do, lse, delta, p, k_base, v_base, b, kv_h, stride_kt, stride_kd, stride_vt, stride_vd,
                       offs_n, offs_d, offs_dv, Tk, D, Dv, lo, hi, full_lo, full_hi, qk_scale, window,
                       BLOCK_N, True, True, HAS_WINDOW, DOT_PRECISION, TMA, BLOCK_D, BLOCK_DV)
    else:  # three loops: the masked edges around the blocks every row sees whole
        dq = _dq_steps(dq, q, do, lse, delta, p, k_base, v_base, b, kv_h, stride_kt, stride_kd, stride_vt, stride_vd,
                       offs_n, offs_d, offs_dv, Tk, D, Dv, lo, full_lo, lo, lo, qk_scale, window,
                       BLOCK_N, True, False, HAS_WINDOW, DOT_PRECISION, TMA, BLOCK_D, BLOCK_DV)
        dq = _dq_steps(dq, q, do, lse, delta, p, k_base, v_base, b, kv_h, stride_kt, stride_kd, stride_vt, stride_vd,
                       offs_n, offs_d, offs_dv, Tk, D, Dv, full_lo, full_hi, lo, lo, qk_scale, window,
                       BLOCK_N, False, False, HAS_WINDOW, DOT_PRECISION, TMA, BLOCK_D, BLOCK_DV)
        dq = _dq_steps(dq, q, do, lse, delta, p, k_base, v_base, b, kv_h, stride_kt, stride_kd, stride_vt, stride_vd,
                       offs_n, offs_d, offs_dv, Tk, D, Dv, full_hi, hi, lo, lo, qk_scale, window,
                       BLOCK_N, True, False, HAS_WINDOW, DOT_PRECISION, TMA, BLOCK_D, BLOCK_DV)
    tl.store(dq_ptr + b * stride_dqb + h * stride_dqh + t_rows[:, None] * stride_dqs + offs_d[None, :] * stride_dqd,
             (dq * sm_scale).to(dq_ptr.dtype.element_ty), mask=in_rows[:, None] & (offs_d[None, :] < D))


@triton.jit
def _masked_T(probsT, p, keys, window, HAS_WINDOW: tl.constexpr):
    """probsT (keys, rows) with the pairs that rows at positions p (int32, or float32 from the rows' stats: exact
    below 2^24) do not see set to 0. Keys past Tk need no mask: their rows of dK and dV are never stored, and no other
    row depends on them."""
    keys = keys.to(p.dtype)  # (BLOCK_N,): the few keys a thread holds, converted before the broadcast
    visibleT = keys[:, None] <= p[None, :]
    if HAS_WINDOW:  # p - key < window, with the subtraction per row
        visibleT = visibleT & (keys[:, None] > (p - window)[None, :])
    return tl.where(visibleT, probsT, 0.0)


@triton.jit
def _dkdv_steps(dk, dv, k, v, keys, q_base, do_base, lse_base, stats_base, pos_base, rows_ptr, stride_rb,
                stride_rs, b, h, stride_qs, stride_qd, stride_dos, stride_dod, stride_ls, stride_ss, stride_ps, offs_m,
                offs_d, offs_dv, S, D, Dv, start, end, full_start, full_end, qk_scale, window, BLOCK_M: tl.constexpr,
                MASKED: tl.constexpr, EDGE_BRANCH: tl.constexpr, HAS_WINDOW: tl.constexpr, INDEXED_ROWS: tl.constexpr,
                DOT_PRECISION: tl.constexpr, TMA: tl.constexpr, DP_EARLY: tl.constexpr, BLOCK_D: tl.constexpr,
                BLOCK_DV: tl.constexpr):
    """dv += P^T dO and dk += dS^T Q (without the final scale) over the row blocks start, start + BLOCK_M, .. < end
    of query head (b, h) (MASKED: per element visibility; otherwise every row sees every key of the block). With TMA,
    q_base, do_base and stats_base are tensor descriptors of the whole q, dO and rows' stats (blocks of BLOCK_M rows
    of one head, rows past S as zeros; a row's stats: [lse, delta, position, -], one copy for the three: each copy
    into a stage's buffer waits on a CTA barrier), else pointers at the head's first row (of the stats: at its
    delta)."""
    for m0 in range(start, end, BLOCK_M):  # no branch inside: the loads pipeline
        rows = m0 + offs_m
        in_rows = rows < S
        t_rows = _token_rows(rows_ptr, stride_rb, stride_rs, b, rows, S, INDEXED_ROWS)
        if TMA:  # rows past S come as zeros: q and dO of zero add nothing to dK and dV, whatever they see
            qT = tl.trans(q_base.load([b, h, m0, 0]).reshape(BLOCK_M, BLOCK_D))
            do = do_base.load([b, h, m0, 0]).reshape(BLOCK_M, BLOCK_DV)
            lse_and_position, delta_and_unused = tl.split(stats_base.load([b, h, m0, 0]).reshape(BLOCK_M, 2, 2))
            lse, p = tl.split(lse_and_position)
            delta, _ = tl.split(delta_and_unused)
        else:
            qT = tl.load(q_base + t_rows[None, :] * stride_qs + offs_d[:, None] * stride_qd,
                         mask=in_rows[None, :] & (offs_d[:, None] < D), other=0.0)  # (BLOCK_D, BLOCK_M)
            do = tl.load(do_base + t_rows[:, None] * stride_dos + offs_dv[None, :] * stride_dod,
                         mask=in_rows[:, None] & (offs_dv[None, :] < Dv), other=0.0)  # (BLOCK_M, BLOCK_DV)
            lse = tl.load(lse_base + t_rows * stride_ls, mask=in_rows, other=0.0)
            delta = tl.load(stats_base + t_rows * stride_ss + 1, mask=in_rows, other=0.0)
        qkT = dot(k, qT, None, DOT_PRECISION) * qk_scale  # (BLOCK_N, BLOCK_M)
        if DP_EARLY:
            dpT = dot(v, tl.trans(do), None, DOT_PRECISION)  # (BLOCK_N, BLOCK_M)
        probsT = tl.math.exp2(qkT - lse[None, :])
        if MASKED:
            if not TMA:
                p = tl.load(pos_base + rows * stride_ps, mask=in_rows, other=-1)
            if EDGE_BRANCH:  # one uniform branch: the row blocks in [full_start, full_end) see the whole key block
                if (m0 < full_start) | (m0 >= full_end):
                    probsT = _masked_T(probsT, p, keys, window, HAS_WINDOW)
            else:
                probsT = _masked_T(probsT, p, keys, window, HAS_WINDOW)
        dv = dot(probsT.to(do.dtype), do, dv, DOT_PRECISION)
        if not DP_EARLY:
            dpT = dot(v, tl.trans(do), None, DOT_PRECISION)
        dsT = probsT * (dpT - delta[None, :])
        dk = dot(dsT.to(qT.dtype), tl.trans(qT), dk, DOT_PRECISION)
    return dk, dv


@triton.jit
def _backward_dkdv_kernel(
    q_ptr, stride_qb, stride_qh, stride_qs, stride_qd,
    k_ptr, stride_kb, stride_kh, stride_kt, stride_kd,
    v_ptr, stride_vb, stride_vh, stride_vt, stride_vd,
    pos_ptr, stride_pb, stride_ps,
    rows_ptr, stride_rb, stride_rs,  # (B, S) int32, read with INDEXED_ROWS only
    do_ptr, stride_dob, stride_doh, stride_dos, stride_dod,
    lse_ptr, stride_lb, stride_lh, stride_ls,
    stats_ptr, stride_sb, stride_sh, stride_ss,  # (B, H, S, 4) float32 the dq kernel wrote: [lse, delta, position, -]
    dk_ptr, stride_dkb, stride_dkh, stride_dkt, stride_dkd,
    dv_ptr, stride_dvb, stride_dvh, stride_dvt, stride_dvd,
    ranges_ptr,  # (B, key blocks, 4) int32: row blocks [first, full_first, full_last, last), see query_block_ranges
    Hkv, S, Tk, D, Dv, group, qk_scale, sm_scale, window,
    HAS_WINDOW: tl.constexpr, INDEXED_ROWS: tl.constexpr, DOT_PRECISION: tl.constexpr,
    # True: the row blocks that see the whole key block run in a loop without the mask, between two masked loops (the
    # edges); False: one loop masking every block, one pipeline fill instead of three (a key block of sparse queries
    # is seen by a few row blocks only). A tuning choice, see BACKWARD_DKDV_CONFIGS.
    MASK_EDGES_ONLY: tl.constexpr,
    TMA: tl.constexpr,  # q, dO and the rows' stats come as tensor descriptors (see _dkdv_steps)
    # With MASK_EDGES_ONLY False: one loop (one pipeline fill) that masks only the row blocks outside the run that sees
    # the whole key block, deciding per step with one uniform branch (the loads stay outside it and pipeline), where
    # False masks every step. A tuning choice.
    EDGE_BRANCH: tl.constexpr,
    # Each step waits for the MMA of each dot it uses right after issuing it. False: dP^T's MMA issued after dV's, one
    # wait for both before dS; True: dP^T's first (in the SASS issued among or after the softmax's exponentials, and
    # waited for alone), then dV's MMA runs while dS is computed. A tuning choice (session 9's call 3: 2% faster at the
    # sparse shape, 6% with a window).
    DP_EARLY: tl.constexpr,
    HEAD_GROUP: tl.constexpr,  # launch order, see _block_and_head
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
):
    key_block, bh = _block_and_head(HEAD_GROUP, False)  # grid (key blocks, B * Hkv), the earliest keys first
    b = bh // Hkv
    kv_h = bh % Hkv
    keys = key_block * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    in_keys = keys < Tk

    k = tl.load(k_ptr + b * stride_kb + kv_h * stride_kh + keys[:, None] * stride_kt + offs_d[None, :] * stride_kd,
                mask=in_keys[:, None] & (offs_d[None, :] < D), other=0.0)  # (BLOCK_N, BLOCK_D)
    v = tl.load(v_ptr + b * stride_vb + kv_h * stride_vh + keys[:, None] * stride_vt + offs_dv[None, :] * stride_vd,
                mask=in_keys[:, None] & (offs_dv[None, :] < Dv), other=0.0)  # (BLOCK_N, BLOCK_DV)
    dk = tl.zeros((BLOCK_N, BLOCK_D), dtype=tl.float32)
    dv = tl.zeros((BLOCK_N, BLOCK_DV), dtype=tl.float32)

    block_range = ranges_ptr + (b * tl.num_programs(0) + key_block) * 4
    first = tl.load(block_range) * BLOCK_M
    full_first = tl.load(block_range + 1) * BLOCK_M
    full_last = tl.load(block_range + 2) * BLOCK_M
    last = tl.load(block_range + 3) * BLOCK_M
    edge_start, edge_end = full_first, full_last  # the row blocks that see every key: EDGE_BRANCH skips their mask
    if not MASK_EDGES_ONLY:  # one loop, every block masked (or, with EDGE_BRANCH, the edges): the others run no step
        full_first = last
        full_last = last
    for g in range(0, group):
        h = kv_h * group + g
        if TMA:
            q_base, do_base, lse_base, stats_base, pos_base = q_ptr, do_ptr, lse_ptr, stats_ptr, pos_ptr
        else:
            q_base = q_ptr + b * stride_qb + h * stride_qh
            do_base = do_ptr + b * stride_dob + h * stride_doh
            lse_base = lse_ptr + b * stride_lb + h * stride_lh
            stats_base = stats_ptr + b * stride_sb + h * stride_sh
            pos_base = pos_ptr + b * stride_pb
        dk, dv = _dkdv_steps(dk, dv, k, v, keys, q_base, do_base, lse_base, stats_base, pos_base,
                             rows_ptr, stride_rb, stride_rs, b, h,
                             stride_qs, stride_qd, stride_dos, stride_dod, stride_ls, stride_ss, stride_ps,
                             offs_m, offs_d, offs_dv, S, D, Dv, first, full_first, edge_start, edge_end, qk_scale,
                             window, BLOCK_M, True, EDGE_BRANCH, HAS_WINDOW, INDEXED_ROWS, DOT_PRECISION, TMA,
                             DP_EARLY, BLOCK_D, BLOCK_DV)
        dk, dv = _dkdv_steps(dk, dv, k, v, keys, q_base, do_base, lse_base, stats_base, pos_base,
                             rows_ptr, stride_rb, stride_rs, b, h,
                             stride_qs, stride_qd, stride_dos, stride_dod, stride_ls, stride_ss, stride_ps,
                             offs_m, offs_d, offs_dv, S, D, Dv, full_first, full_last, edge_start, edge_end, qk_scale,
                             window, BLOCK_M, False, False, HAS_WINDOW, INDEXED_ROWS, DOT_PRECISION, TMA,
                             DP_EARLY, BLOCK_D, BLOCK_DV)
        dk, dv = _dkdv_steps(dk, dv, k, v, keys, q_base, do_base, lse_base, stats_base, pos_base,
                             rows_ptr, stride_rb, stride_rs, b, h,
                             stride_qs, stride_qd, stride_dos, stride_dod, stride_ls, stride_ss, stride_ps,
                             offs_m, offs_d, offs_dv, S, D, Dv, full_last, last, edge_start, edge_end, qk_scale,
                             window, BLOCK_M, True, False, HAS_WINDOW, INDEXED_ROWS, DOT_PRECISION, TMA,
                             DP_EARLY, BLOCK_D, BLOCK_DV)

    tl.store(dk_ptr + b * stride_dkb + kv_h * stride_dkh + keys[:, None] * stride_dkt + offs_d[None, :] * stride_dkd,
             (dk * sm_scale).to(dk_ptr.dtype.element_ty), mask=in_keys[:, None] & (offs_d[None, :] < D))
    tl.store(dv_ptr + b * stride_dvb + kv_h * stride_dvh + keys[:, None] * stride_dvt + offs_dv[None, :] * stride_dvd,
             dv.to(dv_ptr.dtype.element_ty), mask=in_keys[:, None] & (offs_dv[None, :] < Dv))


@triton.jit
def _query_block_ranges_kernel(
    pos_ptr, stride_pb, stride_ps,
    ranges_ptr,  # (B, n_n, 4) int32, contiguous
    S, window, n_m, n_n,
    HAS_WINDOW: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    ROW_BLOCKS: tl.constexpr,  # blocks of rows read per step
    KEY_BLOCKS: tl.constexpr,  # key blocks per program
):
    """query_block_ranges for KEY_BLOCKS key blocks of one sequence: a walk over its row blocks in ascending order,
    so the first run of full blocks ends at the first block after it that is not full."""
    b = tl.program_id(1)
    key_blocks = tl.program_id(0) * KEY_BLOCKS + tl.arange(0, KEY_BLOCKS)
    first_key = key_blocks * BLOCK_N
    last_key = first_key + BLOCK_N - 1
    never = 2147483647  # int32 max: the earliest position of a block without rows
    first = tl.zeros((KEY_BLOCKS,), dtype=tl.int32) + n_m
    full_first = tl.zeros((KEY_BLOCKS,), dtype=tl.int32) + n_m
    full_last = tl.zeros((KEY_BLOCKS,), dtype=tl.int32) + n_m
    last = tl.zeros((KEY_BLOCKS,), dtype=tl.int32)
    for m0 in range(0, n_m, ROW_BLOCKS):
        blocks = m0 + tl.arange(0, ROW_BLOCKS)
        rows = blocks[:, None] * BLOCK_M + tl.arange(0, BLOCK_M)[None, :]  # (ROW_BLOCKS, BLOCK_M)
        in_s = rows < S
        p = tl.load(pos_ptr + b * stride_pb + rows * stride_ps, mask=in_s, other=-1)
        latest = tl.max(p, axis=1)[:, None]  # (ROW_BLOCKS, 1)
        # every row in S counts, an invalid one (-1) included; rows past S load nothing and add nothing
        earliest = tl.min(tl.where(in_s, p, never), axis=1)[:, None]
        reach = latest >= first_key[None, :]  # (ROW_BLOCKS, KEY_BLOCKS)
        full = earliest >= last_key[None, :]
        if HAS_WINDOW:
            earliest_valid = tl.min(tl.where(p >= 0, p, never), axis=1)[:, None]
            reach = reach & (earliest_valid - last_key[None, :] < window)
            full = full & (latest - first_key[None, :] < window)
        block = blocks[:, None]
        in_m = block < n_m
        reach = reach & in_m
        full = full & in_m
        first = tl.minimum(first, tl.min(tl.where(reach, block, n_m), axis=0))
        last = tl.maximum(last, tl.max(tl.where(reach, block + 1, 0), axis=0))
        full_first = tl.minimum(full_first, tl.min(tl.where(full, block, n_m), axis=0))
        ends_run = ~full & in_m & (block > full_first[None, :])
        full_last = tl.minimum(full_last, tl.min(tl.where(ends_run, block, n_m), axis=0))
    first = tl.minimum(first, last)
    full_first = tl.minimum(full_first, last)
    full_last = tl.maximum(tl.minimum(full_last, last), full_first)
    out = ranges_ptr + (b * n_n + key_blocks) * 4
    in_n = key_blocks < n_n
    tl.store(out, first, mask=in_n)
    tl.store(out + 1, full_first, mask=in_n)
    tl.store(out + 2, full_last, mask=in_n)
    tl.store(out + 3, last, mask=in_n)


# ---------------------------------------------------------------------------------------------------------------
# Launchers
# ---------------------------------------------------------------------------------------------------------------


def shape_key(head_dim: int, value_dim: int, group: int, windowed: bool, dtype: torch.dtype) -> str:
    """The autotuners' shape bucket: head dims, query heads per kv head, window or not, and q's dtype."""
    return f"D{head_dim}-Dv{value_dim}-G{group}-{'window' if windowed else 'causal'}-{dtype_name(dtype)}"


def candidates(tuner: Autotuner, dtype: torch.dtype, head_dim: int, value_dim: int) -> list[dict]:
    """The tuner's configs whose streamed tiles fit SHARED_MEMORY_BUDGET at these head dims and dtype, in order (the
    first is the untuned default); SMALLEST_CONFIG when none does. The forward and dq kernels hold a block of rows and
    stream key blocks; the dkdv kernel holds a key block and streams blocks of rows."""
    elem = torch.empty((), dtype=dtype).element_size()
    width = triton.next_power_of_2(head_dim) + triton.next_power_of_2(value_dim)

    def staged_bytes(c):
        streamed = c["BLOCK_M"] if tuner is BACKWARD_DKDV_TUNER else c["BLOCK_N"]
        return elem * width * c["num_stages"] * streamed

    fitting = [c for c in tuner.configs if staged_bytes(c) <= SHARED_MEMORY_BUDGET]
    return fitting or [SMALLEST_CONFIG]


FORWARD_TUNER = Autotuner("packed_query_attention.forward", FORWARD_CONFIGS, INTERPRETER_CONFIG)  # default: see candidates
BACKWARD_DQ_TUNER = Autotuner("packed_query_attention.backward_dq", BACKWARD_DQ_CONFIGS, INTERPRETER_CONFIG)
BACKWARD_DKDV_TUNER = Autotuner("packed_query_attention.backward_dkdv", BACKWARD_DKDV_CONFIGS, INTERPRETER_CONFIG)


def _launch_params(cfg: dict) -> dict:
    return {"BLOCK_M": cfg["BLOCK_M"], "BLOCK_N": cfg["BLOCK_N"], "num_warps": cfg["num_warps"],
            "num_stages": cfg["num_stages"]}


def _common_constexprs(q: Tensor, v: Tensor, window: int, rows: Tensor | None) -> dict:
    return dict(HAS_WINDOW=window > 0, INDEXED_ROWS=rows is not None,
                DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
                BLOCK_D=max(16, triton.next_power_of_2(q.shape[-1])), BLOCK_DV=max(16, triton.next_power_of_2(v.shape[-1])))


def tma_ready(*tensors: Tensor) -> bool:
    """Whether Hopper's TMA unit can copy blocks of these (B, heads, rows, width) tensors (a config's "TMA" choice):
    on a GPU that has one (compute capability 9 or more; any under the interpreter), in half precision (float32
    tiles keep the pointer path), and describable (`_describable`)."""
    if not (interpreting() or all(t.is_cuda and torch.cuda.get_device_capability(t.device)[0] >= 9 for t in tensors)):
        return False
    return all(t.dtype in (torch.float16, torch.bfloat16) and _describable(t) for t in tensors)


def _describable(t: Tensor) -> bool:
    """Whether a tensor descriptor can address t: last dim contiguous, base and every other stride 16-byte aligned
    and nonzero."""
    return t.stride(-1) == 1 and t.data_ptr() % 16 == 0 and all(
        s > 0 and s * t.element_size() % 16 == 0 for s in t.stride()[:-1])


def _streamed(t: Tensor, tma: bool, block_rows: int, block_width: int) -> Tensor | TensorDescriptor:
    """What a kernel takes for a (B, heads, rows, width) tensor that it streams in blocks of block_rows rows of one
    head: with tma a tensor descriptor of the whole tensor (blocks of block_rows x block_width, the width padded to
    the kernel's power of two; the strides still follow it as arguments, unused), else the tensor."""
    if not tma:
        return t
    return TensorDescriptor(t, list(t.shape), list(t.stride()), [1, 1, block_rows, block_width])


def kernel_positions(q_positions: Tensor, valid: Tensor) -> Tensor:
    """The positions the kernels read: int32, -1 for a row that is not valid (it sees no key)."""
    return torch.where(valid, q_positions, -1).to(torch.int32)


def packed_query_attention_forward(
    q: Tensor, k: Tensor, v: Tensor, positions: Tensor, scale: float, window: int = 0, *, rows: Tensor | None = None,
    keep_float32_out: bool = False, config: dict | None = None
) -> tuple[Tensor, Tensor, Tensor | None]:
    """Run the forward kernel on kernel_positions(...) (B, S) int32. Returns out (B, H, S, Dv) in q.dtype, laid out
    as (B, S, H, Dv) (so out.transpose(1, 2).reshape(B, S, H * Dv) is a view), the base-2 log-sum-exp of every row
    (B, H, S) float32, and with keep_float32_out the output before its rounding to q.dtype, (B, H, S, Dv) float32
    (else None): what the backward's delta needs (see packed_query_attention_backward). rows (B, S) int32, a
    permutation of 0..S-1 per sequence: packed row s is row rows[b, s] of q and of every result (full-length
    tensors, selected_rows), else row s. config: {"BLOCK_M", "BLOCK_N", "num_warps", "num_stages"} to bypass the
    autotuner."""
    if q.device.type != "cuda" and not interpreting():
        raise RuntimeError(f"the Triton kernels need CUDA tensors, got {q.device} (or set TRITON_INTERPRET=1 before "
                           "importing triton)")
    B, H, S, D = q.shape
    Hkv, Tk, Dv = k.shape[1], k.shape[2], v.shape[-1]
    out = q.new_empty((B, S, H, Dv)).transpose(1, 2)
    lse = q.new_empty((B, H, S), dtype=torch.float32)
    out32 = q.new_empty((B, H, S, Dv), dtype=torch.float32) if keep_float32_out else None
    if out.numel() == 0:
        return out, lse, out32
    if Tk == 0:  # nothing to see
        return out.zero_(), lse.zero_(), None if out32 is None else out32.zero_()
    rest = (*strided(positions, 2), *strided(rows, 2), *strided(out, 4), *strided(out32, 4), *strided(lse, 3), H, S,
            Tk, D, Dv, H // Hkv, scale * math.log2(math.e), window)
    constexprs = _common_constexprs(q, v, window, rows) | {"KEEP_FLOAT32_OUT": keep_float32_out}
    keys_by_tma = tma_ready(k, v)

    def launch(cfg):
        grid = (triton.cdiv(S, cfg["BLOCK_M"]), B * H)
        tma = keys_by_tma and bool(cfg.get("TMA", 0))
        keys = (_streamed(k, tma, cfg["BLOCK_N"], constexprs["BLOCK_D"]), *k.stride(),
                _streamed(v, tma, cfg["BLOCK_N"], constexprs["BLOCK_DV"]), *v.stride())
        _forward_kernel[grid](*strided(q, 4), *keys, *rest, **constexprs, HEAD_GROUP=cfg.get("HEAD_GROUP", 1), TMA=tma,
                              EDGE_BRANCH=bool(cfg.get("EDGE_BRANCH", 0)), **_launch_params(cfg))

    key = shape_key(D, Dv, H // Hkv, window > 0, q.dtype)
    with on_device(q):
        launch(FORWARD_TUNER.known(key, config) or FORWARD_TUNER.tune(key, launch, candidates(FORWARD_TUNER, q.dtype, D, Dv)))
    return out, lse, out32


def packed_query_attention_backward(
    dout: Tensor, q: Tensor, k: Tensor, v: Tensor, positions: Tensor, out: Tensor, lse: Tensor, scale: float,
    window: int = 0, *, rows: Tensor | None = None, configs: dict | None = None
) -> tuple[Tensor, Tensor, Tensor]:
    """Run the two backward kernels: (dq, dk, dv) in the dtypes of q, k, v. out: the forward's output, best its
    float32 form (keep_float32_out): delta = rowsum(dO * O) is subtracted from dP = dO . v_j in dS = P * (dP - delta),
    two nearly equal terms where a row's softmax is peaked, so O's bf16 rounding comes back amplified (dq and dk
    4x less precise in the interpreter's test). The dq kernel computes delta from its rows of dO and O (reading O
    only where a row sees a key) and leaves it for the dkdv kernel. rows: as the forward's. configs: {"dq": config,
    "dkdv": config} to bypass the autotuners."""
    B, H, S, D = q.shape
    Hkv, Tk, Dv = k.shape[1], k.shape[2], v.shape[-1]
    configs = configs or {}
    dq, dk, dv = _projection_layout(q), _projection_layout(k), _projection_layout(v)
    if S == 0 or Tk == 0 or B * H == 0:
        return dq.zero_(), dk.zero_(), dv.zero_()
    # written by the dq kernel: each row's delta = rowsum(dO * O), and its lse and position for the dkdv kernel's TMA
    stats = q.new_empty((B, H, S, 4), dtype=torch.float32)
    qk_scale = scale * math.log2(math.e)
    per_row = (*strided(positions, 2), *strided(rows, 2))
    constexprs = _common_constexprs(q, v, window, rows)
    group = H // Hkv
    keys_by_tma = tma_ready(k, v)
    rows_by_tma = rows is None and tma_ready(q, dout)  # indexed rows are gathered, which Hopper's TMA cannot

    def launch_dq(cfg):
        grid = (triton.cdiv(S, cfg["BLOCK_M"]), B * H)
        tma = keys_by_tma and bool(cfg.get("TMA", 0))
        keys = (_streamed(k, tma, cfg["BLOCK_N"], constexprs["BLOCK_D"]), *k.stride(),
                _streamed(v, tma, cfg["BLOCK_N"], constexprs["BLOCK_DV"]), *v.stride())
        _backward_dq_kernel[grid](*strided(q, 4), *keys, *per_row, *strided(dout, 4), *strided(lse, 3),
                                  stats, *stats.stride()[:3], *strided(out, 4),
                                  *strided(dq, 4), H, S, Tk, D, Dv, group, qk_scale, scale, window, **constexprs,
                                  HEAD_GROUP=cfg.get("HEAD_GROUP", 1), TMA=tma, ROW_STATS=rows_by_tma,
                                  EDGE_BRANCH=bool(cfg.get("EDGE_BRANCH", 0)),
                                  **_launch_params(cfg))

    ranges = {}

    def launch_dkdv(cfg):
        blocks = (cfg["BLOCK_M"], cfg["BLOCK_N"])
        if blocks not in ranges:
            ranges[blocks] = query_block_ranges(positions, Tk, window, *blocks)
        grid = (triton.cdiv(Tk, cfg["BLOCK_N"]), B * Hkv)
        tma = rows_by_tma and bool(cfg.get("TMA", 0))
        _backward_dkdv_kernel[grid](_streamed(q, tma, cfg["BLOCK_M"], constexprs["BLOCK_D"]), *q.stride(),
                                    *strided(k, 4), *strided(v, 4), *per_row,
                                    _streamed(dout, tma, cfg["BLOCK_M"], constexprs["BLOCK_DV"]), *dout.stride(),
                                    *strided(lse, 3), _streamed(stats, tma, cfg["BLOCK_M"], 4), *stats.stride()[:3],
                                    *strided(dk, 4), *strided(dv, 4), ranges[blocks], Hkv, S, Tk, D, Dv, group,
                                    qk_scale, scale, window, **constexprs, **_launch_params(cfg),
                                    MASK_EDGES_ONLY=bool(cfg.get("MASK_EDGES_ONLY", 1)),  # configs pinned before: 1
                                    TMA=tma, DP_EARLY=bool(cfg.get("DP_EARLY", 0)),
                                    EDGE_BRANCH=bool(cfg.get("EDGE_BRANCH", 0)),
                                    HEAD_GROUP=cfg.get("HEAD_GROUP", 1))

    key = shape_key(D, Dv, group, window > 0, q.dtype)
    with on_device(q):
        for tuner, launch, name in ((BACKWARD_DQ_TUNER, launch_dq, "dq"), (BACKWARD_DKDV_TUNER, launch_dkdv, "dkdv")):
            launch(tuner.known(key, configs.get(name)) or tuner.tune(key, launch, candidates(tuner, q.dtype, D, Dv)))
    return dq, dk, dv


_RANGE_KEY_BLOCKS = 32  # key blocks per program of _query_block_ranges_kernel


def query_block_ranges(positions: Tensor, Tk: int, window: int, block_m: int, block_n: int) -> Tensor:
    """For each batch row and block of block_n keys, which blocks of block_m packed rows the dkdv kernel visits:
    (B, key blocks, 4) int32 [first, full_first, full_last, last]. No row outside [first, last) sees a key of the
    block; every row of [full_first, full_last) sees all of them (no mask there); the rest is masked per element.
    Exact for rows in any order (a block reaches the keys when its latest row does, and within the window when its
    earliest does); for sorted rows nothing inside is wasted. One launch (`query_block_ranges_reference` is the same
    in torch ops, some twenty launches: a tenth of a millisecond per backward on the H200)."""
    B, S = positions.shape
    n_m, n_n = triton.cdiv(S, block_m), triton.cdiv(Tk, block_n)
    ranges = torch.empty((B, n_n, 4), dtype=torch.int32, device=positions.device)
    grid = (triton.cdiv(n_n, _RANGE_KEY_BLOCKS), B)
    with on_device(positions):
        _query_block_ranges_kernel[grid](*strided(positions, 2), ranges, S, window, n_m, n_n, HAS_WINDOW=window > 0,
                                         BLOCK_M=block_m, BLOCK_N=block_n, ROW_BLOCKS=max(1, 2048 // block_m),
                                         KEY_BLOCKS=_RANGE_KEY_BLOCKS)
    return ranges


def query_block_ranges_reference(positions: Tensor, Tk: int, window: int, block_m: int, block_n: int) -> Tensor:
    """`query_block_ranges` in torch ops (the tests' ground truth)."""
    B, S = positions.shape
    n_m, n_n = triton.cdiv(S, block_m), triton.cdiv(Tk, block_n)
    padded = torch.nn.functional.pad(positions, (0, n_m * block_m - S), value=-1).view(B, n_m, block_m)
    never = torch.iinfo(torch.int32).max
    latest = padded.amax(dim=-1)[:, :, None]  # (B, n_m, 1)
    earliest_valid = torch.where(padded >= 0, padded, never).amin(dim=-1)[:, :, None]
    # every row in S, an invalid one (-1) included; rows past S load zeros and add nothing, so they do not count
    in_s = (torch.arange(n_m * block_m, device=positions.device) < S).view(1, n_m, block_m)
    earliest = torch.where(in_s, padded, never).amin(dim=-1)[:, :, None]
    first_key = torch.arange(n_n, device=positions.device) * block_n  # (n_n,)
    last_key = first_key + block_n - 1
    reach = latest >= first_key  # (B, n_m, n_n)
    full = earliest >= last_key
    if window:
        reach &= earliest_valid - last_key < window
        full &= latest - first_key < window
    block = torch.arange(n_m, device=positions.device)[None, :, None]  # (1, n_m, 1)
    last = torch.where(reach, block + 1, 0).amax(dim=1)  # (B, n_n)
    first = torch.minimum(torch.where(reach, block, n_m).amin(dim=1), last)
    full_first = torch.minimum(torch.where(full, block, n_m).amin(dim=1), last)  # the first full block, its run:
    full_last = torch.where(~full & (block > full_first[:, None]), block, n_m).amin(dim=1).clamp(max=last)
    full_last = torch.maximum(full_last, full_first)
    return torch.stack([first, full_first, full_last, last], dim=-1).to(torch.int32).contiguous()


def autotune(config: dict, params: dict[str, tuple[int, ...]], batch: int, seqlen: int, dtype: torch.dtype,
             device: torch.device | str) -> None:
    """The build-time tuning hook (`archgen build --autotune`): run the forward and both backward kernels as a
    sparse_attention op of this resolved config (heads, head_dim, the expected selected `fraction`) runs them at
    batch x seqlen, so that inside triton_support.tuning_session() each tuner tunes its shape bucket."""
    H, Hkv, D = config["n_heads"], config["n_kv_heads"], config["head_dim"]
    generator = torch.Generator(device=device).manual_seed(0)
    selected = torch.rand((batch, seqlen), generator=generator, device=device) < config.get("fraction", 1.0)
    counts = selected.sum(dim=1, keepdim=True)
    key = (~selected).long() * seqlen + torch.arange(seqlen, device=device)  # selected tokens first, in order
    index = torch.argsort(key, dim=1)[:, : max(int(counts.max()), 1)]  # (B, S)
    valid = torch.arange(index.shape[1], device=device) < counts
    positions = kernel_positions(index, valid)

    def randn(*shape):
        return torch.randn(shape, generator=generator, device=device).to(dtype)

    q, k, v = randn(batch, H, index.shape[1], D), randn(batch, Hkv, seqlen, D), randn(batch, Hkv, seqlen, D)
    scale = 1.0 / math.sqrt(D)
    window = int(config.get("window") or 0)
    out, lse, out32 = packed_query_attention_forward(q, k, v, positions, scale, window, keep_float32_out=True)
    packed_query_attention_backward(torch.randn_like(out), q, k, v, positions, out32, lse, scale, window)


def tuned_configs() -> dict:
    """The choices so far, {"forward"|"backward_dq"|"backward_dkdv": {key: config}}; `pin_configs` takes it back."""
    return {name: {key: dict(c) for key, c in tuner.chosen.items()} for name, tuner in _TUNERS.items()}


def tuning_times() -> dict:
    """What tuning measured so far, {"forward"|"backward_dq"|"backward_dkdv": {key: {config: ms or its error}}}: the
    time of each kernel alone under every candidate config (the benches' per-kernel breakdown)."""
    return {name: {key: dict(times) for key, times in tuner.timings.items()} for name, tuner in _TUNERS.items()}


def pin_configs(choices: dict) -> None:
    """Pin {"forward"|"backward_dq"|"backward_dkdv": {key: config}} (what `tuned_configs` returns): never timed."""
    for name, tuner in _TUNERS.items():
        tuner.pin(choices.get(name, {}))


_TUNERS = {"forward": FORWARD_TUNER, "backward_dq": BACKWARD_DQ_TUNER, "backward_dkdv": BACKWARD_DKDV_TUNER}


# ---------------------------------------------------------------------------------------------------------------
# Custom ops: one graph node each for torch.compile / torch.export, with autograd
# ---------------------------------------------------------------------------------------------------------------


OP_NAMESPACE = "archgen_v2"
"""v2: the forward takes keep_float32_out and returns the float32 output beside (out, lse), for the backward."""


def _forward_impl(q: Tensor, k: Tensor, v: Tensor, q_positions: Tensor, valid: Tensor, scale: float, window: int,
                  keep_float32_out: bool) -> tuple[Tensor, Tensor, Tensor]:
    """archgen_v2::packed_query_attention -> (out, lse, out32): the forward kernel as an operator; out32 is the
    output in float32 with keep_float32_out (a backward will follow), else empty. CPU tensors take the reference (see
    `triton_on_cpu`), whose log-sum-exp is computed alike: an exported program runs anywhere."""
    if not (q.is_cuda or triton_on_cpu()):
        out, lse, out32 = _reference_with_lse(q, k, v, q_positions, valid, scale, window)
    else:
        out, lse, out32 = packed_query_attention_forward(q, k, v, kernel_positions(q_positions, valid), scale, window,
                                                         keep_float32_out=keep_float32_out)
    return out, lse, out32 if keep_float32_out else q.new_empty((0,), dtype=torch.float32)


def _forward_fake(q, k, v, q_positions, valid, scale, window, keep_float32_out):
    B, H, S, _ = q.shape
    Dv = v.shape[-1]
    out32 = q.new_empty((B, H, S, Dv) if keep_float32_out else (0,), dtype=torch.float32)
    return q.new_empty((B, S, H, Dv)).transpose(1, 2), q.new_empty((B, H, S), dtype=torch.float32), out32


def _backward_impl(dout: Tensor, q: Tensor, k: Tensor, v: Tensor, q_positions: Tensor, valid: Tensor, out: Tensor,
                   lse: Tensor, scale: float, window: int) -> tuple[Tensor, Tensor, Tensor]:
    """archgen_v2::packed_query_attention_backward -> (dq, dk, dv); out: the forward's float32 output if it kept
    one, else its output."""
    if not (q.is_cuda or triton_on_cpu()):
        raise RuntimeError("archgen_v2::packed_query_attention has no backward for CPU tensors: train on a GPU, or "
                           "with the reference op (ops/routing.py)")
    return packed_query_attention_backward(dout, q, k, v, kernel_positions(q_positions, valid), out, lse, scale,
                                           window)


def _backward_fake(dout, q, k, v, q_positions, valid, out, lse, scale, window):
    return _projection_layout(q), _projection_layout(k), _projection_layout(v)


def _projection_layout(t: Tensor) -> Tensor:
    """An empty (B, heads, rows, width) tensor like t, laid out as a projection's output: (B, rows, heads, width) in
    memory, transposed, as the forward's output is. The backward's dq, dk and dv lie so, and the view-and-transpose
    that made q, k and v from their projections passes them on without a copy."""
    B, H, S, D = t.shape
    return t.new_empty((B, S, H, D)).transpose(1, 2)


def _setup_context(ctx, inputs, output):
    q, k, v, q_positions, valid, scale, window, keep_float32_out = inputs
    out, lse, out32 = output
    ctx.save_for_backward(q, k, v, q_positions, valid, out32 if keep_float32_out else out, lse)
    ctx.scale, ctx.window = scale, window
    ctx.mark_non_differentiable(lse, out32)
    ctx.set_materialize_grads(False)  # else autograd zero-fills a gradient of out32's size for the backward to ignore
    ctx.backward = packed_query_attention_backward_op


def _backward(ctx, dout, _dlse, _dout32):
    q, k, v, q_positions, valid, out, lse = ctx.saved_tensors
    dq, dk, dv = ctx.backward(dout, q, k, v, q_positions, valid, out, lse, ctx.scale, ctx.window)
    return dq, dk, dv, None, None, None, None, None


packed_query_attention_backward_op = register_op("packed_query_attention_backward", _backward_impl, _backward_fake,
                                                 namespace=OP_NAMESPACE)
packed_query_attention_op = register_op("packed_query_attention", _forward_impl, _forward_fake, backward=_backward,
                                        setup_context=_setup_context, namespace=OP_NAMESPACE)


def selected_rows(selected: Tensor) -> tuple[Tensor, Tensor]:
    """How the kernels walk full-length tensors for sparse_query_attention: (rows, positions), each (B, T) int32.
    rows: the selected tokens of each sequence in order, then the others (pack_selected's order, not cut to the
    largest count, so nothing is read back to the host); positions: the token for a selected row (the keys are the
    queries' own tokens), -1 for the others, which see nothing and are written zeros by the same launch."""
    B, T = selected.shape
    tokens = torch.arange(T, device=selected.device, dtype=torch.int32)
    rows = torch.argsort((~selected).to(torch.int32) * T + tokens, dim=1).to(torch.int32)  # unique keys: stable
    positions = torch.where(tokens < selected.sum(dim=1, keepdim=True), rows, -1).to(torch.int32)
    return rows, positions


def _sparse_forward_impl(q: Tensor, k: Tensor, v: Tensor, selected: Tensor, scale: float, window: int,
                         keep_float32_out: bool) -> tuple[Tensor, Tensor, Tensor]:
    """archgen_v2::sparse_query_attention -> (out, lse, out32), all in token order (full length)."""
    if not (q.is_cuda or triton_on_cpu()):
        positions = torch.arange(q.shape[2], device=q.device).expand(selected.shape)
        out, lse, out32 = _reference_with_lse(q, k, v, positions, selected, scale, window)
    else:
        rows, positions = selected_rows(selected)
        out, lse, out32 = packed_query_attention_forward(q, k, v, positions, scale, window, rows=rows,
                                                         keep_float32_out=keep_float32_out)
    return out, lse, out32 if keep_float32_out else q.new_empty((0,), dtype=torch.float32)


def _sparse_forward_fake(q, k, v, selected, scale, window, keep_float32_out):
    return _forward_fake(q, k, v, None, None, scale, window, keep_float32_out)


def _sparse_backward_impl(dout: Tensor, q: Tensor, k: Tensor, v: Tensor, selected: Tensor, out: Tensor, lse: Tensor,
                          scale: float, window: int) -> tuple[Tensor, Tensor, Tensor]:
    """archgen_v2::sparse_query_attention_backward -> (dq, dk, dv); dq is zero on the rows not selected."""
    if not (q.is_cuda or triton_on_cpu()):
        raise RuntimeError("archgen_v2::sparse_query_attention has no backward for CPU tensors: train on a GPU, or "
                           "with the reference op (ops/routing.py sparse_query_attention)")
    rows, positions = selected_rows(selected)
    return packed_query_attention_backward(dout, q, k, v, positions, out, lse, scale, window, rows=rows)


def _sparse_backward_fake(dout, q, k, v, selected, out, lse, scale, window):
    return _backward_fake(dout, q, k, v, None, None, out, lse, scale, window)


def _sparse_setup_context(ctx, inputs, output):
    q, k, v, selected, scale, window, keep_float32_out = inputs
    out, lse, out32 = output
    ctx.save_for_backward(q, k, v, selected, out32 if keep_float32_out else out, lse)
    ctx.scale, ctx.window = scale, window
    ctx.mark_non_differentiable(lse, out32)
    ctx.set_materialize_grads(False)
    ctx.backward = sparse_query_attention_backward_op


def _sparse_backward(ctx, dout, _dlse, _dout32):
    q, k, v, selected, out, lse = ctx.saved_tensors
    dq, dk, dv = ctx.backward(dout, q, k, v, selected, out, lse, ctx.scale, ctx.window)
    return dq, dk, dv, None, None, None, None


sparse_query_attention_backward_op = register_op("sparse_query_attention_backward", _sparse_backward_impl,
                                                 _sparse_backward_fake, namespace=OP_NAMESPACE)
sparse_query_attention_op = register_op("sparse_query_attention", _sparse_forward_impl, _sparse_forward_fake,
                                        backward=_sparse_backward, setup_context=_sparse_setup_context,
                                        namespace=OP_NAMESPACE)


def _every_position(q: Tensor) -> Tensor:
    """(B, T) int32: every token of q a query at its own position (sliding_window_attention)."""
    B, _, T, _ = q.shape
    return torch.arange(T, device=q.device, dtype=torch.int32).expand(B, T)


def _window_forward_impl(q: Tensor, k: Tensor, v: Tensor, window: int, scale: float, keep_float32_out: bool
                         ) -> tuple[Tensor, Tensor, Tensor]:
    """archgen_v2::sliding_window_attention -> (out, lse, out32), as packed_query_attention's."""
    positions = _every_position(q)
    if not (q.is_cuda or triton_on_cpu()):
        every = torch.ones(positions.shape, dtype=torch.bool, device=q.device)
        out, lse, out32 = _reference_with_lse(q, k, v, positions, every, scale, window)
    else:
        out, lse, out32 = packed_query_attention_forward(q, k, v, positions, scale, window,
                                                         keep_float32_out=keep_float32_out)
    return out, lse, out32 if keep_float32_out else q.new_empty((0,), dtype=torch.float32)


def _window_forward_fake(q, k, v, window, scale, keep_float32_out):
    return _forward_fake(q, k, v, None, None, scale, window, keep_float32_out)


def _window_backward_impl(dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, window: int,
                          scale: float) -> tuple[Tensor, Tensor, Tensor]:
    """archgen_v2::sliding_window_attention_backward -> (dq, dk, dv)."""
    if not (q.is_cuda or triton_on_cpu()):
        raise RuntimeError("archgen_v2::sliding_window_attention has no backward for CPU tensors: train on a GPU, or "
                           "with the reference op (ops/attention.py sliding_window_attention)")
    return packed_query_attention_backward(dout, q, k, v, _every_position(q), out, lse, scale, window)


def _window_backward_fake(dout, q, k, v, out, lse, window, scale):
    return _backward_fake(dout, q, k, v, None, None, out, lse, scale, window)


def _window_setup_context(ctx, inputs, output):
    q, k, v, window, scale, keep_float32_out = inputs
    out, lse, out32 = output
    ctx.save_for_backward(q, k, v, out32 if keep_float32_out else out, lse)
    ctx.window, ctx.scale = window, scale
    ctx.mark_non_differentiable(lse, out32)
    ctx.set_materialize_grads(False)
    ctx.backward = sliding_window_attention_backward_op


def _window_backward(ctx, dout, _dlse, _dout32):
    q, k, v, out, lse = ctx.saved_tensors
    dq, dk, dv = ctx.backward(dout, q, k, v, out, lse, ctx.window, ctx.scale)
    return dq, dk, dv, None, None, None


sliding_window_attention_backward_op = register_op("sliding_window_attention_backward", _window_backward_impl,
                                                   _window_backward_fake, namespace=OP_NAMESPACE)
sliding_window_attention_op = register_op("sliding_window_attention", _window_forward_impl, _window_forward_fake,
                                          backward=_window_backward, setup_context=_window_setup_context,
                                          namespace=OP_NAMESPACE)


class _EagerPackedQueryAttention(torch.autograd.Function):
    """archgen_v2::packed_query_attention's implementation and autograd without the custom op's dispatch, for eager
    mode (triton_support.calls_implementation_directly; torch.compile and torch.export take the custom ops, one graph
    node each). The dispatch is host time on every forward and backward: on the H200 the packed op's forward + backward
    took 1.599 ms where its kernels summed 1.542 (GPU call 2 of session 7)."""

    @staticmethod
    def forward(ctx, q, k, v, q_positions, valid, scale, window, keep_float32_out):
        inputs = (q, k, v, q_positions, valid, scale, window, keep_float32_out)
        output = _forward_impl(*inputs)
        _setup_context(ctx, inputs, output)
        ctx.backward = _backward_impl
        return output

    backward = staticmethod(_backward)


class _EagerSparseQueryAttention(torch.autograd.Function):
    """archgen_v2::sparse_query_attention without the custom op's dispatch (see _EagerPackedQueryAttention)."""

    @staticmethod
    def forward(ctx, q, k, v, selected, scale, window, keep_float32_out):
        inputs = (q, k, v, selected, scale, window, keep_float32_out)
        output = _sparse_forward_impl(*inputs)
        _sparse_setup_context(ctx, inputs, output)
        ctx.backward = _sparse_backward_impl
        return output

    backward = staticmethod(_sparse_backward)


class _EagerSlidingWindowAttention(torch.autograd.Function):
    """archgen_v2::sliding_window_attention without the custom op's dispatch (see _EagerPackedQueryAttention)."""

    @staticmethod
    def forward(ctx, q, k, v, window, scale, keep_float32_out):
        inputs = (q, k, v, window, scale, keep_float32_out)
        output = _window_forward_impl(*inputs)
        _window_setup_context(ctx, inputs, output)
        ctx.backward = _window_backward_impl
        return output

    backward = staticmethod(_window_backward)


# ---------------------------------------------------------------------------------------------------------------
# Entry point and reference
# ---------------------------------------------------------------------------------------------------------------


def packed_query_attention(
    q: Tensor, k: Tensor, v: Tensor, q_positions: Tensor, valid: Tensor, *, scale: float | None = None,
    window: int | None = None
) -> Tensor:
    """Causal attention of packed queries at positions q_positions against keys at positions 0 .. Tk-1, in Triton:
    (B, H, S, Dv) in q's dtype, zeros for rows that are not valid. Same arguments and result as
    templates/runtime/routing.py's `packed_query_attention` (ops/routing.py in a generated package), plus `window`
    (keys older than `window` positions are invisible too). Differentiable in q, k and v. Needs CUDA tensors (or
    TRITON_INTERPRET=1): on anything else it raises, and the caller runs the reference."""
    exporting = torch.compiler.is_exporting()  # tracing: the op becomes one node of the exported graph
    if not (q.is_cuda or triton_on_cpu() or exporting):
        raise RuntimeError(
            f"the Triton packed_query_attention kernel needs CUDA tensors, got q on {q.device}: call the reference "
            "(ops/routing.py packed_query_attention) instead, or set TRITON_INTERPRET=1 before importing triton to "
            "run the kernel in Triton's CPU interpreter (slow; for tests)")
    _check_inputs(q, k, v, q_positions, valid, window)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    backward_follows = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v))
    op = _EagerPackedQueryAttention.apply if calls_implementation_directly(q) else packed_query_attention_op
    out, _, _ = op(q, k, v, q_positions, valid, scale, int(window or 0), backward_follows)
    return out


def sparse_query_attention(
    q: Tensor, k: Tensor, v: Tensor, selected: Tensor, *, scale: float | None = None, window: int | None = None
) -> Tensor:
    """Causal self-attention of the selected tokens' queries over full-length tensors, in Triton: (B, H, T, Dv) in
    q's dtype, zeros for the tokens not selected. q (B, H, T, D); k (B, Hkv, T, D) and v (B, Hkv, T, Dv), the keys of
    the same tokens; selected (B, T) bool. What templates/runtime/routing.py's `sparse_query_attention` computes when
    its q_positions is its k_positions (a 1-D arange), without its pack, gather and scatter: the kernels read the
    selected rows of q (and of dO) by index and write every row of the result in place (selected_rows), and nothing
    is read back to the host. Differentiable in q, k and v; dq is zero where a token is not selected."""
    exporting = torch.compiler.is_exporting()
    if not (q.is_cuda or triton_on_cpu() or exporting):
        raise RuntimeError(f"the Triton sparse_query_attention kernel needs CUDA tensors, got q on {q.device}: call "
                           "the reference (ops/routing.py sparse_query_attention) instead, or set TRITON_INTERPRET=1")
    B, _, T, _ = q.shape
    if selected.dtype != torch.bool or tuple(selected.shape) != (B, T):
        raise ValueError(f"selected must be (B, T) = ({B}, {T}) bool, got {tuple(selected.shape)} {selected.dtype}")
    if k.dim() == 4 and k.shape[2] != T:
        raise ValueError(f"the keys are the queries' own tokens: k and v need T = {T} rows, got {k.shape[2]}")
    _check_tensors(q, k, v, window)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    backward_follows = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v))
    op = _EagerSparseQueryAttention.apply if calls_implementation_directly(q) else sparse_query_attention_op
    out, _, _ = op(q, k, v, selected, scale, int(window or 0), backward_follows)
    return out


def sliding_window_attention(q: Tensor, k: Tensor, v: Tensor, window: int, *, scale: float | None = None) -> Tensor:
    """Causal self-attention within a sliding window, in Triton: query i sees keys i-window+1 .. i, the keys being
    the queries' own tokens. Same arguments and result as templates/runtime/attention.py's `sliding_window_attention`
    (ops/attention.py in a generated package): the packed-query kernels with every token a query at its own
    position, so forward and backward read only the key blocks inside the band (and skip the mask inside it).
    q (B, H, T, D), k (B, Hkv, T, D), v (B, Hkv, T, Dv) -> (B, H, T, Dv) in q's dtype. Differentiable in q, k, v."""
    exporting = torch.compiler.is_exporting()
    if not (q.is_cuda or triton_on_cpu() or exporting):
        raise RuntimeError(f"the Triton sliding_window_attention kernel needs CUDA tensors, got q on {q.device}: call "
                           "the reference (ops/attention.py sliding_window_attention) instead, or set "
                           "TRITON_INTERPRET=1")
    _check_tensors(q, k, v, window)
    if k.shape[2] != q.shape[2]:
        raise ValueError(f"the keys are the queries' own tokens: k and v need T = {q.shape[2]} rows, got {k.shape[2]}")
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    backward_follows = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v))
    op = _EagerSlidingWindowAttention.apply if calls_implementation_directly(q) else sliding_window_attention_op
    out, _, _ = op(q, k, v, int(window), scale, backward_follows)
    return out


def packed_query_attention_reference(
    q: Tensor, k: Tensor, v: Tensor, q_positions: Tensor, valid: Tensor, *, scale: float | None = None,
    window: int | None = None
) -> Tensor:
    """The formula with a dense (S, Tk) mask, in float32 (float64 for float64 inputs): the tests' ground truth.
    Same signature and result as `packed_query_attention`."""
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    return _reference_with_lse(q, k, v, q_positions, valid, scale, int(window or 0))[0]


def _reference_with_lse(q, k, v, q_positions, valid, scale: float, window: int) -> tuple[Tensor, Tensor, Tensor]:
    """(out in q.dtype, base-2 log-sum-exp float32, 0 for rows that see nothing, out in float32), as the forward
    kernel's."""
    B, H, S, _ = q.shape
    Hkv, Tk = k.shape[1], k.shape[2]
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    kk = k.to(acc).repeat_interleave(H // Hkv, dim=1)  # (B, H, Tk, D)
    vv = v.to(acc).repeat_interleave(H // Hkv, dim=1)  # (B, H, Tk, Dv)
    scores = torch.einsum("bhsd,bhtd->bhst", q.to(acc), kk) * scale  # (B, H, S, Tk)
    keys = torch.arange(Tk, device=q.device)
    p = q_positions[:, None, :, None]  # (B, 1, S, 1)
    visible = (keys <= p) & valid[:, None, :, None]  # (B, 1, S, Tk)
    if window:
        visible = visible & (p - keys < window)
    sees_any = visible.any(dim=-1)  # (B, 1, S)
    scores = scores.masked_fill(~visible, float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)  # (B, H, S), -inf where nothing is seen
    probs = torch.exp(scores - torch.where(sees_any, lse, 0.0)[..., None])  # exp(-inf) = 0 where not visible
    out = torch.einsum("bhst,bhtd->bhsd", probs, vv)  # (B, H, S, Dv)
    lse2 = torch.where(sees_any, lse * math.log2(math.e), 0.0).float()
    layout = q.new_empty((B, S, H, v.shape[-1])).transpose(1, 2)  # the kernel's output layout
    return layout.copy_(out.to(q.dtype)), lse2, out.float()


def decomposition(reference, max_seqlen: int) -> dict:
    """{the custom op `reference` is the reference of: that op written with it}, for exporters that cannot run
    Triton (ONNX). This file holds several ops, and a generated package calls this once per op it uses, with the
    ops/ function of the op's name: ops/routing.py's `packed_query_attention` (no window; the models that call this
    op never pass one) or ops/attention.py's `sliding_window_attention`. max_seqlen is unused: the references trace
    any length. The log-sum-exp and the float32 output serve the backward only."""
    del max_seqlen

    def backward_outputs(q, out, keep_float32_out):
        B, H, S, _ = q.shape
        out32 = out.float() if keep_float32_out else q.new_empty((0,), dtype=torch.float32)
        return q.new_zeros((B, H, S), dtype=torch.float32), out32

    def packed_query_attention_decomposed(q, k, v, q_positions, valid, scale, window, keep_float32_out):
        if window:
            raise NotImplementedError("the ONNX lowering of archgen_v2::packed_query_attention takes no window")
        out = reference(q, k, v, q_positions, valid, scale=scale)
        return out, *backward_outputs(q, out, keep_float32_out)

    def sliding_window_attention_decomposed(q, k, v, window, scale, keep_float32_out):
        out = reference(q, k, v, window, scale=scale)
        return out, *backward_outputs(q, out, keep_float32_out)

    lowerings = {"packed_query_attention": packed_query_attention_decomposed,
                 "sliding_window_attention": sliding_window_attention_decomposed}
    if reference.__name__ not in lowerings:
        raise ValueError(f"packed_query_attention.py has no op whose reference is {reference.__name__!r}; it lowers "
                         f"{', '.join(lowerings)}")
    return {op_overload(reference.__name__, OP_NAMESPACE): lowerings[reference.__name__]}


def _check_inputs(q, k, v, q_positions, valid, window) -> None:
    """Shapes, dtypes and devices, each error naming what was expected and what came."""
    _check_tensors(q, k, v, window)
    B, _, S, _ = q.shape
    if tuple(q_positions.shape) != (B, S) or tuple(valid.shape) != (B, S):
        raise ValueError(f"q_positions and valid must be (B, S) = ({B}, {S}), got {tuple(q_positions.shape)} and "
                         f"{tuple(valid.shape)}")
    if q_positions.is_floating_point() or valid.dtype != torch.bool:
        raise TypeError(f"q_positions must be integer and valid bool, got {q_positions.dtype} and {valid.dtype}")
    if any(t.device != q.device for t in (q_positions, valid)):
        raise ValueError("q, k, v, q_positions and valid must be on one device")


def _check_tensors(q, k, v, window) -> None:
    """q, k and v: shapes, dtypes and devices; and the window."""
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(f"q, k, v must be (B, H, S, D), (B, Hkv, Tk, D), (B, Hkv, Tk, Dv); got {tuple(q.shape)}, "
                         f"{tuple(k.shape)}, {tuple(v.shape)}")
    B, H, S, D = q.shape
    Hkv = k.shape[1]
    if k.shape[0] != B or k.shape[3] != D or v.shape[:3] != k.shape[:3]:
        raise ValueError(f"k must be (B, Hkv, Tk, D) = (B={B}, Hkv, Tk, D={D}) and v (B, Hkv, Tk, Dv) like it; got k "
                         f"{tuple(k.shape)}, v {tuple(v.shape)}")
    if Hkv == 0 or H % Hkv != 0:
        raise ValueError(f"n_heads ({H}) must be a multiple of n_kv_heads ({Hkv}) for grouped-query attention")
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.dtype not in SUPPORTED_DTYPES:
            raise TypeError(f"{name} is {t.dtype}; the kernel takes {', '.join(map(str, SUPPORTED_DTYPES))}: use "
                            "packed_query_attention_reference for float64")
    if k.dtype != q.dtype or v.dtype != q.dtype:
        raise TypeError(f"q, k and v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if any(t.device != q.device for t in (k, v)):
        raise ValueError("q, k and v must be on one device")
    if D > 256 or v.shape[-1] > 256:
        raise ValueError(f"head dims up to 256 fit the kernel's register tiles, got D={D}, Dv={v.shape[-1]}")
    if window is not None and window < 1:
        raise ValueError(f"window must be at least 1 (the query itself), or None for none; got {window}")
