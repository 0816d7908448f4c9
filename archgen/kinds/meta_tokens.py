"""Hymba's meta tokens: a learnable (count, d_model) prefix, prepended on the first forward of a sequence."""

from __future__ import annotations

from dataclasses import dataclass

from archgen.kinds.base import Dims, Kind, Shape
from archgen.spec import models


@dataclass(frozen=True)
class MetaTokensConfig:
    count: int


class MetaTokens(Kind[models.MetaTokensSpec, MetaTokensConfig]):
    name = "meta_tokens"
    role = "model"

    def resolve(self, spec, model) -> MetaTokensConfig:
        return MetaTokensConfig(spec.count)

    def parameters(self, config: MetaTokensConfig, dims: Dims) -> dict[str, tuple[int, ...]]:
        return {"meta_tokens": (config.count, dims.d_model)}

    def output_shape(self, config: MetaTokensConfig, dims: Dims, inputs: list[Shape]) -> Shape:
        return ("B", f"T+{config.count}", dims.d_model)

    def positions_added(self, config: MetaTokensConfig) -> int:
        return config.count


class DropMetaTokens(Kind[None, MetaTokensConfig]):
    """Before the final norm: the outputs at the meta tokens' positions are dropped (no logits there)."""

    name = "drop_meta"
    role = "model"

    def output_shape(self, config: MetaTokensConfig, dims: Dims, inputs: list[Shape]) -> Shape:
        return ("B", "T", dims.d_model)

    def positions_added(self, config: MetaTokensConfig) -> int:
        return -config.count


KINDS = (MetaTokens(), DropMetaTokens())
