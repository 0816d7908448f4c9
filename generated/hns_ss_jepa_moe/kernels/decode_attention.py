"""One decoding step of attention in one Triton launch: the new token's key and value written into the layer's cache,
and each query head's one query attended over the cache under the step's mask. The kernel, its launcher and config
space, the custom op and the reference.

For q (B, Hq, 1, D), the new k and v (B, Hkv, 1, D), the cache's buffers (B, Hkv, S, D) and the step's mask bias
(1 or B, 1, 1, S) (0 where the query sees a slot, -inf where not: ops/attention.py's AttentionMask, which the layers of
one step share)::

    cache[:, :, slot] = k, v          slot = position (KVCache) or position % S (RingKVCache, a window's ring)
    y = softmax(q · cacheᵀ · scale + bias) · cache_v                     (query head h reads key/value head h // G)

as ops/attention.py's `decode_attention` (KVCache.write / RingKVCache.write, then `attend`), in float32, y stored in q's
dtype. The position is read from its tensor on the device (no host sync: the step is replayed from a CUDA graph).

Why a kernel: at batch 1 a decoding step's attention is a few hundred kilobytes of cache, yet it took three launches
(two index_copy for the write, then SDPA: cuDNN's flash kernel, 7 µs for one query at Hymba+'s shapes on the H200,
GPU call 2 of session 9: 11 µs a layer with the writes, 0.36 ms of a 2.2 ms token). Here a program takes one query
head: it streams its key/value head's cache in BLOCK_S slots at a time, with the online softmax (running maximum and
sum) of flash attention, and takes the new key and value from the step's own k and v at the slot being written, so it
never waits for the write; the group's first query head writes them. The G query heads of a group read the same
cache (from L2 after the first). Nothing is reused across slots, so no tensor cores.

Long caches: one program per head walks the whole cache, which is right for the short caches of decoding at a window
or a few thousand positions; beyond MAX_SLOTS the launcher takes the reference (its SDPA splits the keys over
programs).

The op is inference-only (no autograd) and writes the cache in place (`mutates_args`). CPU tensors take the reference
unless TRITON_INTERPRET=1 and ARCHGEN_TRITON_ON_CPU=1 (the tests).
"""

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from torch import Tensor

from .triton_support import Autotuner, dtype_name, on_device, op_overload, register_op, triton_on_cpu

SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
MAX_SLOTS = 4096
"""The longest cache the kernel attends over (one program per query head walks it all); longer ones: the reference."""
# Slots per iteration × head_dim elements of each of k and v in flight, 64 of each a thread at 128 × 64 over 4 warps:
# the loop is not software-pipelined (no cp.async in the sm_90 PTX of triton 3.6), so each iteration waits for its
# loads, and fewer, wider iterations wait less (Hymba+'s decoding caches of a few hundred slots: 3 at 128). Registers
# (ptxas for sm_90, triton 3.6, head_dim 64, bf16): 96 at 128 × 4 warps, 107 at 128 × 8, 89 at 64 × 4; no spills.
CONFIGS = [{"BLOCK_S": s, "num_warps": w} for s, w in ((128, 4), (64, 4), (128, 8), (32, 2))]
DEFAULT_CONFIG = CONFIGS[0]
INTERPRETER_CONFIG = {"BLOCK_S": 16, "num_warps": 1}
LOG2E = tl.constexpr(1.4426950408889634)


