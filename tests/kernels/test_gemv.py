"""kernels/gemv.py: linear and swiglu_linear on a few rows against the kernel file's references and ops/linear.py, at
odd sizes (outputs and inputs that are not a multiple of the tile, one row and several, a strided x, with and without
a bias), float32 and bfloat16, with their gradients. Runs in Triton's interpreter without CUDA; kernel-written buffers
start as NaN."""

import math
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # must precede the first import of triton
pytest.importorskip("triton")

from archgen_kernels import gemv as kernel
from templates.runtime import linear as runtime_linear
from tests.kernels.gpu_configs import gpu_choices
from tests.numerics import assert_close

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
pytestmark = pytest.mark.usefixtures("poisoned_empty")  # tests/kernels/conftest.py


# id: (dtype, rows of x (leading shape), N out, K in, bias, x strided)
CASES = {"fp32-M1-N37-K70-bias": (torch.float32, (1, 1), 37, 70, True, False),
         "fp32-M3-N5-K33": (torch.float32, (3,), 5, 33, False, True),
         "bf16-M1-N64-K100": (torch.bfloat16, (1, 1), 64, 100, False, False),
         "bf16-M4-N23-K96-bias-strided": (torch.bfloat16, (2, 2), 23, 96, True, True)}


def _inputs(case, gated: bool):
    dtype, lead, N, K, bias, strided = CASES[case]
    g = torch.Generator().manual_seed(N * K)
    x = torch.randn(*lead, 2 * K if strided else K, generator=g).to(DEVICE, dtype)
    x = x[..., :K] if strided else x  # the first half of each row, as a fused projection's slice would give it
    weights = [(torch.randn(N, K, generator=g) / math.sqrt(K)).to(DEVICE, dtype) for _ in range(2 if gated else 1)]
    biases = [torch.randn(N, generator=g).to(DEVICE, dtype) if bias else None for _ in weights]
    return x.requires_grad_(), [w.requires_grad_() for w in weights], [b.requires_grad_() if bias else None for b in biases]


def _compare_with_gradients(y, expected, inputs, g_seed):
    dy = torch.randn(y.shape, generator=torch.Generator().manual_seed(g_seed)).to(y.device, y.dtype)
    present = [t for t in inputs if t is not None]
    grads = torch.autograd.grad(y, present, dy)
    want = torch.autograd.grad(expected, present, dy.double())
    for i, (got, wanted) in enumerate(zip(grads, want, strict=True)):
        assert got.dtype == present[i].dtype
        assert_close(got, wanted.to(got.dtype), what=f"gradient {i}")


@pytest.mark.parametrize("case", CASES)
def test_linear_matches_the_reference(case):
    x, (w,), (b,) = _inputs(case, gated=False)
    y = kernel.linear(x, w, b)
    expected = runtime_linear.linear(x.double(), w.double(), b.double() if b is not None else None)
    assert y.dtype == x.dtype and y.shape == (*x.shape[:-1], w.shape[0])
    assert_close(y, expected.to(x.dtype), what="y")
    assert_close(kernel.linear_reference(x, w, b), expected.to(x.dtype), what="reference")
    _compare_with_gradients(y, expected, (x, w, b), 1)


@pytest.mark.parametrize("case", CASES)
def test_swiglu_linear_matches_the_reference(case):
    x, (w_gate, w_up), (b_gate, b_up) = _inputs(case, gated=True)
    y = kernel.swiglu_linear(x, w_gate, w_up, b_gate, b_up)
    doubled = [t.double() if t is not None else None for t in (x, w_gate, w_up, b_gate, b_up)]
    expected = runtime_linear.swiglu_linear(*doubled)
    assert y.dtype == x.dtype and y.shape == (*x.shape[:-1], w_gate.shape[0])
    assert_close(y, expected.to(x.dtype), what="y")
    assert_close(kernel.swiglu_linear_reference(x, w_gate, w_up, b_gate, b_up), expected.to(x.dtype), what="reference")
    _compare_with_gradients(y, expected, (x, w_gate, w_up, b_gate, b_up), 2)


# id: (dtype, rows of x (leading shape), NQ, NKV, K, biases, x strided)
QKV_CASES = {"fp32-M1-NQ37-NKV11-K70-bias": (torch.float32, (1, 1), 37, 11, 70, True, False),
             "bf16-M3-NQ64-NKV16-K100-strided": (torch.bfloat16, (3,), 64, 16, 100, False, True),
             "bf16-M4-NQ24-NKV8-K33-bias": (torch.bfloat16, (2, 2), 24, 8, 33, True, False)}


