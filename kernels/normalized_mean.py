"""A two-branch parallel layer's combine (Hymba's `normalized_mean`) in one Triton kernel: the kernel, its launcher,
the custom op and the reference.

For the branches' outputs a, b (R, N) of any leading shape flattened, their norms' weights w_a, w_b and learned
per-channel scales s_a, s_b (N,)::

    y = (a · rstd_a · w_a · s_a  +  b · rstd_b · w_b · s_b) / 2        rstd_x = 1 / sqrt(mean(x², -1) + eps)

computed in float32 and rounded once to a's dtype: what the generated model computes unfused as
`(norm_a(a, scale=s_a) + norm_b(b, scale=s_b)) / 2` (ops/norm.py `normalized_mean`).

Why a kernel: unfused, a decode step of each parallel layer launches six kernels for this (the two weight × scale
products, the two norms, the sum and the halving), each a few kilobytes of work: in Hymba+'s CUDA graph, 160 of its
launches a step. Here one launch reads a, b and the four vectors once and writes y once.

How: a program holds BLOCK_R whole rows of both branches (BLOCK_N = next_pow2(N) ≤ MAX_BLOCK_N columns) in registers,
one fixed launch configuration sized to the row (memory-bound, few kilobytes at decode: nothing to tune).

Forward only: the op has no backward. The generated model calls it where no gradient is needed (decoding,
inference); training keeps the two fused RMSNorms, whose backward is a kernel. CPU tensors take the reference unless
TRITON_INTERPRET=1 and ARCHGEN_TRITON_ON_CPU=1 (the tests).
"""

import torch
import triton
import triton.language as tl
from torch import Tensor

from .triton_support import (
    gdc_launch_dependents,
    gdc_wait,
    on_device,
    op_overload,
    programmatic_launch,
    register_op,
    triton_on_cpu,
)

SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
MAX_BLOCK_N = 16384
"""Widest row a program holds in registers (both branches, float32); wider rows take the reference."""
MAX_TILE = 4096
"""Most elements of one branch a program holds (BLOCK_R × BLOCK_N): two such float32 tiles stay in registers."""


@triton.jit
def _combine_tile(a_ptr, b_ptr, ga, gb, wn, y_ptr, r_ptr, h_ptr, rows, cols, R, N, stride_a, stride_b, stride_y, stride_r,
                  eps, norm_eps,
                  ADD_NORM: tl.constexpr,  # then s = r + y (y_ptr receives s) and h = rms_norm(s) · wn
                  CACHE: tl.constexpr):  # the branches' loads' cache modifier ("" or ".cg": from L2, not the SM's L1)
    """The combine of rows `rows` (those below R), whole (cols: next_pow2(N) columns): ga, gb the branches' weight × scale halved
    (cols,), wn the next norm's weight (ADD_NORM). One piece of code for every kernel that combines, so each gives
    this kernel's sums (kernels/combine_projections.py runs it in a GEMV's last program)."""
    inside = (rows < R)[:, None] & (cols < N)[None, :]
    row64 = rows.to(tl.int64)[:, None]
    a = tl.load(a_ptr + row64 * stride_a + cols[None, :], mask=inside, other=0.0, cache_modifier=CACHE).to(tl.float32)
    b = tl.load(b_ptr + row64 * stride_b + cols[None, :], mask=inside, other=0.0, cache_modifier=CACHE).to(tl.float32)
    # the residual loaded with the branches, ahead of their sums: a load after a block reduction waits for it (its
    # barrier), and a combine in a projection's tail (combine_projections.py) is on the layer's critical path
    r = tl.load(r_ptr + row64 * stride_r + cols[None, :], mask=inside & ADD_NORM, other=0.0).to(tl.float32)
    rstd_a = 1.0 / tl.sqrt(tl.sum(a * a, axis=1) / N + eps)  # (rows,)
    rstd_b = 1.0 / tl.sqrt(tl.sum(b * b, axis=1) / N + eps)
    y = a * rstd_a[:, None] * ga[None, :] + b * rstd_b[:, None] * gb[None, :]
    if ADD_NORM:
        # kernels/rmsnorm.py's residual path, bit for bit: y rounded to the branches' dtype (as the combine's own
        # launch stores it), the add in float32 rounded to the stream's dtype, the norm of that rounded sum
        s = (y.to(a_ptr.dtype.element_ty).to(tl.float32) + r).to(y_ptr.dtype.element_ty)
        tl.store(y_ptr + row64 * stride_y + cols[None, :], s, mask=inside)
        s = s.to(tl.float32)
        rstd = 1.0 / tl.sqrt(tl.sum(s * s, axis=1) / N + norm_eps)
        h = s * rstd[:, None] * wn[None, :]
        tl.store(h_ptr + row64 * stride_y + cols[None, :], h.to(h_ptr.dtype.element_ty), mask=inside)
    else:
        tl.store(y_ptr + row64 * stride_y + cols[None, :], y.to(y_ptr.dtype.element_ty), mask=inside)


