"""Medusa heads: K stacks of residual SiLU blocks (h + SiLU(W h + b)) that draft tokens t+2 … t+K+1 through the
model's shared unembedding, so the vocabulary projection adds compute but no parameters."""


def parameters(cfg, dims) -> dict[str, tuple[int, ...]]:
    d = dims.d_model
    table = {}
    for head in range(cfg.n_heads):
        for block in range(cfg.hidden_layers):
            table[f"blocks.{head}.{block}.weight"] = (d, d)
            table[f"blocks.{head}.{block}.bias"] = (d,)
    return table


def forward_flops(cfg, dims, seq_len: int) -> int:
    d = dims.d_model
    return seq_len * cfg.n_heads * (cfg.hidden_layers * 2 * d * d + 2 * d * dims.vocab_size)


def cache_bytes(cfg, dims, context: int, itemsize: int) -> int:
    return 0
