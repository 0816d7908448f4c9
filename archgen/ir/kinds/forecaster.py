"""Time-series forecaster head: a linear map from hidden states to logits over the value bins."""


def parameters(cfg, dims) -> dict[str, tuple[int, ...]]:
    return {"proj.weight": (cfg.n_bins, dims.d_model), "proj.bias": (cfg.n_bins,)}


def forward_flops(cfg, dims, seq_len: int) -> int:
    return seq_len * 2 * dims.d_model * cfg.n_bins


def cache_bytes(cfg, dims, context: int, itemsize: int) -> int:
    return 0
