"""Draw the layer pattern as an SVG: one column per layer, mixers on top (parallel branches stacked side by side),
the feed-forward below, model-level pieces at the ends. Each kind has its fixed colour (its `colour` in
archgen/kinds/<kind>.py), so two diagrams compare at a glance.
"""

from __future__ import annotations

from html import escape

from archgen.kinds import kind_of
from archgen.resolve.resolve import ResolvedSpec

EXTRA_COLOUR, HEAD_COLOUR = "#8d99ae", "#6d597a"  # meta tokens and model-level extras; the heads column
CELL, GAP, TOP = 26, 4, 56


def layout_svg(resolved: ResolvedSpec) -> str:
    n = resolved.n_layers
    max_branches = max((len(layer.mixers) for layer in resolved.layers), default=1) or 1
    mixer_height = CELL * max_branches + GAP * (max_branches - 1)
    width = 140 + n * (CELL + GAP) + 160
    height = TOP + mixer_height + GAP + CELL + 90
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" font-family="sans-serif" '
             'font-size="11">',
             f'<text x="10" y="20" font-size="14" font-weight="bold">{escape(resolved.name)}: {n} layers</text>',
             f'<text x="10" y="{TOP + mixer_height / 2 + 4}">mixers</text>',
             f'<text x="10" y="{TOP + mixer_height + GAP + CELL / 2 + 4}">feed-forward</text>']
    x0 = 110
    if resolved.meta_tokens:
        count = resolved.meta_tokens.config.count
        parts.append(_box(x0 - 6 - CELL, TOP, CELL, mixer_height, EXTRA_COLOUR, f"{count} meta tokens"))
    for layer in resolved.layers:
        x = x0 + layer.index * (CELL + GAP)
        for b, name in enumerate(layer.mixers):
            kind = resolved.mixers[name].kind
            title = f"layer {layer.index}: {name} ({kind})"
            parts.append(_box(x, TOP + b * (CELL + GAP), CELL, CELL, kind_of(kind).colour, title))
        if layer.ffn:
            kind = resolved.ffns[layer.ffn].kind
            title = f"layer {layer.index}: {layer.ffn} ({kind})"
            parts.append(_box(x, TOP + mixer_height + GAP, CELL, CELL, kind_of(kind).colour, title))
        if layer.index % 4 == 0:
            parts.append(f'<text x="{x + 2}" y="{TOP - 6}" font-size="9">{layer.index}</text>')
        for extra, spec in (("memory", resolved.memory), ("symbolic", resolved.symbolic)):
            if spec is not None and spec.config.after_layer == layer.index:
                x_line = x + CELL + GAP / 2
                parts.append(f'<line x1="{x_line}" y1="{TOP - 4}" x2="{x_line}" y2="{TOP + mixer_height + CELL + 8}" '
                             f'stroke="{EXTRA_COLOUR}" stroke-width="3">'
                             f"<title>{extra} after layer {layer.index}</title></line>")
    x_end = x0 + n * (CELL + GAP) + 10
    heads = ["lm"] + [f"{name} ({h.kind})" for name, h in resolved.heads.items() if h.kind != "lm"]
    for i, head in enumerate(heads):
        parts.append(_box(x_end, TOP + i * (CELL / 1.3 + GAP), 140, CELL / 1.3, HEAD_COLOUR, head, label=head))
    legend_y = TOP + mixer_height + GAP + CELL + 30
    kinds = sorted({resolved.mixers[n].kind for n in resolved.mixers} | {f.kind for f in resolved.ffns.values()})
    for i, kind in enumerate(kinds):
        parts.append(_box(10 + i * 120, legend_y, 14, 14, kind_of(kind).colour, kind))
        parts.append(f'<text x="{28 + i * 120}" y="{legend_y + 11}">{kind}</text>')
    parts.append("</svg>")
    return "\n".join(parts) + "\n"


def _box(x: float, y: float, w: float, h: float, colour: str, title: str, label: str | None = None) -> str:
    text = f'<text x="{x + 4}" y="{y + h / 2 + 4}" fill="white">{escape(label)}</text>' if label else ""
    rect = f'<rect x="{x}" y="{y}" width="{w}" height="{h}" rx="3" fill="{colour}"><title>{escape(title)}</title></rect>'
    return f"<g>{rect}{text}</g>"
