"""
Tests for templates/runtime/attention.py, the attention reference ops copied into every generated package.

Every reference here is written independently of the module under test: plain loops over queries for the mask
rule, complex numbers for RoPE, the scaling formulas spelled out per frequency.
"""

import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from templates.runtime import attention as ops
from tests.numerics import TOLERANCE, assert_close


def case_ids(fmt, cases):
    """Readable parametrize ids: case_ids("B{}-T{}", [(2, 63)]) == ["B2-T63"]."""
    return [fmt.format(*case) for case in cases]


def dtype_id(dtype):
    return str(dtype).removeprefix("torch.")


def randn(*shape, dtype=torch.float32, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def qkv(B, Hq, Hkv, Tq, Tk, D, dtype=torch.float32, seed=0):
    q = randn(B, Hq, Tq, D, dtype=dtype, seed=seed)  # (B, Hq, Tq, D)
    k = randn(B, Hkv, Tk, D, dtype=dtype, seed=seed + 1)  # (B, Hkv, Tk, D)
    v = randn(B, Hkv, Tk, D, dtype=dtype, seed=seed + 2)  # (B, Hkv, Tk, D)
    return q, k, v


def attention_by_loop(q, k, v, q_pos, k_pos, window=None, k_valid_len=None):
    """One query at a time: a softmax over exactly the keys the visibility rule allows. Positions (B, T)."""
    B, Hq, Tq, D = q.shape
    Hkv, Tk = k.size(1), k.size(2)
    group = Hq // Hkv
    out = torch.zeros(B, Hq, Tq, v.size(-1), dtype=q.dtype)
    for b in range(B):
        for i in range(Tq):
            qi = int(q_pos[b][i])
            allowed = [
                j
                for j in range(Tk)
                if int(k_pos[b][j]) <= qi
                and (window is None or qi - int(k_pos[b][j]) < window)
                and (k_valid_len is None or j < k_valid_len)
            ]
            if not allowed:
                continue  # nothing visible: the output is defined as zero
            for h in range(Hq):
                keys, values = k[b, h // group, allowed], v[b, h // group, allowed]  # (n, D), (n, Dv)
                weights = torch.softmax(keys @ q[b, h, i] / math.sqrt(D), dim=0)  # (n,)
                out[b, h, i] = weights @ values
    return out


# -----------------------------------------------------------------------------
# attention


CAUSAL_CASES = [
    (B, Hq, Hq // ratio, T, D)
    for B, T, D in [(1, 1, 16), (2, 7, 8), (2, 63, 16), (3, 63, 12)]
    for Hq, ratio in [(4, 1), (8, 2), (8, 4)]
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=dtype_id)
@pytest.mark.parametrize("B,Hq,Hkv,T,D", CAUSAL_CASES, ids=case_ids("B{}-Hq{}-Hkv{}-T{}-D{}", CAUSAL_CASES))
def test_attention_matches_sdpa_causal(B, Hq, Hkv, T, D, dtype):
    q, k, v = qkv(B, Hq, Hkv, T, T, D, dtype)
    positions = torch.arange(T)
    y = ops.attention(q, k, v, q_positions=positions, k_positions=positions)
    group = Hq // Hkv
    expected = F.scaled_dot_product_attention(
        q, k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1), is_causal=True
    )
    assert y.dtype == dtype
    assert_close(y, expected, TOLERANCE[dtype])


WINDOW_CASES = [  # B, Hq, Hkv, T, D, window
    (1, 2, 1, 7, 8, 1),
    (2, 4, 2, 7, 8, 3),
    (2, 8, 2, 63, 16, 16),
    (1, 4, 4, 63, 8, 62),
    (2, 4, 1, 20, 8, 100),  # window longer than the sequence: plain causal
]


@pytest.mark.parametrize("B,Hq,Hkv,T,D,window", WINDOW_CASES, ids=case_ids("B{}-Hq{}-Hkv{}-T{}-D{}-W{}", WINDOW_CASES))
def test_sliding_window_matches_loop(B, Hq, Hkv, T, D, window):
    q, k, v = qkv(B, Hq, Hkv, T, T, D, torch.float64)
    positions = torch.arange(T) + 5  # absolute positions need not start at 0
    y = ops.attention(q, k, v, q_positions=positions, k_positions=positions, window=window)
    expected = attention_by_loop(q, k, v, positions.expand(B, T), positions.expand(B, T), window)
    assert_close(y, expected, TOLERANCE[torch.float64])


def test_per_batch_positions_match_loop():
    # (B, T) positions: each sequence at its own offset, queries a chunk after a prefix of keys
    B, Hq, Hkv, Tq, Tk, D = 3, 4, 2, 5, 12, 8
    q, k, v = qkv(B, Hq, Hkv, Tq, Tk, D, torch.float64)
    k_pos = torch.arange(Tk) + torch.tensor([[0], [3], [10]])  # (B, Tk)
    q_pos = k_pos[:, -Tq:]  # (B, Tq)
    y = ops.attention(q, k, v, q_positions=q_pos, k_positions=k_pos, window=4)
    assert_close(y, attention_by_loop(q, k, v, q_pos, k_pos, window=4), TOLERANCE[torch.float64])


@settings(max_examples=60, deadline=None)
@given(
    B=st.integers(1, 3),
    Tq=st.integers(1, 6),
    Tk=st.integers(1, 9),
    window=st.none() | st.integers(1, 8),
    seed=st.integers(0, 2**16),
    valid=st.booleans(),
)
def test_attention_mask_rule(B, Tq, Tk, window, seed, valid):
    g = torch.Generator().manual_seed(seed)
    q_pos = torch.randint(0, 12, (B, Tq), generator=g)  # unsorted, repeated: the rule must not care
    k_pos = torch.randint(0, 12, (B, Tk), generator=g)
    k_valid_len = torch.randint(0, Tk + 1, (B,), generator=g) if valid else None
    mask = ops.attention_mask(q_pos, k_pos, window, k_valid_len)
    assert mask.shape == (B, 1, Tq, Tk)
    for b in range(B):
        for i in range(Tq):
            for j in range(Tk):
                qi, kj = int(q_pos[b, i]), int(k_pos[b, j])
                rule = kj <= qi and (window is None or qi - kj < window)
                rule = rule and (k_valid_len is None or j < int(k_valid_len[b]))
                assert bool(mask[b, 0, i, j]) == rule, (b, i, j, qi, kj)


def test_k_valid_len_hides_the_tail():
    B, Hq, Hkv, T, D = 2, 4, 2, 10, 8
    q, k, v = qkv(B, Hq, Hkv, 3, T, D)
    q_pos, k_pos = torch.full((3,), 100), torch.arange(T)  # every key is in the past
    for n in [1, 4, T]:
        y = ops.attention(q, k, v, q_positions=q_pos, k_positions=k_pos, k_valid_len=n)
        expected = ops.attention(q, k[:, :, :n], v[:, :, :n], q_positions=q_pos, k_positions=k_pos[:n])
        assert_close(y, expected, TOLERANCE[torch.float32], f"k_valid_len={n}")
    # per-sequence lengths
    y = ops.attention(q, k, v, q_positions=q_pos, k_positions=k_pos, k_valid_len=torch.tensor([2, 7]))
    for b, n in enumerate([2, 7]):
        q_b, k_b, v_b = q[b : b + 1], k[b : b + 1, :, :n], v[b : b + 1, :, :n]
        expected = ops.attention(q_b, k_b, v_b, q_positions=q_pos, k_positions=k_pos[:n])
        assert_close(y[b : b + 1], expected, TOLERANCE[torch.float32], f"batch {b}")


def test_query_that_sees_no_key_is_zero_and_finite():
    q, k, v = qkv(1, 2, 1, 3, 4, 8, torch.float64)
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    # query at position 0 sees nothing (keys start at 1); the others see some keys
    y = ops.attention(q, k, v, q_positions=torch.tensor([0, 2, 5]), k_positions=torch.tensor([1, 2, 3, 4]))
    assert torch.equal(y[:, :, 0], torch.zeros_like(y[:, :, 0]))
    assert_close(y, attention_by_loop(q, k, v, [[0, 2, 5]], [[1, 2, 3, 4]]), TOLERANCE[torch.float64])
    y.sum().backward()
    assert all(t.grad.isfinite().all() for t in (q, k, v))
    assert torch.equal(q.grad[:, :, 0], torch.zeros_like(q.grad[:, :, 0]))
    # k_valid_len=0 hides every key
    y = ops.attention(q, k, v, q_positions=torch.tensor([9, 9, 9]), k_positions=torch.arange(4), k_valid_len=0)
    assert torch.equal(y, torch.zeros_like(y))


def test_attention_gradcheck():
    q, k, v = qkv(1, 4, 2, 5, 5, 3, torch.float64)
    positions = torch.arange(5)

    def f(q, k, v):
        return ops.attention(q, k, v, q_positions=positions, k_positions=positions, window=3)

    assert torch.autograd.gradcheck(f, tuple(t.requires_grad_() for t in (q, k, v)))


# -----------------------------------------------------------------------------
# KV cache and incremental decode


DECODE_CASES = [  # prefill, chunk, window
    (1, 1, None),
    (5, 1, None),
    (5, 3, None),
    (3, 1, 4),  # crosses the window boundary while decoding
    (12, 1, 8),  # prefill already longer than the window
    (6, 5, 4),  # chunks wider than the window
]


@pytest.mark.parametrize("see_themselves", [False, True], ids=["guarded", "queries_see_themselves"])
@pytest.mark.parametrize("start_as", ["int", "tensor"])
@pytest.mark.parametrize("prefill,chunk,window", DECODE_CASES, ids=case_ids("P{}-C{}-W{}", DECODE_CASES))
def test_incremental_decode_matches_full_attention(prefill, chunk, window, start_as, see_themselves):
    """Decoding against a cache just written with the queries' tokens, with and without the empty-row guard (every
    query sees itself here, so skipping it changes nothing)."""
    B, Hq, Hkv, T, D = 2, 8, 2, 21, 16
    q, k, v = qkv(B, Hq, Hkv, T, T, D)
    positions = torch.arange(T)
    full = ops.attention(q, k, v, q_positions=positions, k_positions=positions, window=window)  # (B, Hq, T, D)

    cache = ops.KVCache.empty(B, Hkv, max_len=T + 4, head_dim=D)  # 4 slots are never written
    slots = torch.arange(cache.max_len)
    steps = [(0, prefill)] + [(t, min(t + chunk, T)) for t in range(prefill, T, chunk)]
    for t0, t1 in steps:
        start = torch.tensor(t0) if start_as == "tensor" else t0
        k_all, v_all = cache.write(k[:, :, t0:t1], v[:, :, t0:t1], start)  # (B, Hkv, L, D)
        q_t, q_pos = q[:, :, t0:t1], positions[t0:t1]
        valid = start + t1 - t0
        y = ops.attention(q_t, k_all, v_all, q_positions=q_pos, k_positions=slots, window=window, k_valid_len=valid,
                          queries_see_themselves=see_themselves)
        assert_close(y, full[:, :, t0:t1], 1e-5, f"tokens {t0}..{t1 - 1}")
    assert torch.equal(cache.k[:, :, :T], k) and torch.equal(cache.v[:, :, :T], v)
    assert not cache.k[:, :, T:].any(), "slots past the last write must be untouched"


def test_kv_cache_write_is_in_place_and_casts():
    cache = ops.KVCache.empty(1, 2, max_len=6, head_dim=4, dtype=torch.float64)
    k_ptr = cache.k.data_ptr()
    k_new, v_new = randn(1, 2, 2, 4), randn(1, 2, 2, 4, seed=1)
    k_all, v_all = cache.write(k_new, v_new, start=3)
    assert k_all is cache.k and v_all is cache.v and cache.k.data_ptr() == k_ptr
    assert cache.k.dtype == torch.float64
    assert torch.equal(cache.k[:, :, 3:5], k_new.double()) and torch.equal(cache.v[:, :, 3:5], v_new.double())
    assert not cache.k[:, :, :3].any() and not cache.k[:, :, 5:].any()


def test_cached_decode_exports():
    """A decode step (cache write at a tensor offset, then attention) traces with torch.export, no guards on start."""

    class DecodeStep(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.register_buffer("k_cache", torch.zeros(1, 2, 8, 4))
            self.register_buffer("v_cache", torch.zeros(1, 2, 8, 4))

        def forward(self, q, k, v, start):
            cache = ops.KVCache(self.k_cache, self.v_cache)
            k_all, v_all = cache.write(k, v, start)
            slots = torch.arange(cache.max_len)
            q_pos = start + torch.arange(q.size(2))
            return ops.attention(q, k_all, v_all, q_positions=q_pos, k_positions=slots, window=3, k_valid_len=start + 1)

    q, k, v = qkv(1, 4, 2, 1, 1, 4)
    program = torch.export.export(DecodeStep(), (q, k, v, torch.tensor(0)))
    eager, exported = DecodeStep(), program.module()
    for t in range(5):
        q, k, v = qkv(1, 4, 2, 1, 1, 4, seed=3 * t)
        assert_close(exported(q, k, v, torch.tensor(t)), eager(q, k, v, torch.tensor(t)), 1e-6, f"step {t}")


# -----------------------------------------------------------------------------
# RoPE


def rope_by_complex(x, positions, inv_freq):
    """Rotate-half RoPE as complex multiplication: (x[i] + i x[i + R/2]) * exp(i * position * inv_freq[i])."""
    half = len(inv_freq)
    z = torch.complex(x[..., :half].double(), x[..., half : 2 * half].double())  # (B, H, T, R/2)
    angles = positions.double()[:, None] * torch.tensor(inv_freq, dtype=torch.float64)  # (T, R/2)
    z = z * torch.polar(torch.ones_like(angles), angles)
    return torch.cat([z.real, z.imag, x[..., 2 * half :].double()], dim=-1)


def plain_inv_freq(R, theta):
    return [theta ** (-2 * i / R) for i in range(R // 2)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=dtype_id)
@pytest.mark.parametrize("D,theta", [(8, 10_000.0), (64, 500_000.0)], ids=["D8-theta1e4", "D64-theta5e5"])
def test_rope_matches_complex_rotation(D, theta, dtype):
    x = randn(2, 3, 40, D, dtype=dtype)
    positions = torch.arange(40) + 3
    inv_freq, mscale = ops.rope_inv_freq(D, theta)
    assert mscale == 1.0 and inv_freq.shape == (D // 2,) and inv_freq.dtype == torch.float32
    y = ops.apply_rope(x, *ops.rope_cos_sin(inv_freq, positions))
    assert y.dtype == dtype
    assert_close(y, rope_by_complex(x, positions, plain_inv_freq(D, theta)), 1e-5)


def test_rope_per_batch_positions():
    x = randn(2, 3, 5, 8)
    positions = torch.tensor([[0, 1, 2, 3, 4], [7, 8, 9, 10, 11]])  # (B, T)
    inv_freq, _ = ops.rope_inv_freq(8, 10_000.0)
    cos, sin = ops.rope_cos_sin(inv_freq, positions)
    assert cos.shape == (2, 5, 4) and cos.dtype == torch.float32
    y = ops.apply_rope(x, cos, sin)
    for b in range(2):
        assert_close(y[b : b + 1], ops.apply_rope(x[b : b + 1], *ops.rope_cos_sin(inv_freq, positions[b])), 1e-6)


@settings(max_examples=40, deadline=None)
@given(m=st.integers(0, 300), n=st.integers(0, 300), shift=st.integers(-300, 300), seed=st.integers(0, 2**16))
def test_rope_scores_depend_only_on_relative_position(m, n, shift, seed):
    D = 16
    q, k = randn(1, 1, 1, D, dtype=torch.float64, seed=seed), randn(1, 1, 1, D, dtype=torch.float64, seed=seed + 1)
    inv_freq, _ = ops.rope_inv_freq(D, 10_000.0)

    def score(m, n):
        rq = ops.apply_rope(q, *ops.rope_cos_sin(inv_freq, torch.tensor([m])))
        rk = ops.apply_rope(k, *ops.rope_cos_sin(inv_freq, torch.tensor([n])))
        return (rq * rk).sum().item()

    shifted = score(m + shift, n + shift) if min(m, n) + shift >= 0 else score(m - shift, n - shift)
    assert math.isclose(score(m, n), shifted, rel_tol=1e-4, abs_tol=1e-4 * D)


def test_linear_scaling_is_position_interpolation():
    D, theta, factor = 16, 10_000.0, 2.5
    x = randn(1, 2, 50, D)
    positions = torch.arange(50)
    scaled, mscale = ops.rope_inv_freq(D, theta, "linear", factor)
    plain, _ = ops.rope_inv_freq(D, theta)
    assert mscale == 1.0
    y = ops.apply_rope(x, *ops.rope_cos_sin(scaled, positions))
    expected = ops.apply_rope(x, *ops.rope_cos_sin(plain, positions / factor))
    assert_close(y, expected, 1e-5)


def test_ntk_scaling_frequencies():
    R, theta, factor = 8, 10_000.0, 4.0
    inv_freq, mscale = ops.rope_inv_freq(R, theta, "ntk", factor)
    base = theta * factor ** (R / (R - 2))  # NTK-aware: stretch the base so the slowest pair slows by `factor`
    expected = torch.tensor([base ** (-2 * i / R) for i in range(R // 2)], dtype=torch.float64)
    assert mscale == 1.0
    assert_close(inv_freq, expected, 1e-7)
    assert inv_freq[0] == 1.0  # the fastest pair is untouched
    assert math.isclose(inv_freq[-1].item(), plain_inv_freq(R, theta)[-1] / factor, rel_tol=1e-6)


def yarn_inv_freq_by_formula(R, theta, factor, L, beta_fast, beta_slow):
    """YaRN, one pair at a time: pair d's index where it makes b turns over L is R ln(L / 2πb) / (2 ln θ)."""

    def index_at_turns(b):
        return R * math.log(L / (2 * math.pi * b)) / (2 * math.log(theta))

    low = max(math.floor(index_at_turns(beta_fast)), 0)
    high = min(math.ceil(index_at_turns(beta_slow)), R - 1)  # R - 1 as in the YaRN code, though pairs stop at R/2 - 1
    out = []
    for d in range(R // 2):
        freq = theta ** (-2 * d / R)
        gamma = min(max((d - low) / (high - low), 0.0), 1.0)  # 0: extrapolate (keep), 1: interpolate
        out.append((1 - gamma) * freq + gamma * freq / factor)
    return out


YARN_CASES = [  # R, theta, factor, original_max_position
    (16, 10_000.0, 4.0, 2048),
    (64, 10_000.0, 8.0, 4096),
    (32, 1_000_000.0, 2.0, 512),
    (16, 10_000.0, 16.0, 131_072),  # the ramp's upper end passes R/2 - 1 and is clamped at R - 1 only
]


@pytest.mark.parametrize("R,theta,factor,L", YARN_CASES, ids=case_ids("R{}-theta{:.0f}-f{:g}-L{}", YARN_CASES))
def test_yarn_scaling_frequencies(R, theta, factor, L):
    inv_freq, mscale = ops.rope_inv_freq(R, theta, "yarn", factor, original_max_position=L)
    expected = torch.tensor(yarn_inv_freq_by_formula(R, theta, factor, L, 32.0, 1.0), dtype=torch.float64)
    assert_close(inv_freq, expected, 1e-7)
    assert math.isclose(mscale, 0.1 * math.log(factor) + 1)
    # what the blend means: fast pairs (> 32 turns over L) are kept, slow ones (< 1 turn) are interpolated
    for d, f in enumerate(plain_inv_freq(R, theta)):
        turns = L * f / (2 * math.pi)
        if turns > 32 * theta ** (2 / R):  # one pair of margin for the rounding of the ramp ends
            assert math.isclose(inv_freq[d].item(), f, rel_tol=1e-6), d
        if turns < 1 / theta ** (2 / R):
            assert math.isclose(inv_freq[d].item(), f / factor, rel_tol=1e-6), d


def test_yarn_mscale_scales_cos_sin():
    inv_freq, mscale = ops.rope_inv_freq(8, 10_000.0, "yarn", 4.0, original_max_position=64)
    cos, sin = ops.rope_cos_sin(inv_freq, torch.arange(5))
    cos_m, sin_m = ops.rope_cos_sin(inv_freq, torch.arange(5), mscale)
    assert_close(cos_m, cos * mscale, 1e-7)
    assert_close(sin_m, sin * mscale, 1e-7)
    assert ops.rope_inv_freq(8, 10_000.0, "yarn", 1.0, original_max_position=64)[1] == 1.0


@pytest.mark.parametrize("factor,L,low,high", [(8.0, 8192, 1.0, 4.0), (32.0, 64, 1.0, 4.0), (4.0, 256, 2.0, 3.0)])
def test_llama3_scaling_frequencies(factor, L, low, high):
    R, theta = 64, 500_000.0
    inv_freq, mscale = ops.rope_inv_freq(R, theta, "llama3", factor, original_max_position=L, low_freq_factor=low,
                                         high_freq_factor=high)
    assert mscale == 1.0
    expected = []
    for f in plain_inv_freq(R, theta):  # one pair at a time, by its wavelength in tokens
        wavelength = 2 * math.pi / f
        if wavelength < L / high:
            expected.append(f)  # fast pairs are kept
        elif wavelength > L / low:
            expected.append(f / factor)  # slow pairs are interpolated
        else:
            s = (L / wavelength - low) / (high - low)
            expected.append((1 - s) * f / factor + s * f)
    assert_close(inv_freq, torch.tensor(expected, dtype=torch.float64), 1e-7)
    assert inv_freq[0] == 1.0 and math.isclose(inv_freq[-1].item(), plain_inv_freq(R, theta)[-1] / factor, rel_tol=1e-6)


def test_yarn_settings_move_the_ramp_and_the_magnitude():
    plain, mscale = ops.rope_inv_freq(32, 10_000.0, "yarn", 4.0, original_max_position=256)
    narrow, _ = ops.rope_inv_freq(32, 10_000.0, "yarn", 4.0, original_max_position=256, beta_fast=4.0)
    expected = torch.tensor(yarn_inv_freq_by_formula(32, 10_000.0, 4.0, 256, 4.0, 1.0), dtype=torch.float64)
    assert_close(narrow, expected, 1e-7)
    assert not torch.equal(plain, narrow)
    assert ops.rope_inv_freq(32, 10_000.0, "yarn", 4.0, original_max_position=256, attention_factor=1.5)[1] == 1.5
    assert mscale == 0.1 * math.log(4.0) + 1


def test_partial_rotary_leaves_the_tail_untouched():
    D, R = 12, 8
    x = randn(2, 3, 9, D)
    inv_freq, _ = ops.rope_inv_freq(R, 10_000.0)
    cos, sin = ops.rope_cos_sin(inv_freq, torch.arange(9))
    y = ops.apply_rope(x, cos, sin)
    assert torch.equal(y[..., R:], x[..., R:])
    assert torch.equal(y[..., :R], ops.apply_rope(x[..., :R].contiguous(), cos, sin))
    assert_close(y, rope_by_complex(x, torch.arange(9), plain_inv_freq(R, 10_000.0)), 1e-5)


def test_apply_rope_keeps_low_precision_dtype():
    x = randn(1, 2, 6, 8).bfloat16()
    inv_freq, _ = ops.rope_inv_freq(8, 10_000.0)
    y = ops.apply_rope(x, *ops.rope_cos_sin(inv_freq, torch.arange(6)))
    assert y.dtype == torch.bfloat16
    assert_close(y.float(), rope_by_complex(x.float(), torch.arange(6), plain_inv_freq(8, 10_000.0)).float(), 1e-2)


# -----------------------------------------------------------------------------
# qk-norm


@pytest.mark.parametrize("with_weight", [True, False], ids=["weight", "no-weight"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=dtype_id)
def test_qk_norm_matches_formula(dtype, with_weight):
    x = (randn(2, 3, 7, 16, dtype=torch.float64) * 3).to(dtype)
    weight = randn(16, dtype=torch.float64, seed=1).to(dtype) if with_weight else None
    eps = 1e-6
    y = ops.qk_norm(x, weight, eps)
    xd = x.double()
    expected = xd / torch.sqrt((xd**2).mean(-1, keepdim=True) + eps)
    if with_weight:
        expected = expected * weight.double()
    assert y.dtype == dtype
    assert_close(y, expected, {torch.float32: 1e-6, torch.float64: 1e-12, torch.bfloat16: 1e-2}[dtype])


# -----------------------------------------------------------------------------
# errors carry the values and the fix


def test_errors_name_the_values():
    q, k, v = qkv(1, 6, 4, 3, 3, 8)
    pos = torch.arange(3)
    with pytest.raises(ValueError, match=r"n_heads \(6\) must be a multiple of n_kv_heads \(4\)"):
        ops.attention(q, k, v, q_positions=pos, k_positions=pos)
    q, k, v = qkv(1, 4, 2, 3, 3, 8)
    with pytest.raises(ValueError, match=r"k_positions \(5,\) for Tk=3"):
        ops.attention(q, k, v, q_positions=pos, k_positions=torch.arange(5))
    with pytest.raises(ValueError, match="window must be at least 1"):
        ops.attention(q, k, v, q_positions=pos, k_positions=pos, window=0)
    with pytest.raises(ValueError, match="rotary_dim must be a positive even number, got 7"):
        ops.rope_inv_freq(7, 10_000.0)
    with pytest.raises(ValueError, match="unknown rope scaling 'dynamic'"):
        ops.rope_inv_freq(8, 10_000.0, "dynamic")
    with pytest.raises(ValueError, match="needs original_max_position"):
        ops.rope_inv_freq(8, 10_000.0, "yarn", 4.0)
    with pytest.raises(ValueError, match="'llama3' needs original_max_position"):
        ops.rope_inv_freq(8, 10_000.0, "llama3", 8.0)
    with pytest.raises(ValueError, match="high_freq_factor > low_freq_factor, got 1.0 and 2.0"):
        ops.rope_inv_freq(8, 10_000.0, "llama3", 8.0, original_max_position=64, low_freq_factor=2.0, high_freq_factor=1.0)
    inv_freq, _ = ops.rope_inv_freq(16, 10_000.0)
    with pytest.raises(ValueError, match="rotary_dim 16 .* exceeds head_dim 8"):
        ops.apply_rope(q, *ops.rope_cos_sin(inv_freq, pos))
    cache = ops.KVCache.empty(1, 2, max_len=4, head_dim=8)
    with pytest.raises(ValueError, match="cannot write 3 tokens at start=2 into a cache of max_len=4"):
        cache.write(k, v, start=2)
    with pytest.raises(ValueError, match="B, Hkv and D must match"):
        cache.write(k[:, :1], v[:, :1], start=0)


# -----------------------------------------------------------------------------
# maskless paths: the same function as the masked reference, without a (T, T) mask


def _grads(fn, q, k, v, seed=7):
    """Output and the gradients of <output, fixed random cotangent> w.r.t. q, k, v."""
    q, k, v = (t.detach().clone().requires_grad_() for t in (q, k, v))
    y = fn(q, k, v)
    y.backward(randn(*y.shape, dtype=y.dtype, seed=seed))
    return [y.detach(), q.grad, k.grad, v.grad]


def _no_mask_allowed(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("built a dense visibility mask on a maskless path")

    monkeypatch.setattr(ops, "attention_mask", refuse)


FAST_CASES = [  # B, Hq, Hkv, T, D, window
    (2, 8, 2, 63, 16, None),
    (1, 4, 4, 200, 8, None),
    (2, 4, 1, 300, 8, 1),
    (2, 8, 2, 300, 16, 37),
    (1, 4, 2, 257, 8, 128),  # window == chunk: the band spans exactly two chunks
    (1, 4, 2, 260, 8, 259),
]


@pytest.mark.parametrize("B,Hq,Hkv,T,D,window", FAST_CASES, ids=case_ids("B{}-Hq{}-Hkv{}-T{}-D{}-W{}", FAST_CASES))
def test_maskless_paths_match_the_masked_reference_with_gradients(B, Hq, Hkv, T, D, window, monkeypatch):
    q, k, v = qkv(B, Hq, Hkv, T, T, D, seed=T)
    positions = torch.arange(T) + 3
    expected = _grads(lambda q, k, v: ops.masked_attention(
        q, k, v, q_positions=positions, k_positions=positions, window=window), q, k, v)
    _no_mask_allowed(monkeypatch)
    actual = _grads(lambda q, k, v: ops.attention(
        q, k, v, q_positions=positions, k_positions=positions, window=window), q, k, v)
    for name, a, e in zip(["y", "dq", "dk", "dv"], actual, expected, strict=True):
        assert_close(a, e, TOLERANCE[torch.float32], name)


@pytest.mark.parametrize("window", [1, 5, 64])
def test_flex_sliding_window_matches_the_masked_reference(window):
    if not ops.flex_attention_available():
        pytest.skip("this torch has no FlexAttention")
    # forward only: FlexAttention has no backward on the CPU (bench/attn_moe_kernels.py checks gradients on a GPU)
    q, k, v = qkv(1, 4, 2, 130, 130, 16, seed=window)
    positions = torch.arange(130)
    expected = ops.masked_attention(q, k, v, q_positions=positions, k_positions=positions, window=window)
    assert_close(ops.flex_sliding_window_attention(q, k, v, window), expected, TOLERANCE[torch.float32])


def test_exporting_takes_the_masked_form(monkeypatch):
    calls = []
    real = ops.attention_mask
    monkeypatch.setattr(ops, "attention_mask", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    monkeypatch.setattr(ops, "is_exporting", lambda: True)
    q, k, v = qkv(1, 4, 2, 9, 9, 8)
    positions = torch.arange(9)
    y = ops.attention(q, k, v, q_positions=positions, k_positions=positions, window=4)
    assert calls, "while exporting, attention must use the explicit-mask form"
    assert_close(y, attention_by_loop(q, k, v, positions.expand(1, 9), positions.expand(1, 9), 4), 1e-5)


def test_causal_prefill_exports_and_matches_eager():
    class Prefill(torch.nn.Module):
        def forward(self, q, k, v):
            positions = torch.arange(q.size(2))
            return ops.attention(q, k, v, q_positions=positions, k_positions=positions, window=3)

    q, k, v = qkv(1, 4, 2, 7, 7, 8)
    program = torch.export.export(Prefill(), (q, k, v))
    assert_close(program.module()(q, k, v), Prefill()(q, k, v), 1e-6)


# -----------------------------------------------------------------------------
# ring-buffer cache of sliding-window layers


RING_CASES = [  # window, prefill, chunk
    (4, 1, 1),
    (4, 3, 1),
    (4, 6, 1),  # prefill longer than the ring
    (5, 2, 3),  # multi-token chunks that wrap around the ring
    (3, 4, 7),  # chunks wider than the window
]


@pytest.mark.parametrize("start_as", ["int", "tensor"])
@pytest.mark.parametrize("window,prefill,chunk", RING_CASES, ids=case_ids("W{}-P{}-C{}", RING_CASES))
def test_ring_cache_decoding_three_windows_matches_the_full_forward(window, prefill, chunk, start_as):
    B, Hq, Hkv, D = 2, 4, 2, 8
    T = 3 * window + prefill  # decode past the window three times over
    q, k, v = qkv(B, Hq, Hkv, T, T, D, seed=window)
    positions = torch.arange(T)
    full = ops.attention(q, k, v, q_positions=positions, k_positions=positions, window=window)

    cache = ops.RingKVCache.empty(B, Hkv, window, D)
    assert cache.k.shape == (B, Hkv, window, D), "the ring holds exactly `window` slots"
    buffers = (cache.k.data_ptr(), cache.v.data_ptr())
    steps = [(0, prefill)] + [(t, min(t + chunk, T)) for t in range(prefill, T, chunk)]
    for t0, t1 in steps:
        start = torch.tensor(t0) if start_as == "tensor" else t0
        k_all, v_all, k_pos = cache.update(k[:, :, t0:t1], v[:, :, t0:t1], start)
        y = ops.attention(q[:, :, t0:t1], k_all, v_all, q_positions=positions[t0:t1], k_positions=k_pos, window=window)
        assert_close(y, full[:, :, t0:t1], 1e-5, f"tokens {t0}..{t1 - 1}")
    assert (cache.k.data_ptr(), cache.v.data_ptr()) == buffers, "the ring is written in place"
    for p in range(T - window, T):  # the ring ends holding the newest window positions
        assert torch.equal(cache.k[:, :, p % window], k[:, :, p]) and torch.equal(cache.v[:, :, p % window], v[:, :, p])


def test_ring_slot_positions():
    cache = ops.RingKVCache.empty(1, 1, 4, 2)
    never = ops.NEVER_WRITTEN
    assert cache.slot_positions(0).tolist() == [never] * 4
    assert cache.slot_positions(2).tolist() == [0, 1, never, never]
    assert cache.slot_positions(6).tolist() == [4, 5, 2, 3]
    assert cache.slot_positions(torch.tensor(9)).tolist() == [8, 5, 6, 7]


def test_caches_say_where_a_write_goes():
    """`slots` is where `write` copies to (and the RoPE kernel stores): the plain cache's start .. start+T-1, a view of
    a tensor start at one token; the ring's p % W at one token, and None for a ring's T > 1 (no slot write)."""
    cache = ops.KVCache.empty(1, 1, max_len=6, head_dim=2)
    assert cache.slots(2, 3).tolist() == [2, 3, 4]
    start = torch.tensor(5)
    assert cache.slots(start, 1).tolist() == [5] and cache.slots(start, 1).data_ptr() == start.data_ptr()
    with pytest.raises(ValueError, match="cannot write 2 tokens at start=5"):
        cache.slots(5, 2)
    ring = ops.RingKVCache.empty(1, 1, 4, 2)
    assert ring.slots(2, 1).tolist() == [2] and ring.slots(torch.tensor(9), 1).tolist() == [1]
    assert ring.slots(9, 3) is None
    k_new, v_new = randn(1, 1, 1, 2), randn(1, 1, 1, 2, seed=1)
    ring.write(k_new, v_new, 9)
    assert torch.equal(ring.k[:, :, 1], k_new[:, :, 0]) and not ring.k[:, :, [0, 2, 3]].any()


def test_step_context_asks_the_first_layers_cache_for_the_slots():
    """The slots of one component's writes are computed once a forward (a ring's remainder: one launch a step, not one
    a layer), per component, and are what each cache's slots say."""
    step = ops.StepContext(torch.tensor([9]))
    rings = [ops.RingKVCache.empty(1, 1, 4, 2) for _ in range(2)]
    first = step.cache_slots("local", rings[0])
    assert first.tolist() == [1] and step.cache_slots("local", rings[1]) is first
    plain = step.cache_slots("global", ops.KVCache.empty(1, 1, max_len=12, head_dim=2))
    assert plain.tolist() == [9] and plain is not first
    assert ops.StepContext(torch.arange(3) + 5).cache_slots("local", rings[0]) is None  # a ring at T > 1


def test_apply_rope_write_kv_is_the_rotation_and_the_cache_write():
    q, k, v = randn(2, 4, 3, 8), randn(2, 2, 3, 8, seed=1), randn(2, 2, 3, 8, seed=2)
    inv_freq, _ = ops.rope_inv_freq(4, theta=10000.0)
    cos, sin = ops.rope_cos_sin(inv_freq, torch.arange(3) + 2)
    cache = ops.KVCache.empty(2, 2, max_len=6, head_dim=8, dtype=torch.float64)
    k_before = k.clone()
    q_rot = ops.apply_rope_write_kv(q, k, v, cos, sin, cache.k, cache.v, cache.slots(2, 3))
    q_ref, k_ref = ops.apply_rope_qk(q, k, cos, sin)
    expected = ops.KVCache.empty(2, 2, max_len=6, head_dim=8, dtype=torch.float64)
    expected.write(k_ref, v, 2)
    assert torch.equal(q_rot, q_ref) and torch.equal(k, k_before)
    assert torch.equal(cache.k, expected.k) and torch.equal(cache.v, expected.v)


def test_full_cache_update_returns_slot_positions():
    cache = ops.KVCache.empty(1, 2, max_len=6, head_dim=4)
    k_all, v_all, k_pos = cache.update(randn(1, 2, 2, 4), randn(1, 2, 2, 4, seed=1), 3)
    assert k_all is cache.k and v_all is cache.v and k_pos.tolist() == list(range(6))


def test_plain_cache_key_positions_are_made_once_per_length_but_not_while_tracing():
    """arange(L) is made once per length and device (a decoding step launched it every step), kept across the
    copies of the cache a graph decoder makes, and L long after the buffers were replaced by longer ones;
    torch.export's trace makes its own (a kept tensor would outlive the trace)."""
    cache = ops.KVCache.empty(1, 1, max_len=6, head_dim=2)
    first = cache.key_positions(torch.tensor(3), 1)
    assert first.tolist() == list(range(6)) and cache.key_positions(4, 1) is first
    assert dataclasses.replace(cache).key_positions(5, 1) is first
    cache.k, cache.v = torch.zeros(1, 1, 9, 2), torch.zeros(1, 1, 9, 2)
    assert cache.key_positions(4, 1).tolist() == list(range(9))

    class Positions(torch.nn.Module):
        def forward(self, k):
            return ops.KVCache(k, k).key_positions(0, 1) + 1

    fresh = ops.KVCache.empty(1, 1, max_len=4, head_dim=2)
    program = torch.export.export(Positions(), (fresh.k,))  # (an arange of length 4 is kept already: fresh's)
    assert program.module()(fresh.k).tolist() == [1, 2, 3, 4]
    assert any(node.target == torch.ops.aten.arange.start_step or "arange" in str(node.target)
               for node in program.graph.nodes)


def test_step_context_computes_the_angles_with_the_function_given():
    """A decoding step hands StepContext the angles' kernel: the first layer of a component computes them with it,
    the others reuse them; without one, the reference."""
    calls = []

    def angles(inv_freq, positions, mscale):
        calls.append(positions)
        return ops.rope_cos_sin(inv_freq, positions, mscale)

    inv_freq, _ = ops.rope_inv_freq(4, theta=10000.0)
    step = ops.StepContext(torch.tensor([7]))
    cos, sin = step.rope_cos_sin("attn", inv_freq, 1.0, angles)
    assert step.rope_cos_sin("attn", inv_freq, 1.0, angles)[0] is cos and len(calls) == 1
    assert torch.equal(cos, ops.rope_cos_sin(inv_freq, torch.tensor([7]))[0])
    assert torch.equal(step.rope_cos_sin("other", inv_freq)[1], sin) and len(calls) == 1


def test_ring_decode_step_exports():
    class DecodeStep(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.register_buffer("k_ring", torch.zeros(1, 2, 3, 4))
            self.register_buffer("v_ring", torch.zeros(1, 2, 3, 4))

        def forward(self, q, k, v, start):
            k_all, v_all, k_pos = ops.RingKVCache(self.k_ring, self.v_ring).update(k, v, start)
            q_pos = start + torch.arange(q.size(2))
            return ops.attention(q, k_all, v_all, q_positions=q_pos, k_positions=k_pos, window=3)

    q, k, v = qkv(1, 4, 2, 1, 1, 4)
    program = torch.export.export(DecodeStep(), (q, k, v, torch.tensor(0)))
    eager, exported = DecodeStep(), program.module()
    for t in range(7):
        q, k, v = qkv(1, 4, 2, 1, 1, 4, seed=3 * t)
        assert_close(exported(q, k, v, torch.tensor(t)), eager(q, k, v, torch.tensor(t)), 1e-6, f"step {t}")


@pytest.mark.parametrize("T,window", [(700, 300), (1024, 128), (1000, 1), (256, 1000)])
def test_sliding_window_block_mask_lists_the_band_blocks(T, window):
    """Built from block indices, it names the blocks create_block_mask finds from the dense (T, T) rule; forward
    through eager FlexAttention equals the masked reference."""
    flex = pytest.importorskip("torch.nn.attention.flex_attention")
    ours = ops._sliding_window_block_mask(T, window, "cpu")
    dense = flex.create_block_mask(lambda b, h, q, k: (k <= q) & (q - k < window), B=None, H=None, Q_LEN=T,
                                   KV_LEN=T, device="cpu")
    assert torch.equal(ours.to_dense(), dense.to_dense()), "the same blocks are visited"
    q, k, v = qkv(1, 2, 1, T, T, 16, seed=T)
    positions = torch.arange(T)
    expected = ops.masked_attention(q, k, v, q_positions=positions, k_positions=positions, window=window)
    assert_close(ops.flex_sliding_window_attention(q, k, v, window), expected, TOLERANCE[torch.float32])

