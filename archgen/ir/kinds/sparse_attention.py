"""HSPMN contextual stream: attention's parameters plus a one-logit router per token.

FLOPs are those of the sparse computation the op stands for, at the spec's expected fraction of selected queries:
keys and values for every token, queries, scores and the output projection for the selected ones only.
"""

from archgen.ir.kinds import attention


def parameters(cfg, dims) -> dict[str, tuple[int, ...]]:
    table = attention.parameters(cfg, dims)
    table.update({"router.weight": (1, dims.d_model), "router.bias": (1,)})
    return table


def forward_flops(cfg, dims, seq_len: int) -> int:
    selected = cfg.fraction * seq_len
    hd = cfg.head_dim
    projections = 2 * dims.d_model * hd * (2 * cfg.n_heads * selected + 2 * cfg.n_kv_heads * seq_len)
    scores_and_values = 4 * cfg.n_heads * hd * cfg.fraction * attention.visible_keys(seq_len, cfg.window)
    router = 2 * dims.d_model * seq_len
    return round(projections + scores_and_values + router)


def cache_bytes(cfg, dims, context: int, itemsize: int) -> int:
    return attention.cache_bytes(cfg, dims, context, itemsize)


def activation_elements(cfg, dims, seq_len: int) -> int:
    return attention.activation_elements(cfg, dims, seq_len)
