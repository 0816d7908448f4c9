"""How the branches of one parallel layer merge (Hymba: per-branch norm, learned per-channel scale, mean; or a sum)."""

from __future__ import annotations

from dataclasses import dataclass

from archgen.kinds.base import Dims, Kind
from archgen.kinds.norm import NormConfig


@dataclass(frozen=True)
class ParallelCombineConfig:
    branches: tuple[str, ...]  # the mixers' spec names, in layout order
    mode: str  # "normalized_mean" | "sum"
    norm_kind: str  # the model's norm, applied per branch
    norm: NormConfig


class ParallelCombine(Kind[None, ParallelCombineConfig]):
    name = "parallel_combine"
    role = "combine"

    def parameters(self, config: ParallelCombineConfig, dims: Dims) -> dict[str, tuple[int, ...]]:
        if config.mode == "sum":
            return {}
        from archgen.kinds import kind_of

        norm = kind_of(config.norm_kind).parameters(config.norm, dims)
        table = {}
        for branch in config.branches:
            table.update({f"{branch}_norm.{name}": shape for name, shape in norm.items()})
            table[f"{branch}_scale"] = (dims.d_model,)
        return table

    def takes_residual_norm(self, config: ParallelCombineConfig, kernels: dict) -> bool:
        """Given the combine kernel that goes on with the block's residual add and its feed-forward's norm."""
        return "normalized_mean_add_norm" in kernels

    def imports(self, config: ParallelCombineConfig) -> dict[str, tuple[str, ...]]:
        return {"decoding": ("branch_stream",)}  # the branches side by side while a CUDA graph records a step


KIND = ParallelCombine()
