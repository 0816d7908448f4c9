"""SwiGLU of the MoE experts, silu(gate) * up on rows laid out [gate | up], fused into one pass forward and one pass
backward: the custom ops, their autotune space and the reference, over kernels/silu_mul.py's kernels.

For rows h (..., 2H) laid out [gate | up], as a gated expert's first matmul returns them (templates/runtime/moe.py)::

    y  = silu(g) · u                                   (..., H),  silu(g) = g · σ(g)
    dg = dy · u · σ(g) · (1 + g · (1 - σ(g)))          du = dy · silu(g)         dh = [dg | du]  (..., 2H)

computed in float32, stored in h's dtype.

Why a kernel: eager PyTorch runs silu(gate), the product, and in the backward three products plus the concatenation
of [dg | du] as separate passes, each reading and writing (R, H) tensors; autograd also keeps silu(gate). Here the
forward reads h once and writes y once (3 · R·H elements), the backward reads dy and h once and writes dh once
(5 · R·H), against about 5 and 14 for the eager form. At the MoE bench shape (65,536 rows × 8,192) that is
1.5 of 2.5 GB forward and 2.5 of 7 GB backward: about 2.5 ms of the ~43 ms forward+backward at an H200's
~4.2 TB/s. The savings are measured by bench/moe_check.py (fused against torch in the same run).

How: the SwiGLU gate's kernels live in kernels/silu_mul.py (the feed-forward's gate, where gate and up are two
tensors): they take gate and up as two (R, H) views with their own row strides, here the two halves of each row of
h, and write dg and du into the two halves of dh. A 2-D grid of (BLOCK_R rows, BLOCK_H columns) tiles; rows need a
contiguous last dimension (any row stride). A generated package that runs this file carries silu_mul.py too (the
emitter follows a kernel file's imports).

Contents: `swiglu` (the entry point, differentiable), the custom ops `archgen_v1::swiglu` and
`archgen_v1::swiglu_backward` (fake implementations, autograd), `swiglu_forward` / `swiglu_backward` with their
autotune space, `swiglu_reference`, and `decomposition` (for ONNX). CPU tensors take the reference
unless TRITON_INTERPRET=1 and ARCHGEN_TRITON_ON_CPU=1 (the tests).
"""

import torch
import torch.nn.functional as F
import triton
from torch import Tensor

from .silu_mul import as_rows, launch_backward, launch_forward
from .triton_support import Autotuner, dtype_name, interpreting, on_device, op_overload, register_op, triton_on_cpu

SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

# Elementwise and memory-bound: tiles of 2-8K elements per program keep enough loads in flight.
CONFIGS = [{"BLOCK_R": rows, "BLOCK_H": cols, "num_warps": warps}
           for rows, cols in ((2, 2048), (4, 1024), (8, 512)) for warps in (4, 8)]
DEFAULT_CONFIG = {"BLOCK_R": 4, "BLOCK_H": 1024, "num_warps": 4}  # untuned buckets (a generated package, no table)
INTERPRETER_CONFIG = {"BLOCK_R": 4, "BLOCK_H": 16, "num_warps": 4}


# ---------------------------------------------------------------------------------------------------------------
# Tuning and launchers
# ---------------------------------------------------------------------------------------------------------------


FORWARD_TUNER = Autotuner("swiglu.forward", CONFIGS, INTERPRETER_CONFIG, default=DEFAULT_CONFIG)
BACKWARD_TUNER = Autotuner("swiglu.backward", CONFIGS, INTERPRETER_CONFIG, default=DEFAULT_CONFIG)


def shape_key(H: int, dtype: torch.dtype) -> str:
    """The tuning bucket: the width (next power of two) and dtype; the row count only scales the grid."""
    return f"H{triton.next_power_of_2(max(H, 1))}-{dtype_name(dtype)}"


def _config(tuner: Autotuner, key: str, launch, explicit: dict | None) -> dict:
    known = tuner.known(key, explicit)
    return known if known is not None else tuner.tune(key, launch)


def autotune(config: dict, params: dict[str, tuple[int, ...]], batch: int, seqlen: int, dtype: torch.dtype,
             device: torch.device | str) -> None:
    """The build-time tuning hook (`archgen build --autotune`): run the forward and backward kernels on the rows a
    MoE op of this resolved config (top_k) and these parameter shapes (w_out (E, H, d)) activates at batch × seqlen
    tokens, all its batch · seqlen · top_k expert rows at once, so that inside triton_support.tuning_session() each
    tuner tunes that width's bucket."""
    H = params["w_out"][1]
    rows = batch * seqlen * config["top_k"]
    generator = torch.Generator(device=device).manual_seed(0)
    h = torch.randn((rows, 2 * H), generator=generator, device=device).to(dtype)
    dy = torch.randn((rows, H), generator=generator, device=device).to(dtype)
    swiglu_forward(h)
    swiglu_backward(dy, h)


def _halves(rows: Tensor) -> tuple[Tensor, Tensor]:
    """(R, 2H) rows -> their gate and up halves, (R, H) views with the rows' stride."""
    H = rows.shape[-1] // 2
    return rows[:, :H], rows[:, H:]


