"""Mamba-1 selective SSM: in_proj → causal depthwise conv + SiLU → x_proj (Δ, B, C) → dt_proj → scan → gate → out_proj."""

from __future__ import annotations

import math
from dataclasses import dataclass

from archgen.errors import Diagnostic
from archgen.kinds.base import Dims, Kind
from archgen.spec import models


@dataclass(frozen=True)
class MambaConfig:
    d_state: int
    d_conv: int
    expand: int
    dt_rank: int
    conv_bias: bool
    bias: bool  # in/out projection biases
    dt_min: float  # range of the initial step size
    dt_max: float
    inner_norms: bool  # Jamba: RMSNorms on Δ, B and C before the scan

    def d_inner(self, dims: Dims) -> int:
        return self.expand * dims.d_model


# Per channel and state element and token: exp(Δ·A) (1), Δ·B·x (2), a·h + b (2), C·h accumulated (2).
SCAN_FLOPS_PER_STATE = 7
# cuBLAS's Hopper GEMMs need rows of a multiple of 16 bytes, 8 values in bf16; x_proj's and dt_proj's rows are Δ's rank
# (plus B and C), which the paper's "auto" (d_model / 16) seldom makes one.
ROW_ALIGNMENT = 8


def padded_dt_rank(config: MambaConfig) -> int:
    """Δ's rank as the sequence path's products run it: rounded up to ROW_ALIGNMENT with zero weights, where that
    aligns x_proj's rows too (2·d_state a multiple of it) and no norm reads Δ at its true width (Jamba's)."""
    if config.inner_norms or 2 * config.d_state % ROW_ALIGNMENT:
        return config.dt_rank
    return -(-config.dt_rank // ROW_ALIGNMENT) * ROW_ALIGNMENT


class Mamba(Kind[models.MambaSpec, MambaConfig]):
    name = "mamba"
    role = "mixer"
    template = "mamba"
    colour = "#29335c"
    has_cache = True
    takes_pads = True

    def check(self, spec, path: str, model) -> list[Diagnostic]:
        if spec.dt_min >= spec.dt_max:
            return [Diagnostic(f"{path}.dt_min", f"dt_min={spec.dt_min} must be below dt_max={spec.dt_max}",
                               "swap them, or use the defaults 0.001 and 0.1")]
        return []

    def resolve(self, spec, model) -> MambaConfig:
        dt_rank = math.ceil(model.d_model / 16) if spec.dt_rank == "auto" else spec.dt_rank  # the paper's "auto"
        return MambaConfig(spec.d_state, spec.d_conv, spec.expand, dt_rank, spec.conv_bias, spec.bias, spec.dt_min, spec.dt_max,
                           spec.inner_norms)

    def lock(self, spec, config: MambaConfig) -> dict:
        # Absent means false: specs written before the field existed keep their hash.
        unset = None if spec.inner_norms else {"inner_norms"}
        return spec.model_copy(update={"dt_rank": config.dt_rank}).model_dump(mode="json", exclude=unset)

    def parameters(self, config: MambaConfig, dims: Dims) -> dict[str, tuple[int, ...]]:
        d, di, n, r = dims.d_model, config.d_inner(dims), config.d_state, config.dt_rank
        table = {"in_proj.weight": (2 * di, d)}
        if config.bias:
            table["in_proj.bias"] = (2 * di,)
        table["conv1d.weight"] = (di, 1, config.d_conv)
        if config.conv_bias:
            table["conv1d.bias"] = (di,)
        table.update({
            "x_proj.weight": (r + 2 * n, di),
            "dt_proj.weight": (di, r),
            "dt_proj.bias": (di,),
            "A_log": (di, n),
            "D": (di,),
            "out_proj.weight": (d, di),
        })
        if config.bias:
            table["out_proj.bias"] = (d,)
        if config.inner_norms:
            table.update({"dt_norm.weight": (r,), "b_norm.weight": (n,), "c_norm.weight": (n,)})
        return table

    def forward_flops(self, config: MambaConfig, dims: Dims, seq_len: int) -> int:
        d, di, n, r = dims.d_model, config.d_inner(dims), config.d_state, config.dt_rank
        per_token = (2 * d * 2 * di + 2 * di * config.d_conv + 2 * di * (r + 2 * n) + 2 * r * di
                     + SCAN_FLOPS_PER_STATE * di * n + 2 * di * d)
        return seq_len * per_token

    def cache_bytes(self, config: MambaConfig, dims: Dims, context: int, itemsize: int) -> int:
        di = config.d_inner(dims)
        return di * (config.d_conv - 1) * itemsize + di * config.d_state * 4  # the SSM state is kept in float32

    def activation_elements(self, config: MambaConfig, dims: Dims, seq_len: int) -> int:
        """x and z, the conv output, Δ, B, C and the output (the state lives in chunks, not over the whole sequence)."""
        return seq_len * (5 * config.d_inner(dims) + 2 * config.d_state)

    def imports(self, config: MambaConfig) -> dict[str, tuple[str, ...]]:
        return {"ssm": ("MambaCache", "causal_conv1d", "mamba_step_low_rank", "selective_scan")}

    def output_projection(self, config: MambaConfig) -> str | None:
        return "out_proj" if not config.bias else None

    def folds_input_norm(self, config: MambaConfig, kernels: dict) -> bool:
        """The fused in_proj and conv step (kernels/in_proj_conv.py) takes the norm."""
        return "in_proj_conv_step_" in kernels

    def template_dims(self, config: MambaConfig, dims: Dims) -> dict:
        return {"d_model": dims.d_model, "d_inner": config.d_inner(dims), "d_state": config.d_state, "d_conv": config.d_conv,
                "dt_rank": config.dt_rank, "padded_dt_rank": padded_dt_rank(config),
                "xproj_out": config.dt_rank + 2 * config.d_state,
                "in_proj_out": 2 * config.d_inner(dims), "bias": config.bias, "conv_bias": config.conv_bias,
                "dt_min": config.dt_min, "dt_max": config.dt_max, "max_seqlen": dims.max_seq_len,
                "inner_norms": config.inner_norms, "norm_eps": dims.norm_eps}


KIND = Mamba()
