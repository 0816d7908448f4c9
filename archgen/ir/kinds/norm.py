"""RMSNorm / LayerNorm over d_model (or over `cfg.size` when a norm wraps something narrower)."""


def parameters(cfg, dims) -> dict[str, tuple[int, ...]]:
    size = getattr(cfg, "size", None) or dims.d_model
    table = {"weight": (size,)}
    if cfg.kind == "layernorm" and cfg.bias:
        table["bias"] = (size,)
    return table


def forward_flops(cfg, dims, seq_len: int) -> int:
    return 0


def cache_bytes(cfg, dims, context: int, itemsize: int) -> int:
    return 0
