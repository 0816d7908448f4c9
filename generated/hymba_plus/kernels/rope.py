"""Rotary position embedding of q and k in one Triton kernel, in place when no gradient is needed: the kernel, its
launcher and autotune space, the custom ops (fake implementations, autograd) and the reference.

For q (B, Hq, T, D), k (B, Hk, T, D) and the angles' cos, sin (T, R/2) or (B, T, R/2) in float32 (rope_cos_sin's,
YaRN's mscale already in them), rotate-half pairing (Llama / Hugging Face): channel i < R/2 pairs with i + R/2 and::

    (a, b)  ->  (a · cos - b · sin,  b · cos + a · sin)         channels R .. D-1 pass through (partial rotary)

computed in float32, stored in q's and k's dtype. Every scaling the spec language has (none, linear, NTK, YaRN,
Llama 3) lives in the inverse frequencies and mscale, hence in cos and sin: the kernel is the same for all. The
rotation is orthogonal, so the backward is the rotation by the opposite angle (sin negated): dq = rope⁻¹(dq_out).

Why a kernel: the reference slices each of q and k into halves, upcasts them, multiplies and concatenates (and
concatenates again for partial rotary): several passes over (B, H, T, D) tensors and their float32 copies, twice. Here
one launch reads q and k once and writes them once (in place under inference, where only the R rotated channels
are touched), with each token's cos and sin loaded once for all heads.

How: a program takes BLOCK_T tokens of one sequence, loads their cos and sin (BLOCK_T, R/2) once, then rotates
those rows of every q head and every k head in a loop; where token blocks × batch are too few programs to fill the
GPU (decoding, T = 1), the heads are split over programs too (PROGRAMS_TO_FILL). Any strides with a unit last one
(q from a projection's view-and-transpose is rotated where it lies).

Layout: new outputs lie as a projection's do, (B, T, H, D) in memory seen as (B, H, T, D) (`projection_layout`),
whatever the input's. The forward's input already lies so; the backward's (the attention kernels' dq and dk,
(B, H, T, D) contiguous) does not, and its rotation writes them back in the projection's layout: the view-and-transpose
that made q then passes its gradient to the projection without a copy (a strided copy of dq and dk per attention
layer otherwise: ~100 µs of a Hymba+ layer's training step at 8 × 2048).

A cached step (decoding, or a prompt into a cache) also writes k and v into the KV cache: `apply_rope_write_kv`
returns q rotated (a new tensor in the projection's layout) and stores the rotated k and v (cast to the cache's
dtype) straight into the cache rows `slots` (the cache's `slots(start, T)`: the plain cache's start .. start+T-1, a
ring's p % W), one launch where the rotation and two index_copy_ were three. k and v themselves are left as they
are (attention reads the cache; a rotated k stored back would be a write per element for nothing). q is not rotated
in place: torch.compile on torch 2.11 (the GPU machine's) kept the returned value of an op mutating q but did not
write the mutation back into its input (gpu11's test_write_kv_compiles_in_one_graph; torch 2.13 does), and a q of a
few kilobytes a layer costs nothing to allocate, in a CUDA graph's pool too. Same grid and head split as the
rotation; its own tuner (`rope.write_kv`), whose candidates are the blocks of at most T tokens (a decoding step:
the smallest).

Contents: `apply_rope_qk` (the entry point: differentiable, in place when nothing needs a gradient), the custom
ops `archgen_v1::apply_rope_qk` (functional, autograd) and `archgen_v1::apply_rope_qk_` (in place), the launcher
`rope_forward` with its autotune space, `apply_rope_qk_reference`; `apply_rope_write_kv` (entry point), its custom op
`archgen_v1::apply_rope_write_kv_` (returns q rotated, mutates the caches), launcher `rope_write_kv` and
`apply_rope_write_kv_reference`; `rope_cos_sin` (entry point: the angles' cos and sin in one launch), its custom op
`archgen_v1::rope_cos_sin`, launcher `rope_angles` and `rope_cos_sin_reference`; and `decomposition` for ONNX.
CPU tensors take the reference unless TRITON_INTERPRET=1 and ARCHGEN_TRITON_ON_CPU=1 (the tests).
"""

import torch
import triton
import triton.language as tl
from torch import Tensor

from .triton_support import (
    Autotuner,
    calls_implementation_directly,
    dtype_name,
    on_device,
    op_overload,
    register_op,
    triton_on_cpu,
)

SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# Memory-bound and light: a program moves BLOCK_T × D elements per head, over all heads; 8 to 32 elements per thread
# at head_dim 128 (each candidate is a compile when tuning: the space stays small).
CONFIGS = [{"BLOCK_T": tokens, "num_warps": warps} for tokens, warps in ((8, 2), (16, 4), (32, 4), (32, 8), (64, 8))]
DEFAULT_CONFIG = {"BLOCK_T": 16, "num_warps": 4}
PROGRAMS_TO_FILL = 512
"""Programs a launch aims for (about four per SM of an H100/H200): below it the heads are split over programs."""
INTERPRETER_CONFIG = {"BLOCK_T": 4, "num_warps": 1}


