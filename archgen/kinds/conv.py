"""HSPMN reflexive mixer: a depthwise causal convolution over d_model channels, then an activation."""

from __future__ import annotations

from dataclasses import dataclass

from archgen.kinds.base import Dims, Kind
from archgen.spec import models


@dataclass(frozen=True)
class ConvConfig:
    d_conv: int
    bias: bool
    activation: str  # "silu" | "none"


class Conv(Kind[models.ConvSpec, ConvConfig]):
    name = "conv"
    role = "mixer"
    template = "conv"
    colour = "#669bbc"
    has_cache = True
    takes_pads = True

    def resolve(self, spec, model) -> ConvConfig:
        return ConvConfig(spec.d_conv, spec.bias, spec.activation)

    def parameters(self, config: ConvConfig, dims: Dims) -> dict[str, tuple[int, ...]]:
        table = {"conv1d.weight": (dims.d_model, 1, config.d_conv)}
        if config.bias:
            table["conv1d.bias"] = (dims.d_model,)
        return table

    def forward_flops(self, config: ConvConfig, dims: Dims, seq_len: int) -> int:
        return 2 * seq_len * dims.d_model * config.d_conv

    def cache_bytes(self, config: ConvConfig, dims: Dims, context: int, itemsize: int) -> int:
        return dims.d_model * (config.d_conv - 1) * itemsize

    def imports(self, config: ConvConfig) -> dict[str, tuple[str, ...]]:
        return {"ssm": ("causal_conv1d",)}

    def template_dims(self, config: ConvConfig, dims: Dims) -> dict:
        return {"d_model": dims.d_model, "d_conv": config.d_conv, "bias": config.bias, "silu": config.activation == "silu",
                "conv_state_width": config.d_conv - 1}


KIND = Conv()
