"""Feed-forward: gated (SwiGLU/GeGLU: gate_proj, up_proj, down_proj) or plain (up_proj, down_proj)."""

from __future__ import annotations

from dataclasses import dataclass

from archgen.errors import Diagnostic
from archgen.kinds.base import Dims, Kind
from archgen.spec import models

GATED = frozenset({"swiglu", "geglu"})  # activation(gate_proj x) * up_proj x


@dataclass(frozen=True)
class MLPConfig:
    activation: str
    hidden: int
    bias: bool

    @property
    def gated(self) -> bool:
        return self.activation in GATED


def check_shape(shape: models.FeedForwardShape, path: str) -> list[Diagnostic]:
    if (shape.hidden is None) == (shape.multiplier is None):
        given = "both" if shape.hidden is not None else "neither"
        return [Diagnostic(path, f"{given} of 'hidden' and 'multiplier' given",
                           "give exactly one: hidden: 14336, or multiplier: 4")]
    return []


def hidden_size(shape: models.FeedForwardShape, d_model: int) -> int:
    """`hidden`, or multiplier × d_model rounded up to a multiple of `multiple_of`."""
    if shape.hidden is not None:
        return shape.hidden
    raw = int(shape.multiplier * d_model)
    return -(-raw // shape.multiple_of) * shape.multiple_of


def lock_shape(shape: models.FeedForwardShape, hidden: int):
    return shape.model_copy(update={"hidden": hidden, "multiplier": None})


class MLP(Kind[models.MLPSpec, MLPConfig]):
    name = "mlp"
    role = "ffn"
    template = "mlp"
    colour = "#a8c686"

    def check(self, spec, path: str, model) -> list[Diagnostic]:
        return check_shape(spec, path)

    def resolve(self, spec, model) -> MLPConfig:
        return MLPConfig(spec.activation, hidden_size(spec, model.d_model), spec.bias)

    def lock(self, spec, config: MLPConfig) -> dict:
        return lock_shape(spec, config.hidden).model_dump(mode="json")

    def parameters(self, config: MLPConfig, dims: Dims) -> dict[str, tuple[int, ...]]:
        d, h = dims.d_model, config.hidden
        table = {}
        if config.gated:
            table["gate_proj.weight"] = (h, d)
            if config.bias:
                table["gate_proj.bias"] = (h,)
        table["up_proj.weight"] = (h, d)
        if config.bias:
            table["up_proj.bias"] = (h,)
        table["down_proj.weight"] = (d, h)
        if config.bias:
            table["down_proj.bias"] = (d,)
        return table

    def forward_flops(self, config: MLPConfig, dims: Dims, seq_len: int) -> int:
        matrices = 3 if config.gated else 2
        return 2 * seq_len * dims.d_model * config.hidden * matrices

    def activation_elements(self, config: MLPConfig, dims: Dims, seq_len: int) -> int:
        return seq_len * config.hidden * (3 if config.gated else 2)

    def template_dims(self, config: MLPConfig, dims: Dims) -> dict:
        return {"d_model": dims.d_model, "hidden": config.hidden, "gated": config.gated, "activation": config.activation,
                "bias": config.bias}


KIND = MLP()
