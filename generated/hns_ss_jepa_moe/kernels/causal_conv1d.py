"""Depthwise causal conv1d (+ SiLU) as Triton kernels: forward, backward, the one-step update, the ops, the reference.

For every batch b, time t and channel d, with K taps and x̃ = concat(conv_state, x) along time::

    y[b, t, d] = act(bias[d] + Σ_{k<K} weight[d, k] · x̃[b, t + k, d])        act = SiLU or the identity

so weight[:, -1] multiplies the current input, as in templates/runtime/ssm.py's `causal_conv1d` (ops/ssm.py of a
generated package), which this file's reference wraps. Shapes are channels-last: x (B, T, D), possibly strided (the
Mamba blocks hand over a slice of their input projection), weight (D, K), bias (D,), conv_state and the new state
(B, D, K-1) (the last K-1 inputs, oldest first). y and the new state come back in x's dtype; sums run in float32.

Why a kernel: the reference is a Python loop over the K taps, each a full (B, T, D) multiply-add in float32. Here one
pass reads x once from memory (the K shifted tiles of one program overlap and hit the cache) and writes y once: the
op is memory-bound, its floor the bytes of x and y at the copy rate.

The forward's grid is (batch, blocks of BLOCK_T steps, blocks of BLOCK_D channels); the program holding the last
step also writes the new state. For widths up to 4 (WINDOW_WIDTH) a program walks its steps with a sliding window:
four input rows loaded a step, the three before them carried in registers, every value a (BLOCK_D,) vector. Its
backward is one pass of the same walk: it recomputes the pre-activation, forms dL/d pre-activation, and writes dx three
steps behind (input s feeds outputs s..s+3), so it reads x and dy once and writes dx once; d weight and d bias are
summed per time block in registers, and the blocks' sums added up by a small kernel (deterministic). Wider kernels
take tiles: K shifted loads per tile or a gathering variant in the forward, and two backward passes with the SiLU
(dL/d pre-activation written, then summed over the taps). A decoding step is the same forward at T = 1 (`causal_conv1d_update`).

A decoding step that writes its new state where the old one lies (`causal_conv1d_update_`, a generated Mamba-1 layer's
step: no copy into the cache afterwards) has a kernel of its own, `_conv_step_in_place_kernel`, for widths 2 to 4.

Contents: `causal_conv1d` (the entry point, differentiable), `causal_conv1d_update` (one decoding step),
`causal_conv1d_update_` (one step, the state updated in place), the custom ops `archgen_v1::causal_conv1d`,
`archgen_v1::causal_conv1d_backward` (fake implementations, autograd) and `archgen_v1::causal_conv1d_update_`
(mutates conv_state), the launchers `causal_conv1d_forward` / `causal_conv1d_backward` / `causal_conv1d_step_in_place`
with their autotune spaces, `causal_conv1d_reference` (the same signature over ops/ssm.py's loop) and `decomposition`
(for ONNX). Needs triton and triton_support.py next to it.
"""

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from torch import Tensor

from .triton_support import (
    Autotuner,
    calls_implementation_directly,
    dtype_name,
    gdc_launch_dependents,
    interpreting,
    on_device,
    op_overload,
    programmatic_launch,
    register_op,
    sigmoid,
    strided,
    triton_on_cpu,
)

SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
ACTIVATIONS = (None, "silu")

# Configs that compile for sm_90 without register spills (triton.compile for GPUTarget("cuda", 90, 32), cuobjdump
# -res-usage): the forward keeps K + 1 tiles of BLOCK_T · BLOCK_D / (32 · num_warps) values per thread.
# (BLOCK_T 32 × BLOCK_D 256 and 64 × 128 at 8 warps were the slowest forward and SiLU-backward configs at
# (8, 4096, 4096) bf16 on the H200, 0.65-0.74 ms against 0.47-0.55: dropped.)
FORWARD_CONFIGS = [
    {"BLOCK_T": 32, "BLOCK_D": 128, "num_warps": 4},
    {"BLOCK_T": 16, "BLOCK_D": 256, "num_warps": 4},
    {"BLOCK_T": 16, "BLOCK_D": 128, "num_warps": 4},
    # Narrow channel blocks, many threads: more loads in flight per register (flash-linear-attention's conv tunes
    # BLOCK_D 16-128 with 4-32 warps at 64 steps).
    {"BLOCK_T": 64, "BLOCK_D": 64, "num_warps": 8},
    {"BLOCK_T": 64, "BLOCK_D": 32, "num_warps": 4},
]
# The K shifted loads of a tile come from L1/L2, not memory, but still move K times the tile's bytes: at (8, 4096, 4096)
# bf16 the forward ran at 0.6 of the copy rate. The gathering variant loads each input once (one tile, overlapping
# the next by K-1 rows) and forms the taps with tl.gather, shuffles in registers; the tuner chooses between them.
GATHERING_TILE = {"BLOCK_T": 32, "BLOCK_D": 128, "num_warps": 4, "GATHER": True}
"""The fastest forward of session 5 on the H200 (0.51 of the copy rate at (8, 4096, 4096) bf16)."""
FORWARD_CONFIGS += [
    GATHERING_TILE,
    {"BLOCK_T": 64, "BLOCK_D": 128, "num_warps": 4, "GATHER": True},
    {"BLOCK_T": 64, "BLOCK_D": 256, "num_warps": 8, "GATHER": True},
]
# Widths up to 4 (Mamba's d_conv, Gated DeltaNet's short convolutions): a program walks BLOCK_T steps of BLOCK_D
# channels, four rows a step, and carries the last three inputs in registers, so each input is loaded from memory once
# and no tap crosses threads (the tiles above load K shifted tiles; the gathering ones move rows between threads).
# 8 channels a thread is one 16-byte load of bf16 a row. sm_90 (triton 3.6): 96 registers at 8 channels a thread,
# 48-64 at 4, no spills.
WINDOW_WIDTH = 4
FORWARD_CONFIGS += [
    # at (8, 4096, 4096) bf16 on the H200: 64 × 128 at 1 warp 0.153 ms, 0.82 of the copy rate; 256-1024 channels
    # 0.18-0.19 ms (GPU call 2 of session 6): narrower blocks, more programs
    {"BLOCK_T": 64, "BLOCK_D": 128, "num_warps": 1, "WINDOW": True},
    {"BLOCK_T": 64, "BLOCK_D": 128, "num_warps": 1, "WINDOW": True, "PREFETCH": True},
    {"BLOCK_T": 64, "BLOCK_D": 64, "num_warps": 1, "WINDOW": True},
    {"BLOCK_T": 32, "BLOCK_D": 128, "num_warps": 1, "WINDOW": True},
    {"BLOCK_T": 128, "BLOCK_D": 128, "num_warps": 1, "WINDOW": True, "PREFETCH": True},
]
SILU_BACKWARD_CONFIGS = [c for c in FORWARD_CONFIGS if not (c.get("GATHER") or c.get("WINDOW"))]
BACKWARD_CONFIGS = [
    # The tap sums of dL/d pre-activation: K + 2 tiles live, as in the forward.
    {"BLOCK_T": 32, "BLOCK_D": 128, "num_warps": 4},
    {"BLOCK_T": 16, "BLOCK_D": 256, "num_warps": 4},
    {"BLOCK_T": 32, "BLOCK_D": 256, "num_warps": 8},
    {"BLOCK_T": 64, "BLOCK_D": 128, "num_warps": 8},
    {"BLOCK_T": 64, "BLOCK_D": 64, "num_warps": 8},
    {"BLOCK_T": 64, "BLOCK_D": 32, "num_warps": 4},
]
# The one-pass backward for widths up to 4 keeps twice the forward's vectors live (inputs, dL/d pre-activation, the
# tap sums): 4 channels a thread and fewer, 64-128 registers on sm_90 without spills.
WINDOW_BACKWARD_CONFIGS = [
    # At (8, 4096, 4096) bf16 on the H200, with every step masked: 128 × 64 with prefetch 0.250 ms (64 registers),
    # 64 × 128 0.257, 64 × 64 0.270-0.284, 32 × 64 0.321, 64 × 32 0.457 (GPU call 4 of session 7). Unmasked inner
    # steps (sm_90, triton 3.6): 128 × 64 233 SASS instructions a step (318 before) at 64 registers, 260 at 72 with
    # prefetch (253 capped at 64, no spills); 64 × 128 423-453 (536 before) at 128. Two steps an iteration (229 a
    # step, but 80-104 registers) ran slower on the H200: 0.262-0.293 ms (GPU call 2 of session 8). Unmasked single
    # steps (call 3): 128 × 64 0.250 ms, with prefetch 0.258 (0.255 capped at 64 registers, which costs float32 x its
    # spills: 0.57 against 0.43), 256 × 64 capped 0.245, 64 × 128 0.262. Longer blocks write and re-read fewer
    # d weight / d bias partials (21 MB of float32 each way at 128 steps here, 5% of the bytes the backward must
    # move) and re-read fewer rows at their edges. Session 9, call 2: 256 × 64 0.241 ms with the block sum, 512 ×
    # 64 0.242 (one wave of programs), 128 × 64 0.250; with prefetch (capped) 0.245-0.258: dropped.
    {"BLOCK_T": 128, "BLOCK_D": 64, "num_warps": 1, "PREFETCH": True},  # the fastest with a state
    {"BLOCK_T": 256, "BLOCK_D": 64, "num_warps": 1},
    {"BLOCK_T": 512, "BLOCK_D": 64, "num_warps": 1},
    # A segment's first rows kept in L2 (evict_last) for its predecessor, which reads them again at its end; every
    # other row evict_first. 7 rows of x and 4 of dy a segment, 1.4% of the bytes at 256 steps.
    {"BLOCK_T": 256, "BLOCK_D": 64, "num_warps": 1, "KEEP_EDGES": True},
    # Two warps side by side along the channels: 256 contiguous bytes of a row a program, 64 registers either way.
    {"BLOCK_T": 256, "BLOCK_D": 128, "num_warps": 2},
    # Four segments a program, a warp each, their sums added in the program: a quarter of the partials (2.6 MB each
    # way at 256 steps, against 10.5 MB). Capped at 64 registers (72 uncapped): no spills in bf16 without a state,
    # 235 instructions a step (sm_90, triton 3.6); float32 or a state spill.
    {"BLOCK_T": 256, "BLOCK_D": 64, "num_warps": 4, "SEGMENTS": 4, "maxnreg": 64},
    {"BLOCK_T": 256, "BLOCK_D": 64, "num_warps": 4, "SEGMENTS": 4, "maxnreg": 64, "KEEP_EDGES": True},
    {"BLOCK_T": 128, "BLOCK_D": 64, "num_warps": 4, "SEGMENTS": 4, "maxnreg": 64, "KEEP_EDGES": True},
    # The grid's first axis the channel blocks (else the batch): the programs reading one row's channels are launched
    # together, so its 8 KB (bf16, 4096 channels) are read at about the same time, not half of them in each wave.
    {"BLOCK_T": 256, "BLOCK_D": 64, "num_warps": 1, "CHANNELS_FASTEST": True},
    {"BLOCK_T": 256, "BLOCK_D": 64, "num_warps": 4, "SEGMENTS": 4, "maxnreg": 64, "KEEP_EDGES": True,
     "CHANNELS_FASTEST": True},
]
INTERPRETER_CONFIG = {"BLOCK_T": 8, "BLOCK_D": 16, "num_warps": 4}
PARTS_BLOCK_P, PARTS_BLOCK_D = 128, 32
"""The tile of the d weight / d bias sum over the backward's blocks: 128 blocks a step of 32 channels, a program per
channel block and tap (640 programs at 4096 channels and width 4, 512 blocks: 4 steps each)."""


