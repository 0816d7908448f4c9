"""nemotron_h: Megatron-style hybrids (Nemotron-H), one sublayer per layer: Mamba-2 (M), attention without positional
encoding (*), a squared-ReLU MLP (-), in the order of `layers_block_type` (or an older config's
`hybrid_override_pattern`, the Megatron string itself).

Layer i is `norm -> mixer -> residual`, where the mixer is whichever of the four its type names. In archgen a layer
is a mixer and a feed-forward, so an M or * layer is a layer without a feed-forward and a - layer one without a
mixer: the spec states this with the Megatron layout form, the same string under `layout.mixers` and `layout.ffns`.
The Mamba-2 step Δ is clamped to `time_step_limit` (mamba_ssm's and transformers' `dt_limit`): the mamba2 kind's
`dt_floor` and `dt_ceiling`. `time_step_min` only sets the initial Δ bias. (transformers before 5.25 floored Δ at
`time_step_min` instead; Megatron, mamba_ssm and transformers >= 5.25 do not, and archgen follows them.)
"""

from __future__ import annotations

from typing import Any

from archgen.importers.common import NO_DROPOUT, block_weight_plans, model_dims
from archgen.importers.config import HFConfig
from archgen.importers.model_types import Imported, ModelType
from archgen.importers.model_types.mamba import dt_limit
from archgen.importers.weights import TensorPlan

SYMBOLS = {"linear_attention": "M", "full_attention": "*", "mlp": "-", "moe": "E"}
# Settings of the routed-expert layers (E), which no layer uses unless the pattern has one.
MOE_FIELDS = (
    "n_routed_experts",
    "n_shared_experts",
    "moe_intermediate_size",
    "moe_shared_expert_intermediate_size",
    "moe_latent_size",
    "moe_shared_expert_overlap",
    "num_experts_per_tok",
    "routed_scaling_factor",
    "n_group",
    "topk_group",
    "norm_topk_prob",
    "router_aux_loss_coef",
)
_FIXED = {"embed.weight": "backbone.embeddings.weight", "norm_f.weight": "backbone.norm_f.weight"}


def weight_plans(expected: dict[str, tuple[int, ...]], resolved: Any) -> list[TensorPlan]:
    """A layer's one norm is `norm` and its one module `mixer`, whichever archgen role (mixer or ffn) it has."""
    def block_plan(target: str, shape: tuple[int, ...], layer: int, module: str, rest: str) -> TensorPlan:
        return TensorPlan.copy(target, f"backbone.layers.{layer}.{'norm' if module.endswith('norm') else 'mixer'}.{rest}")

    return block_weight_plans(expected, _FIXED, block_plan)


def megatron_pattern(cfg: HFConfig) -> str:
    """The layer pattern as Megatron writes it ('M-M-M*-'), from layers_block_type or hybrid_override_pattern."""
    if cfg.has("layers_block_type") or cfg.has("layer_types"):
        key = "layers_block_type" if cfg.has("layers_block_type") else "layer_types"
        cfg.accept("hybrid_override_pattern", "layers_block_type", "layer_types")
        types = cfg.take(key)
        pattern = ""
        for i, kind in enumerate(types):
            if kind not in SYMBOLS:
                cfg.error(f"{key}[{i}]", f"layer type '{kind}' is not a Nemotron-H layer", f"use one of {sorted(SYMBOLS)}")
            pattern += SYMBOLS.get(kind, "M")
        return pattern
    pattern = cfg.need("hybrid_override_pattern") or ""
    for i, char in enumerate(pattern):
        if char not in SYMBOLS.values():
            cfg.error("hybrid_override_pattern", f"'{char}' at {i} is not a Nemotron-H layer symbol", "use M, *, - or E")
    return pattern


# Older configs spell the Mamba settings with a mamba_ prefix; NemotronHConfig reads those first.
LEGACY = {
    "n_groups": "mamba_n_groups",
    "conv_kernel": "mamba_d_conv",
    "expand": "mamba_expand",
    "time_step_limit": "mamba_dt_limit",
    "use_conv_bias": "mamba_conv_bias",
    "chunk_size": "mamba_chunk_size",
}


def spelled(cfg: HFConfig, key: str) -> str:
    """The name the config gives `key`: its legacy spelling where present (NemotronHConfig reads that first), else
    `key`; the other name is accepted unread."""
    legacy = LEGACY[key]
    chosen, other = (legacy, key) if cfg.has(legacy) else (key, legacy)
    cfg.accept(other)
    return chosen


def take(cfg: HFConfig, key: str, default: Any) -> Any:
    return cfg.take(spelled(cfg, key), default)


