"""RMSNorm, optionally fused with the residual add before it, as Triton kernels: forward, backward, the custom ops,
and the reference.

For rows x (R, N) of any leading shape flattened, weight w (N,)::

    rms_norm:      y = x / sqrt(mean(x², -1) + eps) * w
    add_rms_norm:  s = x + residual   (rounded to x's dtype, as the unfused `x + residual` would be)
                   y = rms_norm(s),   returns (y, s): s is the new residual stream

Everything inside runs in float32; y and s come back in x's dtype; the weight may be float32 or x's dtype. With
x̂ = s · rstd, rstd = 1 / sqrt(mean(s²) + eps) and dx̂ = dy · w, the backward is::

    ds = rstd · (dx̂ - x̂ · mean(dx̂ · x̂))  (+ ds_out, the gradient reaching s directly, for add_rms_norm)
    dw = Σ_rows dy · x̂                    dx = dresidual = ds

Why a kernel: unfused, the add, the square-mean, the scale and the weight are separate passes over the rows (eager
PyTorch reads and writes the (R, N) tensor several times over, 0.27 TB/s of a 3 TB/s card for a plain RMSNorm in
ANCHORS.md); here the forward reads x (and the residual) once and writes y (and s) once; the backward reads dy, s
(and ds_out) once and writes ds once. rstd (R,) float32 is saved by the forward for the backward.

How: one program per row in the forward (the row, up to BLOCK_N = next_pow2(N) ≤ 65536 wide, sits in registers);
the backward's programs take ROWS consecutive rows each, accumulate their part of dw in registers and write it to a
(programs, N) float32 buffer that torch sums: deterministic, no atomics.

Contents: `rms_norm` and `add_rms_norm` (entry points, differentiable), the custom ops `archgen::rms_norm`,
`archgen::add_rms_norm` and `archgen::rms_norm_backward` (one graph node each under torch.compile / torch.export,
with fake implementations and autograd), the launchers `rms_norm_forward` / `rms_norm_backward` (autotuned on first
use per (N, dtype), or with an explicit config), `rms_norm_reference` / `add_rms_norm_reference`, and
`decomposition` for ONNX. CPU tensors take the reference unless TRITON_INTERPRET=1 and ARCHGEN_TRITON_ON_CPU=1 (the
tests), as in kernels/selective_scan.py.
"""

import contextlib
import os

import torch
import triton
import triton.language as tl
from torch import Tensor

try:
    from triton.runtime.interpreter import InterpretedFunction
except ImportError:  # a triton without the interpreter: never interpreting
    InterpretedFunction = ()

MAX_BLOCK_N = 65536
"""Widest row a program holds in registers (elements); wider rows raise (call the reference)."""

FORWARD_CONFIGS = [{"num_warps": warps} for warps in (2, 4, 8, 16)]
BACKWARD_CONFIGS = [{"ROWS": rows, "num_warps": warps} for rows in (8, 32, 128) for warps in (4, 8, 16)]
INTERPRETER_CONFIG = {"ROWS": 4, "num_warps": 4}
SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


# ---------------------------------------------------------------------------------------------------------------
# Kernels
# ---------------------------------------------------------------------------------------------------------------


@triton.jit
def _rms_norm_fwd_kernel(
    x_ptr, res_ptr, w_ptr, y_ptr, s_ptr, rstd_ptr,
    N, stride_x, stride_res, stride_y, stride_s, eps,
    HAS_RESIDUAL: tl.constexpr, BLOCK_N: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_N)
    inside = cols < N
    x = tl.load(x_ptr + row * stride_x + cols, mask=inside, other=0.0)
    if HAS_RESIDUAL:
        r = tl.load(res_ptr + row * stride_res + cols, mask=inside, other=0.0)
        s = (x.to(tl.float32) + r.to(tl.float32)).to(x.dtype)  # rounded like the unfused add
        tl.store(s_ptr + row * stride_s + cols, s, mask=inside)
    else:
        s = x
    s = s.to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(s * s, axis=0) / N + eps)
    w = tl.load(w_ptr + cols, mask=inside, other=0.0).to(tl.float32)
    tl.store(y_ptr + row * stride_y + cols, (s * rstd * w).to(y_ptr.dtype.element_ty), mask=inside)
    tl.store(rstd_ptr + row, rstd)