@triton.jit
def _decode_attention_kernel(
    q_ptr, k_ptr, v_ptr,  # this step's q (B, HQ, D), k and v (B, HKV, D): any batch and head strides, unit last
    k_cache_ptr, v_cache_ptr,  # (B, HKV, S, D), unit last stride
    position_ptr,  # the new token's position (int64, one element)
    bias_ptr,  # (B or 1, S): 0 / -inf, in any float dtype
    y_ptr,  # (B, HQ, D): any batch and head strides, unit last
    S, D, group, scale,
    stride_qb, stride_qh, stride_kb, stride_kh, stride_vb, stride_vh,
    stride_kcb, stride_kch, stride_kcs, stride_vcb, stride_vch, stride_vcs,
    stride_bias_b, stride_bias_s, stride_yb, stride_yh,
    RING: tl.constexpr,  # slot = position % S (a RingKVCache), else slot = position (a KVCache)
    BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1)
    kv_head = h // group
    d = tl.arange(0, BLOCK_D)
    d_in = d < D
    position = tl.load(position_ptr).to(tl.int64)
    slot = position
    if RING:
        slot = position % S
    q = tl.load(q_ptr + b * stride_qb + h * stride_qh + d, mask=d_in, other=0.0).to(tl.float32)
    k_new = tl.load(k_ptr + b * stride_kb + kv_head * stride_kh + d, mask=d_in, other=0.0)
    v_new = tl.load(v_ptr + b * stride_vb + kv_head * stride_vh + d, mask=d_in, other=0.0)
    k_rows = k_cache_ptr + b * stride_kcb + kv_head * stride_kch
    v_rows = v_cache_ptr + b * stride_vcb + kv_head * stride_vch
    # the group's first query head writes the new key and value; every head takes them from k_new and v_new at the
    # slot (rounded to the cache's dtype, as the write stores them), whether or not the write has landed
    k_new = k_new.to(k_cache_ptr.dtype.element_ty)
    v_new = v_new.to(v_cache_ptr.dtype.element_ty)
    if h % group == 0:
        writes = d_in & (d * 0 + slot < S)  # a (BLOCK_D,) mask: a KVCache written past its end drops the token
        tl.store(k_rows + slot * stride_kcs + d, k_new, mask=writes)
        tl.store(v_rows + slot * stride_vcs + d, v_new, mask=writes)
    k_new = k_new.to(tl.float32)
    v_new = v_new.to(tl.float32)
    bias_row = bias_ptr + b * stride_bias_b
    qk_scale = scale * LOG2E  # scores in log2 units: exp2 below
    running_max = tl.full((), float("-inf"), tl.float32)
    running_sum = tl.full((), 0.0, tl.float32)
    acc = tl.zeros((BLOCK_D,), dtype=tl.float32)
    for s0 in range(0, S, BLOCK_S):
        s = s0 + tl.arange(0, BLOCK_S)
        s_in = s < S
        tile_in = s_in[:, None] & d_in[None, :]
        new_slot = (s == slot)[:, None]
        k = tl.load(k_rows + s[:, None] * stride_kcs + d[None, :], mask=tile_in, other=0.0).to(tl.float32)
        k = tl.where(new_slot, k_new[None, :], k)
        bias = tl.load(bias_row + s * stride_bias_s, mask=s_in, other=float("-inf")).to(tl.float32)
        scores = tl.sum(k * q[None, :], axis=1) * qk_scale + bias * LOG2E  # (BLOCK_S,)
        new_max = tl.maximum(running_max, tl.max(scores, axis=0))
        shift = tl.where(new_max == float("-inf"), 0.0, new_max)  # no slot seen yet: exp2(-inf) = 0 either way
        p = tl.exp2(scores - shift)
        rescale = tl.exp2(running_max - shift)
        v = tl.load(v_rows + s[:, None] * stride_vcs + d[None, :], mask=tile_in, other=0.0).to(tl.float32)
        v = tl.where(new_slot, v_new[None, :], v)
        running_sum = running_sum * rescale + tl.sum(p, axis=0)
        acc = acc * rescale + tl.sum(p[:, None] * v, axis=0)
        running_max = new_max
    y = acc / running_sum
    tl.store(y_ptr + b * stride_yb + h * stride_yh + d, y.to(y_ptr.dtype.element_ty), mask=d_in)


TUNER = Autotuner("decode_attention.forward", CONFIGS, INTERPRETER_CONFIG, default=DEFAULT_CONFIG)


def shape_key(S: int, D: int, group: int, dtype: torch.dtype) -> str:
    """The tuning bucket: cache slots, head width, query heads per key/value head and dtype."""
    return f"S{S}-D{D}-G{group}-{dtype_name(dtype)}"


