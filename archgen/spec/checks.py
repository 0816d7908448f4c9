"""Shape guards: rules that relate several fields of a validated spec. Every rule that fails adds a Diagnostic with
its spec path and a fix that names acceptable values; all rules run, so a person sees every problem at once.

Rules about one component live with its kind (`check` in archgen/kinds/<kind>.py); this module runs them all and
adds the rules about the spec as a whole (reserved names, one head per kind).
"""

from __future__ import annotations

import keyword
from collections.abc import Iterator
from typing import Any

from archgen.errors import Diagnostic
from archgen.kinds import kind_of
from archgen.spec import models


def components(spec: models.Spec) -> Iterator[tuple[str, str, Any]]:
    """(spec path, kind, spec entry) of every component the spec declares."""
    yield "model.norm", spec.model.norm.kind, spec.model.norm
    for family in ("mixers", "ffns"):
        for name, entry in getattr(spec, family).items():
            yield f"{family}.{name}", entry.kind, entry
    if spec.meta_tokens is not None:
        yield "meta_tokens", "meta_tokens", spec.meta_tokens
    if spec.memory is not None:
        yield "memory", spec.memory.kind, spec.memory
    if spec.symbolic is not None:
        yield "symbolic", "symbolic", spec.symbolic
    for name, entry in spec.heads.items():
        yield f"heads.{name}", entry.kind, entry


def check_spec(spec: models.Spec) -> list[Diagnostic]:
    problems: list[Diagnostic] = []
    for family in ("mixers", "ffns", "heads"):
        for name in getattr(spec, family):
            if name in models.RESERVED_NAMES or keyword.iskeyword(name) or name.startswith("_"):
                problems.append(Diagnostic(f"{family}.{name}", f"'{name}' is reserved and cannot name a component",
                                           f"rename it, e.g. '{name}_{family[:-1]}'"))
    for path, kind, entry in components(spec):
        problems += kind_of(kind).check(entry, path, spec.model)
    kinds = [head.kind for head in spec.heads.values()]
    for kind in sorted(set(kinds)):
        if kinds.count(kind) > 1:
            problems.append(Diagnostic("heads", f"{kinds.count(kind)} heads of kind '{kind}'", "declare each head kind once"))
    return problems