@triton.jit
def _rms_norm_bwd_kernel(
    dy_ptr, ds_out_ptr, s_ptr, w_ptr, rstd_ptr, ds_ptr, dw_partial_ptr,
    R, N, stride_dy, stride_ds_out, stride_s, stride_ds,
    HAS_DS_OUT: tl.constexpr, ROWS: tl.constexpr, BLOCK_N: tl.constexpr,
):
    program = tl.program_id(0)
    cols = tl.arange(0, BLOCK_N)
    inside = cols < N
    w = tl.load(w_ptr + cols, mask=inside, other=0.0).to(tl.float32)
    dw = tl.zeros((BLOCK_N,), dtype=tl.float32)
    first = program * ROWS
    for i in range(ROWS):
        row = (first + i).to(tl.int64)
        if row < R:
            s = tl.load(s_ptr + row * stride_s + cols, mask=inside, other=0.0).to(tl.float32)
            dy = tl.load(dy_ptr + row * stride_dy + cols, mask=inside, other=0.0).to(tl.float32)
            rstd = tl.load(rstd_ptr + row)
            x_hat = s * rstd
            dx_hat = dy * w
            ds = rstd * (dx_hat - x_hat * (tl.sum(dx_hat * x_hat, axis=0) / N))
            if HAS_DS_OUT:
                ds += tl.load(ds_out_ptr + row * stride_ds_out + cols, mask=inside, other=0.0).to(tl.float32)
            tl.store(ds_ptr + row * stride_ds + cols, ds.to(ds_ptr.dtype.element_ty), mask=inside)
            dw += dy * x_hat
    tl.store(dw_partial_ptr + program * N + cols, dw, mask=inside)


# ---------------------------------------------------------------------------------------------------------------
# Launchers
# ---------------------------------------------------------------------------------------------------------------


def interpreting() -> bool:
    """True when the kernels run in Triton's CPU interpreter (TRITON_INTERPRET=1 when this file was imported)."""
    return isinstance(_rms_norm_fwd_kernel, InterpretedFunction)


def triton_on_cpu() -> bool:
    """CPU tensors run the kernels (in the interpreter) only when interpreting and ARCHGEN_TRITON_ON_CPU=1."""
    return interpreting() and os.environ.get("ARCHGEN_TRITON_ON_CPU") == "1"


def _on_device(t: Tensor):
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


class Autotuner:
    """Times every config on the first call per key (N, dtype) on that call's tensors and keeps the fastest."""

    def __init__(self, name: str, configs: list[dict]):
        self.name = name
        self.configs = configs
        self.chosen: dict[str, dict] = {}
        self.timings: dict[str, dict] = {}

    def config(self, key: str, launch, explicit: dict | None) -> dict:
        if explicit is not None:
            return explicit
        if interpreting():
            return INTERPRETER_CONFIG
        if key not in self.chosen:
            from triton.testing import do_bench

            timings = {}
            for config in self.configs:
                try:
                    timings[str(config)] = float(do_bench(lambda config=config: launch(config), warmup=5, rep=25,
                                                          return_mode="median"))
                except Exception as error:  # noqa: BLE001 - a config that cannot run is skipped, recorded
                    timings[str(config)] = f"{type(error).__name__}: {error}"[:300]
            ran = {name: ms for name, ms in timings.items() if isinstance(ms, float)}
            if not ran:
                raise RuntimeError(f"no config of the {self.name} kernel ran for {key}: {timings}")
            self.chosen[key] = next(c for c in self.configs if str(c) == min(ran, key=ran.get))
            self.timings[key] = timings
        return self.chosen[key]


FORWARD_TUNER = Autotuner("forward", FORWARD_CONFIGS)
BACKWARD_TUNER = Autotuner("backward", BACKWARD_CONFIGS)


def _rows(t: Tensor) -> Tensor:
    """(R, N) view with unit stride along N (a copy only when the last dim is strided)."""
    t = t.reshape(-1, t.shape[-1])
    return t if t.stride(-1) == 1 else t.contiguous()


def _block_n(N: int) -> int:
    block = triton.next_power_of_2(N)
    if block > MAX_BLOCK_N:
        raise ValueError(f"rms_norm kernel holds rows of up to {MAX_BLOCK_N} elements, got {N}: use the reference")
    return block


