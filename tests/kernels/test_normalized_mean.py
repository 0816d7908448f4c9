"""kernels/normalized_mean.py: a two-branch parallel layer's combine against the kernel file's reference and ops/norm.py's
normalized_mean, at odd sizes (widths that are not a power of two, one row, rows with a stride, several rows a
program), float32 and bfloat16. Runs in Triton's interpreter without CUDA; kernel-written buffers start as NaN. The
kernel has no tuner: it launches launch_config(N) in the interpreter as on a GPU, so these tests run the GPU's config
(tests/kernels/gpu_configs.py has nothing to choose here)."""

import pytest
import torch

pytest.importorskip("triton")

from archgen_kernels import normalized_mean as kernel
from templates.runtime import norm as runtime_norm
from tests.numerics import assert_close

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
pytestmark = pytest.mark.usefixtures("poisoned_empty")  # kernel-written buffers start as NaN

EPS = 1e-6
CASES = {"fp32-2x7x45": (torch.float32, (2, 7, 45), False), "fp32-1x1x100-strided": (torch.float32, (1, 1, 100), True),
         "bf16-3x5x70": (torch.bfloat16, (3, 5, 70), False), "bf16-1x1x1600": (torch.bfloat16, (1, 1, 1600), False),
         "bf16-9x33-strided": (torch.bfloat16, (9, 33), True)}


def inputs(dtype, shape, strided, seed):
    g = torch.Generator().manual_seed(seed)
    N = shape[-1]
    if strided:  # the branches as two halves of one row
        both = (torch.randn(*shape[:-1], 2 * N, generator=g) * 3).to(DEVICE, dtype)
        a, b = both[..., :N], both[..., N:]
    else:  # branches of different magnitudes, as attention's and the SSM's outputs are
        a = (torch.randn(*shape, generator=g) * 3).to(DEVICE, dtype)
        b = (torch.randn(*shape, generator=g) / 5).to(DEVICE, dtype)
    vectors = [(1 + torch.randn(N, generator=g) / 2).to(DEVICE, dtype) for _ in range(4)]
    return a, b, vectors


@pytest.mark.parametrize("case", CASES)
def test_normalized_mean_matches_the_reference(case):
    dtype, shape, strided = CASES[case]
    a, b, vectors = inputs(dtype, shape, strided, seed=shape[-1])
    y = kernel.normalized_mean(a, b, *vectors, EPS)
    expected = runtime_norm.normalized_mean(a.double(), b.double(), *(v.double() for v in vectors), EPS)
    assert y.dtype == dtype and y.shape == a.shape
    assert_close(y, expected.to(dtype), what="y")
    assert_close(kernel.normalized_mean_reference(a, b, *vectors, EPS), expected.to(dtype), what="reference")


def test_normalized_mean_says_what_is_wrong():
    a, b, vectors = inputs(torch.float32, (2, 8), False, seed=0)
    with pytest.raises(ValueError, match="the branches must have one shape and dtype"):
        kernel.normalized_mean(a, b[:, :4], *vectors, EPS)
    with pytest.raises(ValueError, match=r"must be \(8,\) like the branches' rows"):
        kernel.normalized_mean(a, b, vectors[0][:4], *vectors[1:], EPS)


def test_normalized_mean_op_has_a_fake_implementation():
    a, b, vectors = inputs(torch.float32, (2, 5), False, seed=1)
    torch.library.opcheck(kernel.normalized_mean_op, (a, b, *vectors, EPS), test_utils=("test_schema", "test_faketensor"))


ADD_NORM_CASES = {"fp32-2x7x45": (torch.float32, (2, 7, 45), False), "bf16-1x1x1600": (torch.bfloat16, (1, 1, 1600), False),
                  "bf16-3x5x70": (torch.bfloat16, (3, 5, 70), False), "bf16-9x33-strided": (torch.bfloat16, (9, 33), True),
                  "fp32-1x1x100-strided": (torch.float32, (1, 1, 100), True)}


def stream_and_norm(dtype, shape, seed):
    """The block's residual stream (larger than a layer's output, as it is deep in a model) and its ffn_norm's weight."""
    g = torch.Generator().manual_seed(seed)
    residual = (torch.randn(*shape, generator=g) * 4).to(DEVICE, dtype)
    weight = (1 + torch.randn(shape[-1], generator=g) / 2).to(DEVICE, dtype)
    return residual, weight


