"""RMSNorm reference ops: the model's norm, optionally with the residual add before it, as the fused kernel computes it,
and a two-branch parallel layer's combine.

    rms_norm(x, weight, eps)            y = x / sqrt(mean(x², -1) + eps) * weight
    rms_norm(x, weight, eps, residual)  (rms_norm(s), s) with s = x + residual, the new residual stream
    normalized_mean(a, b, w_a, s_a, w_b, s_b, eps)
                                        (rms_norm(a, w_a · s_a) + rms_norm(b, w_b · s_b)) / 2   (Hymba's combine)
    normalized_mean_add_norm(a, b, w_a, s_a, w_b, s_b, eps, residual, weight, norm_eps)
                                        rms_norm(normalized_mean(...), weight, norm_eps, residual): the combine, the
                                        block's residual add and its feed-forward's norm, (h, s)

On CUDA the model runs kernels/rmsnorm.py's `rms_norm` and kernels/normalized_mean.py's `normalized_mean` and
`normalized_mean_add_norm` instead (same signatures and results, one kernel each); this is what CPUs, ONNX and
comparisons run.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor


def rms_norm(x: Tensor, weight: Tensor, eps: float, residual: Tensor | None = None):
    if residual is not None:
        x = x + residual
        return F.rms_norm(x, (x.size(-1),), weight, eps), x
    return F.rms_norm(x, (x.size(-1),), weight, eps)


def normalized_mean(a: Tensor, b: Tensor, weight_a: Tensor, scale_a: Tensor, weight_b: Tensor, scale_b: Tensor,
                    eps: float) -> Tensor:
    return (rms_norm(a, weight_a * scale_a, eps) + rms_norm(b, weight_b * scale_b, eps)) / 2


def normalized_mean_add_norm(a: Tensor, b: Tensor, weight_a: Tensor, scale_a: Tensor, weight_b: Tensor,
                             scale_b: Tensor, eps: float, residual: Tensor, weight: Tensor,
                             norm_eps: float) -> tuple[Tensor, Tensor]:
    return rms_norm(normalized_mean(a, b, weight_a, scale_a, weight_b, scale_b, eps), weight, norm_eps, residual)
