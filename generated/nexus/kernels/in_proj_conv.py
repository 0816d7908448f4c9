"""A Mamba-1 decoding step's in_proj GEMV with the causal conv step (+ SiLU) in its epilogue, the conv state shifted
in place: the kernel, its launcher, the custom op and the reference.

For rows x (B, 1, K) (one token each), in_proj's weight w (N, K) and bias b (N,), the conv's weight (D, W) and bias
(D,) and the cache's conv state s (B, D, W-1) (the last W-1 inputs of each channel, oldest first), D <= N::

    p = round(x · wᵀ + b)                       in x's dtype, as kernels/gemv.py's `linear` stores it
    y[n] = round(act(conv_b[n] + Σ_k conv_w[n, k] · [s[n, :], p[n]][k]))     for n < D  (the SSM input half)
    y[n] = p[n]                                                                for n >= D (z)
    s[n, :] <- [s[n, 1:], p[n]]                                                  for n < D, in place

so y is what `linear` followed by kernels/causal_conv1d.py's `causal_conv1d_update_` on p[..., :D] gives, bit for bit:
the product is the GEMV's loop (its config, so its summation order), the conv the in-place step kernel's own code
(causal_conv1d._conv_step_shift: the taps summed in float32 in its order, its SiLU, its rounding of the kept entries).

Why: a Mamba-1 decoding step is a chain of dependent launches (in_proj, conv step, x_proj, the state update,
out_proj), and the conv step is per channel: output n of in_proj's x half needs only that product, its channel's W-1
state entries, W taps and a bias. So the program that finishes the product applies the conv and shifts the state, and
the step is one launch shorter (Hymba+: 32 a token, on the Mamba branch, the longer of each parallel layer's two).
Nothing races: a program reads and writes only its own channels' state entries, and a barrier separates the loads of
the old entries from the stores over them (threads may hold the same channel).

Folded RMSNorm (`norm=`, op rms_norm_in_proj_conv_step_): the products of RMSNorm(x), the norm applied inside the
GEMV's loop (kernels/gemv.py, "RMSNorm folded in"), so a parallel layer's decoding step launches no norm before its
branches; within rounding of norm-then-kernel. It runs a tuning bucket of its own (`folded_config`).

Launch config: the GEMV's for in_proj's shape (kernels/gemv.py's tuner, bucket `gemv.shape_key`), so the fused and the
two-launch steps sum the products alike and `archgen build --autotune` tunes one bucket for both. Widths 2 to 4
(causal_conv1d.WINDOW_WIDTH); more rows than gemv.FEW_ROWS, and torch.export, take `linear` and
`causal_conv1d_update_` (two launches), whose results are the same.
"""

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from torch import Tensor

from .causal_conv1d import WINDOW_WIDTH, _conv_step_shift, causal_conv1d_reference, causal_conv1d_update_
from .gemv import (
    FEW_ROWS,
    SUPPORTED_DTYPES,
    _fold,
    _multiprocessors,
    _row_products,
    check_norm_weight,
    gemv_forward,
    linear_reference,
    rms_norm_fold_reference,
    shape_config,
    shape_key,
    tuned_config,
)
from .gemv import autotune as gemv_autotune
from .triton_support import (
    calls_implementation_directly,
    on_device,
    programmatic_launch,
    register_op,
    rounded,
    triton_on_cpu,
)

ACTIVATIONS = (None, "silu")


