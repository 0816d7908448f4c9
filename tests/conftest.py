"""Shared fixtures: build a spec into a temporary directory and import the generated package on its own."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

if not torch.cuda.is_available():
    # Generated packages import their Triton kernels; without a GPU they can only run in Triton's interpreter, which
    # must be chosen before triton is first imported.
    os.environ.setdefault("TRITON_INTERPRET", "1")

# Every compile in the tests checks the IR after lowering and after each pass (archgen/passes/verify.py).
os.environ.setdefault("ARCHGEN_VERIFY_IR", "1")

from archgen.resources import kernels_package
from archgen.testing import build_generated

kernels_package()  # `import archgen_kernels` finds this checkout's kernels/ (it imports no triton)

ROOT = Path(__file__).resolve().parents[1]
SPECS = sorted((ROOT / "specs").glob("*.yaml"))


def build_package(spec_path: Path | str, out_root: Path, preset: str | None = "tiny", overrides: tuple[str, ...] = ()):
    """Compile and emit `spec_path` into out_root/<name>/ and import it; returns the imported package."""
    return build_generated(spec_path, out_root, preset, overrides)[0]


@pytest.fixture
def build(tmp_path):
    """build(spec_path, preset="tiny", overrides=()) -> the generated package, imported."""

    def _build(spec_path, preset="tiny", overrides=()):
        return build_package(spec_path, tmp_path, preset, tuple(overrides))

    return _build
