"""Pure state-space models: mamba (Mamba-1) and mamba2 (SSD). Layer i is `norm -> mixer -> residual` (no
feed-forward), archgen's block with `ffns: none`."""

from __future__ import annotations

import math
from typing import Any

from archgen.importers.common import Renamer, model_dims
from archgen.importers.config import HFConfig
from archgen.importers.model_types import Imported, ModelType
from archgen.importers.weights import TensorPlan

RENAME = Renamer(
    [
        (r"embed\.weight", "backbone.embeddings.weight"),
        (r"norm_f\.weight", "backbone.norm_f.weight"),
        (r"layers\.(\d+)\.mixer_norm\.weight", r"backbone.layers.\1.norm.weight"),
        (r"layers\.(\d+)\.mixer\.(.*)", r"backbone.layers.\1.mixer.\2"),
    ]
)


def weight_plans(expected: dict[str, tuple[int, ...]], resolved: Any) -> list[TensorPlan]:
    return [TensorPlan.copy(target, RENAME(target)) for target in expected]


def dt_limit(cfg: HFConfig, key: str = "time_step_limit") -> dict[str, float]:
    """transformers' (low, high) clamp of Δ as the mamba2 kind's dt_floor / dt_ceiling (each only where it binds)."""
    limit = cfg.take(key, [0.0, math.inf])
    if not isinstance(limit, (list, tuple)) or len(limit) != 2 or not 0 <= limit[0] < limit[1]:
        cfg.error(key, f"{key}={limit} is not a (low, high) bound on Δ", "write [low, high] with 0 <= low < high")
        return {}
    low, high = (float(x) for x in limit)
    return {**({"dt_floor": low} if low > 0 else {}), **({"dt_ceiling": high} if high < math.inf else {})}


def mamba_to_spec(cfg: HFConfig) -> Imported:
    model = model_dims(cfg, eps_key="layer_norm_epsilon", tie_default=True)
    n_layers = cfg.need("num_hidden_layers")
    cfg.expect("n_layer", (n_layers,), n_layers, "the original mamba configs' n_layer must agree with num_hidden_layers")
    cfg.expect("hidden_act", ("silu",), "silu", "archgen's Mamba gates with SiLU")
    d_model, expand = model["d_model"], cfg.need("expand")
    inner = cfg.take("intermediate_size", expand * d_model)
    if inner != expand * d_model:
        cfg.error(
            "intermediate_size",
            f"intermediate_size={inner} is not expand × hidden_size = {expand * d_model}",
            "archgen's mamba sizes d_inner as expand × d_model",
        )
    rank = cfg.take("time_step_rank", "auto")
    ssm: dict[str, Any] = {
        "kind": "mamba",
        "d_state": cfg.need("state_size"),
        "d_conv": cfg.take("conv_kernel", 4),
        "expand": expand,
        "dt_rank": "auto" if rank == "auto" or rank == math.ceil(d_model / 16) else rank,
        "conv_bias": bool(cfg.take("use_conv_bias", True)),
        "bias": bool(cfg.take("use_bias", False)),
        "dt_min": float(cfg.take("time_step_min", 0.001)),
        "dt_max": float(cfg.take("time_step_max", 0.1)),
    }
    return Imported(model, {"ssm": ssm}, {}, ["ssm"] * n_layers, ["none"] * n_layers)


def mamba2_mixer(cfg: HFConfig, keys: dict[str, str]) -> dict[str, Any]:
    """A Mamba-2 mixer from the fields named by `keys` (mamba2 and bamba spell them differently)."""
    n_groups = cfg.take(keys["n_groups"], 1)
    cfg.expect(keys["act"], ("silu",), "silu", "archgen's Mamba-2 gates with SiLU")
    return {
        "kind": "mamba2",
        "head_dim": cfg.need(keys["head_dim"]),
        "n_heads": cfg.need(keys["n_heads"]),
        "n_groups": n_groups,
        "d_state": cfg.need(keys["d_state"]),
        "d_conv": cfg.take(keys["d_conv"], 4),
        "expand": cfg.need(keys["expand"]),
        "chunk_size": cfg.take(keys["chunk_size"], 256),
        "conv_bias": bool(cfg.take(keys["conv_bias"], True)),
        "bias": bool(cfg.take(keys["bias"], False)),
        # transformers normalises the gated output per group (group_size = d_inner / n_groups)
        **({"grouped_norm": True} if n_groups > 1 else {}),
        **dt_limit(cfg),
    }


