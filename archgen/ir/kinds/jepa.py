"""JEPA world-model head: a mask embedding and an MLP predictor from context latents to target latents.

The target encoder is an exponential-moving-average copy of the backbone kept as buffers (no gradients), so it is
not counted as parameters here. The target projection (latent_dim != d_model) is a parameter that never trains: it
sits on the no-grad target side.
"""


def predictor_widths(cfg, dims) -> list[int]:
    hidden = cfg.predictor_hidden or dims.d_model
    latent = cfg.latent_dim or dims.d_model
    return [dims.d_model] + [hidden] * (cfg.predictor_layers - 1) + [latent]


def parameters(cfg, dims) -> dict[str, tuple[int, ...]]:
    d = dims.d_model
    widths = predictor_widths(cfg, dims)
    table = {"mask_token.weight": (1, d)}  # an nn.Embedding of one row, so Model.init_weights covers it
    for i in range(cfg.predictor_layers):
        table[f"predictor.{i}.weight"] = (widths[i + 1], widths[i])
        table[f"predictor.{i}.bias"] = (widths[i + 1],)
    if (cfg.latent_dim or d) != d:
        table["target_projection.weight"] = (cfg.latent_dim, d)
    return table


def forward_flops(cfg, dims, seq_len: int) -> int:
    widths = predictor_widths(cfg, dims)
    return seq_len * sum(2 * widths[i] * widths[i + 1] for i in range(cfg.predictor_layers))


def cache_bytes(cfg, dims, context: int, itemsize: int) -> int:
    return 0
