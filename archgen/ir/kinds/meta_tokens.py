"""Hymba's meta tokens: a learnable (count, d_model) prefix."""


def parameters(cfg, dims) -> dict[str, tuple[int, ...]]:
    return {"meta_tokens": (cfg.count, dims.d_model)}


def forward_flops(cfg, dims, seq_len: int) -> int:
    return 0


def cache_bytes(cfg, dims, context: int, itemsize: int) -> int:
    return 0
