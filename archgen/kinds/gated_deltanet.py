"""Gated DeltaNet: q/k/v/a/b(/g) projections → causal depthwise conv + SiLU on q, k, v → L2-normalised q, k → the
gated delta rule (chunked; one recurrent step when decoding) → per-head RMSNorm gated by SiLU(g) → o_proj.

The layer of flash-linear-attention's GatedDeltaNet and Qwen3-Next's linear-attention layers, with one convolution
over q, k and v concatenated (as Qwen3-Next has it; per channel it is the same as three). Per value head h:
    α_t = exp(g_t),  g_t = −exp(A_log[h]) · softplus(a_t + dt_bias[h])     β_t = sigmoid(b_t)  (2·sigmoid with
    allow_neg_eigval),  S_t = α_t (I − β_t k_t k_tᵀ) S_(t-1) + β_t k_t v_tᵀ,  o_t = S_tᵀ q_t / √K
"""

from __future__ import annotations

from dataclasses import dataclass

from archgen.errors import Diagnostic
from archgen.kinds.base import Dims, Kind, divisors
from archgen.spec import models


@dataclass(frozen=True)
class GatedDeltaNetConfig:
    n_heads: int  # query/key heads H
    head_dim: int  # K
    n_v_heads: int  # value heads HV, a multiple of H
    head_v_dim: int  # V
    d_conv: int
    conv_bias: bool
    output_gate: bool
    allow_neg_eigval: bool
    chunk_size: int

    @property
    def key_dim(self) -> int:
        return self.n_heads * self.head_dim

    @property
    def value_dim(self) -> int:
        return self.n_v_heads * self.head_v_dim

    @property
    def conv_channels(self) -> int:
        """q, k and v, concatenated in that order, go through one depthwise convolution."""
        return 2 * self.key_dim + self.value_dim

    @property
    def state_elements(self) -> int:
        """The recurrent state: one K × V matrix per value head."""
        return self.n_v_heads * self.head_dim * self.head_v_dim


# Counted as the recurrence it computes, per state element and token: α·S (1), Sᵀk (2), S + k·uᵀ (2), Sᵀq (2).
# The chunked algorithm does this work as matmuls (plus its L×L intra-chunk products); the count is the recurrence's.
RECURRENCE_FLOPS_PER_STATE = 7

class GatedDeltaNet(Kind[models.GatedDeltaNetSpec, GatedDeltaNetConfig]):
    name = "gated_deltanet"
    role = "mixer"
    template = "gated_deltanet"
    colour = "#2a9d8f"
    has_cache = True
    takes_pads = True

    def check(self, spec, path: str, model) -> list[Diagnostic]:
        n_v_heads = spec.n_v_heads or spec.n_heads
        if n_v_heads % spec.n_heads:
            multiples = ", ".join(str(spec.n_heads * m) for m in range(1, 5))
            fewer = ", ".join(map(str, divisors(n_v_heads)))
            return [Diagnostic(f"{path}.n_v_heads",
                               f"n_v_heads={n_v_heads} is not a multiple of n_heads={spec.n_heads} (each value head "
                               "reads one query/key head)",
                               f"use n_v_heads in {multiples}, or n_heads in {fewer}")]
        return []

    def resolve(self, spec, model) -> GatedDeltaNetConfig:
        return GatedDeltaNetConfig(
            n_heads=spec.n_heads, head_dim=spec.head_dim, n_v_heads=spec.n_v_heads or spec.n_heads,
            head_v_dim=spec.head_v_dim or spec.head_dim, d_conv=spec.d_conv, conv_bias=spec.conv_bias,
            output_gate=spec.output_gate, allow_neg_eigval=spec.allow_neg_eigval, chunk_size=spec.chunk_size,
        )

    def lock(self, spec, config: GatedDeltaNetConfig) -> dict:
        return spec.model_copy(update={"n_v_heads": config.n_v_heads, "head_v_dim": config.head_v_dim}).model_dump(mode="json")

    def parameters(self, config: GatedDeltaNetConfig, dims: Dims) -> dict[str, tuple[int, ...]]:
        d, hv = dims.d_model, config.n_v_heads
        table = {
            "q_proj.weight": (config.key_dim, d),
            "k_proj.weight": (config.key_dim, d),
            "v_proj.weight": (config.value_dim, d),
            "a_proj.weight": (hv, d),
            "b_proj.weight": (hv, d),
        }
        if config.output_gate:
            table["g_proj.weight"] = (config.value_dim, d)
        table["conv1d.weight"] = (config.conv_channels, 1, config.d_conv)
        if config.conv_bias:
            table["conv1d.bias"] = (config.conv_channels,)
        table.update({"A_log": (hv,), "dt_bias": (hv,), "o_norm.weight": (config.head_v_dim,),
                      "o_proj.weight": (d, config.value_dim)})
        return table

    def forward_flops(self, config: GatedDeltaNetConfig, dims: Dims, seq_len: int) -> int:
        d = dims.d_model
        projected = config.conv_channels + 2 * config.n_v_heads + (config.value_dim if config.output_gate else 0)
        per_token = (2 * d * projected + 2 * config.conv_channels * config.d_conv
                     + RECURRENCE_FLOPS_PER_STATE * config.state_elements + 2 * config.value_dim * d)
        return seq_len * per_token

    def cache_bytes(self, config: GatedDeltaNetConfig, dims: Dims, context: int, itemsize: int) -> int:
        """The conv's last d_conv - 1 inputs in the model dtype and the state in float32, whatever the context."""
        return config.conv_channels * (config.d_conv - 1) * itemsize + config.state_elements * 4

    def activation_elements(self, config: GatedDeltaNetConfig, dims: Dims, seq_len: int) -> int:
        """q, k, v before and after the conv, a, b, the gate and the output (the states live per chunk)."""
        gate = config.value_dim if config.output_gate else 0
        return seq_len * (2 * config.conv_channels + 2 * config.n_v_heads + gate + config.value_dim)

    def imports(self, config: GatedDeltaNetConfig) -> dict[str, tuple[str, ...]]:
        return {"gated_delta": ("GatedDeltaCache", "gated_delta_rule", "gated_delta_step", "l2_normalize"),
                "ssm": ("causal_conv1d",)}

    def template_dims(self, config: GatedDeltaNetConfig, dims: Dims) -> dict:
        return {
            "d_model": dims.d_model, "n_heads": config.n_heads, "head_dim": config.head_dim,
            "n_v_heads": config.n_v_heads, "head_v_dim": config.head_v_dim, "key_dim": config.key_dim,
            "value_dim": config.value_dim, "conv_channels": config.conv_channels, "d_conv": config.d_conv,
            "conv_bias": config.conv_bias, "output_gate": config.output_gate,
            "beta_scale": 2.0 if config.allow_neg_eigval else 1.0, "chunk_size": config.chunk_size,
            "max_seqlen": dims.max_seq_len, "norm_eps": dims.norm_eps,
        }


KIND = GatedDeltaNet()