@triton.jit
def _combine_factors(wa_ptr, sa_ptr, wb_ptr, sb_ptr, wn_ptr, cols, N, ADD_NORM: tl.constexpr):
    """Each branch's weight × scale, halved (the mean's 1/2 folded into the per-channel factors), and the next norm's
    weight (ADD_NORM; else ga again, unused): float32 (cols,)."""
    inside = cols < N
    ga = 0.5 * tl.load(wa_ptr + cols, mask=inside, other=0.0).to(tl.float32) * tl.load(
        sa_ptr + cols, mask=inside, other=0.0).to(tl.float32)
    gb = 0.5 * tl.load(wb_ptr + cols, mask=inside, other=0.0).to(tl.float32) * tl.load(
        sb_ptr + cols, mask=inside, other=0.0).to(tl.float32)
    wn = tl.load(wn_ptr + cols, mask=inside, other=0.0).to(tl.float32) if ADD_NORM else ga
    return ga, gb, wn


@triton.jit
def _normalized_mean_kernel(a_ptr, b_ptr, wa_ptr, sa_ptr, wb_ptr, sb_ptr, y_ptr, r_ptr, wn_ptr, h_ptr, R, N, stride_a,
                            stride_b, stride_y, stride_r, eps, norm_eps,
                            BLOCK_R: tl.constexpr,  # rows per program
                            BLOCK_N: tl.constexpr,  # next_pow2(N): a whole row
                            ADD_NORM: tl.constexpr,  # then s = r + y (y_ptr receives s) and h = rms_norm(s) · wn
                            PDL: tl.constexpr):  # launched programmatically (triton_support.programmatic_launch)
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.arange(0, BLOCK_N)
    # parameters, which no kernel of a step writes: loaded before the wait, while the kernel ahead may still run
    ga, gb, wn = _combine_factors(wa_ptr, sa_ptr, wb_ptr, sb_ptr, wn_ptr, cols, N, ADD_NORM)
    if PDL:  # every program waits before it reads the branches and stores; then the next kernel (a GEMV) may launch
        gdc_wait()
        gdc_launch_dependents()
    _combine_tile(a_ptr, b_ptr, ga, gb, wn, y_ptr, r_ptr, h_ptr, rows, cols, R, N, stride_a, stride_b, stride_y,
                  stride_r, eps, norm_eps, ADD_NORM, "")