# ---------------------------------------------------------------------------------------------------------------
# Kernel
# ---------------------------------------------------------------------------------------------------------------


@triton.jit
def _rotate_pair(a, b, cos, sin):
    """(a·cos - b·sin, b·cos + a·sin) in float32 as fma(-b, sin, a·cos), fma(a, sin, b·cos): the cos products rounded,
    the sin products fused. Every kernel whose rotation must give these bits calls this. Why explicit: written
    `a * cos - b * sin`, which product LLVM contracts into an fma (Triton compiles with fp fusion on) is its choice in
    each kernel, not the source's: on sm_90 `_rotate_head` fused a·sin into b·cos + a·sin and kernels/qkv_rope.py's
    epilogue b·cos, 1 ulp apart in float32 (their PTX, session 14). Here nothing is left to contract (an fma's addend
    is not, nor -b, Triton's 0 - b), and no -sin lives across rope's head loop (8-25 more registers a thread)."""
    return tl.fma(-b, sin, a * cos), tl.fma(a, sin, b * cos)


@triton.jit
def _rotate_head(src_ptr, dst_ptr, src_rows, dst_rows, token_inside, cos, sin, HALF, PASS,
                 COPY_PASS: tl.constexpr, BLOCK_HALF: tl.constexpr, BLOCK_PASS: tl.constexpr):
    """One head's BLOCK_T rows (src_rows, dst_rows: each row's offset): the R = 2·HALF rotated channels, and the PASS
    channels after them when src is not dst (COPY_PASS). Rounded to src's dtype, then stored in dst's (a cache's
    dtype may differ: the reference rotates, then casts)."""
    pairs = tl.arange(0, BLOCK_HALF)
    inside = token_inside[:, None] & (pairs < HALF)[None, :]
    src = src_ptr + src_rows[:, None] + pairs[None, :]
    dst = dst_ptr + dst_rows[:, None] + pairs[None, :]
    a = tl.load(src, mask=inside, other=0.0).to(tl.float32)
    b = tl.load(src + HALF, mask=inside, other=0.0).to(tl.float32)
    a, b = _rotate_pair(a, b, cos, sin)
    tl.store(dst, a.to(src_ptr.dtype.element_ty).to(dst_ptr.dtype.element_ty), mask=inside)
    tl.store(dst + HALF, b.to(src_ptr.dtype.element_ty).to(dst_ptr.dtype.element_ty), mask=inside)
    if COPY_PASS:
        rest = 2 * HALF + tl.arange(0, BLOCK_PASS)
        inside = token_inside[:, None] & (rest < 2 * HALF + PASS)[None, :]
        values = tl.load(src_ptr + src_rows[:, None] + rest[None, :], mask=inside)
        tl.store(dst_ptr + dst_rows[:, None] + rest[None, :], values.to(dst_ptr.dtype.element_ty), mask=inside)


@triton.jit
def _copy_head(src_ptr, dst_ptr, src_rows, dst_rows, token_inside, D, BLOCK_D: tl.constexpr):
    """One head's BLOCK_T rows of D channels copied, cast to dst's dtype (v into its cache)."""
    channels = tl.arange(0, BLOCK_D)
    inside = token_inside[:, None] & (channels < D)[None, :]
    values = tl.load(src_ptr + src_rows[:, None] + channels[None, :], mask=inside)
    tl.store(dst_ptr + dst_rows[:, None] + channels[None, :], values.to(dst_ptr.dtype.element_ty), mask=inside)


@triton.jit
def _angles(cos_ptr, sin_ptr, batch, tokens, token_inside, stride_cb, stride_ct, HALF, BLOCK_HALF: tl.constexpr):
    """The (BLOCK_T, BLOCK_HALF) cos and sin of a block of tokens (float32; 0 outside)."""
    pairs = tl.arange(0, BLOCK_HALF)
    angle_at = batch * stride_cb + tokens[:, None] * stride_ct + pairs[None, :]
    angle_inside = token_inside[:, None] & (pairs < HALF)[None, :]
    cos = tl.load(cos_ptr + angle_at, mask=angle_inside, other=0.0)
    sin = tl.load(sin_ptr + angle_at, mask=angle_inside, other=0.0)
    return cos, sin


