"""Token embedding and the output projection (the `lm_head`, which owns no weight when tied to the embedding)."""

from __future__ import annotations

from dataclasses import dataclass

from archgen.kinds.base import Dims, Kind, Shape


@dataclass(frozen=True)
class LMHeadConfig:
    tied: bool  # shares the embedding's weight


class Embedding(Kind[None, None]):
    name = "embedding"
    role = "model"

    def parameters(self, config, dims: Dims) -> dict[str, tuple[int, ...]]:
        return {"weight": (dims.vocab_size, dims.d_model)}

    def output_shape(self, config, dims: Dims, inputs: list[Shape]) -> Shape:
        return ("B", "T", dims.d_model)

    def forward_flops(self, config, dims: Dims, seq_len: int) -> int:
        return 0  # a lookup


class LMHead(Kind[None, LMHeadConfig]):
    name = "lm_head"
    role = "model"

    def parameters(self, config: LMHeadConfig, dims: Dims) -> dict[str, tuple[int, ...]]:
        return {} if config.tied else {"weight": (dims.vocab_size, dims.d_model)}

    def output_shape(self, config, dims: Dims, inputs: list[Shape]) -> Shape:
        return ("B", inputs[0][1], dims.vocab_size)

    def forward_flops(self, config, dims: Dims, seq_len: int) -> int:
        return 2 * seq_len * dims.d_model * dims.vocab_size

    def activation_elements(self, config, dims: Dims, seq_len: int) -> int:
        return seq_len * dims.vocab_size


KINDS = (Embedding(), LMHead())
