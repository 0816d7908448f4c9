"""qwen3_next: Gated DeltaNet layers with gated attention every few layers, each followed by a mixture of experts with
a sigmoid-gated shared expert (or a dense MLP), all RMSNorms but the Gated DeltaNet's output norm zero-centred.

Layer i is `input_layernorm -> (linear_attn | self_attn) -> residual, post_attention_layernorm -> mlp -> residual`.
In the spec language: the model norm's `zero_centered` (scale by 1 + weight; attention's qk-norm follows it),
attention's `output_gate` (q_proj gives each head's query and its gate, interleaved per head, as in the checkpoint),
the moe kind's `shared_gate`, and the gated_deltanet kind, whose separate q/k/v/g/a/b projections are gathered back
from the checkpoint's fused in_proj_qkvz and in_proj_ba (interleaved per key head: [q, k, v, z] and [b, a]).
"""

from __future__ import annotations

from typing import Any

from archgen.importers.common import attention, block_weight_plans, expect_silu, layer_mixer, model_dims
from archgen.importers.config import HFConfig
from archgen.importers.model_types import Imported, ModelType
from archgen.importers.weights import Piece, TensorPlan

_FIXED = {"embed.weight": "model.embed_tokens.weight", "norm_f.weight": "model.norm.weight", "lm_head.weight": "lm_head.weight"}
LAYER_TYPES = {"linear_attention": "gdn", "full_attention": "attn"}
# Gated DeltaNet parameters -> where the checkpoint keeps them (the fused projections are gathered per key head)
_GDN = {"A_log": "A_log", "dt_bias": "dt_bias", "conv1d.weight": "conv1d.weight", "o_norm.weight": "norm.weight",
        "o_proj.weight": "out_proj.weight"}  # fmt: skip


def weight_plans(expected: dict[str, tuple[int, ...]], resolved: Any) -> list[TensorPlan]:
    def block_plan(target: str, shape: tuple[int, ...], layer: int, module: str, rest: str) -> TensorPlan:
        prefix = f"model.layers.{layer}"
        if module in ("mixer_norm", "ffn_norm"):
            norm = "input_layernorm" if module == "mixer_norm" else "post_attention_layernorm"
            return TensorPlan.copy(target, f"{prefix}.{norm}.{rest}")
        if module == "ffn":
            return _ffn_plan(target, shape, f"{prefix}.mlp", rest)
        mixer = layer_mixer(resolved, layer)
        if mixer.kind == "attention":
            return TensorPlan.copy(target, f"{prefix}.self_attn.{rest}")
        return _gdn_plan(target, f"{prefix}.linear_attn", rest, mixer.config)

    return block_weight_plans(expected, _FIXED, block_plan)


def _gdn_plan(target: str, prefix: str, rest: str, gdn: Any) -> TensorPlan:
    """q, k, v and the output gate g are rows of in_proj_qkvz, b and a rows of in_proj_ba, grouped per key head: head h
    holds [q_h (K), k_h (K), v (r·V), z (r·V)] and [b (r), a (r)] for its r = n_v_heads / n_heads value heads."""
    if rest in _GDN:
        return TensorPlan.copy(target, f"{prefix}.{_GDN[rest]}")
    K, r = gdn.head_dim, gdn.n_v_heads // gdn.n_heads
    rV = r * gdn.head_v_dim
    qkvz = {"q_proj.weight": (0, K), "k_proj.weight": (K, 2 * K), "v_proj.weight": (2 * K, 2 * K + rV),
            "g_proj.weight": (2 * K + rV, 2 * K + 2 * rV)}  # fmt: skip
    ba = {"b_proj.weight": (0, r), "a_proj.weight": (r, 2 * r)}
    if rest in qkvz:
        source, (start, stop), per_head = "in_proj_qkvz", qkvz[rest], 2 * K + 2 * rV
    elif rest in ba:
        source, (start, stop), per_head = "in_proj_ba", ba[rest], 2 * r
    else:  # a parameter this mapping does not know: the plan check names it
        return TensorPlan.copy(target, f"{prefix}.{rest}")
    pieces = tuple(
        Piece(f"{prefix}.{source}.weight", span=(h * per_head + start, h * per_head + stop)) for h in range(gdn.n_heads)
    )
    return TensorPlan(target, (pieces,), axis=0)


def _ffn_plan(target: str, shape: tuple[int, ...], prefix: str, rest: str) -> TensorPlan:
    """A dense MLP is copied; the moe kind's router, stacked experts, shared expert and its gate come from the
    per-expert tensors (w_in[e] = [gate_projᵀ | up_projᵀ], w_out[e] = down_projᵀ)."""
    if rest == "router.weight":
        return TensorPlan.copy(target, f"{prefix}.gate.weight")
    if rest == "w_in":
        rows = tuple(
            (Piece(f"{prefix}.experts.{e}.gate_proj.weight", True), Piece(f"{prefix}.experts.{e}.up_proj.weight", True))
            for e in range(shape[0])
        )
        return TensorPlan(target, rows, stacked=True)
    if rest == "w_out":
        rows = tuple((Piece(f"{prefix}.experts.{e}.down_proj.weight", True),) for e in range(shape[0]))
        return TensorPlan(target, rows, stacked=True)
    return TensorPlan.copy(target, f"{prefix}.{rest}")


