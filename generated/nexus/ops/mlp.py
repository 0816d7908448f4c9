"""
Feed-forward reference ops.

This file is copied verbatim into generated packages whose feed-forward is a SwiGLU MLP, as `ops/mlp.py`, and imports
only torch. It is what the Triton kernel of the same name (kernels/silu_mul.py) is tested against and lowered to for
ONNX, and what runs wherever the kernel does not (CPU, no triton).
"""

import torch.nn.functional as F
from torch import Tensor


def silu_mul(gate: Tensor, up: Tensor) -> Tensor:
    """
    silu(gate) * up: the SwiGLU feed-forward's gate, on gate_proj(x) and up_proj(x) (..., H), in their dtype.
    """
    return F.silu(gate) * up