@triton.jit
def _rope_kernel(
    q_ptr, k_ptr, q_out_ptr, k_out_ptr, cos_ptr, sin_ptr,
    T, HQ, HK, HALF, PASS,
    stride_qb, stride_qh, stride_qt, stride_kb, stride_kh, stride_kt,
    stride_qob, stride_qoh, stride_qot, stride_kob, stride_koh, stride_kot,
    stride_cb, stride_ct,
    INVERSE: tl.constexpr,  # rotate by the opposite angle (the backward)
    COPY_PASS: tl.constexpr,  # out of place with channels past R: copy them
    BLOCK_T: tl.constexpr, BLOCK_HALF: tl.constexpr, BLOCK_PASS: tl.constexpr,
):
    tokens = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    batch = tl.program_id(1).to(tl.int64)
    token_inside = tokens < T
    tokens = tokens.to(tl.int64)
    cos, sin = _angles(cos_ptr, sin_ptr, batch, tokens, token_inside, stride_cb, stride_ct, HALF, BLOCK_HALF)
    if INVERSE:
        sin = -sin
    # heads split, split + splits, ...: the pointers advance (64-bit, where head × stride could overflow 32 bits)
    split = tl.program_id(2).to(tl.int64)
    splits = tl.num_programs(2).to(tl.int64)
    q_src = q_ptr + batch * stride_qb + split * stride_qh
    q_dst = q_out_ptr + batch * stride_qob + split * stride_qoh
    for _ in range(tl.program_id(2), HQ, tl.num_programs(2)):
        _rotate_head(q_src, q_dst, tokens * stride_qt, tokens * stride_qot, token_inside, cos, sin, HALF, PASS,
                     COPY_PASS, BLOCK_HALF, BLOCK_PASS)
        q_src += splits * stride_qh
        q_dst += splits * stride_qoh
    k_src = k_ptr + batch * stride_kb + split * stride_kh
    k_dst = k_out_ptr + batch * stride_kob + split * stride_koh
    for _ in range(tl.program_id(2), HK, tl.num_programs(2)):
        _rotate_head(k_src, k_dst, tokens * stride_kt, tokens * stride_kot, token_inside, cos, sin, HALF, PASS,
                     COPY_PASS, BLOCK_HALF, BLOCK_PASS)
        k_src += splits * stride_kh
        k_dst += splits * stride_koh


