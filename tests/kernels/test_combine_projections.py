"""kernels/combine_projections.py: a parallel layer's two output projections with the combine in the epilogue of the
one that completes the pair, against what decoding launched before it (two GEMVs, then normalized_mean_add_norm):
the projections bit for bit at the same tiles, the combine bit for bit in the interpreter and within rounding on a
GPU (other warps reduce the row); and against the reference; either branch first, one row and several, float32 and
bfloat16. Runs in Triton's interpreter without CUDA; kernel-written buffers start as NaN."""

import pytest
import torch

pytest.importorskip("triton")

from archgen_kernels import combine_projections as kernel
from archgen_kernels import gemv, normalized_mean
from tests.numerics import assert_close

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
pytestmark = pytest.mark.usefixtures("poisoned_empty")

EPS, NORM_EPS = 1e-6, 1e-5
CASES = {"bf16-1x45-K40-K72": (torch.bfloat16, 1, 45, 40, 72), "fp32-3x70-K33-K64": (torch.float32, 3, 70, 33, 64),
         "bf16-2x100-K64-K50": (torch.bfloat16, 2, 100, 64, 50)}


def layer(dtype, rows, N, K_a, K_b, seed):
    """The branches' rows before their projections, the projections, the combine's vectors, the residual stream and
    the feed-forward norm's weight."""
    g = torch.Generator().manual_seed(seed)

    def rand(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g) * scale).to(DEVICE, dtype)

    x_a, x_b = rand(rows, K_a), rand(rows, K_b, scale=3.0)
    w_a, w_b = rand(N, K_a, scale=K_a ** -0.5), rand(N, K_b, scale=0.2 * K_b ** -0.5)
    vectors = [(1 + torch.randn(N, generator=g) / 2).to(DEVICE, dtype) for _ in range(4)]
    residual, norm_weight = rand(rows, N, scale=4.0), 1 + rand(N, scale=0.5)
    return x_a, x_b, w_a, w_b, vectors, residual, norm_weight


def call_pair(x_a, x_b, w_a, w_b, vectors, residual, norm_weight, order, call=kernel.combining_linear_):
    a, b, h, s = (torch.empty_like(residual) for _ in range(4))
    inputs = {0: (x_a, w_a), 1: (x_b, w_b)}
    for branch in order:
        x, w = inputs[branch]
        call(x, w, branch, a, b, *vectors, EPS, residual, norm_weight, NORM_EPS, h, s)
    return a, b, h, s, kernel.arrival_counter(residual.device)


@pytest.mark.parametrize("order", [(0, 1), (1, 0)], ids=["a-first", "b-first"])
@pytest.mark.parametrize("case", CASES)
def test_the_pair_gives_the_three_launches_bits(case, order):
    dtype, rows, N, K_a, K_b = CASES[case]
    x_a, x_b, w_a, w_b, vectors, residual, norm_weight = layer(dtype, rows, N, K_a, K_b, seed=N + len(order))
    a, b, h, s, arrivals = call_pair(x_a, x_b, w_a, w_b, vectors, residual, norm_weight, order)
    # the GEMV's sums at the projections' own tiles and warps: the same bits
    a_two, b_two = (gemv.gemv_forward(x, w, config=kernel.launch_config(N, w.shape[1])) for x, w in ((x_a, w_a), (x_b, w_b)))
    assert torch.equal(a, a_two) and torch.equal(b, b_two), ((a - a_two).abs().max(), (b - b_two).abs().max())
    h_two, s_two = normalized_mean.normalized_mean_add_norm(a_two, b_two, *vectors, EPS, residual, norm_weight,
                                                            NORM_EPS)
    if DEVICE == "cpu":  # the interpreter reduces alike at any warp count
        assert torch.equal(s, s_two) and torch.equal(h, h_two), ((s - s_two).abs().max(), (h - h_two).abs().max())
    else:  # the combine's row sums over other warps than normalized_mean's launch: an rstd may differ in its last bit
        assert_close(s, s_two, what="s")
        assert_close(h, h_two, what="h")
    assert arrivals.item() == 0  # zero again for the next pair (a CUDA graph's replay reuses it)


@pytest.mark.parametrize("case", CASES)
def test_the_reference_matches_float64(case):
    dtype, rows, N, K_a, K_b = CASES[case]
    x_a, x_b, w_a, w_b, vectors, residual, norm_weight = layer(dtype, rows, N, K_a, K_b, seed=N)
    a, b, h, s, arrivals = call_pair(x_a, x_b, w_a, w_b, vectors, residual, norm_weight, (1, 0),
                                     call=kernel.combining_linear_reference)
    a64, b64 = (x.double() @ w.double().t() for x, w in ((x_a, w_a), (x_b, w_b)))
    h64, s64 = normalized_mean.normalized_mean_add_norm_reference(
        a64, b64, *(v.double() for v in vectors), EPS, residual.double(), norm_weight.double(), NORM_EPS)
    assert_close(a, a64.to(dtype), what="a")
    assert_close(b, b64.to(dtype), what="b")
    assert_close(s, s64.to(dtype), what="s")
    assert_close(h, h64.to(dtype), what="h")
    assert arrivals.item() == 0


