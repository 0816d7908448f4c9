"""Shared fixtures: build a spec into a temporary directory and import the generated package on its own."""

from __future__ import annotations

import importlib.util
import os
import sys
import uuid
from pathlib import Path

import pytest
import torch

if not torch.cuda.is_available():
    # Generated packages import their Triton kernels; without a GPU they can only run in Triton's interpreter, which
    # must be chosen before triton is first imported.
    os.environ.setdefault("TRITON_INTERPRET", "1")

from archgen.emit import emit, write_package
from archgen.pipeline import compile_spec

ROOT = Path(__file__).resolve().parents[1]
SPECS = sorted((ROOT / "specs").glob("*.yaml"))


def import_package(directory: Path):
    """Import a generated package from `directory` under a fresh module name, so builds never shadow each other."""
    name = f"_archgen_built_{uuid.uuid4().hex}"  # unique, so a stale `<name>.model` in sys.modules is never reused
    spec = importlib.util.spec_from_file_location(name, directory / "__init__.py", submodule_search_locations=[str(directory)])
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def build_package(spec_path: Path | str, out_root: Path, preset: str | None = "tiny", overrides: tuple[str, ...] = ()):
    """Compile and emit `spec_path` into out_root/<name>/ and import it; returns the imported package."""
    compiled = compile_spec(spec_path, preset, overrides)
    emitted = emit(compiled, Path(spec_path).as_posix())
    target = out_root / compiled.resolved.name
    write_package(emitted.files, target)
    return import_package(target)


@pytest.fixture
def build(tmp_path):
    """build(spec_path, preset="tiny", overrides=()) -> the generated package, imported."""

    def _build(spec_path, preset="tiny", overrides=()):
        return build_package(spec_path, tmp_path, preset, tuple(overrides))

    return _build
