"""kernels/combine_swiglu.py: the parallel combine in the SwiGLU GEMV's prologue against the two launches it replaces
(normalized_mean_add_norm, then swiglu_linear) and against float64, at odd sizes (widths that are not a power of two,
weight rows that are not a multiple of the tile, several rows, a strided branch), with each tile config the kernel
has (its programs striding over the weight blocks), float32 and bfloat16. Runs in Triton's interpreter without CUDA;
kernel-written buffers start as NaN."""

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("triton")

from archgen_kernels import combine_swiglu as kernel
from archgen_kernels import gemv, normalized_mean
from tests.numerics import assert_close

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
pytestmark = pytest.mark.usefixtures("poisoned_empty")  # kernel-written buffers start as NaN

EPS, NORM_EPS = 1e-6, 1e-5
# (dtype, leading shape, K, N, bias, strided branches)
CASES = {"fp32-2x3-k45-n37": (torch.float32, (2, 3), 45, 37, False, False),
         "bf16-1x1-k1600-n40": (torch.bfloat16, (1, 1), 1600, 40, False, False),
         "bf16-4-k70-n33-bias": (torch.bfloat16, (4,), 70, 33, True, False),
         "bf16-3x1-k100-n9-strided": (torch.bfloat16, (3, 1), 100, 9, False, True)}


def inputs(dtype, lead, K, N, bias, strided, seed):
    g = torch.Generator().manual_seed(seed)

    def rand(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g) * scale).to(DEVICE, dtype)

    if strided:  # the branches as two halves of one row
        both = rand(*lead, 2 * K, scale=3)
        a, b = both[..., :K], both[..., K:]
    else:  # branches of different magnitudes, as attention's and the SSM's outputs are
        a, b = rand(*lead, K, scale=3), rand(*lead, K, scale=0.2)
    vectors = [(1 + torch.randn(K, generator=g) / 2).to(DEVICE, dtype) for _ in range(4)]
    norm_weight = (1 + torch.randn(K, generator=g) / 2).to(DEVICE, dtype)
    residual = rand(*lead, K, scale=4)
    gate, up = rand(N, K, scale=K ** -0.5), rand(N, K, scale=K ** -0.5)
    biases = (rand(N), rand(N)) if bias else (None, None)
    return (a, b, *vectors, EPS, norm_weight, NORM_EPS), residual, (gate, up, *biases)


def float64_result(branches, residual, ffn):
    a, b, wa, sa, wb, sb, eps, wn, norm_eps = (t.double() if torch.is_tensor(t) else t for t in branches)

    def normed(x, w, s):
        return x * torch.rsqrt(x.square().mean(-1, keepdim=True) + eps) * w * s

    s = residual.double() + (normed(a, wa, sa) + normed(b, wb, sb)) / 2
    h = s * torch.rsqrt(s.square().mean(-1, keepdim=True) + norm_eps) * wn
    gate, up, gate_bias, up_bias = (t.double() if t is not None else None for t in ffn)
    return F.silu(F.linear(h, gate, gate_bias)) * F.linear(h, up, up_bias), s


# each tile shape, with 3 programs (an SM, and the interpreter's one SM) striding over blocks not a multiple of 3
TILE_CONFIGS = [c for c in kernel.CONFIGS if c["PROGRAMS_PER_SM"] == 3]


@pytest.mark.parametrize("config", [None, *TILE_CONFIGS], ids=lambda c: "default" if c is None else
                         f"n{c['BLOCK_N']}w{c['num_warps']}p{c['PROGRAMS_PER_SM']}")
@pytest.mark.parametrize("case", CASES)
def test_one_launch_matches_the_two_launches_and_float64(case, config, monkeypatch):
    dtype, lead, K, N, bias, strided = CASES[case]
    branches, residual, ffn = inputs(dtype, lead, K, N, bias, strided, seed=K + N)
    if config is not None:  # the launcher's config, as bench/combine_probe.py passes it
        launcher = kernel.combined_swiglu_forward
        monkeypatch.setattr(kernel, "combined_swiglu_forward", lambda *args: launcher(*args, config=config))
    y, s = kernel.combined_swiglu_linear(*branches, residual, *ffn)
    assert y.shape == (*lead, N) and s.shape == (*lead, K) and y.dtype == s.dtype == dtype
    h_two, s_two = normalized_mean.normalized_mean_add_norm(*branches[:7], residual, *branches[7:])
    y_two = gemv.swiglu_linear(h_two, *ffn)
    expected_y, expected_s = float64_result(branches, residual, ffn)
    assert_close(s, expected_s.to(dtype), what="s")
    assert_close(y, expected_y.to(dtype), what="y")
    assert_close(s, s_two, what="s against the two launches")
    assert_close(y, y_two, what="y against the two launches")
    reference_y, reference_s = kernel.combined_swiglu_linear_reference(*branches, residual, *ffn)
    assert_close(reference_s, expected_s.to(dtype), what="reference s")
    assert_close(reference_y, expected_y.to(dtype), what="reference y")


def test_rows_wider_than_a_register_tile_take_the_reference():
    branches, residual, ffn = inputs(torch.float32, (1,), kernel.MAX_K + 8, 3, False, False, seed=0)
    y, s = kernel.combined_swiglu_linear(*branches, residual, *ffn)
    expected_y, expected_s = kernel.combined_swiglu_linear_reference(*branches, residual, *ffn)
    assert torch.equal(y, expected_y) and torch.equal(s, expected_s)


def test_combined_swiglu_linear_says_what_is_wrong():
    branches, residual, (gate, up, _, _) = inputs(torch.float32, (2,), 8, 5, False, False, seed=1)
    with pytest.raises(ValueError, match="the residual stream must be"):
        kernel.combined_swiglu_linear(*branches, residual[:, :4], gate, up)
    with pytest.raises(ValueError, match="the gate and up weights must be one shape"):
        kernel.combined_swiglu_linear(*branches, residual, gate, up[:3])
    with pytest.raises(ValueError, match="the branches must have one shape"):
        kernel.combined_swiglu_linear(branches[0], branches[1][:, :4], *branches[2:], residual, gate, up)


def test_combined_swiglu_linear_op_has_a_fake_implementation():
    branches, residual, ffn = inputs(torch.float32, (2,), 8, 5, True, False, seed=2)
    torch.library.opcheck(kernel.combined_swiglu_linear_op, (*branches, residual, *ffn),
                          test_utils=("test_schema", "test_faketensor"))