def rms_norm_forward(x: Tensor, residual: Tensor | None, weight: Tensor, eps: float,
                     config: dict | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """(y, s, rstd): y like x; s = x + residual like x (x itself when residual is None); rstd (R,) float32."""
    shape = x.shape
    x2 = _rows(x)
    R, N = x2.shape
    res2 = _rows(residual) if residual is not None else None
    y = torch.empty((R, N), device=x.device, dtype=x.dtype)
    s = torch.empty((R, N), device=x.device, dtype=x.dtype) if residual is not None else x2
    rstd = torch.empty((R,), device=x.device, dtype=torch.float32)
    block = _block_n(N)

    def launch(cfg):
        _rms_norm_fwd_kernel[(R,)](
            x2, res2 if res2 is not None else x2, weight, y, s, rstd,
            N, x2.stride(0), res2.stride(0) if res2 is not None else 0, y.stride(0), s.stride(0), eps,
            HAS_RESIDUAL=res2 is not None, BLOCK_N=block, num_warps=cfg["num_warps"],
        )

    with _on_device(x):
        if R:
            launch(FORWARD_TUNER.config(f"N{N}-{x.dtype}-res{residual is not None}", launch, config))
    return y.view(shape), s.view(shape), rstd


def rms_norm_backward(dy: Tensor, ds_out: Tensor | None, s: Tensor, weight: Tensor, rstd: Tensor,
                      config: dict | None = None) -> tuple[Tensor, Tensor]:
    """(ds like s, dw like weight): the gradient reaching the normalised input (plus ds_out) and the weight's."""
    shape = s.shape
    s2, dy2 = _rows(s), _rows(dy)
    ds_out2 = _rows(ds_out) if ds_out is not None else None
    R, N = s2.shape
    ds = torch.empty((R, N), device=s.device, dtype=s.dtype)
    block = _block_n(N)
    partial = {}

    def launch(cfg):
        programs = triton.cdiv(R, cfg["ROWS"])
        partial["dw"] = torch.empty((programs, N), device=s.device, dtype=torch.float32)
        _rms_norm_bwd_kernel[(programs,)](
            dy2, ds_out2 if ds_out2 is not None else dy2, s2, weight, rstd, ds, partial["dw"],
            R, N, dy2.stride(0), ds_out2.stride(0) if ds_out2 is not None else 0, s2.stride(0), ds.stride(0),
            HAS_DS_OUT=ds_out2 is not None, ROWS=cfg["ROWS"], BLOCK_N=block, num_warps=cfg["num_warps"],
        )

    with _on_device(s):
        if not R:
            return ds.view(shape), torch.zeros_like(weight)
        launch(BACKWARD_TUNER.config(f"N{N}-{s.dtype}-dsout{ds_out is not None}", launch, config))
    return ds.view(shape), partial["dw"].sum(dim=0).to(weight.dtype)


# ---------------------------------------------------------------------------------------------------------------
# Custom ops
# ---------------------------------------------------------------------------------------------------------------


OP_NAMESPACE = "archgen"


def _use_kernel(t: Tensor) -> bool:
    return t.is_cuda or triton_on_cpu()


def _rms_norm_impl(x: Tensor, weight: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    """archgen::rms_norm -> (y, rstd); CPU tensors take the reference (rstd then computed alongside)."""
    if not _use_kernel(x):
        return rms_norm_reference(x, weight, eps), _rstd(x, eps)
    y, _, rstd = rms_norm_forward(x, None, weight, eps)
    return y, rstd


def _rms_norm_fake(x, weight, eps):
    return torch.empty_like(x), x.new_empty((x.numel() // x.shape[-1],), dtype=torch.float32)


def _add_rms_norm_impl(x: Tensor, residual: Tensor, weight: Tensor, eps: float) -> tuple[Tensor, Tensor, Tensor]:
    """archgen::add_rms_norm -> (y, s, rstd)."""
    if not _use_kernel(x):
        y, s = add_rms_norm_reference(x, residual, weight, eps)
        return y, s, _rstd(s, eps)
    return rms_norm_forward(x, residual, weight, eps)


def _add_rms_norm_fake(x, residual, weight, eps):
    return torch.empty_like(x), torch.empty_like(x), x.new_empty((x.numel() // x.shape[-1],), dtype=torch.float32)


def _backward_impl(dy: Tensor, ds_out: Tensor | None, s: Tensor, weight: Tensor, rstd: Tensor) -> tuple[Tensor, Tensor]:
    """archgen::rms_norm_backward -> (ds, dw)."""
    if not _use_kernel(s):
        return _backward_reference(dy, ds_out, s, weight, rstd)
    return rms_norm_backward(dy, ds_out, s, weight, rstd)


def _backward_fake(dy, ds_out, s, weight, rstd):
    return torch.empty_like(s), torch.empty_like(weight)


def _rstd(s: Tensor, eps: float) -> Tensor:
    s32 = s.reshape(-1, s.shape[-1]).float()
    return torch.rsqrt(s32.pow(2).mean(dim=-1) + eps)


def _backward_reference(dy, ds_out, s, weight, rstd):
    shape = s.shape
    s32, dy32 = s.reshape(-1, shape[-1]).float(), dy.reshape(-1, shape[-1]).float()
    x_hat = s32 * rstd[:, None]
    dx_hat = dy32 * weight.float()
    ds = rstd[:, None] * (dx_hat - x_hat * (dx_hat * x_hat).mean(dim=-1, keepdim=True))
    if ds_out is not None:
        ds = ds + ds_out.reshape(-1, shape[-1]).float()
    return ds.to(s.dtype).view(shape), (dy32 * x_hat).sum(dim=0).to(weight.dtype)


def _setup_rms_norm(ctx, inputs, output):
    x, weight, _eps = inputs
    _, rstd = output
    ctx.save_for_backward(x, weight, rstd)
    ctx.mark_non_differentiable(rstd)


def _rms_norm_grad(ctx, dy, _drstd):
    x, weight, rstd = ctx.saved_tensors
    dx, dw = backward_op(dy, None, x, weight, rstd)
    return dx, dw, None


def _setup_add_rms_norm(ctx, inputs, output):
    _x, _residual, weight, _eps = inputs
    _, s, rstd = output
    ctx.save_for_backward(s, weight, rstd)
    ctx.mark_non_differentiable(rstd)
    ctx.set_materialize_grads(False)


def _add_rms_norm_grad(ctx, dy, ds_out, _drstd):
    s, weight, rstd = ctx.saved_tensors
    if dy is None:
        dy = torch.zeros_like(s)
    ds, dw = backward_op(dy, ds_out, s, weight, rstd)
    return ds, ds, dw, None


def _define_ops():
    """Register the ops once per process (a second copy of this file reuses them: registering twice corrupts the
    dispatcher)."""
    namespace = getattr(torch.ops, OP_NAMESPACE)
    if all(hasattr(namespace, n) for n in ("rms_norm", "add_rms_norm", "rms_norm_backward")):
        return namespace.rms_norm, namespace.add_rms_norm, namespace.rms_norm_backward
    backward = torch.library.custom_op(f"{OP_NAMESPACE}::rms_norm_backward", _backward_impl, mutates_args=())
    backward.register_fake(_backward_fake)
    plain = torch.library.custom_op(f"{OP_NAMESPACE}::rms_norm", _rms_norm_impl, mutates_args=())
    plain.register_fake(_rms_norm_fake)
    plain.register_autograd(_rms_norm_grad, setup_context=_setup_rms_norm)
    fused = torch.library.custom_op(f"{OP_NAMESPACE}::add_rms_norm", _add_rms_norm_impl, mutates_args=())
    fused.register_fake(_add_rms_norm_fake)
    fused.register_autograd(_add_rms_norm_grad, setup_context=_setup_add_rms_norm)
    return plain, fused, backward


rms_norm_op, add_rms_norm_op, backward_op = _define_ops()


# ---------------------------------------------------------------------------------------------------------------
# Entry points and references
# ---------------------------------------------------------------------------------------------------------------


def _check(x: Tensor, weight: Tensor, residual: Tensor | None = None) -> None:
    if x.dtype not in SUPPORTED_DTYPES:
        raise ValueError(f"rms_norm takes {SUPPORTED_DTYPES}, got x of {x.dtype}")
    if weight.shape != (x.shape[-1],):
        raise ValueError(f"weight must be ({x.shape[-1]},) for x of shape {tuple(x.shape)}, got {tuple(weight.shape)}")
    if residual is not None and (residual.shape != x.shape or residual.dtype != x.dtype):
        raise ValueError(f"residual must match x: {tuple(residual.shape)} {residual.dtype} vs "
                         f"{tuple(x.shape)} {x.dtype}")


def rms_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    """y = x / sqrt(mean(x², -1) + eps) * weight, differentiable; x (..., N), weight (N,); y like x."""
    _check(x, weight)
    y, _ = rms_norm_op(x, weight, eps)
    return y


def add_rms_norm(x: Tensor, residual: Tensor, weight: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    """(rms_norm(s), s) with s = x + residual, differentiable in x, residual and weight; all like x."""
    _check(x, weight, residual)
    y, s, _ = add_rms_norm_op(x, residual, weight, eps)
    return y, s


def rms_norm_reference(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    """The definition, in float32 (float64 stays float64), one cast back to x's dtype."""
    dtype = torch.promote_types(x.dtype, torch.float32)
    x32 = x.to(dtype)
    return (x32 * torch.rsqrt(x32.pow(2).mean(dim=-1, keepdim=True) + eps) * weight.to(dtype)).to(x.dtype)


def add_rms_norm_reference(x: Tensor, residual: Tensor, weight: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    s = x + residual
    return rms_norm_reference(s, weight, eps), s


def decomposition() -> dict:
    """{archgen::rms_norm, archgen::add_rms_norm: the op written with the references}: how exporters that cannot run
    Triton (ONNX) lower them (program.run_decompositions(table))."""
    ops = getattr(torch.ops, OP_NAMESPACE)

    def rms_norm_decomposed(x, weight, eps):
        return rms_norm_reference(x, weight, eps), _rstd(x, eps)

    def add_rms_norm_decomposed(x, residual, weight, eps):
        y, s = add_rms_norm_reference(x, residual, weight, eps)
        return y, s, _rstd(s, eps)

    return {ops.rms_norm.default: rms_norm_decomposed, ops.add_rms_norm.default: add_rms_norm_decomposed}
