"""The SwiGLU gate, silu(gate) · up, in one pass forward and one pass backward: the kernels, their launchers, the
custom ops of the feed-forward's gate and the reference.

For gate g and up u (..., H), the outputs of a gated MLP's two input projections::

    y  = silu(g) · u                                   silu(g) = g · σ(g)
    dg = dy · u · σ(g) · (1 + g · (1 − σ(g)))          du = dy · silu(g)

computed in float32, stored in g's dtype. This file is the gate's one home: the kernels address gate, up and the
gradients through their own row strides, so the same kernels serve the feed-forward, whose gate and up are two tensors
(gate_proj and up_proj stay separate parameters, as checkpoints hold them), and the MoE experts (kernels/swiglu.py,
which imports the launchers), whose gate and up are the two halves of one (..., 2H) matmul output and whose backward
writes [dg | du] into one buffer.

Why a kernel: eager PyTorch runs silu(g) and the product as two passes, and the backward as about five; in a batch-1
decode step each is a launch of a few kilobytes of work (one per layer more than needed, inside a CUDA graph a few
microseconds each). Here the forward reads g and u once and writes y once, the backward reads dy, g and u once and
writes dg and du once.

The feed-forward's op runs one fixed launch configuration (elementwise and memory-bound: tiles of 4 rows × 1024
columns keep enough loads in flight at any width; nothing to tune at build time); the launchers take the config, so
kernels/swiglu.py tunes its own. Rows need a contiguous last dimension (any row stride).
CPU tensors take the reference unless TRITON_INTERPRET=1 and ARCHGEN_TRITON_ON_CPU=1 (the tests).
"""

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from torch import Tensor

from .triton_support import interpreting, on_device, op_overload, register_op, triton_on_cpu

SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
CONFIG = {"BLOCK_R": 4, "BLOCK_H": 1024, "num_warps": 4}
INTERPRETER_CONFIG = {"BLOCK_R": 4, "BLOCK_H": 32, "num_warps": 4}


