"""bamba: Mamba-2 layers with attention at `attn_layer_indices`, a SwiGLU MLP in every layer.

Layer i is `input_layernorm -> (mamba | self_attn) -> residual, pre_ff_layernorm -> feed_forward -> residual`.
"""

from __future__ import annotations

from typing import Any

from archgen.importers.common import attention, block_weight_plans, expect_silu, layer_mixer, model_dims
from archgen.importers.config import HFConfig
from archgen.importers.model_types import Imported, ModelType
from archgen.importers.model_types.mamba import mamba2_mixer, time_step_limit
from archgen.importers.weights import TensorPlan

BAMBA_KEYS = {
    "n_groups": "mamba_n_groups",
    "act": "hidden_act",
    "head_dim": "mamba_d_head",
    "n_heads": "mamba_n_heads",
    "d_state": "mamba_d_state",
    "d_conv": "mamba_d_conv",
    "expand": "mamba_expand",
    "chunk_size": "mamba_chunk_size",
    "conv_bias": "mamba_conv_bias",
    "bias": "mamba_proj_bias",
}
_FIXED = {
    "embed.weight": "model.embed_tokens.weight",
    "norm_f.weight": "model.final_layernorm.weight",
    "lm_head.weight": "lm_head.weight",
}


def weight_plans(expected: dict[str, tuple[int, ...]], resolved: Any) -> list[TensorPlan]:
    def block_plan(target: str, shape: tuple[int, ...], layer: int, module: str, rest: str) -> TensorPlan:
        if module == "mixer":
            hf_module = "self_attn" if layer_mixer(resolved, layer).kind == "attention" else "mamba"
        else:
            hf_module = {"mixer_norm": "input_layernorm", "ffn_norm": "pre_ff_layernorm", "ffn": "feed_forward"}[module]
        return TensorPlan.copy(target, f"model.layers.{layer}.{hf_module}.{rest}")

    return block_weight_plans(expected, _FIXED, block_plan)


def layer_kinds(cfg: HFConfig, n_layers: int) -> list[str]:
    """'attention' or 'mamba' per layer, from attn_layer_indices or layers_block_type / layer_types."""
    if cfg.has("attn_layer_indices"):
        cfg.accept("layers_block_type", "layer_types")
        indices = set(cfg.take("attn_layer_indices"))
        outside = sorted(i for i in indices if not 0 <= i < n_layers)
        if outside:
            cfg.error("attn_layer_indices", f"attention layers {outside} are outside the {n_layers} layers", None)
        return ["attention" if i in indices else "mamba" for i in range(n_layers)]
    key = "layers_block_type" if cfg.has("layers_block_type") else "layer_types"
    types = cfg.take(key) or ["linear_attention"] * n_layers
    names = {"full_attention": "attention", "attention": "attention", "linear_attention": "mamba", "mamba": "mamba"}
    for i, kind in enumerate(types):
        if kind not in names:
            cfg.error(f"{key}[{i}]", f"layer type '{kind}' is not a bamba layer", "use attention or mamba layers")
    return [names.get(kind, "mamba") for kind in types]


def to_spec(cfg: HFConfig) -> Imported:
    model = model_dims(cfg, default_max_len=2048)
    n_layers = cfg.need("num_hidden_layers")
    expect_silu(cfg)
    cfg.expect("z_loss_coefficient", (0, 0.0), 0.0, "archgen's language-model loss has no logit z-loss")
    bias = bool(cfg.take("attention_bias", False))
    attn = attention(cfg, qkv_bias=bias, out_bias=bias, default_partial=0.5)  # BambaConfig fixes 0.5 without a field
    ssm = mamba2_mixer(cfg, BAMBA_KEYS)
    kinds = layer_kinds(cfg, n_layers)
    mlp = {"kind": "mlp", "activation": "swiglu", "hidden": cfg.need("intermediate_size")}
    if cfg.take("mlp_bias", False):
        mlp["bias"] = True
    mixers = {"ssm": ssm, "attn": attn} if "attention" in kinds else {"ssm": ssm}
    return Imported(model, mixers, {"mlp": mlp}, ["attn" if k == "attention" else "ssm" for k in kinds], ["mlp"] * n_layers)


def to_hf(resolved: Any) -> dict[str, Any] | list[str]:
    from archgen.importers.export_checks import attention_config, common_reasons

    reasons = common_reasons(resolved)
    kinds = {name: component.kind for name, component in resolved.mixers.items()}
    ssm = next((c.config for c in resolved.mixers.values() if c.kind == "mamba2"), None)
    attn = next((c.config for c in resolved.mixers.values() if c.kind == "attention"), None)
    if ssm is None or sorted(kinds.values()) not in (["mamba2"], ["attention", "mamba2"]):
        reasons.append(f"bamba is one mamba2 mixer plus at most one attention mixer; this spec has {kinds}")
    ffns = list(resolved.ffns.values())
    if len(ffns) != 1 or any(layer.ffn is None or len(layer.mixers) != 1 for layer in resolved.layers):
        reasons.append("bamba has one mixer and the same MLP in every layer")
    if reasons:
        return reasons
    mlp = ffns[0].config
    if ffns[0].kind != "mlp" or mlp.activation != "swiglu":
        reasons.append("bamba's feed-forward is a SwiGLU MLP")
    if ssm.n_groups > 1 and not ssm.grouped_norm:
        reasons.append("transformers' Bamba normalises per group when n_groups > 1; set grouped_norm: true (or n_groups: 1)")
    fields: dict[str, Any] = {}
    if attn is not None:
        fields, why = attention_config(resolved, attn)
        reasons += why
        if attn.window is not None or attn.qk_norm or attn.qkv_bias != attn.out_bias:
            reasons.append("bamba's attention has no window or qk-norm, and biases q, k, v, o together")
        fields["attention_bias"] = attn.qkv_bias
    else:
        model = resolved.model
        fields = {
            "hidden_size": model.d_model,
            "num_hidden_layers": resolved.n_layers,
            "vocab_size": model.vocab_size,
            "rms_norm_eps": model.norm.eps,
            "tie_word_embeddings": model.tie_embeddings,
            "initializer_range": model.init_std,
            "max_position_embeddings": model.max_seq_len,
            "hidden_act": "silu",
        }
    if reasons:
        return reasons
    fields.update(
        intermediate_size=mlp.hidden,
        mlp_bias=mlp.bias,
        attn_layer_indices=[layer.index for layer in resolved.layers if resolved.mixers[layer.mixers[0]].kind == "attention"],
        mamba_n_heads=ssm.n_heads,
        mamba_d_head=ssm.head_dim,
        mamba_n_groups=ssm.n_groups,
        mamba_d_state=ssm.d_state,
        mamba_d_conv=ssm.d_conv,
        mamba_expand=ssm.expand,
        mamba_chunk_size=ssm.chunk_size,
        mamba_conv_bias=ssm.conv_bias,
        mamba_proj_bias=ssm.bias,
        time_step_limit=time_step_limit(ssm),
    )
    return {"architectures": ["BambaForCausalLM"], "model_type": "bamba", **fields}


MODEL_TYPES = [ModelType("bamba", to_spec, weight_plans, to_hf=to_hf)]