@pytest.mark.parametrize("case", QKV_CASES)
def test_qkv_linear_matches_the_reference(case):
    """q, k and v products in one launch: each program's rows come from one of three weights of two heights."""
    dtype, lead, NQ, NKV, K, bias, strided = QKV_CASES[case]
    g = torch.Generator().manual_seed(NQ * K)
    x = torch.randn(*lead, 2 * K if strided else K, generator=g).to(DEVICE, dtype)
    x = (x[..., :K] if strided else x).requires_grad_()
    weights = [(torch.randn(n, K, generator=g) / math.sqrt(K)).to(DEVICE, dtype).requires_grad_() for n in (NQ, NKV, NKV)]
    biases = [torch.randn(n, generator=g).to(DEVICE, dtype).requires_grad_() if bias else None for n in (NQ, NKV, NKV)]
    y = kernel.qkv_linear(x, *weights, *biases)
    doubled = [t.double() if t is not None else None for t in (x, *weights, *biases)]
    expected = runtime_linear.qkv_linear(*doubled)
    assert y.dtype == x.dtype and y.shape == (*lead, NQ + 2 * NKV)
    assert_close(y, expected.to(dtype), what="y")
    assert_close(kernel.qkv_linear_reference(x, *weights, *biases), expected.to(dtype), what="reference")
    _compare_with_gradients(y, expected, (x, *weights, *biases), 3)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_every_config_computes_the_same(dtype):
    """Each autotune candidate's tile sizes, and the unfolded float32 tile (FOLD 1), give the reference's result (the
    interpreter runs them all, at a size that leaves a partial tile in both directions)."""
    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(2, 300, generator=g).to(DEVICE, dtype), torch.randn(45, 300, generator=g).to(DEVICE, dtype)
    expected = kernel.linear_reference(x, w)
    q, k, v = torch.randn(45, 300, generator=g).to(DEVICE, dtype), w[:13], w[13:26]
    expected_qkv = kernel.qkv_linear_reference(x, q, k, v)
    for config in [*kernel.CONFIGS, {**kernel.INTERPRETER_CONFIG, "FOLD": 1}]:
        assert_close(kernel.gemv_forward(x, w, config=config), expected, what=str(config))
        assert_close(kernel.qkv_gemv_forward(x, q, k, v, config=config), expected_qkv, what=f"qkv {config}")


@pytest.mark.parametrize("choice", gpu_choices(8))
@pytest.mark.parametrize("case", ["bf16-M1", "fp32-M2-strided"])
def test_every_gpu_config(gpu_configs, monkeypatch, choice, case):
    """linear, swiglu_linear and qkv_linear through the tuner at each config an H200 can launch (gpu_configs.py):
    the shape's own config as 132 SMs make it (one row per program, the whole K in one pass), then every candidate,
    at 21 outputs (9 + 2 × 6 for q, k and v) and 300 inputs (no multiple of any tile), one row and two."""
    monkeypatch.setattr(kernel, "_multiprocessors", lambda device: 132)
    gpu_configs.choose(choice)
    dtype, M, strided = (torch.bfloat16, 1, False) if case == "bf16-M1" else (torch.float32, 2, True)
    g = torch.Generator().manual_seed(M)
    x = torch.randn(M, 600 if strided else 300, generator=g).to(DEVICE, dtype)[:, :300]
    w, up = (torch.randn(21, 300, generator=g).to(DEVICE, dtype) / 17 for _ in range(2))
    b, b_up = (torch.randn(21, generator=g).to(DEVICE, dtype) for _ in range(2))
    q, k, v = w[:9], up[:6], up[6:12]
    with gpu_configs.named():
        assert_close(kernel.linear(x, w, b), kernel.linear_reference(x, w, b), what="linear")
        assert_close(kernel.swiglu_linear(x, w, up, b, b_up), kernel.swiglu_linear_reference(x, w, up, b, b_up),
                     what="swiglu_linear")
        assert_close(kernel.qkv_linear(x, q, k, v), kernel.qkv_linear_reference(x, q, k, v), what="qkv_linear")


