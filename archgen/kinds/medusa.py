"""Medusa heads: K stacks of residual SiLU blocks (h + SiLU(W h + b)) that draft tokens t+2 … t+K+1 through the
model's shared unembedding, so the vocabulary projection adds compute but no parameters."""

from __future__ import annotations

from dataclasses import dataclass

from archgen.kinds.base import Dims, Kind, Shape
from archgen.spec import models


@dataclass(frozen=True)
class MedusaConfig:
    n_heads: int
    hidden_layers: int  # residual SiLU blocks before each head's projection
    loss_weight: float


class Medusa(Kind[models.MedusaHeadSpec, MedusaConfig]):
    name = "medusa"
    role = "head"
    template = "heads/medusa"
    colour = "#6d597a"

    def resolve(self, spec, model) -> MedusaConfig:
        return MedusaConfig(spec.n_heads, spec.hidden_layers, spec.loss_weight)

    def imports(self, config: MedusaConfig) -> dict[str, tuple[str, ...]]:
        return {"medusa": ("MedusaStats", "accepted_length", "snapshot_states")}

    def template_dims(self, config: MedusaConfig, dims: Dims) -> dict:
        return {"n_heads": config.n_heads, "last_head": config.n_heads - 1, "draft_length": config.n_heads + 1,
                "hidden_layers": config.hidden_layers, "loss_weight": config.loss_weight}

    def parameters(self, config: MedusaConfig, dims: Dims) -> dict[str, tuple[int, ...]]:
        d = dims.d_model
        table = {}
        for head in range(config.n_heads):
            for block in range(config.hidden_layers):
                table[f"blocks.{head}.{block}.weight"] = (d, d)
                table[f"blocks.{head}.{block}.bias"] = (d,)
        return table

    def output_shape(self, config: MedusaConfig, dims: Dims, inputs: list[Shape]) -> Shape:
        return (config.n_heads, "B", inputs[0][1], dims.vocab_size)

    def forward_flops(self, config: MedusaConfig, dims: Dims, seq_len: int) -> int:
        d = dims.d_model
        return seq_len * config.n_heads * (config.hidden_layers * 2 * d * d + 2 * d * dims.vocab_size)


KIND = Medusa()
