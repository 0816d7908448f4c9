"""Titans test-time memory: q/k/v projections, a memory MLP whose weights are written at inference, an output gate."""


def _widths(cfg, dims) -> list[int]:
    hidden = cfg.hidden or dims.d_model
    return [dims.d_model] + [hidden] * (cfg.depth - 1) + [dims.d_model]


def parameters(cfg, dims) -> dict[str, tuple[int, ...]]:
    d = dims.d_model
    widths = _widths(cfg, dims)
    table = {"q_proj.weight": (d, d), "k_proj.weight": (d, d), "v_proj.weight": (d, d)}
    for i in range(cfg.depth):
        table[f"memory.{i}.weight"] = (widths[i + 1], widths[i])
    table["gate.weight"] = (d, d)
    table["gate.bias"] = (d,)
    return table


def forward_flops(cfg, dims, seq_len: int) -> int:
    d = dims.d_model
    widths = _widths(cfg, dims)
    memory_read = sum(2 * widths[i] * widths[i + 1] for i in range(cfg.depth))
    return seq_len * (2 * d * d * 4 + memory_read)


def cache_bytes(cfg, dims, context: int, itemsize: int) -> int:
    """The memory's fast weights and their momentum are per-sequence state during generation (float32)."""
    widths = _widths(cfg, dims)
    return 2 * sum(widths[i] * widths[i + 1] for i in range(cfg.depth)) * 4
