"""Human and machine renderings of a CostReport (the `inspect` command and the model card share these)."""

from __future__ import annotations

from dataclasses import asdict

from rich.table import Table

from archgen.passes.cost import CostReport
from archgen.resolve.resolve import ResolvedSpec


def human_count(n: float) -> str:
    for unit, size in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= size:
            return f"{n / size:.2f}{unit}"
    return f"{n:.0f}"


def human_bytes(n: float) -> str:
    for unit, size in (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= size:
            return f"{n / size:.2f} {unit}"
    return f"{n:.0f} B"


def layer_table(resolved: ResolvedSpec, report: CostReport) -> Table:
    table = Table(title=f"{resolved.name}: {resolved.n_layers} layers, d_model {resolved.d_model}", show_lines=False)
    for column, justify in (("layer", "right"), ("ops", "left"), ("params (each)", "right"), ("active (each)", "right"),
                            (f"GFLOP/token @{report.seq_len}", "right"), (f"cache @{report.context}", "right")):
        table.add_column(column, justify=justify)
    for first, last, row in _runs(report.layers):
        where = "" if row.index is None else (str(first) if first == last else f"{first}-{last}")
        count = "" if first == last else f"  ×{last - first + 1}"
        table.add_row(where, row.label + count, f"{row.params:,}", f"{row.active_params:,}",
                      f"{row.flops_per_token / 1e9:.3f}", human_bytes(row.cache_bytes) if row.cache_bytes else "-")
    return table


def _runs(rows):
    """Group consecutive layers whose costs are identical, so an 80-layer model prints a handful of lines."""
    runs = []
    for row in rows:
        same = (row.label, row.params, row.active_params, row.flops_per_token, row.cache_bytes)
        if (runs and row.index is not None and runs[-1][2].index is not None and runs[-1][3] == same
                and runs[-1][1] == row.index - 1):
            runs[-1][1] = row.index
        else:
            runs.append([row.index, row.index, row, same])
    return [(first, last, row) for first, last, row, _ in runs]


def totals_table(resolved: ResolvedSpec, report: CostReport) -> Table:
    table = Table(title="totals", show_header=False)
    table.add_column("what")
    table.add_column("value", justify="right")
    table.add_row("parameters", f"{report.total_params:,} ({human_count(report.total_params)})")
    table.add_row("active parameters per token", f"{report.active_params:,} ({human_count(report.active_params)})")
    table.add_row("embedding parameters", f"{report.embedding_params:,}")
    table.add_row(f"forward FLOPs per token @ L={report.seq_len}", human_count(report.forward_flops_per_token))
    table.add_row(f"forward FLOPs per sequence @ L={report.seq_len}", human_count(report.forward_flops_per_sequence))
    for dtype, size in report.weight_bytes.items():
        table.add_row(f"weights in {dtype}", human_bytes(size))
    for context, size in report.cache_bytes_by_context.items():
        table.add_row(f"cache per sequence @ {context:,} tokens ({report.cache_dtype})", human_bytes(size))
    table.add_row(f"peak activation estimate (batch 1, L={report.seq_len}, inference)", human_bytes(report.peak_activation_bytes))
    return table


def report_json(resolved: ResolvedSpec, report: CostReport) -> dict:
    data = asdict(report)
    data.pop("parameter_table")
    data["cache_bytes_by_context"] = {str(k): v for k, v in report.cache_bytes_by_context.items()}
    data["name"] = resolved.name
    data["spec_hash"] = resolved.spec_hash
    data["preset"] = resolved.preset
    data["n_layers"] = resolved.n_layers
    data["layout"] = [{"mixers": list(layer.mixers), "ffn": layer.ffn} for layer in resolved.layers]
    data["nominal_params"] = resolved.nominal_params
    return data
