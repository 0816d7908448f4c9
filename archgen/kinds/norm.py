"""RMSNorm and LayerNorm over d_model: the pre-norms of every layer, the final norm, parallel branches' norms."""

from __future__ import annotations

from dataclasses import dataclass

from archgen.kinds.base import Dims, Kind
from archgen.spec import models


@dataclass(frozen=True)
class NormConfig:
    eps: float
    bias: bool  # LayerNorm's bias; RMSNorm has none
    zero_centered: bool = False  # RMSNorm scaled by 1 + weight (LayerNorm: never)


class RMSNorm(Kind[models.RMSNormSpec, NormConfig]):
    name = "rmsnorm"
    role = "norm"

    def resolve(self, spec, model) -> NormConfig:
        return NormConfig(spec.eps, False, spec.zero_centered)

    def parameters(self, config: NormConfig, dims: Dims) -> dict[str, tuple[int, ...]]:
        d = dims.d_model
        return {"weight": (d,), "bias": (d,)} if config.bias else {"weight": (d,)}

    def template_dims(self, config: NormConfig, dims: Dims) -> dict:
        # the generated model defines RMSNorm, FusedRMSNorm where the norms run their kernel (kernels/rmsnorm.py), and
        # for a zero-centred norm ZeroCenteredRMSNorm and ZeroCenteredFusedRMSNorm (the kernel given 1 + weight)
        plain = "ZeroCenteredRMSNorm" if config.zero_centered else "RMSNorm"
        fused = "ZeroCenteredFusedRMSNorm" if config.zero_centered else "FusedRMSNorm"
        # folds_scale: the generated RMSNorms take a per-channel scale into their weight (a parallel layer's combine)
        return {"module": f"{plain}({dims.d_model}, eps={config.eps!r})",
                "kernel_module": f"{fused}({dims.d_model}, eps={config.eps!r})", "zero_centered": config.zero_centered,
                "folds_scale": True}

    def imports(self, config: NormConfig) -> dict[str, tuple[str, ...]]:
        return {"norm": ("rms_norm",)}  # the generated RMSNorm's reference, beside its kernel (kernels/rmsnorm.py)


class LayerNorm(RMSNorm):
    name = "layernorm"

    def resolve(self, spec, model) -> NormConfig:
        return NormConfig(spec.eps, spec.bias)

    def imports(self, config: NormConfig) -> dict[str, tuple[str, ...]]:
        return {}

    def template_dims(self, config: NormConfig, dims: Dims) -> dict:
        return {"module": f"nn.LayerNorm({dims.d_model}, eps={config.eps!r}, bias={config.bias!r})", "zero_centered": False,
                "folds_scale": False}


KINDS = (RMSNorm(), LayerNorm())
