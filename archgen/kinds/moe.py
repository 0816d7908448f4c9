"""Mixture of experts: a router, n_experts stacked expert weights (w_in, w_out), and optional shared experts fused as
one MLP whose hidden size is shared_experts × the expert hidden size, which computes the same sum.
"""

from __future__ import annotations

from dataclasses import dataclass

from archgen.errors import Diagnostic
from archgen.kinds.base import Dims, Kind
from archgen.kinds.mlp import KIND as MLP_KIND
from archgen.kinds.mlp import MLPConfig, check_shape, hidden_size, lock_shape
from archgen.spec import models


@dataclass(frozen=True)
class MoEConfig:
    n_experts: int
    top_k: int
    expert: MLPConfig  # one routed expert (no biases)
    shared_experts: int  # always-on experts of the same shape (DeepSeek-style)
    normalize_top_k: bool
    load_balancing_weight: float
    z_loss_weight: float
    capacity_factor: float | None  # None: dropless
    shared_hidden: int | None = None  # the shared experts' total hidden width; None: shared_experts × expert hidden
    shared_gate: bool = False  # the shared experts' output scaled per token by sigmoid(shared_expert_gate(x))

    @property
    def in_width(self) -> int:
        return 2 * self.expert.hidden if self.expert.gated else self.expert.hidden

    @property
    def shared(self) -> MLPConfig:
        """The shared experts as one MLP: their outputs sum, so one MLP of shared·hidden computes the same."""
        return MLPConfig(self.expert.activation, self.shared_hidden or self.expert.hidden * self.shared_experts, False)


class MoE(Kind[models.MoESpec, MoEConfig]):
    name = "moe"
    role = "ffn"
    template = "moe"
    colour = "#2a9d8f"
    produces_aux = True
    takes_pads = True

    def check(self, spec, path: str, model) -> list[Diagnostic]:
        problems = check_shape(spec.expert, f"{path}.expert")
        if spec.expert.bias:
            problems.append(Diagnostic(f"{path}.expert.bias",
                                       "biases in routed experts are not supported (the experts run as stacked weight matmuls)",
                                       "remove expert.bias, or set it to false"))
        if spec.shared_hidden is not None and not spec.shared_experts:
            problems.append(Diagnostic(f"{path}.shared_hidden", "shared_hidden is set but the layer has no shared experts",
                                       "set shared_experts: 1, or remove shared_hidden"))
        if spec.shared_gate and not spec.shared_experts:
            problems.append(Diagnostic(f"{path}.shared_gate", "shared_gate gates the shared experts, but the layer has none",
                                       "set shared_experts: 1, or remove shared_gate"))
        if spec.top_k > spec.n_experts:
            problems.append(Diagnostic(f"{path}.top_k", f"top_k={spec.top_k} exceeds n_experts={spec.n_experts}",
                                       f"use top_k between 1 and {spec.n_experts}"))
        return problems

    def resolve(self, spec, model) -> MoEConfig:
        expert = MLPConfig(spec.expert.activation, hidden_size(spec.expert, model.d_model), spec.expert.bias)
        return MoEConfig(spec.n_experts, spec.top_k, expert, spec.shared_experts, spec.normalize_top_k,
                         spec.load_balancing_weight, spec.z_loss_weight, spec.capacity_factor, spec.shared_hidden,
                         spec.shared_gate)

    def lock(self, spec, config: MoEConfig) -> dict:
        # Settings at their defaults are left out, so older specs keep their hash.
        unset = {key for key, default in (("shared_hidden", None), ("shared_gate", False)) if getattr(spec, key) == default}
        return spec.model_copy(update={"expert": lock_shape(spec.expert, config.expert.hidden)}).model_dump(
            mode="json", exclude=unset or None)

    def parameters(self, config: MoEConfig, dims: Dims) -> dict[str, tuple[int, ...]]:
        d, h, e = dims.d_model, config.expert.hidden, config.n_experts
        table = {"router.weight": (e, d), "w_in": (e, d, config.in_width), "w_out": (e, h, d)}
        if config.shared_experts:
            table.update({f"shared_expert.{k}": v for k, v in MLP_KIND.parameters(config.shared, dims).items()})
        if config.shared_gate:
            table["shared_expert_gate.weight"] = (1, d)
        return table

    def inactive_params(self, config: MoEConfig, dims: Dims) -> int:
        per_expert = dims.d_model * config.in_width + config.expert.hidden * dims.d_model
        return (config.n_experts - config.top_k) * per_expert

    def forward_flops(self, config: MoEConfig, dims: Dims, seq_len: int) -> int:
        router = 2 * seq_len * dims.d_model * config.n_experts
        routed = config.top_k * MLP_KIND.forward_flops(config.expert, dims, seq_len)
        shared = MLP_KIND.forward_flops(config.shared, dims, seq_len) if config.shared_experts else 0
        shared_gate = 2 * seq_len * dims.d_model if config.shared_gate else 0
        return router + routed + shared + shared_gate

    def activation_elements(self, config: MoEConfig, dims: Dims, seq_len: int) -> int:
        rows = seq_len * config.top_k
        return rows * (2 * dims.d_model + config.in_width + config.expert.hidden) + seq_len * config.n_experts

    def imports(self, config: MoEConfig) -> dict[str, tuple[str, ...]]:
        return {"moe": ("moe_forward", "moe_router")}

    def template_dims(self, config: MoEConfig, dims: Dims) -> dict:
        hidden = config.expert.hidden
        return {"d_model": dims.d_model, "hidden": hidden, "gated": config.expert.gated, "in_width": config.in_width,
                "n_experts": config.n_experts, "top_k": config.top_k, "shared_hidden": config.shared.hidden,
                "activation": config.expert.activation, "shared_experts": config.shared_experts,
                "capacity_factor": config.capacity_factor, "normalize_top_k": config.normalize_top_k,
                "load_balancing_weight": config.load_balancing_weight, "z_loss_weight": config.z_loss_weight,
                "shared_gate": config.shared_gate}

    def subcomponents(self, config: MoEConfig) -> list[tuple[str, str, MLPConfig]]:
        return [("shared", "mlp", config.shared)] if config.shared_experts else []


KIND = MoE()
