"""Mamba-2 SSD: in_proj → (z, x, B, C, dt) → causal conv over x,B,C → chunked scan → gated RMSNorm → out_proj.

Falcon-H1's variants: an inner width of its own (d_inner), no output norm, and muP multipliers on
in_proj's input, each section of its output and out_proj's output (element-wise: not counted as FLOPs).
"""

from __future__ import annotations

from dataclasses import dataclass

from archgen.errors import Diagnostic
from archgen.kinds.base import Dims, Kind, divisors, multipliers_text
from archgen.spec import models


@dataclass(frozen=True)
class Mamba2Config:
    head_dim: int
    n_heads: int
    n_groups: int
    d_state: int
    d_conv: int
    expand: int
    chunk_size: int
    conv_bias: bool
    bias: bool
    grouped_norm: bool  # the gated RMSNorm normalises each of the n_groups channel groups on its own
    dt_floor: float | None  # Δ clamped from below ...
    dt_ceiling: float | None  # ... and from above; None: unbounded
    d_inner: int  # x, z and y channels: n_heads·head_dim
    output_norm: bool  # RMSNorm(y·SiLU(z)); False: y·SiLU(z)
    input_multiplier: float
    in_proj_multipliers: tuple[float, float, float, float, float]  # z, x, B, C, Δ
    output_multiplier: float

    def sizes(self, dims: Dims) -> tuple[int, int, int]:
        """(d_inner, conv channels: x, B and C, heads)."""
        return self.d_inner, self.d_inner + 2 * self.n_groups * self.d_state, self.n_heads


# Optional settings, left out of the lock at these values.
LOCK_DEFAULTS = {"dt_floor": None, "dt_ceiling": None, "d_inner": None, "output_norm": True, "input_multiplier": 1.0,
                 "in_proj_multipliers": models.InProjMultipliers(), "output_multiplier": 1.0}

# Counted as the recurrence it computes: per head-dim × state element and token, dt·x⊗B and a·h + b (3), h·C (2).
SCAN_FLOPS_PER_STATE = 5


