"""A parallel layer's combine run in the prologue of its block's SwiGLU GEMV: one launch where a decoding step ran two
(kernels/normalized_mean.py's normalized_mean_add_norm, then kernels/gemv.py's swiglu_linear). The kernel, its launcher,
its configs, the custom op and the reference.

For the branches' outputs a, b (M, K), their norms' weights and scales, the block's residual stream r (M, K), its
feed-forward norm's weight w_n and the feed-forward's gate and up weights (N, K)::

    s = r + (a · rstd_a · w_a · s_a + b · rstd_b · w_b · s_b) / 2      the combine and the block's residual add
    h = rms_norm(s) · w_n                                                the feed-forward's norm
    y = silu(h · w_gateᵀ + b_gate) · (h · w_upᵀ + b_up)                  the gate and up GEMV

-> (y, s), each rounded where the two launches round it (y of the combine to the branches' dtype, s, h and y to the
stream's): the same bits as normalized_mean_add_norm then swiglu_linear at the same tile.

Why: a batch-1 decoding step is a chain of small kernels, and each costs its bytes over the bandwidth plus ~2.5 µs
however it loops (bench/gemv_persistent_probe.py, session 15). The combine's launch moves 13 KB; its fixed cost is
most of Hymba+'s 3.3 µs a layer. Here each program computes h for
itself from a, b and r, the K-wide row as one register tile (BLOCK_K = next_pow2(K) ≤ MAX_K), then loops over
weight blocks of BLOCK_N rows, grid-strided over PROGRAMS_PER_SM programs an SM, while the weights stream from HBM
as in the GEMV. The prologue reads eight K-wide vectors (the branches, the stream, four norm weights and scales, the
feed-forward norm's weight: 26 KB at Hymba+'s 1600 in bf16): a program per 2-row block, as the GEMV launches, read
72 MB of them from L2 against 35 MB of weights and took 27 µs where the two launches take 15 (H200, session 17).
The first program also stores s, which the down projection's epilogue adds (kernels/gemv.py's residual_linear).

Forward only, for a decoding step's few rows (up to gemv.FEW_ROWS): the generated feed-forward calls it when its
block's parallel mixer hands over the branches uncombined (ops/norm.py ParallelBranches). CPU tensors, and rows wider
than MAX_K, take the reference (the two references in turn) unless TRITON_INTERPRET=1 and ARCHGEN_TRITON_ON_CPU=1
(the tests).
"""

import torch
import triton
import triton.language as tl
from torch import Tensor

from .gemv import FEW_ROWS, _fold, _multiprocessors, _prefetch_first_tile, _tile_products, shape_config, swiglu_linear_reference
from .normalized_mean import _branch_factor, _combine_add_norm, normalized_mean_add_norm_reference
from .triton_support import (
    gdc_launch_dependents,
    gdc_wait,
    on_device,
    programmatic_launch,
    register_op,
    rounded,
    triton_on_cpu,
)

SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
MAX_K = 4096
"""The widest row whose branches, stream and h one program holds in registers; wider rows take the two launches."""
CONFIGS = [{"BLOCK_N": n, "num_warps": w, "PROGRAMS_PER_SM": p}
           for n, w in ((1, 4), (2, 4), (2, 8), (4, 4), (4, 8), (8, 8)) for p in (2, 3, 4, 6)]
"""What bench/combine_probe.py sweeps against the two launches; launch_config's choice is the default."""


