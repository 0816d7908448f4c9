"""Mixture of experts: a linear router, stacked expert weights run as batched matmuls, optional shared experts.

Shared experts have the routed experts' shape and are always on; they are stored fused as one MLP whose hidden size
is shared_experts × the expert hidden size, which computes the same sum.
"""

from archgen.ir.kinds import mlp

GATED = mlp.GATED


def _shared(cfg):
    return cfg.expert.model_copy(update={"hidden": cfg.expert.hidden * cfg.shared_experts})


def parameters(cfg, dims) -> dict[str, tuple[int, ...]]:
    d, h, e = dims.d_model, cfg.expert.hidden, cfg.n_experts
    in_width = 2 * h if cfg.expert.activation in GATED else h
    table = {"router.weight": (e, d), "w_in": (e, d, in_width), "w_out": (e, h, d)}
    if cfg.shared_experts:
        table.update({f"shared_expert.{k}": v for k, v in mlp.parameters(_shared(cfg), dims).items()})
    return table


def expert_parameter_count(cfg, dims) -> int:
    in_width = 2 * cfg.expert.hidden if cfg.expert.activation in GATED else cfg.expert.hidden
    return dims.d_model * in_width + cfg.expert.hidden * dims.d_model


def forward_flops(cfg, dims, seq_len: int) -> int:
    router = 2 * seq_len * dims.d_model * cfg.n_experts
    routed = cfg.top_k * mlp.forward_flops(cfg.expert, dims, seq_len)
    shared = mlp.forward_flops(_shared(cfg), dims, seq_len) if cfg.shared_experts else 0
    return router + routed + shared


def cache_bytes(cfg, dims, context: int, itemsize: int) -> int:
    return 0


def activation_elements(cfg, dims, seq_len: int) -> int:
    rows = seq_len * cfg.top_k
    in_width = 2 * cfg.expert.hidden if cfg.expert.activation in GATED else cfg.expert.hidden
    return rows * (2 * dims.d_model + in_width + cfg.expert.hidden) + seq_len * cfg.n_experts
