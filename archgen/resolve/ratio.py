"""Jamba-style ratio shorthand: {attn: 1, ssm: 7} at offset 4 expanded to one Slot per layer.

The period is the sum of the counts. Within each period the names fill consecutive positions in the order
given, starting at position `offset` and wrapping around, so {attn: 1, ssm: 7} at offset 4 puts attention at
layers 4, 12, 20, 28 of a 32-layer model (Jamba's layout), and {moe: 1, mlp: 1} at offset 1 puts moe on
the odd layers.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping

from archgen.resolve.layout_types import MAX_LAYERS, LayoutProblem, Slot, unknown_name_problem


def _is_whole(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)  # YAML 'true' must not count as 1


def expand_ratio(
    ratio: Mapping[str, int], offset: int, n_layers: int, known_names: Collection[str]
) -> tuple[list[Slot], list[LayoutProblem]]:
    """One Slot per layer for `ratio` tiled over `n_layers`; or no slots and every problem found."""
    problems: list[LayoutProblem] = []
    if not ratio:
        problems.append(LayoutProblem("ratio is empty", "give each component a count, e.g. {attn: 1, ssm: 7}", None))
    for name, count in ratio.items():
        if name not in known_names:
            unknown = unknown_name_problem(str(name), known_names, None, "in the ratio")
            problems.append(LayoutProblem(unknown.message, unknown.fix, None, f"ratio.{name}"))
        if not _is_whole(count) or count < 1:
            fix = f"use a whole number >= 1, or drop '{name}' from the ratio"
            message = f"ratio count for '{name}' must be a whole number >= 1, got {count!r}"
            problems.append(LayoutProblem(message, fix, None, f"ratio.{name}"))
    if not _is_whole(n_layers) or not 1 <= n_layers <= MAX_LAYERS:
        fix = "set n_layers to the model's depth, e.g. 32"
        problems.append(LayoutProblem(f"n_layers must be 1 to {MAX_LAYERS}, got {n_layers!r}", fix, None, "n_layers"))
    if problems:  # the period and the checks below depend on the counts and n_layers being sound
        return [], problems

    period = sum(ratio.values())
    shape = " + ".join(f"{name}:{count}" for name, count in ratio.items())
    if not _is_whole(offset) or not 0 <= offset < period:
        message = f"offset={offset!r} is not a position in the ratio period of {period} layers ({shape})"
        problems.append(LayoutProblem(message, f"use an offset from 0 to {period - 1}", None, "offset"))
    if n_layers % period:
        lower = n_layers // period * period
        near = f"{lower} or {lower + period}" if lower else str(period)
        message = f"n_layers={n_layers} is not a multiple of the ratio period {period} ({shape})"
        problems.append(LayoutProblem(message, f"use n_layers={near}, or change the counts", None, "n_layers"))
    if problems:
        return [], problems

    period_slots: list[Slot] = [Slot(())] * period
    position = offset
    for name, count in ratio.items():
        for _ in range(count):
            period_slots[position % period] = Slot((name,))
            position += 1
    return period_slots * (n_layers // period), []
