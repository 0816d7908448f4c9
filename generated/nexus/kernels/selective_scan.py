"""Mamba-1 selective scan as fused Triton kernels: forward, backward, the custom op, and the reference.

For every batch b, channel d (of D = d_inner) and state index n (of N = d_state)::

    Δ_t  = softplus(delta_t + delta_bias)             (delta_t + delta_bias if not delta_softplus)
    h_t  = exp(Δ_t A) ⊙ h_{t-1}  +  (Δ_t u_t) ⊗ B_t   h_t[d, n], h_{-1} = initial_state or 0
    y_t  = h_t C_t  +  D ⊙ u_t                        (h_t C_t)[d] = Σ_n h_t[d, n] C_t[n]
    y_t  = y_t ⊙ silu(z_t)                            if a gate z is given

Shapes are channels-last, as in templates/runtime/ssm.py (the reference every generated package runs): u, delta,
z (B, T, D); A (D, N); B, C (B, T, N); D, delta_bias (D,); initial_state and the final state (B, D, N). Inputs may
be float32, float16 or bfloat16 and may be strided (the Mamba block hands over slices of its projections); the
recurrence and every accumulation run in float32, y comes back in u's dtype and the final state in float32.

Why a kernel: the reference materialises (B, T, D, N) tensors (decays, inputs, states) and keeps them for autograd;
at batch 8, T = D = 4096, N = 16 that is 8 GiB per tensor in float32. Here the states never reach memory.

How the forward works. The grid is (batch, blocks of BLOCK_D channels). A program walks its sequence in tiles of
TILE time steps (FORWARD_TILE, or the chunk if longer). Per tile it loads (TILE, BLOCK_D) tiles of u, delta, z and
(TILE, N) tiles of B, C, forms the (TILE, BLOCK_D, N) decays a_t = exp(Δ_t A) and inputs x_t = Δ_t u_t B_t, and
turns them into the tile's states with a log-depth `tl.associative_scan` along time over (decay, input) pairs —
composing two steps h ↦ a·h + x multiplies decays in [0, 1], so it is stable for any Δ·A — then adds the state
carried in from the previous tile times the decay since the tile start. y contracts the states with C. Loading
whole tiles rather than one time step at a time keeps many loads in flight, which a step-by-step loop (one
dependent load per step) cannot; PREFETCH goes further, loading the next tile's inputs before this tile's
arithmetic. (H200, bench/selective_scan_kernel.py, B 8, L 4096, D 4096, N 16, bf16, gpu6/call2: 2.46 ms with PREFETCH, 5.8 ms
without — the loop was bound by load latency — against 2.29 ms for mamba_ssm's CUDA selective_scan_fn in the same
run.) Configs with STEPS run `_selective_scan_fwd_steps_kernel` instead, in the backward's layout: one channel per
lane with its N states in registers, one step after the other within tiles of TILE steps, y's sum over n within the
lane (the tile scan's crosses 16 lanes: 4 shuffles an element).

Checkpoints, for the backward. When gradients are needed the forward also writes the state entering every chunk
of CHUNK steps, h_{c·CHUNK - 1}, into a float32 buffer (B, ceil(T / CHUNK), D, N): 4·N/CHUNK bytes per element of
u, so at N = CHUNK = 16 as many bytes as u in float32 (twice a bfloat16 u). A tile holds TILE / CHUNK chunks: the
state entering the tile is the first checkpoint, the others are rows of the tile's states, written with one masked
store. Inference skips it.

How the backward works. With ȳ_t = h_t C_t + D u_t the output before the gate and dȳ_t = dy_t ⊙ silu(z_t) its
gradient (dȳ_t = dy_t without z), the adjoint runs backwards in time:

    g_t = dL/dh_t = dȳ_t C_t + a_{t+1} g_{t+1}        starting from dL/d final_state; a_0 g_0 is dL/d initial_state

and, with a_t h_{t-1} = h_t - x_t (no shift of the states by one step is needed):

    dΔ_t = Σ_n g_t (a_t h_{t-1}) A  +  u_t Σ_n g_t B_t        d delta_t = dΔ_t · sigmoid(delta_t + delta_bias)
    du_t = Δ_t Σ_n g_t B_t  +  D dȳ_t                           dz_t = dy_t · ȳ_t · silu'(z_t)
    dA   = Σ_{b,t} g_t (a_t h_{t-1}) Δ_t                        dD = Σ_{b,t} dȳ_t u_t,  d delta_bias = Σ_{b,t} d delta_t
    dB_t = Σ_d g_t Δ_t u_t                                      dC_t = Σ_d dȳ_t h_t

The grid is (batch, blocks of BLOCK_D = 32 · num_warps channels), one channel per lane: a lane holds the N states of
its channel in registers and runs the adjoint one step after the other, the chunks in reverse order. A lane cannot
hold CHUNK · N states, so the chunk is cut into pieces of SUB steps, last piece first: for each, the forward runs
again from the chunk's checkpoint up to the piece's end, holding the piece's SUB states in a (SUB, N, BLOCK_D)
register tile (its time axis within the lane: writing and reading a row are moves), then the adjoint runs back over
the piece: (CHUNK / SUB + 1) / 2 exp2 per step and state, plus one for a_{t+1}. The sums over n stay within a lane;
the sums over a warp's channels (dB_t, dC_t) cross lanes and scatter as they reduce (`_sum_across_lanes`): each of 5
rounds halves what a lane holds, handing one half to its partner lane and adding the half it gets back, so the N
sums cost N shuffles a lane where tl.sum's butterfly took 5 N and sent its replicated result through shared memory
(sm_90 PTX of a chunk at chunk 4 / SUB 4, triton 3.6: 4270 -> 3462 instructions, 640 -> 128 shuffles, 8 -> 0
barriers). Reductions are deterministic, without atomics: dA, dD and d delta_bias summed per lane over time and
written per batch row and segment ((B·S, D, N), (B·S, D)), dB and dC per warp's channels ((B, T, D / 32, N)); torch
sums those. Time can be split into S segments run in parallel (program_id(2)), each started from the adjoint
entering it at its right end: a pre-pass (`_selective_scan_bwd_carry_kernel`) computes every segment's adjoint from
dȳ alone and the sum of its Δ, and each segment folds those of the segments after it onto the final state's
gradient. That adds warps without adding registers: it pays where the batch leaves the GPU idle
(`_segments_to_fill`), and costs its pre-pass where the grid fills the GPU already (gpu8/call2: 15.2 against 13.6 ms
at the anchor shape). PREFETCH issues PTX prefetches of the next chunk's rows (u, delta, z, dy, B, C, its
checkpoint) into L1 as a chunk starts, at no register cost. Nsight Compute (gpu7/call3) shows why the backward is
slow: ptxas gives it 255 registers a thread, so 8 warps fit an SM (2 per scheduler, occupancy 12%), and the grid
(one warp per 32 channels: 1024 warps at the anchor shape) fills exactly one wave of them; issue slots are 35% busy,
DRAM 3%: each warp waits on its own dependent chain of loads, MUFU and shuffles. Chunks of 4 steps cut the
recomputed steps from 4.5 to 1 a step (SUB 4: the piece is the chunk): the backward went from 19.8 to 13.6 ms,
forward+backward from 22.4 to 17.3 ms (the forward writes 4 times the checkpoint bytes: 2.55 to 3.48 ms). (H200,
anchor shape, gpu7/call3; mamba_ssm's forward+backward 11.4 ms, its backward about 9 ms. Loading the inputs through
the read-only path (PTX ld.global.nc, free of the stores' order) ran 16% (chunk 16) and 44% (chunk 4) slower: the
compiler hoisted the loads and spilled. Two time-parallel backwards, scanning a chunk's adjoints at once with a
reverse `tl.associative_scan`, ran slower and were removed: on the forward's (CHUNK, BLOCK_D, N) tiles 32-47 ms, on
(CHUNK, BLOCK_D) tiles one state index at a time 24-31 ms; docs/design.md says why.)

Contents: `selective_scan` (the entry point, CUDA tensors), the custom ops `archgen_v1::selective_scan` and
`archgen_v1::selective_scan_backward` (one graph node each under torch.compile and torch.export, with fake
implementations and autograd), the launchers `selective_scan_forward` / `selective_scan_backward` (autotuned on
first use per shape bucket, see `shape_key`, or with an explicit config), their autotune spaces `FORWARD_CONFIGS` /
`BACKWARD_CONFIGS`, `tuned_configs` / `pin_configs` (read the tuners' choices, or set them),
`selective_scan_reference`, a plain loop over time with the same signature and return values: the ground truth of
the tests, and what the operator computes for CPU tensors (an exported program holding it runs anywhere), and
`decomposition`, the operator written with a traceable reference, for ONNX.

This file needs triton and triton_support.py next to it (the interpreter, the autotuner, op registration); nothing
else outside torch.
"""

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from torch import Tensor

from .triton_support import (
    HARDWARE_MATH,
    Autotuner,
    dtype_name,
    interpreting,
    on_device,
    op_overload,
    register_op,
    sigmoid,
    softplus,
    strided,
    triton_on_cpu,
)

CHUNK_SIZE = 4
"""Time steps per chunk (a power of two): the forward checkpoints the state entering every chunk, and the backward
recomputes a chunk's states from its checkpoint; longer chunks take fewer checkpoint bytes but make the backward
recompute more steps (see the module docstring). 4 on the H200 at the anchor shape: forward+backward 17.3 ms against
22.4 ms at 16 (gpu7/call3)."""
FORWARD_TILE = 16
"""Time steps the forward scans at once (a power of two), or the chunk if that is longer: a tile holds whole chunks."""

_LOG2E = tl.constexpr(1.4426950408889634)  # exp(x) = exp2(x · log2 e): exp2 is the hardware instruction
_LN2 = tl.constexpr(0.6931471805599453)  # 1 / log2 e

