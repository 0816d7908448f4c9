"""RMSNorm reference op: the model's norm, optionally with the residual add before it, as the fused kernel computes it.

    rms_norm(x, weight, eps)            y = x / sqrt(mean(x², -1) + eps) * weight
    rms_norm(x, weight, eps, residual)  (rms_norm(s), s) with s = x + residual, the new residual stream

On CUDA the model runs kernels/rmsnorm.py's `rms_norm` instead (same signature and results, one kernel for the add
and the norm); this is what CPUs, ONNX and comparisons run.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor


def rms_norm(x: Tensor, weight: Tensor, eps: float, residual: Tensor | None = None):
    if residual is not None:
        x = x + residual
        return F.rms_norm(x, (x.size(-1),), weight, eps), x
    return F.rms_norm(x, (x.size(-1),), weight, eps)
