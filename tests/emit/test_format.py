"""Generation ends with ruff's formatter: the rendered Python files are formatted (the pinned ruff leaves them as they
are), the verbatim copies are untouched, and formatting is deterministic and fast."""

from __future__ import annotations

import time

from archgen.emit import emit
from archgen.emit.format import format_python
from archgen.pipeline import compile_spec
from archgen.resources import KERNELS, TEMPLATES
from tests.conftest import ROOT

NEXUS = ROOT / "specs" / "nexus.yaml"  # has ops/ copies and a kernels/ package


def test_rendered_python_is_already_ruff_formatted_and_copies_are_verbatim():
    files = emit(compile_spec(NEXUS, "tiny"), "specs/nexus.yaml").files
    for path in ("model.py", "config.py", "__init__.py", "kernels/__init__.py"):
        assert format_python(files[path], path) == files[path], path
    for path, text in files.items():
        if path.startswith("ops/") and path != "ops/__init__.py":
            assert text == (TEMPLATES / "runtime" / path.removeprefix("ops/")).read_text(encoding="utf-8"), path
        if path.startswith("kernels/") and path != "kernels/__init__.py":
            assert text == (KERNELS / path.removeprefix("kernels/")).read_text(encoding="utf-8"), path


def test_formatting_is_deterministic_and_builds_stay_fast():
    compiled = compile_spec(NEXUS, "tiny")
    start = time.perf_counter()
    first = emit(compiled, "specs/nexus.yaml").files
    elapsed = time.perf_counter() - start
    assert emit(compiled, "specs/nexus.yaml").files == first
    assert elapsed < 10, f"emitting took {elapsed:.1f}s"  # about 0.3 s on an idle core; generous for shared CI machines
