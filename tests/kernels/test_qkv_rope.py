"""kernels/qkv_rope.py: an attention's decoding step, the q, k and v GEMV with RoPE and the KV-cache write in its
epilogue, against the two launches it replaces (kernels/gemv.py's qkv_linear kernel, then kernels/rope.py's
apply_rope_write_kv kernel), bit for bit, and against the references: q rotated in the projection's layout, k rotated
and v in the caches' rows `slots`, every other cache row untouched. Grouped heads, head dim 64 and 16, full and partial
rotary (an odd number of pairs), biases or none, batch 1 and 3, two tokens, ring-buffer slots, per-sequence angles,
float32 and bfloat16, a cache dtype other than x's. Runs in Triton's interpreter without CUDA; kernel-written
buffers start as NaN."""

import math

import pytest
import torch

pytest.importorskip("triton")

from archgen_kernels import gemv, rope
from archgen_kernels import qkv_rope as kernel
from tests.numerics import TOLERANCE, assert_close

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
pytestmark = pytest.mark.usefixtures("poisoned_empty")  # tests/kernels/conftest.py

# id: (dtype, cache dtype, B, T, HQ, HK, D, rotary dim R, K in, biases, per-sequence angles, cache length, slots)
CASES = {
    "fp32-B1-H4/2-D64-R64-bias": (torch.float32, torch.float32, 1, 1, 4, 2, 64, 64, 40, True, False, 8, [5]),
    "bf16-B1-H3/1-D64-R46-odd-pairs": (torch.bfloat16, torch.bfloat16, 1, 1, 3, 1, 64, 46, 70, False, False, 6, [0]),
    "bf16-B3-H2/2-D16-fp32-cache-per-seq": (torch.bfloat16, torch.float32, 3, 1, 2, 2, 16, 16, 33, True, True, 5, [3]),
    "fp32-B2-T2-H2/1-D16-R10-ring": (torch.float32, torch.float32, 2, 2, 2, 1, 16, 10, 24, False, False, 4, [3, 0]),
}
CONFIGS = {"default": None, "8x16": {"BLOCK_N": 8, "BLOCK_K": 16, "num_warps": 1},
           "1x32": {"BLOCK_N": 1, "BLOCK_K": 32, "num_warps": 1}}


