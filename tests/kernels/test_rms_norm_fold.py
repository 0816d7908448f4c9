"""The RMSNorm folded into a decoding step's first GEMVs (kernels/gemv.py `rms_norm_fold`): in_proj_conv's and
qkv_rope's kernels with a norm weight give the products of RMSNorm(x), against `rms_norm_fold_reference` and within
rounding of the norm kernel's output fed to the unfolded kernel; one K chunk and several (the squares summed across
chunks), the entry points with a norm module, their fallbacks (more rows than a GEMV takes: norm(x), then the two
launches) and named errors. Runs in Triton's interpreter without CUDA; kernel-written buffers start as NaN."""

import pytest
import torch

pytest.importorskip("triton")

from archgen_kernels import gemv, rmsnorm
from archgen_kernels import in_proj_conv as in_proj_conv_kernel
from archgen_kernels import qkv_rope as qkv_rope_kernel
from tests.kernels import test_in_proj_conv, test_qkv_rope
from tests.numerics import relative_norm_error

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
pytestmark = pytest.mark.usefixtures("poisoned_empty")  # tests/kernels/conftest.py
TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2}
# one K chunk (the default tile) and chunks of 16 columns: every K here takes several
CONFIGS = {"default": None, "8x16": {"BLOCK_N": 8, "BLOCK_K": 16, "num_warps": 1}}
EPS = 1e-5


class Norm(torch.nn.Module):
    """What the generated FusedRMSNorm hands the kernels: `weight` and `eps`; calling it norms x (the fallbacks)."""

    def __init__(self, weight: torch.Tensor):
        super().__init__()
        self.weight, self.eps = torch.nn.Parameter(weight, requires_grad=False), EPS

    def forward(self, x):
        return rmsnorm.rms_norm_reference(x, self.weight, self.eps)


def _norm_weight(x: torch.Tensor) -> torch.Tensor:
    g = torch.Generator().manual_seed(x.shape[-1])
    return (1 + 0.5 * torch.randn(x.shape[-1], generator=g)).to(DEVICE, x.dtype)


@pytest.mark.parametrize("config", CONFIGS.values(), ids=CONFIGS.keys())
@pytest.mark.parametrize("case", test_in_proj_conv.CASES)
def test_in_proj_conv_with_a_norm_gives_the_products_of_the_normed_x(case, config):
    """y, z and the shifted state against the reference on RMSNorm(x) in float32, and within rounding of the norm
    kernel's output (rounded to x's dtype) through the unfolded kernel."""
    x, weight, bias, conv_weight, conv_bias, state = test_in_proj_conv._inputs(case)
    norm_weight = _norm_weight(x)
    folded_state, reference_state, unfolded_state = state.clone(), state.clone(), state.clone()
    folded = in_proj_conv_kernel.in_proj_conv_step_forward(x, weight, bias, conv_weight, conv_bias, folded_state, True,
                                                           norm_weight, EPS, config=config)
    reference = in_proj_conv_kernel.in_proj_conv_step_reference(x, weight, bias, conv_weight, conv_bias,
                                                                reference_state, True, norm_weight, EPS)
    normed = rmsnorm.rms_norm_reference(x, norm_weight, EPS)
    unfolded = in_proj_conv_kernel.in_proj_conv_step_forward(normed, weight, bias, conv_weight, conv_bias,
                                                             unfolded_state, True, config=config)
    assert relative_norm_error(torch.cat(folded, -1), torch.cat(reference, -1)) < TOL[x.dtype]
    assert relative_norm_error(folded_state, reference_state) < TOL[x.dtype]
    assert relative_norm_error(torch.cat(folded, -1), torch.cat(unfolded, -1)) < 2 * TOL[x.dtype]
    # the norm moves the products: a kernel ignoring its weight would fail the checks above by far more
    plain = in_proj_conv_kernel.in_proj_conv_step_forward(x, weight, bias, conv_weight, conv_bias, state.clone(), True)
    assert relative_norm_error(torch.cat(plain, -1), torch.cat(reference, -1)) > 10 * TOL[x.dtype]


