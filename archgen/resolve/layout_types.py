"""Small values shared by the layout front ends (pattern text and ratio shorthand)."""

from __future__ import annotations

import difflib
from collections.abc import Collection
from dataclasses import dataclass

# Far above any real model, low enough that a typo such as 'ssm*999999999' is an error, not an out-of-memory.
MAX_LAYERS = 512  # deeper than any trained model of this kind; bounds the time `archgen check` takes (archgen.spec.limits)


@dataclass(frozen=True)
class Slot:
    """One layer position: the component names that run in parallel in it.

    One name for an ordinary layer, two or more for Hymba-style parallel heads.
    """

    names: tuple[str, ...]


@dataclass(frozen=True)
class LayoutProblem:
    message: str  # what is wrong, with the actual values
    fix: str | None  # what to change, concretely
    column: int | None  # 0-based character offset into the pattern text where the problem is, or None
    field: str | None = None  # for a ratio layout: "offset", "ratio.<name>" or "n_layers", the key to point at


def unknown_name_problem(name: str, known_names: Collection[str], column: int | None, where: str) -> LayoutProblem:
    """The problem for a component name that is not defined, with the closest defined name as the fix.

    `where` says where the name was written, e.g. "at column 4" or "in the ratio".
    """
    known = sorted(known_names)
    if not known:
        return LayoutProblem(
            f"unknown component '{name}' {where}; no components are defined",
            f"define '{name}' before using it in a layout",
            column,
        )
    close = difflib.get_close_matches(name, known, n=1)
    fix = f"replace '{name}' with '{close[0]}'" if close else f"use one of: {', '.join(known)}"
    return LayoutProblem(f"unknown component '{name}' {where}; known components: {', '.join(known)}", fix, column)
