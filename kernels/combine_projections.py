"""A two-branch parallel layer's output projections with its combine in their epilogue: the kernel, its launcher,
the custom op, a helper for the generated model and the reference.

A Hymba-style block runs two branches on the same rows, projects each back to the model width and combines them
(kernels/normalized_mean.py), then adds the residual and norms for the feed-forward. On a decoding step the branches
run side by side on two streams, each ending with its output projection (a GEMV), and the combine is one more launch
after both. Here each branch's projection is this kernel: the GEMV (kernels/gemv.py's `_row_products`, the same
sums), then every program counts the output features it has stored on a shared int32 counter, and the program whose
count completes both projections (2 · M · N features) runs the combine on the whole rows (normalized_mean's
`_combine_tile`, the same code) and zeroes the counter. For a branch output a (its projection a = x_a · w_aᵀ) and
b = x_b · w_bᵀ, the residual r::

    y = (a · rstd_a · g_a · s_a + b · rstd_b · g_b · s_b) / 2        (normalized_mean)
    s = r + y,  h = rms_norm(s) · w_norm                                (the block's add and its feed-forward's norm)

with a and b stored in their dtype first, as the two projections' launches store them.

Why: the combine's launch (3.2 µs a layer on Hymba+'s chain, and a ~0.4 µs gap on each side) sat on the serial path
between the branches and the feed-forward; here it is the tail of whichever projection finishes last. Session 17
measured the opposite place (the combine in the prologue of the SwiGLU GEMV that follows) slower: every program
paid it before its loads. Measured here (H200, session 18): 0.35% of Hymba+'s decoding step. The combine's time is
its own dependent loads and block reductions, which the tail pays too; the launch and its gap are what go.

Ordering (as kernels/decode_attention.py's one-launch combine): a barrier puts every thread's stores before the
program's increment, which is a release at GPU scope; the program that reads the completing count acquires them,
and reads the branches from L2 (.cg). The two launches may run on two streams at once: the counter is the caller's
(`ParallelCombine` takes one per device and stream), zero between launches (the last program resets it), so a CUDA
graph's replay reuses it.

Forward only, few rows (a decoding step's: gemv.FEW_ROWS), no biases. CPU tensors take the reference unless
TRITON_INTERPRET=1 and ARCHGEN_TRITON_ON_CPU=1 (the tests).
"""

import torch
import triton
import triton.language as tl
from torch import Tensor

from .gemv import _fold, _row_products
from .normalized_mean import (
    MAX_BLOCK_N,
    _combine_factors,
    _combine_tile,
    normalized_mean_add_norm_reference,
)
from .triton_support import on_device, programmatic_launch, register_op, rounded, triton_on_cpu


@triton.jit
def _combining_gemv_kernel(
    x_ptr, w_ptr, out_ptr, M, N, K, stride_xm, stride_wn,
    a_ptr, b_ptr, stride_ab,  # both branches' projections (M, N), out_ptr one of them
    wa_ptr, sa_ptr, wb_ptr, sb_ptr, eps,  # the combine's norms and scales
    r_ptr, stride_r, wn_ptr, norm_eps, h_ptr, s_ptr, stride_hs,  # the residual, the next norm, the outputs
    arrivals_ptr,  # int32, zero between launches: the output features both launches have stored
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, FOLD: tl.constexpr,  # the GEMV's tile (gemv.py's config)
    BLOCK_C: tl.constexpr,  # next_pow2(N): the combine's whole row
    PDL: tl.constexpr,
):
    row = tl.program_id(0)
    outs = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    outs_inside = outs < N
    y = _row_products(x_ptr + row.to(tl.int64) * stride_xm, w_ptr, outs, outs_inside, N, K, stride_wn, BLOCK_N, BLOCK_K,
                      FOLD, PDL, w_ptr, 0.0, False)
    tl.store(out_ptr + row.to(tl.int64) * stride_ab + outs, rounded(y, out_ptr.dtype.element_ty), mask=outs_inside)
    tl.debug_barrier()  # every thread's stores before the increment (see the module's docstring)
    stored = tl.sum(outs_inside.to(tl.int32), 0)
    before = tl.atomic_add(arrivals_ptr, stored, sem="acq_rel", scope="gpu")
    if before + stored == 2 * M * N:  # both projections complete: this program combines
        tl.store(arrivals_ptr, 0)  # zero again for the next launch pair
        cols = tl.arange(0, BLOCK_C)
        ga, gb, wn = _combine_factors(wa_ptr, sa_ptr, wb_ptr, sb_ptr, wn_ptr, cols, N, True)
        for m in range(0, M):
            _combine_tile(a_ptr, b_ptr, ga, gb, wn, s_ptr, r_ptr, h_ptr, tl.full([1], m, tl.int32), cols, M, N,
                          stride_ab, stride_ab, stride_hs, stride_r, eps, norm_eps, True, ".cg")


