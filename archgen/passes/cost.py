"""The cost model: exact parameter counts and FLOPs, weight, cache and activation bytes, read off the IR.

Everything here is arithmetic over the per-kind formulas in `archgen.kinds`; nothing is measured or estimated
from the seeds. `CostReport` is plain data: the CLI renders it, the model card prints it, tests compare it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from archgen.ir.graph import IR
from archgen.kinds import kind_of

DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2, "float8": 1}


@dataclass(frozen=True)
class LayerCost:
    index: int | None  # None for model-level ops (embedding, final norm, heads)
    label: str  # "attn + moe", "embedding", ...
    params: int
    active_params: int
    flops_per_token: float  # forward, averaged over a sequence of `seq_len` tokens
    cache_bytes: int  # per sequence at `context` tokens, in the cache dtype


@dataclass(frozen=True)
class CostReport:
    seq_len: int
    context: int
    cache_dtype: str
    total_params: int
    active_params: int  # per token: routed experts counted top_k of n_experts
    embedding_params: int
    forward_flops_per_token: float
    forward_flops_per_sequence: int
    # forward + backward (3 × forward) plus the backbone passes heads add in training (JEPA's context and target
    # passes: 3 × and 1 × the backbone's forward); recomputation under gradient checkpointing is not counted
    train_flops_per_token: float
    layers: list[LayerCost]
    weight_bytes: dict[str, int]
    cache_bytes_by_context: dict[int, int]  # per sequence, cache dtype
    peak_activation_bytes: int  # batch 1, seq_len tokens, inference, cache dtype
    parameter_table: dict[str, tuple[int, ...]] = field(repr=False, default_factory=dict)

    def nominal_mismatch(self, nominal: float | None, tolerance: float = 0.10) -> float | None:
        """Relative error of the advertised size against the true count, when it exceeds the tolerance."""
        if not nominal:
            return None
        error = (self.total_params - nominal) / nominal
        return error if abs(error) > tolerance else None


def count(shape: tuple[int, ...]) -> int:
    total = 1
    for size in shape:
        total *= size
    return total


def parameter_table(ir: IR) -> dict[str, tuple[int, ...]]:
    """Every parameter of the generated model by its full dotted name."""
    return {f"{op.name}.{name}" if not name.startswith(op.name) else name: shape
            for op in ir.ops() for name, shape in op.params.items()}


def cache_bytes(ir: IR, context: int, itemsize: int) -> int:
    """One sequence's decode-time state at `context` tokens, the meta tokens' positions included where there are."""
    total, added = 0, 0
    for op in ir.ops():
        kind = kind_of(op.kind)
        total += kind.cache_bytes(op.config, ir.dims, context + added, itemsize)
        added += kind.positions_added(op.config)
    return total


def cost_report(ir: IR, seq_len: int = 2048, context: int | None = None, cache_dtype: str = "bfloat16",
                contexts: tuple[int, ...] = (2048, 32768, 131072)) -> CostReport:
    context = context or seq_len
    itemsize = DTYPE_BYTES[cache_dtype]
    dims = ir.dims
    rows: dict[int | None | str, dict] = {}
    total_flops = 0
    backbone_flops = 0  # what Model.hidden_states computes: every op but the heads and the unembedding
    extra_passes = [0, 0]  # backbone passes the heads add in a training step: with gradient, without
    peak_elements = 0
    added = 0  # positions the ops so far prepended (meta tokens): the layers process seq_len + added
    for op in ir.ops():
        kind = kind_of(op.kind)
        key = op.layer if op.layer is not None and kind.role != "extra" else op.name  # extras get rows of their own
        row = rows.setdefault(key, {"params": 0, "active": 0, "flops": 0, "cache": 0, "labels": []})
        params = sum(count(s) for s in op.params.values())
        row["params"] += params
        row["active"] += params - kind.inactive_params(op.config, dims)
        flops = kind.forward_flops(op.config, dims, seq_len + added)
        row["flops"] += flops
        total_flops += flops
        if kind.role != "head" and op.name != "lm_head":
            backbone_flops += flops
        extra_passes = [passes + more for passes, more in zip(extra_passes, kind.backbone_passes_in_training, strict=True)]
        row["cache"] += kind.cache_bytes(op.config, dims, context + added, itemsize)
        if op.component and op.component not in row["labels"]:
            row["labels"].append(op.component)
        peak_elements = max(peak_elements, kind.activation_elements(op.config, dims, seq_len + added))
        added += kind.positions_added(op.config)
    layers = []
    for key, row in rows.items():
        if not isinstance(key, int) and not any(row[k] for k in ("params", "flops", "cache")):
            continue  # a model-level op that owns and costs nothing (dropping the meta tokens' positions)
        index = key if isinstance(key, int) else None
        labels = row["labels"]
        label = (" | ".join(labels[:-1]) + " + " + labels[-1]) if len(labels) > 1 else (labels[0] if labels else str(key))
        layers.append(LayerCost(index, label, row["params"], row["active"], row["flops"] / seq_len, row["cache"]))
    table = parameter_table(ir)
    total = sum(count(s) for s in table.values())
    active = sum(layer.active_params for layer in layers)
    by_context = {c: cache_bytes(ir, c, itemsize) for c in contexts}
    residual_stream = 2 * seq_len * dims.d_model  # input and output of the op holding the peak
    return CostReport(
        seq_len=seq_len, context=context, cache_dtype=cache_dtype, total_params=total, active_params=active,
        embedding_params=count(table["embed.weight"]), forward_flops_per_token=total_flops / seq_len,
        forward_flops_per_sequence=total_flops, layers=layers,
        train_flops_per_token=(3 * total_flops + (3 * extra_passes[0] + extra_passes[1]) * backbone_flops) / seq_len,
        weight_bytes={dtype: total * size for dtype, size in DTYPE_BYTES.items()},
        cache_bytes_by_context=by_context, peak_activation_bytes=(peak_elements + residual_stream) * itemsize,
        parameter_table=table,
    )
