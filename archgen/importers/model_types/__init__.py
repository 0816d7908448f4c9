"""One module per family of Hugging Face model types; each declares the `ModelType`s it reads (and writes)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from archgen.importers.config import HFConfig
from archgen.importers.weights import TensorPlan


@dataclass(frozen=True)
class Imported:
    """What a model type's config says, in the spec language: one mixer and one feed-forward name per layer."""

    model: dict[str, Any]
    mixers: dict[str, dict[str, Any]]
    ffns: dict[str, dict[str, Any]]
    mixer_layers: list[str]  # 'none' for a layer without a mixer
    ffn_layers: list[str]  # 'none' for a layer without a feed-forward
    notes: list[str] = field(default_factory=list)  # lines for the spec's description
    # the spec's layout where a form other than patterns of mixer_layers / ffn_layers reads better (Megatron's string)
    layout: dict[str, Any] | None = None


@dataclass(frozen=True)
class ModelType:
    name: str  # the config's model_type
    to_spec: Callable[[HFConfig], Imported]
    # (the generated model's parameter table, resolved spec) -> how each parameter is made from checkpoint tensors
    weight_plans: Callable[[dict[str, tuple[int, ...]], Any], list[TensorPlan]]
    # checkpoint tensors that hold nothing the generated model needs (e.g. RoPE tables cached by old checkpoints)
    ignorable: Callable[[str], bool] = lambda name: name.endswith("rotary_emb.inv_freq")
    # resolved spec -> the config.json fields of this model type, or a list of reasons it is not one (export-spec)
    to_hf: Callable[[Any], dict[str, Any] | list[str]] | None = None


def registry() -> dict[str, ModelType]:
    from archgen.importers.model_types import bamba, decoder, falcon_h1, granite, jamba, mamba, nemotron, qwen3_next

    families = (decoder, mamba, bamba, jamba, nemotron, granite, falcon_h1, qwen3_next)
    types = [model_type for family in families for model_type in family.MODEL_TYPES]
    return {t.name: t for t in types}


def blocked() -> dict[str, str]:
    from archgen.importers.model_types.blocked import BLOCKED

    return BLOCKED
