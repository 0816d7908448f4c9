"""kernels/swiglu.py: the fused silu(gate) * up against its reference and the runtime's, forward and both halves of
the gradient, in Triton's interpreter without CUDA, at odd sizes (rows and width not multiples of the tile, a strided
row view). Kernel-written buffers start as NaN (torch.empty is poisoned)."""

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("triton")

from archgen_kernels import swiglu as sg
from archgen_kernels import triton_support
from templates.runtime import moe as runtime_moe
from tests.kernels.gpu_configs import gpu_choices
from tests.numerics import assert_close

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
pytestmark = pytest.mark.usefixtures("poisoned_empty")  # kernel-written buffers start as NaN


def eager_swiglu(h):
    gate, up = h.double().chunk(2, dim=-1)
    return F.silu(gate) * up


@pytest.mark.parametrize(("dtype", "shape"), [(torch.float32, (37, 2 * 21)), (torch.bfloat16, (3, 5, 2 * 19))])
def test_swiglu_forward_and_backward_match_float64(dtype, shape):
    check(dtype, shape)


@pytest.mark.parametrize("choice", gpu_choices(2))
@pytest.mark.parametrize(("dtype", "shape"), [(torch.float32, (37, 2 * 21)), (torch.bfloat16, (3, 5, 2 * 19))],
                         ids=["fp32-37x42", "bf16-3x5x38"])
def test_every_gpu_config(gpu_configs, choice, dtype, shape):
    """Forward and backward at each config a GPU can launch (gpu_configs.py: tiles of 2 × 2048, 4 × 1024, 8 × 512)
    on rows and widths far from any tile's multiple."""
    gpu_configs.choose(choice)
    with gpu_configs.named():
        check(dtype, shape)


def check(dtype, shape):
    g = torch.Generator().manual_seed(shape[-1])
    h = (torch.randn(shape, generator=g) * 3).to(DEVICE, dtype).requires_grad_()
    dy = torch.randn((*shape[:-1], shape[-1] // 2), generator=g).to(DEVICE, dtype)
    y = sg.swiglu(h)
    (dh,) = torch.autograd.grad(y, h, dy)
    h64 = h.detach().double().requires_grad_()
    y64 = eager_swiglu(h64)
    (dh64,) = torch.autograd.grad(y64, h64, dy.double())
    assert y.dtype == dtype and dh.dtype == dtype
    assert_close(y, y64.to(dtype), what="y")
    half = shape[-1] // 2
    assert_close(dh[..., :half], dh64[..., :half].to(dtype), what="d gate")
    assert_close(dh[..., half:], dh64[..., half:].to(dtype), what="d up")


def test_swiglu_reads_a_strided_row_view():
    """The gated matmul's output may be a view with a row stride wider than 2H (e.g. a slice of a wider buffer)."""
    g = torch.Generator().manual_seed(1)
    wide = torch.randn(9, 40, generator=g).to(DEVICE)
    h = wide[:, 3:3 + 26]  # (9, 26), row stride 40
    assert_close(sg.swiglu_forward(h), eager_swiglu(h).float())
    dy = torch.randn(9, 13, generator=g).to(DEVICE)
    h64 = h.double().requires_grad_()
    (dh64,) = torch.autograd.grad(eager_swiglu(h64), h64, dy.double())
    assert_close(sg.swiglu_backward(dy, h), dh64.float())


def test_swiglu_matches_the_runtime_reference():
    """ops/moe.py's swiglu is the op's reference and its ONNX lowering: the same function."""
    h = torch.randn(6, 2 * 11, generator=torch.Generator().manual_seed(2)).to(DEVICE)
    assert_close(sg.swiglu(h), runtime_moe.swiglu(h))
    assert sg.decomposition(runtime_moe.swiglu, max_seqlen=1)[sg.op_overload("swiglu")] is runtime_moe.swiglu


def test_swiglu_with_no_rows():
    h = torch.randn(0, 8, device=DEVICE, requires_grad=True)
    y = sg.swiglu(h)
    assert y.shape == (0, 4)
    y.sum().backward()
    assert h.grad.shape == (0, 8)


def test_swiglu_rejects_an_odd_width():
    with pytest.raises(ValueError, match="even last dim"):
        sg.swiglu(torch.randn(3, 7, device=DEVICE))


def test_autotune_hook_tunes_the_width_a_moe_op_runs():
    """`archgen build --autotune` calls autotune(config, params, batch, seqlen, dtype, device) for a MoE op: both
    tuners get the bucket of the experts' hidden width (under the interpreter, its one config)."""
    with triton_support.tuning_session() as table:
        sg.autotune({"top_k": 2}, {"w_in": (3, 8, 2 * 20), "w_out": (3, 20, 8)}, 2, 3, torch.float32, DEVICE)
        entries = table()["entries"]
    key = sg.shape_key(20, torch.float32)
    assert {(e["kernel"], e["key"]) for e in entries} == {("swiglu.forward", key), ("swiglu.backward", key)}