def _check(q: Tensor, k: Tensor, v: Tensor, k_cache: Tensor, v_cache: Tensor, bias: Tensor) -> None:
    B, HQ, T, D = q.shape
    HKV, S = k_cache.shape[1], k_cache.shape[2]
    if q.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"decode_attention takes {', '.join(map(str, SUPPORTED_DTYPES))}, got {q.dtype}")
    if T != 1 or k.shape != (B, HKV, 1, D) or v.shape != k.shape:
        raise ValueError(f"decode_attention: q (B, Hq, 1, D) and k, v (B, Hkv, 1, D) with the cache's Hkv, got "
                         f"{tuple(q.shape)}, {tuple(k.shape)} and {tuple(v.shape)}")
    if k_cache.shape != (B, HKV, S, D) or v_cache.shape != k_cache.shape or HKV == 0 or HQ % HKV:
        raise ValueError(f"decode_attention: caches (B, Hkv, S, D) = {(B, HKV, S, D)} with Hkv dividing Hq = {HQ}, "
                         f"got {tuple(k_cache.shape)} and {tuple(v_cache.shape)}")
    if bias.dim() != 4 or bias.shape[1:] != (1, 1, S) or bias.shape[0] not in (1, B):
        raise ValueError(f"decode_attention: bias (1 or B, 1, 1, S) with S = {S}, got {tuple(bias.shape)}")


