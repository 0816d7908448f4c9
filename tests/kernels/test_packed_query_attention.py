"""archgen_kernels.packed_query_attention (kernels/packed_query_attention.py) against its dense masked reference and
against the runtime op it replaces (templates/runtime/routing.py): the output and the gradients of q, k and v.

Without CUDA the kernels run in Triton's CPU interpreter (slow), with 16 x 16 blocks, so the shapes are small but
cross several blocks and are ragged: lengths not a multiple of the block, head dims not a power of two, grouped
query heads, padding rows (not valid), a key sequence longer than the queries reach (a cache's unwritten tail).
"""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # must precede the first import of triton
pytest.importorskip("triton")

import triton  # after the interpreter switch above
import triton.language as tl

from archgen_kernels import packed_query_attention as pqa
from archgen_kernels import triton_support
from templates.runtime import attention, routing
from tests.kernels.gpu_configs import gpu_choices
from tests.numerics import TOLERANCE, assert_close

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def packed_inputs(B, H, Hkv, T, D, fraction, *, Dv=None, Tk=None, dtype=torch.float32, seed=0):
    """Random q (packed rows of the selected tokens, as the HSPMN block builds them), k, v over Tk >= T keys."""
    g = torch.Generator().manual_seed(seed)
    selected = torch.rand(B, T, generator=g) < fraction
    index, valid = routing.pack_selected(selected)  # (B, S): selected tokens first, in order, then padding
    positions = torch.arange(T)[index]
    S, Tk, Dv = index.shape[1], Tk or T, Dv or D

    def randn(*shape):
        return torch.randn(*shape, generator=g).to(dtype).to(DEVICE).requires_grad_()

    return randn(B, H, S, D), randn(B, Hkv, Tk, D), randn(B, Hkv, Tk, Dv), positions.to(DEVICE), valid.to(DEVICE)


def output_and_grads(fn, q, k, v, positions, valid, cotangent, **kwargs):
    y = fn(q, k, v, positions, valid, **kwargs)
    grads = torch.autograd.grad(y, (q, k, v), cotangent.to(y.dtype)) if y.numel() else (None, None, None)
    return [y, *grads]


def compare(actual, expected, tol):
    for name, a, e in zip(("out", "dq", "dk", "dv"), actual, expected, strict=True):
        if e is None or e.numel() == 0:
            continue
        assert_close(a.float(), e.float(), tol, what=name)


@pytest.mark.parametrize("window", [None, 7], ids=["causal", "window7"])
def test_matches_reference_with_every_gradient(window):
    # B2-H2/Hkv1-T41-D24-Dv20: GQA, odd sizes, ~40% selected, padding rows in the shorter sequence
    q, k, v, positions, valid = packed_inputs(2, 2, 1, 41, 24, 0.4, Dv=20)
    cotangent = torch.randn(q.shape[:3] + (20,), device=DEVICE)
    got = output_and_grads(pqa.packed_query_attention, q, k, v, positions, valid, cotangent, window=window)
    want = output_and_grads(pqa.packed_query_attention_reference, q, k, v, positions, valid, cotangent, window=window)
    compare(got, want, TOLERANCE[torch.float32])
    assert (got[0][~valid[:, None, :].expand(q.shape[:3])] == 0).all(), "padding rows must come back as zeros"


@pytest.mark.parametrize("fraction", [0.0, 1.0], ids=["none-selected", "all-selected"])
def test_no_and_every_query_selected(fraction):
    q, k, v, positions, valid = packed_inputs(1, 2, 1, 33, 16, fraction)
    cotangent = torch.randn(q.shape, device=DEVICE)
    got = output_and_grads(pqa.packed_query_attention, q, k, v, positions, valid, cotangent)
    want = output_and_grads(pqa.packed_query_attention_reference, q, k, v, positions, valid, cotangent)
    compare(got, want, TOLERANCE[torch.float32])
    if fraction == 1.0:  # every query selected is plain causal attention
        dense = torch.nn.functional.scaled_dot_product_attention(q, k.expand_as(q), v.expand_as(q), is_causal=True)
        assert_close(got[0], dense, TOLERANCE[torch.float32])