# Autotune spaces. BLOCK_D is the number of channels per program. The forward's tiles hold TILE · BLOCK_D · N float32
# values, and PREFETCH (a one-deep software pipeline of the loads) ran 2.3 times faster on the H200 than without (2.5
# against 5.8 ms at the anchor shape, gpu6/call2), so only prefetching configs remain. At 16 channels on 4 warps
# ptxas takes 168 registers a thread (sm_90, offline), 3 programs per SM: the anchor's 2048 programs run in 5.2
# waves, the last a fifth full; capped at 128 registers (a few spills) 4 fit, 3.9 waves. On the H200 (gpu7/call3,
# triton 3.6) the uncapped one took 128 registers already; capped, the training forward at chunk 4 ran 3.48 against
# 3.60 ms; 32 channels on 8 warps ran 2.74 and 5.11 ms at chunk 16 and 4 and was dropped. STEPS: the stepping forward
# (one channel per lane, see its kernel), 32 channels in tiles of 4 steps (212 registers, 213 with checkpoints, sm_90
# offline, triton 3.6) or 16 in tiles of 8 (156 / 168, 64 bytes spilled). The backward puts one channel on each lane
# (its N states in registers), so its block is 32 channels per warp, and it holds SUB steps' states at once (SUB · N
# registers per lane; fewer recomputed steps the more it holds): at chunk 4, SUB 4 with PREFETCH (13.6 ms at the
# anchor shape, gpu7/call3) and SUB 2 without (14.3 ms; the best at chunk 16, 19.8 ms); 64 channels on 2 warps
# (session 6's second best at chunk 16). Fewer registers a thread ran slower on the H200 (gpu8/call2, backward with
# the segments' pre-pass, 4 segments unless said): the states split over 4 warps (the sums over n through shared
# memory) 33.1 ms at 128 registers, 35.8 with SUB 2; over 4 lanes (8 channels a warp) 42.0; over 2 lanes capped at
# 168 registers 45.8; one channel a lane capped at 128 registers, SUB 2, 8 segments (664 bytes spilled) 22.9; against
# 15.2 ms for the winner's layout in 4 segments. Chunk 8 (half the checkpoint bytes) ran forward+backward 20.7
# against 18.7 ms.
FORWARD_CONFIGS = [
    {"BLOCK_D": 16, "num_warps": 4, "PREFETCH": 1},
    {"BLOCK_D": 16, "num_warps": 4, "PREFETCH": 1, "maxnreg": 128},
    {"BLOCK_D": 32, "num_warps": 1, "PREFETCH": 1, "STEPS": 1, "TILE": 4},
    {"BLOCK_D": 16, "num_warps": 1, "PREFETCH": 1, "STEPS": 1, "TILE": 8},
]
BACKWARD_CONFIGS = [
    {"BLOCK_D": 32, "num_warps": 1, "SUB": 4, "PREFETCH": 1},
    {"BLOCK_D": 32, "num_warps": 1, "SUB": 2, "PREFETCH": 0},
    {"BLOCK_D": 64, "num_warps": 2, "SUB": 2, "PREFETCH": 0},
]
FORWARD_DEFAULT = {"BLOCK_D": 16, "num_warps": 4, "PREFETCH": 1, "maxnreg": 128}
BACKWARD_DEFAULT = {"BLOCK_D": 32, "num_warps": 1, "SUB": 4, "PREFETCH": 1}
"""FORWARD_DEFAULT, BACKWARD_DEFAULT: what an untuned shape runs when the package does not tune at run time (a
generated package): the H200's choices at the anchor shape (bench/selective_scan_kernel.py, gpu7/call3, chunk 4). A config pinned
without PREFETCH does not prefetch (older tuning tables); one without SUB holds BACKWARD_DEFAULT's."""
INTERPRETER_CONFIG = {"BLOCK_D": 16, "num_warps": 4, "PREFETCH": 1, "SUB": 4}
"""The config used under TRITON_INTERPRET=1 when none is given: the interpreter has nothing to tune (the forward
ignores SUB; the backward's prefetches are PTX, which the interpreter runs as nothing)."""

SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


# ---------------------------------------------------------------------------------------------------------------
# Kernels
# ---------------------------------------------------------------------------------------------------------------


@triton.jit
def _step_offsets(batch, t, stride_b, stride_t, stride_col, cols):
    """Element offsets of row t of one batch row of a (B, T, cols) tensor (int64 base: B·T·D passes 2**31)."""
    return tl.cast(batch, tl.int64) * stride_b + tl.cast(t, tl.int64) * stride_t + cols * stride_col


@triton.jit
def _channel_offsets(batch, stride_b, stride_d, d_offs):
    """Element offsets of state index 0 of a row of channels of a (B, D, N) state (int64: B·D·N may pass 2**31)."""
    return tl.cast(batch, tl.int64) * stride_b + d_offs * stride_d


@triton.jit
def _load_rows(ptr, row_stride, col_offsets, col_mask, n_rows, ROWS: tl.constexpr):
    """A (ROWS, BLOCK_D) block in float32, row r at ptr + r · row_stride + col_offsets (0 from row n_rows on and
    where col_mask is off), loaded one row at a time: the rows of a state block (its state indices) or of a time tile.
    Each (BLOCK_D,) load keeps its channels along the lanes, and so does the arithmetic that uses the block. Loaded
    whole, triton 3.6 (the GPU's) lays such blocks out with 16 or 4 lanes along the rows, and the kernels' sums over
    rows then cross lanes and their rows go through shared memory (sm_90 PTX of a backward chunk: 5123 instructions,
    82 shared stores and 38 barriers, 256 bytes spilled; one channel a lane: 4270, 32, 8 and none)."""
    rows = tl.arange(0, ROWS)[:, None]
    block = tl.zeros((ROWS, col_offsets.shape[0]), dtype=tl.float32)
    for r in tl.static_range(ROWS):
        row = tl.load(ptr + r * row_stride + col_offsets, mask=tl.where(r < n_rows, col_mask, False), other=0.0)
        block = tl.where(rows == r, row.to(tl.float32)[None, :], block)
    return block


@triton.jit
def _time_rows(ptr, stride_b, stride_t, stride_col, pid_b, t0, col_offsets, col_mask, seqlen, ROWS: tl.constexpr):
    """Rows t0 .. t0 + ROWS - 1 of one batch row of a (B, T, cols) tensor as a (ROWS, BLOCK_D) block, one row at a
    time (see `_load_rows`); 0 past the end of the sequence."""
    base = ptr + tl.cast(pid_b, tl.int64) * stride_b + tl.cast(t0, tl.int64) * stride_t
    return _load_rows(base, stride_t, col_offsets * stride_col, col_mask, seqlen - t0, ROWS)


@triton.jit
def _store_rows(ptr, row_stride, col_offsets, col_mask, n_rows, block):
    """Store a (ROWS, BLOCK_D) block one row at a time, rows from n_rows on left out (see `_load_rows`)."""
    rows = tl.arange(0, block.shape[0])[:, None]
    for r in tl.static_range(block.shape[0]):
        row = tl.sum(tl.where(rows == r, block, 0.0), axis=0)  # a row within each lane: a register move
        tl.store(ptr + r * row_stride + col_offsets, row.to(ptr.dtype.element_ty),
                 mask=tl.where(r < n_rows, col_mask, False))


@triton.jit
def _step_row(ptr, stride_b, stride_t, stride_col, pid_b, t, cols, mask):
    """Row t of one batch row of a (B, T, cols) tensor, in float32 (0 where masked)."""
    return tl.load(ptr + _step_offsets(pid_b, t, stride_b, stride_t, stride_col, cols), mask=mask, other=0.0).to(tl.float32)


@triton.jit
def _step_delta(delta_ptr, stride_b, stride_t, stride_d, pid_b, t, d_offs, td_in, bias,
                HAS_DELTA_BIAS: tl.constexpr, DELTA_SOFTPLUS: tl.constexpr):
    """(delta_t + bias, Δ_t) of one step for a row of channels; Δ = 0 past the end (an identity step)."""
    raw = tl.load(delta_ptr + _step_offsets(pid_b, t, stride_b, stride_t, stride_d, d_offs),
                  mask=td_in, other=0.0).to(tl.float32)
    if HAS_DELTA_BIAS:
        raw += bias
    dt = softplus(raw) if DELTA_SOFTPLUS else raw
    return raw, tl.where(td_in, dt, 0.0)


@triton.jit
def _forward_step(state, t, pid_b, d_offs, n_offs, d_in, n_in, seqlen, A_log2, bias,
                  u_ptr, u_stride_b, u_stride_t, u_stride_d,
                  delta_ptr, delta_stride_b, delta_stride_t, delta_stride_d,
                  B_ptr, B_stride_b, B_stride_t, B_stride_n,
                  HAS_DELTA_BIAS: tl.constexpr, DELTA_SOFTPLUS: tl.constexpr):
    """h_t = exp(Δ_t A) h_{t-1} + Δ_t u_t B_t for the (BLOCK_N, BLOCK_D) state of a row of channels."""
    td_in = tl.where(t < seqlen, d_in, False)
    tn_in = tl.where(t < seqlen, n_in, False)
    u = _step_row(u_ptr, u_stride_b, u_stride_t, u_stride_d, pid_b, t, d_offs, td_in)
    _, dt = _step_delta(delta_ptr, delta_stride_b, delta_stride_t, delta_stride_d, pid_b, t, d_offs, td_in, bias,
                        HAS_DELTA_BIAS, DELTA_SOFTPLUS)
    B = _step_row(B_ptr, B_stride_b, B_stride_t, B_stride_n, pid_b, t, n_offs, tn_in)
    return tl.exp2(dt[None, :] * A_log2) * state + (dt * u)[None, :] * B[:, None]


@triton.jit
def _affine_combine(decay_early, state_early, decay_late, state_late):
    """Two consecutive steps h ↦ a·h + x as one step: the early one, then the late one."""
    return decay_early * decay_late, decay_late * state_early + state_late


@triton.jit
def _tile_offsets(batch, t0, stride_b, stride_t, stride_col, rows, cols):
    """Element offsets of the (rows, cols) tile at time t0 of one batch row of a (B, T, cols) tensor.

    The batch and chunk starts are int64 (B·T·D passes 2**31 at long contexts); the in-tile offsets stay int32.
    """
    base = tl.cast(batch, tl.int64) * stride_b + tl.cast(t0, tl.int64) * stride_t
    return base + rows[:, None] * stride_t + cols[None, :] * stride_col


@triton.jit
def _channel_state_offsets(batch, stride_b, stride_d, stride_n, d_offs, n_offs):
    """Element offsets of a (BLOCK_D, BLOCK_N) block of a (B, D, N) state: the forward's orientation."""
    return tl.cast(batch, tl.int64) * stride_b + d_offs[:, None] * stride_d + n_offs[None, :] * stride_n


@triton.jit
def _tile(ptr, stride_b, stride_t, stride_col, pid_b, t0, rows, cols, cols_in, seqlen):
    """The (CHUNK, cols) tile at time t0 of one batch row of a (B, T, cols) tensor, in float32; 0 past the end of the
    sequence and past the columns."""
    mask = ((t0 + rows) < seqlen)[:, None] & cols_in[None, :]
    offsets = _tile_offsets(pid_b, t0, stride_b, stride_t, stride_col, rows, cols)
    return tl.load(ptr + offsets, mask=mask, other=0.0).to(tl.float32)


@triton.jit
def _chunk_inputs(t0, pid_b, rows, d_offs, n_offs, d_in, n_in, seqlen,
                  u_ptr, u_stride_b, u_stride_t, u_stride_d,
                  delta_ptr, delta_stride_b, delta_stride_t, delta_stride_d,
                  B_ptr, B_stride_b, B_stride_t, B_stride_n,
                  C_ptr, C_stride_b, C_stride_t, C_stride_n,
                  z_ptr, z_stride_b, z_stride_t, z_stride_d,
                  HAS_Z: tl.constexpr):
    """The tiles of u, delta, B, C and z (zeros without a gate) of the chunk starting at t0."""
    u = _tile(u_ptr, u_stride_b, u_stride_t, u_stride_d, pid_b, t0, rows, d_offs, d_in, seqlen)
    delta = _tile(delta_ptr, delta_stride_b, delta_stride_t, delta_stride_d, pid_b, t0, rows, d_offs, d_in, seqlen)
    B = _tile(B_ptr, B_stride_b, B_stride_t, B_stride_n, pid_b, t0, rows, n_offs, n_in, seqlen)
    C = _tile(C_ptr, C_stride_b, C_stride_t, C_stride_n, pid_b, t0, rows, n_offs, n_in, seqlen)
    z = tl.zeros_like(u)
    if HAS_Z:
        z = _tile(z_ptr, z_stride_b, z_stride_t, z_stride_d, pid_b, t0, rows, d_offs, d_in, seqlen)
    return u, delta, B, C, z


@triton.jit
def _chunk_states(decay, inp, entering_state):
    """States of one chunk: a log-depth scan of h_t = a_t h_{t-1} + x_t along time from a zero start, plus the
    entering state times the decay since the chunk start. decay, inp: (CHUNK, BLOCK_D, BLOCK_N)."""
    decay_since_start, states = tl.associative_scan((decay, inp), 0, _affine_combine)
    return states + decay_since_start * entering_state[None, :, :]