@triton.jit
def _rope_write_kv_kernel(
    q_ptr, k_ptr, v_ptr, q_out_ptr, k_cache_ptr, v_cache_ptr, slots_ptr, cos_ptr, sin_ptr,
    T, HQ, HK, HALF, PASS, D,
    stride_qb, stride_qh, stride_qt, stride_kb, stride_kh, stride_kt, stride_vb, stride_vh, stride_vt,
    stride_qob, stride_qoh, stride_qot,
    stride_kcb, stride_kch, stride_kct, stride_vcb, stride_vch, stride_vct,
    stride_cb, stride_ct,
    HAS_PASS: tl.constexpr,  # channels past R: copied into q_out and the cache with the rotated ones
    BLOCK_T: tl.constexpr, BLOCK_HALF: tl.constexpr, BLOCK_PASS: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """q rotated into q_out; k rotated and v copied into the caches' rows slots[t] (q, k and v unchanged).
    The grid and the head split are _rope_kernel's."""
    tokens = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    batch = tl.program_id(1).to(tl.int64)
    token_inside = tokens < T
    tokens = tokens.to(tl.int64)
    slots = tl.load(slots_ptr + tokens, mask=token_inside, other=0).to(tl.int64)
    cos, sin = _angles(cos_ptr, sin_ptr, batch, tokens, token_inside, stride_cb, stride_ct, HALF, BLOCK_HALF)
    # heads split, split + splits, ...: each head's rows from its index (64-bit), where advancing four pointers made
    # ptxas spill one of them in the loop (sm_90, bench/sm90_audit.py)
    q_at, q_out_at = q_ptr + batch * stride_qb, q_out_ptr + batch * stride_qob
    for head in range(tl.program_id(2), HQ, tl.num_programs(2)):
        h = tl.cast(head, tl.int64)
        _rotate_head(q_at + h * stride_qh, q_out_at + h * stride_qoh, tokens * stride_qt, tokens * stride_qot,
                     token_inside, cos, sin, HALF, PASS, HAS_PASS, BLOCK_HALF, BLOCK_PASS)
    k_rows, v_rows = tokens * stride_kt, tokens * stride_vt
    k_slots, v_slots = slots * stride_kct, slots * stride_vct
    for head in range(tl.program_id(2), HK, tl.num_programs(2)):
        h = tl.cast(head, tl.int64)
        _rotate_head(k_ptr + batch * stride_kb + h * stride_kh, k_cache_ptr + batch * stride_kcb + h * stride_kch,
                     k_rows, k_slots, token_inside, cos, sin, HALF, PASS, HAS_PASS, BLOCK_HALF, BLOCK_PASS)
        _copy_head(v_ptr + batch * stride_vb + h * stride_vh, v_cache_ptr + batch * stride_vcb + h * stride_vch,
                   v_rows, v_slots, token_inside, D, BLOCK_D)


# ---------------------------------------------------------------------------------------------------------------
# Launcher and tuning
# ---------------------------------------------------------------------------------------------------------------


TUNER = Autotuner("rope.forward", CONFIGS, INTERPRETER_CONFIG, default=DEFAULT_CONFIG)


@triton.jit
def _angles_kernel(positions_ptr, inv_freq_ptr, cos_ptr, sin_ptr, ROWS, HALF, mscale,
                   BLOCK_ROWS: tl.constexpr, BLOCK_HALF: tl.constexpr, SCALED: tl.constexpr):
    """cos and sin of positions · inv_freq for BLOCK_ROWS positions, as rope_cos_sin_reference computes them: the
    position cast to float32 (exact below 2**24), one float32 product, cos and sin (float32 tl.cos and tl.sin lower to
    libdevice's __nv_cosf and __nv_sinf on NVIDIA, CUDA's cosf and sinf, which torch's kernels call: ptx for sm_90,
    triton 3.9), then times mscale."""
    rows = tl.program_id(0) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    pairs = tl.arange(0, BLOCK_HALF)
    positions = tl.load(positions_ptr + rows, mask=rows < ROWS, other=0).to(tl.float32)
    inv_freq = tl.load(inv_freq_ptr + pairs, mask=pairs < HALF, other=0.0).to(tl.float32)
    angles = positions[:, None] * inv_freq[None, :]
    cos, sin = tl.cos(angles), tl.sin(angles)
    if SCALED:
        cos, sin = cos * mscale, sin * mscale
    at = rows[:, None] * HALF + pairs[None, :]
    inside = (rows < ROWS)[:, None] & (pairs < HALF)[None, :]
    tl.store(cos_ptr + at, cos, mask=inside)
    tl.store(sin_ptr + at, sin, mask=inside)


def shape_key(D: int, R: int, dtype: torch.dtype) -> str:
    """The tuning bucket: head and rotary widths and dtype; batch, heads and length only scale the work."""
    return f"D{D}-R{R}-{dtype_name(dtype)}"


def projection_layout(t: Tensor) -> Tensor:
    """An empty tensor of t's shape (B, H, T, D), dtype and device, laid out as a projection's output is:
    (B, T, H, D) in memory, transposed."""
    B, H, T, D = t.shape
    return t.new_empty((B, T, H, D)).transpose(1, 2)


def rope_forward(q: Tensor, k: Tensor, cos: Tensor, sin: Tensor, *, inverse: bool = False, in_place: bool = False,
                 config: dict | None = None) -> tuple[Tensor, Tensor]:
    """Run the kernel: (q, k) rotated by the angles (by their opposites when `inverse`), written into q and k
    themselves when `in_place`, else into new tensors in the projection's layout. config {"BLOCK_T", "num_warps"}
    bypasses the tuner."""
    _check(q, k, cos, sin)
    if in_place and (q.stride(-1) != 1 or k.stride(-1) != 1):
        raise ValueError(f"rope in place needs q and k with a unit last stride, got {q.stride()} and {k.stride()}")
    q, k = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k))
    q_out, k_out = (q, k) if in_place else (projection_layout(q), projection_layout(k))
    B, HQ, T, D = q.shape
    HK = k.shape[1]
    half = cos.shape[-1]
    cos, sin = (a.to(torch.float32).contiguous() for a in (cos, sin))
    stride_cb = cos.stride(0) if cos.dim() == 3 else 0
    pass_through = D - 2 * half

    def launch(cfg):
        token_blocks = triton.cdiv(T, cfg["BLOCK_T"])
        # heads split over programs only where (token blocks × batch) alone would leave the GPU idle (decoding: T=1)
        splits = min(max(HQ, HK), triton.cdiv(PROGRAMS_TO_FILL, token_blocks * B))
        _rope_kernel[(token_blocks, B, splits)](
            q, k, q_out, k_out, cos, sin, T, HQ, HK, half, pass_through,
            q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
            q_out.stride(0), q_out.stride(1), q_out.stride(2), k_out.stride(0), k_out.stride(1), k_out.stride(2),
            stride_cb, cos.stride(-2), INVERSE=inverse, COPY_PASS=not in_place and pass_through > 0,
            BLOCK_T=cfg["BLOCK_T"], BLOCK_HALF=triton.next_power_of_2(half),
            BLOCK_PASS=triton.next_power_of_2(max(pass_through, 1)), num_warps=cfg["num_warps"],
        )

    if B and T:
        key = shape_key(D, 2 * half, q.dtype)
        with on_device(q):
            known = TUNER.known(key, config)
            launch(known if known is not None else TUNER.tune(key, launch))
    return q_out, k_out


WRITE_TUNER = Autotuner("rope.write_kv", CONFIGS, INTERPRETER_CONFIG, default=DEFAULT_CONFIG)


def write_candidates(T: int) -> list[dict]:
    """The configs worth launching for T new tokens: blocks of at most T tokens (rounded up to a power of two, at
    least the smallest block), so a decoding step (T = 1) runs the smallest block, not 16 rows of which 15 idle."""
    most = max(triton.next_power_of_2(T), min(config["BLOCK_T"] for config in CONFIGS))
    return [config for config in CONFIGS if config["BLOCK_T"] <= most]


