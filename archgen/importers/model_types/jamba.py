"""jamba: Mamba-1 layers with RMSNorms on Δ, B and C (the mamba kind's `inner_norms`), attention without positions
every `attn_layer_period` layers from `attn_layer_offset`, and an MoE (softmax top-k, weights not renormalised)
every `expert_layer_period` layers from `expert_layer_offset`, a SwiGLU MLP elsewhere.

Layer i is `input_layernorm -> (mamba | self_attn) -> residual, pre_ff_layernorm -> feed_forward -> residual`.
"""

from __future__ import annotations

import math
from typing import Any

from archgen.importers.common import NO_DROPOUT, block_weight_plans, expect_silu, layer_mixer, model_dims
from archgen.importers.config import HFConfig
from archgen.importers.model_types import Imported, ModelType
from archgen.importers.weights import Piece, TensorPlan

_FIXED = {
    "embed.weight": "model.embed_tokens.weight",
    "norm_f.weight": "model.final_layernorm.weight",
    "lm_head.weight": "lm_head.weight",
}
_MAMBA_NORMS = {
    "dt_norm.weight": "dt_layernorm.weight",
    "b_norm.weight": "b_layernorm.weight",
    "c_norm.weight": "c_layernorm.weight",
}


def weight_plans(expected: dict[str, tuple[int, ...]], resolved: Any) -> list[TensorPlan]:
    def block_plan(target: str, shape: tuple[int, ...], layer: int, module: str, rest: str) -> TensorPlan:
        prefix = f"model.layers.{layer}"
        if module in ("mixer_norm", "ffn_norm"):
            norm = "input_layernorm" if module == "mixer_norm" else "pre_ff_layernorm"
            return TensorPlan.copy(target, f"{prefix}.{norm}.{rest}")
        if module == "mixer":
            mixer = "self_attn" if layer_mixer(resolved, layer).kind == "attention" else "mamba"
            return TensorPlan.copy(target, f"{prefix}.{mixer}.{_MAMBA_NORMS.get(rest, rest)}")
        experts = f"{prefix}.feed_forward.experts"
        if rest == "w_in":  # (E, d, 2h) = [gateᵀ | upᵀ] per expert
            rows = tuple(
                (Piece(f"{experts}.{e}.gate_proj.weight", True), Piece(f"{experts}.{e}.up_proj.weight", True))
                for e in range(shape[0])
            )
            return TensorPlan(target, rows, stacked=True)
        if rest == "w_out":  # (E, h, d) = downᵀ per expert
            rows = tuple((Piece(f"{experts}.{e}.down_proj.weight", True),) for e in range(shape[0]))
            return TensorPlan(target, rows, stacked=True)
        return TensorPlan.copy(target, f"{prefix}.feed_forward.{rest}")  # router.weight, or the dense MLP's projections

    return block_weight_plans(expected, _FIXED, block_plan)


def _every(cfg: HFConfig, period_key: str, offset_key: str, n_layers: int) -> list[bool]:
    period, offset = cfg.need(period_key), cfg.need(offset_key)
    if not period or offset is None or not 0 <= offset < period:
        cfg.error(offset_key, f"{offset_key}={offset} must be in [0, {period_key}={period})", None)
        return [False] * n_layers
    return [i % period == offset for i in range(n_layers)]


def to_spec(cfg: HFConfig) -> Imported:
    model = model_dims(cfg, default_max_len=262144)
    n_layers = cfg.need("num_hidden_layers")
    d_model = model["d_model"]
    expect_silu(cfg)
    cfg.expect("attention_dropout", (0, 0.0), 0.0, NO_DROPOUT)
    cfg.expect("sliding_window", (None,), None, "Jamba's attention is full causal in archgen's import")
    cfg.accept("use_mamba_kernels")  # a kernel switch (deprecated in transformers 5)
    n_heads = cfg.need("num_attention_heads")
    attn: dict[str, Any] = {
        "kind": "attention",
        "n_heads": n_heads,
        "n_kv_heads": cfg.take("num_key_value_heads", n_heads),
        "rope": None,
    }  # Jamba's attention has no positional encoding
    rank = cfg.take("mamba_dt_rank", "auto")
    ssm: dict[str, Any] = {
        "kind": "mamba",
        "d_state": cfg.need("mamba_d_state"),
        "d_conv": cfg.take("mamba_d_conv", 4),
        "expand": cfg.need("mamba_expand"),
        "dt_rank": "auto" if rank == "auto" or rank == math.ceil(d_model / 16) else rank,
        "conv_bias": bool(cfg.take("mamba_conv_bias", True)),
        "bias": bool(cfg.take("mamba_proj_bias", False)),
        "inner_norms": True,
    }
    hidden = cfg.need("intermediate_size")
    n_experts = cfg.take("num_experts", 1)
    is_attention = _every(cfg, "attn_layer_period", "attn_layer_offset", n_layers)
    is_moe = _every(cfg, "expert_layer_period", "expert_layer_offset", n_layers) if n_experts > 1 else [False] * n_layers
    ffns: dict[str, dict] = {"mlp": {"kind": "mlp", "activation": "swiglu", "hidden": hidden}}
    if any(is_moe):
        ffns["moe"] = {
            "kind": "moe",
            "n_experts": n_experts,
            "top_k": cfg.need("num_experts_per_tok"),
            "expert": {"activation": "swiglu", "hidden": hidden},
            "normalize_top_k": False,
            "load_balancing_weight": float(cfg.take("router_aux_loss_coef", 0.001)),
            "z_loss_weight": 0.0,
        }
    else:
        cfg.accept("num_experts_per_tok", "router_aux_loss_coef")
    if all(is_moe):
        del ffns["mlp"]
    mixers = {"ssm": ssm, **({"attn": attn} if any(is_attention) else {})}
    return Imported(model, mixers, ffns, ["attn" if a else "ssm" for a in is_attention], ["moe" if m else "mlp" for m in is_moe])


