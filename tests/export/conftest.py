"""Every spec in specs/, built at its tiny preset and exported once per test session.

Exporting (torch.export, then ONNX conversion) takes tens of seconds per spec, so the exports start together at the
first request, in two worker processes, and every test reads their files: the reloaded .pt2 programs and
onnxruntime sessions, next to the eager model with the same weights (a save_pretrained directory passed to the
exporter as --weights).
"""

from __future__ import annotations

import multiprocessing
import os
from pathlib import Path

import pytest

from tests.conftest import SPECS
from tests.export.exporting import Exported, export_spec

WORKERS = 2


@pytest.fixture(scope="session", autouse=True)
def export_jobs(request, tmp_path_factory):
    """Start every spec's export at once (slowest first) in worker processes; spec name -> AsyncResult.

    Autouse, so that when the session has tests that read the exports, they start with the first test of
    tests/export, and the tests that export something small in-process run meanwhile."""
    if not any("exported" in item.fixturenames for item in request.session.items):
        yield {}
        return
    root = tmp_path_factory.mktemp("exports")
    order = sorted(SPECS, key=lambda p: p.stem not in ("nexus", "hymba_plus"))
    pool = multiprocessing.get_context("spawn").Pool(min(WORKERS, os.cpu_count() or 1))
    try:
        yield {p.stem: pool.apply_async(export_spec, (str(p), str(root / p.stem))) for p in order}
    finally:
        pool.terminate()  # exports nobody waited for (a deselected or failed run) are not waited for now
        pool.join()


@pytest.fixture(scope="session")
def exported(export_jobs):
    """exported(name) -> Exported, waiting for that spec's export."""
    cache: dict[str, Exported] = {}

    def get(name: str) -> Exported:
        if name not in cache:
            info = export_jobs[name].get()
            cache[name] = Exported(name, Path(info["package"]), Path(info["export"]))
        return cache[name]

    return get
