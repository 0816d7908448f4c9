"""Put a rendered package on disk atomically, or compare it with what is there.

The package is written into a temporary sibling directory and renamed into place only when complete, so an
interrupted or failed build leaves the previous output as it was.
"""

from __future__ import annotations

import difflib
import os
import shutil
import tempfile
from pathlib import Path


def write_package(files: dict[str, str], target: Path) -> None:
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.building-", dir=target.parent))
    try:
        for relative, text in files.items():
            path = staging / relative
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text, encoding="utf-8")
        replace_directory(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def replace_directory(staging: Path, target: Path) -> None:
    """Move a completed `staging` directory to `target`, retiring what was there only once the new one is in place."""
    if target.exists():
        retired = target.parent / f".{target.name}.old-{os.getpid()}-{staging.name}"
        target.rename(retired)
        staging.rename(target)
        shutil.rmtree(retired, ignore_errors=True)
    else:
        staging.rename(target)


def diff_package(files: dict[str, str], target: Path) -> list[str]:
    """Unified diffs (one string per differing file) between the rendered files and the directory on disk."""
    target = Path(target)
    diffs = []
    on_disk = ({str(p.relative_to(target)) for p in target.rglob("*") if p.is_file() and "__pycache__" not in p.parts}
               if target.exists() else set())
    for relative in sorted(set(files) | on_disk):
        expected = files.get(relative)
        path = target / relative
        actual = path.read_text(encoding="utf-8") if path.exists() else None
        if expected == actual:
            continue
        diff = difflib.unified_diff((actual or "").splitlines(keepends=True), (expected or "").splitlines(keepends=True),
                                    fromfile=f"{path} (on disk{'' if actual is not None else ', missing'})",
                                    tofile=f"{path} (from spec{'' if expected is not None else ': should not exist'})")
        diffs.append("".join(diff))
    return diffs
