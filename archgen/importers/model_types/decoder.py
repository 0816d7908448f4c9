"""Attention decoders: llama, mistral (sliding window), qwen2 (q/k/v biases), qwen3 (qk-norm), mixtral (experts).

Layer i is `input_layernorm -> self_attn -> residual, post_attention_layernorm -> mlp -> residual`, which is
archgen's block exactly; the names below are the only translation.
"""

from __future__ import annotations

import re
from typing import Any

from archgen.importers.common import (
    Renamer,
    attention,
    expect_silu,
    model_dims,
)
from archgen.importers.config import HFConfig
from archgen.importers.model_types import Imported, ModelType
from archgen.importers.weights import Piece, TensorPlan

RENAME = Renamer(
    [
        (r"embed\.weight", "model.embed_tokens.weight"),
        (r"norm_f\.weight", "model.norm.weight"),
        (r"layers\.(\d+)\.mixer_norm\.weight", r"model.layers.\1.input_layernorm.weight"),
        (r"layers\.(\d+)\.ffn_norm\.weight", r"model.layers.\1.post_attention_layernorm.weight"),
        (r"layers\.(\d+)\.mixer\.(.*)", r"model.layers.\1.self_attn.\2"),
        (r"layers\.(\d+)\.ffn\.router\.weight", r"model.layers.\1.block_sparse_moe.gate.weight"),
        (r"layers\.(\d+)\.ffn\.(.*)", r"model.layers.\1.mlp.\2"),
    ]
)
_EXPERTS = re.compile(r"layers\.(\d+)\.ffn\.(w_in|w_out)")


def weight_plans(expected: dict[str, tuple[int, ...]], resolved: Any) -> list[TensorPlan]:
    plans = []
    for target, shape in expected.items():
        if match := _EXPERTS.fullmatch(target):
            layer, which = match.groups()
            prefix = f"model.layers.{layer}.block_sparse_moe.experts"
            if which == "w_in":  # (E, d, 2h) = [w1ᵀ | w3ᵀ] per expert: gate, then up
                rows = tuple(
                    (Piece(f"{prefix}.{e}.w1.weight", True), Piece(f"{prefix}.{e}.w3.weight", True)) for e in range(shape[0])
                )
            else:  # (E, h, d) = w2ᵀ per expert
                rows = tuple((Piece(f"{prefix}.{e}.w2.weight", True),) for e in range(shape[0]))
            plans.append(TensorPlan(target, rows, stacked=True))
        else:
            plans.append(TensorPlan.copy(target, RENAME(target)))
    return plans


def _layer_windows(cfg: HFConfig, n_layers: int) -> list[int | None]:
    """The window of each layer: mistral's `sliding_window` applies to every layer; qwen2/qwen3 choose layers by
    `layer_types` (or, in older configs, `use_sliding_window` from layer `max_window_layers` on)."""
    window = cfg.take("sliding_window")
    if cfg.model_type in ("mistral", "mixtral"):
        return [window] * n_layers
    types = cfg.take("layer_types")
    use = cfg.take("use_sliding_window", False)
    first_windowed = cfg.take("max_window_layers", n_layers)
    if types is None:
        types = ["sliding_attention" if use and window and i >= first_windowed else "full_attention" for i in range(n_layers)]
    if len(types) != n_layers:
        cfg.error(
            "layer_types", f"layer_types lists {len(types)} layers, num_hidden_layers is {n_layers}", "list one type per layer"
        )
        return [None] * n_layers
    windows = []
    for i, kind in enumerate(types):
        if kind not in ("full_attention", "sliding_attention"):
            cfg.error(f"layer_types[{i}]", f"layer type '{kind}' is not an attention layer this model type has", None)
        windows.append(window if kind == "sliding_attention" else None)
    if any(w is not None for w in windows) and not window:
        cfg.error(
            "sliding_window", "layer_types names sliding-attention layers but sliding_window is not set", "set sliding_window"
        )
    return windows


