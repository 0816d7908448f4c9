"""Build a spec's package when it is stale and import it under a private module name."""

from __future__ import annotations

import importlib.util
import sys
import uuid
from pathlib import Path

from archgen.emit import diff_package, emit, write_package
from archgen.pipeline import Compiled


def build_if_stale(compiled: Compiled, spec_path: Path, target: Path) -> bool:
    """Write the package for `compiled` to `target` unless what is there is identical; True when it wrote."""
    emitted = emit(compiled, spec_path.as_posix())
    if target.exists() and not diff_package(emitted.files, target):
        return False
    write_package(emitted.files, target)
    return True


def import_package(directory: Path):
    """Import a generated package from `directory` under a fresh module name, so two builds never shadow each other."""
    name = f"_archgen_train_{uuid.uuid4().hex}"
    spec = importlib.util.spec_from_file_location(name, Path(directory) / "__init__.py",
                                                  submodule_search_locations=[str(directory)])
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module
