"""falcon_h1: attention and Mamba-2 side by side in every layer, then a SwiGLU MLP, with muP multipliers throughout.

Layer i is `input_layernorm -> (ssm_out·mamba(h) + attn_out·self_attn(attn_in·h)) -> residual, pre_ff_layernorm ->
feed_forward -> residual`: archgen's parallel layer `ssm|attn` with `parallel_combine: sum`. The multipliers are the
kinds' own fields: the mamba2 mixer's input, in_proj sections (ssm_multipliers: z, x, B, C, Δ) and output; attention's
input and output; the MLP's gate and output. The key multiplier scales every attention score, so it is the attention's
softmax_scale (key_multiplier / sqrt(head_dim)); the logits' lm_head_multiplier is the model's logit_divisor
(its inverse). The Mamba-2 is mamba_d_ssm wide, and its output is gated by SiLU(z) with no norm unless mamba_rms_norm
(then RMSNorm(y·SiLU(z)) in n_groups groups; the norm before the gate, mamba_norm_before_gate, is refused: the
Mamba-2 decoding step gates inside its fused op).
"""

from __future__ import annotations

import math
from typing import Any

from archgen.importers.common import Renamer, attention, expect_silu, model_dims
from archgen.importers.config import HFConfig
from archgen.importers.model_types import Imported, ModelType
from archgen.importers.model_types.bamba import BAMBA_KEYS
from archgen.importers.model_types.mamba import mamba2_mixer
from archgen.importers.weights import TensorPlan

RENAME = Renamer(
    [
        (r"embed\.weight", "model.embed_tokens.weight"),
        (r"norm_f\.weight", "model.final_layernorm.weight"),
        (r"layers\.(\d+)\.mixer_norm\.weight", r"model.layers.\1.input_layernorm.weight"),
        (r"layers\.(\d+)\.ffn_norm\.weight", r"model.layers.\1.pre_ff_layernorm.weight"),
        (r"layers\.(\d+)\.mixer\.ssm\.(.*)", r"model.layers.\1.mamba.\2"),
        (r"layers\.(\d+)\.mixer\.attn\.(.*)", r"model.layers.\1.self_attn.\2"),
        (r"layers\.(\d+)\.ffn\.(.*)", r"model.layers.\1.feed_forward.\2"),
    ]
)
SSM_SECTIONS = ("z", "x", "B", "C", "dt")  # the order of ssm_multipliers (transformers' mup_vector)


def weight_plans(expected: dict[str, tuple[int, ...]], resolved: Any) -> list[TensorPlan]:
    return [TensorPlan.copy(target, RENAME(target)) for target in expected]


def multiplier(cfg: HFConfig, key: str, default: float = 1.0) -> float:
    value = float(cfg.take(key, default))
    if not 0 < value < math.inf:
        cfg.error(key, f"{key}={value} is outside the spec language", "only positive finite multipliers can be imported")
        return 1.0
    return value


def multipliers(cfg: HFConfig, key: str, names: tuple[str, ...]) -> dict[str, float]:
    values = cfg.take(key) or [1.0] * len(names)
    if not isinstance(values, list) or len(values) != len(names):
        cfg.error(key, f"{key}={values!r} is not a list of {len(names)} multipliers ({', '.join(names)})", None)
        return dict.fromkeys(names, 1.0)
    bad = [v for v in values if not isinstance(v, (int, float)) or not 0 < v < math.inf]
    if bad:
        cfg.error(key, f"{key} holds {bad[0]!r}, outside the spec language", "only positive finite multipliers can be imported")
        return dict.fromkeys(names, 1.0)
    return dict(zip(names, map(float, values), strict=True))


