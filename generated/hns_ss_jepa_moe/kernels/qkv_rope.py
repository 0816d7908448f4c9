"""An attention's decoding step: the q, k and v GEMV with RoPE and the KV-cache write in its epilogue, in one launch:
the kernel, its launcher, the custom op and the reference.

For rows x (B, T, K) (B·T <= gemv.FEW_ROWS: a decoding step's tokens), the projections' weights w_q (HQ·D, K),
w_k and w_v (HK·D, K) and optional biases, the angles cos, sin (T, R/2) or (B, T, R/2) in float32 (rope_cos_sin's)
and the caches (B, HK, L, D)::

    q, k, v = round(x · w_qᵀ + b_q), round(x · w_kᵀ + b_k), round(x · w_vᵀ + b_v)     in x's dtype, as qkv_linear
    returns rope(q)                                       (B, HQ, T, D), laid out as a projection's output
    k_cache[:, :, slots] = rope(k), v_cache[:, :, slots] = v                         cast to the caches' dtype

rope: kernels/rope.py's rotate-half pairing, channel i < R/2 with i + R/2, (a, b) -> (a·cos - b·sin, b·cos + a·sin)
in float32 from the rounded products, rounded to x's dtype; channels R .. D-1 pass through. So the result is what
kernels/gemv.py's `qkv_linear` followed by kernels/rope.py's `apply_rope_write_kv` gives, bit for bit: each product
is summed as `_qkv_gemv_kernel` sums it (its loop's step, gemv._tile_products, with the qkv bucket's config: the same
tile shape, BLOCK_K and FOLD, so the same order), stored through the same conversion, and rotated by `_rotate_head`'s
helper, rope._rotate_pair (explicit fmas: nothing left for the compiler to contract differently in each kernel), on
the same cos and sin.

Why: an attention layer's decoding step ran the qkv GEMV, then the RoPE kernel writing the cache (a launch and two
gaps on the attention branch, the critical one of a Hymba+ layer: 4.7 µs GEMV, 1.9 µs gap, 3.0 µs rope, 2.4 µs gap on
the H200, session 13's timeline); the rotation is per pair of features of one head, so the program finishing a
product can rotate it if it holds the pair.

How: the programs along axis 1 take, per head of q and then of k, BLOCK_N rotation pairs (rows i and i + R/2 of the
head: two accumulators of the GEMV's (BLOCK_N, BLOCK_K / FOLD) tile, as the gated GEMV holds gate and up), then the
head's pass-through rows BLOCK_N at a time (the second accumulator masked off), and then v's rows BLOCK_N at a time
as `_qkv_gemv_kernel` does. A k or v program stores its rows into the caches at the slot of its token, a q program
into q's output. Nothing is read back: no program depends on another's stores.

Folded RMSNorm (`norm=`, op rms_norm_qkv_rope_write_kv_): the products of RMSNorm(x), the norm applied inside the
loop (kernels/gemv.py, "RMSNorm folded in"); within rounding of norm-then-kernel, on the qkv bucket's config.

Launch config: the GEMV's for the three weights stacked (`gemv.tuned_config`, the bucket qkv_linear tunes, timing
qkv_linear), so `archgen build --autotune` tunes one bucket for both paths. More rows than FEW_ROWS, a gradient and
torch.export take the two launches (qkv's products, then `apply_rope_write_kv`), whose results are the same.
"""

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from torch import Tensor

from .gemv import (
    FEW_ROWS,
    SUPPORTED_DTYPES,
    _fold,
    _prefetch_first_tile,
    _rstd,
    _tile_products,
    _x_chunk,
    check_norm_weight,
    qkv_gemv_forward,
    qkv_linear_reference,
    rms_norm_fold_reference,
    shape_key,
    tuned_config,
)
from .gemv import autotune as gemv_autotune
from .rope import _rotate_pair, apply_rope_write_kv, apply_rope_write_kv_reference, projection_layout
from .triton_support import (
    calls_implementation_directly,
    gdc_launch_dependents,
    gdc_wait,
    on_device,
    programmatic_launch,
    register_op,
    triton_on_cpu,
)