def to_spec(cfg: HFConfig) -> Imported:
    model_type = cfg.model_type
    model = model_dims(cfg, default_max_len=2048)
    n_layers = cfg.need("num_hidden_layers")
    expect_silu(cfg)
    bias = bool(cfg.take("attention_bias", False))
    if model_type == "qwen2":  # Qwen2Attention: q, k and v always have biases, o never
        qkv_bias, out_bias = True, False
    else:
        qkv_bias = out_bias = bias
    base = attention(cfg, qkv_bias=qkv_bias, out_bias=out_bias, qk_norm=model_type == "qwen3")
    windows = _layer_windows(cfg, n_layers or 0)
    window = next((w for w in windows if w is not None), None)
    if window is None:
        mixers, mixer_layers = {"attn": base}, ["attn"] * len(windows)
    elif all(w is not None for w in windows):
        mixers, mixer_layers = {"attn": {**base, "window": window}}, ["attn"] * len(windows)
    else:  # qwen2/qwen3 with sliding windows on some layers only
        mixers = {"attn": base, "local": {**base, "window": window}}
        mixer_layers = ["attn" if w is None else "local" for w in windows]
    hidden = cfg.need("intermediate_size")
    ffn_bias = bool(cfg.take("mlp_bias", False))
    if model_type == "mixtral":
        cfg.expect("router_jitter_noise", (0, 0.0), 0.0, "the generated MoE router has no jitter noise")
        ffns = {
            "moe": {
                "kind": "moe",
                "n_experts": cfg.need("num_local_experts"),
                "top_k": cfg.need("num_experts_per_tok"),
                "expert": {"activation": "swiglu", "hidden": hidden},
                "load_balancing_weight": float(cfg.take("router_aux_loss_coef", 0.001)),
                "z_loss_weight": 0.0,
            }
        }
    else:
        ffns = {"mlp": {"kind": "mlp", "activation": "swiglu", "hidden": hidden, **({"bias": True} if ffn_bias else {})}}
    return Imported(model, mixers, ffns, mixer_layers, [next(iter(ffns))] * len(mixer_layers))


# ---------------------------------------------------------------------------------------------------- export
def to_hf(resolved: Any) -> dict[str, Any] | list[str]:
    from archgen.importers.export_checks import (
        attention_config,
        common_reasons,
        single_kind,
    )

    reasons = common_reasons(resolved)
    attn, why = single_kind(resolved, "mixers", "attention")
    reasons += why
    ffn, why = single_kind(resolved, "ffns", ("mlp", "moe"))
    reasons += why
    if reasons:
        return reasons
    attn, ffn_kind, ffn = attn.config, ffn.kind, ffn.config
    fields, reasons = attention_config(resolved, attn)
    if attn.qk_norm:
        reasons.append("qk-norm attention exports as qwen3, which export-spec does not write")
    if attn.qkv_bias != attn.out_bias:
        reasons.append("llama/mistral/mixtral bias q, k, v and o together (attention_bias); this spec biases only some")
    if ffn_kind == "mlp":
        if ffn.activation != "swiglu":
            reasons.append(f"the feed-forward is {ffn.activation}; llama/mistral use SwiGLU")
        model_type = "mistral" if attn.window else "llama"
        if ffn.bias and model_type == "mistral":
            reasons.append("mistral's MLP has no biases")
        fields["intermediate_size"] = ffn.hidden
        if model_type == "llama":
            fields["mlp_bias"] = ffn.bias
    else:
        model_type = "mixtral"
        expert = ffn.expert
        if expert.activation != "swiglu" or expert.bias:
            reasons.append("mixtral's experts are SwiGLU without biases")
        if ffn.shared_experts or not ffn.normalize_top_k or ffn.capacity_factor is not None:
            reasons.append("mixtral routes dropless top-k with renormalised weights and no shared experts")
        if ffn.z_loss_weight:
            reasons.append(f"mixtral has no router z-loss (z_loss_weight={ffn.z_loss_weight}); set it to 0")
        fields.update(
            intermediate_size=expert.hidden,
            num_local_experts=ffn.n_experts,
            num_experts_per_tok=ffn.top_k,
            router_aux_loss_coef=ffn.load_balancing_weight,
            router_jitter_noise=0.0,
        )
    if model_type == "llama":
        fields["attention_bias"] = attn.qkv_bias
    else:
        fields["sliding_window"] = attn.window
        if attn.qkv_bias:
            reasons.append(f"{model_type} has no attention biases")
    if reasons:
        return reasons
    architecture = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "mixtral": "MixtralForCausalLM"}[model_type]
    return {"architectures": [architecture], "model_type": model_type, **fields}


MODEL_TYPES = [
    ModelType(name, to_spec, weight_plans, to_hf=to_hf if name in ("llama", "mistral", "mixtral") else None)
    for name in ("llama", "mistral", "qwen2", "qwen3", "mixtral")
]