@triton.jit
def _in_proj_conv_kernel(x_ptr, w_ptr, b_ptr, y_ptr, z_ptr, N, K, D, stride_xm, stride_wn, stride_ym, stride_zm,
                         conv_w_ptr, conv_w_stride_d, conv_w_stride_k, conv_b_ptr,
                         state_ptr, state_stride_b, state_stride_d, state_stride_k,  # read, then written over
                         norm_ptr, eps,  # x's RMSNorm (weight, eps) folded into the products (NORM)
                         HAS_BIAS: tl.constexpr, HAS_CONV_BIAS: tl.constexpr, SILU: tl.constexpr,
                         WIDTH: tl.constexpr,  # 2 <= WIDTH <= 4
                         BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, FOLD: tl.constexpr,
                         PDL: tl.constexpr,  # as gemv._gemv_kernel's
                         NORM: tl.constexpr):
    """Grid (rows of x, blocks of BLOCK_N outputs): gemv._gemv_kernel's product (with NORM: of RMSNorm(x), folded
    into its loop as gemv._row_products folds it), then for outputs below D the conv step of
    causal_conv1d._conv_step_in_place_kernel on it, stored in y (B, D); the others in z (B, N - D). The state's
    entries are loaded after gdc_wait (the kernel ahead may be the previous step's last)."""
    row = tl.program_id(0)
    outs = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    outs_inside = outs < N
    x_row = x_ptr + row.to(tl.int64) * stride_xm
    p = _row_products(x_row, w_ptr, outs, outs_inside, N, K, stride_wn, BLOCK_N, BLOCK_K, FOLD, PDL, norm_ptr, eps,
                      NORM)  # gemv's sums
    if HAS_BIAS:
        p += tl.load(b_ptr + outs, mask=outs_inside, other=0.0).to(tl.float32)
    dtype = y_ptr.dtype.element_ty
    p = rounded(p, dtype)  # in_proj's output as the GEMV stores it
    if tl.program_id(1) * BLOCK_N < D:  # a block holding conv channels (the last of them may hold z's first outputs)
        d_in = outs < D
        conv = _conv_step_shift(p, state_ptr + row.to(tl.int64) * state_stride_b + outs * state_stride_d,
                                state_stride_k, conv_w_ptr + outs * conv_w_stride_d, conv_w_stride_k, conv_b_ptr, outs,
                                d_in, HAS_CONV_BIAS, SILU, WIDTH, dtype)
        tl.store(y_ptr + row.to(tl.int64) * stride_ym + outs, conv.to(dtype), mask=d_in)  # rounded as the conv step's
    tl.store(z_ptr + row.to(tl.int64) * stride_zm + (outs - D), p, mask=outs_inside & (outs >= D))


def in_proj_conv_step_forward(x: Tensor, weight: Tensor, bias: Tensor | None, conv_weight: Tensor,
                              conv_bias: Tensor | None, conv_state: Tensor, silu: bool,
                              norm_weight: Tensor | None = None, norm_eps: float = 0.0,
                              *, config: dict | None = None) -> tuple[Tensor, Tensor]:
    """Run the kernel: x (B, 1, K) -> (y (B, 1, D), z (B, 1, N - D)) in x's dtype, conv_state (B, D, W-1) shifted
    where it lies; given norm_weight (K,), of RMSNorm(x) with it and norm_eps (see gemv.rms_norm_fold).
    config {"BLOCK_N", "BLOCK_K", "num_warps"} as gemv_forward's; without it, the GEMV bucket's."""
    _check(x, weight, bias, conv_weight, conv_bias, conv_state)
    check_norm_weight(norm_weight, x, "in_proj_conv_step_")
    batch, _, K = x.shape
    N, (D, width) = weight.shape[0], conv_weight.shape
    x2 = x.reshape(batch, K) if x.stride(-1) == 1 else x.reshape(batch, K).contiguous()
    w = weight if weight.stride(-1) == 1 else weight.contiguous()
    y = torch.empty((batch, 1, D), device=x.device, dtype=x.dtype)
    z = torch.empty((batch, 1, N - D), device=x.device, dtype=x.dtype)
    if batch == 0 or N == 0:
        return y, z
    pdl = programmatic_launch(x.device)
    with on_device(x):
        key = shape_key(N, K, batch, x.dtype, gated=False)
        if norm_weight is None:  # the GEMV bucket's config (so its sums), tuned by timing the plain GEMV
            cfg = tuned_config(key, N, K, batch, x2, config, lambda cfg: gemv_forward(x2, w, bias, config=cfg))
        else:  # a bucket of its own, tuned by timing this kernel (on a copy of the state it shifts)
            cfg = tuned_config(key + "-norm", N, K, batch, x2, config,
                               lambda cfg: in_proj_conv_step_forward(x, weight, bias, conv_weight, conv_bias,
                                                                     conv_state.clone(), silu, norm_weight, norm_eps,
                                                                     config=cfg),
                               own=folded_config(N, K, batch, _multiprocessors(x.device)))
        _in_proj_conv_kernel[(batch, triton.cdiv(N, cfg["BLOCK_N"]))](
            x2, w, bias if bias is not None else w, y, z, N, K, D, x2.stride(0), w.stride(0), y.stride(0), z.stride(0),
            conv_weight, conv_weight.stride(0), conv_weight.stride(1), conv_bias if conv_bias is not None else w,
            conv_state, *conv_state.stride(), norm_weight if norm_weight is not None else w, norm_eps,
            HAS_BIAS=bias is not None, HAS_CONV_BIAS=conv_bias is not None, SILU=bool(silu), WIDTH=width,
            BLOCK_N=cfg["BLOCK_N"], BLOCK_K=cfg["BLOCK_K"], FOLD=_fold(cfg, x), PDL=pdl, NORM=norm_weight is not None,
            num_warps=cfg["num_warps"], launch_pdl=pdl)
    return y, z