def _inputs(case):
    dtype, cache_dtype, B, T, HQ, HK, D, R, K, bias, per_sequence, L, slots = CASES[case]
    g = torch.Generator().manual_seed(HQ * D + K)

    def randn(*shape, scale=1.0, dt=dtype):
        return (torch.randn(*shape, generator=g) * scale).to(DEVICE, dt)

    weights = [randn(rows, K, scale=1 / math.sqrt(K)) for rows in (HQ * D, HK * D, HK * D)]
    biases = [randn(w.shape[0]) if bias else None for w in weights]
    angles = torch.rand(*((B,) if per_sequence else ()), T, R // 2, generator=g).to(DEVICE) * 6
    caches = [randn(B, HK, L, D, dt=cache_dtype) for _ in "kv"]  # old entries: only rows `slots` may change
    return (randn(B, T, K), *weights, *biases, angles.cos(), angles.sin(), *caches,
            torch.tensor(slots, device=DEVICE))


def _two_launches(args, config):
    """qkv_linear's kernel (the config given), its q, k and v viewed as the attention template views them, then
    apply_rope_write_kv's kernel: q rotated; the caches (new tensors) written."""
    x, wq, wk, wv, bq, bk, bv, cos, sin, k_cache, v_cache, slots = args
    B, T, _ = x.shape
    D = k_cache.shape[-1]
    qkv = gemv.qkv_gemv_forward(x, wq, wk, wv, bq, bk, bv, config=config)
    q, k, v = (t.view(B, T, -1, D).transpose(1, 2) for t in qkv.split([wq.shape[0], wk.shape[0], wv.shape[0]], -1))
    k_cache, v_cache = k_cache.clone(), v_cache.clone()
    return rope.rope_write_kv(q, k, v, cos, sin, k_cache, v_cache, slots), k_cache, v_cache


@pytest.mark.parametrize("config", CONFIGS.values(), ids=CONFIGS.keys())
@pytest.mark.parametrize("case", CASES)
def test_one_launch_gives_the_two_launches_bits(case, config):
    """q (values, shape and layout) and both caches whole: qkv_linear then apply_rope_write_kv with the same GEMV
    config, bit for bit, written into the caches given; rows other than `slots` keep their old entries."""
    args = _inputs(case)
    *_, k_cache, v_cache, slots = args
    expected_q, expected_k, expected_v = _two_launches(args, config)
    ours_k, ours_v = k_cache.clone(), v_cache.clone()
    addresses = ours_k.data_ptr(), ours_v.data_ptr()
    q = kernel.qkv_rope_write_kv_forward(*args[:9], ours_k, ours_v, slots, config=config)
    assert q.shape == expected_q.shape and q.stride() == expected_q.stride() and q.dtype == expected_q.dtype
    assert (ours_k.data_ptr(), ours_v.data_ptr()) == addresses
    for name, ours, theirs in (("q", q, expected_q), ("k_cache", ours_k, expected_k), ("v_cache", ours_v, expected_v)):
        assert torch.equal(ours, theirs), f"{name}: not the two launches' bits, max diff " \
                                          f"{(ours.float() - theirs.float()).nan_to_num(1e9).abs().max().item()}"
    untouched = torch.ones(k_cache.shape[2], dtype=torch.bool, device=DEVICE)
    untouched[slots] = False
    assert torch.equal(ours_k[:, :, untouched], k_cache[:, :, untouched])
    assert torch.equal(ours_v[:, :, untouched], v_cache[:, :, untouched])
    # and the definition (F.linear's sums in float32, another order; rounded through x's dtype: close, not equal)
    tol = TOLERANCE[args[0].dtype]
    reference_k, reference_v = k_cache.clone(), v_cache.clone()
    reference_q = kernel.qkv_rope_write_kv_reference(*args[:9], reference_k, reference_v, slots)
    assert_close(q, reference_q, what="q")
    assert_close(ours_k[:, :, slots], reference_k[:, :, slots], tol, what="k_cache")
    assert_close(ours_v[:, :, slots], reference_v[:, :, slots], tol, what="v_cache")


def test_the_entry_point_and_the_op_give_the_kernels_bits():
    args = _inputs("fp32-B1-H4/2-D64-R64-bias")
    expected = kernel.qkv_rope_write_kv_forward(*args[:9], args[9].clone(), args[10].clone(), args[11])
    for call in (kernel.qkv_rope_write_kv_, kernel.qkv_rope_write_kv_op):
        k_cache, v_cache = args[9].clone(), args[10].clone()
        q = call(*args[:9], k_cache, v_cache, args[11])
        assert torch.equal(q, expected) and q.stride() == expected.stride()
        assert not torch.equal(k_cache, args[9]) and not torch.equal(v_cache, args[10])


def test_the_op_declares_its_mutations_and_compiles_in_one_graph():
    args = _inputs("bf16-B3-H2/2-D16-fp32-cache-per-seq")
    x, *weights, k_cache, v_cache, slots = args
    torch.library.opcheck(kernel.qkv_rope_write_kv_op, (*args[:9], k_cache.clone(), v_cache.clone(), slots),
                          test_utils=("test_schema", "test_faketensor"))
    schema = torch.ops.archgen_v1.qkv_rope_write_kv_.default._schema
    written = {a.name for a in schema.arguments if a.alias_info is not None and a.alias_info.is_write}
    assert written == {"k_cache", "v_cache"}, written

    def step(x, k_cache, v_cache):
        return kernel.qkv_rope_write_kv_(x, *weights, k_cache, v_cache, slots) * 2

    eager_k, eager_v, compiled_k, compiled_v = k_cache.clone(), v_cache.clone(), k_cache.clone(), v_cache.clone()
    eager = step(x, eager_k, eager_v)
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")(x, compiled_k, compiled_v)
    for name, ours, theirs in (("q", compiled, eager), ("k_cache", compiled_k, eager_k), ("v_cache", compiled_v, eager_v)):
        torch.testing.assert_close(ours, theirs, rtol=0, atol=0, msg=lambda m, name=name: f"{name} differs: {m}")
    assert not torch.equal(eager_k, k_cache)


def test_more_rows_than_a_gemv_takes_or_a_gradient_run_the_two_ops():
    """Beyond gemv.FEW_ROWS rows (cuBLAS's), or with a gradient to keep: the three products and apply_rope_write_kv;
    the same results as the reference."""
    args = list(_inputs("fp32-B2-T2-H2/1-D16-R10-ring"))
    g = torch.Generator().manual_seed(3)
    args[0] = torch.randn(2, 3, args[0].shape[-1], generator=g).to(DEVICE)  # 6 rows
    args[7], args[8] = (torch.cat([a, a[:1]], dim=0) for a in (args[7], args[8]))  # (3, R/2)
    args[11] = torch.tensor([1, 2, 3], device=DEVICE)
    ours, theirs = [args[9].clone(), args[10].clone()], [args[9].clone(), args[10].clone()]
    q = kernel.qkv_rope_write_kv_(*args[:9], *ours, args[11])
    expected = kernel.qkv_rope_write_kv_reference(*args[:9], *theirs, args[11])
    assert_close(q, expected, what="q")
    assert_close(ours[0], theirs[0], what="k_cache")
    assert_close(ours[1], theirs[1], what="v_cache")

    x = args[0][:, :1].clone().requires_grad_()
    q = kernel.qkv_rope_write_kv_(x, *args[1:7], args[7][:1], args[8][:1], *ours, args[11][:1])
    q.sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()


def test_bad_inputs_are_named():
    x, wq, wk, wv, bq, bk, bv, cos, sin, k_cache, v_cache, slots = _inputs("fp32-B1-H4/2-D64-R64-bias")
    forward = kernel.qkv_rope_write_kv_forward
    with pytest.raises(ValueError, match="k_weight must be"):
        forward(x, wq, wk[:-1], wv, bq, bk, bv, cos, sin, k_cache, v_cache, slots)
    with pytest.raises(ValueError, match="whole heads"):
        forward(x, wq[:-1], wk, wv, bq[:-1], bk, bv, cos, sin, k_cache, v_cache, slots)
    with pytest.raises(ValueError, match="all or none a bias"):
        forward(x, wq, wk, wv, None, bk, bv, cos, sin, k_cache, v_cache, slots)
    with pytest.raises(ValueError, match="cos and sin"):
        forward(x, wq, wk, wv, bq, bk, bv, torch.ones(1, 33, device=DEVICE), sin, k_cache, v_cache, slots)
    with pytest.raises(ValueError, match="slots must be"):
        forward(x, wq, wk, wv, bq, bk, bv, cos, sin, k_cache, v_cache, slots.float())
    with pytest.raises(ValueError, match="caches must"):
        forward(x, wq, wk, wv, bq, bk, bv, cos, sin, k_cache, v_cache.half(), slots)