# ---------------------------------------------------------------------------------------------------------------
# Kernels
# ---------------------------------------------------------------------------------------------------------------


@triton.jit
def _extended_input(x_ptr, x_stride_b, x_stride_t, x_stride_d, state_ptr, state_stride_b, state_stride_d,
                    state_stride_k, b, src, d, d_in, seqlen, HAS_STATE: tl.constexpr, WIDTH: tl.constexpr):
    """x̃ at input positions src (time of x; negative = from the conv state, -1 its newest), float32, 0 elsewhere."""
    from_x = (src >= 0) & (src < seqlen)
    value = tl.load(x_ptr + b.to(tl.int64) * x_stride_b + src[:, None] * x_stride_t + d[None, :] * x_stride_d,
                    mask=from_x[:, None] & d_in[None, :], other=0.0).to(tl.float32)
    if HAS_STATE:
        from_state = (src < 0) & (src >= 1 - WIDTH)
        value += tl.load(state_ptr + b.to(tl.int64) * state_stride_b + d[None, :] * state_stride_d
                         + (src + WIDTH - 1)[:, None] * state_stride_k,
                         mask=from_state[:, None] & d_in[None, :], other=0.0).to(tl.float32)
    return value


@triton.jit
def _conv_at(x_ptr, x_stride_b, x_stride_t, x_stride_d, state_ptr, state_stride_b, state_stride_d, state_stride_k,
             weight_ptr, weight_stride_d, weight_stride_k, bias, b, t, d, d_in, seqlen,
             HAS_STATE: tl.constexpr, WIDTH: tl.constexpr):
    """The pre-activation bias + Σ_k w[:, k] x̃[t + k] at output times t (BLOCK_T, BLOCK_D), float32."""
    acc = tl.zeros((t.shape[0], d.shape[0]), dtype=tl.float32) + bias[None, :]
    for k in tl.static_range(WIDTH):
        w = tl.load(weight_ptr + d * weight_stride_d + k * weight_stride_k, mask=d_in, other=0.0).to(tl.float32)
        acc += w[None, :] * _extended_input(x_ptr, x_stride_b, x_stride_t, x_stride_d, state_ptr, state_stride_b,
                                            state_stride_d, state_stride_k, b, t - (WIDTH - 1) + k, d, d_in, seqlen,
                                            HAS_STATE, WIDTH)
    return acc


