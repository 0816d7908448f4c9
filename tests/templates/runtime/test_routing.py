"""
Tests for templates/runtime/routing.py, HSPMN's contextual-stream token selection copied into every generated package.

The properties that matter: a token's selection never depends on later tokens, training with the noise off picks
what inference picks, the straight-through gate has exact 0/1 values and a nonzero gradient, and sparse query
attention equals full causal attention on the selected rows (checked against a loop over queries).
"""

import math

import pytest
import torch
import torch.nn.functional as F

from templates.runtime import routing
from tests.numerics import TOLERANCE, assert_close


def randn(*shape, dtype=torch.float32, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def seeded(seed):
    return torch.Generator().manual_seed(seed)


# -----------------------------------------------------------------------------
# select_tokens


def test_inference_selects_positive_logits():
    logits = torch.tensor([[-1.0, 0.0, 0.5, 3.0, -0.0, 1e-6]])
    gate, selected = routing.select_tokens(logits, training=False)
    assert selected.tolist() == [[False, False, True, True, False, True]]
    assert torch.equal(gate, selected.float())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
@pytest.mark.parametrize("training", [False, True], ids=["inference", "training"])
def test_gate_is_exactly_the_hard_decision(training, dtype):
    logits = randn(3, 50, seed=1).to(dtype)
    gate, selected = routing.select_tokens(logits, training=training, generator=seeded(0))
    assert gate.dtype == dtype and selected.dtype == torch.bool
    assert torch.equal(gate, selected.to(dtype)), "the straight-through gate must equal the 0/1 decision exactly"


@pytest.mark.parametrize("training", [False, True], ids=["inference", "training"])
def test_selection_never_depends_on_later_tokens(training):
    B, T, t0 = 2, 63, 40
    logits = randn(B, T, seed=2)
    future = logits.clone()
    future[:, t0:] = randn(B, T - t0, seed=3) * 10
    _, selected = routing.select_tokens(logits, training=training, generator=seeded(7))
    _, selected_future = routing.select_tokens(future, training=training, generator=seeded(7))
    assert torch.equal(selected[:, :t0], selected_future[:, :t0])


def test_selection_of_a_prefix_equals_selection_in_the_full_sequence():
    """Decode sees only a prefix; its decisions must be those made on the whole sequence."""
    logits = randn(2, 63, seed=4)
    _, full = routing.select_tokens(logits, training=False)
    for t in (1, 17, 62):
        _, prefix = routing.select_tokens(logits[:, :t], training=False)
        assert torch.equal(prefix, full[:, :t])


@pytest.mark.parametrize("temperature", [0.1, 1.0, 10.0])
def test_training_with_confident_logits_agrees_with_inference(temperature):
    # Logistic noise exceeds 40 in magnitude with probability 2 * sigmoid(-40) ~ 1e-17.
    signs = randn(4, 256, seed=5).sign()
    logits = 40.0 * signs + randn(4, 256, seed=6)
    _, inference = routing.select_tokens(logits, training=False)
    for seed in range(5):
        _, training = routing.select_tokens(logits, training=True, temperature=temperature, generator=seeded(seed))
        assert torch.equal(training, inference)


def test_temperature_shapes_the_gradient_not_the_selection():
    logits = randn(2, 100, seed=8)
    picks = [routing.select_tokens(logits, training=True, temperature=t, generator=seeded(3))[1] for t in (0.1, 1, 10)]
    assert torch.equal(picks[0], picks[1]) and torch.equal(picks[1], picks[2])


def test_training_selects_with_probability_sigmoid():
    for logit in (-1.5, 0.0, 0.7):
        logits = torch.full((4, 25_000), logit)
        _, selected = routing.select_tokens(logits, training=True, generator=seeded(11))
        fraction = selected.float().mean().item()
        assert abs(fraction - 1 / (1 + math.exp(-logit))) < 0.01, f"logit {logit}: selected fraction {fraction:.4f}"


def test_training_noise_follows_the_generator():
    logits = randn(2, 40, seed=9)
    a = routing.select_tokens(logits, training=True, generator=seeded(1))[1]
    b = routing.select_tokens(logits, training=True, generator=seeded(1))[1]
    c = routing.select_tokens(logits, training=True, generator=seeded(2))[1]
    assert torch.equal(a, b) and not torch.equal(a, c)


@pytest.mark.parametrize("temperature", [0.5, 1.0, 4.0])
def test_straight_through_gradient_reaches_the_router(temperature):
    logits = randn(2, 33, seed=10).requires_grad_()
    gate, _ = routing.select_tokens(logits, training=True, temperature=temperature, generator=seeded(4))
    gate.sum().backward()
    assert logits.grad.gt(0).all(), "d gate / d logit = sigmoid'(z / T) / T is positive everywhere"
    # The same noise drawn by hand: the gradient is that of sigmoid((l + noise) / T).
    u = torch.rand(logits.shape, generator=seeded(4)).clamp(min=torch.finfo(torch.float32).tiny)
    soft = torch.sigmoid((logits.detach() + torch.log(u) - torch.log1p(-u)) / temperature)
    assert_close(logits.grad, soft * (1 - soft) / temperature, TOLERANCE[torch.float32], "straight-through gradient")


def test_rejects_nonpositive_temperature():
    with pytest.raises(ValueError, match="temperature must be positive, got 0"):
        routing.select_tokens(torch.zeros(1, 3), training=True, temperature=0)


# -----------------------------------------------------------------------------
# selection_losses


def test_selection_losses_by_formula():
    logits = torch.tensor([[-2.0, 0.0, 0.5], [1.0, 3.0, -0.25]])
    p = torch.sigmoid(logits.double())
    entropy = -(p * p.log() + (1 - p) * (1 - p).log()).mean()
    losses = routing.selection_losses(logits, target_fraction=0.25)
    assert_close(losses["router_entropy"], entropy.float(), TOLERANCE[torch.float32], "router_entropy")
    assert_close(losses["router_fraction"], ((p.mean() - 0.25) ** 2).float(), TOLERANCE[torch.float32], "router_fraction")


def test_selection_entropy_limits():
    assert abs(routing.selection_losses(torch.zeros(2, 5), 0.5)["router_entropy"].item() - math.log(2)) < 1e-6
    crisp = routing.selection_losses(torch.tensor([[-100.0, 100.0]]), 0.5)["router_entropy"]
    assert crisp.isfinite() and crisp.item() < 1e-30


def test_fraction_loss_pulls_toward_target():
    logits = torch.full((1, 8), 1.0, requires_grad=True)  # mean sigmoid ~ 0.73 > 0.25
    routing.selection_losses(logits, target_fraction=0.25)["router_fraction"].backward()
    assert logits.grad.gt(0).all(), "gradient descent must lower the logits toward the target fraction"


@pytest.mark.parametrize("target", [-0.1, 1.5])
def test_rejects_fraction_outside_unit_interval(target):
    with pytest.raises(ValueError, match="target_fraction must be in"):
        routing.selection_losses(torch.zeros(1, 2), target)


# -----------------------------------------------------------------------------
# sparse_query_attention


def attention_by_loop(q, k, v, selected, q_pos, k_pos):
    """One selected query at a time: a softmax over the keys at or before its position. Positions (T,), (Tk,)."""
    B, H, T, D = q.shape
    group = H // k.shape[1]
    out = torch.zeros(B, H, T, v.shape[-1], dtype=q.dtype)
    for b in range(B):
        for i in range(T):
            allowed = [j for j in range(k.shape[2]) if k_pos[j] <= q_pos[i]]
            if not selected[b, i] or not allowed:
                continue
            for h in range(H):
                keys, values = k[b, h // group, allowed], v[b, h // group, allowed]  # (n, D), (n, Dv)
                weights = torch.softmax(keys @ q[b, h, i] / math.sqrt(D), dim=0)  # (n,)
                out[b, h, i] = weights @ values
    return out


def attention_inputs(B, H, Hkv, T, D, Dv=None, seed=0):
    q = randn(B, H, T, D, seed=seed)  # (B, H, T, D)
    k = randn(B, Hkv, T, D, seed=seed + 1)  # (B, Hkv, T, D)
    v = randn(B, Hkv, T, Dv or D, seed=seed + 2)  # (B, Hkv, T, Dv)
    selected = randn(B, T, seed=seed + 3) > 0.3  # (B, T)
    return q, k, v, selected


ATTN_CASES = [(1, 1, 1, 1, 8), (2, 4, 4, 7, 16), (2, 4, 2, 63, 16), (1, 6, 1, 33, 12), (3, 8, 2, 17, 60)]


@pytest.mark.parametrize(
    "B, H, Hkv, T, D", ATTN_CASES, ids=[f"B{B}-H{H}-KV{Hkv}-T{T}-D{D}" for B, H, Hkv, T, D in ATTN_CASES]
)
def test_sparse_query_attention_matches_loop(B, H, Hkv, T, D):
    q, k, v, selected = attention_inputs(B, H, Hkv, T, D)
    pos = torch.arange(T)
    out = routing.sparse_query_attention(q, k, v, selected, q_positions=pos, k_positions=pos)
    assert_close(out, attention_by_loop(q, k, v, selected, pos.tolist(), pos.tolist()), TOLERANCE[torch.float32])


def test_selected_rows_equal_full_causal_attention():
    B, H, Hkv, T, D = 2, 8, 2, 63, 16
    q, k, v, selected = attention_inputs(B, H, Hkv, T, D, seed=3)
    pos = torch.arange(T)
    out = routing.sparse_query_attention(q, k, v, selected, q_positions=pos, k_positions=pos)
    full = F.scaled_dot_product_attention(q, k.repeat_interleave(4, 1), v.repeat_interleave(4, 1), is_causal=True)
    rows = selected[:, None, :, None].expand_as(out)
    assert_close(out[rows], full[rows], TOLERANCE[torch.float32], "selected rows")
    assert out[~rows].abs().max().item() == 0.0, "unselected rows must be exactly zero"


def test_value_head_dim_may_differ():
    q, k, v, selected = attention_inputs(2, 4, 2, 9, 16, Dv=24, seed=5)
    pos = torch.arange(9)
    out = routing.sparse_query_attention(q, k, v, selected, q_positions=pos, k_positions=pos)
    assert_close(out, attention_by_loop(q, k, v, selected, pos.tolist(), pos.tolist()), TOLERANCE[torch.float32])


def test_rows_do_not_see_later_tokens():
    B, H, Hkv, T, D, t0 = 2, 4, 2, 63, 16, 30
    q, k, v, selected = attention_inputs(B, H, Hkv, T, D, seed=6)
    q2, k2, v2, selected2 = q.clone(), k.clone(), v.clone(), selected.clone()
    q2[:, :, t0:], k2[:, :, t0:], v2[:, :, t0:] = q2[:, :, t0:] * 3 + 1, -k2[:, :, t0:], v2[:, :, t0:] + 5
    selected2[:, t0:] = ~selected2[:, t0:]
    pos = torch.arange(T)
    out = routing.sparse_query_attention(q, k, v, selected, q_positions=pos, k_positions=pos)
    out2 = routing.sparse_query_attention(q2, k2, v2, selected2, q_positions=pos, k_positions=pos)
    assert_close(out2[:, :, :t0], out[:, :, :t0], TOLERANCE[torch.float32], "rows before the change")


def test_decode_step_equals_prefill_row():
    """One query at position t against a cache with unwritten slots (position past any query)."""
    B, H, Hkv, T, D, L = 2, 4, 2, 20, 16, 32
    q, k, v, _ = attention_inputs(B, H, Hkv, T, D, seed=7)
    selected = torch.ones(B, T, dtype=torch.bool)
    pos = torch.arange(T)
    prefill = routing.sparse_query_attention(q, k, v, selected, q_positions=pos, k_positions=pos)

    k_cache, v_cache = torch.zeros(B, Hkv, L, D), torch.zeros(B, Hkv, L, D)
    k_cache[:, :, :T], v_cache[:, :, :T] = k, v
    cache_pos = torch.where(torch.arange(L) < T, torch.arange(L), torch.iinfo(torch.long).max)  # unwritten: never seen
    t = T - 1
    step = routing.sparse_query_attention(
        q[:, :, t:], k_cache, v_cache, selected[:, t:], q_positions=pos[t:], k_positions=cache_pos
    )
    assert_close(step, prefill[:, :, t:], TOLERANCE[torch.float32], "decode step")


def test_per_batch_positions():
    """(B, T) positions: the second sequence is offset, so its keys and queries are shifted alike."""
    q, k, v, selected = attention_inputs(2, 2, 1, 11, 8, seed=8)
    pos = torch.stack([torch.arange(11), torch.arange(11) + 100])
    out = routing.sparse_query_attention(q, k, v, selected, q_positions=pos, k_positions=pos)
    same = routing.sparse_query_attention(q, k, v, selected, q_positions=torch.arange(11), k_positions=torch.arange(11))
    assert_close(out, same, TOLERANCE[torch.float32])


def test_query_with_no_visible_key_gives_zeros_and_finite_gradients():
    q, k, v, _ = attention_inputs(1, 2, 2, 4, 8, seed=9)
    q.requires_grad_(), k.requires_grad_(), v.requires_grad_()
    selected = torch.ones(1, 4, dtype=torch.bool)
    out = routing.sparse_query_attention(
        q, k, v, selected, q_positions=torch.arange(4), k_positions=torch.arange(4) + 2
    )  # queries 0 and 1 see no key
    assert out[:, :, :2].abs().max().item() == 0.0 and out[:, :, 2:].abs().max().item() > 0
    out.sum().backward()
    assert all(t.grad.isfinite().all() for t in (q, k, v))
    assert q.grad[:, :, :2].abs().max().item() == 0.0


def test_unselected_queries_get_no_gradient():
    q, k, v, selected = attention_inputs(2, 4, 2, 15, 8, seed=10)
    q.requires_grad_()
    pos = torch.arange(15)
    routing.sparse_query_attention(q, k, v, selected, q_positions=pos, k_positions=pos).sum().backward()
    assert q.grad.permute(0, 2, 1, 3)[~selected].abs().max().item() == 0.0
    assert q.grad.permute(0, 2, 1, 3)[selected].abs().max().item() > 0


def test_sparse_query_attention_rejects_bad_shapes():
    q, k, v, selected = attention_inputs(2, 4, 3, 5, 8)
    pos = torch.arange(5)
    with pytest.raises(ValueError, match=r"n_heads \(4\) must be a multiple of n_kv_heads \(3\)"):
        routing.sparse_query_attention(q, k, v, selected, q_positions=pos, k_positions=pos)
    q, k, v, selected = attention_inputs(2, 4, 2, 5, 8)
    with pytest.raises(ValueError, match=r"\(B, T\) = \(2, 5\)"):
        routing.sparse_query_attention(q, k, v, selected[:, :4], q_positions=pos, k_positions=pos)
    with pytest.raises(ValueError, match="positions must match"):
        routing.sparse_query_attention(q, k, v, selected, q_positions=pos[:4], k_positions=pos)


# -----------------------------------------------------------------------------
# Export


class ContextualStream(torch.nn.Module):
    """The inference path of an HSPMN contextual stream: select, attend, gate."""

    def forward(self, router_logits, q, k, v):
        gate, selected = routing.select_tokens(router_logits, training=False)
        pos = torch.arange(q.shape[2], device=q.device)
        out = routing.sparse_query_attention(q, k, v, selected, q_positions=pos, k_positions=pos)
        return out * gate[:, None, :, None]


def test_contextual_stream_exports_with_dynamic_length():
    q, k, v, _ = attention_inputs(2, 4, 2, 16, 8)
    logits = randn(2, 16, seed=12)
    T = torch.export.Dim("T", min=2, max=1024)
    exported = torch.export.export(
        ContextualStream(), (logits, q, k, v), dynamic_shapes=({1: T}, {2: T}, {2: T}, {2: T})
    )
    for length in (3, 16, 41):
        q, k, v, _ = attention_inputs(2, 4, 2, length, 8, seed=length)
        logits = randn(2, length, seed=length + 100)
        assert_close(exported.module()(logits, q, k, v), ContextualStream()(logits, q, k, v), TOLERANCE[torch.float32])


# -----------------------------------------------------------------------------
# the packed path: only the selected queries are computed


def _packed_and_masked(B, H, Hkv, T, D, fraction, seed, monkeypatch=None):
    q = randn(B, H, T, D, seed=seed)
    k = randn(B, Hkv, T, D, seed=seed + 1)
    v = randn(B, Hkv, T, D, seed=seed + 2)
    selected = torch.rand(B, T, generator=seeded(seed + 3)) < fraction
    positions = torch.arange(T) + 2
    cotangent = randn(B, H, T, D, seed=seed + 4)
    results = []
    for form in (routing.sparse_query_attention, routing.masked_sparse_query_attention):
        leaves = [t.clone().requires_grad_() for t in (q, k, v)]
        y = form(*leaves, selected, q_positions=positions, k_positions=positions)
        (y * cotangent).sum().backward()
        results.append([y.detach()] + [t.grad for t in leaves])
    return results, selected


PACKED_CASES = [  # B, H, Hkv, T, D, fraction, chunk
    (2, 4, 2, 70, 8, 0.2, 16),
    (3, 4, 4, 33, 8, 0.5, 4),
    (2, 8, 2, 65, 16, 1.0, 16),
    (2, 4, 1, 40, 8, 0.05, 256),
]


@pytest.mark.parametrize("B,H,Hkv,T,D,fraction,chunk", PACKED_CASES,
                         ids=[f"B{c[0]}-H{c[1]}-Hkv{c[2]}-T{c[3]}-f{c[5]}-c{c[6]}" for c in PACKED_CASES])
def test_packed_path_matches_masked_form_with_gradients(B, H, Hkv, T, D, fraction, chunk, monkeypatch):
    monkeypatch.setattr(routing, "PACKED_QUERY_CHUNK", chunk)
    (actual, expected), selected = _packed_and_masked(B, H, Hkv, T, D, fraction, seed=T)
    counts = selected.sum(dim=1)
    assert counts.max() > 0 and (fraction == 1.0 or counts.min() < T)
    for name, a, e in zip(["y", "dq", "dk", "dv"], actual, expected, strict=True):
        assert_close(a, e, TOLERANCE[torch.float32], name)


def test_packed_path_with_nothing_selected_is_zero():
    q, k, v = randn(2, 4, 9, 8), randn(2, 2, 9, 8, seed=1), randn(2, 2, 9, 8, seed=2)
    positions = torch.arange(9)
    y = routing.sparse_query_attention(q, k, v, torch.zeros(2, 9, dtype=torch.bool), q_positions=positions,
                                       k_positions=positions)
    assert y.shape == (2, 4, 9, 8) and not y.any()


def test_packed_path_computes_only_selected_rows(monkeypatch):
    rows = []
    real = routing._sdpa
    monkeypatch.setattr(routing, "_sdpa", lambda q, *a, **kw: rows.append(q.shape[2]) or real(q, *a, **kw))
    T = 100
    selected = torch.zeros(1, T, dtype=torch.bool)
    selected[0, ::5] = True  # 20%
    q, k, v = randn(1, 2, T, 8), randn(1, 2, T, 8, seed=1), randn(1, 2, T, 8, seed=2)
    positions = torch.arange(T)
    routing.sparse_query_attention(q, k, v, selected, q_positions=positions, k_positions=positions)
    assert sum(rows) == 20


def test_pack_gather_scatter_round_trip():
    selected = torch.tensor([[True, False, True, True], [False, False, True, False]])
    index, valid = routing.pack_selected(selected)
    assert index[0].tolist() == [0, 2, 3] and index[1, :1].tolist() == [2]
    assert valid.tolist() == [[True, True, True], [True, False, False]]
    x = randn(2, 4, 5)
    back = routing.scatter_tokens(routing.gather_tokens(x, index, dim=1), index, valid, 4, dim=1)
    assert torch.equal(back, torch.where(selected[..., None], x, 0.0))


@pytest.mark.parametrize("S,T", [(24, 64), (300, 700), (256, 512)])
def test_flex_packed_attention_forward_matches_chunked(S, T, monkeypatch):
    flex_attention = pytest.importorskip("torch.nn.attention.flex_attention").flex_attention
    # eager flex: compiled flex needs a GPU (bench/attn_moe_kernels.py checks it there, gradients too)
    monkeypatch.setattr(routing, "_compiled_flex_attention", lambda: flex_attention)
    B, H, D = 2, 4, 16
    q, k, v = randn(B, H, S, D), randn(B, 2, T, D, seed=1), randn(B, 2, T, D, seed=2)
    positions = torch.stack([torch.sort(torch.randperm(T, generator=seeded(b))[:S]).values for b in range(B)])
    actual = routing._flex_packed_attention(q, k, v, positions, None)
    assert_close(actual, routing._chunked_packed_attention(q, k, v, positions, None), TOLERANCE[torch.float32])


@pytest.mark.parametrize("exporting", [False, True], ids=["eager", "export-form"])
def test_packed_queries_against_cache_slots_match_masked_form(exporting, monkeypatch):
    """The generated layer's decode call: packed selected queries at positions start.. against a cache's L slots
    (slot j holds position j; the unwritten tail, filled with garbage here, lies past every query)."""
    monkeypatch.setattr(routing, "_is_exporting", lambda: exporting)
    B, H, Hkv, T, L, D, start = 2, 4, 2, 5, 16, 8, 6
    q, k, v = randn(B, H, T, D), randn(B, Hkv, L, D, seed=1), randn(B, Hkv, L, D, seed=2)
    selected = torch.tensor([[True, False, True, True, False], [False, False, False, True, False]])
    positions = start + torch.arange(T)
    expected = routing.masked_sparse_query_attention(q, k, v, selected, q_positions=positions,
                                                     k_positions=torch.arange(L))
    index, valid = routing.pack_selected(selected)
    assert index.shape[1] == (T if exporting else 3)
    y = routing.packed_query_attention(routing.gather_tokens(q, index, dim=2), k, v, positions[index], valid)
    assert_close(routing.scatter_tokens(y, index, valid, T, dim=2), expected, TOLERANCE[torch.float32])


def test_scatter_tokens_fills_the_other_rows():
    selected = torch.tensor([[False, True, False]])
    index, valid = routing.pack_selected(selected)
    fill = torch.tensor([1.0, 2.0])
    out = routing.scatter_tokens(torch.full((1, 1, 2), 7.0), index, valid, 3, dim=1, fill=fill)
    assert out.tolist() == [[[1.0, 2.0], [7.0, 7.0], [1.0, 2.0]]]


def test_a_decode_step_packs_without_a_host_sync():
    """T = 1 keeps its one row (valid or not) instead of reading the count back: a CUDA graph can record the step."""
    for selected in (torch.tensor([[True], [False]]), torch.tensor([[False], [False]])):
        index, valid = routing.pack_selected(selected)
        assert index.tolist() == [[0], [0]] and valid.tolist() == selected.tolist()
