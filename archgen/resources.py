"""Where archgen's templates and kernels are: the one module that knows.

In the repository they are the top-level folders templates/ and kernels/, next to archgen/. An installed wheel
carries them as package data: setup.py maps templates/ to the package archgen.templates and kernels/ to the
top-level package archgen_kernels (not `kernels`: that name belongs to another PyPI project). A source checkout or
an editable install reads the folders themselves, so an edit to a template shows in the next build; anywhere else
the installed copies are read.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
from pathlib import Path
from types import ModuleType

_CHECKOUT = Path(__file__).resolve().parents[1]
_IN_CHECKOUT = (_CHECKOUT / "pyproject.toml").is_file() and (_CHECKOUT / "templates").is_dir()


def _installed_package_dir(package: str) -> Path:
    """The directory of an installed package, found without importing (running) it."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"archgen's package data '{package}' is not installed; reinstall archgen (pip install .)")
    return Path(next(iter(spec.submodule_search_locations)))


TEMPLATES: Path = _CHECKOUT / "templates" if _IN_CHECKOUT else _installed_package_dir("archgen") / "templates"
KERNELS: Path = _CHECKOUT / "kernels" if _IN_CHECKOUT else _installed_package_dir("archgen_kernels")
KERNEL_SUPPORT_FILES = ("triton_support",)
"""Modules of kernels/ that every op file imports: a generated package that uses any kernel carries them too."""


def kernels_package() -> ModuleType:
    """The package archgen_kernels, importable afterwards by name (`from archgen_kernels import selective_scan`).

    In a checkout that is this checkout's kernels/ folder, registered under its package name (an editable install
    may point the name at another checkout, and a source tree on sys.path has no folder of that name)."""
    if "archgen_kernels" not in sys.modules and _IN_CHECKOUT:
        spec = importlib.util.spec_from_file_location("archgen_kernels", KERNELS / "__init__.py",
                                                      submodule_search_locations=[str(KERNELS)])
        module = importlib.util.module_from_spec(spec)
        sys.modules["archgen_kernels"] = module
        spec.loader.exec_module(module)
    return importlib.import_module("archgen_kernels")