def ssm_mixer(cfg: HFConfig, d_model: int) -> dict[str, Any]:
    # FalconH1Config: an absent mamba_d_ssm is its default 1024, a null one expand·hidden_size.
    cfg.accept("mamba_d_ssm")
    d_inner = cfg.fields.get("mamba_d_ssm", 1024) or cfg.fields.get("mamba_expand", 2) * d_model
    if cfg.fields.get("mamba_d_head", "auto") == "auto":  # FalconH1Config: d_inner / mamba_n_heads
        cfg.fields["mamba_d_head"] = d_inner // cfg.fields.get("mamba_n_heads", 128)
    ssm = mamba2_mixer(cfg, BAMBA_KEYS)
    if ssm["n_heads"] * ssm["head_dim"] != d_inner:
        cfg.error(
            "mamba_n_heads",
            f"mamba_n_heads·mamba_d_head = {ssm['n_heads'] * ssm['head_dim']} is not mamba_d_ssm = {d_inner}",
            "transformers refuses this config too: make the heads tile mamba_d_ssm",
        )
    if d_inner != ssm["expand"] * d_model:
        del ssm["expand"]  # not read where d_inner is given
        ssm["d_inner"] = d_inner
    # FalconH1Mixer biases in_proj by mamba_proj_bias but out_proj by projectors_bias; the mamba2 kind has one bias.
    cfg.expect(
        "projectors_bias",
        (ssm["bias"],),
        ssm["bias"],
        f"the mamba2 kind biases in_proj and out_proj together, and mamba_proj_bias is {ssm['bias']}",
    )
    if not cfg.take("mamba_rms_norm", False):
        cfg.accept("mamba_norm_before_gate")  # read only with the norm
        ssm.pop("grouped_norm", None)
        ssm["output_norm"] = False
    else:
        cfg.expect(
            "mamba_norm_before_gate",
            (False,),
            True,  # FalconH1Config's default
            "the mamba2 kind normalises the gated output RMSNorm(y·SiLU(z)), not RMSNorm(y)·SiLU(z)",
        )
    scales = {
        "input_multiplier": multiplier(cfg, "ssm_in_multiplier"),
        "in_proj_multipliers": multipliers(cfg, "ssm_multipliers", SSM_SECTIONS),
        "output_multiplier": multiplier(cfg, "ssm_out_multiplier"),
    }
    if set(scales["in_proj_multipliers"].values()) == {1.0}:
        del scales["in_proj_multipliers"]
    return ssm | {key: value for key, value in scales.items() if value != 1.0}


def attention_mixer(cfg: HFConfig) -> dict[str, Any]:
    bias = bool(cfg.take("attention_bias", False))
    attn = attention(cfg, qkv_bias=bias, out_bias=bias)
    key_multiplier = multiplier(cfg, "key_multiplier")
    if key_multiplier != 1.0:  # q·(m·k) / sqrt(head_dim): every score scaled by m
        head_dim = attn.get("head_dim") or cfg.fields["hidden_size"] // attn["n_heads"]
        attn["softmax_scale"] = key_multiplier / math.sqrt(head_dim)
    for key, field in (("attention_in_multiplier", "input_multiplier"), ("attention_out_multiplier", "output_multiplier")):
        value = multiplier(cfg, key)
        if value != 1.0:
            attn[field] = value
    return attn


def to_spec(cfg: HFConfig) -> Imported:
    model = model_dims(cfg, default_max_len=8192)
    embedding = multiplier(cfg, "embedding_multiplier")
    if embedding != 1.0:
        model["embedding_multiplier"] = embedding
    lm_head = multiplier(cfg, "lm_head_multiplier")
    if lm_head != 1.0:
        model["logit_divisor"] = 1.0 / lm_head
    n_layers = cfg.need("num_hidden_layers")
    expect_silu(cfg)
    # Fields of older Falcon-H1 configs that transformers no longer reads: every layer has attention, Mamba-2 and the MLP.
    cfg.accept("attn_layer_indices", "mamba_use_mlp")
    mixers = {"ssm": ssm_mixer(cfg, model["d_model"]), "attn": attention_mixer(cfg)}
    gate, down = multipliers(cfg, "mlp_multipliers", ("gate", "down")).values()
    mlp = {"kind": "mlp", "activation": "swiglu", "hidden": cfg.need("intermediate_size")}
    if cfg.take("mlp_bias", False):
        mlp["bias"] = True
    if gate != 1.0:
        mlp["gate_multiplier"] = gate
    if down != 1.0:
        mlp["output_multiplier"] = down
    layout = {"n_layers": n_layers, "mixers": "ssm|attn", "ffns": "mlp", "parallel_combine": "sum"}
    return Imported(model, mixers, {"mlp": mlp}, ["ssm|attn"] * n_layers, ["mlp"] * n_layers, layout=layout)


MODEL_TYPES = [ModelType("falcon_h1", to_spec, weight_plans)]
