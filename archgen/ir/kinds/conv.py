"""HSPMN reflexive mixer: a depthwise causal convolution over d_model channels."""


def parameters(cfg, dims) -> dict[str, tuple[int, ...]]:
    table = {"conv1d.weight": (dims.d_model, 1, cfg.d_conv)}
    if cfg.bias:
        table["conv1d.bias"] = (dims.d_model,)
    return table


def forward_flops(cfg, dims, seq_len: int) -> int:
    return 2 * seq_len * dims.d_model * cfg.d_conv


def cache_bytes(cfg, dims, context: int, itemsize: int) -> int:
    return dims.d_model * (cfg.d_conv - 1) * itemsize