@pytest.mark.parametrize("case", ADD_NORM_CASES)
def test_normalized_mean_add_norm_gives_the_two_launches_bits(case):
    """The fused combine + residual add + norm against what decoding launched before it: normalized_mean, then
    kernels/rmsnorm.py's rms_norm with the residual (y rounded to the dtype, the add rounded, the norm of that),
    bit for bit; and the reference within the dtype's tolerance of float64."""
    from archgen_kernels import rmsnorm

    dtype, shape, strided = ADD_NORM_CASES[case]
    a, b, vectors = inputs(dtype, shape, strided, seed=shape[-1] + 1)
    residual, weight = stream_and_norm(dtype, shape, seed=shape[-1] + 2)
    h, s = kernel.normalized_mean_add_norm(a, b, *vectors, EPS, residual, weight, 1e-5)
    y = kernel.normalized_mean(a, b, *vectors, EPS)
    h_two, s_two = rmsnorm.rms_norm(y, weight, 1e-5, residual)
    assert h.dtype == s.dtype == dtype and h.shape == s.shape == a.shape
    assert torch.equal(s, s_two), (s - s_two).abs().max()
    assert torch.equal(h, h_two), (h - h_two).abs().max()
    expected_h, expected_s = runtime_norm.normalized_mean_add_norm(
        a.double(), b.double(), *(v.double() for v in vectors), EPS, residual.double(), weight.double(), 1e-5)
    assert_close(s, expected_s.to(dtype), what="s")
    assert_close(h, expected_h.to(dtype), what="h")
    reference_h, reference_s = kernel.normalized_mean_add_norm_reference(a, b, *vectors, EPS, residual, weight, 1e-5)
    assert_close(reference_s, expected_s.to(dtype), what="reference s")
    assert_close(reference_h, expected_h.to(dtype), what="reference h")


def test_normalized_mean_add_norm_promotes_as_the_residual_add_does():
    """Under bf16 autocast a float32 residual stream meets bf16 branches: y rounded to bfloat16, the add and the norm
    in float32, as add_rms_norm promotes."""
    from archgen_kernels import rmsnorm

    a, b, vectors = inputs(torch.bfloat16, (3, 40), False, seed=3)
    residual, weight = stream_and_norm(torch.float32, (3, 40), seed=4)
    h, s = kernel.normalized_mean_add_norm(a, b, *vectors, EPS, residual, weight, 1e-5)
    h_two, s_two = rmsnorm.rms_norm(kernel.normalized_mean(a, b, *vectors, EPS), weight, 1e-5, residual)
    assert h.dtype == s.dtype == torch.float32
    assert torch.equal(s, s_two) and torch.equal(h, h_two)


def test_normalized_mean_add_norm_says_what_is_wrong():
    a, b, vectors = inputs(torch.float32, (2, 8), False, seed=0)
    residual, weight = stream_and_norm(torch.float32, (2, 8), seed=1)
    with pytest.raises(ValueError, match="the residual stream must be"):
        kernel.normalized_mean_add_norm(a, b, *vectors, EPS, residual[:, :4], weight, EPS)
    with pytest.raises(ValueError, match=r"the norm's weight \(8,\)"):
        kernel.normalized_mean_add_norm(a, b, *vectors, EPS, residual, weight[:4], EPS)


def test_normalized_mean_add_norm_op_has_a_fake_implementation():
    a, b, vectors = inputs(torch.float32, (2, 5), False, seed=1)
    residual, weight = stream_and_norm(torch.float32, (2, 5), seed=2)
    torch.library.opcheck(kernel.normalized_mean_add_norm_op, (a, b, *vectors, EPS, residual, weight, 1e-5),
                          test_utils=("test_schema", "test_faketensor"))


def test_the_decomposition_maps_each_op_to_its_reference():
    table = kernel.decomposition(runtime_norm.normalized_mean_add_norm, max_seqlen=1)
    assert table == {kernel.op_overload("normalized_mean_add_norm"): runtime_norm.normalized_mean_add_norm}
    assert kernel.decomposition(runtime_norm.normalized_mean, 1) == {
        kernel.op_overload("normalized_mean"): runtime_norm.normalized_mean}