def to_spec(cfg: HFConfig) -> Imported:
    model = model_dims(cfg, eps_key="layer_norm_epsilon", default_max_len=4096)
    pattern = megatron_pattern(cfg)
    n_layers = len(pattern)
    cfg.expect("num_hidden_layers", (n_layers, None), n_layers, f"the layer pattern has {n_layers} layers")
    cfg.expect("hidden_dropout", (0, 0.0), 0.0, NO_DROPOUT)
    if "E" in pattern:
        cfg.error(
            "layers_block_type",
            "Nemotron-H's mixture-of-experts layers ('moe', E) route by sigmoid scores with a correction bias, a "
            "routed scaling factor and group-limited top-k, and their experts are squared-ReLU MLPs beside a shared "
            "expert of its own width; the moe kind has none of these",
            "import a Nemotron-H without E layers (the 8B, 47B and 56B models have none)",
        )
    cfg.accept(*MOE_FIELDS, "output_router_logits")  # the routed-expert settings: used only by E layers
    # Multi-token-prediction layers: transformers' causal LM does not build them (their checkpoint tensors are skipped).
    cfg.accept("mtp_layers_block_type", "mtp_hybrid_override_pattern")
    cfg.expect("num_nextn_predict_layers", (0,), 0, "the spec has no multi-token-prediction layers")
    cfg.expect("mamba_ssm_cache_dtype", ("float32",), "float32", "the mamba2 kind keeps its state in float32")
    cfg.accept("use_mamba_kernels")  # deprecated in transformers, no effect
    # The mixer's projections' biases follow use_bias, not mamba_proj_bias.
    cfg.accept("mamba_proj_bias")
    # Initialisation only, like time_step_min, time_step_max and time_step_floor.
    cfg.accept("mamba_dt_min", "mamba_dt_max", "mamba_dt_init_floor")
    mixers: dict[str, dict[str, Any]] = {}
    if "M" in pattern:
        cfg.expect("mamba_hidden_act", ("silu",), "silu", "archgen's Mamba-2 gates with SiLU")
        n_heads, head_dim = cfg.need("mamba_num_heads"), cfg.need("mamba_head_dim")
        n_groups = take(cfg, "n_groups", 8)
        expand = take(cfg, "expand", 2)
        if n_heads and head_dim and n_heads * head_dim != expand * model["d_model"]:
            cfg.error(
                "mamba_num_heads",
                f"mamba_num_heads·mamba_head_dim = {n_heads * head_dim} is not expand·hidden_size = {expand * model['d_model']}",
                "the mamba2 kind's inner width is expand·d_model",
            )
        use_bias = bool(cfg.take("use_bias", False))
        mixers["ssm"] = {
            "kind": "mamba2",
            "head_dim": head_dim,
            "n_heads": n_heads,
            "n_groups": n_groups,
            "d_state": cfg.need("ssm_state_size"),
            "d_conv": take(cfg, "conv_kernel", 4),
            "expand": expand,
            "chunk_size": take(cfg, "chunk_size", 128),
            "conv_bias": bool(take(cfg, "use_conv_bias", True)),
            **({"bias": True} if use_bias else {}),
            # transformers normalises the gated output in n_groups groups of intermediate_size / n_groups channels
            **({"grouped_norm": True} if n_groups > 1 else {}),
            **dt_limit(cfg, spelled(cfg, "time_step_limit")),  # older configs: mamba_dt_limit
        }
    if "*" in pattern:
        # NemotronHAttention (Jamba's) has no positional encoding: any RoPE field is one transformers does not read.
        cfg.accept("rope_theta", "rope_scaling", "rope_parameters", "partial_rotary_factor")
        cfg.expect("sliding_window", (None,), None, "Nemotron-H's attention is full causal attention")
        cfg.expect("attention_dropout", (0, 0.0), 0.0, NO_DROPOUT)
        n_heads = cfg.need("num_attention_heads")
        head_dim = cfg.take("head_dim") or cfg.take("attention_head_dim", 128)
        cfg.accept("attention_head_dim")  # older configs spell head_dim so
        bias = bool(cfg.take("attention_bias", False))
        attn: dict[str, Any] = {"kind": "attention", "n_heads": n_heads, "n_kv_heads": cfg.take("num_key_value_heads", n_heads)}
        if n_heads and head_dim * n_heads != model["d_model"]:
            attn["head_dim"] = head_dim
        attn["rope"] = None
        if bias:
            attn.update(qkv_bias=True, out_bias=True)
        mixers["attn"] = attn
    ffns: dict[str, dict[str, Any]] = {}
    if "-" in pattern:
        cfg.expect("mlp_hidden_act", ("relu2",), "relu2", "Nemotron-H's MLP is up_proj -> relu² -> down_proj")
        ffns["mlp"] = {"kind": "mlp", "activation": "relu2", "hidden": cfg.need("intermediate_size")}
        if cfg.take("mlp_bias", False):
            ffns["mlp"]["bias"] = True
    mixer_symbols = {symbol: name for symbol, name in (("M", "ssm"), ("*", "attn")) if name in mixers}
    ffn_layers = ["mlp" if char == "-" else "none" for char in pattern]
    layout: dict[str, Any] = {"n_layers": n_layers, "mixers": {"megatron": pattern, "symbols": mixer_symbols}}
    if ffns:
        layout["ffns"] = {"megatron": pattern, "symbols": {"-": "mlp"}}
    mixer_layers = [{"M": "ssm", "*": "attn"}.get(char, "none") for char in pattern]
    return Imported(model, mixers, ffns, mixer_layers, ffn_layers, layout=layout)


MODEL_TYPES = [ModelType("nemotron_h", to_spec, weight_plans)]
