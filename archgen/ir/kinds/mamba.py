"""Mamba-1 selective SSM: in_proj → causal depthwise conv + SiLU → x_proj (Δ, B, C) → dt_proj → scan → gate → out_proj."""


def d_inner(cfg, dims) -> int:
    return cfg.expand * dims.d_model


def parameters(cfg, dims) -> dict[str, tuple[int, ...]]:
    d, di, n, r = dims.d_model, d_inner(cfg, dims), cfg.d_state, cfg.dt_rank
    table = {"in_proj.weight": (2 * di, d)}
    if cfg.bias:
        table["in_proj.bias"] = (2 * di,)
    table["conv1d.weight"] = (di, 1, cfg.d_conv)
    if cfg.conv_bias:
        table["conv1d.bias"] = (di,)
    table.update({
        "x_proj.weight": (r + 2 * n, di),
        "dt_proj.weight": (di, r),
        "dt_proj.bias": (di,),
        "A_log": (di, n),
        "D": (di,),
        "out_proj.weight": (d, di),
    })
    if cfg.bias:
        table["out_proj.bias"] = (d,)
    return table


# Per channel and state element and token: exp(Δ·A) (1), Δ·B·x (2), a·h + b (2), C·h accumulated (2).
SCAN_FLOPS_PER_STATE = 7


def forward_flops(cfg, dims, seq_len: int) -> int:
    d, di, n, r = dims.d_model, d_inner(cfg, dims), cfg.d_state, cfg.dt_rank
    per_token = (2 * d * 2 * di + 2 * di * cfg.d_conv + 2 * di * (r + 2 * n) + 2 * r * di + SCAN_FLOPS_PER_STATE * di * n
                 + 2 * di * d)
    return seq_len * per_token


def cache_bytes(cfg, dims, context: int, itemsize: int) -> int:
    di = d_inner(cfg, dims)
    return di * (cfg.d_conv - 1) * itemsize + di * cfg.d_state * 4  # the SSM state is kept in float32


def activation_elements(cfg, dims, seq_len: int) -> int:
    """x and z, the conv output, Δ, B, C and the output (the state lives in chunks, not over the whole sequence)."""
    di = d_inner(cfg, dims)
    return seq_len * (5 * di + 2 * cfg.d_state)