@triton.jit
def _row(tile, rows, index):
    """tile[index] of a (CHUNK, ...) register tile, as a masked sum (registers cannot be indexed)."""
    return tl.sum(tl.where(rows[:, None, None] == index, tile, 0.0), axis=0)


@triton.jit
def _exchange(x, MASK: tl.constexpr):
    """x[:, d ^ MASK]: what the channel MASK apart holds; a warp shuffle where the channels lie along one warp's
    lanes (across warps, as at 64 channels on 2 warps, triton goes through shared memory)."""
    partner = tl.arange(0, x.shape[1]) ^ MASK
    return tl.gather(x, tl.broadcast_to(partner[None, :], x.shape), axis=1)


@triton.jit
def _halve_across(x, lane, MASK: tl.constexpr):
    """One round of a sum across lanes that scatters as it reduces: each lane keeps half its rows of x (K, BLOCK_D)
    (the upper half where lane & MASK is set), hands the other half to lane ^ MASK and adds the half it gets back:
    (K // 2, BLOCK_D). With one row left, a butterfly step."""
    if x.shape[0] == 1:
        out = x + _exchange(x, MASK)
    else:
        rows = tl.arange(0, x.shape[0])[:, None]
        half = tl.arange(0, x.shape[0] // 2)[:, None]
        upper = ((lane & MASK) != 0)[None, :]
        kept = tl.zeros((x.shape[0] // 2, x.shape[1]), dtype=tl.float32)
        sent = tl.zeros((x.shape[0] // 2, x.shape[1]), dtype=tl.float32)
        for k in tl.static_range(x.shape[0] // 2):
            # Rows of a tile held within each lane: the masked sums are register moves after compilation.
            low = tl.sum(tl.where(rows == k, x, 0.0), axis=0)[None, :]
            high = tl.sum(tl.where(rows == k + x.shape[0] // 2, x, 0.0), axis=0)[None, :]
            kept = tl.where(half == k, tl.where(upper, high, low), kept)
            sent = tl.where(half == k, tl.where(upper, low, high), sent)
        out = kept + _exchange(sent, MASK)
    return out


@triton.jit
def _sum_across_lanes(x, lane, LANES: tl.constexpr):
    """x (BLOCK_N, BLOCK_D) summed over each group of LANES consecutive channels, scattered over the group's lanes:
    (BLOCK_N // LANES or 1, BLOCK_D), the state index of each value given by `_scattered_index`. log2(LANES) rounds of
    `_halve_across`: at N = 16 over 32 lanes 16 shuffles and 16 adds a lane, where tl.sum's butterfly over the lanes
    takes 80 of each (5 a value)."""
    if LANES > 16:
        x = _halve_across(x, lane, 16)
    if LANES > 8:
        x = _halve_across(x, lane, 8)
    if LANES > 4:
        x = _halve_across(x, lane, 4)
    if LANES > 2:
        x = _halve_across(x, lane, 2)
    if LANES > 1:
        x = _halve_across(x, lane, 1)
    return x


@triton.jit
def _scattered_index(lane, BLOCK_N: tl.constexpr, LANES: tl.constexpr):
    """(state index, whether this lane writes it) of each value `_sum_across_lanes` leaves, (ROWS, BLOCK_D) with ROWS
    = BLOCK_N // LANES or 1. Round by round the lane's bits pick the top bit of the index; when BLOCK_N < LANES the
    last rounds leave each sum in LANES // BLOCK_N lanes, of which the first writes it."""
    ROWS: tl.constexpr = BLOCK_N // LANES if BLOCK_N > LANES else 1
    REPLICAS: tl.constexpr = LANES // BLOCK_N if LANES > BLOCK_N else 1
    row = tl.arange(0, ROWS)[:, None]
    index = (lane // REPLICAS)[None, :] * ROWS + row
    return index, ((lane % REPLICAS) == 0)[None, :] & (row >= 0)


@triton.jit
def _prefetch(ptrs):
    """Start moving the cache lines that hold ptrs into L1 (PTX prefetch.global.L1): a later load of them waits for
    the cache rather than DRAM, and nothing waits for the prefetch. Nothing under the interpreter, which runs no PTX."""
    if HARDWARE_MATH:
        tl.inline_asm_elementwise("prefetch.global.L1 [$1]; mov.u32 $0, 0;", "=r,l", [ptrs], dtype=tl.int32,
                                  is_pure=False, pack=1)


@triton.jit
def _prefetch_chunk(chunk, pid_b, d_offs, d_in, seqlen,
                    u_ptr, u_stride_b, u_stride_t, u_stride_d,
                    delta_ptr, delta_stride_b, delta_stride_t, delta_stride_d,
                    B_ptr, B_stride_b, B_stride_t,
                    C_ptr, C_stride_b, C_stride_t,
                    z_ptr, z_stride_b, z_stride_t, z_stride_d,
                    dy_ptr, dy_stride_b, dy_stride_t, dy_stride_d,
                    ckpt_ptr, ckpt_stride_b, ckpt_stride_c, ckpt_stride_d,
                    HAS_Z: tl.constexpr, CHUNK: tl.constexpr):
    """Prefetch what the backward reads of one chunk: its rows of u, delta, z, dy, B, C and its checkpoint. Addresses
    past the sequence or the channels are clamped to the last valid ones (prefetching those is harmless)."""
    rows = tl.minimum(chunk * CHUNK + tl.arange(0, CHUNK), seqlen - 1)
    cols = tl.where(d_in, d_offs, 0)
    _prefetch(u_ptr + _tile_offsets(pid_b, 0, u_stride_b, u_stride_t, u_stride_d, rows, cols))
    _prefetch(delta_ptr + _tile_offsets(pid_b, 0, delta_stride_b, delta_stride_t, delta_stride_d, rows, cols))
    _prefetch(dy_ptr + _tile_offsets(pid_b, 0, dy_stride_b, dy_stride_t, dy_stride_d, rows, cols))
    if HAS_Z:
        _prefetch(z_ptr + _tile_offsets(pid_b, 0, z_stride_b, z_stride_t, z_stride_d, rows, cols))
    # A row of B or C (N values, at most 512 bytes at N = 256) begins a line: its first element's address stands for it.
    _prefetch(B_ptr + tl.cast(pid_b, tl.int64) * B_stride_b + rows * B_stride_t)
    _prefetch(C_ptr + tl.cast(pid_b, tl.int64) * C_stride_b + rows * C_stride_t)
    _prefetch(ckpt_ptr + tl.cast(pid_b, tl.int64) * ckpt_stride_b + tl.cast(chunk, tl.int64) * ckpt_stride_c
              + cols * ckpt_stride_d)


@triton.jit
def _selective_scan_fwd_kernel(
    u_ptr, u_stride_b, u_stride_t, u_stride_d,
    delta_ptr, delta_stride_b, delta_stride_t, delta_stride_d,
    A_ptr, A_stride_d, A_stride_n,
    B_ptr, B_stride_b, B_stride_t, B_stride_n,
    C_ptr, C_stride_b, C_stride_t, C_stride_n,
    D_ptr, D_stride_d,
    z_ptr, z_stride_b, z_stride_t, z_stride_d,
    delta_bias_ptr, delta_bias_stride_d,
    init_ptr, init_stride_b, init_stride_d, init_stride_n,
    y_ptr, y_stride_b, y_stride_t, y_stride_d,
    final_ptr, final_stride_b, final_stride_d, final_stride_n,
    ckpt_ptr, ckpt_stride_b, ckpt_stride_c, ckpt_stride_d, ckpt_stride_n,
    seqlen, n_tiles, dim, dstate,
    HAS_D: tl.constexpr,  # add D ⊙ u
    HAS_Z: tl.constexpr,  # gate with silu(z)
    HAS_DELTA_BIAS: tl.constexpr,  # add delta_bias before the softplus
    HAS_INITIAL_STATE: tl.constexpr,  # start from init (else zeros)
    DELTA_SOFTPLUS: tl.constexpr,  # Δ = softplus(delta + bias), else delta + bias
    SAVE_CHECKPOINTS: tl.constexpr,  # write the state entering every chunk (for the backward)
    PREFETCH: tl.constexpr,  # load the next tile's inputs before this tile's arithmetic
    TILE: tl.constexpr,  # time steps per tile
    CHUNK: tl.constexpr,  # time steps per checkpoint (divides TILE): the backward recomputes from these
    BLOCK_N: tl.constexpr,  # dstate rounded up to a power of two
    BLOCK_D: tl.constexpr,  # channels per program
):
    pid_b = tl.program_id(0)
    pid_d = tl.program_id(1)
    rows = tl.arange(0, TILE)
    d_offs = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    n_offs = tl.arange(0, BLOCK_N)
    d_in = d_offs < dim
    n_in = n_offs < dstate
    dn_in = d_in[:, None] & n_in[None, :]

    # Channels past `dim` and state indices past `dstate` load A = 0, u = 0, B = C = 0: their decay is 1 and their
    # input 0, so they hold a zero state and every store masks them out.
    A = tl.load(A_ptr + d_offs[:, None] * A_stride_d + n_offs[None, :] * A_stride_n, mask=dn_in, other=0.0)
    A_log2 = A.to(tl.float32) * _LOG2E
    if HAS_D:
        skip = tl.load(D_ptr + d_offs * D_stride_d, mask=d_in, other=0.0).to(tl.float32)
    if HAS_DELTA_BIAS:
        bias = tl.load(delta_bias_ptr + d_offs * delta_bias_stride_d, mask=d_in, other=0.0).to(tl.float32)
    if HAS_INITIAL_STATE:
        init_offs = _channel_state_offsets(pid_b, init_stride_b, init_stride_d, init_stride_n, d_offs, n_offs)
        state = tl.load(init_ptr + init_offs, mask=dn_in, other=0.0).to(tl.float32)
    else:
        state = tl.zeros((BLOCK_D, BLOCK_N), dtype=tl.float32)

    # PREFETCH: each iteration loads the next chunk's inputs before its own arithmetic, so that their memory latency
    # overlaps it instead of stalling the loop (a software pipeline of depth one; it costs the registers of the tiles).
    if PREFETCH:
        u_next, dt_next, B_next, C_next, z_next = _chunk_inputs(
            0, pid_b, rows, d_offs, n_offs, d_in, n_in, seqlen,
            u_ptr, u_stride_b, u_stride_t, u_stride_d,
            delta_ptr, delta_stride_b, delta_stride_t, delta_stride_d,
            B_ptr, B_stride_b, B_stride_t, B_stride_n,
            C_ptr, C_stride_b, C_stride_t, C_stride_n,
            z_ptr, z_stride_b, z_stride_t, z_stride_d, HAS_Z
        )
    if SAVE_CHECKPOINTS:
        ckpt_offs = _channel_state_offsets(pid_b, ckpt_stride_b, ckpt_stride_d, ckpt_stride_n, d_offs, n_offs)
    for tile in range(n_tiles):
        t0 = tile * TILE
        if SAVE_CHECKPOINTS:  # the state entering the tile, which is the state entering its first chunk
            tl.store(ckpt_ptr + tl.cast(t0 // CHUNK, tl.int64) * ckpt_stride_c + ckpt_offs, state, mask=dn_in)
        if PREFETCH:
            u, dt, B, C, z = u_next, dt_next, B_next, C_next, z_next
            u_next, dt_next, B_next, C_next, z_next = _chunk_inputs(
                t0 + TILE, pid_b, rows, d_offs, n_offs, d_in, n_in, seqlen,
                u_ptr, u_stride_b, u_stride_t, u_stride_d,
                delta_ptr, delta_stride_b, delta_stride_t, delta_stride_d,
                B_ptr, B_stride_b, B_stride_t, B_stride_n,
                C_ptr, C_stride_b, C_stride_t, C_stride_n,
                z_ptr, z_stride_b, z_stride_t, z_stride_d, HAS_Z
            )
        else:
            u, dt, B, C, z = _chunk_inputs(
                t0, pid_b, rows, d_offs, n_offs, d_in, n_in, seqlen,
                u_ptr, u_stride_b, u_stride_t, u_stride_d,
                delta_ptr, delta_stride_b, delta_stride_t, delta_stride_d,
                B_ptr, B_stride_b, B_stride_t, B_stride_n,
                C_ptr, C_stride_b, C_stride_t, C_stride_n,
                z_ptr, z_stride_b, z_stride_t, z_stride_d, HAS_Z
            )
        td_in = ((t0 + rows) < seqlen)[:, None] & d_in[None, :]
        if HAS_DELTA_BIAS:
            dt += bias[None, :]
        if DELTA_SOFTPLUS:
            dt = softplus(dt)
        dt = tl.where(td_in, dt, 0.0)  # steps past the end are identity steps: decay 1, input 0

        decay = tl.exp2(dt[:, :, None] * A_log2[None, :, :])  # (TILE, BLOCK_D, BLOCK_N), in [0, 1]
        inp = (dt * u)[:, :, None] * B[:, None, :]
        states = _chunk_states(decay, inp, state)
        y = tl.sum(states * C[:, None, :], axis=2)  # (TILE, BLOCK_D)
        if HAS_D:
            y += skip[None, :] * u
        if HAS_Z:
            y *= z * sigmoid(z)
        tl.store(y_ptr + _tile_offsets(pid_b, t0, y_stride_b, y_stride_t, y_stride_d, rows, d_offs),
                 y.to(y_ptr.dtype.element_ty), mask=td_in)
        if SAVE_CHECKPOINTS:
            if CHUNK < TILE:
                # The states entering the tile's later chunks, those after rows CHUNK - 1, 2·CHUNK - 1, …: one
                # masked store of the whole tile, which needs no row taken out of it.
                entered = t0 + rows + 1
                later = ((entered % CHUNK) == 0) & (rows < TILE - 1) & (entered < seqlen)
                later_offs = (tl.cast(entered // CHUNK, tl.int64)[:, None, None] * ckpt_stride_c
                              + ckpt_offs[None, :, :])
                tl.store(ckpt_ptr + later_offs, states, mask=later[:, None, None] & dn_in[None, :, :])
        state = _row(states, rows, TILE - 1)  # padded steps keep the state, so the last row is h_{T-1} at the end

    final_offs = _channel_state_offsets(pid_b, final_stride_b, final_stride_d, final_stride_n, d_offs, n_offs)
    tl.store(final_ptr + final_offs, state, mask=dn_in)


# The stepping forward holds the backward's layout: the (N, BLOCK_D) state with its channels along the lanes, so the
# sum over n for y stays within a lane (at 32 channels a warp; fewer split the states over lanes). Unspecialised channel
# strides keep the (TILE, BLOCK_D) tiles of u, delta and z with their time axis within each lane: Triton would
# otherwise vectorise those loads along the channels and spread time over the lanes.
@triton.jit(do_not_specialize=["u_stride_d", "delta_stride_d", "z_stride_d", "y_stride_d", "A_stride_n", "init_stride_n",
                               "final_stride_n", "ckpt_stride_n"])
def _selective_scan_fwd_steps_kernel(
    u_ptr, u_stride_b, u_stride_t, u_stride_d,
    delta_ptr, delta_stride_b, delta_stride_t, delta_stride_d,
    A_ptr, A_stride_d, A_stride_n,
    B_ptr, B_stride_b, B_stride_t, B_stride_n,
    C_ptr, C_stride_b, C_stride_t, C_stride_n,
    D_ptr, D_stride_d,
    z_ptr, z_stride_b, z_stride_t, z_stride_d,
    delta_bias_ptr, delta_bias_stride_d,
    init_ptr, init_stride_b, init_stride_d, init_stride_n,
    y_ptr, y_stride_b, y_stride_t, y_stride_d,
    final_ptr, final_stride_b, final_stride_d, final_stride_n,
    ckpt_ptr, ckpt_stride_b, ckpt_stride_c, ckpt_stride_d, ckpt_stride_n,
    seqlen, n_tiles, dim, dstate,
    HAS_D: tl.constexpr,
    HAS_Z: tl.constexpr,
    HAS_DELTA_BIAS: tl.constexpr,
    HAS_INITIAL_STATE: tl.constexpr,
    DELTA_SOFTPLUS: tl.constexpr,
    SAVE_CHECKPOINTS: tl.constexpr,
    PREFETCH: tl.constexpr,  # load the next tile's u, delta and z before this tile's steps
    TILE: tl.constexpr,  # time steps a tile: one unrolled block of steps, one store of y
    CHUNK: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """The forward one step after the other, h_t = exp(Δ_t A) h_{t-1} + Δ_t u_t B_t and y_t = h_t C_t: per element an
    exp2 and three multiply-adds, no shuffles (the tile scan's sum over n crosses 16 lanes: 4 shuffles an element).
    Within a tile no store comes between the steps' loads, so the compiler can issue them all ahead; y is written
    once a tile."""
    pid_b = tl.program_id(0)
    pid_d = tl.program_id(1)
    rows = tl.arange(0, TILE)
    d_offs = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    n_offs = tl.arange(0, BLOCK_N)
    d_in = d_offs < dim
    n_in = n_offs < dstate

    A_log2 = _load_rows(A_ptr, A_stride_n, d_offs * A_stride_d, d_in, dstate, BLOCK_N) * _LOG2E
    skip = tl.zeros((BLOCK_D,), dtype=tl.float32)
    if HAS_D:
        skip = tl.load(D_ptr + d_offs * D_stride_d, mask=d_in, other=0.0).to(tl.float32)
    bias = tl.zeros((BLOCK_D,), dtype=tl.float32)
    if HAS_DELTA_BIAS:
        bias = tl.load(delta_bias_ptr + d_offs * delta_bias_stride_d, mask=d_in, other=0.0).to(tl.float32)
    if HAS_INITIAL_STATE:
        state = _load_rows(init_ptr, init_stride_n, _channel_offsets(pid_b, init_stride_b, init_stride_d, d_offs), d_in,
                            dstate, BLOCK_N)
    else:
        state = tl.zeros((BLOCK_N, BLOCK_D), dtype=tl.float32)
    ckpt_offs = _channel_offsets(pid_b, ckpt_stride_b, ckpt_stride_d, d_offs)

    if PREFETCH:
        u_next = _time_rows(u_ptr, u_stride_b, u_stride_t, u_stride_d, pid_b, 0, d_offs, d_in, seqlen, TILE)
        raw_next = _time_rows(delta_ptr, delta_stride_b, delta_stride_t, delta_stride_d, pid_b, 0, d_offs, d_in, seqlen,
                              TILE)
        if HAS_Z:
            z_next = _time_rows(z_ptr, z_stride_b, z_stride_t, z_stride_d, pid_b, 0, d_offs, d_in, seqlen, TILE)
    for tile in range(n_tiles):
        t0 = tile * TILE
        if PREFETCH:
            u, raw = u_next, raw_next
            u_next = _time_rows(u_ptr, u_stride_b, u_stride_t, u_stride_d, pid_b, t0 + TILE, d_offs, d_in, seqlen, TILE)
            raw_next = _time_rows(delta_ptr, delta_stride_b, delta_stride_t, delta_stride_d, pid_b, t0 + TILE, d_offs,
                                  d_in, seqlen, TILE)
            if HAS_Z:
                z = z_next
                z_next = _time_rows(z_ptr, z_stride_b, z_stride_t, z_stride_d, pid_b, t0 + TILE, d_offs, d_in, seqlen,
                                    TILE)
        else:
            u = _time_rows(u_ptr, u_stride_b, u_stride_t, u_stride_d, pid_b, t0, d_offs, d_in, seqlen, TILE)
            raw = _time_rows(delta_ptr, delta_stride_b, delta_stride_t, delta_stride_d, pid_b, t0, d_offs, d_in, seqlen,
                             TILE)
            if HAS_Z:
                z = _time_rows(z_ptr, z_stride_b, z_stride_t, z_stride_d, pid_b, t0, d_offs, d_in, seqlen, TILE)
        td_in = ((t0 + rows) < seqlen)[:, None] & d_in[None, :]
        dt = raw + bias[None, :]
        if DELTA_SOFTPLUS:
            dt = softplus(dt)
        dt = tl.where(td_in, dt, 0.0)  # steps past the end are identity steps: decay 1, input 0
        dtu = dt * u
        y = tl.zeros((TILE, BLOCK_D), dtype=tl.float32)
        for i in tl.static_range(TILE):
            if SAVE_CHECKPOINTS and i % CHUNK == 0:  # the state entering chunk (t0 + i) / CHUNK
                _store_rows(ckpt_ptr + tl.cast((t0 + i) // CHUNK, tl.int64) * ckpt_stride_c, ckpt_stride_n, ckpt_offs,
                             tl.where(t0 + i < seqlen, d_in, False), dstate, state)
            tn_in = tl.where(t0 + i < seqlen, n_in, False)
            B = _step_row(B_ptr, B_stride_b, B_stride_t, B_stride_n, pid_b, t0 + i, n_offs, tn_in)
            C = _step_row(C_ptr, C_stride_b, C_stride_t, C_stride_n, pid_b, t0 + i, n_offs, tn_in)
            # Row i of the tiles: a sum whose other terms are -0.0 within the lane, which the compiler drops.
            dt_i = tl.sum(tl.where(rows[:, None] == i, dt, -0.0), axis=0)
            dtu_i = tl.sum(tl.where(rows[:, None] == i, dtu, -0.0), axis=0)
            state = tl.exp2(dt_i[None, :] * A_log2) * state + dtu_i[None, :] * B[:, None]
            y = tl.where(rows[:, None] == i, tl.sum(state * C[:, None], axis=0)[None, :], y)
        if HAS_D:
            y += skip[None, :] * u
        if HAS_Z:
            y *= z * sigmoid(z)
        _store_rows(y_ptr + tl.cast(pid_b, tl.int64) * y_stride_b + tl.cast(t0, tl.int64) * y_stride_t, y_stride_t,
                    d_offs * y_stride_d, d_in, seqlen - t0, y)

    _store_rows(final_ptr, final_stride_n, _channel_offsets(pid_b, final_stride_b, final_stride_d, d_offs), d_in, dstate,
                 state)


# The backward: stride 1 along the state (A and the (B, D, N) states are contiguous in n) would make Triton vectorise
# those loads and stores along n and lay the whole (N, BLOCK_D) state out with several lanes per channel, so that every
# sum over n would need shuffles across lanes; unspecialised, each lane holds one channel with all N states in
# registers.
@triton.jit(do_not_specialize=["A_stride_n", "ckpt_stride_n", "dfinal_stride_n", "dA_part_stride_n", "dinit_stride_n",
                               "carry_stride_n"])
def _selective_scan_bwd_kernel(
    u_ptr, u_stride_b, u_stride_t, u_stride_d,
    delta_ptr, delta_stride_b, delta_stride_t, delta_stride_d,
    A_ptr, A_stride_d, A_stride_n,
    B_ptr, B_stride_b, B_stride_t, B_stride_n,
    C_ptr, C_stride_b, C_stride_t, C_stride_n,
    D_ptr, D_stride_d,
    z_ptr, z_stride_b, z_stride_t, z_stride_d,
    delta_bias_ptr, delta_bias_stride_d,
    ckpt_ptr, ckpt_stride_b, ckpt_stride_c, ckpt_stride_d, ckpt_stride_n,
    dy_ptr, dy_stride_b, dy_stride_t, dy_stride_d,
    dfinal_ptr, dfinal_stride_b, dfinal_stride_d, dfinal_stride_n,
    du_ptr, du_stride_b, du_stride_t, du_stride_d,
    ddelta_ptr, ddelta_stride_b, ddelta_stride_t, ddelta_stride_d,
    dz_ptr, dz_stride_b, dz_stride_t, dz_stride_d,
    dB_part_ptr, dB_part_stride_b, dB_part_stride_t, dB_part_stride_grp, dB_part_stride_n,
    dC_part_ptr, dC_part_stride_b, dC_part_stride_t, dC_part_stride_grp, dC_part_stride_n,
    dA_part_ptr, dA_part_stride_b, dA_part_stride_d, dA_part_stride_n,
    dD_part_ptr, dD_part_stride_b, dD_part_stride_d,
    dbias_part_ptr, dbias_part_stride_b, dbias_part_stride_d,
    dinit_ptr, dinit_stride_b, dinit_stride_d, dinit_stride_n,
    carry_ptr, carry_stride_b, carry_stride_s, carry_stride_d, carry_stride_n,
    dsum_ptr, dsum_stride_b, dsum_stride_s, dsum_stride_d,
    seqlen, n_chunks, segment_chunks, n_segments, dim, dstate,
    HAS_D: tl.constexpr,
    HAS_Z: tl.constexpr,
    HAS_DELTA_BIAS: tl.constexpr,
    HAS_INITIAL_STATE: tl.constexpr,  # write dL/d initial_state
    DELTA_SOFTPLUS: tl.constexpr,
    HAS_DFINAL: tl.constexpr,  # the final state has a gradient (else it is zero)
    CHUNK: tl.constexpr,  # must be the forward's: the checkpoints are per chunk
    SUB: tl.constexpr,  # steps whose states are held at once (divides CHUNK)
    PREFETCH: tl.constexpr,  # prefetch the next chunk's inputs into L1 while this one runs
    SEGMENTED: tl.constexpr,  # time is split into n_segments > 1 segments (program_id(2)), carry_ptr holds their carries
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,  # channels per program: one per lane (32 · num_warps)
    LANES: tl.constexpr,  # channels per partial sum of dB and dC: a warp's (min(32, BLOCK_D))
):
    pid_b = tl.program_id(0)
    pid_d = tl.program_id(1)
    segment = tl.program_id(2)
    d_offs = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    n_offs = tl.arange(0, BLOCK_N)
    sub_rows = tl.arange(0, SUB)[:, None, None]
    d_in = d_offs < dim
    n_in = n_offs < dstate
    # Where each lane writes its share of the sums over channels for dB and dC (see _sum_across_lanes).
    lane = tl.arange(0, BLOCK_D) % LANES
    part_group = (d_offs // LANES)[None, :]
    part_n, part_writer = _scattered_index(lane, BLOCK_N, LANES)
    part_writer = part_writer & (part_n < dstate)

    A = _load_rows(A_ptr, A_stride_n, d_offs * A_stride_d, d_in, dstate, BLOCK_N)
    A_log2 = A * _LOG2E  # (BLOCK_N, BLOCK_D), like the forward's state; A itself is not kept
    skip = tl.zeros((BLOCK_D,), dtype=tl.float32)
    if HAS_D:
        skip = tl.load(D_ptr + d_offs * D_stride_d, mask=d_in, other=0.0).to(tl.float32)
    bias = tl.zeros((BLOCK_D,), dtype=tl.float32)
    if HAS_DELTA_BIAS:
        bias = tl.load(delta_bias_ptr + d_offs * delta_bias_stride_d, mask=d_in, other=0.0).to(tl.float32)
    # a_{t+1} g_{t+1}: the adjoint flowing into the state of the step being processed from everything after it.
    if HAS_DFINAL:
        adjoint = _load_rows(dfinal_ptr, dfinal_stride_n, _channel_offsets(pid_b, dfinal_stride_b, dfinal_stride_d, d_offs),
                              d_in, dstate, BLOCK_N)
    else:
        adjoint = tl.zeros((BLOCK_N, BLOCK_D), dtype=tl.float32)
    # The adjoint entering this segment at its right end: the final state's, carried back through every later
    # segment j (last first) as carry_j + exp(A ΣΔ_j) · adjoint, from the pre-pass (_selective_scan_bwd_carry_kernel).
    # (A constexpr guard: Triton compiles a loop's body even when it never runs, and unsegmented launches pass None.)
    if SEGMENTED:
        for later in range(n_segments - 1 - segment):
            j = n_segments - 1 - later
            carry = _load_rows(carry_ptr + tl.cast(j - 1, tl.int64) * carry_stride_s, carry_stride_n,
                                _channel_offsets(pid_b, carry_stride_b, carry_stride_d, d_offs), d_in, dstate, BLOCK_N)
            dt_sum = tl.load(dsum_ptr + tl.cast(pid_b, tl.int64) * dsum_stride_b
                             + tl.cast(j - 1, tl.int64) * dsum_stride_s + d_offs * dsum_stride_d, mask=d_in, other=0.0)
            adjoint = carry + tl.exp2(dt_sum[None, :] * A_log2) * adjoint
    dA_acc = tl.zeros((BLOCK_N, BLOCK_D), dtype=tl.float32)
    dD_acc = tl.zeros((BLOCK_D,), dtype=tl.float32)
    dbias_acc = tl.zeros((BLOCK_D,), dtype=tl.float32)

    ckpt_offs = _channel_offsets(pid_b, ckpt_stride_b, ckpt_stride_d, d_offs)
    first_chunk = segment * segment_chunks
    end_chunk = tl.minimum(first_chunk + segment_chunks, n_chunks)
    for step in range(end_chunk - first_chunk):
        chunk = end_chunk - 1 - step
        if PREFETCH:  # the chunk after this one in the loop (before it in time) starts moving into the cache
            _prefetch_chunk(tl.maximum(chunk - 1, first_chunk), pid_b, d_offs, d_in, seqlen,
                            u_ptr, u_stride_b, u_stride_t, u_stride_d,
                            delta_ptr, delta_stride_b, delta_stride_t, delta_stride_d,
                            B_ptr, B_stride_b, B_stride_t, C_ptr, C_stride_b, C_stride_t,
                            z_ptr, z_stride_b, z_stride_t, z_stride_d, dy_ptr, dy_stride_b, dy_stride_t, dy_stride_d,
                            ckpt_ptr, ckpt_stride_b, ckpt_stride_c, ckpt_stride_d, HAS_Z, CHUNK)
        # The chunk's pieces of SUB steps, last first. For each, the forward runs again from the chunk's checkpoint
        # to the piece's end, holding the piece's SUB states (in registers: the time axis lies within each lane),
        # then the adjoint runs back over the piece. Recomputing the steps before the piece costs exp2s (on
        # average (CHUNK / SUB + 1) / 2 per step and state), which are cheaper than holding CHUNK states per lane.
        for piece_from_end in range(CHUNK // SUB):
            t_piece = chunk * CHUNK + (CHUNK // SUB - 1 - piece_from_end) * SUB
            state = _load_rows(ckpt_ptr + tl.cast(chunk, tl.int64) * ckpt_stride_c, ckpt_stride_n, ckpt_offs, d_in,
                                dstate, BLOCK_N)
            # Unrolled SUB times (the trip count is a multiple of SUB), so that several steps' loads are in flight.
            # (A chunk of one piece has nothing to recompute, and Triton cannot unroll a loop that never runs.)
            if SUB < CHUNK:
                for t in tl.range(chunk * CHUNK, t_piece, loop_unroll_factor=SUB):
                    state = _forward_step(state, t, pid_b, d_offs, n_offs, d_in, n_in, seqlen, A_log2, bias,
                                          u_ptr, u_stride_b, u_stride_t, u_stride_d,
                                          delta_ptr, delta_stride_b, delta_stride_t, delta_stride_d,
                                          B_ptr, B_stride_b, B_stride_t, B_stride_n,
                                          HAS_DELTA_BIAS, DELTA_SOFTPLUS)
            states = tl.zeros((SUB, BLOCK_N, BLOCK_D), dtype=tl.float32)
            for i in tl.static_range(SUB):
                state = _forward_step(state, t_piece + i, pid_b, d_offs, n_offs, d_in, n_in, seqlen, A_log2, bias,
                                      u_ptr, u_stride_b, u_stride_t, u_stride_d,
                                      delta_ptr, delta_stride_b, delta_stride_t, delta_stride_d,
                                      B_ptr, B_stride_b, B_stride_t, B_stride_n,
                                      HAS_DELTA_BIAS, DELTA_SOFTPLUS)
                states = tl.where(sub_rows == i, state[None, :, :], states)

            for i in tl.static_range(SUB - 1, -1, -1):
                t = t_piece + i
                td_in = tl.where(t < seqlen, d_in, False)
                tn_in = tl.where(t < seqlen, n_in, False)
                # h_t, read out of the held states: a sum whose other terms are -0.0, which the compiler drops
                h = tl.sum(tl.where(sub_rows == i, states, -0.0), axis=0)
                u = _step_row(u_ptr, u_stride_b, u_stride_t, u_stride_d, pid_b, t, d_offs, td_in)
                dt_raw, dt = _step_delta(delta_ptr, delta_stride_b, delta_stride_t, delta_stride_d, pid_b, t, d_offs,
                                         td_in, bias, HAS_DELTA_BIAS, DELTA_SOFTPLUS)
                B = _step_row(B_ptr, B_stride_b, B_stride_t, B_stride_n, pid_b, t, n_offs, tn_in)
                C = _step_row(C_ptr, C_stride_b, C_stride_t, C_stride_n, pid_b, t, n_offs, tn_in)
                dy = _step_row(dy_ptr, dy_stride_b, dy_stride_t, dy_stride_d, pid_b, t, d_offs, td_in)
                decay = tl.exp2(dt[None, :] * A_log2)
                dtu = dt * u
                inp = dtu[None, :] * B[:, None]

                # Through the gate and the skip: dy_ssm is the gradient of y before the gate (zero past the end).
                if HAS_Z:
                    z = _step_row(z_ptr, z_stride_b, z_stride_t, z_stride_d, pid_b, t, d_offs, td_in)
                    y = tl.sum(h * C[:, None], axis=0) + skip * u
                    gate = sigmoid(z)
                    dz = dy * y * gate * (1.0 + z * (1.0 - gate))  # silu'(z) = σ(z) (1 + z (1 - σ(z)))
                    tl.store(dz_ptr + _step_offsets(pid_b, t, dz_stride_b, dz_stride_t, dz_stride_d, d_offs),
                             dz.to(dz_ptr.dtype.element_ty), mask=td_in)
                    dy_ssm = dy * z * gate
                else:
                    dy_ssm = dy
                du = dy_ssm * skip
                dD_acc += dy_ssm * u

                g = dy_ssm[None, :] * C[:, None] + adjoint  # dL/dh_t
                # dB, dC: each group of LANES channels' share of the sum over channels (a sum across lanes).
                part_mask = tl.where(t < seqlen, part_writer, False)
                dC_part = _sum_across_lanes(dy_ssm[None, :] * h, lane, LANES)
                part_offs = _step_offsets(pid_b, t, dC_part_stride_b, dC_part_stride_t, dC_part_stride_n, part_n)
                tl.store(dC_part_ptr + part_offs + part_group * dC_part_stride_grp, dC_part, mask=part_mask)
                dB_part = _sum_across_lanes(g * dtu[None, :], lane, LANES)
                part_offs = _step_offsets(pid_b, t, dB_part_stride_b, dB_part_stride_t, dB_part_stride_n, part_n)
                tl.store(dB_part_ptr + part_offs + part_group * dB_part_stride_grp, dB_part, mask=part_mask)

                # Through the input Δ u B and the decay exp(Δ A); a_t h_{t-1} = h_t - x_t.
                g_dot_B = tl.sum(g * B[:, None], axis=0)  # (BLOCK_D,)
                g_decayed = g * (h - inp)
                ddt = tl.sum(g_decayed * A_log2, axis=0) * _LN2 + u * g_dot_B
                du += dt * g_dot_B
                dA_acc += g_decayed * dt[None, :]
                if DELTA_SOFTPLUS:
                    ddt = ddt * sigmoid(dt_raw)
                ddt = tl.where(td_in, ddt, 0.0)  # steps past the end have a state but no delta
                dbias_acc += ddt
                tl.store(du_ptr + _step_offsets(pid_b, t, du_stride_b, du_stride_t, du_stride_d, d_offs),
                         du.to(du_ptr.dtype.element_ty), mask=td_in)
                tl.store(ddelta_ptr + _step_offsets(pid_b, t, ddelta_stride_b, ddelta_stride_t, ddelta_stride_d, d_offs),
                         ddt.to(ddelta_ptr.dtype.element_ty), mask=td_in)
                adjoint = decay * g  # into the state of step t - 1

    if HAS_INITIAL_STATE:  # what flows out of the first segment's first step
        _store_rows(dinit_ptr, dinit_stride_n, _channel_offsets(pid_b, dinit_stride_b, dinit_stride_d, d_offs),
                     tl.where(segment == 0, d_in, False), dstate, adjoint)
    part_row = pid_b * n_segments + segment  # the parameter gradients' partial sums: one row per batch row and segment
    _store_rows(dA_part_ptr, dA_part_stride_n, _channel_offsets(part_row, dA_part_stride_b, dA_part_stride_d, d_offs),
                 d_in, dstate, dA_acc)
    if HAS_D:
        tl.store(dD_part_ptr + part_row.to(tl.int64) * dD_part_stride_b + d_offs * dD_part_stride_d, dD_acc, mask=d_in)
    if HAS_DELTA_BIAS:
        tl.store(dbias_part_ptr + part_row.to(tl.int64) * dbias_part_stride_b + d_offs * dbias_part_stride_d,
                 dbias_acc, mask=d_in)


# Like the backward, n strides unspecialised: one channel per lane with its N values in registers.
@triton.jit(do_not_specialize=["A_stride_n", "carry_stride_n"])
def _selective_scan_bwd_carry_kernel(
    delta_ptr, delta_stride_b, delta_stride_t, delta_stride_d,
    A_ptr, A_stride_d, A_stride_n,
    C_ptr, C_stride_b, C_stride_t, C_stride_n,
    z_ptr, z_stride_b, z_stride_t, z_stride_d,
    delta_bias_ptr, delta_bias_stride_d,
    dy_ptr, dy_stride_b, dy_stride_t, dy_stride_d,
    carry_ptr, carry_stride_b, carry_stride_s, carry_stride_d, carry_stride_n,
    dsum_ptr, dsum_stride_b, dsum_stride_s, dsum_stride_d,
    seqlen, segment_chunks, dim, dstate,
    HAS_Z: tl.constexpr,
    HAS_DELTA_BIAS: tl.constexpr,
    DELTA_SOFTPLUS: tl.constexpr,
    CHUNK: tl.constexpr,  # segments are whole chunks: SEGMENT = segment_chunks · CHUNK steps
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,  # channels per program: one per lane
):
    """The backward's pre-pass, for every segment j ≥ 1 (program_id(2) = j - 1) of steps l..r: its adjoint from
    dȳ alone, carry_j = Σ_{t=l..r} exp(A Σ_{τ=l..t} Δ_τ) dȳ_t C_t, and ΣΔ_j = Σ_{t=l..r} Δ_t, so that the adjoint
    leaving the segment at its left end is carry_j + exp(A ΣΔ_j) · (the adjoint entering it at its right end).
    Horner's rule from the right end, carry ← a_t (dȳ_t C_t + carry): an exp2 per step and state, no stores in the
    loop (the loads run ahead freely)."""
    pid_b = tl.program_id(0)
    pid_d = tl.program_id(1)
    slot = tl.program_id(2)
    d_offs = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    n_offs = tl.arange(0, BLOCK_N)
    d_in = d_offs < dim
    n_in = n_offs < dstate

    A_log2 = _load_rows(A_ptr, A_stride_n, d_offs * A_stride_d, d_in, dstate, BLOCK_N) * _LOG2E
    bias = tl.zeros((BLOCK_D,), dtype=tl.float32)
    if HAS_DELTA_BIAS:
        bias = tl.load(delta_bias_ptr + d_offs * delta_bias_stride_d, mask=d_in, other=0.0).to(tl.float32)
    carry = tl.zeros((BLOCK_N, BLOCK_D), dtype=tl.float32)
    dt_sum = tl.zeros((BLOCK_D,), dtype=tl.float32)
    end = (slot + 2) * segment_chunks * CHUNK  # segment slot + 1 ends here (steps past seqlen are identity steps)
    for chunk in range(segment_chunks):
        for i in tl.static_range(CHUNK - 1, -1, -1):
            t = end - (chunk + 1) * CHUNK + i
            td_in = tl.where(t < seqlen, d_in, False)
            tn_in = tl.where(t < seqlen, n_in, False)
            _, dt = _step_delta(delta_ptr, delta_stride_b, delta_stride_t, delta_stride_d, pid_b, t, d_offs, td_in,
                                bias, HAS_DELTA_BIAS, DELTA_SOFTPLUS)
            dy_ssm = _step_row(dy_ptr, dy_stride_b, dy_stride_t, dy_stride_d, pid_b, t, d_offs, td_in)
            if HAS_Z:
                z = _step_row(z_ptr, z_stride_b, z_stride_t, z_stride_d, pid_b, t, d_offs, td_in)
                dy_ssm = dy_ssm * z * sigmoid(z)
            C = _step_row(C_ptr, C_stride_b, C_stride_t, C_stride_n, pid_b, t, n_offs, tn_in)
            carry = tl.exp2(dt[None, :] * A_log2) * (dy_ssm[None, :] * C[:, None] + carry)
            dt_sum += dt
    _store_rows(carry_ptr + tl.cast(slot, tl.int64) * carry_stride_s, carry_stride_n,
                 _channel_offsets(pid_b, carry_stride_b, carry_stride_d, d_offs), d_in, dstate, carry)
    tl.store(dsum_ptr + tl.cast(pid_b, tl.int64) * dsum_stride_b + tl.cast(slot, tl.int64) * dsum_stride_s
             + d_offs * dsum_stride_d, dt_sum, mask=d_in)


# ---------------------------------------------------------------------------------------------------------------
# Launchers
# ---------------------------------------------------------------------------------------------------------------


def shape_key(dim: int, dstate: int, chunk: int, dtype: torch.dtype, *, checkpoints: bool = False) -> str:
    """The autotuners' shape bucket: one config per width, state size, chunk and dtype of u; the forward writing
    checkpoints (training) has buckets of its own, since its stores change which config is fastest."""
    return f"D{dim}-N{dstate}-L{chunk}-{dtype_name(dtype)}" + ("-checkpoints" if checkpoints else "")


def candidates(tuner: Autotuner, dim: int) -> list[dict]:
    """The configs whose block is no wider than the channels need (the narrowest always stays)."""
    widest = max(triton.next_power_of_2(dim), min(c["BLOCK_D"] for c in tuner.configs))
    return [c for c in tuner.configs if c["BLOCK_D"] <= widest]


def _explicit(config: dict | None) -> dict | None:
    if config is None:
        return None
    explicit = {"BLOCK_D": config["BLOCK_D"], "num_warps": config.get("num_warps", 4),
                "PREFETCH": config.get("PREFETCH", 0), "SUB": config.get("SUB", BACKWARD_DEFAULT["SUB"])}
    return explicit | {key: config[key] for key in ("maxnreg", "SEGMENTS", "STEPS", "TILE") if key in config}


FORWARD_TUNER = Autotuner("selective_scan.forward", FORWARD_CONFIGS, INTERPRETER_CONFIG, FORWARD_DEFAULT)
BACKWARD_TUNER = Autotuner("selective_scan.backward", BACKWARD_CONFIGS, INTERPRETER_CONFIG, BACKWARD_DEFAULT)


def tuned_configs() -> dict:
    """The choices so far: {"forward"|"backward": {key: {"BLOCK_D", "num_warps"}}}, keys like D4096-N16-L16-bfloat16.
    JSON-ready; `pin_configs` takes it back. (triton_support.tuning_table() has every op's, with the GPU and versions.)"""
    return {kernel: {key: dict(c) for key, c in tuner.chosen.items()}
            for kernel, tuner in (("forward", FORWARD_TUNER), ("backward", BACKWARD_TUNER))}


def pin_configs(choices: dict) -> None:
    """Pin {"forward"|"backward": {key: config}} (what `tuned_configs` returns), so those keys are never timed."""
    FORWARD_TUNER.pin(choices.get("forward", {}))
    BACKWARD_TUNER.pin(choices.get("backward", {}))


def autotune(config: dict, params: dict[str, tuple[int, ...]], batch: int, seqlen: int, dtype: torch.dtype,
             device: torch.device | str) -> None:
    """The build-time tuning hook (`archgen build --autotune`): run the forward and backward kernels a Mamba op with
    these parameter shapes (A_log (D, N)) runs at batch × seqlen, as the generated block calls them (D, gate z,
    delta_bias, softplus), so that inside triton_support.tuning_session() each tuner tunes its shape bucket."""
    dim, dstate = params["A_log"]
    generator = torch.Generator(device=device).manual_seed(0)

    def randn(*shape, scale=1.0):
        return (torch.randn(shape, generator=generator, device=device) * scale).to(dtype)

    u, z, dy = randn(batch, seqlen, dim), randn(batch, seqlen, dim), randn(batch, seqlen, dim)
    delta = randn(batch, seqlen, dim, scale=0.5)
    B, C = randn(batch, seqlen, dstate), randn(batch, seqlen, dstate)
    A = -torch.rand(dim, dstate, generator=generator, device=device)
    D, delta_bias = torch.ones(dim, device=device), torch.zeros(dim, device=device)
    selective_scan_forward(u, delta, A, B, C, D, z, delta_bias, True, None)  # inference (prefill)
    _, _, checkpoints = selective_scan_forward(u, delta, A, B, C, D, z, delta_bias, True, None, save_checkpoints=True)
    selective_scan_backward(dy, None, u, delta, A, B, C, D, z, delta_bias, True, None, checkpoints)


def selective_scan_forward(
    u: Tensor,
    delta: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Tensor | None = None,
    z: Tensor | None = None,
    delta_bias: Tensor | None = None,
    delta_softplus: bool = True,
    initial_state: Tensor | None = None,
    *,
    save_checkpoints: bool = False,
    chunk_size: int = CHUNK_SIZE,
    config: dict | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Run the forward kernel. Returns y (B, T, D) in u.dtype, the final state (B, D, N) float32, and the
    checkpoints (B, ceil(T / chunk_size), D, N) float32 — (B, 0, D, N) unless save_checkpoints.

    config: {"BLOCK_D": …, "num_warps": …} to bypass the autotuner."""
    _check_inputs(u, delta, A, B, C, D, z, delta_bias, initial_state, chunk_size)
    batch, seqlen, dim = u.shape
    dstate = A.shape[1]
    y = torch.empty((batch, seqlen, dim), dtype=u.dtype, device=u.device)
    final_state = torch.empty((batch, dim, dstate), dtype=torch.float32, device=u.device)
    n_chunks = triton.cdiv(seqlen, chunk_size) if save_checkpoints else 0
    checkpoints = torch.empty((batch, n_chunks, dim, dstate), dtype=torch.float32, device=u.device)
    if batch == 0 or dim == 0 or dstate == 0:
        return y, final_state, checkpoints
    if seqlen == 0:  # nothing to scan: the state passes through
        final_state.copy_(initial_state if initial_state is not None else torch.zeros_like(final_state))
        return y, final_state, checkpoints

    args = (
        *strided(u, 3), *strided(delta, 3), *strided(A, 2), *strided(B, 3), *strided(C, 3),
        *strided(D, 1), *strided(z, 3), *strided(delta_bias, 1), *strided(initial_state, 3),
        *strided(y, 3), *strided(final_state, 3), *strided(checkpoints if save_checkpoints else None, 4),
    )
    constexprs = dict(
        HAS_D=D is not None, HAS_Z=z is not None, HAS_DELTA_BIAS=delta_bias is not None,
        HAS_INITIAL_STATE=initial_state is not None, DELTA_SOFTPLUS=bool(delta_softplus),
        SAVE_CHECKPOINTS=save_checkpoints, CHUNK=chunk_size, BLOCK_N=triton.next_power_of_2(dstate),
    )

    def launch(cfg):
        grid = (batch, triton.cdiv(dim, cfg["BLOCK_D"]))
        kernel = _selective_scan_fwd_steps_kernel if cfg.get("STEPS") else _selective_scan_fwd_kernel
        tile = max(chunk_size, cfg.get("TILE", FORWARD_TILE))
        kernel[grid](*args, seqlen, triton.cdiv(seqlen, tile), dim, dstate, **constexprs, TILE=tile,
                     PREFETCH=bool(cfg.get("PREFETCH", 0)), BLOCK_D=cfg["BLOCK_D"], num_warps=cfg["num_warps"],
                     maxnreg=cfg.get("maxnreg"))

    key = shape_key(dim, dstate, chunk_size, u.dtype, checkpoints=save_checkpoints)
    with on_device(u):
        launch(FORWARD_TUNER.known(key, _explicit(config)) or FORWARD_TUNER.tune(key, launch, candidates(FORWARD_TUNER, dim)))
    return y, final_state, checkpoints


def selective_scan_backward(
    dy: Tensor,
    dfinal_state: Tensor | None,
    u: Tensor,
    delta: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Tensor | None,
    z: Tensor | None,
    delta_bias: Tensor | None,
    delta_softplus: bool,
    initial_state: Tensor | None,
    checkpoints: Tensor,
    *,
    chunk_size: int = CHUNK_SIZE,
    config: dict | None = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor | None, Tensor | None, Tensor | None, Tensor | None]:
    """Run the backward kernel: (du, ddelta, dA, dB, dC, dD, dz, ddelta_bias, dinitial_state), each in its
    input's dtype, None for an absent input. checkpoints: the forward's, saved with the same chunk_size; when
    it has no chunks (the forward did not save them) the forward runs again to write them."""
    batch, seqlen, dim = u.shape
    dstate = A.shape[1]
    n_chunks = triton.cdiv(seqlen, chunk_size)
    if checkpoints.shape[1] != n_chunks and n_chunks > 0:
        if checkpoints.shape[1] != 0:
            raise ValueError(
                f"checkpoints have {checkpoints.shape[1]} chunks, expected ceil(T / chunk_size) = {n_chunks} for "
                f"T = {seqlen}, chunk_size = {chunk_size}: pass the chunk_size the forward ran with"
            )
        _, _, checkpoints = selective_scan_forward(u, delta, A, B, C, D, z, delta_bias, delta_softplus, initial_state,
                                                   save_checkpoints=True, chunk_size=chunk_size)
    if batch == 0 or seqlen == 0 or dim == 0 or dstate == 0:
        return _empty_backward(dfinal_state, u, delta, A, B, C, D, z, delta_bias, initial_state)
    device = u.device
    du = torch.empty((batch, seqlen, dim), dtype=u.dtype, device=device)
    ddelta = torch.empty((batch, seqlen, dim), dtype=delta.dtype, device=device)
    dz = torch.empty((batch, seqlen, dim), dtype=z.dtype, device=device) if z is not None else None
    dinit = torch.empty_like(initial_state, memory_format=torch.contiguous_format) if initial_state is not None else None

    inputs = (
        *strided(u, 3), *strided(delta, 3), *strided(A, 2), *strided(B, 3), *strided(C, 3),
        *strided(D, 1), *strided(z, 3), *strided(delta_bias, 1), *strided(checkpoints, 4),
        *strided(dy, 3), *strided(dfinal_state, 3),
        *strided(du, 3), *strided(ddelta, 3), *strided(dz, 3),
    )
    constexprs = dict(
        HAS_D=D is not None, HAS_Z=z is not None, HAS_DELTA_BIAS=delta_bias is not None,
        HAS_INITIAL_STATE=initial_state is not None, DELTA_SOFTPLUS=bool(delta_softplus),
        HAS_DFINAL=dfinal_state is not None, CHUNK=chunk_size, BLOCK_N=triton.next_power_of_2(dstate),
    )

    def launch(cfg):
        blocks = triton.cdiv(dim, cfg["BLOCK_D"])
        segments = cfg.get("SEGMENTS") or _segments_to_fill(device, batch * blocks * cfg["num_warps"])
        # Whole chunks per segment, and no empty segment: 3 chunks asked into 4 segments run as 3.
        segment_chunks = triton.cdiv(n_chunks, min(segments, n_chunks))
        segments = triton.cdiv(n_chunks, segment_chunks)
        # Partial sums: dA/dD/d delta_bias per batch row and segment, dB/dC per channel block (each
        # launch sizes them for its own block width and segments: tuning tries several).
        dA_part = torch.empty((batch * segments, dim, dstate), dtype=torch.float32, device=device)
        dD_part = torch.empty((batch * segments, dim), dtype=torch.float32, device=device) if D is not None else None
        dbias_part = (torch.empty((batch * segments, dim), dtype=torch.float32, device=device)
                      if delta_bias is not None else None)
        lanes = min(32, cfg["BLOCK_D"])
        dB_part = torch.empty((batch, seqlen, triton.cdiv(dim, lanes), dstate), dtype=torch.float32, device=device)
        dC_part = torch.empty((batch, seqlen, triton.cdiv(dim, lanes), dstate), dtype=torch.float32, device=device)
        # Each segment but the first needs the adjoint entering it from the later ones: the pre-pass's carries.
        carry = dt_sum = None
        if segments > 1:
            carry = torch.empty((batch, segments - 1, dim, dstate), dtype=torch.float32, device=device)
            dt_sum = torch.empty((batch, segments - 1, dim), dtype=torch.float32, device=device)
            _selective_scan_bwd_carry_kernel[(batch, blocks, segments - 1)](
                *strided(delta, 3), *strided(A, 2), *strided(C, 3), *strided(z, 3), *strided(delta_bias, 1),
                *strided(dy, 3), *strided(carry, 4), *strided(dt_sum, 3), seqlen, segment_chunks, dim, dstate,
                HAS_Z=z is not None, HAS_DELTA_BIAS=delta_bias is not None, DELTA_SOFTPLUS=bool(delta_softplus),
                CHUNK=chunk_size, BLOCK_N=constexprs["BLOCK_N"], BLOCK_D=cfg["BLOCK_D"], num_warps=cfg["num_warps"],
            )
        _selective_scan_bwd_kernel[(batch, blocks, segments)](
            *inputs, *strided(dB_part, 4), *strided(dC_part, 4), *strided(dA_part, 3), *strided(dD_part, 2),
            *strided(dbias_part, 2), *strided(dinit, 3), *strided(carry, 4), *strided(dt_sum, 3),
            seqlen, n_chunks, segment_chunks, segments, dim, dstate,
            **constexprs, SUB=min(chunk_size, cfg.get("SUB", BACKWARD_DEFAULT["SUB"])), PREFETCH=cfg.get("PREFETCH", 0),
            SEGMENTED=segments > 1, BLOCK_D=cfg["BLOCK_D"], LANES=lanes, num_warps=cfg["num_warps"],
            maxnreg=cfg.get("maxnreg"),
        )
        # Reduced here, inside what the tuner times: narrower blocks and more segments have more partial sums.
        dB = dB_part.sum(2).to(B.dtype)
        dC = dC_part.sum(2).to(C.dtype)
        dA = dA_part.sum(0).to(A.dtype)
        dD = dD_part.sum(0).to(D.dtype) if D is not None else None
        dbias = dbias_part.sum(0).to(delta_bias.dtype) if delta_bias is not None else None
        return dA, dB, dC, dD, dbias

    key = shape_key(dim, dstate, chunk_size, u.dtype)
    with on_device(u):
        config = BACKWARD_TUNER.known(key, _explicit(config)) or BACKWARD_TUNER.tune(key, launch,
                                                                                    candidates(BACKWARD_TUNER, dim))
        dA, dB, dC, dD, dbias = launch(config)
    return du, ddelta, dA, dB, dC, dD, dz, dbias, dinit


RESIDENT_WARPS_PER_SM = 8
"""Warps of the backward kernel an SM holds at once: it takes 255 registers a thread (Nsight Compute, gpu7/call3)."""


def _segments_to_fill(device: torch.device, warps: int) -> int:
    """Time segments for a backward grid of this many warps (1 without a CUDA device): as many as fit in the warps
    the GPU holds at once, so that a small batch (at B 1, D 4096 the grid is 128 warps against the H200's 1056 slots)
    still fills it; a grid that fills it alone runs unsegmented, since segments cost a pre-pass (at the anchor shape,
    B 8, four segments ran 15.2 ms against 13.6 unsegmented, gpu8/call2 and gpu7/call3)."""
    if device.type != "cuda":
        return 1
    resident = torch.cuda.get_device_properties(device).multi_processor_count * RESIDENT_WARPS_PER_SM
    return max(1, resident // warps)


def _empty_backward(dfinal_state, u, delta, A, B, C, D, z, delta_bias, initial_state):
    """Gradients when there is nothing to scan (a zero-sized dim): zeros, and dL/d h_{-1} = dL/d final state."""

    def zeros(t):
        return torch.zeros_like(t, memory_format=torch.contiguous_format) if t is not None else None

    dinit = None
    if initial_state is not None:
        dinit = dfinal_state.to(initial_state.dtype).clone() if dfinal_state is not None else zeros(initial_state)
    return zeros(u), zeros(delta), zeros(A), zeros(B), zeros(C), zeros(D), zeros(z), zeros(delta_bias), dinit


# ---------------------------------------------------------------------------------------------------------------
# Custom ops: one graph node each for torch.compile / torch.export, with autograd
# ---------------------------------------------------------------------------------------------------------------


def _forward_impl(
    u: Tensor,
    delta: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Tensor | None,
    z: Tensor | None,
    delta_bias: Tensor | None,
    delta_softplus: bool,
    initial_state: Tensor | None,
    save_checkpoints: bool,
    chunk_size: int,
) -> tuple[Tensor, Tensor, Tensor]:
    """archgen_v1::selective_scan -> (y, final_state, checkpoints): `selective_scan_forward` as an operator. The
    checkpoints output is internal (for the backward), non-differentiable, and has no chunks unless save_checkpoints.
    CPU tensors take the reference (see `triton_on_cpu`), without checkpoints: an exported graph runs anywhere."""
    if not (u.is_cuda or triton_on_cpu()):
        if save_checkpoints:
            raise RuntimeError("archgen_v1::selective_scan has no backward for CPU tensors: train on a GPU, or with the "
                               "reference op (ops/ssm.py)")
        y, final_state = selective_scan_reference(u, delta, A, B, C, D, z, delta_bias, delta_softplus, initial_state)
        batch, _, dim = u.shape
        return y, final_state.float(), u.new_empty((batch, 0, dim, A.shape[1]), dtype=torch.float32)
    return selective_scan_forward(u, delta, A, B, C, D, z, delta_bias, delta_softplus, initial_state,
                                  save_checkpoints=save_checkpoints, chunk_size=chunk_size)


def _forward_fake(u, delta, A, B, C, D, z, delta_bias, delta_softplus, initial_state, save_checkpoints, chunk_size):
    batch, seqlen, dim = u.shape
    dstate = A.shape[1]
    n_chunks = (seqlen + chunk_size - 1) // chunk_size if save_checkpoints else 0
    return (
        u.new_empty((batch, seqlen, dim)),
        u.new_empty((batch, dim, dstate), dtype=torch.float32),
        u.new_empty((batch, n_chunks, dim, dstate), dtype=torch.float32),
    )


def _backward_impl(
    dy: Tensor,
    dfinal_state: Tensor | None,
    u: Tensor,
    delta: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Tensor | None,
    z: Tensor | None,
    delta_bias: Tensor | None,
    delta_softplus: bool,
    initial_state: Tensor | None,
    checkpoints: Tensor,
    chunk_size: int,
) -> list[Tensor]:
    """archgen_v1::selective_scan_backward -> [du, ddelta, dA, dB, dC, dD, dz, ddelta_bias, dinitial_state]:
    `selective_scan_backward` as an operator; the gradient of an absent optional input is an empty (0,) tensor
    (an operator cannot return None)."""
    grads = selective_scan_backward(dy, dfinal_state, u, delta, A, B, C, D, z, delta_bias, delta_softplus,
                                    initial_state, checkpoints, chunk_size=chunk_size)
    return [g if g is not None else u.new_empty((0,)) for g in grads]


def _backward_fake(dy, dfinal_state, u, delta, A, B, C, D, z, delta_bias, delta_softplus, initial_state, checkpoints,
                   chunk_size):
    def like(t):
        return torch.empty_like(t, memory_format=torch.contiguous_format) if t is not None else u.new_empty((0,))

    return [like(u), like(delta), like(A), like(B), like(C), like(D), like(z), like(delta_bias), like(initial_state)]


def _setup_context(ctx, inputs, output):
    u, delta, A, B, C, D, z, delta_bias, delta_softplus, initial_state, _save_checkpoints, chunk_size = inputs
    _, _, checkpoints = output
    ctx.save_for_backward(u, delta, A, B, C, D, z, delta_bias, initial_state, checkpoints)
    ctx.delta_softplus = delta_softplus
    ctx.chunk_size = chunk_size
    ctx.mark_non_differentiable(checkpoints)
    ctx.set_materialize_grads(False)  # an unused output's gradient stays None: no zero tensor of its size


def _backward(ctx, dy, dfinal_state, _dcheckpoints):
    u, delta, A, B, C, D, z, delta_bias, initial_state, checkpoints = ctx.saved_tensors
    if dy is None:  # only the final state was used
        dy = torch.zeros_like(u)
    du, ddelta, dA, dB, dC, dD, dz, dbias, dinit = selective_scan_backward_op(
        dy, dfinal_state, u, delta, A, B, C, D, z, delta_bias, ctx.delta_softplus, initial_state, checkpoints,
        ctx.chunk_size,
    )

    def present(grad, t):
        return grad if t is not None else None

    return (du, ddelta, dA, dB, dC, present(dD, D), present(dz, z), present(dbias, delta_bias), None,
            present(dinit, initial_state), None, None)


selective_scan_backward_op = register_op("selective_scan_backward", _backward_impl, _backward_fake)
selective_scan_op = register_op("selective_scan", _forward_impl, _forward_fake, backward=_backward,
                                setup_context=_setup_context)


# ---------------------------------------------------------------------------------------------------------------
# Entry point and reference
# ---------------------------------------------------------------------------------------------------------------


def selective_scan(
    u: Tensor,
    delta: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Tensor | None = None,
    z: Tensor | None = None,
    delta_bias: Tensor | None = None,
    delta_softplus: bool = True,
    initial_state: Tensor | None = None,
    *,
    chunk_size: int = CHUNK_SIZE,
) -> tuple[Tensor, Tensor]:
    """The fused selective scan, differentiable: (y (B, T, D) in u.dtype, final_state (B, D, N) float32).

    Same arguments and results as templates/runtime/ssm.py's `selective_scan` (ops/ssm.py in a generated package)
    without its chunk_size / max_seqlen, which belong to that algorithm; chunk_size here is this kernel's tile.
    Needs CUDA tensors (or TRITON_INTERPRET=1): on anything else it raises, and the caller runs the reference.
    Checkpoints for the backward are written only when autograd will need them.
    """
    exporting = torch.compiler.is_exporting()  # tracing: the op becomes one node of the exported graph
    if not (u.is_cuda or triton_on_cpu() or exporting):
        raise RuntimeError(
            f"the Triton selective_scan kernel needs CUDA tensors, got u on {u.device}: call the reference "
            "(ops/ssm.py selective_scan) instead, or set TRITON_INTERPRET=1 before importing triton to run the "
            "kernel in Triton's CPU interpreter (slow; for tests)"
        )
    tensors = (u, delta, A, B, C, D, z, delta_bias, initial_state)
    save_checkpoints = (not exporting and torch.is_grad_enabled()
                        and any(t is not None and t.requires_grad for t in tensors))
    y, final_state, _ = selective_scan_op(u, delta, A, B, C, D, z, delta_bias, delta_softplus, initial_state,
                                          save_checkpoints, chunk_size)
    return y, final_state


def selective_scan_reference(
    u: Tensor,
    delta: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Tensor | None = None,
    z: Tensor | None = None,
    delta_bias: Tensor | None = None,
    delta_softplus: bool = True,
    initial_state: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """The formula as written, one time step at a time, in float32 (float64 for float64 inputs).

    Same signature and results as `selective_scan`: (y in u.dtype, final_state float32/float64). Slow (a Python
    loop over T) and independent of both the kernel and the chunked scan of templates/runtime/ssm.py."""
    acc = torch.float64 if any(t is not None and t.dtype == torch.float64 for t in (u, delta, A, B, C)) else torch.float32
    dt = delta.to(acc) + (delta_bias.to(acc) if delta_bias is not None else 0.0)
    dt = F.softplus(dt) if delta_softplus else dt  # (B, T, D)
    u_, A_, B_, C_ = u.to(acc), A.to(acc), B.to(acc), C.to(acc)
    batch, seqlen, dim = u.shape
    h = initial_state.to(acc) if initial_state is not None else u_.new_zeros(batch, dim, A.shape[1])  # (B, D, N)
    ys = []
    for t in range(seqlen):
        h = torch.exp(dt[:, t, :, None] * A_) * h + (dt[:, t] * u_[:, t])[:, :, None] * B_[:, t, None, :]
        ys.append((h * C_[:, t, None, :]).sum(-1))  # (B, D)
    y = torch.stack(ys, dim=1) if ys else u_.new_zeros(batch, 0, dim)  # (B, T, D)
    if D is not None:
        y = y + D.to(acc) * u_
    if z is not None:
        y = y * F.silu(z.to(acc))
    return y.to(u.dtype), h


def decomposition(reference, max_seqlen: int) -> dict:
    """{archgen_v1::selective_scan: the op written with `reference`}: how exporters that cannot run Triton (ONNX) lower it.

    reference: a generated package's ops/ssm.py `selective_scan` (this function's signature plus max_seqlen, the bound
    that lets it trace a symbolic length). Exported graphs never save checkpoints, so the third output is empty."""

    def selective_scan_decomposed(u, delta, A, B, C, D, z, delta_bias, delta_softplus, initial_state, save_checkpoints,
                                  chunk_size):
        y, final_state = reference(u, delta, A, B, C, D, z, delta_bias, delta_softplus, initial_state,
                                   max_seqlen=max_seqlen)
        return y, final_state, u.new_empty((u.size(0), 0, u.size(2), A.size(1)), dtype=torch.float32)

    return {op_overload("selective_scan"): selective_scan_decomposed}


def _check_inputs(u, delta, A, B, C, D, z, delta_bias, initial_state, chunk_size) -> None:
    """Shapes, dtypes, devices and the chunk size, each error naming what was expected and what came."""
    if u.dim() != 3 or A.dim() != 2:
        raise ValueError(f"u must be (B, T, D) and A (D, N), got u {tuple(u.shape)} and A {tuple(A.shape)}")
    batch, seqlen, dim = u.shape
    dstate = A.shape[1]
    expected = {
        "delta": (delta, (batch, seqlen, dim)), "A": (A, (dim, dstate)), "B": (B, (batch, seqlen, dstate)),
        "C": (C, (batch, seqlen, dstate)), "D": (D, (dim,)), "z": (z, (batch, seqlen, dim)),
        "delta_bias": (delta_bias, (dim,)), "initial_state": (initial_state, (batch, dim, dstate)),
    }
    for name, (t, shape) in expected.items():
        if t is None:
            continue
        if tuple(t.shape) != shape:
            raise ValueError(f"{name} must have shape {shape} for u (B, T, D) = {(batch, seqlen, dim)} and A (D, N) = "
                             f"{(dim, dstate)}, got {tuple(t.shape)}")
        if t.dtype not in SUPPORTED_DTYPES:
            raise TypeError(f"{name} is {t.dtype}; the kernel takes {', '.join(map(str, SUPPORTED_DTYPES))} "
                            "(it computes in float32): use selective_scan_reference for float64")
        if t.device != u.device:
            raise ValueError(f"{name} is on {t.device}, u on {u.device}: all inputs must be on one device")
    if u.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"u is {u.dtype}; the kernel takes {', '.join(map(str, SUPPORTED_DTYPES))}")
    if chunk_size < 1 or chunk_size & (chunk_size - 1):
        raise ValueError(f"chunk_size must be a power of two, got {chunk_size}")
    if dstate > 256:
        raise ValueError(f"d_state {dstate} is too large for register tiles (at most 256; Mamba-1 uses 16)")
    if u.device.type != "cuda" and not interpreting():
        raise RuntimeError(f"the Triton kernels need CUDA tensors, got {u.device} (or set TRITON_INTERPRET=1 before "
                           "importing triton)")

