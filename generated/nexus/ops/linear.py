"""
Linear-layer reference ops.

This file is copied verbatim into generated packages whose layers run the GEMV kernel on a decoding step's few rows,
as `ops/linear.py`, and imports only torch. It is what the Triton kernels of the same names (kernels/gemv.py) are
tested against and lowered to for ONNX, and what runs wherever they do not (CPU, no triton, more rows).
"""

import torch
import torch.nn.functional as F
from torch import Tensor


def linear(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """
    x · weightᵀ + bias: x (..., K), weight (N, K), bias (N,) -> (..., N), as nn.Linear.
    """
    return F.linear(x, weight, bias)


def residual_linear(x: Tensor, weight: Tensor, bias: Tensor | None, residual: Tensor) -> Tensor:
    """
    residual + (x · weightᵀ + bias): a block's residual add after its feed-forward's last product, x (..., K),
    weight (N, K), residual (..., N) -> (..., N).
    """
    return residual + F.linear(x, weight, bias)


def swiglu_linear(
    x: Tensor, gate_weight: Tensor, up_weight: Tensor, gate_bias: Tensor | None = None, up_bias: Tensor | None = None
) -> Tensor:
    """
    silu(x · gate_weightᵀ + gate_bias) · (x · up_weightᵀ + up_bias): a SwiGLU feed-forward's hidden activations from
    its gate and up projections (H, K), x (..., K) -> (..., H).
    """
    return F.silu(F.linear(x, gate_weight, gate_bias)) * F.linear(x, up_weight, up_bias)


def qkv_linear(
    x: Tensor,
    q_weight: Tensor,
    k_weight: Tensor,
    v_weight: Tensor,
    q_bias: Tensor | None = None,
    k_bias: Tensor | None = None,
    v_bias: Tensor | None = None,
) -> Tensor:
    """
    An attention's q, k and v projections side by side: x (..., K), q_weight (NQ, K), k_weight and v_weight (NKV, K)
    -> (..., NQ + 2·NKV).
    """
    return torch.cat([F.linear(x, q_weight, q_bias), F.linear(x, k_weight, k_bias), F.linear(x, v_weight, v_bias)], dim=-1)
