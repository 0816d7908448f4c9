"""Pieces every model type shares: the model dims, rotary embeddings, attention, and name mapping helpers."""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from typing import Any

from archgen.importers.config import HFConfig
from archgen.importers.weights import TensorPlan

NO_DROPOUT = "archgen's generated models have no dropout"


def model_dims(
    cfg: HFConfig,
    *,
    eps_key: str = "rms_norm_eps",
    d_model_key: str = "hidden_size",
    default_max_len: int = 2048,
    tie_default: bool = False,
) -> dict[str, Any]:
    dims = {
        "d_model": cfg.need(d_model_key),
        "vocab_size": cfg.need("vocab_size"),
        "tie_embeddings": bool(cfg.take("tie_word_embeddings", tie_default)),
        "norm": {"kind": "rmsnorm", "eps": float(cfg.need(eps_key))},
        "max_seq_len": min(int(cfg.take("max_position_embeddings", default_max_len)), 2**24),
    }
    if cfg.has("initializer_range"):
        dims["init_std"] = float(cfg.take("initializer_range"))
    return dims


def rope(cfg: HFConfig, head_dim: int, default_partial: float = 1.0) -> dict[str, Any]:
    """RoPE settings from either spelling: transformers 5's `rope_parameters`, or `rope_theta` + `rope_scaling` +
    `partial_rotary_factor` (`default_partial` where the model type fixes it without a field, as Bamba's 0.5)."""
    if cfg.has("rope_parameters"):
        params = dict(cfg.take("rope_parameters"))
        field = "rope_parameters"
        cfg.accept("rope_theta", "rope_scaling", "partial_rotary_factor")  # older spellings transformers may also keep
    else:
        params = dict(cfg.take("rope_scaling") or {})
        field = "rope_scaling"
        params.setdefault("rope_theta", cfg.take("rope_theta", 10000.0))
        if cfg.has("partial_rotary_factor"):
            params["partial_rotary_factor"] = cfg.take("partial_rotary_factor")
    kind = params.pop("rope_type", None) or params.pop("type", None) or "default"
    params.pop("type", None)
    out: dict[str, Any] = {"theta": float(params.pop("rope_theta", 10000.0))}
    factor = params.pop("partial_rotary_factor", default_partial)
    if factor != 1.0:
        rotary = head_dim * factor
        if rotary != int(rotary) or int(rotary) % 2:
            cfg.error(
                f"{field}.partial_rotary_factor",
                f"partial_rotary_factor={factor} gives {rotary} rotary dims of a {head_dim}-dim head",
                "use a factor that gives an even number of dims",
            )
        out["rotary_dim"] = int(rotary)
    if kind == "linear":
        out["scaling"] = "linear"
        out["factor"] = float(params.pop("factor"))
    elif kind == "llama3":  # transformers requires every one of these settings
        out.update(scaling="llama3", factor=float(_required(cfg, field, params, "factor", 8.0)))
        out["original_max_position"] = int(_required(cfg, field, params, "original_max_position_embeddings", 8192))
        for key, default in (("low_freq_factor", 1.0), ("high_freq_factor", 4.0)):
            value = float(_required(cfg, field, params, key, default))
            if value != default:
                out[key] = value
    elif kind == "yarn":
        _yarn(cfg, field, params, out)
    elif kind != "default":
        cfg.error(
            f"{field}.rope_type",
            f"RoPE scaling '{kind}' is not one archgen reproduces exactly"
            + (" (its frequencies change with the length of each call)" if kind in ("dynamic", "longrope") else ""),
            "import a checkpoint with default, linear, llama3 or yarn RoPE scaling, or add the scaling to ops/attention.py",
        )
        params.clear()
    for key in sorted(params):
        cfg.error(
            f"{field}.{key}",
            f"the RoPE setting {key}={params[key]!r} is outside the spec language",
            "remove it if it has no effect, or extend archgen's rope",
        )
    return out


def _required(cfg: HFConfig, field: str, params: dict[str, Any], key: str, example: float) -> Any:
    value = params.pop(key, None)
    if value is None:
        cfg.error(f"{field}.{key}", f"{field} has no '{key}', which its rope_type needs", f"add it (e.g. {example})")
        return example
    return value