def test_one_call_alone_leaves_the_outputs_unwritten_and_an_error_resets_the_count():
    """The first projection of a pair writes its branch and counts; h and s wait for the second. An exception inside
    ParallelCombine's context (a branch failing between the two) zeroes the count, so the next pair is whole."""
    x_a, x_b, w_a, w_b, vectors, residual, norm_weight = layer(torch.float32, 2, 45, 40, 72, seed=5)
    try:
        a, b, h, s, arrivals = call_pair(x_a, x_b, w_a, w_b, vectors, residual, norm_weight, (0,))
        assert torch.equal(a, gemv.gemv_forward(x_a, w_a))
        assert h.isnan().all() and s.isnan().all() and b.isnan().all()
        assert arrivals.item() == 2 * 45
    finally:
        kernel.arrival_counter(residual.device).zero_()

    norms = [torch.nn.RMSNorm(45, eps=EPS).to(DEVICE) for _ in "ab"]
    combine = kernel.ParallelCombine(x_a, residual, norms[0], vectors[1], norms[1], vectors[3], norms[0])
    linear = torch.nn.Linear(40, 45, bias=False, device=DEVICE).requires_grad_(False)
    with pytest.raises(RuntimeError, match="a branch failed"), combine:
        combine.project(0, x_a, linear)
        assert kernel.arrival_counter(residual.device).item() == 2 * 45
        raise RuntimeError("a branch failed")
    assert kernel.arrival_counter(residual.device).item() == 0


def test_parallel_combine_runs_the_pair_for_the_model():
    """The helper the generated mixer calls: its outputs in the branches' dtype and the promoted one (a float32
    residual stream under bf16 branches, as autocast leaves it)."""
    x_a, x_b, w_a, w_b, vectors, residual, norm_weight = layer(torch.bfloat16, 1, 45, 40, 72, seed=6)
    residual = residual.float()
    norms = [torch.nn.RMSNorm(45, eps=EPS).to(DEVICE, torch.bfloat16) for _ in "ab"]
    for norm, weight in zip(norms, vectors[0::2], strict=True):
        norm.weight.data.copy_(weight)
    ffn_norm = torch.nn.RMSNorm(45, eps=NORM_EPS).to(DEVICE)
    ffn_norm.weight.data.copy_(norm_weight.float())
    projections = []
    for w in (w_a, w_b):
        linear = torch.nn.Linear(w.shape[1], w.shape[0], bias=False, device=DEVICE, dtype=w.dtype).requires_grad_(False)
        projections.append(linear)
        linear.weight.copy_(w)
    combine = kernel.ParallelCombine(x_a, residual, norms[0], vectors[1], norms[1], vectors[3], ffn_norm)
    combine.project(1, x_b, projections[1])
    combine.project(0, x_a, projections[0])
    h_two, s_two = normalized_mean.normalized_mean_add_norm(gemv.gemv_forward(x_a, w_a), gemv.gemv_forward(x_b, w_b),
                                                            vectors[0], vectors[1], vectors[2], vectors[3], EPS,
                                                            residual, ffn_norm.weight, NORM_EPS)
    assert combine.h.dtype == combine.s.dtype == torch.float32 and combine.a.dtype == torch.bfloat16
    assert torch.equal(combine.h, h_two) and torch.equal(combine.s, s_two)


def test_wrong_shapes_are_named():
    x_a, x_b, w_a, w_b, vectors, residual, norm_weight = layer(torch.float32, 2, 45, 40, 72, seed=7)
    with pytest.raises(ValueError, match=r"the weight must be \(45, 40\)"):
        call_pair(x_a, x_b, w_b, w_b, vectors, residual, norm_weight, (0,))
    with pytest.raises(ValueError, match=r"must be \(45,\)"):
        call_pair(x_a, x_b, w_a, w_b, [v[:5] for v in vectors], residual, norm_weight, (0,))
    with pytest.raises(ValueError, match="must match the residual's shape"):
        call_pair(x_a[:1], x_b, w_a, w_b, vectors, residual, norm_weight, (0,))


def test_the_op_has_a_fake_implementation():
    x_a, x_b, w_a, w_b, vectors, residual, norm_weight = layer(torch.float32, 1, 8, 6, 10, seed=8)
    a, b, h, s = (torch.zeros_like(residual) for _ in range(4))
    try:
        torch.library.opcheck(kernel.combining_linear_op,
                              (x_a, w_a, 0, a, b, *vectors, EPS, residual, norm_weight, NORM_EPS, h, s),
                              test_utils=("test_schema", "test_faketensor"))
    finally:  # opcheck's calls count one branch each
        kernel.arrival_counter(residual.device).zero_()