class Mamba2(Kind[models.Mamba2Spec, Mamba2Config]):
    name = "mamba2"
    role = "mixer"
    template = "mamba2"
    colour = "#4062bb"
    has_cache = True
    takes_pads = True

    def check(self, spec, path: str, model) -> list[Diagnostic]:
        problems: list[Diagnostic] = []
        d_inner = spec.d_inner or spec.expand * model.d_model
        width = f"d_inner = {d_inner}" if spec.d_inner else f"d_inner = expand·d_model = {d_inner}"
        if spec.n_heads is None:
            if d_inner % spec.head_dim:
                options = ", ".join(str(d) for d in divisors(d_inner) if 8 <= d <= 256)
                problems.append(Diagnostic(f"{path}.head_dim", f"{width} is not divisible by head_dim={spec.head_dim}",
                                           f"use head_dim in {options}"))
                return problems
            n_heads = d_inner // spec.head_dim
        else:
            n_heads = spec.n_heads
            if n_heads * spec.head_dim != d_inner:
                problems.append(Diagnostic(f"{path}.n_heads",
                                           f"n_heads·head_dim = {n_heads}·{spec.head_dim} = {n_heads * spec.head_dim} "
                                           f"!= {width}",
                                           f"use n_heads={d_inner // spec.head_dim}" if d_inner % spec.head_dim == 0
                                           else "omit n_heads to derive it"))
        if spec.dt_floor is not None and spec.dt_ceiling is not None and spec.dt_floor >= spec.dt_ceiling:
            problems.append(Diagnostic(f"{path}.dt_ceiling", f"dt_ceiling={spec.dt_ceiling} must exceed dt_floor={spec.dt_floor}",
                                       "raise dt_ceiling, or remove one of the bounds"))
        if n_heads % spec.n_groups:
            options = ", ".join(map(str, divisors(n_heads)))
            problems.append(Diagnostic(f"{path}.n_groups", f"n_heads={n_heads} is not divisible by n_groups={spec.n_groups}",
                                       f"use n_groups in {options}"))
        return problems

    def resolve(self, spec, model) -> Mamba2Config:
        d_inner = spec.d_inner or spec.expand * model.d_model
        sections = spec.in_proj_multipliers
        return Mamba2Config(spec.head_dim, spec.n_heads or d_inner // spec.head_dim, spec.n_groups, spec.d_state, spec.d_conv,
                            spec.expand, spec.chunk_size, spec.conv_bias, spec.bias,
                            spec.grouped_norm and spec.n_groups > 1,  # one group: the same norm
                            spec.dt_floor, spec.dt_ceiling, d_inner, spec.output_norm, spec.input_multiplier,
                            (sections.z, sections.x, sections.B, sections.C, sections.dt), spec.output_multiplier)

    def lock(self, spec, config: Mamba2Config) -> dict:
        # Settings at their defaults (no Δ bound, d_inner = expand·d_model, Mamba-2's norm, no multiplier) are left
        # out, so specs written before they existed keep their hash.
        unset = {key for key, default in LOCK_DEFAULTS.items() if getattr(spec, key) == default}
        return spec.model_copy(update={"n_heads": config.n_heads, "grouped_norm": config.grouped_norm}).model_dump(
            mode="json", exclude=unset or None)

    def parameters(self, config: Mamba2Config, dims: Dims) -> dict[str, tuple[int, ...]]:
        d = dims.d_model
        di, conv_channels, h = config.sizes(dims)
        table = {"in_proj.weight": (di + conv_channels + h, d)}
        if config.bias:
            table["in_proj.bias"] = (di + conv_channels + h,)
        table["conv1d.weight"] = (conv_channels, 1, config.d_conv)
        if config.conv_bias:
            table["conv1d.bias"] = (conv_channels,)
        table.update({"dt_bias": (h,), "A_log": (h,), "D": (h,)})
        if config.output_norm:
            table["norm.weight"] = (di,)
        table["out_proj.weight"] = (d, di)
        if config.bias:
            table["out_proj.bias"] = (d,)
        return table

    def forward_flops(self, config: Mamba2Config, dims: Dims, seq_len: int) -> int:
        d = dims.d_model
        di, conv_channels, h = config.sizes(dims)
        per_token = (2 * d * (di + conv_channels + h) + 2 * conv_channels * config.d_conv
                     + SCAN_FLOPS_PER_STATE * di * config.d_state + 2 * di * d)
        return seq_len * per_token

    def cache_bytes(self, config: Mamba2Config, dims: Dims, context: int, itemsize: int) -> int:
        di, conv_channels, _ = config.sizes(dims)
        return conv_channels * (config.d_conv - 1) * itemsize + di * config.d_state * 4

    def activation_elements(self, config: Mamba2Config, dims: Dims, seq_len: int) -> int:
        di, conv_channels, h = config.sizes(dims)
        return seq_len * (di + conv_channels + h) * 2 + seq_len * di

    def imports(self, config: Mamba2Config) -> dict[str, tuple[str, ...]]:
        return {"ssd": ("Mamba2Cache", "mamba2_step", "ssd_scan"), "ssm": ("causal_conv1d",)}

    def template_dims(self, config: Mamba2Config, dims: Dims) -> dict:
        d_inner, conv_channels, n_heads = config.sizes(dims)
        return {"d_model": dims.d_model, "d_inner": d_inner, "conv_channels": conv_channels, "n_heads": n_heads,
                "head_dim": config.head_dim, "n_groups": config.n_groups, "d_state": config.d_state, "d_conv": config.d_conv,
                "chunk_size": config.chunk_size, "in_proj_out": d_inner + conv_channels + n_heads,
                "bc_width": config.n_groups * config.d_state, "bias": config.bias, "conv_bias": config.conv_bias,
                "norm_eps": dims.norm_eps,
                "norm_group": d_inner // config.n_groups if config.grouped_norm else None,
                "dt_floor": config.dt_floor, "dt_ceiling": config.dt_ceiling, "output_norm": config.output_norm,
                "input_multiplier": config.input_multiplier, "output_multiplier": config.output_multiplier,
                "in_proj_multipliers": config.in_proj_multipliers if set(config.in_proj_multipliers) != {1.0} else None,
                "in_proj_sections": (d_inner, d_inner, config.n_groups * config.d_state, config.n_groups * config.d_state,
                                     n_heads),
                "multipliers": multipliers_text(config.input_multiplier, config.output_multiplier,
                                                ("in_proj's (z, x, B, C, Δ)", config.in_proj_multipliers))}


KIND = Mamba2()
