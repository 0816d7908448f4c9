"""One name per layer, written back as the shortest layout text archgen's pattern language reads the same way.

    [attn] * 32                           -> "attn"  (tiled to n_layers)
    [ssm, ssm, ssm, attn] * 8             -> "(ssm*3, attn)*8"
    [ssm]*9 + [attn] + [ssm]*8 + [attn]   -> "ssm*9, attn, ssm*8, attn"

The period is the shortest prefix that tiles the whole list; inside a period equal neighbours are run-length coded.
"""

from __future__ import annotations

from itertools import groupby


def layout_text(names: list[str]) -> str:
    n = len(names)
    period = next(p for p in range(1, n + 1) if n % p == 0 and names == names[:p] * (n // p))
    runs = [(name, len(list(group))) for name, group in groupby(names[:period])]
    body = ", ".join(name if count == 1 else f"{name}*{count}" for name, count in runs)
    repeats = n // period
    if repeats == 1:
        return body
    if len(runs) == 1 and runs[0][1] == 1:
        return body  # one name tiles to n_layers on its own
    return f"({body})*{repeats}"
