"""Where archgen's templates and kernels are: the one module that knows.

In the repository they are the top-level folders templates/ and kernels/, next to archgen/. An installed wheel
carries them as package data: setup.py maps templates/ to the package archgen.templates and kernels/ to the
top-level package archgen_kernels (not `kernels`: that name belongs to another PyPI project). A source checkout or
an editable install reads the folders themselves, so an edit to a template shows in the next build; anywhere else
the installed copies are read.

kernels/ has no __init__.py on purpose. Wherever the checkout's root is on sys.path (`python -m pytest`, `python -c`,
a script run from the root), a folder `kernels` with an __init__.py is a regular package that hides the PyPI project
`kernels` (Hugging Face's, which transformers >= 5.25 requires and imports): transformers then fails on its first
import. Without one the folder is at most a namespace portion, which a regular package anywhere on sys.path
outranks. archgen_kernels is a namespace package too: registered by `kernels_package()` in a checkout, found as
a folder of site-packages in a wheel install.
"""

from __future__ import annotations

import ast
import importlib
import importlib.machinery
import importlib.util
import sys
from collections.abc import Iterable
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
"""Modules of kernels/ that a generated package's kernels/__init__.py imports itself, whichever kernels it runs."""


def kernel_modules(names: Iterable[str]) -> list[str]:
    """The modules of kernels/ that `names` need, sorted: themselves and every module they import from the package
    (`from .silu_mul import launch_forward`, `from . import triton_support`), followed through those modules' own
    imports. A generated package copies exactly these, so a kernel file may import another's launchers."""
    needed: set[str] = set()
    pending = list(names)
    while pending:
        name = pending.pop()
        if name in needed:
            continue
        path = KERNELS / f"{name}.py"
        if not path.is_file():
            raise FileNotFoundError(f"kernels/{name}.py does not exist; a kernel rule or an import in kernels/ names "
                                    f"it (archgen/passes/kernels.py KERNEL_RULES)")
        needed.add(name)
        pending.extend(_package_imports(path))
    return sorted(needed)


def _package_imports(path: Path) -> list[str]:
    """The sibling modules a kernels/ file imports relatively (its only way to reach them as copied into a package)."""
    imported = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.ImportFrom) and node.level == 1:
            imported.extend([node.module] if node.module else [alias.name for alias in node.names])
    return [name.split(".")[0] for name in imported]


def kernels_package() -> ModuleType:
    """The package archgen_kernels, importable afterwards by name (`from archgen_kernels import selective_scan`).

    In a checkout that is this checkout's kernels/ folder, registered under its package name (an editable install
    may point the name at another checkout, and a source tree on sys.path has no folder of that name). The package
    has no code of its own, so registering it runs nothing; its op files import triton when they are imported."""
    if "archgen_kernels" not in sys.modules and _IN_CHECKOUT:
        spec = importlib.machinery.ModuleSpec("archgen_kernels", None, is_package=True)
        spec.submodule_search_locations = [str(KERNELS)]
        sys.modules["archgen_kernels"] = importlib.util.module_from_spec(spec)
    return importlib.import_module("archgen_kernels")