def rope_write_kv(q: Tensor, k: Tensor, v: Tensor, cos: Tensor, sin: Tensor, k_cache: Tensor, v_cache: Tensor,
                  slots: Tensor, *, config: dict | None = None) -> Tensor:
    """Run the cache-writing kernel: k rotated and v copied into rows `slots` of the caches (cast to their dtype);
    returns q rotated, a new tensor in the projection's layout. config {"BLOCK_T", "num_warps"} bypasses the tuner."""
    _check(q, k, cos, sin)
    _check_cache(q, k, v, k_cache, v_cache, slots)
    if any(t.stride(-1) != 1 for t in (q, k, v, k_cache, v_cache)):
        raise ValueError("rope_write_kv needs q, k, v and the caches with a unit last stride")
    B, HQ, T, D = q.shape
    HK = k.shape[1]
    half = cos.shape[-1]
    cos, sin = (a.to(torch.float32).contiguous() for a in (cos, sin))
    slots = slots.contiguous()  # the kernel reads slots[t] at t (a cache's slots are: no copy)
    q_out = projection_layout(q)
    stride_cb = cos.stride(0) if cos.dim() == 3 else 0
    pass_through = D - 2 * half

    def launch(cfg):
        token_blocks = triton.cdiv(T, cfg["BLOCK_T"])
        splits = min(max(HQ, HK), triton.cdiv(PROGRAMS_TO_FILL, token_blocks * B))  # as rope_forward's
        _rope_write_kv_kernel[(token_blocks, B, splits)](
            q, k, v, q_out, k_cache, v_cache, slots, cos, sin, T, HQ, HK, half, pass_through, D,
            q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
            v.stride(0), v.stride(1), v.stride(2), q_out.stride(0), q_out.stride(1), q_out.stride(2),
            k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
            v_cache.stride(0), v_cache.stride(1), v_cache.stride(2), stride_cb, cos.stride(-2),
            HAS_PASS=pass_through > 0, BLOCK_T=cfg["BLOCK_T"], BLOCK_HALF=triton.next_power_of_2(half),
            BLOCK_PASS=triton.next_power_of_2(max(pass_through, 1)), BLOCK_D=triton.next_power_of_2(D),
            num_warps=cfg["num_warps"],
        )

    if B and T:
        candidates = write_candidates(T)
        # the bucket: rope's, the cache's dtype, and the candidates (a decoding step's T = 1 is a bucket of its own)
        key = f"{shape_key(D, 2 * half, q.dtype)}-{dtype_name(k_cache.dtype)}-T{max(c['BLOCK_T'] for c in candidates)}"
        with on_device(q):
            known = WRITE_TUNER.known(key, config)
            launch(known if known is not None else WRITE_TUNER.tune(key, launch, candidates))
    return q_out


def autotune(config: dict, params: dict[str, tuple[int, ...]], batch: int, seqlen: int, dtype: torch.dtype,
             device: torch.device | str) -> None:
    """The build-time tuning hook (`archgen build --autotune`): rotate the q and k of an attention op of this resolved
    config (heads, head_dim, rope.rotary_dim) at batch × seqlen tokens, in place and not, and write them into a
    cache at seqlen tokens and at one (decoding), so that inside triton_support.tuning_session() the tuners tune those
    buckets."""
    del params
    D, half = config["head_dim"], config["rope"]["rotary_dim"] // 2
    generator = torch.Generator(device=device).manual_seed(0)
    q = torch.randn((batch, seqlen, config["n_heads"], D), generator=generator, device=device).to(dtype)
    k = torch.randn((batch, seqlen, config["n_kv_heads"], D), generator=generator, device=device).to(dtype)
    angles = torch.rand((seqlen, half), generator=generator, device=device)
    q, k = q.transpose(1, 2), k.transpose(1, 2)  # (B, H, T, D) views, as a projection's output is rotated
    rope_forward(q, k, angles.cos(), angles.sin())
    rope_forward(q, k, angles.cos(), angles.sin(), in_place=True)
    # a cached forward of seqlen tokens and a decoding step, each writing k and v into a cache of seqlen slots
    v = torch.randn_like(k)
    k_cache, v_cache = (torch.zeros((batch, config["n_kv_heads"], seqlen, D), device=device, dtype=dtype) for _ in "kv")
    slots = torch.arange(seqlen, device=device)
    rope_write_kv(q, k, v, angles.cos(), angles.sin(), k_cache, v_cache, slots)
    rope_write_kv(q[:, :, :1], k[:, :, :1], v[:, :, :1], angles[:1].cos(), angles[:1].sin(), k_cache, v_cache,
                  slots[-1:])


# ---------------------------------------------------------------------------------------------------------------
# Custom ops
# ---------------------------------------------------------------------------------------------------------------


def _use_kernel(t: Tensor) -> bool:
    return t.is_cuda or triton_on_cpu()


