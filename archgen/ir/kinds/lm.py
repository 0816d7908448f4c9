"""An explicit `lm` head entry: the model's LM head itself (embedding.py counts it); nothing extra."""


def parameters(cfg, dims) -> dict[str, tuple[int, ...]]:
    return {}


def forward_flops(cfg, dims, seq_len: int) -> int:
    return 0


def cache_bytes(cfg, dims, context: int, itemsize: int) -> int:
    return 0
