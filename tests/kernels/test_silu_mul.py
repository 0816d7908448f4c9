"""kernels/silu_mul.py: silu(gate) · up forward and backward against the kernel file's reference and ops/mlp.py's
silu_mul, at odd sizes (widths that are not a multiple of the tile, one row, rows with a stride), float32 and bfloat16.
Runs in Triton's interpreter without CUDA; kernel-written buffers start as NaN."""

import pytest
import torch

pytest.importorskip("triton")

from archgen_kernels import silu_mul as kernel
from templates.runtime import mlp as runtime_mlp
from tests.numerics import assert_close

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
pytestmark = pytest.mark.usefixtures("poisoned_empty")  # kernel-written buffers start as NaN


CASES = {"fp32-2x7x45": (torch.float32, (2, 7, 45), False), "fp32-1x1x100-strided": (torch.float32, (1, 1, 100), True),
         "bf16-3x5x70": (torch.bfloat16, (3, 5, 70), False), "bf16-9x33-strided": (torch.bfloat16, (9, 33), True)}


@pytest.mark.parametrize("case", CASES)
def test_silu_mul_and_its_gradients_match_the_reference(case):
    check(case)


@pytest.mark.parametrize("case", ["fp32-2x7x45", "bf16-9x33-strided"])
def test_the_gpu_config(case, monkeypatch):
    """The config a GPU launches (CONFIG, 4 × 1024 tiles: one fixed config, no tuner, so the gpu_configs mode has
    nothing to choose; the interpreter's is INTERPRETER_CONFIG) at widths far below its block."""
    monkeypatch.setattr(kernel, "_launch_config", lambda: kernel.CONFIG)
    check(case)


def check(case):
    dtype, shape, strided = CASES[case]
    g = torch.Generator().manual_seed(shape[-1])
    if strided:  # gate and up as the two halves of one row, as a fused projection would give them
        both = (torch.randn(*shape[:-1], 2 * shape[-1], generator=g) * 3).to(DEVICE, dtype)
        gate, up = both[..., : shape[-1]], both[..., shape[-1] :]
        gate, up = gate.detach().requires_grad_(), up.detach().requires_grad_()
    else:
        gate = (torch.randn(*shape, generator=g) * 3).to(DEVICE, dtype).requires_grad_()
        up = torch.randn(*shape, generator=g).to(DEVICE, dtype).requires_grad_()
    y = kernel.silu_mul(gate, up)
    expected = runtime_mlp.silu_mul(gate.double(), up.double())
    assert y.dtype == dtype
    assert_close(y, expected.to(dtype), what="y")
    assert_close(kernel.silu_mul_reference(gate, up), expected.to(dtype), what="reference")
    dy = torch.randn(*shape, generator=g).to(DEVICE, dtype)
    grads = torch.autograd.grad(y, (gate, up), dy)
    want = torch.autograd.grad(expected, (gate, up), dy.double())
    for got, wanted, name in zip(grads, want, ("d gate", "d up"), strict=True):
        assert got.dtype == dtype
        assert_close(got, wanted.to(dtype), what=name)


def test_silu_mul_says_what_is_wrong():
    with pytest.raises(ValueError, match="gate and up must have one shape and dtype"):
        kernel.silu_mul(torch.zeros(2, 3, device=DEVICE), torch.zeros(2, 4, device=DEVICE))


def test_silu_mul_ops_have_fake_implementations():
    g = torch.Generator().manual_seed(0)
    dy, gate, up = (torch.randn(2, 5, generator=g).to(DEVICE) for _ in range(3))
    torch.library.opcheck(kernel.silu_mul_op, (gate, up), test_utils=("test_schema", "test_faketensor"))
    torch.library.opcheck(kernel.silu_mul_backward_op, (dy, gate, up),
                          test_utils=("test_schema", "test_faketensor"))
