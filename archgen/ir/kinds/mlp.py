"""Feed-forward: gated (SwiGLU/GeGLU: gate_proj, up_proj, down_proj) or plain (up_proj, down_proj)."""

GATED = ("swiglu", "geglu")


def parameters(cfg, dims) -> dict[str, tuple[int, ...]]:
    d, h = dims.d_model, cfg.hidden
    table = {}
    if cfg.activation in GATED:
        table["gate_proj.weight"] = (h, d)
        if cfg.bias:
            table["gate_proj.bias"] = (h,)
    table["up_proj.weight"] = (h, d)
    if cfg.bias:
        table["up_proj.bias"] = (h,)
    table["down_proj.weight"] = (d, h)
    if cfg.bias:
        table["down_proj.bias"] = (d,)
    return table


def forward_flops(cfg, dims, seq_len: int) -> int:
    matrices = 3 if cfg.activation in GATED else 2
    return 2 * seq_len * dims.d_model * cfg.hidden * matrices


def cache_bytes(cfg, dims, context: int, itemsize: int) -> int:
    return 0


def activation_elements(cfg, dims, seq_len: int) -> int:
    return seq_len * cfg.hidden * (3 if cfg.activation in GATED else 2)