def folded_config(N: int, K: int, M: int, multiprocessors: int) -> dict:
    """The folded form's untuned config: the plain GEMV's tile (gemv.shape_config) as twice the rows over half the
    columns. Each program reads x and, folded, the norm's weight from L2 once per tile: at 2 rows of 2,048 that was
    as many bytes from L2 as weights from HBM, and the kernel took 11.0 µs in Hymba+'s step against ~8.0 unfolded;
    at 4 × 1,024 over 4 warps the whole step was 3.4% shorter than unfolded, where 4 × 2,048 over 8 warps and
    8 × 1,024 over 8 gained 0.5% and 1.3% (session 22, bench/norm_fold_probe.py)."""
    own = shape_config(N, K, M, multiprocessors)
    if own["BLOCK_K"] < 64:  # a short row: its tile is all rows already
        return own
    return {**own, "BLOCK_N": 2 * own["BLOCK_N"], "BLOCK_K": own["BLOCK_K"] // 2}


def _check(x, weight, bias, conv_weight, conv_bias, conv_state) -> None:
    if x.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"in_proj_conv_step_ takes {', '.join(map(str, SUPPORTED_DTYPES))}, got {x.dtype}")
    if x.dim() != 3 or x.shape[1] != 1:
        raise ValueError(f"in_proj_conv_step_ takes one decoding step x (B, 1, K), got {tuple(x.shape)}")
    batch, _, K = x.shape
    if weight.dim() != 2 or weight.shape[1] != K or weight.dtype != x.dtype:
        raise ValueError(f"in_proj_conv_step_: weight must be (N, {K}) in {x.dtype}, got {tuple(weight.shape)} in "
                         f"{weight.dtype}")
    if conv_weight.dim() != 2 or not 2 <= conv_weight.shape[1] <= WINDOW_WIDTH:
        raise ValueError(f"in_proj_conv_step_: conv_weight must be (D, W) with W from 2 to {WINDOW_WIDTH}, got "
                         f"{tuple(conv_weight.shape)}")
    N, (D, width) = weight.shape[0], conv_weight.shape
    expected = {"bias": (bias, (N,)), "conv_bias": (conv_bias, (D,)), "conv_state": (conv_state, (batch, D, width - 1))}
    for name, (t, shape) in expected.items():
        if t is not None and tuple(t.shape) != shape:
            raise ValueError(f"in_proj_conv_step_: {name} must be {shape}, got {tuple(t.shape)}")
    if D > N:
        raise ValueError(f"in_proj_conv_step_: the conv's {D} channels are more than in_proj's {N} outputs")


# ---------------------------------------------------------------------------------------------------------------
# Custom op, entry point and reference
# ---------------------------------------------------------------------------------------------------------------


def _impl(x: Tensor, weight: Tensor, bias: Tensor | None, conv_weight: Tensor, conv_bias: Tensor | None,
          conv_state: Tensor, silu: bool) -> tuple[Tensor, Tensor]:
    """archgen_v1::in_proj_conv_step_ -> (y (B, 1, D), z (B, 1, N - D)); conv_state shifted where it lies. CPU tensors take the
    reference (outside the kernel tests)."""
    return _norm_impl(x, None, 0.0, weight, bias, conv_weight, conv_bias, conv_state, silu)


def _norm_impl(x: Tensor, norm_weight: Tensor | None, norm_eps: float, weight: Tensor, bias: Tensor | None,
               conv_weight: Tensor, conv_bias: Tensor | None, conv_state: Tensor,
               silu: bool) -> tuple[Tensor, Tensor]:
    """archgen_v1::rms_norm_in_proj_conv_step_: the same on RMSNorm(x) (norm_weight, norm_eps), folded into the
    products (gemv.rms_norm_fold)."""
    if not (x.is_cuda or triton_on_cpu()):
        return in_proj_conv_step_reference(x, weight, bias, conv_weight, conv_bias, conv_state, silu, norm_weight,
                                           norm_eps)
    return in_proj_conv_step_forward(x, weight, bias, conv_weight, conv_bias, conv_state, silu, norm_weight, norm_eps)


