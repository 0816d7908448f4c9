"""Ops that own nothing and cost nothing in the model: residual additions, and an explicit `lm` head entry (the
unembedding itself is counted by embedding.py)."""


def parameters(cfg, dims) -> dict[str, tuple[int, ...]]:
    return {}


def forward_flops(cfg, dims, seq_len: int) -> int:
    return 0


def cache_bytes(cfg, dims, context: int, itemsize: int) -> int:
    return 0
