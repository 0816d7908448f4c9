"""What the kernel tests share. tests/conftest.py has already chosen Triton's interpreter where there is no GPU
(TRITON_INTERPRET=1, before triton is first imported); here CPU tensors are sent through the kernels in it, and a test
module can have every buffer a kernel writes start as NaN:

    pytestmark = pytest.mark.usefixtures("poisoned_empty")
"""

import math

import pytest
import torch


@pytest.fixture(autouse=True)
def triton_on_cpu(monkeypatch):
    """CPU tensors run the kernels in Triton's interpreter, not the operator's CPU reference path."""
    monkeypatch.setenv("ARCHGEN_TRITON_ON_CPU", "1")


@pytest.fixture
def poisoned_empty(monkeypatch):
    """Every floating torch.empty / empty_like starts as NaN while the test runs, so an element a kernel forgets to
    write shows up."""
    empty, empty_like = torch.empty, torch.empty_like

    def poison(t):
        return t.fill_(math.nan) if t.is_floating_point() else t

    monkeypatch.setattr(torch, "empty", lambda *a, **k: poison(empty(*a, **k)))
    monkeypatch.setattr(torch, "empty_like", lambda *a, **k: poison(empty_like(*a, **k)))