def _yarn(cfg: HFConfig, field: str, params: dict[str, Any], out: dict[str, Any]) -> None:
    """transformers' `_compute_yarn_parameters`: the spec's yarn with its defaults (beta_fast 32, beta_slow 1,
    truncated ramp ends, attention factor 0.1·ln(factor) + 1) written only where the config departs from them."""
    original = params.pop("original_max_position_embeddings", None)
    if original is None:
        cfg.error(
            f"{field}.original_max_position_embeddings",
            "YaRN scaling needs original_max_position_embeddings",
            "add the context length the model was trained at",
        )
        original = 1
    factor = params.pop("factor", None)
    if factor is None:  # transformers: the ratio of the extended to the original context
        factor = cfg.fields.get("max_position_embeddings", original) / original
    out.update(scaling="yarn", factor=float(factor), original_max_position=int(original))
    for key, default in (("beta_fast", 32.0), ("beta_slow", 1.0)):
        value = params.pop(key, None)
        if value and float(value) != default:  # transformers reads 0 and null as the default
            out[key] = float(value)
    attention_factor = params.pop("attention_factor", None)
    mscale, mscale_all_dim = params.pop("mscale", None), params.pop("mscale_all_dim", None)
    if attention_factor is None and mscale and mscale_all_dim:

        def magnitude(scale: float) -> float:
            return 1.0 if factor <= 1 else 0.1 * scale * math.log(factor) + 1.0

        attention_factor = magnitude(mscale) / magnitude(mscale_all_dim)
    if attention_factor is not None:
        out["attention_factor"] = float(attention_factor)
    if not params.pop("truncate", True):
        cfg.error(
            f"{field}.truncate",
            "YaRN with truncate: false (unrounded ramp ends) is outside the spec language",
            "only the rounded ramp of the YaRN paper (truncate: true) can be imported",
        )


def attention(
    cfg: HFConfig,
    *,
    default_partial: float = 1.0,
    qkv_bias: bool,
    out_bias: bool,
    qk_norm: bool = False,
    window: int | None = None,
    heads_key: str = "num_attention_heads",
    kv_key: str = "num_key_value_heads",
    with_rope: bool = True,
) -> dict[str, Any]:
    d_model = cfg.fields.get("hidden_size")
    n_heads = cfg.need(heads_key)
    head_dim = cfg.take("head_dim") or (d_model // n_heads if d_model and n_heads else None)
    cfg.expect("attention_dropout", (0, 0.0), 0.0, NO_DROPOUT)
    mixer: dict[str, Any] = {"kind": "attention", "n_heads": n_heads, "n_kv_heads": cfg.take(kv_key, n_heads)}
    if head_dim and (not d_model or head_dim * n_heads != d_model):  # written only where it is not d_model / n_heads
        mixer["head_dim"] = head_dim
    mixer["rope"] = rope(cfg, head_dim or 1, default_partial) if with_rope else None
    if window is not None:
        mixer["window"] = window
    if qk_norm:
        mixer["qk_norm"] = True
    if qkv_bias:
        mixer["qkv_bias"] = True
    if out_bias:
        mixer["out_bias"] = True
    return mixer


def expect_silu(cfg: HFConfig, key: str = "hidden_act") -> None:
    cfg.expect(key, ("silu", "swish"), "silu", "the gated feed-forward of this model type is SwiGLU in archgen")


class Renamer:
    """archgen parameter names -> checkpoint names, by an ordered list of (regex, replacement)."""

    def __init__(self, rules: list[tuple[str, str]]):
        self.rules = [(re.compile(pattern), replacement) for pattern, replacement in rules]

    def __call__(self, target: str) -> str:
        for pattern, replacement in self.rules:
            if pattern.fullmatch(target):
                return pattern.sub(replacement, target)
        return target


_BLOCK_PARAMETER = re.compile(r"layers\.(\d+)\.(mixer_norm|ffn_norm|mixer|ffn)\.(.*)")

BlockPlan = Callable[[str, tuple[int, ...], int, str, str], TensorPlan]
"""(target, shape, layer, module, rest) -> the plan of one block parameter `layers.<layer>.<module>.<rest>`, module
one of mixer_norm, ffn_norm, mixer, ffn."""


def block_weight_plans(expected: dict[str, tuple[int, ...]], model_level: dict[str, str], block_plan: BlockPlan
                       ) -> list[TensorPlan]:
    """A TensorPlan for every parameter the generated model expects: a block's from `block_plan`, any other copied
    from the checkpoint tensor model_level names (the embedding, the final norm), else from the same name."""
    plans = []
    for target, shape in expected.items():
        if match := _BLOCK_PARAMETER.fullmatch(target):
            layer, module, rest = match.groups()
            plans.append(block_plan(target, shape, int(layer), module, rest))
        else:
            plans.append(TensorPlan.copy(target, model_level.get(target, target)))
    return plans


def layer_mixer(resolved: Any, layer: int) -> Any:
    """The resolved spec's mixer component of `layer` (its first, for the importers' one-mixer layers)."""
    return resolved.mixers[resolved.layers[layer].mixers[0]]
