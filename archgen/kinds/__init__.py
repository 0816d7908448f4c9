"""The registry of layer kinds: every module of this package defines one kind (`KIND`) or a few (`KINDS`).

Modules are discovered, not listed, so adding a kind is adding its module (see docs/design.md, "How to add a kind").
"""

from __future__ import annotations

import importlib
import pkgutil

from archgen.kinds.base import Dims, Kind, Shape


def _discover() -> dict[str, Kind]:
    found: dict[str, Kind] = {}
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
        if info.name == "base":
            continue
        module = importlib.import_module(f"{__name__}.{info.name}")
        kinds = getattr(module, "KINDS", None) or (module.KIND,)
        for kind in kinds:
            if kind.name in found:
                first = type(found[kind.name]).__module__
                raise RuntimeError(f"kind '{kind.name}' is defined twice: {first} and {module.__name__}")
            found[kind.name] = kind
    return found


KINDS: dict[str, Kind] = _discover()


def kind_of(name: str) -> Kind:
    try:
        return KINDS[name]
    except KeyError:
        raise KeyError(f"no kind '{name}' in archgen.kinds (known: {', '.join(sorted(KINDS))})") from None


__all__ = ["KINDS", "Dims", "Kind", "Shape", "kind_of"]
