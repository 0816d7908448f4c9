"""Feed-forward: gated (SwiGLU/GeGLU: gate_proj, up_proj, down_proj) or plain (up_proj, down_proj), with optional muP
multipliers on the gate and the output (Falcon-H1; element-wise, not counted as FLOPs)."""

from __future__ import annotations

from dataclasses import dataclass

from archgen.errors import Diagnostic
from archgen.kinds.base import Dims, Kind, multipliers_text
from archgen.spec import models

GATED = frozenset({"swiglu", "geglu"})  # activation(gate_proj x) * up_proj x


@dataclass(frozen=True)
class MLPConfig:
    activation: str
    hidden: int
    bias: bool
    gate_multiplier: float = 1.0  # muP: gate_proj's output is scaled by this before the activation ...
    output_multiplier: float = 1.0  # ... and down_proj's output by this (an MoE's experts: 1)

    @property
    def gated(self) -> bool:
        return self.activation in GATED


def fused_swiglu(config: MLPConfig) -> bool:
    """silu(gate) · up computed by one op (ops/mlp.py silu_mul, a kernel on CUDA): SwiGLU without a muP gate scale."""
    return config.activation == "swiglu" and config.gate_multiplier == 1


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
        problems = check_shape(spec, path)
        if spec.gate_multiplier != 1 and spec.activation not in GATED:
            problems.append(Diagnostic(f"{path}.gate_multiplier", "gate_multiplier scales the gate of a gated activation, "
                                       f"but activation is {spec.activation}",
                                       f"remove gate_multiplier, or use one of {', '.join(sorted(GATED))}"))
        return problems

    def resolve(self, spec, model) -> MLPConfig:
        return MLPConfig(spec.activation, hidden_size(spec, model.d_model), spec.bias, spec.gate_multiplier,
                         spec.output_multiplier)

    def lock(self, spec, config: MLPConfig) -> dict:
        # Multipliers at 1 are left out, so specs written before they existed keep their hash.
        unset = {key for key in ("gate_multiplier", "output_multiplier") if getattr(spec, key) == 1.0}
        return lock_shape(spec, config.hidden).model_dump(mode="json", exclude=unset or None)

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

    def imports(self, config: MLPConfig) -> dict[str, tuple[str, ...]]:
        return {"mlp": ("silu_mul",)} if fused_swiglu(config) else {}

    def takes_residual(self, config: MLPConfig, kernels: dict) -> bool:
        """A SwiGLU feed-forward given the residual GEMV (and the gated one its decoding step runs first) adds the
        block's stream in its down projection's epilogue; an output multiplier would scale the product first."""
        return {"residual_linear", "swiglu_linear"} <= set(kernels) and config.output_multiplier == 1

    def template_dims(self, config: MLPConfig, dims: Dims) -> dict:
        return {"d_model": dims.d_model, "hidden": config.hidden, "gated": config.gated, "activation": config.activation,
                "bias": config.bias, "gate_multiplier": config.gate_multiplier, "output_multiplier": config.output_multiplier,
                "multipliers": multipliers_text(1.0, config.output_multiplier, ("gate", (config.gate_multiplier,))),
                "fused_swiglu": fused_swiglu(config)}


KIND = MLP()
