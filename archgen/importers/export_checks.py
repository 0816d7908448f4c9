"""What every export to a Hugging Face config needs to hold of a resolved spec, and the fields shared by the
attention model types. Each check returns the reasons a spec is not exactly the target model type."""

from __future__ import annotations

from typing import Any


def common_reasons(resolved: Any) -> list[str]:
    reasons = []
    if resolved.model.norm.kind != "rmsnorm":
        reasons.append(f"the model's norm is {resolved.model.norm.kind}; these model types use RMSNorm")
    for what in ("meta_tokens", "memory", "symbolic"):
        if getattr(resolved, what) is not None:
            reasons.append(f"the spec has {what}, which no transformers model type has")
    if resolved.heads:
        reasons.append(f"the spec has heads ({', '.join(resolved.heads)}), which the exported causal LM does not carry")
    if any(len(layer.mixers) > 1 for layer in resolved.layers):
        reasons.append("the spec has parallel mixers in one layer")
    for scalar in ("embedding_multiplier", "residual_multiplier", "logit_divisor"):
        if getattr(resolved.model, scalar) != 1.0:
            reasons.append(f"the spec's model.{scalar} is {getattr(resolved.model, scalar)}; these model types have none")
    if getattr(resolved.model.norm, "zero_centered", False):
        reasons.append("the model's norm is zero-centred (1 + weight); these model types scale by the weight")
    for family in ("mixers", "ffns"):
        for name, component in getattr(resolved, family).items():
            reasons += [f"{family}.{name}: {reason}" for reason in _unexported_settings(component, resolved.model.d_model)]
    return reasons


# Settings of the kinds (Falcon-H1's and Qwen3-Next's) that no exported model type has, with their neutral values.
_NEUTRAL = {"input_multiplier": 1.0, "output_multiplier": 1.0, "gate_multiplier": 1.0, "in_proj_multipliers": (1.0,) * 5,
            "output_norm": True, "output_gate": False, "shared_gate": False}  # fmt: skip


def _unexported_settings(component: Any, d_model: int) -> list[str]:
    config = component.config
    reasons = [
        f"{key} is {getattr(config, key)!r}; these model types have no such setting"
        for key, neutral in _NEUTRAL.items()
        if getattr(config, key, neutral) != neutral
    ]
    if component.kind == "mamba2" and config.d_inner != config.expand * d_model:
        reasons.append(f"d_inner is {config.d_inner}, not expand·d_model = {config.expand * d_model} (mamba_expand)")
    return reasons


def single_kind(resolved: Any, family: str, kinds: str | tuple[str, ...]) -> tuple[Any, list[str]]:
    """The one component of `family` ('mixers' or 'ffns') every layer uses, if it is of one of `kinds`: its resolved
    Component (kind and typed config)."""
    kinds = (kinds,) if isinstance(kinds, str) else kinds
    components = getattr(resolved, family)
    per_layer = [
        layer.mixers[0] if family == "mixers" and layer.mixers else (layer.ffn if family == "ffns" else None)
        for layer in resolved.layers
    ]
    if len(components) != 1 or any(name is None for name in per_layer):
        used = sorted({str(n) for n in per_layer})
        return None, [f"every layer must use the same one of {family} (of kind {' or '.join(kinds)}); the layers use {used}"]
    component = next(iter(components.values()))
    if component.kind not in kinds:
        return None, [f"the {family[:-1]} is of kind {component.kind}, not {' or '.join(kinds)}"]
    return component, []


def attention_config(resolved: Any, attn: Any) -> tuple[dict[str, Any], list[str]]:
    """The model-wide and attention fields shared by llama, mistral, mixtral and bamba."""
    model = resolved.model
    reasons = []
    fields: dict[str, Any] = {
        "hidden_size": model.d_model,
        "num_hidden_layers": resolved.n_layers,
        "vocab_size": model.vocab_size,
        "num_attention_heads": attn.n_heads,
        "num_key_value_heads": attn.n_kv_heads,
        "head_dim": attn.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": model.max_seq_len,
        "initializer_range": model.init_std,
        "rms_norm_eps": model.norm.eps,
        "tie_word_embeddings": model.tie_embeddings,
        "attention_dropout": 0.0,
    }
    if attn.softmax_scale is not None:
        reasons.append(f"the attention's softmax_scale is {attn.softmax_scale}; these model types scale by 1/sqrt(head_dim)")
    rope = attn.rope
    if rope is None:
        reasons.append("the attention has no RoPE; these model types always rotate")
        return fields, reasons
    # transformers 5 reads `rope_parameters`; 4.x read the flat keys, which 5 ignores where they disagree (Bamba's
    # partial_rotary_factor): write both, the same values.
    parameters: dict[str, Any] = {"rope_type": "default", "rope_theta": rope.theta}
    fields["rope_theta"] = rope.theta
    if rope.scaling == "linear":
        parameters.update(rope_type="linear", factor=rope.factor)
        fields["rope_scaling"] = {"rope_type": "linear", "factor": rope.factor}
    elif rope.scaling == "llama3":
        settings = dict(rope.settings)
        scaling = {
            "rope_type": "llama3",
            "factor": rope.factor,
            "original_max_position_embeddings": rope.original_max_position,
            "low_freq_factor": settings.get("low_freq_factor", 1.0),
            "high_freq_factor": settings.get("high_freq_factor", 4.0),
        }
        parameters.update(scaling)
        fields["rope_scaling"] = scaling
    elif rope.scaling == "yarn":
        scaling = {
            "rope_type": "yarn",
            "factor": rope.factor,
            "original_max_position_embeddings": rope.original_max_position,
            **dict(rope.settings),
        }
        parameters.update(scaling)
        fields["rope_scaling"] = scaling
    elif rope.scaling != "none":
        reasons.append(f"RoPE scaling '{rope.scaling}' is not exported (transformers has no NTK-aware static scaling)")
    if rope.rotary_dim != attn.head_dim:
        parameters["partial_rotary_factor"] = fields["partial_rotary_factor"] = rope.rotary_dim / attn.head_dim
    fields["rope_parameters"] = parameters
    return fields, reasons
