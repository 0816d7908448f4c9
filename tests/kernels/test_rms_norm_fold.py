"""The block's RMSNorm in the prologue of a decoding step's first GEMVs (kernels/qkv_rope.py's
`rms_norm_qkv_rope_write_kv_`, kernels/in_proj_conv.py's `rms_norm_in_proj_conv_step_`): against the two launches
they replace (kernels/rmsnorm.py's forward, then the fused GEMV on its output) and against the references (the norm's
reference, then the op's), within the dtype's rounding, not bit for bit: the fold sums the squares BLOCK_K at a time,
the norm kernel a whole row at once, so an rstd may differ in its last bits and a normed element by one rounding.
Fresh random inputs (norm weights away from 1, rows wider than a BLOCK_K), float32 and bfloat16, several configs, the
PDL path with the kernel ahead's x as NaN until the wait, the fallbacks and the checks. Runs in Triton's interpreter
without CUDA; kernel-written buffers start as NaN."""

import math

import pytest
import torch

pytest.importorskip("triton")

from archgen_kernels import gemv, in_proj_conv, qkv_rope, rmsnorm
from tests.kernels.test_programmatic_launch import GridDependencies
from tests.numerics import relative_norm_error

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
pytestmark = pytest.mark.usefixtures("poisoned_empty")  # tests/kernels/conftest.py
# relative norm error: float32's is a few roundings; bfloat16's allows a normed element one rounding off (2**-8)
TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2}
EPS = 1e-6
CONFIGS = {"default": None, "8x16": {"BLOCK_N": 8, "BLOCK_K": 16, "num_warps": 1},
           "2x64": {"BLOCK_N": 2, "BLOCK_K": 64, "num_warps": 2}}


def _randn(g, *shape, dtype, scale=1.0, offset=0.0):
    return (torch.randn(*shape, generator=g) * scale + offset).to(DEVICE, dtype)


def _norm(x, w):
    """kernels/rmsnorm.py's forward: the launch the fold replaces."""
    return rmsnorm.rms_norm_forward(x, None, w, EPS, config={"BLOCK_R": 1, "num_warps": 4})[0]


# ---------------------------------------------------------------------------------------------------------------
# qkv_rope: (dtype, B, T, HQ, HK, D, rotary dim R, K, biases, cache length, slots)
# ---------------------------------------------------------------------------------------------------------------

QKV_CASES = {"fp32-B1-H4/2-D16-K70-bias": (torch.float32, 1, 1, 4, 2, 16, 16, 70, True, 6, [4]),
             "bf16-B1-H3/1-D16-R10-K45": (torch.bfloat16, 1, 1, 3, 1, 16, 10, 45, False, 5, [0]),
             "bf16-B2-T2-H2/2-D16-K33": (torch.bfloat16, 2, 2, 2, 2, 16, 16, 33, True, 4, [3, 1])}