def _rope_impl(q: Tensor, k: Tensor, cos: Tensor, sin: Tensor, inverse: bool) -> tuple[Tensor, Tensor]:
    """archgen_v1::apply_rope_qk -> (q rotated, k rotated), new tensors in the projection's layout."""
    if not _use_kernel(q):
        rotated = apply_rope_qk_reference(q, k, cos, -sin if inverse else sin)
        return tuple(projection_layout(t).copy_(t) for t in rotated)  # the kernel's layout, which the fake promises
    return rope_forward(q, k, cos, sin, inverse=inverse)


def _rope_fake(q, k, cos, sin, inverse):
    return projection_layout(q), projection_layout(k)


def _rope_in_place_impl(q: Tensor, k: Tensor, cos: Tensor, sin: Tensor) -> None:
    """archgen_v1::apply_rope_qk_: q and k rotated where they lie."""
    if not _use_kernel(q):
        q_rotated, k_rotated = apply_rope_qk_reference(q, k, cos, sin)
        q.copy_(q_rotated)
        k.copy_(k_rotated)
        return
    rope_forward(q, k, cos, sin, in_place=True)


def _rope_in_place_fake(q, k, cos, sin):
    return None


def _setup_context(ctx, inputs, output):
    _q, _k, cos, sin, inverse = inputs
    ctx.save_for_backward(cos, sin)
    ctx.inverse = inverse
    ctx.rotate = rope_op


def _backward(ctx, dq_out, dk_out):
    cos, sin = ctx.saved_tensors
    dq, dk = ctx.rotate(dq_out, dk_out, cos, sin, not ctx.inverse)  # the rotation's inverse is its transpose
    return dq, dk, None, None, None


rope_op = register_op("apply_rope_qk", _rope_impl, _rope_fake, backward=_backward, setup_context=_setup_context)
rope_in_place_op = register_op("apply_rope_qk_", _rope_in_place_impl, _rope_in_place_fake, mutates_args=("q", "k"))


def _rope_write_kv_impl(q: Tensor, k: Tensor, v: Tensor, cos: Tensor, sin: Tensor, k_cache: Tensor, v_cache: Tensor,
                        slots: Tensor) -> Tensor:
    """archgen_v1::apply_rope_write_kv_: the rotated k and v written into the caches' slots; returns q rotated (in the
    projection's layout, as the fake says)."""
    if not _use_kernel(q):
        return projection_layout(q).copy_(apply_rope_write_kv_reference(q, k, v, cos, sin, k_cache, v_cache, slots))
    return rope_write_kv(q, k, v, cos, sin, k_cache, v_cache, slots)


def _rope_write_kv_fake(q, k, v, cos, sin, k_cache, v_cache, slots):
    return projection_layout(q)


rope_write_kv_op = register_op("apply_rope_write_kv_", _rope_write_kv_impl, _rope_write_kv_fake,
                               mutates_args=("k_cache", "v_cache"))


ANGLE_ROWS = 16
"""Positions a program of the angles' kernel takes. No tuner: a decoding step has one position a sequence (one
program, ~1 µs, its launch the whole cost), and a prompt's few thousand positions are a few dozen programs."""


def rope_angles(inv_freq: Tensor, positions: Tensor, mscale: float) -> tuple[Tensor, Tensor]:
    """The launcher: cos and sin (*positions.shape, R/2) in float32 on positions' device."""
    positions = positions.contiguous()
    inv_freq = inv_freq.to(positions.device).contiguous()
    cos = torch.empty(*positions.shape, inv_freq.numel(), device=positions.device, dtype=torch.float32)
    sin = torch.empty_like(cos)
    rows = positions.numel()
    if rows and inv_freq.numel():
        with on_device(positions):
            _angles_kernel[(triton.cdiv(rows, ANGLE_ROWS),)](
                positions, inv_freq, cos, sin, rows, inv_freq.numel(), float(mscale), BLOCK_ROWS=ANGLE_ROWS,
                BLOCK_HALF=triton.next_power_of_2(inv_freq.numel()), SCALED=mscale != 1.0, num_warps=1)
    return cos, sin


def _angles_impl(inv_freq: Tensor, positions: Tensor, mscale: float) -> tuple[Tensor, Tensor]:
    """archgen_v1::rope_cos_sin -> (cos, sin)."""
    if not _use_kernel(positions):
        return rope_cos_sin_reference(inv_freq, positions, mscale)
    return rope_angles(inv_freq, positions, mscale)


def _angles_fake(inv_freq, positions, mscale):
    shape = (*positions.shape, inv_freq.numel())
    return positions.new_empty(shape, dtype=torch.float32), positions.new_empty(shape, dtype=torch.float32)


angles_op = register_op("rope_cos_sin", _angles_impl, _angles_fake)


