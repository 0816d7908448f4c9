"""
Linear-layer reference ops.

This file is copied verbatim into generated packages whose layers run the GEMV kernel on a decoding step's few rows,
as `ops/linear.py`, and imports only torch. It is what the Triton kernels of the same names (kernels/gemv.py) are
tested against and lowered to for ONNX, and what runs wherever they do not (CPU, no triton, more rows).
"""

import torch.nn.functional as F
from torch import Tensor


def linear(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """
    x · weightᵀ + bias: x (..., K), weight (N, K), bias (N,) -> (..., N), as nn.Linear.
    """
    return F.linear(x, weight, bias)


def swiglu_linear(
    x: Tensor, gate_weight: Tensor, up_weight: Tensor, gate_bias: Tensor | None = None, up_bias: Tensor | None = None
) -> Tensor:
    """
    silu(x · gate_weightᵀ + gate_bias) · (x · up_weightᵀ + up_bias): a SwiGLU feed-forward's hidden activations from
    its gate and up projections (H, K), x (..., K) -> (..., H).
    """
    return F.silu(F.linear(x, gate_weight, gate_bias)) * F.linear(x, up_weight, up_bias)