@triton.jit
def _combine_swiglu_kernel(a_ptr, b_ptr, wa_ptr, sa_ptr, wb_ptr, sb_ptr, r_ptr, wn_ptr, s_ptr, wg_ptr, wu_ptr, bg_ptr,
                           bu_ptr, y_ptr, N, K, stride_a, stride_b, stride_r, stride_s, stride_y, eps, norm_eps,
                           HAS_BIAS: tl.constexpr,  # add the gate's and up's biases to the products
                           BLOCK_N: tl.constexpr,  # weight rows per step of a program's loop
                           BLOCK_K: tl.constexpr,  # next_pow2(K): the whole row, one tile
                           FOLD: tl.constexpr,  # gemv's: products each thread sums before accumulating
                           PDL: tl.constexpr):  # launched programmatically
    row = tl.program_id(0)  # the row of x: fastest, as in gemv._gemv_kernel
    first = tl.program_id(1)
    cols = tl.arange(0, BLOCK_K)
    cols_inside = cols < K
    # the first weight tiles on their way to L2 while the program computes h (no kernel of a step writes weights)
    _prefetch_first_tile(wg_ptr, first * BLOCK_N + tl.arange(0, BLOCK_N), N, K, K, BLOCK_K)
    _prefetch_first_tile(wu_ptr, first * BLOCK_N + tl.arange(0, BLOCK_N), N, K, K, BLOCK_K)
    # the per-channel factors: parameters, which no kernel of a step writes (loaded before any wait)
    ga = _branch_factor(wa_ptr, sa_ptr, cols, cols_inside)
    gb = _branch_factor(wb_ptr, sb_ptr, cols, cols_inside)
    wn = tl.load(wn_ptr + cols, mask=cols_inside, other=0.0).to(tl.float32)
    if PDL:
        gdc_wait()
        gdc_launch_dependents()
    row64 = row.to(tl.int64)
    a = tl.load(a_ptr + row64 * stride_a + cols, mask=cols_inside, other=0.0).to(tl.float32)[None, :]
    b = tl.load(b_ptr + row64 * stride_b + cols, mask=cols_inside, other=0.0).to(tl.float32)[None, :]
    r = tl.load(r_ptr + row64 * stride_r + cols, mask=cols_inside, other=0.0).to(tl.float32)[None, :]
    stream_dtype = s_ptr.dtype.element_ty
    s, h = _combine_add_norm(a, b, ga, gb, r, wn, K, eps, norm_eps, a_ptr.dtype.element_ty, stream_dtype)
    if first == 0:
        tl.store(s_ptr + row64 * stride_s + cols[None, :], s, mask=cols_inside[None, :])
    h = h.to(stream_dtype).to(tl.float32)  # as the combine's launch stores h and the GEMV loads it
    # h once a program (its K-wide prologue reads ~8 vectors: once per BLOCK_N rows, it read more than the weights),
    # then the program's weight blocks, grid-strided
    for block in range(first, tl.cdiv(N, BLOCK_N), tl.num_programs(1)):
        outs = block * BLOCK_N + tl.arange(0, BLOCK_N)
        outs_inside = outs < N
        gate_rows = wg_ptr + outs.to(tl.int64)[:, None] * K
        up_rows = wu_ptr + outs.to(tl.int64)[:, None] * K
        gate = tl.sum(_tile_products(h, gate_rows, outs_inside, cols, cols_inside, BLOCK_N, BLOCK_K, FOLD), axis=1)
        up = tl.sum(_tile_products(h, up_rows, outs_inside, cols, cols_inside, BLOCK_N, BLOCK_K, FOLD), axis=1)
        if HAS_BIAS:
            gate += tl.load(bg_ptr + outs, mask=outs_inside, other=0.0).to(tl.float32)
            up += tl.load(bu_ptr + outs, mask=outs_inside, other=0.0).to(tl.float32)
        y = rounded(gate * tl.sigmoid(gate) * up, y_ptr.dtype.element_ty)
        tl.store(y_ptr + row64 * stride_y + outs, y, mask=outs_inside)