class _EagerRope(torch.autograd.Function):
    """archgen_v1::apply_rope_qk's implementation and autograd without the custom ops' dispatch, for eager mode, as
    kernels/rmsnorm.py does (there the dispatch cost the host 0.21 ms per forward+backward on the H200).
    torch.compile and torch.export take the custom ops."""

    @staticmethod
    def forward(ctx, q, k, cos, sin, inverse):
        output = _rope_impl(q, k, cos, sin, inverse)
        _setup_context(ctx, (q, k, cos, sin, inverse), output)
        ctx.rotate = _rope_impl
        return output

    backward = staticmethod(_backward)



# ---------------------------------------------------------------------------------------------------------------
# Entry point and reference
# ---------------------------------------------------------------------------------------------------------------


def _check(q: Tensor, k: Tensor, cos: Tensor, sin: Tensor) -> None:
    if q.dim() != 4 or k.dim() != 4 or q.shape[0] != k.shape[0] or q.shape[2:] != k.shape[2:]:
        raise ValueError(f"q and k must be (B, Hq, T, D) and (B, Hk, T, D), got {tuple(q.shape)} and {tuple(k.shape)}")
    if q.dtype not in SUPPORTED_DTYPES or k.dtype != q.dtype:
        raise ValueError(f"rope takes q and k of one dtype among {SUPPORTED_DTYPES}, got {q.dtype} and {k.dtype}")
    B, _, T, D = q.shape
    if cos.shape != sin.shape or cos.shape[-2] != T or cos.dim() not in (2, 3) or (cos.dim() == 3 and cos.shape[0] != B):
        raise ValueError(f"cos and sin must both be (T, R/2) or (B, T, R/2) with T={T}, B={B}, got {tuple(cos.shape)} "
                         f"and {tuple(sin.shape)}")
    if 2 * cos.shape[-1] > D:
        raise ValueError(f"rotary_dim {2 * cos.shape[-1]} (2 * cos.size(-1)) exceeds head_dim {D}")


def apply_rope_qk(q: Tensor, k: Tensor, cos: Tensor, sin: Tensor) -> tuple[Tensor, Tensor]:
    """(q, k) each rotated by the angles; ops/attention.py's `apply_rope_qk`. In place (q and k are returned) when
    no gradient is needed, so inference and decoding allocate nothing; differentiable (new tensors) otherwise and
    while torch.export traces."""
    _check(q, k, cos, sin)
    eager = calls_implementation_directly(q)
    needs_grad = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad)
    if needs_grad or torch.compiler.is_exporting() or q.stride(-1) != 1 or k.stride(-1) != 1:
        return _EagerRope.apply(q, k, cos, sin, False) if eager else rope_op(q, k, cos, sin, False)
    (_rope_in_place_impl if eager else rope_in_place_op)(q, k, cos, sin)
    return q, k


def _check_cache(q: Tensor, k: Tensor, v: Tensor, k_cache: Tensor, v_cache: Tensor, slots: Tensor) -> None:
    B, HK, T, D = k.shape
    if v.shape != k.shape or k_cache.dim() != 4 or v_cache.shape != k_cache.shape or k_cache.shape[:2] != (B, HK) \
            or k_cache.shape[3] != D:
        raise ValueError(f"k and v must be (B, Hk, T, D) and the caches (B, Hk, L, D), got k {tuple(k.shape)}, v "
                         f"{tuple(v.shape)}, caches {tuple(k_cache.shape)} and {tuple(v_cache.shape)}")
    if v.dtype != q.dtype or k_cache.dtype not in SUPPORTED_DTYPES or v_cache.dtype != k_cache.dtype:
        raise ValueError(f"v must have q's dtype and the caches one dtype among {SUPPORTED_DTYPES}, got {v.dtype}, "
                         f"{k_cache.dtype} and {v_cache.dtype}")
    if slots.shape != (T,) or slots.dtype not in (torch.int32, torch.int64) or slots.device != k_cache.device:
        raise ValueError(f"slots must be ({T},) integers on the caches' device, got {tuple(slots.shape)} "
                         f"{slots.dtype} on {slots.device}")


def apply_rope_write_kv(q: Tensor, k: Tensor, v: Tensor, cos: Tensor, sin: Tensor, k_cache: Tensor, v_cache: Tensor,
                        slots: Tensor) -> Tensor:
    """q rotated by the angles (a new tensor), and k rotated and v written into rows `slots` (T,) of k_cache and
    v_cache (B, Hk, L, D), cast to the caches' dtype: a cached step's RoPE and cache write in one launch, the
    ops/attention.py `apply_rope_write_kv` it replaces. q, k and v themselves are left alone: attention reads the
    cache, and storing a rotated k back would cost a write per element for nothing. A gradient, torch.export or a
    strided last dim take the functional rotation and index_copy_ (the reference's ops: exported graphs hold no
    mutating custom op, and apply_rope_qk's decomposition lowers them). slots: distinct, a device tensor (no host
    sync: CUDA graphs)."""
    _check(q, k, cos, sin)
    _check_cache(q, k, v, k_cache, v_cache, slots)
    eager = calls_implementation_directly(q)
    needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v))
    unit = all(t.stride(-1) == 1 for t in (q, k, v, k_cache, v_cache))
    if needs_grad or torch.compiler.is_exporting() or not unit:
        q, k = apply_rope_qk(q, k, cos, sin)
        k_cache.index_copy_(2, slots, k.to(k_cache.dtype))
        v_cache.index_copy_(2, slots, v.to(v_cache.dtype))
        return q
    return (_rope_write_kv_impl if eager else rope_write_kv_op)(q, k, v, cos, sin, k_cache, v_cache, slots)


