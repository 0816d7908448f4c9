"""Model-level pieces: the parallel-branch combiner, meta tokens, Titans memory and the symbolic module."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ParallelCombine:
    """How the branches of one parallel layer are merged (Hymba: per-branch norm, learned per-channel scale, mean)."""

    kind: str  # "parallel_combine"
    branches: tuple[str, ...]
    mode: str  # "normalized_mean" | "sum"
    norm: object  # the model's norm spec, used per branch


def parameters(cfg, dims) -> dict[str, tuple[int, ...]]:
    d = dims.d_model
    if cfg.kind == "parallel_combine":
        if cfg.mode == "sum":
            return {}
        table = {}
        for branch in cfg.branches:
            table[f"{branch}_norm.weight"] = (d,)
            if cfg.norm.kind == "layernorm" and cfg.norm.bias:
                table[f"{branch}_norm.bias"] = (d,)
            table[f"{branch}_scale"] = (d,)
        return table
    if cfg.kind == "meta_tokens":
        return {"meta_tokens": (cfg.count, d)}
    if cfg.kind == "titans":
        hidden = cfg.hidden or d
        table = {"q_proj.weight": (d, d), "k_proj.weight": (d, d), "v_proj.weight": (d, d)}
        widths = [d] + [hidden] * (cfg.depth - 1) + [d]
        for i in range(cfg.depth):
            table[f"memory.{i}.weight"] = (widths[i + 1], widths[i])
        table["gate.weight"] = (d, d)
        table["gate.bias"] = (d,)
        return table
    if cfg.kind == "symbolic":
        p = len(cfg.predicates)
        table = {"extract.weight": (p, d), "extract.bias": (p,)}
        if cfg.learned_rules:
            table["rule_premises"] = (cfg.learned_rules, p)
            table["rule_conclusions"] = (cfg.learned_rules, p)
        table["project.weight"] = (d, p)
        return table
    raise ValueError(f"unknown extra kind {cfg.kind!r}")


def forward_flops(cfg, dims, seq_len: int) -> int:
    d = dims.d_model
    if cfg.kind == "titans":
        hidden = cfg.hidden or d
        widths = [d] + [hidden] * (cfg.depth - 1) + [d]
        memory_read = sum(2 * widths[i] * widths[i + 1] for i in range(cfg.depth))
        return seq_len * (2 * d * d * 4 + memory_read)
    if cfg.kind == "symbolic":
        p = len(cfg.predicates)
        rules = len(cfg.rules) + cfg.learned_rules
        return seq_len * (2 * d * p * 2 + cfg.steps * rules * p * 2)
    return 0


def cache_bytes(cfg, dims, context: int, itemsize: int) -> int:
    if cfg.kind == "titans":
        # The memory's fast weights and their momentum are per-sequence state during generation.
        d = dims.d_model
        hidden = cfg.hidden or d
        widths = [d] + [hidden] * (cfg.depth - 1) + [d]
        return 2 * sum(widths[i] * widths[i + 1] for i in range(cfg.depth)) * 4
    return 0
