"""Token embedding and the output projection (the `lm_head`, absent when tied to the embedding)."""


def parameters(cfg, dims) -> dict[str, tuple[int, ...]]:
    if cfg == "tied":
        return {}
    return {"weight": (dims.vocab_size, dims.d_model)}


def forward_flops(cfg, dims, seq_len: int) -> int:
    if cfg == "embedding":
        return 0  # a lookup
    return 2 * seq_len * dims.d_model * dims.vocab_size


def cache_bytes(cfg, dims, context: int, itemsize: int) -> int:
    return 0


def activation_elements(cfg, dims, seq_len: int) -> int:
    return 0 if cfg == "embedding" else seq_len * dims.vocab_size
