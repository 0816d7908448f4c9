"""kernels/decode_attention.py against the runtime op it replaces (templates/runtime/attention.py decode_attention: the
cache write, then SDPA under the mask): a KVCache and a RingKVCache (the slot wraps), grouped heads, a head width that
is not a power of two, a cache of several blocks with a partial last one, masks per row (pads) with whole blocks
hidden, float32 and half precision; the caches written as the reference writes them; poisoned outputs. Without CUDA the
kernel runs in Triton's CPU interpreter (TRITON_INTERPRET=1), so shapes are small.
"""

import pytest
import torch

pytest.importorskip("triton")

from archgen_kernels import decode_attention as da
from templates.runtime import attention as runtime
from tests.numerics import assert_close

pytestmark = pytest.mark.usefixtures("poisoned_empty")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}


def randn(g, *shape, dtype=torch.float32):
    return torch.randn(*shape, generator=g).to(device=DEVICE, dtype=dtype)


def step_inputs(g, B, HQ, HKV, S, D, dtype, position, ring, pads=None, window=None):
    """q, k, v as a projection's views, caches holding earlier tokens, and the step's mask bias as a model builds it."""
    q = randn(g, B, 1, HQ * D, dtype=dtype).view(B, 1, HQ, D).transpose(1, 2)
    kv = randn(g, B, 1, 2 * HKV * D, dtype=dtype).view(B, 1, 2 * HKV, D).transpose(1, 2)
    k, v = kv[:, :HKV], kv[:, HKV:]
    k_cache, v_cache = randn(g, B, HKV, S, D, dtype=dtype), randn(g, B, HKV, S, D, dtype=dtype)
    cache = (runtime.RingKVCache if ring else runtime.KVCache)(k_cache, v_cache)
    positions = torch.tensor([position], device=DEVICE)
    step = runtime.StepContext(positions, pads)
    mask = step.attention_mask("attn", cache, window=window, dtype=dtype)
    return q, k, v, cache, positions, mask


@pytest.mark.parametrize(("dtype", "ring", "position", "group", "D"), [
    (torch.float32, False, 29, 1, 16),
    (torch.float32, False, 40, 3, 24),  # the last slot of the cache; a head width that is not a power of two
    (torch.float32, True, 93, 2, 16),  # the ring wrapped: slot 93 % 41
    (torch.bfloat16, True, 7, 3, 32),  # a ring not yet full: slots past the position hold no key
    (torch.float16, False, 0, 2, 16),  # the first token: it sees only itself
])
def test_decode_attention_matches_the_write_and_sdpa(dtype, ring, position, group, D):
    g = torch.Generator().manual_seed(position + D)
    B, HKV, S = 2, 2, 41
    q, k, v, cache, positions, mask = step_inputs(g, B, HKV * group, HKV, S, D, dtype, position, ring,
                                                  window=S if ring else None)
    k_cache, v_cache = cache.k.clone(), cache.v.clone()
    y = da.decode_attention(q, k, v, k_cache, v_cache, positions, mask.bias, ring)
    y_ref = runtime.decode_attention(q, k, v, cache.k, cache.v, positions, mask.bias, ring)
    assert y.shape == y_ref.shape == (B, HKV * group, 1, D) and y.dtype == dtype
    assert_close(y, y_ref, TOL[dtype])
    assert torch.equal(k_cache, cache.k) and torch.equal(v_cache, cache.v)  # the same slot written, nothing else
    y_float = da.decode_attention_reference(q, k, v, cache.k.clone(), cache.v.clone(), positions, mask.bias, ring)
    assert_close(y, y_float, TOL[dtype])


def test_decode_attention_masks_per_row_and_whole_blocks():
    """A ragged batch: row 1's first 20 slots are pads (hidden: more than the interpreter's 16-slot block), a window,
    a scale; the kernel takes the bias as given and the layer zeroes no row (every query sees itself)."""
    g = torch.Generator().manual_seed(3)
    B, HQ, HKV, S, D = 2, 4, 2, 37, 16
    pads = torch.tensor([0, 20], device=DEVICE)
    q, k, v, cache, positions, mask = step_inputs(g, B, HQ, HKV, S, D, torch.float32, 30, False, pads=pads,
                                                  window=12)
    assert mask.bias.shape == (B, 1, 1, S) and torch.isinf(mask.bias[1, 0, 0, :20]).all()
    k_cache, v_cache = cache.k.clone(), cache.v.clone()
    y = da.decode_attention(q, k, v, k_cache, v_cache, positions, mask.bias, False, 0.3)
    y_ref = runtime.decode_attention(q, k, v, cache.k, cache.v, positions, mask.bias, False, 0.3)
    assert_close(y, y_ref, TOL[torch.float32])
    assert torch.equal(k_cache, cache.k) and torch.equal(v_cache, cache.v)


def test_write_and_attend_takes_the_kernel_for_one_token():
    """ops/attention.py's write_and_attend with the kernel = the cache's write and attend, for a ring cache."""
    g = torch.Generator().manual_seed(5)
    q, k, v, cache, positions, mask = step_inputs(g, 1, 4, 2, 24, 16, torch.float32, 50, True, window=24)
    kernel_cache = runtime.RingKVCache(cache.k.clone(), cache.v.clone())
    y = runtime.write_and_attend(q, k, v, kernel_cache, positions, mask, kernel=da.decode_attention)
    y_ref = runtime.write_and_attend(q, k, v, cache, positions, mask)
    assert_close(y, y_ref, TOL[torch.float32])
    assert torch.equal(kernel_cache.k, cache.k) and torch.equal(kernel_cache.v, cache.v)


def test_decode_attention_checks_shapes_and_runs_on_meta():
    q = torch.empty(1, 4, 1, 16, device="meta")
    k = torch.empty(1, 2, 1, 16, device="meta")
    cache = torch.empty(1, 2, 8, 16, device="meta")
    y = da.decode_attention(q, k, k, cache, cache.clone(), torch.zeros(1, dtype=torch.long, device="meta"),
                            torch.empty(1, 1, 1, 8, device="meta"))
    assert y.shape == (1, 4, 1, 16)
    with pytest.raises(ValueError, match="bias"):
        da.decode_attention_forward(q, k, k, cache, cache, torch.zeros(1, dtype=torch.long, device="meta"),
                                    torch.empty(1, 1, 1, 7, device="meta"))


def test_the_build_time_tuning_hook_tunes_the_window_bucket():
    """`archgen build --autotune` calls autotune(config, params, batch, seqlen, dtype, device) in a tuning session: the
    bucket of a cache of the window's slots when the window is shorter than the sequence."""
    from archgen_kernels import triton_support

    config = {"n_heads": 4, "n_kv_heads": 2, "head_dim": 16, "window": 12}
    with triton_support.tuning_session() as table:
        da.autotune(config, {}, batch=1, seqlen=20, dtype=torch.float32, device=DEVICE)
        tuned = {(entry["kernel"], entry["key"]) for entry in table()["entries"]}
    assert tuned == {("decode_attention.forward", da.shape_key(12, 16, 2, torch.float32))}
