"""Titans test-time memory: q/k/v projections, a memory MLP whose weights are written at inference, an output gate.

Names follow the generated module: `mlp.<i>.weight` are the memory's learned initial weights W₀ (the written
weights are per-sequence state, counted in cache_bytes, not parameters).
"""

from __future__ import annotations

from dataclasses import dataclass

from archgen.kinds.base import Dims, Kind
from archgen.spec import models


@dataclass(frozen=True)
class TitansConfig:
    after_layer: int  # read after this layer (non-negative)
    depth: int  # layers of the memory MLP
    hidden: int
    chunk_size: int
    learning_rate: float
    momentum: float
    forget: float  # weight decay at every write

    def widths(self, dims: Dims) -> list[int]:
        return [dims.d_model] + [self.hidden] * (self.depth - 1) + [dims.d_model]

    def memory_weights(self, dims: Dims) -> int:
        widths = self.widths(dims)
        return sum(widths[i] * widths[i + 1] for i in range(self.depth))


class Titans(Kind[models.TitansMemorySpec, TitansConfig]):
    name = "titans"
    role = "extra"
    template = "extras/titans"
    class_name = "TitansMemory"

    def resolve(self, spec, model) -> TitansConfig:
        return TitansConfig(spec.after_layer, spec.depth, spec.hidden or model.d_model, spec.chunk_size,
                            spec.learning_rate, spec.momentum, spec.forget)

    def imports(self, config: TitansConfig) -> dict[str, tuple[str, ...]]:
        return {"memory": ("MemoryState", "memory_mlp", "memory_read_write")}

    def template_dims(self, config: TitansConfig, dims: Dims) -> dict:
        widths = config.widths(dims)
        return {"widths": widths, "layers": [(widths[i], widths[i + 1]) for i in range(config.depth)],
                "after_layer": config.after_layer, "chunk_size": config.chunk_size,
                "learning_rate": config.learning_rate, "momentum": config.momentum, "forget": config.forget}

    def parameters(self, config: TitansConfig, dims: Dims) -> dict[str, tuple[int, ...]]:
        d = dims.d_model
        widths = config.widths(dims)
        table = {"q_proj.weight": (d, d), "k_proj.weight": (d, d), "v_proj.weight": (d, d)}
        for i in range(config.depth):
            table[f"mlp.{i}.weight"] = (widths[i + 1], widths[i])
        table["gate.weight"] = (d, d)
        table["gate.bias"] = (d,)
        return table

    def forward_flops(self, config: TitansConfig, dims: Dims, seq_len: int) -> int:
        """Reads and writes (the memory is meant to be written as it is read, update_memory=True).

        Per token: the q, k, v and gate projections; the read M(q); the write's forward M(k) and backward (two
        matmuls per layer: ∇W and the gradient passed down), i.e. three reads' worth. Per chunk, the element-wise
        momentum and decay updates of the weights are not counted.
        """
        d = dims.d_model
        memory_read = 2 * config.memory_weights(dims)
        return seq_len * (2 * d * d * 4 + memory_read + 3 * memory_read)

    def cache_bytes(self, config: TitansConfig, dims: Dims, context: int, itemsize: int) -> int:
        """Per sequence, in float32 whatever the cache dtype: the fast weights, their momentum, and the keys and
        values of an unfinished chunk (at most chunk_size - 1 tokens)."""
        return (2 * config.memory_weights(dims) + 2 * (config.chunk_size - 1) * dims.d_model) * 4


KIND = Titans()