@triton.jit
def _silu_bwd_kernel(
    x_ptr, x_stride_b, x_stride_t, x_stride_d,
    weight_ptr, weight_stride_d, weight_stride_k,
    bias_ptr,
    state_ptr, state_stride_b, state_stride_d, state_stride_k,
    dy_ptr, dy_stride_b, dy_stride_t, dy_stride_d,
    dpre_ptr,  # (B, T, D) in dy's dtype, contiguous: dL/d pre-activation
    seqlen, dim,
    HAS_BIAS: tl.constexpr, HAS_STATE: tl.constexpr, WIDTH: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """dL/d pre-activation = dy · SiLU'(pre), the pre-activation recomputed as the forward computes it."""
    b = tl.program_id(0)
    t = tl.program_id(1) * BLOCK_T + tl.arange(0, BLOCK_T)
    d = tl.program_id(2) * BLOCK_D + tl.arange(0, BLOCK_D)
    d_in = d < dim
    if HAS_BIAS:
        bias = tl.load(bias_ptr + d, mask=d_in, other=0.0).to(tl.float32)
    else:
        bias = tl.zeros((BLOCK_D,), dtype=tl.float32)
    pre = _conv_at(x_ptr, x_stride_b, x_stride_t, x_stride_d, state_ptr, state_stride_b, state_stride_d,
                   state_stride_k, weight_ptr, weight_stride_d, weight_stride_k, bias, b, t, d, d_in, seqlen,
                   HAS_STATE, WIDTH)
    td_in = (t < seqlen)[:, None] & d_in[None, :]
    dy = tl.load(dy_ptr + b.to(tl.int64) * dy_stride_b + t[:, None] * dy_stride_t + d[None, :] * dy_stride_d,
                 mask=td_in, other=0.0).to(tl.float32)
    dpre = _silu_grad(dy, pre)
    tl.store(dpre_ptr + (b.to(tl.int64) * seqlen + t[:, None]) * dim + d[None, :], dpre.to(dpre_ptr.dtype.element_ty),
             mask=td_in)


@triton.jit
def _silu_grad(dy, pre):
    """dy · SiLU'(pre) with SiLU'(x) = σ(x)(1 + x(1 - σ(x))), written σ + σ(x - xσ): two fused multiply-adds and a
    multiply an element after the sigmoid (the conv backward is instruction-bound)."""
    sig = sigmoid(pre)
    return dy * (sig + sig * (pre - pre * sig))


@triton.jit
def _dpre_at(dpre_ptr, dpre_stride_b, dpre_stride_t, dpre_stride_d, b, t, d, d_in, seqlen):
    """dL/d pre-activation at output times t, float32, 0 outside [0, T)."""
    valid = ((t >= 0) & (t < seqlen))[:, None] & d_in[None, :]
    return tl.load(dpre_ptr + b.to(tl.int64) * dpre_stride_b + t[:, None] * dpre_stride_t + d[None, :] * dpre_stride_d,
                   mask=valid, other=0.0).to(tl.float32)


@triton.jit
def _conv_from_window(x_ptr, x_stride_b, x_stride_t, x_stride_d, state_ptr, state_stride_b, state_stride_d,
                      state_stride_k, weight_ptr, weight_stride_d, weight_stride_k, bias, b, t, d, d_in, seqlen,
                      HAS_STATE: tl.constexpr, WIDTH: tl.constexpr):
    """`_conv_at` at output times t, but the tile's inputs x̃[t - (K-1)] are loaded once and the taps gathered from
    them (tl.gather along time): the last K-1 rows have no inputs past the tile and are wrong (the caller masks them)."""
    rows = tl.arange(0, t.shape[0])
    window = _extended_input(x_ptr, x_stride_b, x_stride_t, x_stride_d, state_ptr, state_stride_b, state_stride_d,
                             state_stride_k, b, t - (WIDTH - 1), d, d_in, seqlen, HAS_STATE, WIDTH)
    acc = tl.zeros((t.shape[0], d.shape[0]), dtype=tl.float32) + bias[None, :]
    for k in tl.static_range(WIDTH):
        w = tl.load(weight_ptr + d * weight_stride_d + k * weight_stride_k, mask=d_in, other=0.0).to(tl.float32)
        tap = tl.broadcast_to(tl.minimum(rows + k, t.shape[0] - 1)[:, None], (t.shape[0], d.shape[0]))
        acc += w[None, :] * tl.gather(window, tap, axis=0)
    return acc


@triton.jit
def _conv_fwd_kernel(
    x_ptr, x_stride_b, x_stride_t, x_stride_d,
    weight_ptr, weight_stride_d, weight_stride_k,
    bias_ptr,
    state_ptr, state_stride_b, state_stride_d, state_stride_k,
    y_ptr, y_stride_b, y_stride_t, y_stride_d,
    new_state_ptr, new_state_stride_b, new_state_stride_d, new_state_stride_k,
    seqlen, dim,
    HAS_BIAS: tl.constexpr, HAS_STATE: tl.constexpr, SILU: tl.constexpr, WIDTH: tl.constexpr,
    GATHER: tl.constexpr,  # time tiles overlap by K-1 rows, each input loaded once (else K shifted loads per tile)
    BLOCK_K: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr,
):
    b = tl.program_id(0)
    tb = tl.program_id(1)
    d = tl.program_id(2) * BLOCK_D + tl.arange(0, BLOCK_D)
    d_in = d < dim
    if HAS_BIAS:
        bias = tl.load(bias_ptr + d, mask=d_in, other=0.0).to(tl.float32)
    else:
        bias = tl.zeros((BLOCK_D,), dtype=tl.float32)
    if GATHER:
        t = tb * (BLOCK_T - (WIDTH - 1)) + tl.arange(0, BLOCK_T)
        t_out = (t < seqlen) & (tl.arange(0, BLOCK_T) < BLOCK_T - (WIDTH - 1))
        acc = _conv_from_window(x_ptr, x_stride_b, x_stride_t, x_stride_d, state_ptr, state_stride_b, state_stride_d,
                                state_stride_k, weight_ptr, weight_stride_d, weight_stride_k, bias, b, t, d, d_in,
                                seqlen, HAS_STATE, WIDTH)
    else:
        t = tb * BLOCK_T + tl.arange(0, BLOCK_T)
        t_out = t < seqlen
        acc = _conv_at(x_ptr, x_stride_b, x_stride_t, x_stride_d, state_ptr, state_stride_b, state_stride_d,
                       state_stride_k, weight_ptr, weight_stride_d, weight_stride_k, bias, b, t, d, d_in, seqlen,
                       HAS_STATE, WIDTH)
    if SILU:
        acc = acc * sigmoid(acc)
    tl.store(y_ptr + b.to(tl.int64) * y_stride_b + t[:, None] * y_stride_t + d[None, :] * y_stride_d,
             acc.to(y_ptr.dtype.element_ty), mask=t_out[:, None] & d_in[None, :])
    if tb == tl.num_programs(1) - 1:  # the last K-1 entries of x̃ become the new state
        j = tl.arange(0, BLOCK_K)
        src = seqlen - (WIDTH - 1) + j
        tail = _extended_input(x_ptr, x_stride_b, x_stride_t, x_stride_d, state_ptr, state_stride_b, state_stride_d,
                               state_stride_k, b, src, d, d_in, seqlen, HAS_STATE, WIDTH)
        tl.store(new_state_ptr + b.to(tl.int64) * new_state_stride_b + d[None, :] * new_state_stride_d
                 + j[:, None] * new_state_stride_k, tail.to(new_state_ptr.dtype.element_ty),
                 mask=(j < WIDTH - 1)[:, None] & d_in[None, :])


@triton.jit
def _in_row(d_in, row_inside):
    """The channel mask d_in where row_inside holds, else all False: a scalar and (BLOCK_D,) channels, or one time a
    segment (SEGMENTS, 1) and (1, BLOCK_D) channels. (Not `d_in & row_inside`: Triton's interpreter makes that int32,
    which its loads reject.)"""
    return tl.where(row_inside, d_in, False)


@triton.jit
def _extended_row(x_row_ptr, x_stride_t, state_ptr, state_stride_k, src, d_in, seqlen,
                  HAS_STATE: tl.constexpr, WIDTH: tl.constexpr, EVICT: tl.constexpr):
    """x̃ at one input time src (of x; negative = from the conv state; a scalar, or one a segment) for a block of
    channels, float32, 0 elsewhere. x_row_ptr and state_ptr point at the block's channels of batch row b. EVICT: the
    L2 eviction policy of the loads ("" the default)."""
    value = tl.load(x_row_ptr + src.to(tl.int64) * x_stride_t, mask=_in_row(d_in, (src >= 0) & (src < seqlen)),
                    other=0.0, eviction_policy=EVICT).to(tl.float32)
    if HAS_STATE:
        value += tl.load(state_ptr + (src + WIDTH - 1) * state_stride_k, mask=_in_row(d_in, (src < 0) & (src >= 1 - WIDTH)),
                         other=0.0).to(tl.float32)
    return value


@triton.jit
def _four_rows(at, stride_t, t, limit, d_in, EVICT: tl.constexpr):
    """Rows t..t+3 of a walk (`at` points at row t's channels), as stored; rows at or past `limit` read as 0."""
    r0 = tl.load(at, mask=_in_row(d_in, t < limit), other=0.0, eviction_policy=EVICT)
    r1 = tl.load(at + stride_t, mask=_in_row(d_in, t + 1 < limit), other=0.0, eviction_policy=EVICT)
    r2 = tl.load(at + 2 * stride_t, mask=_in_row(d_in, t + 2 < limit), other=0.0, eviction_policy=EVICT)
    r3 = tl.load(at + 3 * stride_t, mask=_in_row(d_in, t + 3 < limit), other=0.0, eviction_policy=EVICT)
    return r0, r1, r2, r3


@triton.jit
def _window_tap_sum(acc, w0, w1, w2, w3, x_3, x_2, x_1, x_0, WIDTH: tl.constexpr):
    """acc + Σ_k w_k x_(t-3+k) over the taps a width-WIDTH kernel has (w3 · the current input x_0); the sum alone
    for acc None (a multiply where adding to zeros would take an instruction more)."""
    if acc is None:
        acc = w3 * x_0
    else:
        acc += w3 * x_0
    if WIDTH >= 2:
        acc += w2 * x_1
    if WIDTH >= 3:
        acc += w1 * x_2
    if WIDTH >= 4:
        acc += w0 * x_3
    return acc


@triton.jit
def _window_tap(weight_ptr, weight_stride_k, d_in, back: tl.constexpr, WIDTH: tl.constexpr):
    """The tap that multiplies the input `back` steps before the output (0: the current one), float32; zeros for a
    tap past the kernel's width (the caller never adds it)."""
    if back < WIDTH:
        tap = tl.load(weight_ptr + (WIDTH - 1 - back) * weight_stride_k, mask=d_in, other=0.0).to(tl.float32)
    else:
        tap = tl.zeros(d_in.shape, dtype=tl.float32)
    return tap


@triton.jit
def _conv_fwd_window_kernel(
    x_ptr, x_stride_b, x_stride_t, x_stride_d,
    weight_ptr, weight_stride_d, weight_stride_k,
    bias_ptr,
    state_ptr, state_stride_b, state_stride_d, state_stride_k,
    y_ptr, y_stride_b, y_stride_t, y_stride_d,
    new_state_ptr, new_state_stride_b, new_state_stride_d, new_state_stride_k,
    seqlen, dim,
    HAS_BIAS: tl.constexpr, HAS_STATE: tl.constexpr, SILU: tl.constexpr, WIDTH: tl.constexpr,  # WIDTH <= 4
    BLOCK_K: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr,  # BLOCK_T: a multiple of 4
    PREFETCH: tl.constexpr,  # load the next step's rows before computing this step's (twice the loads in flight)
    PDL: tl.constexpr,  # let a programmatically launched next kernel start early (triton_support.programmatic_launch)
):
    """The forward for widths up to 4 over BLOCK_T steps of BLOCK_D channels: four input rows loaded per step, the
    three before them carried in registers (a sliding window along time), every tensor a (BLOCK_D,) vector."""
    if PDL:  # at once: the dependent (a decoding step's GEMV) waits for this kernel's end before it reads anything
        gdc_launch_dependents()
    b = tl.program_id(0).to(tl.int64)
    start = tl.program_id(1) * BLOCK_T
    d = tl.program_id(2) * BLOCK_D + tl.arange(0, BLOCK_D)
    d_in = d < dim
    x_row = x_ptr + b * x_stride_b + d * x_stride_d
    y_row = y_ptr + b * y_stride_b + d * y_stride_d
    if HAS_STATE:
        state_row = state_ptr + b * state_stride_b + d * state_stride_d
    else:
        state_row = state_ptr  # None: never read
    w_row = weight_ptr + d * weight_stride_d
    w0 = _window_tap(w_row, weight_stride_k, d_in, 3, WIDTH)
    w1 = _window_tap(w_row, weight_stride_k, d_in, 2, WIDTH)
    w2 = _window_tap(w_row, weight_stride_k, d_in, 1, WIDTH)
    w3 = _window_tap(w_row, weight_stride_k, d_in, 0, WIDTH)
    if HAS_BIAS:
        bias = tl.load(bias_ptr + d, mask=d_in, other=0.0).to(tl.float32)
    else:
        bias = tl.zeros((BLOCK_D,), dtype=tl.float32)
    x_3 = _extended_row(x_row, x_stride_t, state_row, state_stride_k, start - 3, d_in, seqlen, HAS_STATE, WIDTH, "")
    x_2 = _extended_row(x_row, x_stride_t, state_row, state_stride_k, start - 2, d_in, seqlen, HAS_STATE, WIDTH, "")
    x_1 = _extended_row(x_row, x_stride_t, state_row, state_stride_k, start - 1, d_in, seqlen, HAS_STATE, WIDTH, "")
    x_at = x_row + start.to(tl.int64) * x_stride_t  # row t's channels, advanced four rows a step
    y_at = y_row + start.to(tl.int64) * y_stride_t
    limit = tl.minimum(start + BLOCK_T, seqlen)
    if PREFETCH:
        n0, n1, n2, n3 = _four_rows(x_at, x_stride_t, start, limit, d_in, "")
    for t in range(start, limit, 4):  # a decoding step (T = 1) takes one
        if PREFETCH:
            a, b1, b2, b3 = n0, n1, n2, n3
            n0, n1, n2, n3 = _four_rows(x_at + 4 * x_stride_t, x_stride_t, t + 4, limit, d_in, "")
        else:
            a, b1, b2, b3 = _four_rows(x_at, x_stride_t, t, limit, d_in, "")
        a, b1, b2, b3 = a.to(tl.float32), b1.to(tl.float32), b2.to(tl.float32), b3.to(tl.float32)
        y0 = _window_tap_sum(bias, w0, w1, w2, w3, x_3, x_2, x_1, a, WIDTH)
        y1 = _window_tap_sum(bias, w0, w1, w2, w3, x_2, x_1, a, b1, WIDTH)
        y2 = _window_tap_sum(bias, w0, w1, w2, w3, x_1, a, b1, b2, WIDTH)
        y3 = _window_tap_sum(bias, w0, w1, w2, w3, a, b1, b2, b3, WIDTH)
        if SILU:
            y0, y1, y2, y3 = y0 * sigmoid(y0), y1 * sigmoid(y1), y2 * sigmoid(y2), y3 * sigmoid(y3)
        dtype = y_ptr.dtype.element_ty
        tl.store(y_at, y0.to(dtype), mask=_in_row(d_in, t < seqlen))
        tl.store(y_at + y_stride_t, y1.to(dtype), mask=_in_row(d_in, t + 1 < seqlen))
        tl.store(y_at + 2 * y_stride_t, y2.to(dtype), mask=_in_row(d_in, t + 2 < seqlen))
        tl.store(y_at + 3 * y_stride_t, y3.to(dtype), mask=_in_row(d_in, t + 3 < seqlen))
        x_3, x_2, x_1 = b1, b2, b3
        x_at += 4 * x_stride_t
        y_at += 4 * y_stride_t
    if tl.program_id(1) == tl.num_programs(1) - 1:  # the last K-1 entries of x̃ become the new state
        j = tl.arange(0, BLOCK_K)
        tail = _extended_input(x_ptr, x_stride_b, x_stride_t, x_stride_d, state_ptr, state_stride_b, state_stride_d,
                               state_stride_k, b, seqlen - (WIDTH - 1) + j, d, d_in, seqlen, HAS_STATE, WIDTH)
        tl.store(new_state_ptr + b * new_state_stride_b + d[None, :] * new_state_stride_d
                 + j[:, None] * new_state_stride_k, tail.to(new_state_ptr.dtype.element_ty),
                 mask=(j < WIDTH - 1)[:, None] & d_in[None, :])


@triton.jit
def _conv_step_shift(x_0, state_row, state_stride_k, w_row, w_stride_k, bias_ptr, channels, inside,
                     HAS_BIAS: tl.constexpr, SILU: tl.constexpr, WIDTH: tl.constexpr, KEPT_DTYPE: tl.constexpr):
    """One decoding step of a block of channels, its state shifted where it lies (2 <= WIDTH <= 4): x_0 is this step's
    input (any dtype, its values already x's), state_row the channels' state pointers (entries W-4 .. W-2 the inputs
    3, 2 and 1 steps back). Returns act(bias + Σ_k w_k x̃_k) in float32 (the caller rounds and stores it); the kept
    entries are stored back rounded through KEPT_DTYPE (x's dtype: what a functional step's new state holds), then x_0.
    A barrier separates every thread's loads of the old state from the stores over it (threads may share a channel).
    The in-place step kernel and kernels/in_proj_conv.py's GEMV epilogue both run this, so they give the same bits."""
    w0 = _window_tap(w_row, w_stride_k, inside, 3, WIDTH)
    w1 = _window_tap(w_row, w_stride_k, inside, 2, WIDTH)
    w2 = _window_tap(w_row, w_stride_k, inside, 1, WIDTH)
    w3 = _window_tap(w_row, w_stride_k, inside, 0, WIDTH)
    if HAS_BIAS:
        bias = tl.load(bias_ptr + channels, mask=inside, other=0.0).to(tl.float32)
    else:
        bias = tl.zeros(inside.shape, dtype=tl.float32)
    x_3 = tl.zeros(inside.shape, dtype=tl.float32)
    x_2 = tl.zeros(inside.shape, dtype=tl.float32)
    if WIDTH >= 4:
        x_3 = tl.load(state_row + (WIDTH - 4) * state_stride_k, mask=inside, other=0.0).to(tl.float32)
    if WIDTH >= 3:
        x_2 = tl.load(state_row + (WIDTH - 3) * state_stride_k, mask=inside, other=0.0).to(tl.float32)
    x_1 = tl.load(state_row + (WIDTH - 2) * state_stride_k, mask=inside, other=0.0).to(tl.float32)
    y = _window_tap_sum(bias, w0, w1, w2, w3, x_3, x_2, x_1, x_0.to(tl.float32), WIDTH)
    if SILU:
        y = y * sigmoid(y)
    tl.debug_barrier()  # every thread's loads of the old state are done before any entry is written over
    state_dtype = state_row.dtype.element_ty
    if WIDTH >= 4:
        tl.store(state_row + (WIDTH - 4) * state_stride_k, x_2.to(KEPT_DTYPE).to(state_dtype), mask=inside)
    if WIDTH >= 3:
        tl.store(state_row + (WIDTH - 3) * state_stride_k, x_1.to(KEPT_DTYPE).to(state_dtype), mask=inside)
    tl.store(state_row + (WIDTH - 2) * state_stride_k, x_0.to(state_dtype), mask=inside)
    return y


@triton.jit
def _conv_step_in_place_kernel(
    x_ptr, x_stride_b, x_stride_d,
    weight_ptr, weight_stride_d, weight_stride_k,
    bias_ptr,
    state_ptr, state_stride_b, state_stride_d, state_stride_k,  # read, then written over
    y_ptr, y_stride_b, y_stride_d,
    dim,
    HAS_BIAS: tl.constexpr, SILU: tl.constexpr, WIDTH: tl.constexpr,  # 2 <= WIDTH <= 4
    BLOCK_D: tl.constexpr,
    PDL: tl.constexpr,  # as the window kernel's
):
    """One decoding step (T = 1) with the conv state updated where it lies, grid (batch, channel blocks): y =
    act(bias + Σ_k w_k x̃[k - (K-1)]) from the state and this input, as the window kernel's first step, then the
    state's entries become x̃[-(K-2)..0] (its last K-2 entries, then x): `_conv_step_shift`. Nothing races: the conv
    is depthwise, so a program reads and writes only its own channels' state. The kept entries are rounded through
    x's dtype, as the functional op's new state (x's dtype) copied into the cache rounds them: the cache holds the
    same bits either way."""
    if PDL:  # as the window kernel: the dependent (a GEMV) waits for this kernel's end before it reads anything
        gdc_launch_dependents()
    b = tl.program_id(0).to(tl.int64)
    d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    d_in = d < dim
    x_0 = tl.load(x_ptr + b * x_stride_b + d * x_stride_d, mask=d_in, other=0.0)
    y = _conv_step_shift(x_0, state_ptr + b * state_stride_b + d * state_stride_d, state_stride_k,
                         weight_ptr + d * weight_stride_d, weight_stride_k, bias_ptr, d, d_in,
                         HAS_BIAS, SILU, WIDTH, x_ptr.dtype.element_ty)
    tl.store(y_ptr + b * y_stride_b + d * y_stride_d, y.to(y_ptr.dtype.element_ty), mask=d_in)


@triton.jit
def _window_backward_row(x_3, x_2, x_1, x_0, p_3, p_2, p_1, dy, bias, w0, w1, w2, w3,
                         SILU: tl.constexpr, WIDTH: tl.constexpr):
    """One output time t of the sliding-window backward: with the inputs x_3..x_0 at t-3..t and dL/d pre-activation
    p_3..p_1 at t-3..t-1, returns (p_0, dx at t-3). Input t-3 feeds outputs t-3..t, so its gradient is complete here."""
    if SILU:
        pre = _window_tap_sum(bias, w0, w1, w2, w3, x_3, x_2, x_1, x_0, WIDTH)
        p_0 = _silu_grad(dy, pre)
    else:
        p_0 = dy
    # dx[t-3] = Σ_k w_k p[t-3 + K-1-k]: the taps against p in reverse time order
    return p_0, _window_tap_sum(None, w0, w1, w2, w3, p_0, p_1, p_2, p_3, WIDTH)


@triton.jit
def _add_tap_sums(dw0, dw1, dw2, dw3, dbias, p_0, x_3, x_2, x_1, x_0, WIDTH: tl.constexpr):
    """The d weight and d bias sums with output t added: dL/d pre-activation p_0 there, its inputs x_3..x_0."""
    dbias += p_0
    dw3 += p_0 * x_0
    if WIDTH >= 2:
        dw2 += p_0 * x_1
    if WIDTH >= 3:
        dw1 += p_0 * x_2
    if WIDTH >= 4:
        dw0 += p_0 * x_3
    return dw0, dw1, dw2, dw3, dbias


@triton.jit
def _as_float32(v):
    """v in float32. bf16 as its bits in a float32's upper half: the conversion took the upper of two packed values
    with a PRMT and then a shift, two instructions where a mask is one."""
    if v.dtype == tl.bfloat16:
        return (v.to(tl.uint16, bitcast=True).to(tl.uint32) << 16).to(tl.float32, bitcast=True)
    return v.to(tl.float32)


@triton.jit
def _window_backward_step(x_3, x_2, x_1, p_3, p_2, p_1, a0, a1, a2, a3, g0, g1, g2, g3, t, end, bias,
                          w0, w1, w2, w3, dw0, dw1, dw2, dw3, dbias,
                          OWNED: tl.constexpr, SILU: tl.constexpr, WIDTH: tl.constexpr):
    """Four output times t..t+3 of the walk. In: the inputs x_3..x_1 at t-3..t-1 and dL/d pre-activation p_3..p_1
    there (float32), the inputs a0..a3 and dy g0..g3 at t..t+3 as stored. Out: the inputs and dL/d pre-activation at
    t..t+3 in float32, dx at t-3..t, and the tap and bias sums with the outputs this program owns added: all four
    (OWNED: no select), else those before end."""
    a0, a1, a2, a3 = _as_float32(a0), _as_float32(a1), _as_float32(a2), _as_float32(a3)
    g0, g1, g2, g3 = _as_float32(g0), _as_float32(g1), _as_float32(g2), _as_float32(g3)
    q0, dx0 = _window_backward_row(x_3, x_2, x_1, a0, p_3, p_2, p_1, g0, bias, w0, w1, w2, w3, SILU, WIDTH)
    q1, dx1 = _window_backward_row(x_2, x_1, a0, a1, p_2, p_1, q0, g1, bias, w0, w1, w2, w3, SILU, WIDTH)
    q2, dx2 = _window_backward_row(x_1, a0, a1, a2, p_1, q0, q1, g2, bias, w0, w1, w2, w3, SILU, WIDTH)
    q3, dx3 = _window_backward_row(a0, a1, a2, a3, q0, q1, q2, g3, bias, w0, w1, w2, w3, SILU, WIDTH)
    if OWNED:
        mine0, mine1, mine2, mine3 = q0, q1, q2, q3
    else:
        mine0, mine1 = tl.where(t < end, q0, 0.0), tl.where(t + 1 < end, q1, 0.0)
        mine2, mine3 = tl.where(t + 2 < end, q2, 0.0), tl.where(t + 3 < end, q3, 0.0)
    dw0, dw1, dw2, dw3, dbias = _add_tap_sums(dw0, dw1, dw2, dw3, dbias, mine0, x_3, x_2, x_1, a0, WIDTH)
    dw0, dw1, dw2, dw3, dbias = _add_tap_sums(dw0, dw1, dw2, dw3, dbias, mine1, x_2, x_1, a0, a1, WIDTH)
    dw0, dw1, dw2, dw3, dbias = _add_tap_sums(dw0, dw1, dw2, dw3, dbias, mine2, x_1, a0, a1, a2, WIDTH)
    dw0, dw1, dw2, dw3, dbias = _add_tap_sums(dw0, dw1, dw2, dw3, dbias, mine3, a0, a1, a2, a3, WIDTH)
    return a0, a1, a2, a3, q0, q1, q2, q3, dx0, dx1, dx2, dx3, dw0, dw1, dw2, dw3, dbias


@triton.jit
def _owned_rows(block, stride_t, i, d_mask, EVICT: tl.constexpr):
    """Rows i..i+3 of a block (`block` points at its row 0's channels), as stored, all inside the sequence; channels masked
    by d_mask (None when the block has no channel past the last: a masked load writes zeros first, an instruction a
    load) are undefined, and no output reads them."""
    at = block + i * stride_t
    return (tl.load(at, mask=d_mask, eviction_policy=EVICT), tl.load(at + stride_t, mask=d_mask, eviction_policy=EVICT),
            tl.load(at + 2 * stride_t, mask=d_mask, eviction_policy=EVICT),
            tl.load(at + 3 * stride_t, mask=d_mask, eviction_policy=EVICT))


@triton.jit
def _window_backward_edge_step(x_block, x_stride_t, dy_block, dy_stride_t, dx_block, dx_stride_t, dstate_row, i, t,
                               start, end, limit, seqlen, d_in, x_3, x_2, x_1, p_3, p_2, p_1, bias, w0, w1, w2, w3,
                               dw0, dw1, dw2, dw3, dbias, OWNED: tl.constexpr, HAS_STATE: tl.constexpr,
                               SILU: tl.constexpr, WIDTH: tl.constexpr, EVICT: tl.constexpr):
    """A step of the walk at the segments' edges (their first, and those near their end and past it): rows masked, dx
    stored only for each segment's inputs (and the state's, in the sequence's first). i: the step's offset in its
    segment, the same in each; t = start + i, the step's time in each segment ((SEGMENTS, 1), as start, end and
    limit). Returns the window and sums after it."""
    a0, a1, a2, a3 = _four_rows(x_block + i * x_stride_t, x_stride_t, t, limit, d_in, EVICT)
    g0, g1, g2, g3 = _four_rows(dy_block + i * dy_stride_t, dy_stride_t, t, limit, d_in, EVICT)
    a0, a1, a2, a3, q0, q1, q2, q3, dx0, dx1, dx2, dx3, dw0, dw1, dw2, dw3, dbias = _window_backward_step(
        x_3, x_2, x_1, p_3, p_2, p_1, a0, a1, a2, a3, g0, g1, g2, g3, t, end, bias, w0, w1, w2, w3,
        dw0, dw1, dw2, dw3, dbias, OWNED, SILU, WIDTH)
    # input s = t-3+i: this segment's when start <= s < end; the state's (the first segment) when 1-K <= s < 0
    dx_at = dx_block + i * dx_stride_t
    dtype = dx_at.dtype.element_ty
    tl.store(dx_at, dx0.to(dtype), mask=_in_row(d_in, (t - 3 >= start) & (t - 3 < end) & (t - 3 < seqlen)))
    tl.store(dx_at + dx_stride_t, dx1.to(dtype), mask=_in_row(d_in, (t - 2 >= start) & (t - 2 < end) & (t - 2 < seqlen)))
    tl.store(dx_at + 2 * dx_stride_t, dx2.to(dtype),
             mask=_in_row(d_in, (t - 1 >= start) & (t - 1 < end) & (t - 1 < seqlen)))
    tl.store(dx_at + 3 * dx_stride_t, dx3.to(dtype), mask=_in_row(d_in, (t >= start) & (t < end) & (t < seqlen)))
    if HAS_STATE:
        tl.store(dstate_row + (t - 3), dx0, mask=_in_row(d_in, (t - 3 < 0) & (t - 3 >= 1 - WIDTH)))
        tl.store(dstate_row + (t - 2), dx1, mask=_in_row(d_in, (t - 2 < 0) & (t - 2 >= 1 - WIDTH)))
        tl.store(dstate_row + (t - 1), dx2, mask=_in_row(d_in, (t - 1 < 0) & (t - 1 >= 1 - WIDTH)))
    # the window moves on by four: inputs and dL/d pre-activation at t+1..t+3
    return a1, a2, a3, q1, q2, q3, dw0, dw1, dw2, dw3, dbias


@triton.jit
def _over_segments(v, SEGMENTS: tl.constexpr):
    """A program's sum of v over its segments: (BLOCK_D,) from (SEGMENTS, BLOCK_D), or v itself (one segment)."""
    if SEGMENTS == 1:
        total = v
    else:
        total = tl.sum(v, axis=0)
    return total


@triton.jit
def _conv_bwd_window_kernel(
    x_ptr, x_stride_b, x_stride_t, x_stride_d,
    weight_ptr, weight_stride_d, weight_stride_k,
    bias_ptr,
    state_ptr, state_stride_b, state_stride_d, state_stride_k,
    dy_ptr, dy_stride_b, dy_stride_t, dy_stride_d,
    dx_ptr, dx_stride_b, dx_stride_t, dx_stride_d,
    dstate_ptr,  # (B, D, K-1) float32: dL/d conv_state through y (the new state's gradient is added by the caller)
    part_ptr,  # (B, programs along time, K + 1, D) float32: per program, the taps' d weight sums, then d bias's
    seqlen, dim,
    HAS_BIAS: tl.constexpr, HAS_STATE: tl.constexpr, SILU: tl.constexpr, WIDTH: tl.constexpr,  # WIDTH <= 4
    BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr,  # BLOCK_T: a multiple of 4, the steps of one segment
    SEGMENTS: tl.constexpr,  # consecutive segments of BLOCK_T steps a program walks side by side (a power of 2)
    EVEN_D: tl.constexpr,  # BLOCK_D divides the channels
    PREFETCH: tl.constexpr,  # load the next inner step's rows before computing this one's (twice the loads in flight)
    EDGE_EVICT: tl.constexpr,  # the L2 eviction policy of a segment's first rows (its predecessor reads them again)
    STREAM_EVICT: tl.constexpr,  # that of the other rows (read once, or for the second time)
    CHANNELS_FASTEST: tl.constexpr,  # grid (channel blocks, programs along time, batch): a row's blocks launched together
):
    """The whole backward for widths up to 4 in one pass over SEGMENTS × BLOCK_T steps of BLOCK_D channels: reads x and
    dy once, recomputes the pre-activation from a sliding window of inputs, and writes dx three steps behind, when
    the four outputs each input feeds are done; d weight and d bias are summed in registers for the program's own
    outputs. Each segment's walk runs four steps past it so its last inputs' gradients complete (the next segment's
    first outputs, read again there).

    A program walks its SEGMENTS segments in step: every value is a (SEGMENTS, BLOCK_D) tile, one row a segment
    (with SEGMENTS warps, one a segment), and the segments' sums are added up before they are stored, so a program
    writes one row of partial sums for SEGMENTS × BLOCK_T steps.

    The walk takes four rows a step. The steps inside the segments have nothing to mask or select (every row inside
    the sequence, every output the segment's; channels unmasked when BLOCK_D divides them); the first step (dx of the
    rows before the segment not stored) and the last ones (near the segment's or the sequence's end, and past it)
    take the masked step."""
    if CHANNELS_FASTEST:
        b = tl.program_id(2).to(tl.int64)
        channels = tl.program_id(0) * BLOCK_D + tl.arange(0, BLOCK_D)
    else:
        b = tl.program_id(0).to(tl.int64)
        channels = tl.program_id(2) * BLOCK_D + tl.arange(0, BLOCK_D)
    first = tl.program_id(1) * (SEGMENTS * BLOCK_T)  # the program's first step
    last = first + (SEGMENTS - 1) * BLOCK_T  # its last segment's
    if SEGMENTS == 1:  # scalar times and (BLOCK_D,) vectors: the times in uniform registers (a tile took 8 more)
        start = first
        d = channels
    else:
        start = first + tl.arange(0, SEGMENTS)[:, None] * BLOCK_T  # (SEGMENTS, 1): each segment's first step
        d = channels[None, :]  # (1, BLOCK_D)
    end = start + BLOCK_T
    d_in = d < dim
    if EVEN_D:
        d_mask = None  # the inner steps' loads and stores: unmasked
    else:
        d_mask = d_in
    x_row = x_ptr + b * x_stride_b + d * x_stride_d
    if HAS_STATE:
        state_row = state_ptr + b * state_stride_b + d * state_stride_d
        dstate_row = dstate_ptr + (b * dim + d) * (WIDTH - 1) + (WIDTH - 1)  # + s: input s < 0 of x̃
    else:
        state_row = state_ptr  # None: never read
        dstate_row = dstate_ptr
    w_row = weight_ptr + d * weight_stride_d
    w0 = _window_tap(w_row, weight_stride_k, d_in, 3, WIDTH)
    w1 = _window_tap(w_row, weight_stride_k, d_in, 2, WIDTH)
    w2 = _window_tap(w_row, weight_stride_k, d_in, 1, WIDTH)
    w3 = _window_tap(w_row, weight_stride_k, d_in, 0, WIDTH)
    if HAS_BIAS:
        bias = tl.load(bias_ptr + d, mask=d_in, other=0.0).to(tl.float32)
    else:
        bias = tl.zeros_like(w3)
    x_3 = _extended_row(x_row, x_stride_t, state_row, state_stride_k, start - 3, d_in, seqlen, HAS_STATE, WIDTH,
                        EDGE_EVICT)
    x_2 = _extended_row(x_row, x_stride_t, state_row, state_stride_k, start - 2, d_in, seqlen, HAS_STATE, WIDTH,
                        EDGE_EVICT)
    x_1 = _extended_row(x_row, x_stride_t, state_row, state_stride_k, start - 1, d_in, seqlen, HAS_STATE, WIDTH,
                        EDGE_EVICT)
    # dL/d pre-activation before the segment: only inputs before it use it, whose gradients are not written here
    # (except the state's, in the first segment, where those outputs do not exist: 0 is right)
    p_3 = tl.zeros_like(x_3)
    p_2, p_1 = p_3, p_3
    dw0, dw1, dw2, dw3, dbias = p_3, p_3, p_3, p_3, p_3
    # the rows of step i: x_block + i · x_stride_t (an offset, not a pointer carried through the loops: that took
    # two registers per channel and pointer, and a 64-bit add per step)
    x_block = x_row + start.to(tl.int64) * x_stride_t
    dy_block = dy_ptr + b * dy_stride_b + d * dy_stride_d + start.to(tl.int64) * dy_stride_t
    dx_block = dx_ptr + b * dx_stride_b + d * dx_stride_d + (start - 3).to(tl.int64) * dx_stride_t  # dx trails by 3
    owned_stop = tl.minimum(end, seqlen)
    stop = owned_stop + 3  # through output owned_stop + 2: dx of the segment's last input
    limit = tl.minimum(start + (stop - start + 3) // 4 * 4, seqlen)  # the rows the walk reads
    # the first step: every output is the segment's (BLOCK_T >= 8), rows past the sequence read as 0
    x_3, x_2, x_1, p_3, p_2, p_1, dw0, dw1, dw2, dw3, dbias = _window_backward_edge_step(
        x_block, x_stride_t, dy_block, dy_stride_t, dx_block, dx_stride_t, dstate_row, 0, start, start, end, limit,
        seqlen, d_in, x_3, x_2, x_1, p_3, p_2, p_1, bias, w0, w1, w2, w3, dw0, dw1, dw2, dw3, dbias, True, HAS_STATE,
        SILU, WIDTH, EDGE_EVICT)
    # the inner steps: all four outputs each segment's and inside the sequence (the last segment's bound the others).
    # The loops count the first segment's time t0 (its step's offset i = t0 - first in every segment).
    inner_stop = first + 4 + tl.maximum(tl.minimum(last + BLOCK_T, seqlen) - (last + 4), 0) // 4 * 4
    if PREFETCH:  # (masked: the loop may not run)
        n0, n1, n2, n3 = _four_rows(x_block + 4 * x_stride_t, x_stride_t, start + 4, seqlen, d_in, STREAM_EVICT)
        m0, m1, m2, m3 = _four_rows(dy_block + 4 * dy_stride_t, dy_stride_t, start + 4, seqlen, d_in, STREAM_EVICT)
    dtype = dx_ptr.dtype.element_ty
    for t0 in range(first + 4, inner_stop, 4):
        if PREFETCH:
            a0, a1, a2, a3, g0, g1, g2, g3 = n0, n1, n2, n3, m0, m1, m2, m3
            # the next step's rows; after the last, rows that exist (the loop ran, so T >= last + 8), loaded again
            # by the step that uses them
            ahead = tl.minimum(t0 + 4, seqlen - 4 - (last - first)) - first
            n0, n1, n2, n3 = _owned_rows(x_block, x_stride_t, ahead, d_mask, STREAM_EVICT)
            m0, m1, m2, m3 = _owned_rows(dy_block, dy_stride_t, ahead, d_mask, STREAM_EVICT)
        else:
            a0, a1, a2, a3 = _owned_rows(x_block, x_stride_t, t0 - first, d_mask, STREAM_EVICT)
            g0, g1, g2, g3 = _owned_rows(dy_block, dy_stride_t, t0 - first, d_mask, STREAM_EVICT)
        _, a1, a2, a3, _, q1, q2, q3, dx0, dx1, dx2, dx3, dw0, dw1, dw2, dw3, dbias = _window_backward_step(
            x_3, x_2, x_1, p_3, p_2, p_1, a0, a1, a2, a3, g0, g1, g2, g3, t0, end, bias, w0, w1, w2, w3,
            dw0, dw1, dw2, dw3, dbias, True, SILU, WIDTH)  # (t0: unused by an owned step)
        x_3, x_2, x_1, p_3, p_2, p_1 = a1, a2, a3, q1, q2, q3  # the window moves on by four
        dx_at = dx_block + (t0 - first) * dx_stride_t
        tl.store(dx_at, dx0.to(dtype), mask=d_mask, eviction_policy=STREAM_EVICT)
        tl.store(dx_at + dx_stride_t, dx1.to(dtype), mask=d_mask, eviction_policy=STREAM_EVICT)
        tl.store(dx_at + 2 * dx_stride_t, dx2.to(dtype), mask=d_mask, eviction_policy=STREAM_EVICT)
        tl.store(dx_at + 3 * dx_stride_t, dx3.to(dtype), mask=d_mask, eviction_policy=STREAM_EVICT)
    # the rest of the segments and the step past them (the first segment's is the longest)
    for t0 in range(inner_stop, tl.minimum(first + BLOCK_T, seqlen) + 3, 4):
        x_3, x_2, x_1, p_3, p_2, p_1, dw0, dw1, dw2, dw3, dbias = _window_backward_edge_step(
            x_block, x_stride_t, dy_block, dy_stride_t, dx_block, dx_stride_t, dstate_row, t0 - first,
            start + (t0 - first), start, end, limit, seqlen, d_in, x_3, x_2, x_1, p_3, p_2, p_1, bias, w0, w1, w2, w3,
            dw0, dw1, dw2, dw3, dbias, False, HAS_STATE, SILU, WIDTH, STREAM_EVICT)
    part_at = part_ptr + (b * tl.num_programs(1) + tl.program_id(1)) * (WIDTH + 1) * dim + channels
    channels_in = channels < dim
    tl.store(part_at + WIDTH * dim, _over_segments(dbias, SEGMENTS), mask=channels_in)
    tl.store(part_at + (WIDTH - 1) * dim, _over_segments(dw3, SEGMENTS), mask=channels_in)
    if WIDTH >= 2:
        tl.store(part_at + (WIDTH - 2) * dim, _over_segments(dw2, SEGMENTS), mask=channels_in)
    if WIDTH >= 3:
        tl.store(part_at + (WIDTH - 3) * dim, _over_segments(dw1, SEGMENTS), mask=channels_in)
    if WIDTH >= 4:
        tl.store(part_at + (WIDTH - 4) * dim, _over_segments(dw0, SEGMENTS), mask=channels_in)


@triton.jit
def _conv_bwd_kernel(
    x_ptr, x_stride_b, x_stride_t, x_stride_d,
    weight_ptr, weight_stride_d, weight_stride_k,
    state_ptr, state_stride_b, state_stride_d, state_stride_k,
    dpre_ptr, dpre_stride_b, dpre_stride_t, dpre_stride_d,  # dL/d pre-activation (dy, or _silu_bwd_kernel's)
    dx_ptr, dx_stride_b, dx_stride_t, dx_stride_d,
    dstate_ptr,  # (B, D, K-1) float32: dL/d conv_state through y (the new state's gradient is added by the caller)
    part_ptr,  # (B, time blocks, K + 1, D) float32: per block, the taps' d weight sums, then d bias's
    seqlen, dim,
    HAS_STATE: tl.constexpr, WIDTH: tl.constexpr,
    BLOCK_K: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr,
):
    b = tl.program_id(0)
    tb = tl.program_id(1)
    d = tl.program_id(2) * BLOCK_D + tl.arange(0, BLOCK_D)
    d_in = d < dim
    s = tb * BLOCK_T + tl.arange(0, BLOCK_T)  # input times whose gradient this program writes
    part = (b.to(tl.int64) * tl.num_programs(1) + tb) * (WIDTH + 1)
    # d pre-activation at this block's own output times: d weight and d bias sum it against the taps' inputs.
    dpre_own = _dpre_at(dpre_ptr, dpre_stride_b, dpre_stride_t, dpre_stride_d, b, s, d, d_in, seqlen)
    tl.store(part_ptr + (part + WIDTH) * dim + d, tl.sum(dpre_own, axis=0), mask=d_in)
    dx = tl.zeros((BLOCK_T, BLOCK_D), dtype=tl.float32)
    for k in tl.static_range(WIDTH):
        x_tap = _extended_input(x_ptr, x_stride_b, x_stride_t, x_stride_d, state_ptr, state_stride_b, state_stride_d,
                                state_stride_k, b, s - (WIDTH - 1) + k, d, d_in, seqlen, HAS_STATE, WIDTH)
        tl.store(part_ptr + (part + k) * dim + d, tl.sum(dpre_own * x_tap, axis=0), mask=d_in)
        # Input s feeds output s + K-1-k through tap k.
        if k == WIDTH - 1:
            dpre = dpre_own
        else:
            dpre = _dpre_at(dpre_ptr, dpre_stride_b, dpre_stride_t, dpre_stride_d, b, s + (WIDTH - 1 - k), d, d_in,
                            seqlen)
        w = tl.load(weight_ptr + d * weight_stride_d + k * weight_stride_k, mask=d_in, other=0.0).to(tl.float32)
        dx += w[None, :] * dpre
    tl.store(dx_ptr + b.to(tl.int64) * dx_stride_b + s[:, None] * dx_stride_t + d[None, :] * dx_stride_d,
             dx.to(dx_ptr.dtype.element_ty), mask=(s < seqlen)[:, None] & d_in[None, :])
    if HAS_STATE:  # noqa: SIM102 -- a constexpr branch: compiled only when there is a state
        if tb == 0:  # the state's entries e = 0..K-2 feed outputs t = e - k
            j = tl.arange(0, BLOCK_K)
            dstate = tl.zeros((BLOCK_K, BLOCK_D), dtype=tl.float32)
            for k in tl.static_range(WIDTH):
                # Names of their own: inside a runtime branch the compiler will not let `dpre` and `w` change
                # type (BLOCK_K rows here, BLOCK_T above; bf16 here, float32 above).
                dpre_state = _dpre_at(dpre_ptr, dpre_stride_b, dpre_stride_t, dpre_stride_d, b, j - k, d, d_in, seqlen)
                w_state = tl.load(weight_ptr + d * weight_stride_d + k * weight_stride_k, mask=d_in, other=0.0)
                dstate += w_state.to(tl.float32)[None, :] * dpre_state
            tl.store(dstate_ptr + (b.to(tl.int64) * dim + d[None, :]) * (WIDTH - 1) + j[:, None], dstate,
                     mask=(j < WIDTH - 1)[:, None] & d_in[None, :])


@triton.jit
def _conv_parts_kernel(
    part_ptr,  # (parts, K + 1, D) float32: the backward's per-block sums (the taps', then the bias's)
    dweight_ptr,  # (D, K), contiguous, in the weight's dtype
    dbias_ptr,  # (D,) in the bias's dtype
    parts, dim,
    HAS_BIAS: tl.constexpr,  # without a bias the grid stops at the taps (program_id(1) < K)
    WIDTH: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """d weight[:, k] (k < K) or d bias (k = K) for BLOCK_D channels: the per-block sums added in a fixed order
    (deterministic), stored in the parameter's dtype: one launch where torch took two sums, a transpose, a copy and
    two casts (a dozen µs of host time each on the H200's host)."""
    d = tl.program_id(0) * BLOCK_D + tl.arange(0, BLOCK_D)
    k = tl.program_id(1)
    d_in = d < dim
    acc = tl.zeros((BLOCK_P, BLOCK_D), dtype=tl.float32)
    for first in range(0, parts, BLOCK_P):
        rows = first + tl.arange(0, BLOCK_P)
        acc += tl.load(part_ptr + (rows[:, None].to(tl.int64) * (WIDTH + 1) + k) * dim + d[None, :],
                       mask=(rows < parts)[:, None] & d_in[None, :], other=0.0)
    total = tl.sum(acc, axis=0)
    if k < WIDTH:
        tl.store(dweight_ptr + d * WIDTH + k, total.to(dweight_ptr.dtype.element_ty), mask=d_in)
    elif HAS_BIAS:
        tl.store(dbias_ptr + d, total.to(dbias_ptr.dtype.element_ty), mask=d_in)


# ---------------------------------------------------------------------------------------------------------------
# Launchers and tuning
# ---------------------------------------------------------------------------------------------------------------


FORWARD_TUNER = Autotuner("causal_conv1d.forward", FORWARD_CONFIGS, INTERPRETER_CONFIG)
BACKWARD_TUNER = Autotuner("causal_conv1d.backward", BACKWARD_CONFIGS, INTERPRETER_CONFIG)
SILU_BACKWARD_TUNER = Autotuner("causal_conv1d.silu_backward", SILU_BACKWARD_CONFIGS, INTERPRETER_CONFIG)
WINDOW_BACKWARD_TUNER = Autotuner("causal_conv1d.window_backward", WINDOW_BACKWARD_CONFIGS,
                                  {"BLOCK_T": 16, "BLOCK_D": 16, "num_warps": 1, "PREFETCH": True})


def _config(tuner: Autotuner, key: str, launch, explicit: dict | None, candidates: list[dict] | None = None) -> dict:
    known = tuner.known(key, explicit)
    return known if known is not None else tuner.tune(key, launch, candidates)


def tuned_configs() -> dict:
    """{"forward"|"silu_backward"|"backward": {key: config}} chosen so far (triton_support.tuning_table() has them
    too)."""
    return {"forward": dict(FORWARD_TUNER.chosen), "silu_backward": dict(SILU_BACKWARD_TUNER.chosen),
            "backward": dict(BACKWARD_TUNER.chosen), "window_backward": dict(WINDOW_BACKWARD_TUNER.chosen)}


def _key(dim: int, width: int, conv_state: Tensor | None, dtype: torch.dtype, length: str = "") -> str:
    """The tuning bucket. With a conv state every tap load is two masked loads (x and the state): at (8, 4096, 4096)
    the gathering forward won with a state and lost without one, so the two are tuned apart."""
    return f"D{dim}-K{width}{length}{'-state' if conv_state is not None else ''}-{dtype_name(dtype)}"


def _launch_options(config: dict) -> dict:
    return {"BLOCK_T": config["BLOCK_T"], "BLOCK_D": config["BLOCK_D"], "num_warps": config.get("num_warps", 4)}


def forward_candidates(width: int) -> list[dict]:
    """The forward configs for kernels of this width, the untuned default first. Up to WINDOW_WIDTH (the sliding
    window holds three inputs): the window's, and GATHERING_TILE as a fallback; wider: the tiles, gathering ones
    only where the K-1 rows they recompute are a small part of the tile."""
    if width <= WINDOW_WIDTH:
        return [c for c in FORWARD_CONFIGS if c.get("WINDOW")] + [GATHERING_TILE]
    return [c for c in FORWARD_CONFIGS
            if not c.get("WINDOW") and (not c.get("GATHER") or c["BLOCK_T"] >= 8 * (width - 1))]


def causal_conv1d_forward(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None = None,
    conv_state: Tensor | None = None,
    silu: bool = False,
    *,
    config: dict | None = None,
) -> tuple[Tensor, Tensor]:
    """Run the forward kernel: (y (B, T, D), new_conv_state (B, D, K-1)), both in x's dtype."""
    _check_inputs(x, weight, bias, conv_state)
    batch, seqlen, dim = x.shape
    width = weight.shape[1]
    y = torch.empty((batch, seqlen, dim), dtype=x.dtype, device=x.device)
    new_state = torch.empty((batch, dim, width - 1), dtype=x.dtype, device=x.device)
    if batch == 0 or dim == 0:
        return y, new_state
    args = (*strided(x, 3), *strided(weight, 2), bias, *strided(conv_state, 3), *strided(y, 3),
            *strided(new_state, 3), seqlen, dim)
    constexprs = {"HAS_BIAS": bias is not None, "HAS_STATE": conv_state is not None, "SILU": bool(silu),
                  "WIDTH": width, "BLOCK_K": max(1, triton.next_power_of_2(width - 1))}

    def launch(cfg):
        gather = cfg.get("GATHER", False)
        rows = cfg["BLOCK_T"] - (width - 1) if gather else cfg["BLOCK_T"]  # new outputs per time tile
        grid = (batch, max(1, triton.cdiv(seqlen, rows)), triton.cdiv(dim, cfg["BLOCK_D"]))
        if cfg.get("WINDOW"):
            _conv_fwd_window_kernel[grid](*args, **constexprs, PREFETCH=cfg.get("PREFETCH", False),
                                          PDL=programmatic_launch(x.device), **_launch_options(cfg))
        else:
            _conv_fwd_kernel[grid](*args, **constexprs, GATHER=gather, **_launch_options(cfg))

    key = _key(dim, width, conv_state, x.dtype, f"-T{'1' if seqlen == 1 else 'n'}")
    candidates = forward_candidates(width)
    with on_device(x):
        launch(_config(FORWARD_TUNER, key, launch, config, candidates))
    return y, new_state


STEP_IN_PLACE_CONFIGS = [{"BLOCK_D": 128, "num_warps": 1}, {"BLOCK_D": 64, "num_warps": 1},
                         {"BLOCK_D": 256, "num_warps": 2}, {"BLOCK_D": 512, "num_warps": 4}]
"""The in-place step's candidates: the window forward's channel blocks (128 at 1 warp its fastest at length) and
wider ones (a step has B × D / BLOCK_D programs, 25-50 for Hymba+'s 3200 channels at batch 1)."""
STEP_IN_PLACE_TUNER = Autotuner("causal_conv1d.step_in_place", STEP_IN_PLACE_CONFIGS, {"BLOCK_D": 16, "num_warps": 1})


def causal_conv1d_step_in_place(x: Tensor, weight: Tensor, bias: Tensor | None, conv_state: Tensor, silu: bool,
                                *, config: dict | None = None) -> Tensor:
    """One decoding step x (B, 1, D) -> y (B, 1, D) in x's dtype, conv_state (B, D, K-1) updated where it lies by the
    kernel (`_conv_step_in_place_kernel`, widths 2 to 4). Other widths (1: no state; above 4: no window kernel) run
    the functional forward and copy its new state over conv_state. config {"BLOCK_D", "num_warps"} bypasses the tuner,
    which times its candidates on a copy of the state (each trial shifts the state it is given)."""
    _check_inputs(x, weight, bias, conv_state)
    batch, seqlen, dim = x.shape
    width = weight.shape[1]
    if seqlen != 1 or conv_state is None:
        raise ValueError(f"causal_conv1d_step_in_place takes one step (T = 1) and a state, got T = {seqlen} and "
                         f"conv_state {None if conv_state is None else tuple(conv_state.shape)}")
    if not 2 <= width <= WINDOW_WIDTH:
        y, new_state = causal_conv1d_forward(x, weight, bias, conv_state, silu)
        conv_state.copy_(new_state)
        return y
    y = torch.empty((batch, 1, dim), dtype=x.dtype, device=x.device)
    if batch == 0 or dim == 0:
        return y

    def launch(cfg, state=conv_state):
        _conv_step_in_place_kernel[(batch, triton.cdiv(dim, cfg["BLOCK_D"]))](
            x, x.stride(0), x.stride(2), *strided(weight, 2), bias, *strided(state, 3), y, y.stride(0), y.stride(2),
            dim, HAS_BIAS=bias is not None, SILU=bool(silu), WIDTH=width, BLOCK_D=cfg["BLOCK_D"],
            PDL=programmatic_launch(x.device), num_warps=cfg["num_warps"],
        )

    key = _key(dim, width, conv_state, x.dtype, "-step-in-place")
    with on_device(x):
        known = STEP_IN_PLACE_TUNER.known(key, config)
        if known is None:
            scratch = conv_state.clone()
            known = STEP_IN_PLACE_TUNER.tune(key, lambda cfg: launch(cfg, scratch))
        launch(known)
    return y


def _silu_backward(dy: Tensor, x: Tensor, weight: Tensor, bias: Tensor | None, conv_state: Tensor | None) -> Tensor:
    """dL/d pre-activation = dy · SiLU'(pre), (B, T, D) in dy's dtype."""
    batch, seqlen, dim = x.shape
    width = weight.shape[1]
    dpre = torch.empty((batch, seqlen, dim), dtype=dy.dtype, device=x.device)

    def launch(cfg):
        grid = (batch, triton.cdiv(seqlen, cfg["BLOCK_T"]), triton.cdiv(dim, cfg["BLOCK_D"]))
        _silu_bwd_kernel[grid](
            *strided(x, 3), *strided(weight, 2), bias, *strided(conv_state, 3), *strided(dy, 3), dpre, seqlen, dim,
            HAS_BIAS=bias is not None, HAS_STATE=conv_state is not None, WIDTH=width, **_launch_options(cfg),
        )

    launch(_config(SILU_BACKWARD_TUNER, _key(dim, width, conv_state, x.dtype), launch, None))
    return dpre


def _summed_parts(part: Tensor, weight: Tensor, bias: Tensor | None) -> tuple[Tensor, Tensor | None]:
    """(dweight (D, K) contiguous in the weight's dtype, dbias (D,) in the bias's or None): the backward's per-block
    sums `part` (B, time blocks, K + 1, D) float32 added up."""
    dim, width = weight.shape
    dweight = torch.empty((dim, width), dtype=weight.dtype, device=part.device)
    dbias = torch.empty((dim,), dtype=bias.dtype, device=part.device) if bias is not None else None
    _conv_parts_kernel[(triton.cdiv(dim, PARTS_BLOCK_D), width + (bias is not None))](
        part, dweight, dbias, part.shape[0] * part.shape[1], dim,
        HAS_BIAS=bias is not None, WIDTH=width, BLOCK_P=PARTS_BLOCK_P, BLOCK_D=PARTS_BLOCK_D, num_warps=4,
    )
    return dweight, dbias


def _linear_backward(dpre: Tensor, x: Tensor, weight: Tensor, bias: Tensor | None, conv_state: Tensor | None,
                     dx: Tensor, dstate: Tensor | None, config: dict | None) -> tuple[Tensor, Tensor | None]:
    """Fill dx (and dstate's part through y) from dL/d pre-activation; return (dweight, dbias) as _summed_parts."""
    batch, seqlen, dim = x.shape
    width = weight.shape[1]
    grads = {}

    def launch(cfg):  # what the tuner times: the per-block sums are more rows to add the shorter the blocks
        blocks = triton.cdiv(seqlen, cfg["BLOCK_T"])
        part = torch.empty((batch, blocks, width + 1, dim), dtype=torch.float32, device=x.device)
        _conv_bwd_kernel[(batch, blocks, triton.cdiv(dim, cfg["BLOCK_D"]))](
            *strided(x, 3), *strided(weight, 2), *strided(conv_state, 3), *strided(dpre, 3), *strided(dx, 3), dstate,
            part, seqlen, dim,
            HAS_STATE=conv_state is not None, WIDTH=width, BLOCK_K=max(1, triton.next_power_of_2(width - 1)),
            **_launch_options(cfg),
        )
        grads["dweight"], grads["dbias"] = _summed_parts(part, weight, bias)

    launch(_config(BACKWARD_TUNER, _key(dim, width, conv_state, x.dtype), launch, config))
    return grads["dweight"], grads["dbias"]


def _window_backward(dy: Tensor, x: Tensor, weight: Tensor, bias: Tensor | None, conv_state: Tensor | None,
                     silu: bool, dx: Tensor, dstate: Tensor | None, config: dict | None) -> tuple[Tensor, Tensor | None]:
    """The one-pass backward (widths up to 4): fill dx (and dstate's part through y); return (dweight, dbias) as
    _summed_parts."""
    batch, seqlen, dim = x.shape
    width = weight.shape[1]
    grads = {}

    def launch(cfg):  # what the tuner times: the per-program sums are more rows to add the shorter the programs
        segments = cfg.get("SEGMENTS", 1)
        blocks = triton.cdiv(seqlen, segments * cfg["BLOCK_T"])
        part = torch.empty((batch, blocks, width + 1, dim), dtype=torch.float32, device=x.device)
        keep_edges, channels_fastest = cfg.get("KEEP_EDGES", False), cfg.get("CHANNELS_FASTEST", False)
        channel_blocks = triton.cdiv(dim, cfg["BLOCK_D"])
        grid = (channel_blocks, blocks, batch) if channels_fastest else (batch, blocks, channel_blocks)
        _conv_bwd_window_kernel[grid](
            *strided(x, 3), *strided(weight, 2), bias, *strided(conv_state, 3), *strided(dy, 3), *strided(dx, 3),
            dstate, part, seqlen, dim,
            HAS_BIAS=bias is not None, HAS_STATE=conv_state is not None, SILU=silu, WIDTH=width, SEGMENTS=segments,
            PREFETCH=cfg.get("PREFETCH", False), EVEN_D=dim % cfg["BLOCK_D"] == 0, maxnreg=cfg.get("maxnreg"),
            EDGE_EVICT="evict_last" if keep_edges else "", STREAM_EVICT="evict_first" if keep_edges else "",
            CHANNELS_FASTEST=channels_fastest, **_launch_options(cfg),
        )
        grads["dweight"], grads["dbias"] = _summed_parts(part, weight, bias)

    key = _key(dim, width, conv_state, x.dtype, "-silu" if silu else "")
    launch(_config(WINDOW_BACKWARD_TUNER, key, launch, config))
    return grads["dweight"], grads["dbias"]


def causal_conv1d_backward(
    dy: Tensor,
    dnew_state: Tensor | None,
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    conv_state: Tensor | None,
    silu: bool,
    *,
    config: dict | None = None,
) -> tuple[Tensor, Tensor, Tensor | None, Tensor | None]:
    """Run the backward kernels: (dx, dweight, dbias, dconv_state), each in its input's dtype, None when absent.
    Widths up to 4 take one pass (the sliding window). Wider kernels take two with the SiLU: the first writes dL/d
    pre-activation (the pre-activation recomputed once per output), the second sums it over the taps. config: the
    pass that sums the taps (for the window: BLOCK_T a multiple of 4 and at least 8, SEGMENTS a power of 2), to
    bypass its autotuner."""
    batch, seqlen, dim = x.shape
    width = weight.shape[1]
    device = x.device
    dx = torch.empty((batch, seqlen, dim), dtype=x.dtype, device=device)
    dstate = torch.zeros((batch, dim, width - 1), dtype=torch.float32, device=device) if conv_state is not None else None
    if batch == 0 or dim == 0 or seqlen == 0:
        dx.zero_()
        dweight = torch.zeros_like(weight, memory_format=torch.contiguous_format)
        dbias = torch.zeros_like(bias) if bias is not None else None
    else:
        with on_device(x):
            if width <= WINDOW_WIDTH:
                dweight, dbias = _window_backward(dy, x, weight, bias, conv_state, silu, dx, dstate, config)
            else:
                dpre = _silu_backward(dy, x, weight, bias, conv_state) if silu else dy
                dweight, dbias = _linear_backward(dpre, x, weight, bias, conv_state, dx, dstate, config)
    if dnew_state is not None:  # the new state is x̃[T + j]: from x where T-(K-1)+j ≥ 0, else from the old state
        for j in range(width - 1):
            src = seqlen - (width - 1) + j
            if src >= 0:
                dx[:, src] += dnew_state[:, :, j].to(dx.dtype)
            elif dstate is not None:
                dstate[:, :, src + width - 1] += dnew_state[:, :, j].float()
    # dweight is contiguous, the layout the op's fake promises (a CUDA-graph capture of a training step checks the two
    # agree)
    return dx, dweight, dbias, dstate.to(conv_state.dtype) if dstate is not None else None


def autotune(config: dict, params: dict[str, tuple[int, ...]], batch: int, seqlen: int, dtype: torch.dtype,
             device: torch.device | str) -> None:
    """The build-time tuning hook (`archgen build --autotune`): run the kernels an op whose depthwise convolution
    has these parameter shapes (conv1d.weight (channels, 1, K), conv1d.bias if any) runs at batch × seqlen, as the
    generated blocks call them: over a whole sequence from no state, forward and backward, and one decoding step from
    a state; with the SiLU unless the op's config has another activation (the conv kind's "none"), so that inside
    triton_support.tuning_session() each tuner tunes its shape bucket."""
    channels, _, width = params["conv1d.weight"]
    silu = config.get("activation", "silu") == "silu"
    generator = torch.Generator(device=device).manual_seed(0)

    def randn(*shape):
        return torch.randn(shape, generator=generator, device=device)

    x, dy = randn(batch, seqlen, channels).to(dtype), randn(batch, seqlen, channels).to(dtype)
    weight = randn(channels, width)
    bias = randn(channels) if "conv1d.bias" in params else None
    _, state = causal_conv1d_forward(x, weight, bias, None, silu)
    causal_conv1d_backward(dy, None, x, weight, bias, None, silu)
    causal_conv1d_forward(x[:, -1:], weight, bias, state, silu)
    causal_conv1d_step_in_place(x[:, -1:], weight, bias, state, silu)


# ---------------------------------------------------------------------------------------------------------------
# Custom ops
# ---------------------------------------------------------------------------------------------------------------


def _forward_impl(x: Tensor, weight: Tensor, bias: Tensor | None, conv_state: Tensor | None,
                  silu: bool) -> tuple[Tensor, Tensor]:
    """archgen_v1::causal_conv1d -> (y, new_conv_state). CPU tensors take the reference (outside the kernel tests)."""
    if not (x.is_cuda or triton_on_cpu()):
        return causal_conv1d_reference(x, weight, bias, conv_state, "silu" if silu else None)
    return causal_conv1d_forward(x, weight, bias, conv_state, silu)


def _forward_fake(x, weight, bias, conv_state, silu):
    batch, seqlen, dim = x.shape
    return x.new_empty((batch, seqlen, dim)), x.new_empty((batch, dim, weight.shape[1] - 1))


def _backward_impl(dy: Tensor, dnew_state: Tensor | None, x: Tensor, weight: Tensor, bias: Tensor | None,
                   conv_state: Tensor | None, silu: bool) -> list[Tensor]:
    """archgen_v1::causal_conv1d_backward -> [dx, dweight, dbias, dconv_state]; absent inputs get empty (0,) tensors."""
    grads = causal_conv1d_backward(dy, dnew_state, x, weight, bias, conv_state, silu)
    return [g if g is not None else x.new_empty((0,)) for g in grads]


def _backward_fake(dy, dnew_state, x, weight, bias, conv_state, silu):
    def like(t):
        return torch.empty_like(t, memory_format=torch.contiguous_format) if t is not None else x.new_empty((0,))

    return [like(x), like(weight), like(bias), like(conv_state)]


def _setup_context(ctx, inputs, output):
    x, weight, bias, conv_state, silu = inputs
    ctx.save_for_backward(x, weight, bias, conv_state)
    ctx.silu = silu
    ctx.set_materialize_grads(False)
    ctx.backward = causal_conv1d_backward_op


def _backward(ctx, dy, dnew_state):
    x, weight, bias, conv_state = ctx.saved_tensors
    if dy is None:
        dy = torch.zeros_like(x)
    dx, dweight, dbias, dstate = ctx.backward(dy, dnew_state, x, weight, bias, conv_state, ctx.silu)
    return (dx, dweight, dbias if bias is not None else None, dstate if conv_state is not None else None, None)


def _step_in_place_impl(x: Tensor, weight: Tensor, bias: Tensor | None, conv_state: Tensor, silu: bool) -> Tensor:
    """archgen_v1::causal_conv1d_update_ -> y (B, 1, D); conv_state updated where it lies. CPU tensors take the
    reference (outside the kernel tests)."""
    if not (x.is_cuda or triton_on_cpu()):
        y, new_state = causal_conv1d_reference(x, weight, bias, conv_state, "silu" if silu else None)
        conv_state.copy_(new_state)
        return y
    return causal_conv1d_step_in_place(x, weight, bias, conv_state, silu)


def _step_in_place_fake(x, weight, bias, conv_state, silu):
    return x.new_empty(x.shape)


causal_conv1d_update_in_place_op = register_op("causal_conv1d_update_", _step_in_place_impl, _step_in_place_fake,
                                               mutates_args=("conv_state",))
causal_conv1d_backward_op = register_op("causal_conv1d_backward", _backward_impl, _backward_fake)
causal_conv1d_op = register_op("causal_conv1d", _forward_impl, _forward_fake, backward=_backward,
                               setup_context=_setup_context)


class _EagerCausalConv1d(torch.autograd.Function):
    """archgen_v1::causal_conv1d's implementation and autograd without the custom ops' dispatch, for eager mode (as
    kernels/rmsnorm.py's _EagerRMSNorm: on the H200 the custom op's Python dispatch cost RMSNorm's forward 0.15 ms
    of host time a call, more than this op's floor at (8, 4096, 4096) bf16, 0.13 ms). torch.compile and
    torch.export take the custom ops, one graph node each."""

    @staticmethod
    def forward(ctx, x, weight, bias, conv_state, silu):
        output = _forward_impl(x, weight, bias, conv_state, silu)
        _setup_context(ctx, (x, weight, bias, conv_state, silu), output)
        ctx.backward = _backward_impl
        return output

    backward = staticmethod(_backward)


# ---------------------------------------------------------------------------------------------------------------
# Entry points and reference
# ---------------------------------------------------------------------------------------------------------------


def causal_conv1d(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None = None,
    conv_state: Tensor | None = None,
    activation: str | None = None,
) -> tuple[Tensor, Tensor]:
    """The fused causal conv1d (+ SiLU with activation="silu"), differentiable: (y, new_conv_state), as ops/ssm.py's
    `causal_conv1d` followed by the activation. Needs CUDA tensors (or TRITON_INTERPRET=1)."""
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
    if not (x.is_cuda or triton_on_cpu() or torch.compiler.is_exporting()):
        raise RuntimeError(f"the Triton causal_conv1d kernel needs CUDA tensors, got x on {x.device}: call the "
                           "reference (ops/ssm.py causal_conv1d) instead, or set TRITON_INTERPRET=1 before importing "
                           "triton (slow; for tests)")
    op = _EagerCausalConv1d.apply if calls_implementation_directly(x) else causal_conv1d_op
    return op(x, weight, bias, conv_state, activation == "silu")


def causal_conv1d_update(
    x: Tensor,
    conv_state: Tensor,
    weight: Tensor,
    bias: Tensor | None = None,
    activation: str | None = None,
) -> tuple[Tensor, Tensor]:
    """One decoding step: x (B, D) -> (y (B, D), new_conv_state (B, D, K-1)); `conv_state` is left untouched (copy
    the result into the cache). The forward kernel at T = 1: one launch, the state update included."""
    y, new_state = causal_conv1d(x.unsqueeze(1), weight, bias, conv_state, activation)
    return y.squeeze(1), new_state


def causal_conv1d_update_(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    conv_state: Tensor,
    activation: str | None = None,
) -> Tensor:
    """One decoding step x (B, 1, D) -> y (B, 1, D) with the new state written over `conv_state` (a decoding cache's)
    by the kernel itself: what a generated Mamba-1 layer's step calls, where the functional op's new state was copied
    into the cache afterwards (a launch per layer and token). The op mutates only conv_state and returns only y, so
    torch.compile never meets an output aliasing an input. While torch.export traces, the functional op and a copy
    (exported graphs and their ONNX lowering keep the functional form, as `mamba_step_`)."""
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
    silu = activation == "silu"
    if torch.compiler.is_exporting():
        y, new_state = causal_conv1d_op(x, weight, bias, conv_state, silu)
        conv_state.copy_(new_state)
        return y
    if calls_implementation_directly(x):
        return _step_in_place_impl(x, weight, bias, conv_state, silu)
    return causal_conv1d_update_in_place_op(x, weight, bias, conv_state, silu)


def causal_conv1d_reference(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None = None,
    conv_state: Tensor | None = None,
    activation: str | None = None,
) -> tuple[Tensor, Tensor]:
    """The same computation with torch's grouped conv1d in float32 (float64 for float64 inputs): the tests' truth."""
    batch, _, dim = x.shape
    width = weight.shape[1]
    acc = torch.float64 if x.dtype == torch.float64 or weight.dtype == torch.float64 else torch.float32
    if conv_state is None:
        conv_state = x.new_zeros(batch, dim, width - 1)
    extended = torch.cat([conv_state.transpose(1, 2).to(x.dtype), x], dim=1)  # (B, K-1+T, D)
    y = F.conv1d(extended.to(acc).transpose(1, 2), weight.to(acc).unsqueeze(1),
                 bias.to(acc) if bias is not None else None, groups=dim).transpose(1, 2)  # (B, T, D)
    if activation == "silu":
        y = F.silu(y)
    new_state = extended[:, extended.shape[1] - (width - 1):].transpose(1, 2).contiguous()
    return y.to(x.dtype), new_state


def decomposition(reference, max_seqlen: int) -> dict:
    """{archgen_v1::causal_conv1d: the op written with `reference`} (ops/ssm.py's causal_conv1d), for ONNX. The
    in-place step (`causal_conv1d_update_`, whose reference ops/ssm.py's function of that name is) never reaches an
    exported graph (the entry point takes the functional op while exporting): nothing to lower."""
    if reference.__name__ == "causal_conv1d_update_":
        return {}

    def causal_conv1d_decomposed(x, weight, bias, conv_state, silu):
        y, new_state = reference(x, weight, bias, conv_state)
        return (F.silu(y) if silu else y), new_state

    return {op_overload("causal_conv1d"): causal_conv1d_decomposed}


def _check_inputs(x, weight, bias, conv_state) -> None:
    if x.dim() != 3 or weight.dim() != 2:
        raise ValueError(f"x must be (B, T, D) and weight (D, K), got {tuple(x.shape)} and {tuple(weight.shape)}")
    batch, _, dim = x.shape
    width = weight.shape[1]
    expected = {"weight": (weight, (dim, width)), "bias": (bias, (dim,)),
                "conv_state": (conv_state, (batch, dim, width - 1))}
    for name, (t, shape) in expected.items():
        if t is None:
            continue
        if tuple(t.shape) != shape:
            raise ValueError(f"{name} must have shape {shape} for x {tuple(x.shape)} and K = {width}, got "
                             f"{tuple(t.shape)}")
        if t.dtype not in SUPPORTED_DTYPES:
            raise TypeError(f"{name} is {t.dtype}; the kernels take {', '.join(map(str, SUPPORTED_DTYPES))}")
    if x.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"x is {x.dtype}; the kernels take {', '.join(map(str, SUPPORTED_DTYPES))}")
    if width < 1 or width > 16:
        raise ValueError(f"the kernel width K must be between 1 and 16, got {width}")
    if x.device.type != "cuda" and not interpreting():
        raise RuntimeError(f"the Triton kernels need CUDA tensors, got {x.device}")
