"""
Tests for templates/runtime/moe.py, the mixture-of-experts reference ops copied into every generated package.

The reference is a plain loop: for each token, for each of its top-k experts, run that expert's MLP on the token
and add it with its routing weight. Capacity is checked against the drop rule written out by hand: each expert
keeps its first C assignments in token order.
"""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from templates.runtime import moe
from tests.numerics import TOLERANCE, assert_close

D_MODEL, HIDDEN = 12, 10



def randn(*shape, dtype=torch.float32, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def make_inputs(N, E, activation, dtype=torch.float32, seed=0):
    """x (N, d), router logits (N, E), w_in (E, d, 2h or h), w_out (E, h, d), scaled like a real init."""
    gated = moe.ACTIVATIONS[activation][1]
    x = randn(N, D_MODEL, dtype=dtype, seed=seed)
    logits = randn(N, E, dtype=dtype, seed=seed + 1)
    w_in = randn(E, D_MODEL, (2 if gated else 1) * HIDDEN, dtype=dtype, seed=seed + 2) / math.sqrt(D_MODEL)
    w_out = randn(E, HIDDEN, D_MODEL, dtype=dtype, seed=seed + 3) / math.sqrt(HIDDEN)
    return x, logits, w_in, w_out


def expert_by_hand(x, w_in, w_out, activation):
    """One expert on one token, x (d,): the activations spelled out."""
    h = x @ w_in
    if activation in ("swiglu", "geglu"):
        gate, up = h[:HIDDEN], h[HIDDEN:]
        if activation == "swiglu":
            h = gate * torch.sigmoid(gate) * up
        else:
            h = 0.5 * gate * (1 + torch.erf(gate / math.sqrt(2))) * up
    elif activation == "gelu":
        h = 0.5 * h * (1 + torch.erf(h / math.sqrt(2)))
    elif activation == "silu":
        h = h * torch.sigmoid(h)
    elif activation == "relu2":
        h = torch.clamp(h, min=0) ** 2
    return h @ w_out


def routing_by_hand(logits, top_k, normalize=True):
    """Per token: the k most probable experts, best first, and their (renormalised) probabilities."""
    probs = torch.softmax(logits.to(torch.promote_types(logits.dtype, torch.float32)), dim=-1)
    choices = []
    for p in probs:
        experts = sorted(range(len(p)), key=lambda e: -p[e].item())[:top_k]
        total = sum(p[e] for e in experts) if normalize else 1.0
        choices.append([(e, p[e] / total) for e in experts])
    return choices


def kept_by_hand(choices, n_experts, capacity):
    """The drop rule written out: each expert takes assignments in token order until it holds `capacity`."""
    load = [0] * n_experts
    kept = set()
    for n, token_choices in enumerate(choices):
        for e, _ in token_choices:
            if load[e] < capacity:
                kept.add((n, e))
                load[e] += 1
    return kept


def moe_by_loop(x, logits, w_in, w_out, top_k, activation, normalize=True, kept=None):
    y = torch.zeros(x.shape, dtype=torch.promote_types(x.dtype, torch.float32))
    for n, token_choices in enumerate(routing_by_hand(logits, top_k, normalize)):
        for e, weight in token_choices:
            if kept is None or (n, e) in kept:
                y[n] = y[n] + weight * expert_by_hand(x[n], w_in[e], w_out[e], activation)
    return y.to(x.dtype)


# -----------------------------------------------------------------------------
# Routing


def test_route_top_k_picks_most_probable_and_renormalises():
    logits = randn(9, 6, seed=3)
    out = moe.route_top_k(logits, top_k=3)
    probs = torch.softmax(logits, dim=-1)
    for n, token_choices in enumerate(routing_by_hand(logits, 3)):
        assert out.expert_index[n].tolist() == [e for e, _ in token_choices]
    assert_close(out.expert_weight.sum(-1), torch.ones(9), TOLERANCE[torch.float32], "sum of weights")
    assert_close(out.router_probs, probs, TOLERANCE[torch.float32], "router_probs")
    raw = moe.route_top_k(logits, top_k=3, normalize=False)
    assert_close(raw.expert_weight, probs.gather(1, out.expert_index), TOLERANCE[torch.float32], "raw weights")


def test_route_top_k_routes_in_float32():
    out = moe.route_top_k(randn(4, 5).to(torch.bfloat16), top_k=2)
    assert out.expert_weight.dtype == out.router_logits.dtype == torch.float32
    assert out.expert_index.dtype == torch.long


@pytest.mark.parametrize("top_k", [0, 5])
def test_route_top_k_rejects_bad_k(top_k):
    with pytest.raises(ValueError, match=f"got {top_k}"):
        moe.route_top_k(randn(3, 4), top_k=top_k)


# -----------------------------------------------------------------------------
# moe_forward against the per-token loop

DROPLESS = [(N, E, k, act) for N in (1, 7, 63) for E in (4, 8) for k in (1, 2) for act in ("swiglu", "gelu")]


@pytest.mark.parametrize("N, E, top_k, activation", DROPLESS, ids=[f"N{N}-E{E}-k{k}-{a}" for N, E, k, a in DROPLESS])
def test_moe_forward_matches_loop(N, E, top_k, activation):
    x, logits, w_in, w_out = make_inputs(N, E, activation)
    y, stats = moe.moe_forward(x, logits, w_in, w_out, top_k=top_k, activation=activation)
    assert_close(y, moe_by_loop(x, logits, w_in, w_out, top_k, activation), TOLERANCE[torch.float32])

    routed = torch.zeros(E, dtype=torch.long)
    for token_choices in routing_by_hand(logits, top_k):
        for e, _ in token_choices:
            routed[e] += 1
    assert stats["tokens_per_expert"].tolist() == routed.tolist()
    assert stats["dropped"].item() == 0
    assert stats["expert_index"].shape == (N, top_k)


@pytest.mark.parametrize("activation", sorted(moe.ACTIVATIONS))
def test_every_activation_matches_loop(activation):
    x, logits, w_in, w_out = make_inputs(11, 4, activation, seed=5)
    y, _ = moe.moe_forward(x, logits, w_in, w_out, top_k=2, activation=activation)
    assert_close(y, moe_by_loop(x, logits, w_in, w_out, 2, activation), TOLERANCE[torch.float32])


def test_unnormalised_weights_match_loop():
    x, logits, w_in, w_out = make_inputs(13, 8, "swiglu", seed=7)
    y, _ = moe.moe_forward(x, logits, w_in, w_out, top_k=2, normalize=False)
    assert_close(y, moe_by_loop(x, logits, w_in, w_out, 2, "swiglu", normalize=False), TOLERANCE[torch.float32])


def test_bfloat16_returns_input_dtype():
    x, logits, w_in, w_out = make_inputs(7, 4, "swiglu")
    y, _ = moe.moe_forward(x.bfloat16(), logits.bfloat16(), w_in.bfloat16(), w_out.bfloat16(), top_k=2)
    assert y.dtype == torch.bfloat16
    assert_close(y.float(), moe_by_loop(x, logits, w_in, w_out, 2, "swiglu"), 3e-2, "bf16 output")


# -----------------------------------------------------------------------------
# Capacity


def one_hot_logits(choices, n_experts):
    """Router logits that make token n choose choices[n], in that order (2 > 1 > 0)."""
    logits = torch.zeros(len(choices), n_experts)
    for n, experts in enumerate(choices):
        for rank, e in enumerate(experts):
            logits[n, e] = 2.0 - rank
    return logits


def test_capacity_drops_later_tokens_top1():
    # 8 tokens, 2 experts, C = ceil(0.5 * 8 * 1 / 2) = 2. Expert 0 gets tokens 0, 1, 3, 7: keeps 0, 1.
    # Expert 1 gets 2, 4, 5, 6: keeps 2, 4.
    choices = [[0], [0], [1], [0], [1], [1], [1], [0]]
    kept = {(0, 0), (1, 0), (2, 1), (4, 1)}
    x, _, w_in, w_out = make_inputs(8, 2, "swiglu")
    logits = one_hot_logits(choices, 2)
    assert moe.expert_capacity(8, 2, 1, 0.5) == 2

    y, stats = moe.moe_forward(x, logits, w_in, w_out, top_k=1, capacity_factor=0.5, normalize=False)
    assert_close(y, moe_by_loop(x, logits, w_in, w_out, 1, "swiglu", normalize=False, kept=kept), TOLERANCE[torch.float32])
    assert y[[3, 5, 6, 7]].abs().max().item() == 0.0
    assert stats["dropped"].item() == 4
    assert stats["tokens_per_expert"].tolist() == [4, 4]


def test_capacity_drops_single_assignments_top2():
    # 5 tokens, 3 experts, top-2, C = ceil(0.5 * 5 * 2 / 3) = 2.
    # Expert 0 gets tokens 0, 1, 2, 4: keeps 0, 1.   Expert 1 gets 0, 2, 3, 4: keeps 0, 2.   Expert 2 gets 1, 3.
    # Token 2 keeps only expert 1, token 3 only expert 2, token 4 loses both.
    choices = [[0, 1], [0, 2], [1, 0], [2, 1], [0, 1]]
    kept = {(0, 0), (0, 1), (1, 0), (1, 2), (2, 1), (3, 2)}
    x, _, w_in, w_out = make_inputs(5, 3, "gelu")
    logits = one_hot_logits(choices, 3)
    assert moe.expert_capacity(5, 3, 2, 0.5) == 2

    y, stats = moe.moe_forward(x, logits, w_in, w_out, top_k=2, activation="gelu", capacity_factor=0.5)
    assert_close(y, moe_by_loop(x, logits, w_in, w_out, 2, "gelu", kept=kept), TOLERANCE[torch.float32])
    assert y[4].abs().max().item() == 0.0
    assert stats["dropped"].item() == 4
    assert stats["tokens_per_expert"].tolist() == [4, 4, 2]


def test_ample_capacity_equals_dropless():
    x, logits, w_in, w_out = make_inputs(31, 4, "swiglu", seed=2)
    dropless, _ = moe.moe_forward(x, logits, w_in, w_out, top_k=2)
    ample, stats = moe.moe_forward(x, logits, w_in, w_out, top_k=2, capacity_factor=4.0)  # C = min(N, 62)
    assert torch.equal(ample, dropless)
    assert stats["dropped"].item() == 0


@settings(max_examples=40, deadline=None)
@given(
    N=st.integers(1, 24),
    E=st.integers(2, 6),
    top_k=st.integers(1, 2),
    capacity_factor=st.sampled_from([0.1, 0.5, 0.75, 1.0, 1.25, 2.0]),
    seed=st.integers(0, 2**16),
)
def test_capacity_matches_drop_rule(N, E, top_k, capacity_factor, seed):
    x, logits, w_in, w_out = make_inputs(N, E, "swiglu", seed=seed)
    C = moe.expert_capacity(N, E, top_k, capacity_factor)
    assert C == min(N, math.ceil(capacity_factor * N * top_k / E))
    kept = kept_by_hand(routing_by_hand(logits, top_k), E, C)

    y, stats = moe.moe_forward(x, logits, w_in, w_out, top_k=top_k, capacity_factor=capacity_factor)
    assert_close(y, moe_by_loop(x, logits, w_in, w_out, top_k, "swiglu", kept=kept), TOLERANCE[torch.float32])
    assert stats["dropped"].item() == N * top_k - len(kept)


def test_rejects_nonpositive_capacity_factor():
    with pytest.raises(ValueError, match="capacity_factor must be positive"):
        moe.expert_capacity(8, 4, 2, 0.0)


# -----------------------------------------------------------------------------
# Gradients

GRAD_CASES = [(9, 4, 2, "swiglu", None), (9, 4, 1, "gelu", None), (16, 4, 2, "swiglu", 0.5)]


@pytest.mark.parametrize(
    "N, E, top_k, activation, capacity_factor",
    GRAD_CASES,
    ids=[f"N{N}-E{E}-k{k}-{a}-cf{cf}" for N, E, k, a, cf in GRAD_CASES],
)
def test_gradients_match_loop(N, E, top_k, activation, capacity_factor):
    """Gradients of x, w_in, w_out and the router logits (through the routing weights), in float64."""
    inputs = make_inputs(N, E, activation, dtype=torch.float64, seed=4)
    normalize = top_k > 1  # a single renormalised weight is always 1 and carries no gradient
    C = moe.expert_capacity(N, E, top_k, capacity_factor)
    kept = kept_by_hand(routing_by_hand(inputs[1], top_k), E, C)
    grad_out = randn(N, D_MODEL, dtype=torch.float64, seed=9)

    def grads(fn):
        leaves = [t.clone().requires_grad_() for t in inputs]
        (fn(*leaves) * grad_out).sum().backward()
        return [t.grad for t in leaves]

    actual = grads(lambda *a: moe.moe_forward(
        *a, top_k=top_k, activation=activation, capacity_factor=capacity_factor, normalize=normalize)[0])
    expected = grads(lambda *a: moe_by_loop(*a, top_k, activation, normalize=normalize, kept=kept))
    for name, a, e in zip(["x", "router_logits", "w_in", "w_out"], actual, expected, strict=True):
        assert_close(a, e, 1e-10, f"grad {name}")
        assert a.abs().max() > 0, f"grad {name} is zero"


# -----------------------------------------------------------------------------
# Auxiliary losses


@pytest.mark.parametrize("top_k", [1, 2])
def test_load_balancing_loss_is_one_when_uniform(top_k):
    E, N = 4, 8
    expert_index = torch.stack([(torch.arange(N) + j) % E for j in range(top_k)], dim=1)  # every expert N*k/E times
    loss = moe.load_balancing_loss(torch.zeros(N, E), expert_index, E)
    assert abs(loss.item() - 1.0) < 1e-6


def test_load_balancing_loss_skewed_by_hand():
    # probs [[3/4, 1/4], [1/2, 1/2]] -> P = [5/8, 3/8]; both tokens choose expert 0 -> f = [1, 0].
    # loss = E * (1 * 5/8 + 0 * 3/8) = 2 * 5/8 = 1.25
    logits = torch.tensor([[math.log(3.0), 0.0], [0.0, 0.0]], requires_grad=True)
    loss = moe.load_balancing_loss(logits, torch.tensor([[0], [0]]), 2)
    assert abs(loss.item() - 1.25) < 1e-6
    loss.backward()
    assert logits.grad[:, 0].gt(0).all(), "the loss should push probability away from the overloaded expert"


def test_load_balancing_loss_on_moe_stats():
    x, logits, w_in, w_out = make_inputs(20, 4, "swiglu")
    _, stats = moe.moe_forward(x, logits, w_in, w_out, top_k=2)
    f = stats["tokens_per_expert"].float() / 40
    expected = 4 * (f * torch.softmax(logits, -1).mean(0)).sum()
    assert_close(moe.load_balancing_loss(logits, stats["expert_index"], 4), expected, TOLERANCE[torch.float32])


def test_load_balancing_loss_checks_expert_count():
    with pytest.raises(ValueError, match="expected 8"):
        moe.load_balancing_loss(torch.zeros(3, 4), torch.zeros(3, 1, dtype=torch.long), 8)


def test_router_z_loss_formula():
    # logsumexp rows: log 2 and log 4 = 2 log 2 -> mean of squares = (1 + 4) / 2 * log(2)^2
    logits = torch.tensor([[0.0, 0.0], [math.log(3.0), 0.0]])
    assert abs(moe.router_z_loss(logits).item() - 2.5 * math.log(2) ** 2) < 1e-6
    big = randn(5, 7, seed=1) * 30  # logsumexp stays finite where exp would overflow in float16
    expected = torch.stack([torch.log(torch.exp(row.double()).sum()) ** 2 for row in big]).mean()
    assert_close(moe.router_z_loss(big.half()), expected.float(), 1e-3, "z-loss from float16")


def test_router_entropy():
    assert abs(moe.router_entropy(torch.zeros(3, 8)).item() - math.log(8)) < 1e-6
    masked = torch.tensor([[0.0, float("-inf"), float("-inf")]])
    assert moe.router_entropy(masked).item() == 0.0
    p = torch.tensor([0.5, 0.25, 0.25])
    expected = -(p * p.log()).sum()
    assert abs(moe.router_entropy(p.log()[None]).item() - expected.item()) < 1e-6


# -----------------------------------------------------------------------------
# Errors and export


def test_rejects_mismatched_expert_weights():
    x, logits, w_in, w_out = make_inputs(5, 4, "gelu")  # w_in (E, d, h): not the (E, d, 2h) swiglu layout
    with pytest.raises(ValueError, match=r"should be \(E, d, 2h\)"):
        moe.moe_forward(x, logits, w_in, w_out, top_k=2, activation="swiglu")
    with pytest.raises(ValueError, match="unknown expert activation 'tanh'"):
        moe.moe_forward(x, logits, w_in, w_out, top_k=2, activation="tanh")
    with pytest.raises(ValueError, match=r"\(N, E\) = \(5, 4\)"):
        moe.moe_forward(x, logits[:, :3], w_in, w_out, top_k=2, activation="gelu")


class MoE(torch.nn.Module):
    def __init__(self, w_in, w_out, capacity_factor):
        super().__init__()
        self.w_in, self.w_out = torch.nn.Parameter(w_in), torch.nn.Parameter(w_out)
        self.capacity_factor = capacity_factor

    def forward(self, x, logits):
        y, stats = moe.moe_forward(x, logits, self.w_in, self.w_out, top_k=2, capacity_factor=self.capacity_factor)
        return y, stats["dropped"]


@pytest.mark.parametrize("capacity_factor", [None, 1.25], ids=["dropless", "cf1.25"])
def test_exports_with_dynamic_token_count(capacity_factor):
    x, logits, w_in, w_out = make_inputs(20, 4, "swiglu")
    model = MoE(w_in, w_out, capacity_factor)
    n_tokens = torch.export.Dim("n_tokens", min=8, max=4096)
    exported = torch.export.export(model, (x, logits), dynamic_shapes=({0: n_tokens}, {0: n_tokens}))
    for N in (9, 20, 57):
        x, logits, _, _ = make_inputs(N, 4, "swiglu", seed=N)
        (y, dropped), (y_ref, dropped_ref) = exported.module()(x, logits), model(x, logits)
        assert_close(y, y_ref, TOLERANCE[torch.float32], f"exported output, N={N}")
        assert dropped.item() == dropped_ref.item()


# -----------------------------------------------------------------------------
# The two forms of moe_forward: grouped (eager) against fixed buffer (export), outputs and every gradient

FORM_CASES = [  # N, E, top_k, activation, capacity_factor
    (37, 6, 2, "swiglu", None),
    (37, 6, 2, "swiglu", 0.7),
    (64, 8, 1, "relu2", 1.0),
    (5, 8, 3, "geglu", None),  # fewer tokens than experts: empty experts
]


def _form_grads(form, inputs, top_k, activation, capacity_factor, grad_out):
    leaves = [t.detach().clone().requires_grad_() for t in inputs]
    x, logits, w_in, w_out = leaves
    routing = moe.route_top_k(logits, top_k)
    capacity = moe.expert_capacity(x.shape[0], w_in.shape[0], top_k, capacity_factor)
    y, stats = form(x, routing, w_in, w_out, activation=activation, capacity=capacity)
    (y.float() * grad_out).sum().backward()
    return [y.detach()] + [t.grad for t in leaves], stats


@pytest.mark.parametrize("N, E, top_k, activation, capacity_factor", FORM_CASES,
                         ids=[f"N{N}-E{E}-k{k}-{a}-cf{cf}" for N, E, k, a, cf in FORM_CASES])
def test_grouped_form_matches_fixed_buffer(N, E, top_k, activation, capacity_factor):
    inputs = make_inputs(N, E, activation, seed=N)
    grad_out = randn(N, D_MODEL, seed=11)
    expected, expected_stats = _form_grads(moe.moe_fixed_buffer, inputs, top_k, activation, capacity_factor, grad_out)
    actual, stats = _form_grads(moe.moe_grouped, inputs, top_k, activation, capacity_factor, grad_out)
    for name, a, e in zip(["y", "x", "router_logits", "w_in", "w_out"], actual, expected, strict=True):
        if name == "router_logits" and top_k == 1:
            # One expert per token: its renormalised weight is identically 1, so the logits get no gradient, and
            # what either form returns is rounding noise: both must be ~0 on the scale of the input's gradient.
            scale = expected[1].abs().max()
            assert a.abs().max() <= 1e-5 * scale and e.abs().max() <= 1e-5 * scale, name
            continue
        assert_close(a, e, TOLERANCE[torch.float32], name)
    for key in ("tokens_per_expert", "dropped", "expert_index"):
        assert torch.equal(stats[key], expected_stats[key]), key
    if capacity_factor is not None and capacity_factor < 1:
        assert stats["dropped"] > 0, "the case must drop something to test dropping"


def test_grouped_mm_branch_matches_the_expert_loop(monkeypatch):
    """torch._grouped_mm (bf16, forced on where torch runs it off the GPU) against one matmul per expert."""
    if not hasattr(torch, "_grouped_mm"):
        pytest.skip("this torch has no _grouped_mm")
    N, E, d, h = 40, 4, 16, 24
    x = randn(N, d, seed=1).bfloat16()
    logits = randn(N, E, seed=2)
    w_in = (randn(E, d, 2 * h, seed=3) / 4).bfloat16()
    w_out = (randn(E, h, d, seed=4) / 5).bfloat16()
    grad_out = randn(N, d, seed=5)
    inputs = (x, logits, w_in, w_out)
    expected, _ = _form_grads(moe.moe_grouped, inputs, 2, "swiglu", None, grad_out)
    monkeypatch.setattr(moe, "FORCE_GROUPED_MM", True)
    calls = []
    real = torch._grouped_mm
    monkeypatch.setattr(torch, "_grouped_mm", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    try:
        actual, _ = _form_grads(moe.moe_grouped, inputs, 2, "swiglu", None, grad_out)
    except RuntimeError as error:  # some CPU builds have no _grouped_mm kernel
        pytest.skip(f"torch._grouped_mm does not run here: {error}")
    assert calls, "the grouped_mm branch was not taken"
    for name, a, e in zip(["y", "x", "router_logits", "w_in", "w_out"], actual, expected, strict=True):
        if name == "router_logits":
            continue  # float32 leaf whose grad is a sum of bf16 products: compared through y and x
        assert_close(a, e, 2e-2, name)


def test_grouped_form_computes_only_assigned_rows(monkeypatch):
    """Dropless, the experts see exactly N*k rows in total (the fixed buffer would give them E*N)."""
    seen = []
    real = moe.grouped_expert_mlp
    monkeypatch.setattr(moe, "grouped_expert_mlp", lambda x_sorted, *a: seen.append(x_sorted.shape[0]) or real(x_sorted, *a))
    x, logits, w_in, w_out = make_inputs(30, 8, "swiglu")
    moe.moe_forward(x, logits, w_in, w_out, top_k=2)
    assert seen == [60]


def test_fused_swiglu_replaces_the_activation_of_the_grouped_form():
    """moe_forward hands the [gate | up] rows to fused_swiglu (kernels.swiglu in a generated model) for "swiglu"
    only; what it returns is what the experts' down projection sees."""
    x, logits, w_in, w_out = make_inputs(30, 4, "swiglu")
    expected, _ = moe.moe_forward(x, logits, w_in, w_out, top_k=2)
    seen = []

    def fused(h):
        seen.append(tuple(h.shape))
        return moe.swiglu(h)

    actual, _ = moe.moe_forward(x, logits, w_in, w_out, top_k=2, fused_swiglu=fused)
    assert sum(rows for rows, _ in seen) == 60 and {width for _, width in seen} == {w_in.shape[-1]}
    assert_close(actual, expected, TOLERANCE[torch.float32])
    doubled, _ = moe.moe_forward(x, logits, w_in, w_out, top_k=2, fused_swiglu=lambda h: 2 * moe.swiglu(h))
    assert_close(doubled, 2 * expected, TOLERANCE[torch.float32])
    seen.clear()
    x, logits, w_in, w_out = make_inputs(30, 4, "gelu")
    moe.moe_forward(x, logits, w_in, w_out, top_k=2, activation="gelu", fused_swiglu=fused)
    assert not seen, "a non-SwiGLU expert must not take the fused SwiGLU"