def _fake(x, weight, bias, conv_weight, conv_bias, conv_state, silu):
    D = conv_weight.shape[0]
    return x.new_empty((*x.shape[:-1], D)), x.new_empty((*x.shape[:-1], weight.shape[0] - D))


def _norm_fake(x, norm_weight, norm_eps, weight, bias, conv_weight, conv_bias, conv_state, silu):
    return _fake(x, weight, bias, conv_weight, conv_bias, conv_state, silu)


in_proj_conv_step_op = register_op("in_proj_conv_step_", _impl, _fake, mutates_args=("conv_state",))
rms_norm_in_proj_conv_step_op = register_op("rms_norm_in_proj_conv_step_", _norm_impl, _norm_fake,
                                            mutates_args=("conv_state",))


def in_proj_conv_step_(x: Tensor, weight: Tensor, bias: Tensor | None, conv_weight: Tensor, conv_bias: Tensor | None,
                       conv_state: Tensor, activation: str | None = None, norm=None) -> tuple[Tensor, Tensor]:
    """One decoding step of a Mamba-1 layer's in_proj and conv: x (B, 1, K) -> (y (B, 1, D), z (B, 1, N - D)): in_proj's
    first D = conv_weight.shape[0] outputs convolved (then SiLU with activation="silu") with the cache's conv_state,
    which is shifted where it lies, and the rest as they are (z); both contiguous (x_proj and the state update read
    y as they read the conv step's). One launch where `linear` and `causal_conv1d_update_` took two, the same bits.
    norm: an RMSNorm module (its `weight` and `eps`) not yet applied to x, which the kernel applies inside its
    products' loop (gemv.rms_norm_fold: within rounding of norm(x) first, one launch fewer).
    More rows than gemv.FEW_ROWS (cuBLAS's) and torch.export (the functional conv and a copy, which ONNX lowers) take
    those two, after norm(x). The op mutates only conv_state and returns new tensors."""
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
    if torch.compiler.is_exporting() or x.shape[0] > FEW_ROWS:
        products = F.linear(x if norm is None else norm(x), weight, bias)
        D = conv_weight.shape[0]
        x, z = products.split([D, products.shape[-1] - D], dim=-1)
        return causal_conv1d_update_(x, conv_weight, conv_bias, conv_state, activation), z
    silu = activation == "silu"
    args = (weight, bias, conv_weight, conv_bias, conv_state, silu)
    if norm is not None:
        if calls_implementation_directly(x):
            return _norm_impl(x, norm.weight, norm.eps, *args)
        return rms_norm_in_proj_conv_step_op(x, norm.weight, norm.eps, *args)
    if calls_implementation_directly(x):
        return _impl(x, *args)
    return in_proj_conv_step_op(x, *args)


def in_proj_conv_step_reference(x: Tensor, weight: Tensor, bias: Tensor | None, conv_weight: Tensor,
                                conv_bias: Tensor | None, conv_state: Tensor, silu: bool = False,
                                norm_weight: Tensor | None = None, norm_eps: float = 0.0) -> tuple[Tensor, Tensor]:
    """gemv.linear_reference (on gemv.rms_norm_fold_reference's RMSNorm(x) given norm_weight, rounded to x's dtype),
    then causal_conv1d_reference on its first D outputs with the state copied back: the tests' truth (float32 sums,
    rounded to x's dtype)."""
    inputs = x if norm_weight is None else rms_norm_fold_reference(x, norm_weight, norm_eps)
    products = linear_reference(inputs, weight, bias).to(x.dtype)
    D = conv_weight.shape[0]
    conv, new_state = causal_conv1d_reference(products[..., :D], conv_weight, conv_bias, conv_state,
                                              "silu" if silu else None)
    conv_state.copy_(new_state)
    return conv, products[..., D:]


def autotune(config: dict, params: dict[str, tuple[int, ...]], batch: int, seqlen: int, dtype: torch.dtype,
             device: torch.device | str) -> None:
    """The build-time tuning hook: the kernel runs the GEMV's config for in_proj's shape, so tune that bucket
    (kernels/gemv.py's hook does so too; a bucket tuned already is not timed again)."""
    gemv_autotune(config, {name: shape for name, shape in params.items() if name.endswith("in_proj.weight")}, batch,
                  seqlen, dtype, device)


def decomposition(reference, max_seqlen: int) -> dict:
    """Nothing to lower for ONNX: while torch.export traces, the entry point takes `linear` and the functional conv
    (kernels/gemv.py's and kernels/causal_conv1d.py's decompositions), so the op never reaches an exported graph."""
    return {}
