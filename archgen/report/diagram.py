"""Draw the model as an SVG: the embedding, the meta tokens, one column per layer (mixers on top, parallel branches
stacked, the feed-forward below), the test-time memory and the symbolic module where they act, the final norm and
every head, each with a label in the picture (the tooltips only add detail).

Each kind has its fixed colour (its `colour` in archgen/kinds/<kind>.py), so two diagrams compare at a glance; a
component with a sliding window (any kind whose config has `window`) is drawn striped, so windowed and global
attention differ even in one colour. Boxes carry their component's short label, which the legend expands. Long
models wrap onto rows of ROW layers, so a 100-layer model stays readable at its natural size.
"""

from __future__ import annotations

from html import escape

from archgen.kinds import kind_of
from archgen.resolve.resolve import Component, ResolvedSpec

EXTRA_COLOUR, HEAD_COLOUR, ENDS_COLOUR = "#8d99ae", "#6d597a", "#adb5bd"  # meta tokens and extras; heads; embed, norm
CELL, GAP, TOP = 26, 4, 40
ROW = 32  # layers per row
LEFT = 96  # the band names
ROW_GAP = 34  # between rows: the layer numbers and the extras' labels


def layout_svg(resolved: ResolvedSpec) -> str:
    n = resolved.n_layers
    components = {**resolved.mixers, **resolved.ffns}
    labels = short_labels(list(components))
    max_branches = max((len(layer.mixers) for layer in resolved.layers), default=1) or 1
    mixer_height = CELL * max_branches + GAP * (max_branches - 1)
    band_height = mixer_height + GAP + CELL  # one row: mixers, then the feed-forwards
    rows = max(1, -(-n // ROW))

    def row_top_of(row: int) -> float:
        return TOP + row * (band_height + ROW_GAP) + 14
    per_row = min(n, ROW) or 1
    meta_width = 44 if resolved.meta_tokens else 0
    x0 = LEFT + 40 + (meta_width + GAP if meta_width else 0)  # the first layer's column
    heads = ["lm head, tied" if resolved.model.tie_embeddings else "lm head"]
    heads += [f"{name} head ({h.kind})" if name != h.kind else f"{name} head"
              for name, h in resolved.heads.items() if h.kind != "lm"]
    head_width = 7 * max(len(text) for text in heads) + 10
    last_x = x0 + ((n - 1) % ROW) * (CELL + GAP) if n else x0
    x_end = last_x + CELL + GAP + 12  # the final norm, right after the last layer (and any extra drawn after it)
    width = max(x0 + per_row * (CELL + GAP), x_end + 48 + head_width) + 10
    legend_y = max(TOP + rows * (band_height + ROW_GAP), row_top_of(rows - 1) + len(heads) * 24 + ROW_GAP) + 8
    legend_rows = -(-len(components) // 3)
    height = max(legend_y + 22 * legend_rows + 10, TOP + len(heads) * 24 + 60)
    title = f"{resolved.name}: {n} layers, d_model {resolved.d_model}"
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" font-family="sans-serif" '
             'font-size="11">',
             '<defs><pattern id="window" width="6" height="6" patternUnits="userSpaceOnUse" patternTransform="rotate(45)">'
             '<rect width="3" height="6" fill="white" fill-opacity="0.45"/></pattern></defs>',
             f'<text x="10" y="20" font-size="14" font-weight="bold">{escape(title)}</text>']

    row_top = row_top_of

    def column(index: int) -> tuple[float, float]:
        return x0 + (index % ROW) * (CELL + GAP), row_top(index // ROW)

    for row in range(rows):
        y = row_top(row)
        parts.append(f'<text x="10" y="{y + mixer_height / 2 + 4}">mixers</text>')
        parts.append(f'<text x="10" y="{y + mixer_height + GAP + CELL / 2 + 4}">feed-forward</text>')
    parts.append(_box(LEFT, row_top(0), 36, band_height, ENDS_COLOUR, f"token embedding ({resolved.model.vocab_size} × "
                      f"{resolved.d_model})", label="emb", vertical=True))
    if resolved.meta_tokens:
        count = resolved.meta_tokens.config.count
        parts.append(_box(LEFT + 40, row_top(0), meta_width, band_height, EXTRA_COLOUR,
                          f"{count} learnable meta tokens, prepended to every sequence", label=f"meta ×{count}", vertical=True))
    for layer in resolved.layers:
        x, y = column(layer.index)
        for b, name in enumerate(layer.mixers):
            parts.append(_component_box(x, y + b * (CELL + GAP), components[name], labels[name],
                                        f"layer {layer.index}: {name}"))
        if layer.ffn:
            parts.append(_component_box(x, y + mixer_height + GAP, components[layer.ffn], labels[layer.ffn],
                                        f"layer {layer.index}: {layer.ffn}"))
        if layer.index % 4 == 0:
            parts.append(f'<text x="{x + 2}" y="{y - 4}" font-size="9">{layer.index}</text>')
    extras = [(name, spec) for name, spec in (("memory", resolved.memory), ("symbolic", resolved.symbolic)) if spec is not None]
    for i, (name, spec) in enumerate(extras):
        x, y = column(spec.config.after_layer)
        x_line = x + CELL + GAP / 2
        bottom = y + band_height + 4
        parts.append(f'<line x1="{x_line}" y1="{y - 2}" x2="{x_line}" y2="{bottom}" stroke="{EXTRA_COLOUR}" '
                     f'stroke-width="3"><title>{name} ({spec.kind}) after layer {spec.config.after_layer}</title></line>')
        parts.append(f'<text x="{x_line + 3}" y="{bottom + 10 + 11 * i}" font-size="10" fill="#495057">'
                     f"{name} ({escape(spec.kind)})</text>")
    last_y = column(n - 1)[1] if n else row_top(0)
    parts.append(_box(x_end, last_y, 36, band_height, ENDS_COLOUR, "final norm", label="norm", vertical=True))
    for i, text in enumerate(heads):
        parts.append(_box(x_end + 46, last_y + i * 24, head_width, 20, HEAD_COLOUR, text, label=text))
    for i, name in enumerate(components):
        x, y = 10 + (i % 3) * 250, legend_y + (i // 3) * 22
        parts.append(_component_box(x, y, components[name], labels[name], name, size=20))
        parts.append(f'<text x="{x + 26}" y="{y + 14}">{escape(name)}: {escape(describe(components[name]))}</text>')
    parts.append("</svg>")
    return "\n".join(parts) + "\n"


def describe(component: Component) -> str:
    """'attention, window 16': the kind, and the window for a windowed component."""
    window = getattr(component.config, "window", None)
    return f"{component.kind}, window {window}" if window else component.kind


def short_labels(names: list[str]) -> dict[str, str]:
    """A label of at most three characters per component name, unique within the model: the name's start, else its
    start and a number."""
    labels: dict[str, str] = {}
    for i, name in enumerate(names):
        label = name[:3]
        if label in labels.values():
            label = f"{name[:2]}{i}"[:3]
        labels[name] = label
    return labels


def _component_box(x: float, y: float, component: Component, label: str, title: str, size: int = CELL) -> str:
    windowed = getattr(component.config, "window", None)  # any kind with a sliding window, attention or not
    return _box(x, y, size, size, kind_of(component.kind).colour, f"{title} ({describe(component)})", label=label,
                font_size=9 if size >= CELL else 7, striped=bool(windowed))


def _box(x: float, y: float, w: float, h: float, colour: str, title: str, label: str | None = None,
         vertical: bool = False, font_size: int = 11, striped: bool = False) -> str:
    text = ""
    if label and vertical:
        cx, cy = x + w / 2 + 4, y + h / 2
        text = (f'<text x="{cx}" y="{cy}" fill="white" font-size="{font_size}" text-anchor="middle" '
                f'transform="rotate(-90 {cx} {cy})">{escape(label)}</text>')
    elif label:
        text = f'<text x="{x + 3}" y="{y + h / 2 + 4}" fill="white" font-size="{font_size}">{escape(label)}</text>'
    rect = f'<rect x="{x}" y="{y}" width="{w}" height="{h}" rx="3" fill="{colour}"><title>{escape(title)}</title></rect>'
    if striped:  # a sliding window: the kind's colour under white stripes
        rect += f'<rect x="{x}" y="{y}" width="{w}" height="{h}" rx="3" fill="url(#window)" pointer-events="none"/>'
    return f"<g>{rect}{text}</g>"