@pytest.mark.parametrize("config", CONFIGS.values(), ids=CONFIGS.keys())
@pytest.mark.parametrize("case", test_qkv_rope.CASES)
def test_qkv_rope_with_a_norm_gives_the_products_of_the_normed_x(case, config):
    """q and the caches' new rows against the reference on RMSNorm(x), and within rounding of the unfolded kernel
    on the norm kernel's output."""
    args = test_qkv_rope._inputs(case)
    x, k_cache, v_cache = args[0], args[9], args[10]
    norm_weight = _norm_weight(x)

    def run(launch, x):
        caches = k_cache.clone(), v_cache.clone()
        q = launch(x, *args[1:9], *caches, args[11])
        return torch.cat([q.flatten(), *(c.flatten().to(q.dtype) for c in caches)])

    folded = run(lambda *a: qkv_rope_kernel.qkv_rope_write_kv_forward(*a, norm_weight, EPS, config=config), x)
    reference = run(lambda *a: qkv_rope_kernel.qkv_rope_write_kv_reference(*a, norm_weight, EPS), x)
    normed = rmsnorm.rms_norm_reference(x, norm_weight, EPS)
    unfolded = run(lambda *a: qkv_rope_kernel.qkv_rope_write_kv_forward(*a, config=config), normed)
    assert relative_norm_error(folded, reference) < TOL[x.dtype]
    assert relative_norm_error(folded, unfolded) < 2 * TOL[x.dtype]
    plain = run(lambda *a: qkv_rope_kernel.qkv_rope_write_kv_forward(*a, config=config), x)
    assert relative_norm_error(plain, reference) > 10 * TOL[x.dtype]


def test_the_entry_points_take_a_norm_module_and_its_fallbacks_norm_first():
    """kernels.in_proj_conv_step_ and qkv_rope_write_kv_ with norm=: eager and through the custom op the kernel's
    result; more rows than gemv.FEW_ROWS: norm(x), then the products (within rounding of the kernel)."""
    x, weight, bias, conv_weight, conv_bias, state = test_in_proj_conv._inputs("fp32-B1-D37-K70-W4-biases")
    norm = Norm(_norm_weight(x))
    kernel_state, entry_state = state.clone(), state.clone()
    expected = in_proj_conv_kernel.in_proj_conv_step_forward(x, weight, bias, conv_weight, conv_bias, kernel_state,
                                                             True, norm.weight, EPS)
    got = in_proj_conv_kernel.in_proj_conv_step_(x, weight, bias, conv_weight, conv_bias, entry_state, "silu", norm=norm)
    assert all(torch.equal(a, b) for a, b in zip(got, expected, strict=True)) and torch.equal(entry_state, kernel_state)
    op_state = state.clone()
    through_op = in_proj_conv_kernel.rms_norm_in_proj_conv_step_op(x, norm.weight, EPS, weight, bias, conv_weight,
                                                                   conv_bias, op_state, True)
    assert all(torch.equal(a, b) for a, b in zip(through_op, expected, strict=True)) and torch.equal(op_state, kernel_state)

    rows = gemv.FEW_ROWS + 1
    many = x.expand(rows, -1, -1).contiguous()
    many_state = state.expand(rows, -1, -1).contiguous()
    fallback = in_proj_conv_kernel.in_proj_conv_step_(many, weight, bias, conv_weight, conv_bias, many_state, "silu",
                                                      norm=norm)
    assert relative_norm_error(torch.cat(fallback, -1)[:1], torch.cat(expected, -1)) < TOL[x.dtype]

    args = test_qkv_rope._inputs("fp32-B1-H4/2-D64-R64-bias")
    qx = args[0]
    qnorm = Norm(_norm_weight(qx))
    caches = args[9].clone(), args[10].clone()
    expected_q = qkv_rope_kernel.qkv_rope_write_kv_forward(qx, *args[1:9], *caches, args[11], qnorm.weight, EPS)
    entry_caches = args[9].clone(), args[10].clone()
    q = qkv_rope_kernel.qkv_rope_write_kv_(qx, *args[1:9], *entry_caches, args[11], norm=qnorm)
    assert torch.equal(q, expected_q) and all(torch.equal(a, b) for a, b in zip(entry_caches, caches, strict=True))
    op_caches = args[9].clone(), args[10].clone()
    q_op = qkv_rope_kernel.rms_norm_qkv_rope_write_kv_op(qx, qnorm.weight, EPS, *args[1:9], *op_caches, args[11])
    assert torch.equal(q_op, expected_q) and all(torch.equal(a, b) for a, b in zip(op_caches, caches, strict=True))
    with torch.enable_grad():  # a gradient takes the three products of norm(x)
        grad_caches = args[9].clone(), args[10].clone()
        q_grad = qkv_rope_kernel.qkv_rope_write_kv_(qx.clone().requires_grad_(), *args[1:9], *grad_caches, args[11],
                                                    norm=qnorm)
    assert relative_norm_error(q_grad.detach(), expected_q) < TOL[qx.dtype]