def test_replaces_the_runtime_op_also_against_a_cache():
    """Same result as ops/routing.py's packed_query_attention, with keys past every query (a KVCache's tail), for a
    decode step (one query at the last written position), and with queries past the last key."""
    q, k, v, positions, valid = packed_inputs(2, 4, 2, 30, 16, 0.5, Tk=41)
    with torch.no_grad():
        assert_close(pqa.packed_query_attention(q, k, v, positions, valid),
                     routing.packed_query_attention(q, k, v, positions, valid), TOLERANCE[torch.float32])
        step = (q[:, :, -1:], k, v, torch.full((2, 1), 29, device=DEVICE), torch.ones(2, 1, dtype=torch.bool,
                                                                                     device=DEVICE))
        assert_close(pqa.packed_query_attention(*step), routing.packed_query_attention(*step), TOLERANCE[torch.float32])
        past_the_keys = (q, k[:, :, :20], v[:, :, :20], positions, valid)  # positions up to 29 see all 20 keys
        assert_close(pqa.packed_query_attention(*past_the_keys), routing.packed_query_attention(*past_the_keys),
                     TOLERANCE[torch.float32])


@pytest.mark.parametrize("choice", [{"dkdv": {"MASK_EDGES_ONLY": 0}},
                                    {"forward": {"HEAD_GROUP": 3}, "dq": {"HEAD_GROUP": 3}, "dkdv": {"HEAD_GROUP": 3}},
                                    {"forward": {"EDGE_BRANCH": 1}, "dq": {"EDGE_BRANCH": 1},
                                     "dkdv": {"MASK_EDGES_ONLY": 0, "EDGE_BRANCH": 1}}],
                         ids=["one-masked-loop", "head-groups", "edge-branch"])
