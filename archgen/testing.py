"""What archgen's tests, benches and export checks share: build a spec into a directory and import the package it
writes, and the relative error every numerical comparison uses."""

from __future__ import annotations

import importlib.util
import sys
import uuid
from pathlib import Path
from types import ModuleType

import torch


def import_generated(directory: str | Path) -> ModuleType:
    """Import the generated package in `directory` under a fresh module name, so builds never shadow each other
    (a stale `<name>.model` in sys.modules is never reused) and no sys.path entry is needed."""
    directory = Path(directory)
    name = f"_archgen_built_{directory.name}_{uuid.uuid4().hex}"
    spec = importlib.util.spec_from_file_location(name, directory / "__init__.py", submodule_search_locations=[str(directory)])
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def build_generated(spec_path: str | Path, out_root: str | Path, preset: str | None = "tiny",
                    overrides: tuple[str, ...] = (), source: str | None = None):
    """Compile and emit `spec_path` into out_root/<name>/ and import it: (package, compiled).

    `source` is the spec path written into the package's header and spec.lock.yaml (default: spec_path as given).
    """
    from archgen.emit import emit, write_package
    from archgen.pipeline import compile_spec

    compiled = compile_spec(spec_path, preset, tuple(overrides))
    emitted = emit(compiled, source if source is not None else Path(spec_path).as_posix(), Path(out_root).as_posix())
    target = Path(out_root) / compiled.resolved.name
    write_package(emitted.files, target)
    return import_generated(target), compiled


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """max|actual - expected| / max|expected|, in float64; inf when the shapes differ; 0 for empty tensors."""
    if actual.shape != expected.shape:
        return float("inf")
    if expected.numel() == 0:
        return 0.0
    actual, expected = actual.detach().double(), expected.detach().double()
    scale = expected.abs().max().item() or 1.0
    return (actual - expected).abs().max().item() / scale