MAMBA2_KEYS = {
    "n_groups": "n_groups",
    "act": "hidden_act",
    "head_dim": "head_dim",
    "n_heads": "num_heads",
    "d_state": "state_size",
    "d_conv": "conv_kernel",
    "expand": "expand",
    "chunk_size": "chunk_size",
    "conv_bias": "use_conv_bias",
    "bias": "use_bias",
}


def mamba2_to_spec(cfg: HFConfig) -> Imported:
    model = model_dims(cfg, eps_key="layer_norm_epsilon", tie_default=False)
    n_layers = cfg.need("num_hidden_layers")
    cfg.accept("time_step_rank")  # Mamba2Config carries it, the Mamba-2 mixer never reads it
    cfg.expect("norm_before_gate", (False,), False, "archgen's mamba2 normalises y·SiLU(z), i.e. after the gate")
    cfg.expect("rms_norm", (True,), True, "archgen's mamba2 always has its gated RMSNorm")
    ssm = mamba2_mixer(cfg, MAMBA2_KEYS)
    return Imported(model, {"ssm": ssm}, {}, ["ssm"] * n_layers, ["none"] * n_layers)


# ---------------------------------------------------------------------------------------------------- export
def time_step_limit(ssm: Any) -> list[float]:
    return [ssm.dt_floor or 0.0, ssm.dt_ceiling or math.inf]


def _export(kind: str):
    def to_hf(resolved: Any) -> dict[str, Any] | list[str]:
        from archgen.importers.export_checks import common_reasons, single_kind

        reasons = common_reasons(resolved)
        ssm, why = single_kind(resolved, "mixers", kind)
        reasons += why
        if any(layer.ffn for layer in resolved.layers):
            reasons.append(f"a pure {kind} model has no feed-forward layers")
        if reasons:
            return reasons
        ssm = ssm.config
        model = resolved.model
        fields = {
            "hidden_size": model.d_model,
            "num_hidden_layers": resolved.n_layers,
            "vocab_size": model.vocab_size,
            "layer_norm_epsilon": model.norm.eps,
            "tie_word_embeddings": model.tie_embeddings,
            "initializer_range": model.init_std,
            "max_position_embeddings": model.max_seq_len,
            "hidden_act": "silu",
            "expand": ssm.expand,
            "conv_kernel": ssm.d_conv,
            "use_conv_bias": ssm.conv_bias,
            "use_bias": ssm.bias,
        }
        if kind == "mamba":
            fields.update(
                state_size=ssm.d_state,
                intermediate_size=ssm.expand * model.d_model,
                time_step_rank=ssm.dt_rank,
                time_step_min=ssm.dt_min,
                time_step_max=ssm.dt_max,
            )
            return {"architectures": ["MambaForCausalLM"], "model_type": "mamba", **fields}
        if ssm.n_groups > 1 and not ssm.grouped_norm:
            return ["transformers' mamba2 normalises per group when n_groups > 1; set grouped_norm: true (or n_groups: 1)"]
        fields.update(
            state_size=ssm.d_state,
            num_heads=ssm.n_heads,
            head_dim=ssm.head_dim,
            n_groups=ssm.n_groups,
            chunk_size=ssm.chunk_size,
            time_step_limit=time_step_limit(ssm),
        )
        return {"architectures": ["Mamba2ForCausalLM"], "model_type": "mamba2", **fields}

    return to_hf


MODEL_TYPES = [
    ModelType("mamba", mamba_to_spec, weight_plans, to_hf=_export("mamba")),
    ModelType("mamba2", mamba2_to_spec, weight_plans, to_hf=_export("mamba2")),
]
