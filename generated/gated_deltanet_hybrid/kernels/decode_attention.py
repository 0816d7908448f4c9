"""Attention of a decoding step's few queries over a KV cache, split over the cache (flash-decoding): the kernels,
their launcher and autotune space, the custom op (fake implementation) and the reference.

For q (B, Hq, T, D) (T: one query per sequence when decoding, or a few), the cache's keys and values k, v
(B, Hkv, S, D), the queries' positions (T,) or (B, T) and the slots' positions (S,) or (B, S) (the cache's
`key_positions`, with hide_pads' NEVER_WRITTEN at pads and at slots never written), query i sees slot j when::

    k_pos[j] <= q_pos[i]  and  (no window or q_pos[i] - k_pos[j] < window)

exactly ops/attention.py's attention_mask, and a query that sees no slot outputs zeros (the masked SDPA path's
empty-row guard). Scores are scaled by `scale` (1/sqrt(D) by default, SDPA's).

Why a kernel: cuDNN's SDPA took 7.4 us a layer on the H200 for Hymba+'s one query per head over <= 1024 slots (32
layers: 0.24 ms of a 2.3 ms step), and the masked path builds a (B, 1, T, S) additive mask from the positions first.
Session 9's one-program-a-head kernel (23 us a call) left ~110 of 132 SMs idle while each program walked its cache.

How: grid (splits, Hkv, B). A program takes every query row of one KV head's group (G = Hq / Hkv query heads × T
tokens: 5 rows for Hymba+, 4 for Bamba; padded to a 16-row dot tile) against its share of the slots, BLOCK_S slots a
step: a (rows, D) × (D, BLOCK_S) product, the mask computed from the positions (no mask tensor), an online softmax
(running max m, sum l, unnormalised output acc in float32). With one split it writes the output itself; otherwise it
writes (acc, m, l) and a second launch, one program per (batch, query head, token), combines the splits in a fixed
order (deterministic). `decode_attention_one_launch` saves that launch: each split, its partials written, increments
an int32 counter of its (batch row, KV head) (acq_rel, GPU scope); the program that sees the count of the others
(the last to finish, whichever split it is) combines the group's rows in the same split order with the same code
(`_combine_row`: the output is the two-launch path's, bit for bit, run to run) and zeroes the counter for the next
launch or CUDA-graph replay. The number of splits fills the GPU: about WAVES programs per SM over B × Hkv, at most one per
BLOCK_S slots. The values are loaded with the keys (one memory round trip, not two: masking them by what the tile
sees waited for the positions), and a value row no query of the tile sees is zeroed before the product (a
never-written slot holding NaN stays out of it, as a masked score stays out of the softmax).

Contents: `decode_attention` and `decode_attention_one_launch` (the entry points), the custom ops
`archgen_v1::decode_attention` and `archgen_v1::decode_attention_one_launch`, `combine_counters`, the launcher
`decode_attention_forward` with its autotune space, `decode_attention_reference`, and `decomposition` (empty: the
entry point is not traced by torch.export, which keeps the masked SDPA). CPU tensors take the reference unless
TRITON_INTERPRET=1 and ARCHGEN_TRITON_ON_CPU=1 (the tests). Unmeasured on a GPU so far.
"""

import math

import torch
import triton
import triton.language as tl
from torch import Tensor

from .triton_support import (
    Autotuner,
    calls_implementation_directly,
    dot,
    dtype_name,
    on_device,
    register_op,
    rounded,
    triton_on_cpu,
)

SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
FEW_QUERIES = 8
"""The most query tokens per sequence the model's decoding branch sends here (a decoding step: 1); more (a prompt
into a cache) take the masked SDPA."""
MAX_ROWS = 64
"""The most query rows (G × T) one program's tile holds; more take the reference."""
# BLOCK_S slots a step; WAVES programs per SM aimed at (the splits); warps. Small tiles: a program's work is a few
# (16 × D) × (D × BLOCK_S) products, and the step's whole cache is a megabyte or two. 128 slots take 8 warps: at 4,
# head dim 128 spilled (sm_90, triton 3.6, bench/sm90_audit.py).
CONFIGS = [{"BLOCK_S": slots, "WAVES": waves, "num_warps": warps}
           for slots, waves, warps in ((32, 2, 2), (16, 2, 2), (32, 1, 2), (32, 4, 4), (64, 1, 4), (64, 2, 4),
                                       (128, 1, 8))]
