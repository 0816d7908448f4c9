"""Mamba-2 SSD: in_proj → (z, x, B, C, dt) → causal conv over x,B,C → chunked scan → gated RMSNorm → out_proj."""

from __future__ import annotations

from dataclasses import dataclass

from archgen.errors import Diagnostic
from archgen.kinds.base import Dims, Kind, divisors
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
    dt_floor: float | None = None  # Δ clamped from below ...
    dt_ceiling: float | None = None  # ... and from above; None: unbounded

    def sizes(self, dims: Dims) -> tuple[int, int, int]:
        """(d_inner, conv channels: x, B and C, heads)."""
        d_inner = self.expand * dims.d_model
        return d_inner, d_inner + 2 * self.n_groups * self.d_state, self.n_heads


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
        d_inner = spec.expand * model.d_model
        if spec.n_heads is None:
            if d_inner % spec.head_dim:
                options = ", ".join(str(d) for d in divisors(d_inner) if 8 <= d <= 256)
                problems.append(Diagnostic(f"{path}.head_dim",
                                           f"d_inner = expand·d_model = {d_inner} is not divisible by head_dim={spec.head_dim}",
                                           f"use head_dim in {options}"))
                return problems
            n_heads = d_inner // spec.head_dim
        else:
            n_heads = spec.n_heads
            if n_heads * spec.head_dim != d_inner:
                problems.append(Diagnostic(f"{path}.n_heads",
                                           f"n_heads·head_dim = {n_heads}·{spec.head_dim} = {n_heads * spec.head_dim} "
                                           f"!= d_inner = expand·d_model = {d_inner}",
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
        n_heads = spec.n_heads or spec.expand * model.d_model // spec.head_dim
        return Mamba2Config(spec.head_dim, n_heads, spec.n_groups, spec.d_state, spec.d_conv, spec.expand, spec.chunk_size,
                            spec.conv_bias, spec.bias, spec.grouped_norm and spec.n_groups > 1,  # one group: the same norm
                            spec.dt_floor, spec.dt_ceiling)

    def lock(self, spec, config: Mamba2Config) -> dict:
        # Unset Δ bounds are left out, so specs written before they existed keep their hash.
        unset = {key for key in ("dt_floor", "dt_ceiling") if getattr(spec, key) is None} or None
        return spec.model_copy(update={"n_heads": config.n_heads, "grouped_norm": config.grouped_norm}).model_dump(
            mode="json", exclude=unset)

    def parameters(self, config: Mamba2Config, dims: Dims) -> dict[str, tuple[int, ...]]:
        d = dims.d_model
        di, conv_channels, h = config.sizes(dims)
        table = {"in_proj.weight": (di + conv_channels + h, d)}
        if config.bias:
            table["in_proj.bias"] = (di + conv_channels + h,)
        table["conv1d.weight"] = (conv_channels, 1, config.d_conv)
        if config.conv_bias:
            table["conv1d.bias"] = (conv_channels,)
        table.update({"dt_bias": (h,), "A_log": (h,), "D": (h,), "norm.weight": (di,), "out_proj.weight": (d, di)})
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
                "dt_floor": config.dt_floor, "dt_ceiling": config.dt_ceiling}


KIND = Mamba2()
