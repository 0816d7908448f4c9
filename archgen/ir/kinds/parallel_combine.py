"""How the branches of one parallel layer merge (Hymba: per-branch norm, learned per-channel scale, mean)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ParallelCombine:
    kind: str  # "parallel_combine"
    branches: tuple[str, ...]
    mode: str  # "normalized_mean" | "sum"
    norm: object  # the model's norm spec, used per branch


def parameters(cfg, dims) -> dict[str, tuple[int, ...]]:
    if cfg.mode == "sum":
        return {}
    table = {}
    for branch in cfg.branches:
        table[f"{branch}_norm.weight"] = (dims.d_model,)
        if cfg.norm.kind == "layernorm" and cfg.norm.bias:
            table[f"{branch}_norm.bias"] = (dims.d_model,)
        table[f"{branch}_scale"] = (dims.d_model,)
    return table


def forward_flops(cfg, dims, seq_len: int) -> int:
    return 0


def cache_bytes(cfg, dims, context: int, itemsize: int) -> int:
    return 0