def launch_config(N: int, K: int, M: int, multiprocessors: int) -> dict:
    """The whole row as one tile; the weight rows a step takes and its warps as kernels/gemv.py's shape_config
    chooses for the plain gated GEMV at this row length (2 rows of 2048 columns over 4 warps at Hymba+'s 1600), so
    that the two launches it replaces and this one stream the weights alike; PROGRAMS_PER_SM programs (per row of x)
    loop over the blocks."""
    block_k = triton.next_power_of_2(max(K, 1))
    gemv = shape_config(N, K, M, multiprocessors)
    rows = max(1, gemv["BLOCK_N"] * gemv["BLOCK_K"] // block_k)
    return {"BLOCK_N": rows, "num_warps": min(max(rows * block_k // 1024, 2), 8), "PROGRAMS_PER_SM": 4}


def combined_swiglu_forward(a: Tensor, b: Tensor, weight_a: Tensor, scale_a: Tensor, weight_b: Tensor, scale_b: Tensor,
                            eps: float, norm_weight: Tensor, norm_eps: float, residual: Tensor, gate_weight: Tensor,
                            up_weight: Tensor, gate_bias: Tensor | None, up_bias: Tensor | None,
                            config: dict | None = None) -> tuple[Tensor, Tensor]:
    """The launcher: a, b, residual (M, K) with a contiguous last dim, the weights contiguous -> (y (M, N), s (M, K)) in
    the stream's dtype. config {"BLOCK_N", "num_warps", "PROGRAMS_PER_SM"} overrides launch_config (bench/combine_probe.py)."""
    M, K = a.shape
    N = gate_weight.shape[0]
    dtype = torch.promote_types(a.dtype, residual.dtype)
    s = torch.empty((M, K), dtype=dtype, device=a.device)
    y = torch.empty((M, N), dtype=dtype, device=a.device)
    if M == 0:
        return y, s
    multiprocessors = _multiprocessors(a.device)
    cfg = config or launch_config(N, K, M, multiprocessors)
    biases = (gate_bias, up_bias) if gate_bias is not None else (gate_weight, gate_weight)
    pdl = programmatic_launch(a.device)
    with on_device(a):
        programs = min(triton.cdiv(N, cfg["BLOCK_N"]), max(1, cfg["PROGRAMS_PER_SM"] * multiprocessors // M))
        _combine_swiglu_kernel[(M, programs)](
            a, b, weight_a, scale_a, weight_b, scale_b, residual, norm_weight, s, gate_weight, up_weight, *biases, y, N,
            K, a.stride(0), b.stride(0), residual.stride(0), s.stride(0), y.stride(0), eps, norm_eps,
            HAS_BIAS=gate_bias is not None, BLOCK_N=cfg["BLOCK_N"], BLOCK_K=triton.next_power_of_2(K),
            FOLD=_fold({"BLOCK_K": triton.next_power_of_2(K)}, y), PDL=pdl, num_warps=cfg["num_warps"], launch_pdl=pdl)
    return y, s


# ---------------------------------------------------------------------------------------------------------------
# Custom op
# ---------------------------------------------------------------------------------------------------------------


def _as_rows(t: Tensor) -> Tensor:
    t = t.reshape(-1, t.shape[-1])
    return t if t.stride(-1) == 1 else t.contiguous()


def _check(a, b, vectors, residual, norm_weight, gate_weight, up_weight, gate_bias, up_bias) -> None:
    K = a.size(-1)
    if a.shape != b.shape or a.dtype != b.dtype or a.dtype not in SUPPORTED_DTYPES:
        raise ValueError(f"combined_swiglu_linear: the branches must have one shape and a dtype of "
                         f"{', '.join(map(str, SUPPORTED_DTYPES))}, got {tuple(a.shape)} {a.dtype} and "
                         f"{tuple(b.shape)} {b.dtype}")
    if residual.shape != a.shape or any(v.shape != (K,) for v in (*vectors, norm_weight)):
        raise ValueError(f"combined_swiglu_linear: the residual stream must be {tuple(a.shape)} like the branches and "
                         f"the norms' weights and scales ({K},), got {tuple(residual.shape)} and "
                         f"{[tuple(v.shape) for v in (*vectors, norm_weight)]}")
    dtype = torch.promote_types(a.dtype, residual.dtype)
    if (gate_weight.shape != up_weight.shape or gate_weight.dim() != 2 or gate_weight.shape[1] != K
            or gate_weight.dtype != dtype or up_weight.dtype != dtype or (gate_bias is None) != (up_bias is None)):
        raise ValueError(f"combined_swiglu_linear: the gate and up weights must be one shape (out, {K}) in the "
                         f"stream's dtype {dtype}, both or neither with a bias, got {tuple(gate_weight.shape)} "
                         f"{gate_weight.dtype} and {tuple(up_weight.shape)} {up_weight.dtype}")


def _impl(a: Tensor, b: Tensor, weight_a: Tensor, scale_a: Tensor, weight_b: Tensor, scale_b: Tensor, eps: float,
          norm_weight: Tensor, norm_eps: float, residual: Tensor, gate_weight: Tensor, up_weight: Tensor,
          gate_bias: Tensor | None, up_bias: Tensor | None) -> tuple[Tensor, Tensor]:
    """archgen_v1::combined_swiglu_linear -> (y, s)."""
    vectors = (weight_a, scale_a, weight_b, scale_b)
    _check(a, b, vectors, residual, norm_weight, gate_weight, up_weight, gate_bias, up_bias)
    if not (a.is_cuda or triton_on_cpu()) or a.size(-1) > MAX_K or a.numel() > FEW_ROWS * a.size(-1):
        return combined_swiglu_linear_reference(a, b, *vectors, eps, norm_weight, norm_eps, residual, gate_weight,
                                                up_weight, gate_bias, up_bias)
    y, s = combined_swiglu_forward(_as_rows(a), _as_rows(b), *(v.contiguous() for v in vectors), eps,
                                   norm_weight.contiguous(), norm_eps, _as_rows(residual), gate_weight.contiguous(),
                                   up_weight.contiguous(), gate_bias, up_bias)
    return y.view(*a.shape[:-1], -1), s.view(a.shape)


def _fake(a, b, weight_a, scale_a, weight_b, scale_b, eps, norm_weight, norm_eps, residual, gate_weight, up_weight,
          gate_bias, up_bias):
    dtype = torch.promote_types(a.dtype, residual.dtype)
    return a.new_empty((*a.shape[:-1], gate_weight.shape[0]), dtype=dtype), a.new_empty(a.shape, dtype=dtype)


combined_swiglu_linear_op = register_op("combined_swiglu_linear", _impl, _fake)


def combined_swiglu_linear(a: Tensor, b: Tensor, weight_a: Tensor, scale_a: Tensor, weight_b: Tensor, scale_b: Tensor,
                           eps: float, norm_weight: Tensor, norm_eps: float, residual: Tensor, gate_weight: Tensor,
                           up_weight: Tensor, gate_bias: Tensor | None = None,
                           up_bias: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """A parallel layer's combine, its block's residual add and feed-forward norm, then the SwiGLU's gate and up GEMV,
    in one launch without a gradient: a, b, residual (..., K), the vectors (K,), the weights (N, K) ->
    (silu(h · w_gateᵀ) · (h · w_upᵀ) (..., N), s (..., K)) with (h, s) = normalized_mean_add_norm(...). The arguments
    in ops/norm.py ParallelBranches' order (a, b, the branches' weights and scales, eps, the feed-forward norm's weight
    and eps), then the residual stream and the feed-forward's gate and up weights and biases."""
    return combined_swiglu_linear_op(a, b, weight_a, scale_a, weight_b, scale_b, eps, norm_weight, norm_eps, residual,
                                     gate_weight, up_weight, gate_bias, up_bias)


def combined_swiglu_linear_reference(a: Tensor, b: Tensor, weight_a: Tensor, scale_a: Tensor, weight_b: Tensor,
                                     scale_b: Tensor, eps: float, norm_weight: Tensor, norm_eps: float,
                                     residual: Tensor, gate_weight: Tensor, up_weight: Tensor,
                                     gate_bias: Tensor | None = None,
                                     up_bias: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """The two kernels' references in turn: normalized_mean_add_norm_reference, then swiglu_linear_reference on h."""
    h, s = normalized_mean_add_norm_reference(a, b, weight_a, scale_a, weight_b, scale_b, eps, residual, norm_weight,
                                              norm_eps)
    return swiglu_linear_reference(h, gate_weight, up_weight, gate_bias, up_bias), s


def decomposition(reference, max_seqlen: int) -> dict:
    """Nothing to lower for ONNX: the generated layers call the op on a decoding step's rows only, never while
    torch.export traces (runs_gemv is false there), so it never reaches an exported graph."""
    return {}
