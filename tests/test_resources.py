"""archgen/resources.py: which kernels/ modules a generated package must carry for the kernel files it runs."""

import os
from pathlib import Path

import pytest

from archgen import resources


def test_kernel_modules_follow_relative_imports_transitively(tmp_path, monkeypatch):
    (tmp_path / "support.py").write_text("import torch\n")
    (tmp_path / "shared.py").write_text("from . import support\n")
    (tmp_path / "op.py").write_text("import math\n\nfrom .shared import launch\nfrom .support import register_op\n")
    (tmp_path / "unused.py").write_text("from .support import x\n")
    monkeypatch.setattr(resources, "KERNELS", tmp_path)
    assert resources.kernel_modules(["op"]) == ["op", "shared", "support"]
    assert resources.kernel_modules(["shared", "op"]) == ["op", "shared", "support"]


def test_swiglu_needs_the_silu_mul_kernels():
    assert resources.kernel_modules(["swiglu"]) == ["silu_mul", "swiglu", "triton_support"]
    assert resources.kernel_modules(["rmsnorm"]) == ["rmsnorm", "triton_support"]


def test_a_missing_kernel_module_is_named(tmp_path, monkeypatch):
    (tmp_path / "op.py").write_text("from .gone import f\n")
    monkeypatch.setattr(resources, "KERNELS", tmp_path)
    with pytest.raises(FileNotFoundError, match=r"kernels/gone\.py does not exist"):
        resources.kernel_modules(["op"])


@pytest.mark.parametrize("folder", [".", "bench"])
def test_the_checkout_does_not_hide_the_pypi_kernels_package(folder):
    """From the checkout's root (as `python -m pytest` and `python -c` run) and from bench/ (as the GPU runs start its
    scripts), the name `kernels` must not resolve to a file of the checkout: transformers imports Hugging Face's
    `kernels` and fails on ours (CI, transformers 5.25: kernels/ with an __init__.py, then bench/kernels.py)."""
    import subprocess
    import sys

    checkout = resources.KERNELS.parent
    probe = "import importlib.util as u; s = u.find_spec('kernels'); print(s and s.origin)"
    origin = subprocess.run([sys.executable, "-c", probe], cwd=checkout / folder, capture_output=True, text=True,
                            check=True, env={**os.environ, "PYTHONPATH": str(checkout)}).stdout.strip()
    found = Path(origin) if origin != "None" else None  # None: no module, or a namespace package
    # a virtual environment inside the checkout (CI's .venv-ci) may hold the real one
    assert found is None or not found.is_relative_to(checkout) or "site-packages" in found.parts, origin
    assert resources.kernels_package().__path__[0] == str(resources.KERNELS)
