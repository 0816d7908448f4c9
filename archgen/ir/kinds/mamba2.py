"""Mamba-2 SSD: in_proj → (z, x, B, C, dt) → causal conv over x,B,C → chunked scan → gated RMSNorm → out_proj."""


def sizes(cfg, dims) -> tuple[int, int, int]:
    di = cfg.expand * dims.d_model
    conv_channels = di + 2 * cfg.n_groups * cfg.d_state
    return di, conv_channels, cfg.n_heads


def parameters(cfg, dims) -> dict[str, tuple[int, ...]]:
    d = dims.d_model
    di, conv_channels, h = sizes(cfg, dims)
    table = {"in_proj.weight": (di + conv_channels + h, d)}
    if cfg.bias:
        table["in_proj.bias"] = (di + conv_channels + h,)
    table["conv1d.weight"] = (conv_channels, 1, cfg.d_conv)
    if cfg.conv_bias:
        table["conv1d.bias"] = (conv_channels,)
    table.update({"dt_bias": (h,), "A_log": (h,), "D": (h,), "norm.weight": (di,), "out_proj.weight": (d, di)})
    if cfg.bias:
        table["out_proj.bias"] = (d,)
    return table


# Counted as the recurrence it computes: per head-dim × state element and token, dt·x⊗B and a·h + b (3), h·C (2).
SCAN_FLOPS_PER_STATE = 5


def forward_flops(cfg, dims, seq_len: int) -> int:
    d = dims.d_model
    di, conv_channels, h = sizes(cfg, dims)
    per_token = (2 * d * (di + conv_channels + h) + 2 * conv_channels * cfg.d_conv + SCAN_FLOPS_PER_STATE * di * cfg.d_state
                 + 2 * di * d)
    return seq_len * per_token


def cache_bytes(cfg, dims, context: int, itemsize: int) -> int:
    di, conv_channels, h = sizes(cfg, dims)
    return conv_channels * (cfg.d_conv - 1) * itemsize + di * cfg.d_state * 4


def activation_elements(cfg, dims, seq_len: int) -> int:
    di, conv_channels, h = sizes(cfg, dims)
    return seq_len * (di + conv_channels + h) * 2 + seq_len * di
