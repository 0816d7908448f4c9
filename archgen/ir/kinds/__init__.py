"""One module per op kind: its exact parameter table, its forward FLOPs and the per-sequence cache it keeps.

Each module defines
    parameters(cfg, dims) -> {name: shape}      names exactly as the generated module registers them
    forward_flops(cfg, dims, seq_len) -> int    one sequence of seq_len tokens, batch 1
    cache_bytes(cfg, dims, context, itemsize) -> int   decode-time state for one sequence at `context` tokens
FLOPs count a multiply-add as 2 and include the SSM recurrences; element-wise work (norms, activations, RoPE,
softmax) is not counted, as in the usual 2·N·D accounting. Adding a kind means adding a module here.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import ModuleType

from archgen.ir.kinds import (
    attention,
    conv,
    embedding,
    forecaster,
    free,
    jepa,
    mamba,
    mamba2,
    medusa,
    meta_tokens,
    mlp,
    moe,
    norm,
    parallel_combine,
    sparse_attention,
    symbolic,
    titans,
)


@dataclass(frozen=True)
class Dims:
    """Model-wide sizes an op's formulas need."""

    d_model: int
    vocab_size: int
    n_layers: int = 0


KINDS: dict[str, ModuleType] = {
    "embedding": embedding,
    "lm_head": embedding,
    "rmsnorm": norm,
    "layernorm": norm,
    "attention": attention,
    "sparse_attention": sparse_attention,
    "mamba": mamba,
    "mamba2": mamba2,
    "conv": conv,
    "mlp": mlp,
    "moe": moe,
    "parallel_combine": parallel_combine,
    "meta_tokens": meta_tokens,
    "titans": titans,
    "symbolic": symbolic,
    "medusa": medusa,
    "jepa": jepa,
    "forecaster": forecaster,
    "lm": free,
    "add": free,
}
