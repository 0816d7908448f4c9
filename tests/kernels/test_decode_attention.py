"""kernels/decode_attention.py: the split-KV attention of a decoding step's queries over a KV cache, against its
reference and against the masked SDPA path it replaces (ops/attention.py's StepContext mask and `attend`), on caches
written by the runtime's own KVCache / RingKVCache with the positions the StepContext hands the kernel: plain and ring
caches with never-written slots (their keys and values NaN: the kernel must not read them into a result), windows
that bind and that do not, left pads, batch rows at different positions, a query that sees no key. Every buffer the
kernels write starts as NaN. Without CUDA the kernels run in Triton's CPU interpreter (TRITON_INTERPRET=1), so shapes
are small.
"""

import math

import pytest
import torch

pytest.importorskip("triton")

from archgen_kernels import decode_attention as da
from templates.runtime import attention as runtime
from tests.kernels.gpu_configs import gpu_choices
from tests.numerics import assert_close

pytestmark = pytest.mark.usefixtures("poisoned_empty")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2}


def randn(*shape, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g).to(device=DEVICE, dtype=dtype)


def cached_step(B, HQ, HKV, D, dtype, *, length, start, T, window=None, ring=False, pads=None, seed=0):
    """A cache of `length` slots (a ring of `window` when ring) filled NaN, positions 0 .. start-1 written, then the
    step's T tokens written at start by the cache's own write: (q, k, v to attend over, the StepContext)."""
    cache = (runtime.RingKVCache if ring else runtime.KVCache).empty(B, HKV, window if ring else length, D,
                                                                      device=DEVICE, dtype=dtype)
    cache.k.fill_(float("nan"))
    cache.v.fill_(float("nan"))
    if start:
        cache.write(randn(B, HKV, start, D, dtype=dtype, seed=seed), randn(B, HKV, start, D, dtype=dtype, seed=seed + 1),
                    0)
    k, v = cache.write(randn(B, HKV, T, D, dtype=dtype, seed=seed + 2), randn(B, HKV, T, D, dtype=dtype, seed=seed + 3),
                       start)
    q = randn(B, T, HQ, D, dtype=dtype, seed=seed + 4).transpose(1, 2)  # a projection's view, as the model's q
    pads = None if pads is None else torch.tensor(pads, device=DEVICE)
    step = runtime.StepContext(start + torch.arange(T, device=DEVICE), pads)
    return q, k, v, cache, step


def check(q, k, v, cache, step, window, dtype, scale=None):
    """The op against its reference (which reads no slot that no query sees, as the kernel) and against the masked
    SDPA the model runs otherwise (given the never-written slots zeroed, as a cache starts: SDPA would read NaN)."""
    k_positions = step.key_positions("attn", cache)
    with torch.no_grad():
        y = da.decode_attention(q, k, v, step.token_positions, k_positions, window, scale)
    assert y.shape == q.shape and y.dtype == dtype
    if q.size(1) // k.size(1) * q.size(2) <= da.MAX_ROWS:  # the kernel ran (else the reference did)
        assert y.transpose(1, 2).is_contiguous(), "SDPA's output layout: (B, T, Hq, D) in memory"
    reference = da.decode_attention_reference(q.double(), k.double(), v.double(), step.token_positions, k_positions,
                                              window, scale)
    k0, v0 = k.nan_to_num(0.0), v.nan_to_num(0.0)
    assert_close(y, reference.to(dtype), TOL[dtype], "against the reference")
    mask = step.attention_mask("attn", cache, window=window, dtype=q.dtype)
    sdpa = runtime.attend(q, k0, v0, mask, scale=scale)
    assert_close(y, sdpa, TOL[dtype], "against the masked SDPA")
    one_call = runtime.decode_attention(q, k0, v0, step.token_positions, k_positions, window, scale)
    assert_close(one_call, sdpa, 0.0, "ops/attention.py's decode_attention is the masked SDPA")
    return y