DEFAULT_CONFIG = {"BLOCK_S": 64, "WAVES": 2, "num_warps": 4}
"""What a package runs untuned. Alone, the tuner's timing (kernel by kernel) favours 32-slot tiles; inside Hymba+'s
decoding step, where the split kernel runs beside the Mamba branch, every config as the default in one process
(bench/attention_config_probe.py, H200, session 20): 64 slots over 4 warps 1.5733 / 1.5749 ms a token against
1.5867 / 1.5861 for 32 over 2 (0.8% faster; 128 over 8: 1.5737): fewer, longer programs, fewer dependent round
trips where memory is busy. Another tile splits the cache differently, so the sums run in another order: the logits
differ from the old default's within rounding (graph and eager decoding still agree bit for bit). No config spills
at the seeds' shapes (bench/sm90_audit.py)."""
COMBINE_VALUES_PER_THREAD = 64
"""The most float32 partials (splits × channels) per thread for which a split kernel also combines (one launch):
Hymba+'s 1,024-slot ring (32 splits × 64 channels on 2 warps) holds 32, Bamba-1B at 4,096 slots 64; the Gated
DeltaNet hybrid's attention at 8,192 slots (128 splits × 128 channels) 256, which spills, so it combines in a second
launch."""
INTERPRETER_CONFIG = {"BLOCK_S": 16, "WAVES": 2, "num_warps": 1}
INTERPRETER_SMS = 132
"""The SM count the splits are chosen for under the interpreter (an H100/H200's)."""


# ---------------------------------------------------------------------------------------------------------------
# Kernels
# ---------------------------------------------------------------------------------------------------------------