@triton.jit
def _silu_mul_fwd_kernel(g_ptr, u_ptr, y_ptr, R, H, stride_g, stride_u, stride_y,
                         BLOCK_R: tl.constexpr, BLOCK_H: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    inside = (rows < R)[:, None] & (cols < H)[None, :]
    row64 = rows.to(tl.int64)[:, None]
    g = tl.load(g_ptr + row64 * stride_g + cols[None, :], mask=inside, other=0.0).to(tl.float32)
    u = tl.load(u_ptr + row64 * stride_u + cols[None, :], mask=inside, other=0.0).to(tl.float32)
    y = g * tl.sigmoid(g) * u
    tl.store(y_ptr + row64 * stride_y + cols[None, :], y.to(y_ptr.dtype.element_ty), mask=inside)


@triton.jit
def _silu_mul_bwd_kernel(dy_ptr, g_ptr, u_ptr, dg_ptr, du_ptr, R, H, stride_dy, stride_g, stride_u, stride_dg,
                         stride_du, BLOCK_R: tl.constexpr, BLOCK_H: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    inside = (rows < R)[:, None] & (cols < H)[None, :]
    row64 = rows.to(tl.int64)[:, None]
    g = tl.load(g_ptr + row64 * stride_g + cols[None, :], mask=inside, other=0.0).to(tl.float32)
    u = tl.load(u_ptr + row64 * stride_u + cols[None, :], mask=inside, other=0.0).to(tl.float32)
    dy = tl.load(dy_ptr + row64 * stride_dy + cols[None, :], mask=inside, other=0.0).to(tl.float32)
    sig = tl.sigmoid(g)
    dg = dy * u * sig * (1.0 + g * (1.0 - sig))
    du = dy * g * sig
    tl.store(dg_ptr + row64 * stride_dg + cols[None, :], dg.to(dg_ptr.dtype.element_ty), mask=inside)
    tl.store(du_ptr + row64 * stride_du + cols[None, :], du.to(du_ptr.dtype.element_ty), mask=inside)


def as_rows(t: Tensor) -> Tensor:
    """t as (R, width) rows with a contiguous last dim (a view when it can be)."""
    t = t.reshape(-1, t.shape[-1])
    return t if t.stride(-1) == 1 else t.contiguous()


def launch_forward(gate: Tensor, up: Tensor, y: Tensor, config: dict) -> None:
    """y = silu(gate) · up for (R, H) rows, each with a contiguous last dim and any row stride; `config` holds BLOCK_R,
    BLOCK_H and num_warps."""
    R, H = gate.shape
    _silu_mul_fwd_kernel[_grid(R, H, config)](gate, up, y, R, H, gate.stride(0), up.stride(0), y.stride(0),
                                              BLOCK_R=config["BLOCK_R"], BLOCK_H=config["BLOCK_H"],
                                              num_warps=config["num_warps"])


def launch_backward(dy: Tensor, gate: Tensor, up: Tensor, dgate: Tensor, dup: Tensor, config: dict) -> None:
    """dgate, dup = the gradients of silu(gate) · up for (R, H) rows, as launch_forward's."""
    R, H = gate.shape
    _silu_mul_bwd_kernel[_grid(R, H, config)](dy, gate, up, dgate, dup, R, H, dy.stride(0), gate.stride(0),
                                              up.stride(0), dgate.stride(0), dup.stride(0), BLOCK_R=config["BLOCK_R"],
                                              BLOCK_H=config["BLOCK_H"], num_warps=config["num_warps"])


def _launch_config() -> dict:
    return INTERPRETER_CONFIG if interpreting() else CONFIG


def _grid(R: int, H: int, cfg: dict) -> tuple[int, int]:
    return triton.cdiv(R, cfg["BLOCK_R"]), triton.cdiv(H, cfg["BLOCK_H"])


def _check(gate: Tensor, up: Tensor) -> None:
    if gate.shape != up.shape or gate.dtype != up.dtype:
        raise ValueError(f"silu_mul: gate and up must have one shape and dtype, got {tuple(gate.shape)} {gate.dtype} "
                         f"and {tuple(up.shape)} {up.dtype}")
    if gate.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"silu_mul takes {', '.join(map(str, SUPPORTED_DTYPES))}, got {gate.dtype}")


def _forward_impl(gate: Tensor, up: Tensor) -> Tensor:
    """archgen_v1::silu_mul -> silu(gate) · up, like gate."""
    if not (gate.is_cuda or triton_on_cpu()):
        return silu_mul_reference(gate, up)
    _check(gate, up)
    g, u = as_rows(gate), as_rows(up)
    y = torch.empty(g.shape, dtype=gate.dtype, device=gate.device)
    if y.numel():
        with on_device(gate):
            launch_forward(g, u, y, _launch_config())
    return y.view(gate.shape)


def _backward_impl(dy: Tensor, gate: Tensor, up: Tensor) -> tuple[Tensor, Tensor]:
    """archgen_v1::silu_mul_backward -> (d gate, d up), like gate."""
    if not (gate.is_cuda or triton_on_cpu()):
        sig = torch.sigmoid(gate.float())
        dyf, g, u = dy.float(), gate.float(), up.float()
        return ((dyf * u * sig * (1 + g * (1 - sig))).to(gate.dtype), (dyf * g * sig).to(up.dtype))
    g, u = as_rows(gate), as_rows(up)
    dg = torch.empty(g.shape, dtype=gate.dtype, device=gate.device)
    du = torch.empty(u.shape, dtype=up.dtype, device=up.device)
    if dg.numel():
        with on_device(gate):
            launch_backward(as_rows(dy), g, u, dg, du, _launch_config())
    return dg.view(gate.shape), du.view(up.shape)


def _forward_fake(gate, up):
    return gate.new_empty(gate.shape)


def _backward_fake(dy, gate, up):
    return gate.new_empty(gate.shape), up.new_empty(up.shape)


def _setup_context(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _backward(ctx, dy):
    gate, up = ctx.saved_tensors
    return silu_mul_backward_op(dy, gate, up)


silu_mul_backward_op = register_op("silu_mul_backward", _backward_impl, _backward_fake)
silu_mul_op = register_op("silu_mul", _forward_impl, _forward_fake, backward=_backward, setup_context=_setup_context)


def silu_mul(gate: Tensor, up: Tensor) -> Tensor:
    """silu(gate) · up in one pass, differentiable: gate, up (..., H) of one shape and dtype -> (..., H). As the
    generated package's reference (ops/mlp.py `silu_mul`)."""
    return silu_mul_op(gate, up)


def silu_mul_reference(gate: Tensor, up: Tensor) -> Tensor:
    """The same in float32 (float64 for float64 inputs), rounded once to gate's dtype."""
    acc = torch.float64 if gate.dtype == torch.float64 else torch.float32
    return (F.silu(gate.to(acc)) * up.to(acc)).to(gate.dtype)


def decomposition(reference, max_seqlen: int) -> dict:
    """{archgen_v1::silu_mul: ops/mlp.py's silu_mul}, for ONNX."""
    return {op_overload("silu_mul"): reference}