@pytest.mark.parametrize("window", [None, 7], ids=["causal", "window7"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
def test_the_other_tuning_choices_give_the_same_results(choice, window, dtype):
    """The tuners' choices besides tiles (the dkdv kernel: every row block masked in one loop; every kernel: one
    loop masking the edge blocks only, deciding per step, or heads in groups of 3, of B * H = 4 (a short last group)
    or B * Hkv = 2 (one short group)) against the reference: the output and every gradient, grouped heads, odd sizes,
    padding rows."""
    q, k, v, positions, valid = packed_inputs(2, 2, 1, 41, 24, 0.4, Dv=20, dtype=dtype, seed=4)
    q, k, v = (t.detach() for t in (q, k, v))
    scale, window = 24**-0.5, window or 0
    configs = {name: pqa.INTERPRETER_CONFIG | choice.get(name, {}) for name in ("forward", "dq", "dkdv")}
    kernel_positions = pqa.kernel_positions(positions, valid)
    out, lse, out32 = pqa.packed_query_attention_forward(q, k, v, kernel_positions, scale, window,
                                                         keep_float32_out=True, config=configs["forward"])
    cotangent = torch.randn(out.shape, device=DEVICE).to(dtype)
    dq, dk, dv = pqa.packed_query_attention_backward(cotangent, q, k, v, kernel_positions, out32, lse, scale, window,
                                                     configs=configs)
    leaves = [t.float().requires_grad_() for t in (q, k, v)]
    want = pqa.packed_query_attention_reference(*leaves, positions, valid, scale=scale, window=window)
    compare([out, dq, dk, dv], [want, *torch.autograd.grad(want, leaves, cotangent.float())], TOLERANCE[dtype])
    assert dq.dtype == dtype and (dq[~valid[:, None, :].expand(q.shape[:3])] == 0).all()


@pytest.mark.parametrize("choice", gpu_choices(3))
@pytest.mark.parametrize(("dtype", "window"), [(torch.bfloat16, 7), (torch.float32, 0)],
                         ids=["bf16-window7-tensor-descriptors", "fp32-causal"])
def test_every_gpu_config(gpu_configs, choice, dtype, window):
    """The output and every gradient at each config a GPU can launch (gpu_configs.py: blocks of 64 rows and 32-64
    keys, EDGE_BRANCH, DP_EARLY, heads in groups of 16 over B · H = 4, half precision through tensor descriptors)
    on 41 tokens, ~40% of them selected, grouped heads, head dims 24 and 20, padding rows."""
    gpu_configs.choose(choice)
    q, k, v, positions, valid = packed_inputs(2, 2, 1, 41, 24, 0.4, Dv=20, dtype=dtype, seed=4)
    q, k, v = (t.detach() for t in (q, k, v))
    scale = 24**-0.5
    kernel_positions = pqa.kernel_positions(positions, valid)
    with gpu_configs.named():
        out, lse, out32 = pqa.packed_query_attention_forward(q, k, v, kernel_positions, scale, window,
                                                             keep_float32_out=True)
        cotangent = torch.randn(out.shape, generator=torch.Generator().manual_seed(5)).to(DEVICE, dtype)
        dq, dk, dv = pqa.packed_query_attention_backward(cotangent, q, k, v, kernel_positions, out32, lse, scale,
                                                         window)
        leaves = [t.float().requires_grad_() for t in (q, k, v)]
        want = pqa.packed_query_attention_reference(*leaves, positions, valid, scale=scale, window=window)
        compare([out, dq, dk, dv], [want, *torch.autograd.grad(want, leaves, cotangent.float())], TOLERANCE[dtype])
        assert (dq[~valid[:, None, :].expand(q.shape[:3])] == 0).all()


@pytest.mark.parametrize("loops", [{}, {"MASK_EDGES_ONLY": 0, "EDGE_BRANCH": 1}], ids=["three-loops", "edge-branch"])
@pytest.mark.parametrize("window", [None, 7], ids=["causal", "window7"])
def test_tensor_descriptors_read_the_same_tiles(window, loops):
    """The TMA choice (k and v streamed through tensor descriptors in the forward and dq kernels; q, dO and the rows'
    lse, delta and positions in the dkdv kernel) against the reference in bfloat16: head dims padded from 24 to the
    32 of the tiles (the descriptors' zero fill), 17 packed rows (the last block's rows past S zero-filled), padding
    rows, grouped heads. A value dim whose rows are not 16-byte aligned (20 bfloat16) cannot be described, and keeps
    the pointer path."""
    q, k, v, positions, valid = packed_inputs(2, 2, 1, 41, 24, 0.4, dtype=torch.bfloat16, seed=6)
    assert q.shape[2] == 17
    q, k, v = (t.detach() for t in (q, k, v))
    scale, window = 24**-0.5, window or 0
    assert pqa.tma_ready(q, k, v) and not pqa.tma_ready(v[..., :20].contiguous())
    # the dkdv kernel's positions come as float32 beside lse and delta, and its masks compare them as floats
    configs = {name: pqa.INTERPRETER_CONFIG | {"TMA": 1} | loops for name in ("forward", "dq", "dkdv")}
    kernel_positions = pqa.kernel_positions(positions, valid)
    out, lse, out32 = pqa.packed_query_attention_forward(q, k, v, kernel_positions, scale, window,
                                                         keep_float32_out=True, config=configs["forward"])
    cotangent = torch.randn(out.shape, device=DEVICE).to(torch.bfloat16)
    assert pqa.tma_ready(cotangent)
    dq, dk, dv = pqa.packed_query_attention_backward(cotangent, q, k, v, kernel_positions, out32, lse, scale, window,
                                                     configs=configs)
    leaves = [t.float().requires_grad_() for t in (q, k, v)]
    want = pqa.packed_query_attention_reference(*leaves, positions, valid, scale=scale, window=window)
    compare([out, dq, dk, dv], [want, *torch.autograd.grad(want, leaves, cotangent.float())],
            TOLERANCE[torch.bfloat16])


@triton.jit
def _record_launch_order(visits_ptr, HEAD_GROUP: tl.constexpr, LAST_BLOCK_FIRST: tl.constexpr):
    block, head = pqa._block_and_head(HEAD_GROUP, LAST_BLOCK_FIRST)
    pid = tl.program_id(1) * tl.num_programs(0) + tl.program_id(0)
    tl.store(visits_ptr + pid * 2, block)
    tl.store(visits_ptr + pid * 2 + 1, head)


@pytest.mark.parametrize("last_block_first", [True, False], ids=["latest-rows-first", "earliest-keys-first"])
@pytest.mark.parametrize("head_group", [1, 3, 16])
def test_the_launch_order_visits_every_block_and_head_once(head_group, last_block_first):
    """The kernels' launch order (_block_and_head): program i (linear id) gets each (block, head) once, the heads in
    groups of head_group (7 heads: a short last group, or one group), the heaviest blocks first: the forward's and
    dq's latest row blocks, the dkdv kernel's earliest key blocks."""
    n_blocks, n_heads = 5, 7
    visits = torch.full((n_heads * n_blocks, 2), -1, dtype=torch.int32, device=DEVICE)
    _record_launch_order[(n_blocks, n_heads)](visits, HEAD_GROUP=head_group, LAST_BLOCK_FIRST=last_block_first)
    pairs = [tuple(pair) for pair in visits.tolist()]
    assert sorted(pairs) == [(b, h) for b in range(n_blocks) for h in range(n_heads)]
    for start in range(0, n_heads, head_group):
        heads = range(start, min(start + head_group, n_heads))
        group = pairs[start * n_blocks: heads.stop * n_blocks]
        assert {h for _, h in group} == set(heads)
        assert [b for b, _ in group] == sorted((b for b, _ in group), reverse=last_block_first), "heaviest first"


def test_bfloat16_against_the_float32_reference():
    q, k, v, positions, valid = packed_inputs(1, 2, 2, 40, 32, 0.5, dtype=torch.bfloat16, seed=1)
    cotangent = torch.randn(q.shape, device=DEVICE)
    got = output_and_grads(pqa.packed_query_attention, q, k, v, positions, valid, cotangent)
    want = output_and_grads(pqa.packed_query_attention_reference, *(t.float().detach().requires_grad_()
                                                                    for t in (q, k, v)), positions, valid, cotangent)
    assert got[0].dtype == torch.bfloat16
    compare(got, want, TOLERANCE[torch.bfloat16])


@pytest.mark.parametrize("window", [None, 50], ids=["causal", "window50"])
def test_bfloat16_gradients_where_the_softmax_is_peaked(window):
    """Large logits (q and k at 4x the unit scale) put most of a row's weight on one key; then dP_j and delta =
    rowsum(dO * O) nearly cancel in dS = P * (dP - delta), and a bf16-rounded O made dq and dk 4x worse (2e-2 in
    relative norm): the backward's delta comes from the forward's float32 output."""
    q, k, v, positions, valid = packed_inputs(1, 2, 2, 160, 32, 0.3, dtype=torch.bfloat16, seed=2)
    q, k = (t.detach().mul(4).requires_grad_() for t in (q, k))
    cotangent = torch.randn(q.shape, device=DEVICE)
    got = output_and_grads(pqa.packed_query_attention, q, k, v, positions, valid, cotangent, window=window)
    want = output_and_grads(pqa.packed_query_attention_reference, *(t.float().detach().requires_grad_()
                                                                    for t in (q, k, v)), positions, valid, cotangent,
                            window=window)
    for name, a, e in zip(("out", "dq", "dk", "dv"), got, want, strict=True):
        error = float((a.detach().double() - e.detach().double()).norm() / e.detach().double().norm())
        assert error < 1e-2, f"{name}: relative norm {error:.2e} against float32"


def test_query_block_ranges_bound_what_each_key_block_sees():
    """For every key block: no row outside [first, last) sees one of its keys, and every row in [full_first,
    full_last) sees all of them (the dkdv kernel skips the mask there). Unsorted rows, invalid rows (-1), a window,
    a ragged last block of rows and of keys; the kernel and its torch reference agree."""
    g = torch.Generator().manual_seed(3)
    Tk, block_m, block_n = 70, 4, 8
    sorted_rows = torch.sort(torch.randint(0, Tk, (2, 23), generator=g), dim=1).values
    shuffled = sorted_rows[:, torch.randperm(23, generator=g)]
    shuffled[1, 5] = -1
    for positions in (sorted_rows, shuffled):
        for window in (0, 13):
            ranges = pqa.query_block_ranges(positions.to(DEVICE, torch.int32), Tk, window, block_m, block_n).cpu()
            assert torch.equal(ranges, pqa.query_block_ranges_reference(positions, Tk, window, block_m, block_n))
            keys = torch.arange(Tk)
            visible = (keys <= positions[..., None]) & (positions[..., None] >= 0)  # (B, S, Tk)
            if window:
                visible &= positions[..., None] - keys < window
            for b in range(2):
                for n, (first, full_first, full_last, last) in enumerate(ranges[b].tolist()):
                    assert first <= full_first <= full_last <= last
                    block_keys = slice(n * block_n, min((n + 1) * block_n, Tk))
                    seen = visible[b, :, block_keys].any(dim=1)  # (S,)
                    assert not seen[: first * block_m].any() and not seen[last * block_m:].any()
                    assert visible[b, full_first * block_m: full_last * block_m, block_keys].all()
            if positions is sorted_rows and not window:
                assert (ranges[..., 2] > ranges[..., 1]).any(), "sorted rows: some row blocks see all of a key block"
    # more row blocks than the kernel reads in one step: the first run of full blocks is found across steps
    long_rows = torch.sort(torch.randint(0, 3000, (2, 2600), generator=g), dim=1).values
    long_rows[0, 1000:1100] = -1
    for window in (0, 700):
        ranges = pqa.query_block_ranges(long_rows.to(DEVICE, torch.int32), 3000, window, 16, 64).cpu()
        assert torch.equal(ranges, pqa.query_block_ranges_reference(long_rows, 3000, window, 16, 64))


@pytest.mark.parametrize("fraction, window", [(0.3, None), (0.3, 9), (0.0, None), (1.0, None)],
                         ids=["causal", "window9", "none-selected", "all-selected"])
def test_sparse_query_attention_reads_and_writes_full_length_rows_in_place(fraction, window):
    """The full-length form against ops/routing.py's sparse_query_attention (pack, gather, attend, scatter) and its
    masked dense form: every gradient, grouped heads, odd sizes (B2-H4/2-T45-D24-Dv20), and rows not selected come
    back as zeros in the output and in dq."""
    g = torch.Generator().manual_seed(4)
    B, H, Hkv, T, D, Dv = 2, 4, 2, 45, 24, 20
    selected = (torch.rand(B, T, generator=g) < fraction).to(DEVICE)

    def randn(*shape):
        return torch.randn(*shape, generator=g).to(DEVICE).requires_grad_()

    q, k, v = randn(B, H, T, D), randn(B, Hkv, T, D), randn(B, Hkv, T, Dv)
    cotangent = torch.randn(B, H, T, Dv, generator=g).to(DEVICE)
    positions = torch.arange(T, device=DEVICE)

    def reference(q, k, v):  # the runtime op has no window, and with nothing selected nothing to differentiate
        if window is None and selected.any():
            return routing.sparse_query_attention(q, k, v, selected, q_positions=positions, k_positions=positions)
        return pqa.packed_query_attention_reference(q, k, v, positions.expand(B, T), selected, window=window)

    got = output_and_grads(lambda q, k, v, *_: pqa.sparse_query_attention(q, k, v, selected, window=window),
                           q, k, v, None, None, cotangent)
    want = output_and_grads(lambda q, k, v, *_: reference(q, k, v), q, k, v, None, None, cotangent)
    compare(got, want, TOLERANCE[torch.float32])
    unselected = ~selected[:, None, :].expand(B, H, T)
    assert (got[0][unselected] == 0).all() and (got[1][unselected] == 0).all()


@pytest.mark.parametrize("T, window", [(45, 9), (20, 32)], ids=["T45-window9", "T20-window-past-T"])
def test_sliding_window_attention_replaces_the_runtime_op(T, window):
    """Every token a query within the window, against ops/attention.py's sliding_window_attention (banded SDPA):
    the output and every gradient, grouped heads, odd sizes (B2-H4/2-D24-Dv20)."""
    g = torch.Generator().manual_seed(5)
    B, H, Hkv, D, Dv = 2, 4, 2, 24, 20

    def randn(*shape):
        return torch.randn(*shape, generator=g).to(DEVICE).requires_grad_()

    q, k, v = randn(B, H, T, D), randn(B, Hkv, T, D), randn(B, Hkv, T, Dv)
    cotangent = torch.randn(B, H, T, Dv, generator=g).to(DEVICE)
    got = output_and_grads(lambda q, k, v, *_: pqa.sliding_window_attention(q, k, v, window), q, k, v, None, None,
                           cotangent)
    want = output_and_grads(lambda q, k, v, *_: attention.sliding_window_attention(q, k, v, window), q, k, v, None,
                            None, cotangent)
    compare(got, want, TOLERANCE[torch.float32])


def test_the_gradients_reach_the_projections_in_their_layout():
    """q, k and v as a layer makes them, views of one (B, T, heads x D) projection each, transposed: the backward
    hands dq, dk and dv back laid out the same way, so the views pass them to the projection without a copy."""
    g = torch.Generator().manual_seed(6)
    B, H, Hkv, T, D = 2, 4, 2, 21, 16
    projection = torch.randn(B, T, (H + 2 * Hkv) * D, generator=g).to(DEVICE).requires_grad_()
    q, k, v = projection.view(B, T, H + 2 * Hkv, D).transpose(1, 2).split([H, Hkv, Hkv], dim=1)
    layouts = []
    for t in (q, k, v):
        t.register_hook(lambda grad: layouts.append(grad.transpose(1, 2).is_contiguous()))
    out = pqa.sliding_window_attention(q, k, v, 8)
    out.backward(torch.randn(out.shape, generator=g).to(DEVICE))
    assert layouts == [True, True, True]


def test_selected_rows_put_the_selected_tokens_first_in_order():
    selected = torch.tensor([[False, True, False, True, True], [False, False, False, False, False]])
    rows, positions = pqa.selected_rows(selected)
    assert rows.tolist() == [[1, 3, 4, 0, 2], [0, 1, 2, 3, 4]]
    assert positions.tolist() == [[1, 3, 4, -1, -1], [-1, -1, -1, -1, -1]]


def test_cpu_tensors_take_the_reference_without_the_interpreter(monkeypatch):
    monkeypatch.setenv("ARCHGEN_TRITON_ON_CPU", "0")
    if DEVICE != "cpu":
        pytest.skip("CPU path")
    q, k, v, positions, valid = packed_inputs(1, 2, 1, 20, 16, 0.5)
    with torch.no_grad():
        out, _, _ = pqa.packed_query_attention_op(q, k, v, positions, valid, 0.25, 0, False)
        assert_close(out, pqa.packed_query_attention_reference(q, k, v, positions, valid, scale=0.25),
                     TOLERANCE[torch.float32])


@pytest.mark.parametrize("bad, message", [
    (dict(positions=torch.zeros(1, 3, dtype=torch.long)), "q_positions and valid must be"),
    (dict(k=torch.zeros(1, 3, 8, 16), v=torch.zeros(1, 3, 8, 16)), "multiple of n_kv_heads"),
    (dict(window=0), "window must be at least 1"),
    (dict(positions=torch.zeros(1, 4)), "must be integer"),
])
def test_bad_inputs_say_what_to_change(bad, message):
    args = dict(q=torch.zeros(1, 2, 4, 16), k=torch.zeros(1, 1, 8, 16), v=torch.zeros(1, 1, 8, 16),
                positions=torch.zeros(1, 4, dtype=torch.long), valid=torch.ones(1, 4, dtype=torch.bool), window=None)
    args.update(bad)
    args = {name: value.to(DEVICE) if isinstance(value, torch.Tensor) else value for name, value in args.items()}
    with pytest.raises((ValueError, TypeError), match=message):
        pqa.packed_query_attention(args["q"], args["k"], args["v"], args["positions"], args["valid"],
                                   window=args["window"])


def test_the_build_time_tuning_hook_tunes_all_three_kernels():
    """`archgen build --autotune` calls autotune(config, params, batch, seqlen, dtype, device) in a tuning session:
    the forward, dq and dkdv tuners each get their shape bucket (under the interpreter, its one config)."""
    config = {"n_heads": 2, "n_kv_heads": 1, "head_dim": 16, "fraction": 0.5, "window": None}
    with triton_support.tuning_session() as table:
        pqa.autotune(config, {}, batch=1, seqlen=20, dtype=torch.float32, device=DEVICE)
        tuned = {(entry["kernel"], entry["key"]) for entry in table()["entries"]}
    key = pqa.shape_key(16, 16, 2, False, torch.float32)
    assert tuned == {(f"packed_query_attention.{name}", key) for name in ("forward", "backward_dq", "backward_dkdv")}