# ---------------------------------------------------------------------------------------------------- export
def _period(flags: list[bool]) -> tuple[int, int] | None:
    """(period, offset) with flags[i] == (i % period == offset) for every layer, the shortest period first."""
    n = len(flags)
    for period in range(1, n + 1):
        for offset in range(period):
            if flags == [i % period == offset for i in range(n)]:
                return period, offset
    return None


def to_hf(resolved: Any) -> dict[str, Any] | list[str]:
    from archgen.importers.export_checks import common_reasons

    reasons = common_reasons(resolved)
    by_kind = {c.kind: c.config for c in resolved.mixers.values()}
    ssm, attn = by_kind.get("mamba"), by_kind.get("attention")
    if ssm is None or set(by_kind) - {"mamba", "attention"} or len(resolved.mixers) != len(by_kind):
        return reasons + [f"jamba is one mamba mixer plus at most one attention mixer; this spec has {sorted(by_kind)}"]
    if not ssm.inner_norms:
        reasons.append("Jamba's Mamba mixer normalises Δ, B and C: set inner_norms: true")
    if (ssm.dt_min, ssm.dt_max) != (0.001, 0.1):
        reasons.append("a jamba config has no Δ initialisation range; keep dt_min 0.001 and dt_max 0.1")
    if attn is not None and (attn.rope is not None or attn.window or attn.qk_norm or attn.qkv_bias or attn.out_bias):
        reasons.append("Jamba's attention has no RoPE, window, qk-norm or biases")
    ffn_kinds = {c.kind: c.config for c in resolved.ffns.values()}
    if any(layer.ffn is None or len(layer.mixers) != 1 for layer in resolved.layers) or set(ffn_kinds) - {"mlp", "moe"}:
        return reasons + ["jamba has one mixer and an MLP or MoE in every layer"]
    moe = ffn_kinds.get("moe")
    shapes = [f.expert if k == "moe" else f for k, f in ffn_kinds.items()]
    if any(s.activation != "swiglu" or s.bias for s in shapes) or len({s.hidden for s in shapes}) != 1:
        reasons.append("Jamba's MLP and experts are SwiGLU of one hidden size without biases")
    if moe is not None and (moe.normalize_top_k or moe.shared_experts or moe.capacity_factor is not None or moe.z_loss_weight):
        reasons.append("Jamba routes dropless top-k with unnormalised weights, no shared experts and no z-loss")
    layer_kinds = [resolved.mixers[layer.mixers[0]].kind for layer in resolved.layers]
    attention_at = (
        _period([k == "attention" for k in layer_kinds]) if attn is not None else (len(layer_kinds) + 1, len(layer_kinds))
    )
    experts_at = _period([resolved.ffns[layer.ffn].kind == "moe" for layer in resolved.layers]) if moe is not None else (1, 0)
    if attention_at is None or experts_at is None:
        reasons.append("Jamba places attention and experts every period layers from an offset; this layout is not periodic")
    if reasons:
        return reasons
    model = resolved.model
    fields: dict[str, Any] = {
        "hidden_size": model.d_model,
        "num_hidden_layers": resolved.n_layers,
        "vocab_size": model.vocab_size,
        "rms_norm_eps": model.norm.eps,
        "tie_word_embeddings": model.tie_embeddings,
        "initializer_range": model.init_std,
        "max_position_embeddings": model.max_seq_len,
        "hidden_act": "silu",
        "attention_dropout": 0.0,
        "intermediate_size": shapes[0].hidden,
        "attn_layer_period": attention_at[0],
        "attn_layer_offset": attention_at[1],
        "expert_layer_period": experts_at[0],
        "expert_layer_offset": experts_at[1],
        "num_experts": moe.n_experts if moe else 1,
        "num_experts_per_tok": moe.top_k if moe else 1,
        "router_aux_loss_coef": moe.load_balancing_weight if moe else 0.001,
        "mamba_d_state": ssm.d_state,
        "mamba_d_conv": ssm.d_conv,
        "mamba_expand": ssm.expand,
        "mamba_dt_rank": ssm.dt_rank,
        "mamba_conv_bias": ssm.conv_bias,
        "mamba_proj_bias": ssm.bias,
    }
    if attn is not None:
        fields.update(num_attention_heads=attn.n_heads, num_key_value_heads=attn.n_kv_heads)
        if attn.head_dim * attn.n_heads != model.d_model:
            return ["Jamba's heads are d_model / num_attention_heads wide"]
    return {"architectures": ["JambaForCausalLM"], "model_type": "jamba", **fields}


MODEL_TYPES = [ModelType("jamba", to_spec, weight_plans, to_hf=to_hf)]
