"""What the kernel tests share. tests/conftest.py has already chosen Triton's interpreter where there is no GPU
(TRITON_INTERPRET=1, before triton is first imported); here CPU tensors are sent through the kernels in it, and a test
module can have every buffer a kernel writes start as NaN:

    pytestmark = pytest.mark.usefixtures("poisoned_empty")

and a test can launch the configs a GPU launches instead of the interpreter's one config per tuner (the `gpu_configs`
fixture: tests/kernels/gpu_configs.py).

Each test module puts its tensors on DEVICE, "cuda" where there is a GPU, else "cpu" (the interpreter): a tensor left
on the CPU beside CUDA ones would make a GPU run test the reference (the ops' CPU path) or fail to launch.
"""

import math

import pytest
import torch
from torch.utils._device import _device_constructors

from tests.kernels.gpu_configs import GpuConfigs


@pytest.fixture(autouse=True)
def triton_on_cpu(monkeypatch):
    """CPU tensors run the kernels in Triton's interpreter, not the operator's CPU reference path."""
    monkeypatch.setenv("ARCHGEN_TRITON_ON_CPU", "1")


@pytest.fixture
def poisoned_empty(monkeypatch):
    """Every floating torch.empty / empty_like starts as NaN while the test runs, so an element a kernel forgets to
    write shows up.

    torch caches, once per process, which functions build tensors (the set `with torch.device(...)` redirects, and
    torch.compile's list of overridable functions). Built for the first time while torch.empty is patched (a test
    here compiling a kernel), they hold the patch instead of torch.empty, and every later `with
    torch.device("meta")` in the process made CPU buffers (tests/generated/test_decode_ops.py failed after
    test_decode_attention.py's compile test). So they are built before the patch."""
    _device_constructors()
    torch.overrides.get_overridable_functions()
    empty, empty_like = torch.empty, torch.empty_like

    def poison(t):
        return t.fill_(math.nan) if t.is_floating_point() else t

    monkeypatch.setattr(torch, "empty", lambda *a, **k: poison(empty(*a, **k)))
    monkeypatch.setattr(torch, "empty_like", lambda *a, **k: poison(empty_like(*a, **k)))


@pytest.fixture(autouse=True)
def untuned_on_the_gpu(monkeypatch):
    """On a GPU every kernel runs its default config, as a generated package does before `archgen build --autotune`
    (its kernels/__init__.py turns RUNTIME_TUNING off), instead of compiling and timing each candidate of each new
    shape bucket (one test of test_causal_conv1d.py took 35 s that way in GPU call 1 of session 7). A test of other
    configs passes them itself, and tuning sessions tune either way."""
    if torch.cuda.is_available():
        from archgen_kernels import triton_support

        monkeypatch.setattr(triton_support, "RUNTIME_TUNING", False)


@pytest.fixture
def gpu_configs(monkeypatch):
    """Launch the configs a GPU launches (GpuConfigs): a test parametrized with `choice` in gpu_choices(n) calls
    gpu_configs.choose(choice) and runs its ops inside `with gpu_configs.named():`."""
    return GpuConfigs(monkeypatch)