CASES = {  # B, HQ, HKV, D, length, start, T, window, ring, pads
    "gqa5-plain": (1, 10, 2, 64, 40, 29, 1, None, False, None),  # Hymba+'s group of 5; slots 30.. never written
    "gqa4-window-binds": (2, 8, 2, 128, 37, 30, 1, 8, False, None),  # 37 slots (no power of two), window 8
    "gqa4-window-loose": (1, 4, 1, 32, 20, 9, 1, 64, False, None),
    "mha-odd-dim-T3": (1, 3, 3, 24, 19, 7, 3, None, False, None),  # head dim 24, three queries, group 1
    "ring-unfilled": (1, 5, 1, 64, 64, 5, 1, 16, True, None),  # a ring of 16 with 10 slots never written
    "ring-wrapped": (2, 10, 2, 64, 64, 45, 1, 16, True, None),
    "ring-T2": (1, 4, 2, 32, 64, 21, 2, 16, True, None),  # two tokens: the ring before the write, then them
    "pads": (2, 10, 2, 64, 32, 6, 1, None, False, [0, 3]),  # row 1's first 3 slots hide
    "pads-window": (2, 4, 1, 64, 48, 40, 1, 8, False, [5, 0]),
    "pad-query-sees-nothing": (2, 4, 2, 32, 48, 2, 3, None, False, [0, 4]),  # row 1: two pad queries, then its first
    # token; three splits, each empty for the pad queries
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_matches_reference_and_masked_sdpa(case, dtype):
    B, HQ, HKV, D, length, start, T, window, ring, pads = case
    q, k, v, cache, step = cached_step(B, HQ, HKV, D, dtype, length=length, start=start, T=T, window=window, ring=ring,
                                       pads=pads)
    y = check(q, k, v, cache, step, window, dtype)
    if pads is not None:
        sees_none = (step.token_positions < 0).reshape(B, 1, T, 1).expand_as(y)
        assert (y[sees_none] == 0).all(), "a query that sees no key outputs zeros"


def test_one_split_and_several_blocks_a_split(monkeypatch):
    """Few SMs: one split walks every block and writes the output itself (no combine); two: splits of several
    blocks each, combined."""
    q, k, v, cache, step = cached_step(1, 10, 2, 64, torch.float32, length=70, start=60, T=1)
    for sms, splits in ((1, 1), (2, 2)):
        monkeypatch.setattr(da, "INTERPRETER_SMS", sms)
        blocks = math.ceil(70 / da.INTERPRETER_CONFIG["BLOCK_S"])
        assert da.split_slots(1, 2, 70, da.INTERPRETER_CONFIG["BLOCK_S"], da.INTERPRETER_CONFIG["WAVES"], sms)[0] \
            == splits and blocks > splits
        check(q, k, v, cache, step, None, torch.float32, scale=0.3)


def test_split_slots_fill_the_gpu():
    assert da.split_slots(1, 5, 1024, 32, 2, 132) == (32, 32)  # Hymba+'s window: one block a split, 160 programs
    assert da.split_slots(1, 5, 1024, 16, 2, 132) == (32, 32)  # 53 wanted: whole blocks, none empty
    assert da.split_slots(64, 8, 1024, 32, 2, 132) == (1, 1024)  # a large batch fills the GPU by itself
    splits, per_split = da.split_slots(1, 8, 37, 16, 2, 132)
    assert per_split % 16 == 0 and (splits - 1) * per_split < 37 <= splits * per_split


@pytest.mark.parametrize("choice", gpu_choices(6))
def test_every_gpu_config(gpu_configs, choice):
    """At each config a GPU can launch (gpu_configs.py), over 300 slots (several splits at every BLOCK_S), Hymba+'s
    group and head dim, a binding window, bf16."""
    gpu_configs.choose(choice)
    with gpu_configs.named():
        q, k, v, cache, step = cached_step(1, 10, 2, 64, torch.bfloat16, length=300, start=250, T=1, seed=3)
        check(q, k, v, cache, step, 200, torch.bfloat16)


def test_falls_back_beyond_a_tile_and_under_autograd():
    """More rows than a tile (G × T > MAX_ROWS) and a gradient take the reference, and agree."""
    q, k, v, cache, step = cached_step(1, 12, 1, 16, torch.float32, length=16, start=2, T=6)  # 72 rows
    check(q, k, v, cache, step, None, torch.float32)
    q.requires_grad_()
    y = da.decode_attention(q, k.nan_to_num(0.0), v.nan_to_num(0.0), step.token_positions,
                            step.key_positions("attn", cache))
    y.sum().backward()
    assert q.grad is not None and torch.isfinite(q.grad).all()


def test_rejects_bad_shapes():
    q, k, v = randn(1, 5, 1, 16), randn(1, 2, 8, 16), randn(1, 2, 8, 16)
    with pytest.raises(ValueError, match="divide"):
        da.decode_attention(q, k, v, torch.tensor([3]), torch.arange(8))
    with pytest.raises(ValueError, match="positions"):
        da.decode_attention(q[:, :4], k, v, torch.tensor([3, 4]), torch.arange(8))


def test_opcheck():
    q, k, v, cache, step = cached_step(2, 4, 2, 32, torch.float32, length=24, start=10, T=1, pads=[0, 2])
    args = (q, k.nan_to_num(0.0), v.nan_to_num(0.0), step.token_positions, step.key_positions("attn", cache), 8, 0.2)
    torch.library.opcheck(da.decode_attention_op, args, test_utils=("test_schema", "test_faketensor"))


def test_compiles_in_one_graph():
    """Under torch.compile the entry point takes the custom op (one node), and gives the eager result."""
    q, k, v, cache, step = cached_step(1, 4, 2, 32, torch.float32, length=24, start=10, T=1)
    k, v = k.nan_to_num(0.0), v.nan_to_num(0.0)
    k_positions = step.key_positions("attn", cache)

    def attend(q, k, v, q_positions, k_positions):
        return da.decode_attention(q, k, v, q_positions, k_positions, 8)

    with torch.no_grad():
        eager = attend(q, k, v, step.token_positions, k_positions)
        compiled = torch.compile(attend, fullgraph=True, backend="aot_eager")(q, k, v, step.token_positions,
                                                                              k_positions)
    assert_close(compiled, eager, 1e-6, "compiled")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", ["gqa5-plain", "gqa4-window-binds", "gqa4-window-loose", "pads", "mha-odd-dim-T3",
                                  "pad-query-sees-nothing"])
