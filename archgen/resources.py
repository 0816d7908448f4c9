"""Where archgen's templates and kernels are: the one module that knows.

In the repository they are the top-level folders templates/ and kernels/, next to archgen/. An installed wheel
carries them as package data: setup.py maps templates/ to the package archgen.templates and kernels/ to the
top-level package archgen_kernels (not `kernels`: that name belongs to another PyPI project). A source checkout or
an editable install reads the folders themselves, so an edit to a template shows in the next build; anywhere else
the installed copies are read.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

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
