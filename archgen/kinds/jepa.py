"""JEPA world-model head: a mask embedding and an MLP predictor from context latents to target latents.

The target encoder is an exponential-moving-average copy of the backbone's modules whose weights are buffers (no
gradients), so it is not counted as parameters here. The target projection (latent_dim != d_model) is a parameter
that never trains: it sits on the no-grad target side.
"""

from __future__ import annotations

from dataclasses import dataclass

from archgen.kinds.base import Dims, Kind, Shape
from archgen.spec import models


@dataclass(frozen=True)
class JEPAConfig:
    predictor_layers: int
    predictor_hidden: int
    latent_dim: int
    mask_ratio: float
    ema_momentum: float
    l2_weight: float
    vicreg_invariance_weight: float
    vicreg_variance_weight: float
    vicreg_covariance_weight: float
    loss_weight: float

    @property
    def vicreg(self) -> bool:
        return self.vicreg_invariance_weight + self.vicreg_variance_weight + self.vicreg_covariance_weight > 0

    def predictor_widths(self, dims: Dims) -> list[int]:
        return [dims.d_model] + [self.predictor_hidden] * (self.predictor_layers - 1) + [self.latent_dim]


class JEPA(Kind[models.JEPAHeadSpec, JEPAConfig]):
    name = "jepa"
    role = "head"
    template = "heads/jepa"
    after_optimizer_step = "update_target"  # its _model template's method: the EMA target follows the backbone
    after_init_weights = "reset_target"  # and this one: the target starts as a copy of the initialised backbone
    backbone_passes_in_training = (1, 1)  # the masked context pass (trained) and the target encoder's (no gradient)
    colour = "#6d597a"

    def resolve(self, spec, model) -> JEPAConfig:
        d = model.d_model
        return JEPAConfig(spec.predictor_layers, spec.predictor_hidden or d, spec.latent_dim or d, spec.mask_ratio,
                          spec.ema_momentum, spec.l2_weight, spec.vicreg_invariance_weight, spec.vicreg_variance_weight,
                          spec.vicreg_covariance_weight, spec.loss_weight)

    def imports(self, config: JEPAConfig) -> dict[str, tuple[str, ...]]:
        names = ("EMATarget", "hidden_count", "hidden_rows", "random_mask")
        return {"jepa": (*names, *(("vicreg_terms",) if config.vicreg else ()))}

    def template_dims(self, config: JEPAConfig, dims: Dims) -> dict:
        widths = config.predictor_widths(dims)
        return {"widths": widths, "layers": [(widths[i], widths[i + 1]) for i in range(config.predictor_layers)],
                "latent_dim": config.latent_dim, "projected": config.latent_dim != dims.d_model,
                "mask_ratio": config.mask_ratio, "mask_percent": config.mask_ratio * 100, "vicreg": config.vicreg, **{
                    name: getattr(config, name) for name in ("ema_momentum", "l2_weight", "vicreg_invariance_weight",
                                                             "vicreg_variance_weight", "vicreg_covariance_weight",
                                                             "loss_weight")}}

    def parameters(self, config: JEPAConfig, dims: Dims) -> dict[str, tuple[int, ...]]:
        d = dims.d_model
        widths = config.predictor_widths(dims)
        table = {"mask_token.weight": (1, d)}  # an nn.Embedding of one row, so Model.init_weights covers it
        for i in range(config.predictor_layers):
            table[f"predictor.{i}.weight"] = (widths[i + 1], widths[i])
            table[f"predictor.{i}.bias"] = (widths[i + 1],)
        if config.latent_dim != d:
            table["target_projection.weight"] = (config.latent_dim, d)
        return table

    def output_shape(self, config: JEPAConfig, dims: Dims, inputs: list[Shape]) -> Shape:
        return ("B", inputs[0][1], config.latent_dim)

    def forward_flops(self, config: JEPAConfig, dims: Dims, seq_len: int) -> int:
        widths = config.predictor_widths(dims)
        return seq_len * sum(2 * widths[i] * widths[i + 1] for i in range(config.predictor_layers))


KIND = JEPA()
