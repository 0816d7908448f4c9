"""Time-series forecaster head: a linear map from hidden states to logits over the value bins."""

from __future__ import annotations

from dataclasses import dataclass

from archgen.errors import Diagnostic
from archgen.kinds.base import Dims, Kind, Shape
from archgen.spec import models


@dataclass(frozen=True)
class ForecasterConfig:
    n_bins: int
    value_range: tuple[float, float]  # after mean scaling
    loss_weight: float


class Forecaster(Kind[models.ForecasterHeadSpec, ForecasterConfig]):
    name = "forecaster"
    role = "head"
    template = "heads/forecaster"
    colour = "#6d597a"

    def check(self, spec, path: str, model) -> list[Diagnostic]:
        problems = []
        if spec.value_range[0] >= spec.value_range[1]:
            problems.append(Diagnostic(f"{path}.value_range", f"value_range {list(spec.value_range)} is empty",
                                       "write [low, high] with low < high, e.g. [-15, 15]"))
        if spec.n_bins > model.vocab_size:
            # The series are fed back as the last n_bins token ids of the vocabulary.
            problems.append(Diagnostic(f"{path}.n_bins", f"n_bins={spec.n_bins} exceeds model.vocab_size={model.vocab_size}: "
                                       "each bin is read back as one of the vocabulary's token ids",
                                       f"use n_bins of at most {model.vocab_size}, or a larger vocabulary"))
        return problems

    def resolve(self, spec, model) -> ForecasterConfig:
        return ForecasterConfig(spec.n_bins, tuple(spec.value_range), spec.loss_weight)

    def imports(self, config: ForecasterConfig) -> dict[str, tuple[str, ...]]:
        return {"forecast": ("detokenize", "tokenize")}

    def template_dims(self, config: ForecasterConfig, dims: Dims) -> dict:
        return {"n_bins": config.n_bins, "low": config.value_range[0], "high": config.value_range[1],
                "first_series_id": dims.vocab_size - config.n_bins, "last_token_id": dims.vocab_size - 1,
                "loss_weight": config.loss_weight}

    def parameters(self, config: ForecasterConfig, dims: Dims) -> dict[str, tuple[int, ...]]:
        return {"proj.weight": (config.n_bins, dims.d_model), "proj.bias": (config.n_bins,)}

    def output_shape(self, config: ForecasterConfig, dims: Dims, inputs: list[Shape]) -> Shape:
        return ("B", inputs[0][1], config.n_bins)

    def forward_flops(self, config: ForecasterConfig, dims: Dims, seq_len: int) -> int:
        return seq_len * 2 * dims.d_model * config.n_bins


KIND = Forecaster()
