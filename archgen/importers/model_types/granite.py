"""granitemoehybrid (Granite 4.0-H): Bamba's Mamba-2 and attention layers, each followed by a mixture of experts plus
an always-on shared SwiGLU MLP of its own width, with Granite's scalars.

Layer i is `input_layernorm -> (mamba | self_attn) -> × residual_multiplier -> residual, post_attention_layernorm ->
block_sparse_moe + shared_mlp -> × residual_multiplier -> residual`; the embeddings are multiplied by
embedding_multiplier, the logits divided by logits_scaling, and attention scores scaled by attention_multiplier
instead of 1/sqrt(head_dim). Routing is top-k of the router logits with a softmax over the k chosen, which is the
moe kind's softmax over all experts renormalised over the top k. Without experts (num_local_experts 0) the
feed-forward is the shared MLP alone.
"""

from __future__ import annotations

from typing import Any

from archgen.importers.common import attention, block_weight_plans, expect_silu, layer_mixer, model_dims
from archgen.importers.config import HFConfig
from archgen.importers.model_types import Imported, ModelType
from archgen.importers.model_types.bamba import BAMBA_KEYS
from archgen.importers.model_types.mamba import mamba2_mixer
from archgen.importers.weights import Piece, TensorPlan

_FIXED = {"embed.weight": "model.embed_tokens.weight", "norm_f.weight": "model.norm.weight", "lm_head.weight": "lm_head.weight"}
LAYER_TYPES = {"linear_attention": "mamba", "mamba": "mamba", "full_attention": "attention", "attention": "attention"}


def weight_plans(expected: dict[str, tuple[int, ...]], resolved: Any) -> list[TensorPlan]:
    def block_plan(target: str, shape: tuple[int, ...], layer: int, module: str, rest: str) -> TensorPlan:
        prefix = f"model.layers.{layer}"
        if module in ("mixer_norm", "ffn_norm"):
            norm = "input_layernorm" if module == "mixer_norm" else "post_attention_layernorm"
            return TensorPlan.copy(target, f"{prefix}.{norm}.{rest}")
        if module == "mixer":
            mixer = "self_attn" if layer_mixer(resolved, layer).kind == "attention" else "mamba"
            return TensorPlan.copy(target, f"{prefix}.{mixer}.{rest}")
        return _ffn_plan(target, shape, prefix, rest)

    return block_weight_plans(expected, _FIXED, block_plan)


def _ffn_plan(target: str, shape: tuple[int, ...], prefix: str, rest: str) -> TensorPlan:
    """The moe kind's router, stacked experts and shared MLP (or a plain MLP: the shared MLP alone)."""
    moe = f"{prefix}.block_sparse_moe"
    if rest == "router.weight":
        return TensorPlan.copy(target, f"{moe}.router.layer.weight")
    if rest in ("w_in", "w_out"):  # (E, d, 2h) = input_linear[e]ᵀ, [gate | up]; (E, h, d) = output_linear[e]ᵀ
        source = f"{moe}.{'input_linear' if rest == 'w_in' else 'output_linear'}.weight"
        return TensorPlan(target, tuple((Piece(source, True, select=e),) for e in range(shape[0])), stacked=True)
    rest = rest.removeprefix("shared_expert.")
    hidden = shape[0]  # gate_proj / up_proj are (h, d): the halves of input_linear (2h, d), gate first
    if rest == "gate_proj.weight":
        return TensorPlan(target, ((Piece(f"{prefix}.shared_mlp.input_linear.weight", span=(0, hidden)),),))
    if rest == "up_proj.weight":
        return TensorPlan(target, ((Piece(f"{prefix}.shared_mlp.input_linear.weight", span=(hidden, 2 * hidden)),),))
    return TensorPlan.copy(target, f"{prefix}.shared_mlp.output_linear.weight" if rest == "down_proj.weight" else target)


def to_spec(cfg: HFConfig) -> Imported:
    model = model_dims(cfg, default_max_len=2048)
    for key, field in (
        ("embedding_multiplier", "embedding_multiplier"),
        ("residual_multiplier", "residual_multiplier"),
        ("logits_scaling", "logit_divisor"),
    ):
        value = float(cfg.take(key, 1.0))
        if value <= 0:
            cfg.error(key, f"{key}={value} is outside the spec language", "only positive multipliers can be imported")
        elif value != 1.0:
            model[field] = value
    n_layers = cfg.need("num_hidden_layers")
    expect_silu(cfg)
    cfg.expect("normalization_function", ("rmsnorm",), "rmsnorm", "transformers' Granite normalises with RMSNorm only")
    kinds = []
    for i, kind in enumerate(cfg.take("layer_types") or ["linear_attention"] * (n_layers or 0)):
        if kind not in LAYER_TYPES:
            cfg.error(f"layer_types[{i}]", f"layer type '{kind}' is not a GraniteMoeHybrid layer", "use mamba or attention")
        kinds.append(LAYER_TYPES.get(kind, "mamba"))
    cfg.accept("layers_block_type")  # the same list under its other name
    if len(kinds) != n_layers:
        cfg.error("layer_types", f"layer_types lists {len(kinds)} layers, num_hidden_layers is {n_layers}", None)
    mixers: dict[str, dict[str, Any]] = {}
    if "mamba" in kinds:
        n_heads = cfg.need("mamba_n_heads")
        if cfg.fields.get("mamba_d_head") == "auto":  # GraniteMoeHybridConfig: expand·hidden_size / mamba_n_heads
            cfg.fields["mamba_d_head"] = cfg.fields.get("mamba_expand", 2) * model["d_model"] // n_heads
        mixers["ssm"] = mamba2_mixer(cfg, BAMBA_KEYS)
    if "attention" in kinds:
        rope = cfg.take("position_embedding_type")
        if rope != "rope":
            # transformers builds no rotary embedding unless position_embedding_type is "rope" (Granite 4.0-H: nope)
            cfg.accept("rope_parameters", "rope_theta", "rope_scaling", "partial_rotary_factor")
        bias = bool(cfg.take("attention_bias", False))
        attn = attention(cfg, qkv_bias=bias, out_bias=bias, with_rope=rope == "rope")
        attn["softmax_scale"] = float(cfg.take("attention_multiplier", 1.0))
        mixers["attn"] = attn
    else:
        cfg.accept(
            "num_attention_heads", "num_key_value_heads", "attention_bias", "attention_dropout", "attention_multiplier",
            "position_embedding_type", "rope_parameters", "rope_theta",
        )  # fmt: skip
    n_experts = cfg.take("num_local_experts", 8)
    shared = {"activation": "swiglu", "hidden": cfg.need("shared_intermediate_size")}
    if n_experts:
        ffn = {
            "kind": "moe",
            "n_experts": n_experts,
            "top_k": cfg.need("num_experts_per_tok"),
            "expert": {"activation": "swiglu", "hidden": cfg.need("intermediate_size")},
            "shared_experts": 1,
            "shared_hidden": shared["hidden"],
            "load_balancing_weight": float(cfg.take("router_aux_loss_coef", 0.001)),
            "z_loss_weight": 0.0,
        }
    else:  # transformers builds no experts: the shared MLP is the whole feed-forward
        cfg.accept("num_experts_per_tok", "intermediate_size", "router_aux_loss_coef")
        ffn = {"kind": "mlp", **shared}
    mixer_layers = ["attn" if kind == "attention" else "ssm" for kind in kinds]
    return Imported(model, mixers, {"ffn": ffn}, mixer_layers, ["ffn"] * len(kinds))


MODEL_TYPES = [ModelType("granitemoehybrid", to_spec, weight_plans)]