def _qkv_inputs(case):
    dtype, B, T, HQ, HK, D, R, K, bias, L, slots = QKV_CASES[case]
    g = torch.Generator().manual_seed(HQ * D + K)
    weights = [_randn(g, rows, K, dtype=dtype, scale=1 / math.sqrt(K)) for rows in (HQ * D, HK * D, HK * D)]
    biases = [_randn(g, w.shape[0], dtype=dtype) if bias else None for w in weights]
    angles = (torch.rand(T, R // 2, generator=g) * 6).to(DEVICE)
    caches = [_randn(g, B, HK, L, D, dtype=dtype) for _ in "kv"]
    x = _randn(g, B, T, K, dtype=dtype, scale=3.0)  # not unit rms: the norm must matter
    norm_weight = _randn(g, K, dtype=dtype, scale=0.5, offset=1.0)
    return x, norm_weight, (*weights, *biases, angles.cos(), angles.sin()), caches, torch.tensor(slots, device=DEVICE)


@pytest.mark.parametrize("config", CONFIGS.values(), ids=CONFIGS.keys())
@pytest.mark.parametrize("case", QKV_CASES)
def test_qkv_rope_with_the_norm_gives_the_norm_then_the_op(case, config):
    """q and both caches: rms_norm's kernel then qkv_rope_write_kv_ (the same GEMV config), and the references,
    within rounding; rows other than `slots` untouched."""
    x, norm_weight, args, (k_cache, v_cache), slots = _qkv_inputs(case)
    two_k, two_v = k_cache.clone(), v_cache.clone()
    two_q = qkv_rope.qkv_rope_write_kv_forward(_norm(x, norm_weight), *args, two_k, two_v, slots, config=config)
    ref_k, ref_v = k_cache.clone(), v_cache.clone()
    ref_q = qkv_rope.rms_norm_qkv_rope_write_kv_reference(x, norm_weight, EPS, *args, ref_k, ref_v, slots)
    ours_k, ours_v = k_cache.clone(), v_cache.clone()
    q = qkv_rope.qkv_rope_write_kv_forward(x, *args, ours_k, ours_v, slots, norm_weight=norm_weight, eps=EPS,
                                           config=config)
    assert q.shape == two_q.shape and q.stride() == two_q.stride() and q.dtype == x.dtype
    for name, ours, two, ref in (("q", q, two_q, ref_q), ("k_cache", ours_k, two_k, ref_k),
                                 ("v_cache", ours_v, two_v, ref_v)):
        assert relative_norm_error(ours, two) < TOL[x.dtype], f"{name}: not the two launches' within rounding"
        assert relative_norm_error(ours, ref) < TOL[x.dtype], f"{name}: not the reference's within rounding"
    untouched = torch.ones(k_cache.shape[2], dtype=torch.bool, device=DEVICE)
    untouched[slots] = False
    assert torch.equal(ours_k[:, :, untouched], k_cache[:, :, untouched])
    assert torch.equal(ours_v[:, :, untouched], v_cache[:, :, untouched])


def test_qkv_rope_with_the_norm_entry_point_and_op_agree():
    """The entry point (eager: the implementation) and the custom op give the launcher's bits."""
    x, norm_weight, args, caches, slots = _qkv_inputs("bf16-B1-H3/1-D16-R10-K45")
    results = []
    for run in (qkv_rope.rms_norm_qkv_rope_write_kv_, qkv_rope.rms_norm_qkv_rope_write_kv_op):
        k_cache, v_cache = (c.clone() for c in caches)
        results.append((run(x, norm_weight, EPS, *args, k_cache, v_cache, slots), k_cache, v_cache))
    k_cache, v_cache = (c.clone() for c in caches)
    expected = (qkv_rope.qkv_rope_write_kv_forward(x, *args, k_cache, v_cache, slots, norm_weight=norm_weight,
                                                   eps=EPS), k_cache, v_cache)
    for result in results:
        assert all(torch.equal(a, b) for a, b in zip(result, expected, strict=True))


def test_qkv_rope_with_the_norm_falls_back_to_the_norm_and_the_op(monkeypatch):
    """More rows than a GEMV takes, and a gradient: rms_norm, then qkv_rope_write_kv_ (which takes its own two ops)."""
    x, norm_weight, args, caches, slots = _qkv_inputs("fp32-B1-H4/2-D16-K70-bias")
    calls = []
    monkeypatch.setattr(qkv_rope, "rms_norm", lambda *a: calls.append("rms_norm") or rmsnorm.rms_norm(*a))
    monkeypatch.setattr(qkv_rope, "FEW_ROWS", 0)
    k_cache, v_cache = (c.clone() for c in caches)
    q = qkv_rope.rms_norm_qkv_rope_write_kv_(x, norm_weight, EPS, *args, k_cache, v_cache, slots)
    ref_k, ref_v = (c.clone() for c in caches)
    ref_q = qkv_rope.rms_norm_qkv_rope_write_kv_reference(x, norm_weight, EPS, *args, ref_k, ref_v, slots)
    assert calls == ["rms_norm"]
    for ours, ref in ((q, ref_q), (k_cache, ref_k), (v_cache, ref_v)):
        assert relative_norm_error(ours, ref) < TOL[x.dtype]
    monkeypatch.setattr(qkv_rope, "FEW_ROWS", gemv.FEW_ROWS)
    weight = norm_weight.clone().requires_grad_()
    k_cache, v_cache = (c.clone() for c in caches)
    q = qkv_rope.rms_norm_qkv_rope_write_kv_(x, weight, EPS, *args, k_cache, v_cache, slots)
    assert calls == ["rms_norm"] * 2 and q.requires_grad


def test_qkv_rope_with_the_norm_waits_before_the_rstd_pass(monkeypatch):
    """PDL: x (what the kernel ahead writes) is NaN until the first program's wait; every program waits before its
    rstd pass reads x, and the result is the PDL-off launch's bit for bit."""
    x, norm_weight, args, caches, slots = _qkv_inputs("bf16-B2-T2-H2/2-D16-K33")
    x = x.contiguous()

    def run():
        k_cache, v_cache = (c.clone() for c in caches)
        q = qkv_rope.qkv_rope_write_kv_forward(x, *args, k_cache, v_cache, slots, norm_weight=norm_weight, eps=EPS,
                                               config=gemv.INTERPRETER_CONFIG)
        return q.clone(), k_cache, v_cache

    with monkeypatch.context() as off:
        off.setattr(qkv_rope, "programmatic_launch", lambda device: False)
        expected = run()
    dependencies = GridDependencies(monkeypatch, qkv_rope, {"x": x})
    result = run()
    # 4 rows; per head of q and k: 2 pair blocks of 4 (8 pairs), no pass-through; v: 32 rows, 8 blocks
    assert dependencies.waits == dependencies.triggers == 4 * ((2 + 2) * 2 + 8)
    assert all(torch.equal(a, b) for a, b in zip(result, expected, strict=True))


# ---------------------------------------------------------------------------------------------------------------
# in_proj_conv: (dtype, state dtype, batch, d_inner D, K, conv width, in_proj bias, conv bias)
# ---------------------------------------------------------------------------------------------------------------

CONV_CASES = {"fp32-B1-D37-K70-W4-biases": (torch.float32, torch.float32, 1, 37, 70, 4, True, True),
              "bf16-B1-D19-K45-W4-fp32-state": (torch.bfloat16, torch.float32, 1, 19, 45, 4, False, True),
              "bf16-B3-D13-K33-W3": (torch.bfloat16, torch.bfloat16, 3, 13, 33, 3, True, False)}


def _conv_inputs(case):
    dtype, state_dtype, batch, D, K, width, bias, conv_bias = CONV_CASES[case]
    g = torch.Generator().manual_seed(D * K + width)
    x = _randn(g, batch, 1, K, dtype=dtype, scale=3.0)
    norm_weight = _randn(g, K, dtype=dtype, scale=0.5, offset=1.0)
    weight = _randn(g, 2 * D, K, dtype=dtype, scale=1 / math.sqrt(K))
    conv_weight = _randn(g, D, 1, width, dtype=dtype)[:, 0]
    state = _randn(g, batch, D, width - 1, dtype=state_dtype)
    biases = (_randn(g, 2 * D, dtype=dtype) if bias else None, _randn(g, D, dtype=dtype) if conv_bias else None)
    return x, norm_weight, weight, biases[0], conv_weight, biases[1], state


@pytest.mark.parametrize("config", CONFIGS.values(), ids=CONFIGS.keys())
@pytest.mark.parametrize("case", CONV_CASES)
def test_in_proj_conv_with_the_norm_gives_the_norm_then_the_op(case, config):
    """y, z and the shifted state: rms_norm's kernel then in_proj_conv_step_ (the same GEMV config), and the
    references, within rounding."""
    x, norm_weight, weight, bias, conv_weight, conv_bias, state = _conv_inputs(case)
    two_state = state.clone()
    two = in_proj_conv.in_proj_conv_step_forward(_norm(x, norm_weight), weight, bias, conv_weight, conv_bias,
                                                 two_state, True, config=config)
    ref_state = state.clone()
    ref = in_proj_conv.rms_norm_in_proj_conv_step_reference(x, norm_weight, EPS, weight, bias, conv_weight, conv_bias,
                                                            ref_state, True)
    ours_state = state.clone()
    address = ours_state.data_ptr()
    ours = in_proj_conv.in_proj_conv_step_forward(x, weight, bias, conv_weight, conv_bias, ours_state, True,
                                                  norm_weight=norm_weight, eps=EPS, config=config)
    assert ours_state.data_ptr() == address
    for name, a, b, c in (("y", ours[0], two[0], ref[0]), ("z", ours[1], two[1], ref[1]),
                          ("state", ours_state, two_state, ref_state)):
        assert a.shape == b.shape and a.dtype == b.dtype
        assert relative_norm_error(a, b) < TOL[x.dtype], f"{name}: not the two launches' within rounding"
        assert relative_norm_error(a, c) < TOL[x.dtype], f"{name}: not the reference's within rounding"


def test_in_proj_conv_with_the_norm_entry_point_and_op_agree_and_fall_back(monkeypatch):
    """The entry point and the custom op give the launcher's bits; more rows than a GEMV takes run rms_norm, then
    in_proj_conv_step_."""
    x, norm_weight, weight, bias, conv_weight, conv_bias, state = _conv_inputs("bf16-B3-D13-K33-W3")
    expected_state = state.clone()
    expected = in_proj_conv.in_proj_conv_step_forward(x, weight, bias, conv_weight, conv_bias, expected_state, True,
                                                      norm_weight=norm_weight, eps=EPS)
    for run, silu in ((in_proj_conv.rms_norm_in_proj_conv_step_, "silu"),
                      (in_proj_conv.rms_norm_in_proj_conv_step_op, True)):
        ours_state = state.clone()
        y, z = run(x, norm_weight, EPS, weight, bias, conv_weight, conv_bias, ours_state, silu)
        assert torch.equal(y, expected[0]) and torch.equal(z, expected[1]) and torch.equal(ours_state, expected_state)
    calls = []
    monkeypatch.setattr(in_proj_conv, "rms_norm", lambda *a: calls.append("rms_norm") or rmsnorm.rms_norm(*a))
    monkeypatch.setattr(in_proj_conv, "FEW_ROWS", 2)
    ours_state = state.clone()
    y, z = in_proj_conv.rms_norm_in_proj_conv_step_(x, norm_weight, EPS, weight, bias, conv_weight, conv_bias,
                                                    ours_state, "silu")
    assert calls == ["rms_norm"]
    assert relative_norm_error(torch.cat([y, z], -1), torch.cat(expected, -1)) < TOL[x.dtype]


def test_in_proj_conv_with_the_norm_waits_before_the_rstd_pass(monkeypatch):
    """PDL: as the qkv one; _row_products (kernels/gemv.py) holds the wait."""
    x, norm_weight, weight, bias, conv_weight, conv_bias, state = _conv_inputs("bf16-B3-D13-K33-W3")

    def run():
        s = state.clone()
        y, z = in_proj_conv.in_proj_conv_step_forward(x, weight, bias, conv_weight, conv_bias, s, True,
                                                      norm_weight=norm_weight, eps=EPS, config=gemv.INTERPRETER_CONFIG)
        return y.clone(), z.clone(), s

    with monkeypatch.context() as off:
        off.setattr(in_proj_conv, "programmatic_launch", lambda device: False)
        expected = run()
    dependencies = GridDependencies(monkeypatch, gemv, {"x": x})
    monkeypatch.setattr(in_proj_conv, "programmatic_launch", lambda device: True)
    result = run()
    assert dependencies.waits == dependencies.triggers == 3 * math.ceil(26 / gemv.INTERPRETER_CONFIG["BLOCK_N"])
    assert all(torch.equal(a, b) for a, b in zip(result, expected, strict=True))


def test_a_norm_weight_of_another_width_is_named():
    x, norm_weight, weight, bias, conv_weight, conv_bias, state = _conv_inputs("bf16-B3-D13-K33-W3")
    with pytest.raises(ValueError, match="norm_weight must be"):
        in_proj_conv.rms_norm_in_proj_conv_step_(x, norm_weight[:-1], EPS, weight, bias, conv_weight, conv_bias,
                                                 state, "silu")
    x, norm_weight, args, (k_cache, v_cache), slots = _qkv_inputs("bf16-B1-H3/1-D16-R10-K45")
    with pytest.raises(ValueError, match="norm_weight must be"):
        qkv_rope.rms_norm_qkv_rope_write_kv_(x, norm_weight[:-1], EPS, *args, k_cache, v_cache, slots)
