"""Causal grouped-query attention: q/k/v/o projections, optional qk-norm, RoPE (no parameters), sliding window."""


def parameters(cfg, dims) -> dict[str, tuple[int, ...]]:
    d, hd = dims.d_model, cfg.head_dim
    q_out, kv_out = cfg.n_heads * hd, cfg.n_kv_heads * hd
    table = {"q_proj.weight": (q_out, d), "k_proj.weight": (kv_out, d), "v_proj.weight": (kv_out, d)}
    if cfg.qkv_bias:
        table.update({"q_proj.bias": (q_out,), "k_proj.bias": (kv_out,), "v_proj.bias": (kv_out,)})
    table["o_proj.weight"] = (d, q_out)
    if cfg.out_bias:
        table["o_proj.bias"] = (d,)
    if cfg.qk_norm:
        table.update({"q_norm.weight": (hd,), "k_norm.weight": (hd,)})
    return table


def visible_keys(seq_len: int, window: int | None) -> int:
    """Σ over query positions i of the keys it sees: min(i + 1, window)."""
    if window is None or window >= seq_len:
        return seq_len * (seq_len + 1) // 2
    return window * (window + 1) // 2 + (seq_len - window) * window


def projection_flops(cfg, dims, q_rows: int, kv_rows: int) -> int:
    hd = cfg.head_dim
    return 2 * dims.d_model * hd * (q_rows * cfg.n_heads * 2 + kv_rows * cfg.n_kv_heads * 2)


def forward_flops(cfg, dims, seq_len: int) -> int:
    scores_and_values = 4 * cfg.n_heads * cfg.head_dim * visible_keys(seq_len, cfg.window)
    return projection_flops(cfg, dims, seq_len, seq_len) + scores_and_values


def cache_bytes(cfg, dims, context: int, itemsize: int) -> int:
    kept = context if cfg.window is None else min(context, cfg.window)
    return 2 * cfg.n_kv_heads * cfg.head_dim * kept * itemsize


def activation_elements(cfg, dims, seq_len: int) -> int:
    """Largest live intermediate: q, k, v and the output, plus one head's score matrix (fused kernels never hold all)."""
    kept = seq_len if cfg.window is None else min(seq_len, cfg.window)
    return seq_len * cfg.head_dim * (2 * cfg.n_heads + 2 * cfg.n_kv_heads) + seq_len * kept