def apply_rope_write_kv_reference(q: Tensor, k: Tensor, v: Tensor, cos: Tensor, sin: Tensor, k_cache: Tensor,
                                  v_cache: Tensor, slots: Tensor) -> Tensor:
    """The definition (ops/attention.py's apply_rope_write_kv): the rotation, then index_copy_ of k and v into the
    caches (in place); returns q rotated (a new tensor)."""
    q, k = apply_rope_qk_reference(q, k, cos, sin)
    k_cache.index_copy_(2, slots, k.to(k_cache.dtype))
    v_cache.index_copy_(2, slots, v.to(v_cache.dtype))
    return q


def rope_cos_sin(inv_freq: Tensor, positions: Tensor, mscale: float = 1.0) -> tuple[Tensor, Tensor]:
    """cos and sin of the rotation angles positions · inv_freq, times mscale, in float32 (*positions.shape, R/2): the
    ops/attention.py `rope_cos_sin` it replaces, in one launch where the reference's cast of the frequencies (a bf16
    model's buffer), product, cos and sin are four. A decoding step's first layer with each RoPE computes them
    (StepContext), on its branch's stream, where each of those four small launches waited for SMs behind the
    other branch's GEMV (~15-20 µs a step on Hymba+'s first two layers, H200, session 20). No gradient (positions
    and frequencies have none); torch.export traces the reference."""
    as_written = positions.is_floating_point() and positions.dtype != torch.float32 or inv_freq.dtype == torch.float64
    if as_written or torch.compiler.is_exporting():
        return rope_cos_sin_reference(inv_freq, positions, mscale)
    return (_angles_impl if calls_implementation_directly(positions) else angles_op)(inv_freq, positions, mscale)


def rope_cos_sin_reference(inv_freq: Tensor, positions: Tensor, mscale: float = 1.0) -> tuple[Tensor, Tensor]:
    """The definition (ops/attention.py's rope_cos_sin): integer positions meet the float32 frequencies in the
    product (cast exactly below 2**24)."""
    inv_freq = inv_freq.to(device=positions.device, dtype=torch.float32)
    positions = positions.to(torch.float32) if positions.is_floating_point() else positions
    angles = positions.unsqueeze(-1) * inv_freq
    if mscale == 1.0:
        return angles.cos(), angles.sin()
    return angles.cos() * mscale, angles.sin() * mscale


def apply_rope_qk_reference(q: Tensor, k: Tensor, cos: Tensor, sin: Tensor) -> tuple[Tensor, Tensor]:
    """The definition (ops/attention.py's apply_rope on each): float32 (float64 stays float64), one cast back."""
    return _rotate(q, cos, sin), _rotate(k, cos, sin)


def _rotate(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    R = 2 * cos.size(-1)
    dtype = torch.promote_types(x.dtype, torch.float32)
    cos, sin = cos.unsqueeze(-3).to(dtype), sin.unsqueeze(-3).to(dtype)  # broadcast over heads
    a, b = x[..., : R // 2].to(dtype), x[..., R // 2 : R].to(dtype)
    rotated = torch.cat([a * cos - b * sin, b * cos + a * sin], dim=-1).to(x.dtype)
    return torch.cat([rotated, x[..., R:]], dim=-1)


def decomposition(reference=None, max_seqlen: int | None = None) -> dict:
    """{archgen_v1::apply_rope_qk: the op written with `reference`}: how exporters that cannot run Triton (ONNX)
    lower it. reference: a generated package's ops/attention.py `apply_rope_qk` (default: this file's), or its
    `apply_rope_write_kv` or `rope_cos_sin`, for which the table is empty: those ops are never traced, nor is
    `apply_rope_qk_` (while exporting, the entry points take the functional apply_rope_qk, index_copy_ for the cache
    and the reference's angles). max_seqlen is not needed (tokens are independent) and accepted for the common
    signature of kernels' decompositions."""
    reference = apply_rope_qk_reference if reference is None else reference
    if reference.__name__ in ("apply_rope_write_kv", "apply_rope_write_kv_reference", "rope_cos_sin",
                              "rope_cos_sin_reference"):
        return {}

    def apply_rope_qk_decomposed(q, k, cos, sin, inverse):
        return reference(q, k, cos, -sin if inverse else sin)

    return {op_overload("apply_rope_qk"): apply_rope_qk_decomposed}
