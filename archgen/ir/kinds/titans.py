"""Titans test-time memory: q/k/v projections, a memory MLP whose weights are written at inference, an output gate.

Names follow the generated module: `mlp.<i>.weight` are the memory's learned initial weights W₀ (the written
weights are per-sequence state, counted in cache_bytes, not parameters).
"""


def _widths(cfg, dims) -> list[int]:
    hidden = cfg.hidden or dims.d_model
    return [dims.d_model] + [hidden] * (cfg.depth - 1) + [dims.d_model]


def _memory_weights(cfg, dims) -> int:
    widths = _widths(cfg, dims)
    return sum(widths[i] * widths[i + 1] for i in range(cfg.depth))


def parameters(cfg, dims) -> dict[str, tuple[int, ...]]:
    d = dims.d_model
    widths = _widths(cfg, dims)
    table = {"q_proj.weight": (d, d), "k_proj.weight": (d, d), "v_proj.weight": (d, d)}
    for i in range(cfg.depth):
        table[f"mlp.{i}.weight"] = (widths[i + 1], widths[i])
    table["gate.weight"] = (d, d)
    table["gate.bias"] = (d,)
    return table


def forward_flops(cfg, dims, seq_len: int) -> int:
    """Reads and writes (the memory is meant to be written as it is read, update_memory=True).

    Per token: the q, k, v and gate projections; the read M(q); the write's forward M(k) and backward (two matmuls
    per layer: ∇W and the gradient passed down), i.e. three reads' worth. Per chunk, the element-wise momentum and
    decay updates of the weights are not counted.
    """
    d = dims.d_model
    memory_read = 2 * _memory_weights(cfg, dims)
    return seq_len * (2 * d * d * 4 + memory_read + 3 * memory_read)


def cache_bytes(cfg, dims, context: int, itemsize: int) -> int:
    """Per sequence, in float32 whatever the cache dtype: the fast weights, their momentum, and the keys and values
    of an unfinished chunk (at most chunk_size - 1 tokens)."""
    return (2 * _memory_weights(cfg, dims) + 2 * (cfg.chunk_size - 1) * dims.d_model) * 4
