"""HSPMN contextual stream: attention's parameters plus a one-logit router per token.

FLOPs are those of the sparse computation the op stands for, at the spec's expected fraction of selected queries:
keys and values for every token, queries, scores and the output projection for the selected ones only.
"""

from __future__ import annotations

from dataclasses import dataclass

from archgen.kinds.attention import Attention, AttentionConfig, visible_keys
from archgen.kinds.base import Dims
from archgen.spec import models


@dataclass(frozen=True)
class SparseAttentionConfig(AttentionConfig):
    fraction: float  # expected share of tokens whose queries attend
    entropy_weight: float
    fraction_weight: float


class SparseAttention(Attention):
    name = "sparse_attention"
    template = "attention"  # attention with a router in front: one template serves both
    rope_function = "apply_rope"  # q (selected tokens) and k rotate at different positions: one call each
    attention_functions = ("KVCache", "StepContext", "attention", "hide_pads")  # its queries' own mask, per layer
    colour = "#f3a712"
    produces_aux = True

    def resolve(self, spec: models.SparseAttentionSpec, model) -> SparseAttentionConfig:
        base = super().resolve(spec, model)
        return SparseAttentionConfig(**vars(base), fraction=spec.fraction, entropy_weight=spec.entropy_weight,
                                     fraction_weight=spec.fraction_weight)

    def imports(self, config: SparseAttentionConfig) -> dict[str, tuple[str, ...]]:
        routing = ("gather_tokens", "pack_selected", "packed_query_attention", "scatter_tokens", "select_tokens",
                   "selection_losses")
        return super().imports(config) | {"routing": routing}

    def output_projection(self, config: SparseAttentionConfig) -> str | None:
        return None  # the router's gate scales o_proj's product

    def template_dims(self, config: SparseAttentionConfig, dims: Dims) -> dict:
        return super().template_dims(config, dims) | {
            "router": True, "fraction": config.fraction, "fraction_percent": round(config.fraction * 100, 1),
            "entropy_weight": config.entropy_weight, "fraction_weight": config.fraction_weight}

    def parameters(self, config: SparseAttentionConfig, dims: Dims) -> dict[str, tuple[int, ...]]:
        table = super().parameters(config, dims)
        table.update({"router.weight": (1, dims.d_model), "router.bias": (1,)})
        return table

    def forward_flops(self, config: SparseAttentionConfig, dims: Dims, seq_len: int) -> int:
        selected = config.fraction * seq_len
        hd = config.head_dim
        projections = 2 * dims.d_model * hd * (2 * config.n_heads * selected + 2 * config.n_kv_heads * seq_len)
        scores_and_values = 4 * config.n_heads * hd * config.fraction * visible_keys(seq_len, config.window)
        router = 2 * dims.d_model * seq_len
        return round(projections + scores_and_values + router)


KIND = SparseAttention()
