"""Output heads beyond the LM head: Medusa drafts, the JEPA predictor, the time-series forecaster.

Medusa heads share the model's unembedding (each head is residual SiLU blocks, then the same vocabulary projection);
the JEPA target encoder is an EMA copy of the backbone kept as buffers, not parameters, so it is not counted here.
"""


def _predictor_widths(cfg, dims) -> list[int]:
    hidden = cfg.predictor_hidden or dims.d_model
    latent = cfg.latent_dim or dims.d_model
    return [dims.d_model] + [hidden] * (cfg.predictor_layers - 1) + [latent]


def parameters(cfg, dims) -> dict[str, tuple[int, ...]]:
    d = dims.d_model
    if cfg.kind == "lm":
        return {}
    if cfg.kind == "medusa":
        table = {}
        for head in range(cfg.n_heads):
            for block in range(cfg.hidden_layers):
                table[f"heads.{head}.{block}.weight"] = (d, d)
                table[f"heads.{head}.{block}.bias"] = (d,)
        return table
    if cfg.kind == "jepa":
        widths = _predictor_widths(cfg, dims)
        table = {"mask_token": (d,)}
        for i in range(cfg.predictor_layers):
            table[f"predictor.{i}.weight"] = (widths[i + 1], widths[i])
            table[f"predictor.{i}.bias"] = (widths[i + 1],)
        if (cfg.latent_dim or d) != d:
            table["target_projection.weight"] = (cfg.latent_dim, d)
        return table
    if cfg.kind == "forecaster":
        return {"proj.weight": (cfg.n_bins, d), "proj.bias": (cfg.n_bins,)}
    raise ValueError(f"unknown head kind {cfg.kind!r}")


def forward_flops(cfg, dims, seq_len: int) -> int:
    d = dims.d_model
    if cfg.kind == "medusa":
        return seq_len * cfg.n_heads * (cfg.hidden_layers * 2 * d * d + 2 * d * dims.vocab_size)
    if cfg.kind == "jepa":
        widths = _predictor_widths(cfg, dims)
        return seq_len * sum(2 * widths[i] * widths[i + 1] for i in range(cfg.predictor_layers))
    if cfg.kind == "forecaster":
        return seq_len * 2 * d * cfg.n_bins
    return 0


def cache_bytes(cfg, dims, context: int, itemsize: int) -> int:
    return 0