def test_a_norm_weight_of_another_width_is_named():
    x, weight, bias, conv_weight, conv_bias, state = test_in_proj_conv._inputs("fp32-B2-D6-K17-W2")
    with pytest.raises(ValueError, match=r"in_proj_conv_step_: the norm's weight must be \(17,\)"):
        in_proj_conv_kernel.in_proj_conv_step_forward(x, weight, bias, conv_weight, conv_bias, state, True,
                                                      torch.ones(16, device=DEVICE), EPS)
    args = test_qkv_rope._inputs("fp32-B2-T2-H2/1-D16-R10-ring")
    with pytest.raises(ValueError, match=r"qkv_rope_write_kv_: the norm's weight must be \(24,\)"):
        qkv_rope_kernel.qkv_rope_write_kv_forward(*args, torch.ones(12, device=DEVICE), EPS)


def test_the_folded_in_proj_conv_has_a_bucket_and_a_default_of_its_own(monkeypatch):
    """Folded, in_proj_conv reads the norm's weight beside x in every program: its untuned tile is the GEMV's as
    twice the rows over half the columns (Hymba+'s in_proj: 4 × 1024 over 4 warps where the GEMV runs 2 × 2048), in
    a tuning bucket of its own, so a tuned plain GEMV's choice does not set it."""
    assert gemv.shape_config(6400, 1600, 1, 132) == {"BLOCK_N": 2, "BLOCK_K": 2048, "num_warps": 4}
    assert in_proj_conv_kernel.folded_config(6400, 1600, 1, 132) == {"BLOCK_N": 4, "BLOCK_K": 1024, "num_warps": 4}
    assert in_proj_conv_kernel.folded_config(64, 20, 1, 132) == gemv.shape_config(64, 20, 1, 132)  # short rows
    asked = []

    def tuned_config(key, N, K, M, x, config, time_launch, own=None):
        asked.append((key, own))
        return gemv.tuned_config(key, N, K, M, x, config, time_launch, own)

    monkeypatch.setattr(in_proj_conv_kernel, "tuned_config", tuned_config)
    x, weight, bias, conv_weight, conv_bias, state = test_in_proj_conv._inputs("bf16-B1-D19-K45-W4-fp32-state")
    for norm_weight in (None, _norm_weight(x)):
        in_proj_conv_kernel.in_proj_conv_step_forward(x, weight, bias, conv_weight, conv_bias, state.clone(), True,
                                                      norm_weight, EPS)
    key = gemv.shape_key(weight.shape[0], x.shape[-1], 1, x.dtype, gated=False)
    sms = gemv._multiprocessors(x.device)
    assert asked == [(key, None), (key + "-norm", in_proj_conv_kernel.folded_config(*weight.shape, 1, sms))]