def decode_attention_forward(q: Tensor, k: Tensor, v: Tensor, k_cache: Tensor, v_cache: Tensor, positions: Tensor,
                             bias: Tensor, ring: bool = False, scale: float | None = None,
                             config: dict | None = None) -> Tensor:
    """Run the kernel: writes k and v at the slot of positions[0] and returns y (B, Hq, 1, D) in q's dtype (a view of
    (B, 1, Hq, D), so the layer's transpose and reshape to (B, 1, Hq·D) copy nothing). config {"BLOCK_S",
    "num_warps"} bypasses the tuner."""
    _check(q, k, v, k_cache, v_cache, bias)
    B, HQ, _, D = q.shape
    HKV, S = k_cache.shape[1], k_cache.shape[2]
    q, k, v, k_cache_, v_cache_ = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v, k_cache, v_cache))
    if k_cache_ is not k_cache or v_cache_ is not v_cache:
        raise ValueError("decode_attention writes the caches in place: they need a unit last stride")
    y = q.new_empty((B, 1, HQ, D)).transpose(1, 2)  # (B, HQ, 1, D)
    bias2 = bias.reshape(bias.shape[0], S)
    scale = D**-0.5 if scale is None else scale

    def launch(cfg):
        _decode_attention_kernel[(B, HQ)](
            q, k, v, k_cache, v_cache, positions, bias2, y, S, D, HQ // HKV, scale,
            q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
            k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), v_cache.stride(0), v_cache.stride(1),
            v_cache.stride(2), bias2.stride(0) if bias2.shape[0] > 1 else 0, bias2.stride(1), y.stride(0),
            y.stride(1), RING=ring, BLOCK_S=cfg["BLOCK_S"], BLOCK_D=triton.next_power_of_2(D),
            num_warps=cfg["num_warps"])

    if B and HQ:
        key = shape_key(S, D, HQ // HKV, q.dtype)
        with on_device(q):
            known = TUNER.known(key, config)
            launch(known if known is not None else TUNER.tune(key, launch))
    return y


def autotune(config: dict, params: dict[str, tuple[int, ...]], batch: int, seqlen: int, dtype: torch.dtype,
             device: torch.device | str) -> None:
    """The build-time tuning hook (`archgen build --autotune`): one decoding step of an attention op of this resolved
    config (heads, head_dim, window) at `batch` over a cache of `seqlen` slots (the window's, when it is shorter), so
    that inside triton_support.tuning_session() the tuner tunes that bucket."""
    del params
    HQ, HKV, D = config["n_heads"], config["n_kv_heads"], config["head_dim"]
    S = min(seqlen, config.get("window") or seqlen, MAX_SLOTS)
    generator = torch.Generator(device=device).manual_seed(0)
    q = torch.randn((batch, HQ, 1, D), generator=generator, device=device).to(dtype)
    k, v = (torch.randn((batch, HKV, 1, D), generator=generator, device=device).to(dtype) for _ in range(2))
    k_cache, v_cache = (torch.zeros((batch, HKV, S, D), device=device, dtype=dtype) for _ in range(2))
    bias = torch.zeros((1, 1, 1, S), device=device, dtype=dtype)
    decode_attention_forward(q, k, v, k_cache, v_cache, torch.full((1,), S - 1, device=device), bias)


def _decode_attention_impl(q: Tensor, k: Tensor, v: Tensor, k_cache: Tensor, v_cache: Tensor, positions: Tensor,
                           bias: Tensor, ring: bool, scale: float | None) -> Tensor:
    """archgen_v1::decode_attention_ -> y (B, Hq, 1, D); k_cache and v_cache written at the new token's slot."""
    if not (q.is_cuda or triton_on_cpu()) or k_cache.size(2) > MAX_SLOTS:
        return decode_attention_reference(q, k, v, k_cache, v_cache, positions, bias, ring, scale)
    return decode_attention_forward(q, k, v, k_cache, v_cache, positions, bias, ring, scale)


def _decode_attention_fake(q, k, v, k_cache, v_cache, positions, bias, ring, scale):
    B, HQ, _, D = q.shape
    return q.new_empty((B, 1, HQ, D)).transpose(1, 2)


decode_attention_op = register_op("decode_attention_", _decode_attention_impl, _decode_attention_fake,
                                  mutates_args=("k_cache", "v_cache"))


def decode_attention(q: Tensor, k: Tensor, v: Tensor, k_cache: Tensor, v_cache: Tensor, positions: Tensor,
                     bias: Tensor, ring: bool = False, scale: float | None = None) -> Tensor:
    """One decoding step's attention, as ops/attention.py's `decode_attention`: k and v (B, Hkv, 1, D) written into
    k_cache and v_cache (B, Hkv, S, D) at the slot of positions[0] (modulo S when `ring`), then q (B, Hq, 1, D)
    attended over the cache under bias (1 or B, 1, 1, S), scaled by `scale` (default D^-1/2). Returns y (B, Hq, 1, D)."""
    return decode_attention_op(q, k, v, k_cache, v_cache, positions, bias, ring, scale)


def decode_attention_reference(q: Tensor, k: Tensor, v: Tensor, k_cache: Tensor, v_cache: Tensor, positions: Tensor,
                               bias: Tensor, ring: bool = False, scale: float | None = None) -> Tensor:
    """The same with torch ops: the write, then softmax(q kᵀ scale + bias) v in float32 (float64 for float64
    inputs), y in q's dtype, G = Hq / Hkv query heads per key/value head."""
    slots = positions.reshape(-1)[:1]
    slots = torch.remainder(slots, k_cache.size(2)) if ring else slots
    k_cache.index_copy_(2, slots, k.to(k_cache.dtype))
    v_cache.index_copy_(2, slots, v.to(v_cache.dtype))
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    group = q.size(1) // k_cache.size(1)
    keys = k_cache.to(acc).repeat_interleave(group, dim=1)  # (B, Hq, S, D)
    values = v_cache.to(acc).repeat_interleave(group, dim=1)
    scale = q.size(-1) ** -0.5 if scale is None else scale
    scores = (q.to(acc) @ keys.transpose(-1, -2)) * scale + bias.to(acc)  # (B, Hq, 1, S)
    return (F.softmax(scores, dim=-1) @ values).to(q.dtype)


def decomposition(reference, max_seqlen: int) -> dict:
    """{archgen_v1::decode_attention_: ops/attention.py's `decode_attention`}, for ONNX (an exported program holds
    the write-and-attend form instead: the layers call this op only outside torch.export)."""
    return {op_overload("decode_attention_"): reference}