def test_a_shapes_own_config_spreads_small_matrices_over_every_sm():
    """Bamba-1B's in_proj (8512 × 2048): 2-row tiles of 2048 columns for one row of x, of 1024 for four; Hymba+'s
    dt_proj (3200 × 100): short rows, more of them per program; its x_proj (132 × 3200) and k_proj (320 × 1600) on
    132 SMs: one row per program, x_proj's over 4 warps in two iterations (session 22's step measured it faster than
    its whole row in one)."""
    assert kernel.shape_config(8512, 2048, 1, 132) == {"BLOCK_N": 2, "BLOCK_K": 2048, "num_warps": 4}
    assert kernel.shape_config(8512, 2048, 4, 132) == {"BLOCK_N": 2, "BLOCK_K": 1024, "num_warps": 2}
    assert kernel.shape_config(3200, 100, 1, 132) == {"BLOCK_N": 8, "BLOCK_K": 128, "num_warps": 2}
    assert kernel.shape_config(132, 3200, 1, 132) == {"BLOCK_N": 1, "BLOCK_K": 2048, "num_warps": 4}
    assert kernel.shape_config(320, 1600, 1, 132) == {"BLOCK_N": 1, "BLOCK_K": 2048, "num_warps": 2}
    g = torch.Generator().manual_seed(1)
    x, w = torch.randn(1, 300, generator=g).to(DEVICE), torch.randn(45, 300, generator=g).to(DEVICE)
    assert_close(kernel.gemv_forward(x, w, config=kernel.shape_config(45, 300, 1, 132)), kernel.linear_reference(x, w))


def test_linear_says_what_is_wrong():
    with pytest.raises(ValueError, match=r"weight must be \(out, in\) with in = x.shape\[-1\] = 4"):
        kernel.linear(torch.zeros(1, 4, device=DEVICE), torch.zeros(3, 5, device=DEVICE))
    with pytest.raises(ValueError, match="one shape and both or neither a bias"):
        kernel.swiglu_linear(*(torch.zeros(n, 4, device=DEVICE) for n in (1, 3, 2)))
    with pytest.raises(ValueError, match="k and v projections must have one shape"):
        kernel.qkv_linear(*(torch.zeros(n, 4, device=DEVICE) for n in (1, 3, 2, 1)))


def test_gemv_ops_have_fake_implementations():
    g = torch.Generator().manual_seed(0)
    x, w, b = (torch.randn(*shape, generator=g).to(DEVICE) for shape in ((2, 5), (3, 5), (3,)))
    torch.library.opcheck(kernel.linear_op, (x, w, b), test_utils=("test_schema", "test_faketensor"))
    torch.library.opcheck(kernel.swiglu_linear_op, (x, w, w, None, None), test_utils=("test_schema", "test_faketensor"))
    kv, kv_bias = torch.randn(2, 5, generator=g).to(DEVICE), torch.randn(2, generator=g).to(DEVICE)
    torch.library.opcheck(kernel.qkv_linear_op, (x, w, kv, kv, b, kv_bias, kv_bias),
                          test_utils=("test_schema", "test_faketensor"))


@pytest.mark.parametrize("case", CASES)
def test_residual_linear_adds_the_residual_as_the_eager_add_bit_for_bit(case):
    """residual_linear's epilogue rounds the product to x's dtype, adds the residual in float32 and rounds once: the
    bits of eager `residual + linear(x)` on the kernel's own product (decoding with it gives the tokens of the
    separate add), and the float64 reference within tolerance, gradients included (the residual's is dy)."""
    x, (w,), (b,) = _inputs(case, gated=False)
    dtype, _, N, _, _, _ = CASES[case]
    g = torch.Generator().manual_seed(N)
    residual = (torch.randn(*x.shape[:-1], N, generator=g) * 4).to(DEVICE, dtype).requires_grad_()
    y = kernel.residual_linear(x, w, b, residual)
    assert y.dtype == dtype and y.shape == residual.shape
    with torch.no_grad():
        assert torch.equal(y, residual + kernel.linear(x, w, b)), "the separate add's bits"
        assert torch.equal(kernel.residual_linear_reference(x, w, b, residual),
                           residual + kernel.linear_reference(x, w, b))
    expected = runtime_linear.residual_linear(x.double(), w.double(), b.double() if b is not None else None,
                                              residual.double())
    assert_close(y, expected.to(dtype), what="y")
    _compare_with_gradients(y, expected, (x, w, b, residual), 3)


def test_residual_linear_says_what_is_wrong_and_has_a_fake():
    g = torch.Generator().manual_seed(1)
    x, w, b, r = (torch.randn(*shape, generator=g).to(DEVICE) for shape in ((2, 5), (3, 5), (3,), (2, 3)))
    with pytest.raises(ValueError, match="residual must be"):
        kernel.residual_linear(x, w, b, r[:, :2])
    torch.library.opcheck(kernel.residual_linear_op, (x, w, b, r), test_utils=("test_schema", "test_faketensor"))