def test_one_launch_gives_the_two_launch_output_bit_for_bit_and_leaves_the_counters_zero(case, dtype):
    """The last split to finish combines the splits with the combine launch's code in its order: the same bits, on
    every case with several splits; the counters are zero again after it (a graph's replay starts from zero), and a
    second call (the same counters) gives the same bits (deterministic, whichever program finishes last)."""
    B, HQ, HKV, D, length, start, T, window, ring, pads = CASES[case]
    q, k, v, cache, step = cached_step(B, HQ, HKV, D, dtype, length=length, start=start, T=T, window=window, ring=ring,
                                       pads=pads)
    k_positions = step.key_positions("attn", cache)
    config = da.INTERPRETER_CONFIG
    assert da.split_slots(B, HKV, k.size(2), config["BLOCK_S"], config["WAVES"], da.INTERPRETER_SMS)[0] > 1
    with torch.no_grad():
        two = da.decode_attention(q, k, v, step.token_positions, k_positions, window)
        one = da.decode_attention_one_launch(q, k, v, step.token_positions, k_positions, window)
        again = da.decode_attention_one_launch(q, k, v, step.token_positions, k_positions, window)
    assert torch.equal(one, two) and torch.equal(again, one)
    assert one.transpose(1, 2).is_contiguous(), "SDPA's output layout"
    assert not da.combine_counters(q.device, B * HKV).any(), "the last split zeroes its counter"
    reference = da.decode_attention_reference(q.double(), k.double(), v.double(), step.token_positions, k_positions,
                                              window)
    assert_close(one, reference.to(dtype), TOL[dtype], "against the reference")


def test_one_launch_runs_no_combine_kernel(monkeypatch):
    """The one-launch path never launches the combine kernel; the two-launch path does (with several splits)."""
    q, k, v, cache, step = cached_step(1, 10, 2, 64, torch.float32, length=70, start=60, T=1)
    launches = []

    class Spy:
        def __getitem__(self, grid):
            launches.append(grid)
            return lambda *args, **kwargs: None

    monkeypatch.setattr(da, "_combine_kernel", Spy())
    with torch.no_grad():
        da.decode_attention_one_launch(q, k, v, step.token_positions, step.key_positions("attn", cache))
        assert not launches
        da.decode_attention(q, k, v, step.token_positions, step.key_positions("attn", cache))
    assert len(launches) == 1


def test_one_launch_op_checks_and_compiles_in_one_graph():
    q, k, v, cache, step = cached_step(2, 4, 2, 32, torch.float32, length=24, start=10, T=1, pads=[0, 2])
    k, v = k.nan_to_num(0.0), v.nan_to_num(0.0)
    k_positions = step.key_positions("attn", cache)
    args = (q, k, v, step.token_positions, k_positions, 8, 0.2)
    torch.library.opcheck(da.decode_attention_one_launch_op, args, test_utils=("test_schema", "test_faketensor"))

    def attend(q, k, v, q_positions, k_positions):
        return da.decode_attention_one_launch(q, k, v, q_positions, k_positions, 8)

    with torch.no_grad():
        eager = attend(q, k, v, step.token_positions, k_positions)
        compiled = torch.compile(attend, fullgraph=True, backend="aot_eager")(q, k, v, step.token_positions,
                                                                              k_positions)
    assert torch.equal(compiled, eager)