@triton.jit
def _qkv_rope_kernel(x_ptr, q_ptr, k_ptr, v_ptr, bq_ptr, bk_ptr, bv_ptr, q_out_ptr, k_cache_ptr, v_cache_ptr,
                     slots_ptr, cos_ptr, sin_ptr, T, HQ, HK, K, D, HALF, PASS, stride_xm,
                     stride_kcb, stride_kch, stride_kct, stride_vcb, stride_vch, stride_vct, stride_cb, stride_ct,
                     norm_ptr, eps,  # x's RMSNorm (weight, eps) folded into the products (NORM)
                     HAS_BIAS: tl.constexpr,  # add the biases to the products
                     BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, FOLD: tl.constexpr,
                     PDL: tl.constexpr,  # as gemv._qkv_gemv_kernel's
                     NORM: tl.constexpr):  # the products of RMSNorm(x), folded as gemv._row_products folds it
    """Grid (rows of x: B·T, blocks): per head of q, then of k, cdiv(HALF, BLOCK_N) blocks of rotation pairs and
    cdiv(PASS, BLOCK_N) of pass-through rows; then cdiv(HK·D, BLOCK_N) blocks of v's rows. q_out (B, T, HQ, D)
    contiguous; the caches' rows slots[t]; cos and sin float32, their row at (b, t)."""
    row = tl.program_id(0)
    block = tl.program_id(1)
    lanes = tl.arange(0, BLOCK_N)
    pair_blocks = tl.cdiv(HALF, BLOCK_N)
    head_blocks = pair_blocks + tl.cdiv(PASS, BLOCK_N)
    k_first = HQ * head_blocks  # the first block of k's heads, then of v's rows
    v_first = k_first + HK * head_blocks
    in_q = block < k_first
    in_v = block >= v_first
    w_ptr = tl.where(in_v, v_ptr, tl.where(in_q, q_ptr, k_ptr))
    b_ptr = tl.where(in_v, bv_ptr, tl.where(in_q, bq_ptr, bk_ptr))
    n = tl.where(in_q, HQ, HK) * D  # this weight's rows
    in_head = block - tl.where(in_q, 0, k_first)  # q or k: the block's place among its weight's heads' blocks
    head = in_head // head_blocks
    head_block = in_head % head_blocks
    rotated = (head_block < pair_blocks) & (block < v_first)  # a block of rotation pairs (a: i, b: i + HALF)
    firsts = tl.where(head_block < pair_blocks, head_block, head_block - pair_blocks) * BLOCK_N + lanes
    a_outs = tl.where(in_v, (block - v_first) * BLOCK_N + lanes, head * D + tl.where(rotated, firsts, 2 * HALF + firsts))
    a_inside = tl.where(in_v, a_outs, firsts) < tl.where(in_v, n, tl.where(rotated, HALF, PASS))
    b_outs = a_outs + HALF
    b_inside = firsts < tl.where(rotated, HALF, 0)  # a_inside where rotated, else none
    x_row = x_ptr + row.to(tl.int64) * stride_xm
    a_rows = w_ptr + a_outs.to(tl.int64)[:, None] * K
    b_rows = w_ptr + b_outs.to(tl.int64)[:, None] * K
    a_products = tl.zeros((BLOCK_N, BLOCK_K // FOLD), dtype=tl.float32)
    b_products = tl.zeros((BLOCK_N, BLOCK_K // FOLD), dtype=tl.float32)
    squares = tl.zeros((1, BLOCK_K // FOLD), dtype=tl.float32)
    if PDL:  # as in gemv._qkv_gemv_kernel (b's rows clamped into the weight where the block has none)
        _prefetch_first_tile(w_ptr, a_outs, n, K, K, BLOCK_K)
        if rotated:
            _prefetch_first_tile(w_ptr, b_outs, n, K, K, BLOCK_K)
        gdc_wait()
        gdc_launch_dependents()
    for k0 in range(0, K, BLOCK_K):  # gemv._row_products' loop on each of the two tiles (its step, _tile_products)
        cols = k0 + tl.arange(0, BLOCK_K)
        cols_inside = cols < K
        x, squares = _x_chunk(x_row, cols, cols_inside, norm_ptr, squares, BLOCK_K, FOLD, NORM)
        a_products += _tile_products(x, a_rows, a_inside, cols, cols_inside, BLOCK_N, BLOCK_K, FOLD)
        b_products += _tile_products(x, b_rows, b_inside, cols, cols_inside, BLOCK_N, BLOCK_K, FOLD)
    a = tl.sum(a_products, axis=1)
    b = tl.sum(b_products, axis=1)
    if NORM:
        rstd = _rstd(squares, K, eps)
        a, b = a * rstd, b * rstd
    if HAS_BIAS:
        a += tl.load(b_ptr + a_outs, mask=a_inside, other=0.0).to(tl.float32)
        b += tl.load(b_ptr + b_outs, mask=b_inside, other=0.0).to(tl.float32)
    dtype = q_out_ptr.dtype.element_ty
    a = a.to(dtype)  # the products as qkv_linear stores them
    b = b.to(dtype)
    # the token's angles, rope._angles' loads (float32)
    batch = row // T
    token = row % T
    angle_at = batch.to(tl.int64) * stride_cb + token.to(tl.int64) * stride_ct + firsts
    cos = tl.load(cos_ptr + angle_at, mask=b_inside, other=0.0)
    sin = tl.load(sin_ptr + angle_at, mask=b_inside, other=0.0)
    # rope._rotate_head's arithmetic (its helper): float32 from the rounded values, rounded to x's dtype
    a_rotated, b_rotated = _rotate_pair(a.to(tl.float32), b.to(tl.float32), cos, sin)
    a = tl.where(rotated, a_rotated.to(dtype), a)
    b = b_rotated.to(dtype)
    if in_q:
        q_row = q_out_ptr + row.to(tl.int64) * (HQ * D)
        tl.store(q_row + a_outs, a, mask=a_inside)
        tl.store(q_row + b_outs, b, mask=b_inside)
    else:
        slot = tl.load(slots_ptr + token).to(tl.int64)
        # k_cache and v_cache have one dtype (rope_write_kv's check): one pointer for both
        cache_ptr = tl.where(in_v, v_cache_ptr, k_cache_ptr)
        stride_b, stride_h = tl.where(in_v, stride_vcb, stride_kcb), tl.where(in_v, stride_vch, stride_kch)
        stride_t = tl.where(in_v, stride_vct, stride_kct)
        cache_row = cache_ptr + batch.to(tl.int64) * stride_b + slot * stride_t
        heads, channels = a_outs // D, a_outs % D
        cache_dtype = k_cache_ptr.dtype.element_ty
        tl.store(cache_row + heads.to(tl.int64) * stride_h + channels, a.to(cache_dtype), mask=a_inside)
        tl.store(cache_row + heads.to(tl.int64) * stride_h + channels + HALF, b.to(cache_dtype), mask=b_inside)


def qkv_rope_write_kv_forward(x: Tensor, q_weight: Tensor, k_weight: Tensor, v_weight: Tensor, q_bias: Tensor | None,
                              k_bias: Tensor | None, v_bias: Tensor | None, cos: Tensor, sin: Tensor, k_cache: Tensor,
                              v_cache: Tensor, slots: Tensor, norm_weight: Tensor | None = None,
                              norm_eps: float = 0.0, *, config: dict | None = None) -> Tensor:
    """Run the kernel: x (B, T, K) -> q rotated (B, HQ, T, D) in the projection's layout (rope.projection_layout);
    the rotated k and v written into rows `slots` of the caches; given norm_weight (K,), the products are of
    RMSNorm(x) with it and norm_eps (gemv.rms_norm_fold). config {"BLOCK_N", "BLOCK_K", "num_warps"} as
    gemv_forward's; without it, the qkv bucket's (qkv_linear's)."""
    _check(x, q_weight, k_weight, v_weight, q_bias, k_bias, v_bias, cos, sin, k_cache, v_cache, slots)
    check_norm_weight(norm_weight, x, "qkv_rope_write_kv_")
    B, T, K = x.shape
    _, HK, _, D = k_cache.shape
    NQ, NKV = q_weight.shape[0], k_weight.shape[0]
    HQ, half = NQ // D, cos.shape[-1]
    x2 = x.reshape(B * T, K) if x.stride(-1) == 1 else x.reshape(B * T, K).contiguous()
    wq, wk, wv = (w.contiguous() for w in (q_weight, k_weight, v_weight))  # as qkv_gemv_forward: K-strided rows
    biases = (q_bias, k_bias, v_bias) if q_bias is not None else (wq, wq, wq)
    cos, sin = (a.to(torch.float32).contiguous() for a in (cos, sin))
    slots = slots.contiguous()
    q_out = torch.empty((B, T, HQ, D), device=x.device, dtype=x.dtype)
    M = B * T
    if M == 0:
        return q_out.transpose(1, 2)
    pdl = programmatic_launch(x.device)
    with on_device(x):
        # the qkv bucket's config (so its sums), tuned by timing qkv_linear's kernel: this one writes the caches
        N = NQ + 2 * NKV
        cfg = tuned_config(shape_key(N, K, M, x.dtype, gated=False) + "-qkv", N, K, M, x2, config,
                           lambda cfg: qkv_gemv_forward(x2, wq, wk, wv, q_bias, k_bias, v_bias, config=cfg))
        head_blocks = triton.cdiv(half, cfg["BLOCK_N"]) + triton.cdiv(D - 2 * half, cfg["BLOCK_N"])
        blocks = (HQ + HK) * head_blocks + triton.cdiv(NKV, cfg["BLOCK_N"])
        _qkv_rope_kernel[(M, blocks)](
            x2, wq, wk, wv, *biases, q_out, k_cache, v_cache, slots, cos, sin, T, HQ, HK, K, D, half, D - 2 * half,
            x2.stride(0), *k_cache.stride()[:3], *v_cache.stride()[:3], cos.stride(0) if cos.dim() == 3 else 0,
            cos.stride(-2), norm_weight if norm_weight is not None else wq, norm_eps, HAS_BIAS=q_bias is not None,
            BLOCK_N=cfg["BLOCK_N"], BLOCK_K=cfg["BLOCK_K"], FOLD=_fold(cfg, x), PDL=pdl, NORM=norm_weight is not None,
            num_warps=cfg["num_warps"], launch_pdl=pdl)
    return q_out.transpose(1, 2)


def _check(x, q_weight, k_weight, v_weight, q_bias, k_bias, v_bias, cos, sin, k_cache, v_cache, slots) -> None:
    name = "qkv_rope_write_kv_"
    if x.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"{name} takes {', '.join(map(str, SUPPORTED_DTYPES))}, got {x.dtype}")
    if x.dim() != 3:
        raise ValueError(f"{name} takes a decoding step's tokens x (B, T, K), got {tuple(x.shape)}")
    B, T, K = x.shape
    if k_cache.dim() != 4 or v_cache.shape != k_cache.shape or k_cache.shape[0] != B:
        raise ValueError(f"{name}: the caches must be (B={B}, HK, L, D) both, got {tuple(k_cache.shape)} and "
                         f"{tuple(v_cache.shape)}")
    _, HK, _, D = k_cache.shape
    if k_cache.dtype not in SUPPORTED_DTYPES or v_cache.dtype != k_cache.dtype or k_cache.stride(-1) != 1 \
            or v_cache.stride(-1) != 1:
        raise ValueError(f"{name}: the caches must have one dtype among {SUPPORTED_DTYPES} and a unit last stride, "
                         f"got {k_cache.dtype} and {v_cache.dtype}")
    NQ = q_weight.shape[0] if q_weight.dim() == 2 else 0
    shapes = {"q_weight": (q_weight, (NQ, K)), "k_weight": (k_weight, (HK * D, K)), "v_weight": (v_weight, (HK * D, K))}
    for label, (w, shape) in shapes.items():
        if tuple(w.shape) != shape or w.dtype != x.dtype:
            raise ValueError(f"{name}: {label} must be {shape} in {x.dtype}, got {tuple(w.shape)} in {w.dtype}")
    if NQ == 0 or NQ % D:
        raise ValueError(f"{name}: q_weight's {NQ} rows are not whole heads of {D}")
    biases = {"q_bias": (q_bias, NQ), "k_bias": (k_bias, HK * D), "v_bias": (v_bias, HK * D)}
    if len({b is None for b, _ in biases.values()}) > 1:
        raise ValueError(f"{name}: q, k and v have all or none a bias")
    for label, (b, rows) in biases.items():
        if b is not None and tuple(b.shape) != (rows,):
            raise ValueError(f"{name}: {label} must be ({rows},), got {tuple(b.shape)}")
    if cos.shape != sin.shape or cos.dim() not in (2, 3) or cos.shape[-2] != T or (cos.dim() == 3 and cos.shape[0] != B) \
            or not 0 < 2 * cos.shape[-1] <= D:
        raise ValueError(f"{name}: cos and sin must both be (T, R/2) or (B, T, R/2) with T={T}, B={B}, R <= {D}, got "
                         f"{tuple(cos.shape)} and {tuple(sin.shape)}")
    if slots.shape != (T,) or slots.dtype not in (torch.int32, torch.int64) or slots.device != k_cache.device:
        raise ValueError(f"{name}: slots must be ({T},) integers on the caches' device, got {tuple(slots.shape)} "
                         f"{slots.dtype} on {slots.device}")


# ---------------------------------------------------------------------------------------------------------------
# Custom op, entry point and reference
# ---------------------------------------------------------------------------------------------------------------


def _impl(x: Tensor, q_weight: Tensor, k_weight: Tensor, v_weight: Tensor, q_bias: Tensor | None, k_bias: Tensor | None,
          v_bias: Tensor | None, cos: Tensor, sin: Tensor, k_cache: Tensor, v_cache: Tensor, slots: Tensor) -> Tensor:
    """archgen_v1::qkv_rope_write_kv_ -> q rotated (B, HQ, T, D) in the projection's layout; the caches written in
    their rows `slots`. CPU tensors take the reference (outside the kernel tests)."""
    return _norm_impl(x, None, 0.0, q_weight, k_weight, v_weight, q_bias, k_bias, v_bias, cos, sin, k_cache, v_cache,
                      slots)


def _norm_impl(x: Tensor, norm_weight: Tensor | None, norm_eps: float, q_weight: Tensor, k_weight: Tensor,
               v_weight: Tensor, q_bias: Tensor | None, k_bias: Tensor | None, v_bias: Tensor | None, cos: Tensor,
               sin: Tensor, k_cache: Tensor, v_cache: Tensor, slots: Tensor) -> Tensor:
    """archgen_v1::rms_norm_qkv_rope_write_kv_: the same on RMSNorm(x) (norm_weight, norm_eps), folded into the
    products (gemv.rms_norm_fold)."""
    args = (x, q_weight, k_weight, v_weight, q_bias, k_bias, v_bias, cos, sin, k_cache, v_cache, slots)
    if not (x.is_cuda or triton_on_cpu()):
        q = qkv_rope_write_kv_reference(*args, norm_weight, norm_eps)
        return projection_layout(q).copy_(q)  # the kernel's layout, which the fake promises
    return qkv_rope_write_kv_forward(*args, norm_weight, norm_eps)


def _fake(x, q_weight, k_weight, v_weight, q_bias, k_bias, v_bias, cos, sin, k_cache, v_cache, slots):
    B, T, _ = x.shape
    D = k_cache.shape[-1]
    return x.new_empty((B, T, q_weight.shape[0] // D, D)).transpose(1, 2)


def _norm_fake(x, norm_weight, norm_eps, *args):
    return _fake(x, *args)


qkv_rope_write_kv_op = register_op("qkv_rope_write_kv_", _impl, _fake, mutates_args=("k_cache", "v_cache"))
rms_norm_qkv_rope_write_kv_op = register_op("rms_norm_qkv_rope_write_kv_", _norm_impl, _norm_fake,
                                            mutates_args=("k_cache", "v_cache"))


def _heads(t: Tensor, B: int, T: int, D: int) -> Tensor:
    return t.view(B, T, -1, D).transpose(1, 2)  # (B, H, T, D), as the attention template views a projection


def qkv_rope_write_kv_(x: Tensor, q_weight: Tensor, k_weight: Tensor, v_weight: Tensor, q_bias: Tensor | None,
                       k_bias: Tensor | None, v_bias: Tensor | None, cos: Tensor, sin: Tensor, k_cache: Tensor,
                       v_cache: Tensor, slots: Tensor, norm=None) -> Tensor:
    """An attention's cached step on x (B, T, K): the q, k and v projections, q rotated by the angles (returned,
    (B, HQ, T, D) laid out as a projection's output), k rotated and v written into rows `slots` (T,) of k_cache and
    v_cache (B, HK, L, D), cast to the caches' dtype. One launch where `qkv_linear` and `apply_rope_write_kv` took
    two, the same bits. norm: an RMSNorm module (its `weight` and `eps`) not yet applied to x, which the kernel
    applies inside its products' loop (gemv.rms_norm_fold: within rounding of norm(x) first, one launch fewer).
    More rows than gemv.FEW_ROWS (cuBLAS's), a gradient and torch.export take the three products of norm(x) and
    apply_rope_write_kv (whose own fallbacks lower to the reference ops); the op mutates only the caches and returns
    a new tensor. slots: distinct, a device tensor (no host sync: CUDA graphs)."""
    B, T, _ = x.shape
    D = k_cache.shape[-1]
    needs_grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in
                                                 (x, q_weight, k_weight, v_weight, q_bias, k_bias, v_bias))
    if torch.compiler.is_exporting() or needs_grad or B * T > FEW_ROWS:
        inputs = x if norm is None else norm(x)
        projections = ((q_weight, q_bias), (k_weight, k_bias), (v_weight, v_bias))
        q, k, v = (_heads(F.linear(inputs, w, b), B, T, D) for w, b in projections)
        return apply_rope_write_kv(q, k, v, cos, sin, k_cache, v_cache, slots)
    args = (q_weight, k_weight, v_weight, q_bias, k_bias, v_bias, cos, sin, k_cache, v_cache, slots)
    if norm is not None:
        if calls_implementation_directly(x):
            return _norm_impl(x, norm.weight, norm.eps, *args)
        return rms_norm_qkv_rope_write_kv_op(x, norm.weight, norm.eps, *args)
    return _impl(x, *args) if calls_implementation_directly(x) else qkv_rope_write_kv_op(x, *args)


def qkv_rope_write_kv_reference(x: Tensor, q_weight: Tensor, k_weight: Tensor, v_weight: Tensor, q_bias: Tensor | None,
                                k_bias: Tensor | None, v_bias: Tensor | None, cos: Tensor, sin: Tensor, k_cache: Tensor,
                                v_cache: Tensor, slots: Tensor, norm_weight: Tensor | None = None,
                                norm_eps: float = 0.0) -> Tensor:
    """gemv.qkv_linear_reference (on gemv.rms_norm_fold_reference's RMSNorm(x) given norm_weight, rounded to x's
    dtype), then rope.apply_rope_write_kv_reference on its q, k and v heads: the tests' truth (float32 sums rounded
    to x's dtype, the rotation in float32); the caches written, q rotated returned."""
    B, T, _ = x.shape
    D = k_cache.shape[-1]
    inputs = x if norm_weight is None else rms_norm_fold_reference(x, norm_weight, norm_eps)
    qkv = qkv_linear_reference(inputs, q_weight, k_weight, v_weight, q_bias, k_bias, v_bias).to(x.dtype)
    q, k, v = (_heads(t, B, T, D) for t in qkv.split([q_weight.shape[0], k_weight.shape[0], v_weight.shape[0]], -1))
    return apply_rope_write_kv_reference(q, k, v, cos, sin, k_cache, v_cache, slots)


def autotune(config: dict, params: dict[str, tuple[int, ...]], batch: int, seqlen: int, dtype: torch.dtype,
             device: torch.device | str) -> None:
    """The build-time tuning hook: the kernel runs the qkv bucket's config, so tune that bucket (kernels/gemv.py's
    hook does so for the attention op too; a bucket tuned already is not timed again)."""
    projections = ("q_proj.weight", "k_proj.weight", "v_proj.weight")
    gemv_autotune(config, {name: shape for name, shape in params.items() if name.endswith(projections)}, batch,
                  seqlen, dtype, device)


def decomposition(reference, max_seqlen: int) -> dict:
    """Nothing to lower for ONNX: while torch.export traces, the entry point takes the three products and
    apply_rope_write_kv's functional form (kernels/rope.py's decomposition), so the op never reaches an exported
    graph."""
    return {}