@triton.jit
def _combine_row(acc_ptr, max_ptr, sum_ptr, out_ptr, row, T, HQ, D, SPLITS, stride_ob, stride_oh, stride_ot,
                 BLOCK_SPLITS: tl.constexpr, BLOCK_D: tl.constexpr, CACHE: tl.constexpr):
    """One (batch, query head, token) row = (batch · HQ + head) · T + token: its splits' (acc, m, l) combined in split
    order (one tile, the same sums whichever program runs it: deterministic), the output normalised and stored.
    CACHE: the partials' loads' cache modifier ("" or ".cg": from L2, not the SM's L1)."""
    splits = tl.arange(0, BLOCK_SPLITS)
    split_inside = splits < SPLITS
    channels = tl.arange(0, BLOCK_D)
    channel_inside = channels < D
    at = row * SPLITS + splits
    m = tl.load(max_ptr + at, mask=split_inside, other=float("-inf"), cache_modifier=CACHE)
    sums = tl.load(sum_ptr + at, mask=split_inside, other=0.0, cache_modifier=CACHE)
    most = tl.max(m, 0)
    weight = tl.exp2(m - tl.where(most == float("-inf"), 0.0, most))  # 0 for a split that saw nothing
    total = tl.sum(sums * weight, 0)
    acc = tl.load(acc_ptr + at[:, None] * D + channels[None, :], mask=split_inside[:, None] & channel_inside[None, :],
                  other=0.0, cache_modifier=CACHE)
    out = tl.sum(acc * weight[:, None], 0) / tl.where(total > 0, total, 1.0)
    token = row % T
    head = (row // T) % HQ
    batch = row // (T * HQ)
    tl.store(out_ptr + batch * stride_ob + head * stride_oh + token * stride_ot + channels,
             rounded(out, out_ptr.dtype.element_ty), mask=channel_inside)


@triton.jit
def _split_kernel(
    q_ptr, k_ptr, v_ptr, q_pos_ptr, k_pos_ptr, out_ptr, acc_ptr, max_ptr, sum_ptr,
    counter_ptr,  # (B · Hkv,) int32, zero between launches: the splits of each (batch row, KV head) done (COMBINE)
    T, S, G, HQ, D, WINDOW, SLOTS_PER_SPLIT, scale_log2,
    stride_qb, stride_qh, stride_qt, stride_kb, stride_kh, stride_ks, stride_vb, stride_vh, stride_vs,
    stride_qpb, stride_kpb, stride_ob, stride_oh, stride_ot,
    HAS_WINDOW: tl.constexpr,  # WINDOW binds
    ONE_SPLIT: tl.constexpr,  # the only split: normalise and write the output
    COMBINE: tl.constexpr,  # several splits: the last to finish combines them (else _combine_kernel does, a launch)
    DOT_PRECISION: tl.constexpr,  # "ieee" for float32 (no tf32 rounding), else the dtype's own
    BLOCK_M: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_SPLITS: tl.constexpr, BLOCK_D_COMBINE: tl.constexpr,  # the combine's tile (COMBINE)
):
    split = tl.program_id(0)
    kv_head = tl.program_id(1)
    batch = tl.program_id(2).to(tl.int64)
    # row r of the tile: query head kv_head·G + r // T, token r % T
    rows = tl.arange(0, BLOCK_M)
    row_inside = rows < G * T
    heads = (kv_head * G + rows // T).to(tl.int64)
    tokens = (rows % T).to(tl.int64)
    channels = tl.arange(0, BLOCK_D)
    channel_inside = channels < D
    q = tl.load(q_ptr + batch * stride_qb + heads[:, None] * stride_qh + tokens[:, None] * stride_qt
                + channels[None, :], mask=row_inside[:, None] & channel_inside[None, :], other=0.0)
    q_pos = tl.load(q_pos_ptr + batch * stride_qpb + tokens, mask=row_inside, other=0)
    k_at = k_ptr + batch * stride_kb + kv_head.to(tl.int64) * stride_kh
    v_at = v_ptr + batch * stride_vb + kv_head.to(tl.int64) * stride_vh
    k_pos_at = k_pos_ptr + batch * stride_kpb

    m = tl.full([BLOCK_M], float("-inf"), tl.float32)
    sums = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    first = split * SLOTS_PER_SPLIT
    last = tl.minimum(first + SLOTS_PER_SPLIT, S)
    for start in range(first, last, BLOCK_S):
        slots = start + tl.arange(0, BLOCK_S)
        slot_inside = slots < last
        k_pos = tl.load(k_pos_at + slots, mask=slot_inside, other=0)
        visible = (k_pos[None, :] <= q_pos[:, None]) & slot_inside[None, :] & row_inside[:, None]
        if HAS_WINDOW:
            visible = visible & (q_pos[:, None] - k_pos[None, :] < WINDOW)
        rows_at = slots.to(tl.int64)[:, None]
        k = tl.load(k_at + rows_at * stride_ks + channels[None, :],
                    mask=slot_inside[:, None] & channel_inside[None, :], other=0.0)
        # v beside k, one memory round trip: a mask of what the tile sees would wait for the positions' load
        v = tl.load(v_at + rows_at * stride_vs + channels[None, :],
                    mask=slot_inside[:, None] & channel_inside[None, :], other=0.0)
        scores = dot(q, tl.trans(k), None, DOT_PRECISION) * scale_log2  # (BLOCK_M, BLOCK_S), log2 units
        scores = tl.where(visible, scores, float("-inf"))
        m_new = tl.maximum(m, tl.max(scores, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # a row that saw nothing yet: p = 0, acc stays 0
        p = tl.exp2(scores - m_safe[:, None])
        alpha = tl.exp2(m - m_safe)
        sums = sums * alpha + tl.sum(p, 1)
        seen = tl.max(visible.to(tl.int32), 0) > 0  # (BLOCK_S,) slots some row of the tile sees
        v = tl.where(seen[:, None], v, 0.0)  # a slot no row sees (never written: it may hold NaN) adds nothing
        acc = acc * alpha[:, None] + dot(rounded(p, v.dtype), v, None, DOT_PRECISION)
        m = m_new

    if ONE_SPLIT:
        out = acc / tl.where(sums > 0, sums, 1.0)[:, None]  # no visible key: acc = 0, the output 0
        tl.store(out_ptr + batch * stride_ob + heads[:, None] * stride_oh + tokens[:, None] * stride_ot
                 + channels[None, :], rounded(out, out_ptr.dtype.element_ty),
                 mask=row_inside[:, None] & channel_inside[None, :])
    else:
        # partials of (batch, head, token) at split: [((batch · HQ + head) · T + token) · splits + split]
        at = ((batch * HQ + heads) * T + tokens) * tl.num_programs(0) + split
        tl.store(acc_ptr + at[:, None] * D + channels[None, :], acc, mask=row_inside[:, None] & channel_inside[None, :])
        tl.store(max_ptr + at, m, mask=row_inside)
        tl.store(sum_ptr + at, sums, mask=row_inside)
        if COMBINE:
            # The last split of this (batch row, KV head) to finish combines all of them. Ordering: the barrier puts
            # every thread's partial stores before the counter's increment (bar.sync orders the CTA's threads); the
            # increment is a release at GPU scope, so they are visible to whichever program's acquire reads a later
            # count (the increments on one counter form a release sequence); that program's threads read the partials
            # after its acquire (triton broadcasts an atomic's result through shared memory behind a barrier), from L2
            # (.cg: the SM's L1 is not coherent with other SMs' stores).
            tl.debug_barrier()
            counter = counter_ptr + batch * tl.num_programs(1) + kv_head
            done = tl.atomic_add(counter, 1, sem="acq_rel", scope="gpu")
            if done == tl.num_programs(0) - 1:
                tl.store(counter, 0)  # zero again for the next launch (a CUDA graph's replay reuses the counter)
                first_row = (batch * HQ + kv_head * G) * T  # the tile's rows are consecutive partial rows
                for r in range(0, G * T):
                    _combine_row(acc_ptr, max_ptr, sum_ptr, out_ptr, first_row + r, T, HQ, D, tl.num_programs(0),
                                 stride_ob, stride_oh, stride_ot, BLOCK_SPLITS, BLOCK_D_COMBINE, ".cg")


@triton.jit
def _combine_kernel(
    acc_ptr, max_ptr, sum_ptr, out_ptr, T, HQ, D, SPLITS, stride_ob, stride_oh, stride_ot,
    BLOCK_SPLITS: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """One (batch, query head, token): its splits' (acc, m, l) combined in split order, the output normalised."""
    row = tl.program_id(0).to(tl.int64)  # (batch · HQ + head) · T + token
    _combine_row(acc_ptr, max_ptr, sum_ptr, out_ptr, row, T, HQ, D, SPLITS, stride_ob, stride_oh, stride_ot,
                 BLOCK_SPLITS, BLOCK_D, "")


# ---------------------------------------------------------------------------------------------------------------
# Launcher and tuning
# ---------------------------------------------------------------------------------------------------------------


TUNER = Autotuner("decode_attention.forward", CONFIGS, INTERPRETER_CONFIG, default=DEFAULT_CONFIG)


def shape_key(G: int, T: int, S: int, D: int, dtype: torch.dtype) -> str:
    """The tuning bucket: rows of a tile, the cache's slots (rounded up to a power of two: they set the splits), head
    dim and dtype; batch and KV heads scale the programs."""
    return f"M{G * T}-S{triton.next_power_of_2(S)}-D{D}-{dtype_name(dtype)}"


def sm_count(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return INTERPRETER_SMS


def split_slots(B: int, HKV: int, S: int, block_s: int, waves: int, sms: int) -> tuple[int, int]:
    """(splits, slots per split): about waves × sms programs over B × HKV, each split a whole number of BLOCK_S
    slots, none empty."""
    wanted = max(1, min(triton.cdiv(S, block_s), triton.cdiv(waves * sms, B * HKV)))
    per_split = triton.cdiv(triton.cdiv(S, wanted), block_s) * block_s
    return triton.cdiv(S, per_split), per_split


def combine_warps(elements: int) -> int:
    """Warps of the combine for its (splits, D) tile: about 32 float32 partials a thread (one warp held 128 splits ×
    64 channels in 255 registers and spilled, sm_90 under triton 3.6, bench/sm90_audit.py)."""
    return max(1, min(8, elements // 1024))


def output_layout(q: Tensor) -> Tensor:
    """An empty (B, Hq, T, D) tensor laid out as SDPA's output is, (B, T, Hq, D) in memory: the model's
    y.transpose(1, 2).reshape(B, T, -1) is then a view."""
    B, H, T, D = q.shape
    return q.new_empty((B, T, H, D)).transpose(1, 2)


_COUNTERS: dict[tuple[str, int, int], Tensor] = {}
"""The one-launch combine's counters by (device, stream, B · Hkv): zeroed once, zero again after every launch (the last
split resets its own), kept for the process: a CUDA graph that captured a launch replays it on the same counters.
Launches on one stream run one after another; two streams get counters of their own, so a parallel block's branches
recorded on two streams (ops/decoding.py's branch_stream) may both attend at once."""


def combine_counters(device: torch.device, count: int) -> Tensor:
    """The (count,) int32 counters of the one-launch combine on device's current stream (see _COUNTERS)."""
    stream = torch.cuda.current_stream(device).cuda_stream if device.type == "cuda" else 0
    key = (str(device), stream, count)
    if key not in _COUNTERS:
        _COUNTERS[key] = torch.zeros(count, dtype=torch.int32, device=device)
    return _COUNTERS[key]


def decode_attention_forward(q: Tensor, k: Tensor, v: Tensor, q_positions: Tensor, k_positions: Tensor, window: int,
                             scale: float, *, one_launch: bool = False, config: dict | None = None) -> Tensor:
    """Run the kernels (window 0: none). q (B, Hq, T, D), k and v (B, Hkv, S, D), each with a unit last stride;
    positions integer tensors on q's device. one_launch: the splits' last program combines them (no combine launch).
    config {"BLOCK_S", "WAVES", "num_warps"} bypasses the tuner."""
    _check(q, k, v, q_positions, k_positions)
    B, HQ, T, D = q.shape
    HKV, S = k.shape[1], k.shape[2]
    G = HQ // HKV
    if G * T > MAX_ROWS or any(t.stride(-1) != 1 for t in (q, k, v)):
        raise ValueError(f"decode_attention_forward takes at most {MAX_ROWS} rows (G × T = {G * T}) and unit last "
                         "strides")
    out = output_layout(q)
    q_positions, k_positions = (p.to(torch.int64).contiguous() for p in (q_positions, k_positions))
    stride_qpb = q_positions.stride(0) if q_positions.dim() == 2 else 0
    stride_kpb = k_positions.stride(0) if k_positions.dim() == 2 else 0
    precision = "ieee" if q.dtype == torch.float32 else "tf32"
    block_m = max(16, triton.next_power_of_2(G * T))
    block_d = max(16, triton.next_power_of_2(D))
    sms = sm_count(q.device)

    def launch(cfg):
        splits, per_split = split_slots(B, HKV, S, cfg["BLOCK_S"], cfg["WAVES"], sms)
        if splits > 1:
            acc = torch.empty((B * HQ * T * splits, D), device=q.device, dtype=torch.float32)
            maxes, sums = (torch.empty(B * HQ * T * splits, device=q.device, dtype=torch.float32) for _ in "ms")
        else:
            acc = maxes = sums = out  # not written
        block_splits, block_d_combine = triton.next_power_of_2(splits), triton.next_power_of_2(D)
        # the last split combines only where its tile of partials fits in registers beside the split's own: past
        # COMBINE_VALUES_PER_THREAD the sm_90 build spills (bench/sm90_audit.py: 128 splits × 128 channels on 2 warps,
        # 255 registers and 136 bytes of spills), and the combine launch is the cheaper way
        combine = one_launch and splits > 1 and (
            block_splits * block_d_combine <= COMBINE_VALUES_PER_THREAD * 32 * cfg["num_warps"])
        counters = combine_counters(q.device, B * HKV) if combine else out  # (not read without COMBINE)
        _split_kernel[(splits, HKV, B)](
            q, k, v, q_positions, k_positions, out, acc, maxes, sums, counters,
            T, S, G, HQ, D, window, per_split, scale * math.log2(math.e),
            q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
            v.stride(0), v.stride(1), v.stride(2), stride_qpb, stride_kpb, out.stride(0), out.stride(1), out.stride(2),
            HAS_WINDOW=window > 0, ONE_SPLIT=splits == 1, COMBINE=combine, DOT_PRECISION=precision,
            BLOCK_M=block_m, BLOCK_S=cfg["BLOCK_S"], BLOCK_D=block_d, BLOCK_SPLITS=block_splits,
            BLOCK_D_COMBINE=block_d_combine, num_warps=cfg["num_warps"],
        )
        if splits > 1 and not combine:
            _combine_kernel[(B * HQ * T,)](
                acc, maxes, sums, out, T, HQ, D, splits, out.stride(0), out.stride(1), out.stride(2),
                BLOCK_SPLITS=block_splits, BLOCK_D=block_d_combine, num_warps=combine_warps(block_splits * block_d_combine),
            )

    if B and HQ and T:
        if S == 0:
            return out.zero_()
        key = shape_key(G, T, S, D, q.dtype)
        with on_device(q):
            known = TUNER.known(key, config)
            launch(known if known is not None else TUNER.tune(key, launch))
    return out


def autotune(config: dict, params: dict[str, tuple[int, ...]], batch: int, seqlen: int, dtype: torch.dtype,
             device: torch.device | str) -> None:
    """The build-time tuning hook (`archgen build --autotune`): one decoding query per sequence of an attention op
    of this resolved config (heads, head_dim, window) over a cache of seqlen slots (a window's ring when it binds),
    so that inside triton_support.tuning_session() the tuner tunes that bucket."""
    del params
    HQ, HKV, D = config["n_heads"], config["n_kv_heads"], config["head_dim"]
    window = config.get("window") or 0
    S = min(seqlen, window) if window else seqlen
    generator = torch.Generator(device=device).manual_seed(0)
    q = torch.randn((batch, HQ, 1, D), generator=generator, device=device).to(dtype)
    k, v = (torch.randn((batch, HKV, S, D), generator=generator, device=device).to(dtype) for _ in "kv")
    positions = torch.arange(S, device=device)
    decode_attention_forward(q, k, v, positions[-1:], positions, window, 1 / math.sqrt(D))


# ---------------------------------------------------------------------------------------------------------------
# Custom op
# ---------------------------------------------------------------------------------------------------------------


def _use_kernel(t: Tensor) -> bool:
    return t.is_cuda or triton_on_cpu()


def _impl(q: Tensor, k: Tensor, v: Tensor, q_positions: Tensor, k_positions: Tensor, window: int,
          scale: float) -> Tensor:
    """archgen_v1::decode_attention -> (B, Hq, T, D) in SDPA's output layout (as the fake says)."""
    if not _use_kernel(q):
        return output_layout(q).copy_(decode_attention_reference(q, k, v, q_positions, k_positions, window or None,
                                                                 scale))
    return decode_attention_forward(q, k, v, q_positions, k_positions, window, scale)


def _one_launch_impl(q: Tensor, k: Tensor, v: Tensor, q_positions: Tensor, k_positions: Tensor, window: int,
                     scale: float) -> Tensor:
    """archgen_v1::decode_attention_one_launch -> as archgen_v1::decode_attention, the splits combined in their launch."""
    if not _use_kernel(q):
        return _impl(q, k, v, q_positions, k_positions, window, scale)
    return decode_attention_forward(q, k, v, q_positions, k_positions, window, scale, one_launch=True)


def _fake(q, k, v, q_positions, k_positions, window, scale):
    return output_layout(q)


decode_attention_op = register_op("decode_attention", _impl, _fake)
decode_attention_one_launch_op = register_op("decode_attention_one_launch", _one_launch_impl, _fake)


# ---------------------------------------------------------------------------------------------------------------
# Entry point and reference
# ---------------------------------------------------------------------------------------------------------------


def _check(q: Tensor, k: Tensor, v: Tensor, q_positions: Tensor, k_positions: Tensor) -> None:
    if q.dim() != 4 or k.dim() != 4 or v.shape != k.shape or k.shape[0] != q.shape[0] or k.shape[3] != q.shape[3]:
        raise ValueError(f"q must be (B, Hq, T, D) and k, v (B, Hkv, S, D), got {tuple(q.shape)}, {tuple(k.shape)} "
                         f"and {tuple(v.shape)}")
    B, HQ, T, _ = q.shape
    HKV, S = k.shape[1], k.shape[2]
    if HKV == 0 or HQ % HKV:
        raise ValueError(f"the KV heads ({HKV}) must divide the query heads ({HQ})")
    if q.dtype not in SUPPORTED_DTYPES or k.dtype != q.dtype or v.dtype != q.dtype:
        raise ValueError(f"decode_attention takes q, k, v of one dtype among {SUPPORTED_DTYPES}, got {q.dtype}, "
                         f"{k.dtype} and {v.dtype}")
    if q_positions.shape not in ((T,), (B, T)) or k_positions.shape not in ((S,), (B, S)):
        raise ValueError(f"positions must be (T,) or (B, T) and (S,) or (B, S) with B={B}, T={T}, S={S}, got "
                         f"{tuple(q_positions.shape)} and {tuple(k_positions.shape)}")
    if q_positions.is_floating_point() or k_positions.is_floating_point():
        raise ValueError("positions must be integers")


def decode_attention(q: Tensor, k: Tensor, v: Tensor, q_positions: Tensor, k_positions: Tensor,
                     window: int | None = None, scale: float | None = None) -> Tensor:
    """softmax(q kᵀ · scale + mask) v for a decoding step's queries q (B, Hq, T, D) over the cache's k, v
    (B, Hkv, S, D), the mask from the positions (see the module docstring); ops/attention.py's `decode_attention`
    (the masked SDPA) it replaces. Returns (B, Hq, T, D) in SDPA's output layout. A gradient, more rows than a tile
    (G × T > MAX_ROWS) or a strided last dim take the reference; torch.export is not meant to reach it (the model
    keeps the masked SDPA while exporting). Several splits are combined by a second launch."""
    return _attend(q, k, v, q_positions, k_positions, window, scale, one_launch=False)


def decode_attention_one_launch(q: Tensor, k: Tensor, v: Tensor, q_positions: Tensor, k_positions: Tensor,
                                window: int | None = None, scale: float | None = None) -> Tensor:
    """`decode_attention` in one launch: the last split of each (batch row, KV head) to finish combines the splits'
    partial results (in split order, as the combine launch does: the same output bit for bit) where a second launch
    did; an int32 counter per (batch row, KV head) finds it (`combine_counters`). What a generated attention's decoding
    step calls unless this kernel function is switched off (then `decode_attention`, two launches)."""
    return _attend(q, k, v, q_positions, k_positions, window, scale, one_launch=True)


def _attend(q: Tensor, k: Tensor, v: Tensor, q_positions: Tensor, k_positions: Tensor, window: int | None,
            scale: float | None, *, one_launch: bool) -> Tensor:
    _check(q, k, v, q_positions, k_positions)
    scale = 1 / math.sqrt(q.size(-1)) if scale is None else float(scale)
    window = 0 if window is None else int(window)
    if window < 0:
        raise ValueError(f"window must be at least 1 (or None), got {window}")
    needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v))
    rows = q.size(1) // k.size(1) * q.size(2)
    if needs_grad or rows > MAX_ROWS or any(t.stride(-1) != 1 for t in (q, k, v)):
        return decode_attention_reference(q, k, v, q_positions, k_positions, window or None, scale)
    if calls_implementation_directly(q):
        return (_one_launch_impl if one_launch else _impl)(q, k, v, q_positions, k_positions, window, scale)
    op = decode_attention_one_launch_op if one_launch else decode_attention_op
    return op(q, k, v, q_positions, k_positions, window, scale)


def decode_attention_reference(q: Tensor, k: Tensor, v: Tensor, q_positions: Tensor, k_positions: Tensor,
                               window: int | None = None, scale: float | None = None) -> Tensor:
    """The definition, in float32 (float64 stays float64): each KV head's values repeated over its query heads, the
    visibility of ops/attention.py's attention_mask, a softmax over the visible keys, zeros for a query that sees
    none; cast back to q's dtype. A slot no query sees is not read (its value zeroed: a cache's never-written slot may
    hold anything), as in the kernel."""
    B, HQ, T, D = q.shape
    G = HQ // k.size(1)
    dtype = torch.promote_types(q.dtype, torch.float32)
    scale = 1 / math.sqrt(D) if scale is None else scale
    k, v = (t.to(dtype).repeat_interleave(G, dim=1) for t in (k, v))  # (B, Hq, S, D)
    scores = q.to(dtype) @ k.transpose(-1, -2) * scale  # (B, Hq, T, S)
    qp = q_positions.reshape(-1, 1, T, 1)  # (1 or B, 1, T, 1)
    kp = k_positions.reshape(-1, 1, 1, k_positions.size(-1))  # (1 or B, 1, 1, S)
    visible = kp <= qp
    if window:
        visible = visible & (qp - kp < window)
    scores = scores.masked_fill(~visible, float("-inf"))
    weights = torch.softmax(scores, dim=-1).nan_to_num(0.0)  # a row of -inf only: NaN -> 0
    v = v.masked_fill(~visible.any(dim=-2).unsqueeze(-1), 0.0)  # (B, Hq, S, D): slots no query sees zeroed
    return (weights @ v).to(q.dtype)


def decomposition(reference=None, max_seqlen: int | None = None) -> dict:
    """{}: the op is never traced (while exporting, the model keeps ops/attention.py's masked SDPA, whose ops every
    exporter lowers), so exporters have nothing to lower. reference and max_seqlen: the common signature of kernels'
    decompositions."""
    del reference, max_seqlen
    return {}