def launch_config(N: int) -> dict:
    """BLOCK_N a whole row; as many rows as fit MAX_TILE; warps so that each thread holds 8 to 16 elements a branch."""
    block_n = triton.next_power_of_2(N)
    block_r = max(1, MAX_TILE // block_n)
    return {"BLOCK_R": block_r, "BLOCK_N": block_n, "num_warps": max(1, min(16, block_r * block_n // 256))}


def normalized_mean_forward(a: Tensor, b: Tensor, weight_a: Tensor, scale_a: Tensor, weight_b: Tensor,
                            scale_b: Tensor, eps: float) -> Tensor:
    """The launcher: a, b (R, N) with a contiguous last dim (any row stride) -> y (R, N) in a's dtype."""
    R, N = a.shape
    y = torch.empty((R, N), dtype=a.dtype, device=a.device)
    if R == 0:
        return y
    config = launch_config(N)
    grid = (triton.cdiv(R, config["BLOCK_R"]),)
    pdl = programmatic_launch(a.device)
    with on_device(a):
        _normalized_mean_kernel[grid](a, b, weight_a, scale_a, weight_b, scale_b, y, y, weight_a, y, R, N, a.stride(0),
                                      b.stride(0), y.stride(0), 0, eps, 0.0, BLOCK_R=config["BLOCK_R"],
                                      BLOCK_N=config["BLOCK_N"], ADD_NORM=False, PDL=pdl,
                                      num_warps=config["num_warps"], launch_pdl=pdl)
    return y


def normalized_mean_add_norm_forward(a: Tensor, b: Tensor, weight_a: Tensor, scale_a: Tensor, weight_b: Tensor,
                                     scale_b: Tensor, eps: float, residual: Tensor, weight: Tensor,
                                     norm_eps: float) -> tuple[Tensor, Tensor]:
    """The launcher of the combine with the residual add and the next norm: a, b, residual (R, N) with a contiguous
    last dim (any row stride) -> (h, s) (R, N) in the residual's dtype."""
    R, N = a.shape
    dtype = torch.promote_types(a.dtype, residual.dtype)  # the add's, as kernels/rmsnorm.py's add_rms_norm promotes
    s = torch.empty((R, N), dtype=dtype, device=a.device)
    h = torch.empty((R, N), dtype=dtype, device=a.device)
    if R == 0:
        return h, s
    config = launch_config(N)
    grid = (triton.cdiv(R, config["BLOCK_R"]),)
    pdl = programmatic_launch(a.device)
    with on_device(a):
        _normalized_mean_kernel[grid](a, b, weight_a, scale_a, weight_b, scale_b, s, residual, weight, h, R, N,
                                      a.stride(0), b.stride(0), s.stride(0), residual.stride(0), eps, norm_eps,
                                      BLOCK_R=config["BLOCK_R"], BLOCK_N=config["BLOCK_N"], ADD_NORM=True, PDL=pdl,
                                      num_warps=config["num_warps"], launch_pdl=pdl)
    return h, s


def _as_rows(t: Tensor) -> Tensor:
    t = t.reshape(-1, t.shape[-1])
    return t if t.stride(-1) == 1 else t.contiguous()


def _check(a: Tensor, b: Tensor, vectors: tuple[Tensor, ...]) -> None:
    if a.shape != b.shape or a.dtype != b.dtype:
        raise ValueError(f"normalized_mean: the branches must have one shape and dtype, got {tuple(a.shape)} {a.dtype} "
                         f"and {tuple(b.shape)} {b.dtype}")
    if a.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"normalized_mean takes {', '.join(map(str, SUPPORTED_DTYPES))}, got {a.dtype}")
    N = a.size(-1)
    if any(v.shape != (N,) for v in vectors):
        raise ValueError(f"normalized_mean: the norms' weights and the scales must be ({N},) like the branches' rows, "
                         f"got {[tuple(v.shape) for v in vectors]}")


def _impl(a: Tensor, b: Tensor, weight_a: Tensor, scale_a: Tensor, weight_b: Tensor, scale_b: Tensor,
          eps: float) -> Tensor:
    """archgen_v1::normalized_mean -> y like a."""
    vectors = (weight_a, scale_a, weight_b, scale_b)
    _check(a, b, vectors)
    if not (a.is_cuda or triton_on_cpu()) or triton.next_power_of_2(a.size(-1)) > MAX_BLOCK_N:
        return normalized_mean_reference(a, b, *vectors, eps)
    y = normalized_mean_forward(_as_rows(a), _as_rows(b), *(v.contiguous() for v in vectors), eps)
    return y.view(a.shape)


def _fake(a, b, weight_a, scale_a, weight_b, scale_b, eps):
    return a.new_empty(a.shape)


normalized_mean_op = register_op("normalized_mean", _impl, _fake)


def normalized_mean(a: Tensor, b: Tensor, weight_a: Tensor, scale_a: Tensor, weight_b: Tensor, scale_b: Tensor,
                    eps: float) -> Tensor:
    """(rms_norm(a) · weight_a · scale_a + rms_norm(b) · weight_b · scale_b) / 2 in one pass, without a gradient:
    a, b (..., N) of one shape and dtype, the four vectors (N,) -> (..., N). As the generated package's reference
    (ops/norm.py `normalized_mean`)."""
    return normalized_mean_op(a, b, weight_a, scale_a, weight_b, scale_b, eps)


def _add_norm_impl(a: Tensor, b: Tensor, weight_a: Tensor, scale_a: Tensor, weight_b: Tensor, scale_b: Tensor,
                   eps: float, residual: Tensor, weight: Tensor, norm_eps: float) -> tuple[Tensor, Tensor]:
    """archgen_v1::normalized_mean_add_norm -> (h, s) like residual + y."""
    vectors = (weight_a, scale_a, weight_b, scale_b)
    _check(a, b, vectors)
    N = a.size(-1)
    if residual.shape != a.shape or residual.dtype not in SUPPORTED_DTYPES or weight.shape != (N,):
        raise ValueError(f"normalized_mean_add_norm: the residual stream must be {tuple(a.shape)} like the branches "
                         f"and the norm's weight ({N},), got {tuple(residual.shape)} {residual.dtype} and "
                         f"{tuple(weight.shape)}")
    if not (a.is_cuda or triton_on_cpu()) or triton.next_power_of_2(N) > MAX_BLOCK_N:
        return normalized_mean_add_norm_reference(a, b, *vectors, eps, residual, weight, norm_eps)
    h, s = normalized_mean_add_norm_forward(_as_rows(a), _as_rows(b), *(v.contiguous() for v in vectors), eps,
                                            _as_rows(residual), weight.contiguous(), norm_eps)
    return h.view(a.shape), s.view(a.shape)


def _add_norm_fake(a, b, weight_a, scale_a, weight_b, scale_b, eps, residual, weight, norm_eps):
    dtype = torch.promote_types(a.dtype, residual.dtype)
    return a.new_empty(a.shape, dtype=dtype), a.new_empty(a.shape, dtype=dtype)


normalized_mean_add_norm_op = register_op("normalized_mean_add_norm", _add_norm_impl, _add_norm_fake)


def normalized_mean_add_norm(a: Tensor, b: Tensor, weight_a: Tensor, scale_a: Tensor, weight_b: Tensor,
                             scale_b: Tensor, eps: float, residual: Tensor, weight: Tensor,
                             norm_eps: float) -> tuple[Tensor, Tensor]:
    """A parallel layer's combine y = normalized_mean(a, b, ...), the block's residual add s = residual + y and its
    feed-forward's norm h = rms_norm(s) · weight in one pass, without a gradient: (h, s), each rounded as the two
    launches round them (y to a's dtype, then s, then h). As the generated package's reference (ops/norm.py
    `normalized_mean_add_norm`)."""
    return normalized_mean_add_norm_op(a, b, weight_a, scale_a, weight_b, scale_b, eps, residual, weight, norm_eps)


def normalized_mean_reference(a: Tensor, b: Tensor, weight_a: Tensor, scale_a: Tensor, weight_b: Tensor,
                              scale_b: Tensor, eps: float) -> Tensor:
    """The same in float32 (float64 for float64 inputs), rounded once to a's dtype."""
    acc = torch.float64 if a.dtype == torch.float64 else torch.float32

    def normed(x: Tensor, weight: Tensor, scale: Tensor) -> Tensor:
        x = x.to(acc)
        return x * torch.rsqrt(x.square().mean(-1, keepdim=True) + eps) * weight.to(acc) * scale.to(acc)

    return ((normed(a, weight_a, scale_a) + normed(b, weight_b, scale_b)) / 2).to(a.dtype)


def normalized_mean_add_norm_reference(a: Tensor, b: Tensor, weight_a: Tensor, scale_a: Tensor, weight_b: Tensor,
                                       scale_b: Tensor, eps: float, residual: Tensor, weight: Tensor,
                                       norm_eps: float) -> tuple[Tensor, Tensor]:
    """normalized_mean_reference, then kernels/rmsnorm.py's add_rms_norm_reference: (h, s)."""
    y = normalized_mean_reference(a, b, weight_a, scale_a, weight_b, scale_b, eps)
    dtype = torch.promote_types(y.dtype, residual.dtype)
    s = y.to(dtype) + residual.to(dtype)
    acc = torch.promote_types(dtype, torch.float32)
    s32 = s.to(acc)
    return (s32 * torch.rsqrt(s32.square().mean(-1, keepdim=True) + norm_eps) * weight.to(acc)).to(dtype), s


def decomposition(reference, max_seqlen: int) -> dict:
    """{archgen_v1::<op>: ops/norm.py's function of the same name}, for ONNX (the kernels file hands each kernel
    function's reference in turn: `normalized_mean` or `normalized_mean_add_norm`)."""
    return {op_overload(reference.__name__): reference}