def launch_config(N: int, K: int) -> dict:
    """Warps so that the combine's whole row (next_pow2(N)) is at most 8 float32 values a thread and vector (at 4
    warps a 1,600-wide row took 95 registers a thread against the plain GEMV's 40, sm_90 under triton 3.6: 5 programs
    an SM instead of 12; at 8 warps 48), and 8,192 weights a program: on the H200 at Hymba+'s shapes (1,600 rows of
    1,600 and of 3,200) 4 × 2,048 over 8 warps ran the pair with its combine in 8.9 us, 2 × 2,048 in 10.7, 1 × 2,048
    in 14.3, against 12.0 for the two GEMVs and normalized_mean_add_norm (bench/results/
    combine_projections_probe_s18.h200.json)."""
    columns = min(triton.next_power_of_2(max(K, 1)), 2048)
    return {"BLOCK_N": min(64, 8192 // columns), "BLOCK_K": columns,
            "num_warps": min(16, max(4, triton.next_power_of_2(N) // 256))}


def combining_linear_forward(x: Tensor, weight: Tensor, out: Tensor, a: Tensor, b: Tensor, weight_a: Tensor,
                             scale_a: Tensor, weight_b: Tensor, scale_b: Tensor, eps: float, residual: Tensor,
                             norm_weight: Tensor, norm_eps: float, h: Tensor, s: Tensor, arrivals: Tensor,
                             config: dict | None = None) -> None:
    """The launcher: x (M, K) rows, out (a or b) receives x · weightᵀ; a, b, residual, h, s (M, N) with one row stride
    for a and b and one for h and s, unit last strides. config {"BLOCK_N", "BLOCK_K", "num_warps"} (launch_config's
    otherwise: a fixed config, no tuner; bench/combine_projections_probe.py times the others)."""
    M, K = x.shape
    N = weight.shape[0]
    cfg = config or launch_config(N, K)
    pdl = programmatic_launch(x.device)
    if M and N:
        with on_device(x):
            _combining_gemv_kernel[(M, triton.cdiv(N, cfg["BLOCK_N"]))](
                x, weight, out, M, N, K, x.stride(0), weight.stride(0), a, b, a.stride(0), weight_a, scale_a,
                weight_b, scale_b, eps, residual, residual.stride(0), norm_weight, norm_eps, h, s, h.stride(0),
                arrivals, BLOCK_N=cfg["BLOCK_N"], BLOCK_K=cfg["BLOCK_K"], FOLD=_fold(cfg, x),
                BLOCK_C=triton.next_power_of_2(N), PDL=pdl, num_warps=cfg["num_warps"], launch_pdl=pdl)


_ARRIVALS: dict[str, Tensor] = {}
"""The pairs' counter by device: zeroed once, zero again after every pair (its last program resets it)."""


def arrival_counter(device: torch.device) -> Tensor:
    """The int32 counter of `device`'s launch pairs. One per device, not per stream: a pair's two launches run on two
    streams, and one pair runs at a time (a model's next layer reads this one's h); a CUDA graph keeps its address.
    Two steps of parallel layers replayed at once on one device (two graphs on two streams) would share it."""
    key = str(device)
    if key not in _ARRIVALS:
        _ARRIVALS[key] = torch.zeros(1, dtype=torch.int32, device=device)
    return _ARRIVALS[key]


def _check(x: Tensor, weight: Tensor, branches: tuple[Tensor, ...], vectors: tuple[Tensor, ...]) -> None:
    a, b, residual, h, s = branches
    N = residual.size(-1)
    if weight.dim() != 2 or weight.shape != (N, x.size(-1)) or weight.dtype != x.dtype:
        raise ValueError(f"combining_linear_: the weight must be ({N}, {x.size(-1)}) in x's dtype {x.dtype}, got "
                         f"{tuple(weight.shape)} {weight.dtype}")
    if x.shape[:-1] != residual.shape[:-1] or any(t.shape != residual.shape for t in branches):
        raise ValueError("combining_linear_: x's rows, a, b, h and s must match the residual's shape "
                         f"{tuple(residual.shape)}, got x {tuple(x.shape)} and {[tuple(t.shape) for t in branches]}")
    if a.dtype != x.dtype or b.dtype != x.dtype or h.dtype != s.dtype or not all(
            t.is_contiguous() for t in (a, b, h, s)):
        raise ValueError("combining_linear_: a and b take x's dtype, h and s one dtype, all of them contiguous "
                         "(ParallelCombine makes them so)")
    if any(v.shape != (N,) for v in vectors):
        raise ValueError(f"combining_linear_: the norms' weights and the scales must be ({N},), got "
                         f"{[tuple(v.shape) for v in vectors]}")


def _impl(x: Tensor, weight: Tensor, branch: int, a: Tensor, b: Tensor, weight_a: Tensor, scale_a: Tensor,
          weight_b: Tensor, scale_b: Tensor, eps: float, residual: Tensor, norm_weight: Tensor, norm_eps: float,
          h: Tensor, s: Tensor) -> None:
    """archgen_v1::combining_linear_: writes branch `branch`'s projection (a for 0, b for 1), and h and s once both are
    written (by whichever call completes the pair)."""
    vectors = (weight_a, scale_a, weight_b, scale_b, norm_weight)
    _check(x, weight, (a, b, residual, h, s), vectors)
    out = a if branch == 0 else b
    if not (x.is_cuda or triton_on_cpu()) or triton.next_power_of_2(residual.size(-1)) > MAX_BLOCK_N:
        combining_linear_reference(x, weight, branch, a, b, weight_a, scale_a, weight_b, scale_b, eps, residual,
                                   norm_weight, norm_eps, h, s)
        return
    N = residual.size(-1)
    combining_linear_forward(x.reshape(-1, x.size(-1)).contiguous(), weight.contiguous(), out.view(-1, N),
                             a.view(-1, N), b.view(-1, N), *(v.contiguous() for v in vectors[:4]), eps,
                             residual.reshape(-1, N).contiguous(), norm_weight.contiguous(), norm_eps, h.view(-1, N),
                             s.view(-1, N), arrival_counter(x.device))


def _fake(x, weight, branch, a, b, weight_a, scale_a, weight_b, scale_b, eps, residual, norm_weight, norm_eps, h, s):
    return None


combining_linear_op = register_op("combining_linear_", _impl, _fake, mutates_args=("a", "b", "h", "s"))


def combining_linear_(x: Tensor, weight: Tensor, branch: int, a: Tensor, b: Tensor, weight_a: Tensor,
                      scale_a: Tensor, weight_b: Tensor, scale_b: Tensor, eps: float, residual: Tensor,
                      norm_weight: Tensor, norm_eps: float, h: Tensor, s: Tensor) -> None:
    """Branch `branch` (0: a, 1: b) of a two-branch parallel layer projected, x (..., K) · weightᵀ into a or b
    (..., N); the call that completes the pair (counted on the device's `arrival_counter`) also writes
    (h, s) = (rms_norm(residual + y) · norm_weight, residual + y) for y = normalized_mean(a, b, ...). As the
    generated package's reference: its projections, then ops/norm.py's `normalized_mean_add_norm`. The two calls of a
    pair come one after the other, or side by side on two streams; no other pair on the device in between."""
    combining_linear_op(x, weight, branch, a, b, weight_a, scale_a, weight_b, scale_b, eps, residual, norm_weight,
                        norm_eps, h, s)


class ParallelCombine:
    """A decoding step of a two-branch parallel layer whose projections combine (see the module's docstring), as the
    generated mixer runs it::

        combine = kernels.combine_projections_module.ParallelCombine(x, residual, self.attn_norm, self.attn_scale,
                                                                     self.ssm_norm, self.ssm_scale, norm)
        with combine:
            with branch_stream(x, 0) as join_attn:
                combine.project(0, self.attn(x, ..., project=False), self.attn.o_proj)
            combine.project(1, self.ssm(x, ..., project=False), self.ssm.out_proj)
            join_attn()
        return combine.h, combine.s

    It holds the pair's outputs, made on the stream that forks (so that both streams may write them). As a context
    around the pair it zeroes the device's counter when an exception leaves the pair half done: the next pair's first
    projection would otherwise complete it."""

    def __init__(self, x: Tensor, residual: Tensor, norm_a, scale_a: Tensor, norm_b, scale_b: Tensor, norm):
        """x: the branches' input (their projections take its dtype); the norms: FusedRMSNorm modules (weight, eps)."""
        self.residual, self.norm_a, self.scale_a, self.norm_b, self.scale_b, self.norm = (
            residual, norm_a, scale_a, norm_b, scale_b, norm)
        self.a, self.b = (torch.empty(residual.shape, dtype=x.dtype, device=x.device) for _ in "ab")
        dtype = torch.promote_types(x.dtype, residual.dtype)  # the add's, as normalized_mean_add_norm promotes
        self.h, self.s = (torch.empty(residual.shape, dtype=dtype, device=x.device) for _ in "hs")

    def __enter__(self):
        return self

    def __exit__(self, error_type, error, traceback) -> bool:
        if error_type is not None:
            arrival_counter(self.residual.device).zero_()
        return False

    def project(self, branch: int, x: Tensor, linear) -> None:
        """Branch `branch`'s rows x through `linear` (an nn.Linear without a bias)."""
        combining_linear_(x, linear.weight, branch, self.a, self.b, self.norm_a.weight, self.scale_a,
                          self.norm_b.weight, self.scale_b, self.norm_a.eps, self.residual, self.norm.weight,
                          self.norm.eps, self.h, self.s)


def combining_linear_reference(x: Tensor, weight: Tensor, branch: int, a: Tensor, b: Tensor, weight_a: Tensor,
                               scale_a: Tensor, weight_b: Tensor, scale_b: Tensor, eps: float, residual: Tensor,
                               norm_weight: Tensor, norm_eps: float, h: Tensor, s: Tensor) -> None:
    """The same, one call after the other: the projection (a matmul in float32, rounded once), and after the second
    call of a pair (counted on the device's counter as the kernel counts features) normalized_mean_add_norm_reference."""
    out = a if branch == 0 else b
    arrivals = arrival_counter(x.device)
    out.copy_((x.float() @ weight.float().t()).to(out.dtype))
    arrivals += residual.numel()
    complete = arrivals >= 2 * residual.numel()  # a tensor: no host sync (the reference may run while a graph records)
    h_ref, s_ref = normalized_mean_add_norm_reference(a, b, weight_a, scale_a, weight_b, scale_b, eps, residual,
                                                      norm_weight, norm_eps)
    h.copy_(torch.where(complete, h_ref, h))
    s.copy_(torch.where(complete, s_ref, s))
    arrivals.masked_fill_(complete, 0)