def swiglu_forward(h: Tensor, *, config: dict | None = None) -> Tensor:
    """Run the forward kernel: h (..., 2H) -> y (..., H) in h's dtype."""
    _check_input(h)
    H = h.shape[-1] // 2
    gate, up = _halves(as_rows(h))
    y = torch.empty(gate.shape, dtype=h.dtype, device=h.device)
    if y.numel():
        def launch(cfg):
            launch_forward(gate, up, y, cfg)

        with on_device(h):
            launch(_config(FORWARD_TUNER, shape_key(H, h.dtype), launch, config))
    return y.view(*h.shape[:-1], H)


def swiglu_backward(dy: Tensor, h: Tensor, *, config: dict | None = None) -> Tensor:
    """Run the backward kernel: dy (..., H), h (..., 2H) -> dh (..., 2H) = [dgate | dup] in h's dtype."""
    _check_input(h)
    H = h.shape[-1] // 2
    if dy.shape != (*h.shape[:-1], H):
        raise ValueError(f"dy must have shape {(*h.shape[:-1], H)} for h {tuple(h.shape)}, got {tuple(dy.shape)}")
    gate, up = _halves(as_rows(h))
    dy_rows = as_rows(dy)
    dh = torch.empty((gate.shape[0], 2 * H), dtype=h.dtype, device=h.device)
    dgate, dup = _halves(dh)
    if dh.numel():
        def launch(cfg):
            launch_backward(dy_rows, gate, up, dgate, dup, cfg)

        with on_device(h):
            launch(_config(BACKWARD_TUNER, shape_key(H, h.dtype), launch, config))
    return dh.view(h.shape)


# ---------------------------------------------------------------------------------------------------------------
# Custom ops
# ---------------------------------------------------------------------------------------------------------------


def _forward_impl(h: Tensor) -> Tensor:
    """archgen_v1::swiglu. CPU tensors take the reference (outside the kernel tests)."""
    if not (h.is_cuda or triton_on_cpu()):
        return swiglu_reference(h)
    return swiglu_forward(h)


def _forward_fake(h):
    return h.new_empty((*h.shape[:-1], h.shape[-1] // 2))


def _backward_impl(dy: Tensor, h: Tensor) -> Tensor:
    """archgen_v1::swiglu_backward -> dh. CPU tensors take autograd through the reference (outside the tests)."""
    if not (h.is_cuda or triton_on_cpu()):
        with torch.enable_grad():
            h_ = h.detach().requires_grad_()
            (dh,) = torch.autograd.grad(swiglu_reference(h_), h_, dy)
        return dh
    return swiglu_backward(dy, h)


def _backward_fake(dy, h):
    return torch.empty_like(h, memory_format=torch.contiguous_format)


def _setup_context(ctx, inputs, output):
    (h,) = inputs
    ctx.save_for_backward(h)


def _backward(ctx, dy):
    (h,) = ctx.saved_tensors
    return swiglu_backward_op(dy.contiguous(), h)


swiglu_backward_op = register_op("swiglu_backward", _backward_impl, _backward_fake)
swiglu_op = register_op("swiglu", _forward_impl, _forward_fake, backward=_backward, setup_context=_setup_context)


# ---------------------------------------------------------------------------------------------------------------
# Entry point and reference
# ---------------------------------------------------------------------------------------------------------------


def swiglu(h: Tensor) -> Tensor:
    """silu(gate) * up for h (..., 2H) = [gate | up] -> (..., H), differentiable; as ops/moe.py's `swiglu`.
    Needs CUDA tensors (or TRITON_INTERPRET=1)."""
    if not (h.is_cuda or triton_on_cpu() or torch.compiler.is_exporting()):
        raise RuntimeError(f"the Triton swiglu kernel needs CUDA tensors, got h on {h.device}: call the reference "
                           "(ops/moe.py swiglu) instead, or set TRITON_INTERPRET=1 before importing triton (slow; "
                           "for tests)")
    return swiglu_op(h)


def swiglu_reference(h: Tensor) -> Tensor:
    """The same in float32 (float64 for float64 input), rounded to h's dtype: the tests' truth."""
    acc = torch.promote_types(h.dtype, torch.float32)
    gate, up = h.to(acc).chunk(2, dim=-1)
    return (F.silu(gate) * up).to(h.dtype)


def decomposition(reference, max_seqlen: int) -> dict:
    """{archgen_v1::swiglu: `reference`} (ops/moe.py's swiglu, the same signature), for ONNX."""
    return {op_overload("swiglu"): reference}


def _check_input(h: Tensor) -> None:
    if h.dim() < 1 or h.shape[-1] % 2:
        raise ValueError(f"h must be (..., 2H) laid out [gate | up] with an even last dim, got {tuple(h.shape)}")
    if h.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"h is {h.dtype}; the kernels take {', '.join(map(str, SUPPORTED_DTYPES))}")
    if h.device.type != "cuda" and not interpreting():
        raise RuntimeError(f"the Triton kernels need CUDA tensors, got {h.device}")