def layer_kinds(cfg: HFConfig, n_layers: int) -> list[str]:
    """'gdn' or 'attn' per layer: layer_types, or (older configs) every full_attention_interval-th layer attention."""
    if cfg.has("layer_types"):
        cfg.accept("full_attention_interval")
        types = cfg.take("layer_types")
    else:
        interval = cfg.take("full_attention_interval", 4)
        types = ["full_attention" if (i + 1) % interval == 0 else "linear_attention" for i in range(n_layers)]
    if len(types) != n_layers:
        cfg.error("layer_types", f"layer_types lists {len(types)} layers, num_hidden_layers is {n_layers}", None)
    for i, kind in enumerate(types):
        if kind not in LAYER_TYPES:
            cfg.error(f"layer_types[{i}]", f"layer type '{kind}' is not a Qwen3-Next layer", f"use one of {sorted(LAYER_TYPES)}")
    return [LAYER_TYPES.get(kind, "gdn") for kind in types]


def gated_deltanet(cfg: HFConfig) -> dict[str, Any]:
    return {
        "kind": "gated_deltanet",
        "n_heads": cfg.need("linear_num_key_heads"),
        "head_dim": cfg.need("linear_key_head_dim"),
        "n_v_heads": cfg.need("linear_num_value_heads"),
        "head_v_dim": cfg.need("linear_value_head_dim"),
        "d_conv": cfg.take("linear_conv_kernel_dim", 4),
    }


def feed_forwards(cfg: HFConfig, n_layers: int) -> tuple[dict[str, dict[str, Any]], list[str]]:
    """Qwen3NextDecoderLayer: a mixture of experts where num_experts > 0, the layer is not in mlp_only_layers and
    (i + 1) is a multiple of decoder_sparse_step; a dense SwiGLU MLP elsewhere."""
    n_experts = cfg.take("num_experts", 512)
    dense_layers = set(cfg.take("mlp_only_layers") or [])
    step = cfg.take("decoder_sparse_step", 1)
    names = ["moe" if n_experts and i not in dense_layers and (i + 1) % step == 0 else "mlp" for i in range(n_layers)]
    ffns: dict[str, dict[str, Any]] = {}
    if "mlp" in names:
        ffns["mlp"] = {"kind": "mlp", "activation": "swiglu", "hidden": cfg.need("intermediate_size")}
    else:
        cfg.accept("intermediate_size")
    if "moe" in names:
        hidden = cfg.need("moe_intermediate_size")
        shared = cfg.need("shared_expert_intermediate_size")
        ffns["moe"] = {
            "kind": "moe",
            "n_experts": n_experts,
            "top_k": cfg.need("num_experts_per_tok"),
            "expert": {"activation": "swiglu", "hidden": hidden},
            "shared_experts": 1,
            **({"shared_hidden": shared} if shared != hidden else {}),
            "shared_gate": True,
            "normalize_top_k": bool(cfg.take("norm_topk_prob", True)),
            "load_balancing_weight": float(cfg.take("router_aux_loss_coef", 0.001)),
            "z_loss_weight": 0.0,
        }
    else:  # transformers builds no experts
        cfg.accept("moe_intermediate_size", "shared_expert_intermediate_size", "num_experts_per_tok", "norm_topk_prob",
                   "router_aux_loss_coef")  # fmt: skip
    return ffns, names


def to_spec(cfg: HFConfig) -> Imported:
    model = model_dims(cfg, default_max_len=32768)
    model["norm"]["zero_centered"] = True  # Qwen3NextRMSNorm: x̂ · (1 + weight)
    n_layers = cfg.need("num_hidden_layers")
    expect_silu(cfg)  # the MLPs, the experts and the Gated DeltaNet's convolution
    kinds = layer_kinds(cfg, n_layers or 0)
    mixers: dict[str, dict[str, Any]] = {}
    if "gdn" in kinds:
        mixers["gdn"] = gated_deltanet(cfg)
    else:
        cfg.accept("linear_num_key_heads", "linear_key_head_dim", "linear_num_value_heads", "linear_value_head_dim",
                   "linear_conv_kernel_dim")  # fmt: skip
    if "attn" in kinds:
        bias = bool(cfg.take("attention_bias", False))
        # partial_rotary_factor: Qwen3NextConfig rotates a quarter of each head unless the config says otherwise
        attn = attention(cfg, qkv_bias=bias, out_bias=bias, qk_norm=True, default_partial=0.25)
        mixers["attn"] = {**attn, "output_gate": True}
    else:
        cfg.accept("num_attention_heads", "num_key_value_heads", "head_dim", "attention_bias", "attention_dropout",
                   "rope_parameters", "rope_theta", "rope_scaling", "partial_rotary_factor")  # fmt: skip
    ffns, ffn_layers = feed_forwards(cfg, n_layers or 0)
    return Imported(model, mixers, ffns, kinds, ffn_layers)


def ignorable(name: str) -> bool:
    """The published checkpoints' multi-token-prediction layers (mtp.*), which transformers' causal LM does not load."""
    return name.startswith("mtp.") or name.endswith("rotary_emb.inv_freq")


MODEL_TYPES = [ModelType("qwen3_next", to_spec, weight_plans, ignorable=ignorable)]
