"""templates/runtime/memory.py (Titans neural memory) against a reference written here with autograd.

The reference walks the sequence one chunk at a time, takes ∇ℓ with torch.autograd.grad of the plainly written
loss, and applies the update formulas of the module docstring, so it shares no code with the closed-form
gradient or the chunk bookkeeping under test.
"""

import pytest
import torch
import torch.nn.functional as F

from templates.runtime import memory
from tests.numerics import TOLERANCE, assert_close


def randn(*shape, seed, scale=1.0, dtype=torch.float64):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype) * scale


def make_weights(widths, seed=0, dtype=torch.float64):
    """W_i (out, in) scaled 1/sqrt(in), like a trained layer rather than a 0.02 init, so writes are visible."""
    return [randn(widths[i + 1], widths[i], seed=seed + i, scale=widths[i] ** -0.5, dtype=dtype) for i in range(len(widths) - 1)]


def make_sequence(batch, seqlen, d_k, d_v, seed=100, dtype=torch.float64):
    """Unit-norm queries and keys (as the generated module feeds them), values of unit scale."""
    q = F.normalize(randn(batch, seqlen, d_k, seed=seed, dtype=dtype), dim=-1)
    k = F.normalize(randn(batch, seqlen, d_k, seed=seed + 1, dtype=dtype), dim=-1)
    v = randn(batch, seqlen, d_v, seed=seed + 2, dtype=dtype)
    return q, k, v


def mlp_by_hand(u, weights):
    for i, w in enumerate(weights):
        u = torch.einsum("...i,...oi->...o", u, w) if w.dim() == 2 else torch.einsum("bti,boi->bto", u, w)
        if i < len(weights) - 1:
            u = u * torch.sigmoid(u)
    return u


def autograd_grad(weights, keys, values):
    """∇_W of 1/C Σ_t ||M_W(k_t) - v_t||², each sequence's loss differentiated w.r.t. its own weights."""
    leaves = [w.detach().clone().requires_grad_() for w in weights]
    loss = (mlp_by_hand(keys, leaves) - values).square().sum(-1).mean(-1).sum()  # sum over the batch of per-row ℓ
    return list(torch.autograd.grad(loss, leaves))


def reference_read_write(q, k, v, weights, chunk, lr, beta, forget):
    """Chunk after chunk of the whole sequence: read the chunk with W_j, then (if complete) write it."""
    batch, seqlen, _ = q.shape
    W = [w.expand(batch, -1, -1).clone() for w in weights]
    S = [torch.zeros_like(w) for w in W]
    reads = []
    for start in range(0, seqlen, chunk):
        end = min(start + chunk, seqlen)
        reads.append(mlp_by_hand(q[:, start:end], W))
        if end - start == chunk:
            grads = autograd_grad(W, k[:, start:end], v[:, start:end])
            S = [beta * s - lr * g for s, g in zip(S, grads, strict=True)]
            W = [(1 - forget) * w + s for w, s in zip(W, S, strict=True)]
    return torch.cat(reads, dim=1), W, S


HYPER = dict(learning_rate=0.5, momentum=0.9, forget=0.05)

# (batch, seqlen, chunk, widths): ragged and exact lengths, one chunk, a chunk of one, depths 1-3, hidden ≠ d.
SHAPES = [
    pytest.param(2, 37, 8, (6, 6), id="B2-T37-C8-depth1"),
    pytest.param(2, 37, 8, (6, 10, 6), id="B2-T37-C8-depth2-h10"),
    pytest.param(1, 24, 8, (5, 7, 3, 4), id="B1-T24-C8-depth3-dv4"),
    pytest.param(3, 5, 8, (6, 6, 6), id="B3-T5-C8-one-partial-chunk"),
    pytest.param(2, 9, 1, (4, 6, 4), id="B2-T9-C1"),
]


@pytest.mark.parametrize("batch,seqlen,chunk,widths", SHAPES)
def test_closed_form_gradient_equals_autograd(batch, seqlen, chunk, widths):
    weights = [w.expand(batch, -1, -1) + randn(batch, *w.shape, seed=7 + i, scale=0.1)
               for i, w in enumerate(make_weights(widths))]
    _, k, v = make_sequence(batch, seqlen, widths[0], widths[-1])
    pairs = zip(memory.associative_grad(weights, k, v), autograd_grad(weights, k, v), strict=True)
    for i, (got, expected) in enumerate(pairs):
        assert_close(got, expected, TOLERANCE[torch.float64], f"∇W_{i}")


def test_closed_form_gradient_with_weights_shared_by_the_batch():
    """Unwritten state: W_i (out, in) broadcast over the batch; each row still gets its own gradient."""
    weights = make_weights((6, 8, 6))
    _, k, v = make_sequence(3, 8, 6, 6)
    expected_grads = autograd_grad([w.expand(3, -1, -1) for w in weights], k, v)
    for i, (got, expected) in enumerate(zip(memory.associative_grad(weights, k, v), expected_grads, strict=True)):
        assert got.shape == (3, *weights[i].shape)
        assert_close(got, expected, TOLERANCE[torch.float64], f"∇W_{i}")


@pytest.mark.parametrize("batch,seqlen,chunk,widths", SHAPES)
def test_read_write_matches_the_autograd_reference(batch, seqlen, chunk, widths):
    weights = make_weights(widths)
    q, k, v = make_sequence(batch, seqlen, widths[0], widths[-1])
    reads, state = memory.memory_read_write(q, k, v, memory.MemoryState.initial(weights, batch, chunk), chunk, **HYPER)
    expected_reads, W, S = reference_read_write(q, k, v, weights, chunk, *HYPER.values())
    assert_close(reads, expected_reads, TOLERANCE[torch.float64], "reads")
    for i in range(len(weights)):
        assert_close(state.weights[i], W[i], TOLERANCE[torch.float64], f"W_{i}")
        assert_close(state.momentum[i], S[i], TOLERANCE[torch.float64], f"S_{i}")
    pending = seqlen % chunk
    assert state.pending_keys.shape == (batch, chunk, widths[0]), "the pending buffer must keep its shape"
    assert torch.equal(state.pending_keys[:, :pending], k[:, seqlen - pending :]), \
        "pending keys are not the unwritten chunk's keys"
    assert torch.equal(state.pending_values[:, :pending], v[:, seqlen - pending :]), \
        "pending values are not the unwritten chunk's values"
    assert not state.pending_keys[:, pending:].any() and not state.pending_values[:, pending:].any(), \
        "slots not yet reached must be empty"


def test_one_write_follows_the_momentum_and_forget_formulas():
    """S' = momentum·S - lr·∇ℓ(W) and W' = (1 - forget)·W + S', starting from a nonzero momentum."""
    lr, beta, forget = 0.3, 0.8, 0.1
    weights = make_weights((5, 7, 5))
    _, k, v = make_sequence(2, 4, 5, 5)
    momentum = [randn(2, *w.shape, seed=50 + i, scale=0.1) for i, w in enumerate(weights)]
    state = memory.MemoryState([w.expand(2, -1, -1) for w in weights], momentum, torch.zeros_like(k), torch.zeros_like(v))
    _, written = memory.memory_read_write(k, k, v, state, 4, learning_rate=lr, momentum=beta, forget=forget)
    grads = autograd_grad([w.expand(2, -1, -1) for w in weights], k, v)
    for i, (w, s, g) in enumerate(zip(weights, momentum, grads, strict=True)):
        assert_close(written.momentum[i], beta * s - lr * g, TOLERANCE[torch.float64], f"S_{i}")
        assert_close(written.weights[i], (1 - forget) * w + beta * s - lr * g, TOLERANCE[torch.float64], f"W_{i}")


def test_forget_alone_decays_the_weights_when_the_memory_is_already_right():
    """Values equal to M(k): ∇ℓ = 0, so with zero momentum a write is exactly W' = (1 - forget)·W."""
    weights = make_weights((6, 6, 6))
    _, k, _ = make_sequence(2, 8, 6, 6)
    values = memory.memory_mlp(k, weights)
    _, written = memory.memory_read_write(k, k, values, memory.MemoryState.initial(weights, 2, 8), 8,
                                          learning_rate=1.0, momentum=0.9, forget=0.25)
    for i, w in enumerate(weights):
        assert_close(written.weights[i], 0.75 * w.expand(2, -1, -1), TOLERANCE[torch.float64], f"W_{i}")


def test_writing_pairs_makes_reading_their_keys_recover_the_values():
    """Write 16 key → value pairs (the same chunk 20 times); the memory's error on those keys must fall a lot."""
    weights = make_weights((16, 32, 16))
    _, k, v = make_sequence(2, 16, 16, 16)
    error_before = (memory.memory_mlp(k, weights) - v).square().mean().item()
    state = memory.MemoryState.initial(weights, 2, 16)
    _, state = memory.memory_read_write(k.repeat(1, 20, 1), k.repeat(1, 20, 1), v.repeat(1, 20, 1), state, 16,
                                        learning_rate=0.5, momentum=0.5, forget=0.0)
    error_after = (memory.memory_mlp(k, state.weights) - v).square().mean().item()
    assert error_after < 0.2 * error_before, f"recall error {error_before:.3f} -> {error_after:.3f}"


def test_a_read_never_sees_its_own_chunk_or_later():
    """Changing the pair at position 13 (chunk 1 of 8) leaves every read up to position 15 unchanged and changes later ones."""
    weights = make_weights((6, 6, 6))
    q, k, v = make_sequence(1, 30, 6, 6)
    state = memory.MemoryState.initial(weights, 1, 8)
    reads, _ = memory.memory_read_write(q, k, v, state, 8, **HYPER)
    v_changed = v.clone()
    v_changed[:, 13] += 1.0
    changed, _ = memory.memory_read_write(q, k, v_changed, state, 8, **HYPER)
    differs = (reads - changed).abs().amax(dim=-1)[0]  # (T,)
    assert differs[:16].max() == 0, f"reads before the write of chunk 1 changed: {differs[:16]}"
    assert (differs[16:] > 1e-6).all(), f"reads after the write of chunk 1 did not change: {differs[16:]}"


@pytest.mark.parametrize("pieces", [
    pytest.param([1] * 37, id="token-by-token"),
    pytest.param([13, 1, 1, 1, 21], id="13-then-steps-then-21"),
    pytest.param([8, 8, 21], id="chunk-aligned"),
    pytest.param([3, 30, 4], id="ragged"),
])
def test_streaming_in_pieces_equals_one_call(pieces):
    """Decoding contract: pending keys carry across calls, so writes land at the same positions."""
    weights = make_weights((6, 10, 6))
    q, k, v = make_sequence(2, sum(pieces), 6, 6)
    reads, state = memory.memory_read_write(q, k, v, memory.MemoryState.initial(weights, 2, 8), 8, **HYPER)
    streamed, start = [], 0
    streamed_state = memory.MemoryState.initial(weights, 2, 8)
    for n in pieces:
        window = slice(start, start + n)
        piece, streamed_state = memory.memory_read_write(q[:, window], k[:, window], v[:, window], streamed_state, 8, **HYPER,
                                                         position=start)
        streamed.append(piece)
        start += n
    assert_close(torch.cat(streamed, dim=1), reads, TOLERANCE[torch.float64], "reads")
    for i in range(len(weights)):
        assert_close(streamed_state.weights[i], state.weights[i], TOLERANCE[torch.float64], f"W_{i}")
    assert torch.equal(streamed_state.pending_keys, state.pending_keys), "the pending buffers differ"


def test_a_tensor_position_streams_like_an_int_position():
    """The exported decode step passes the position as a 0-dim tensor: one masked chunk step per token, same writes."""
    weights = make_weights((6, 10, 6))
    q, k, v = make_sequence(2, 19, 6, 6)
    reads, state = memory.memory_read_write(q, k, v, memory.MemoryState.initial(weights, 2, 8), 8, **HYPER)
    prefill = 5
    streamed, streamed_state = memory.memory_read_write(q[:, :prefill], k[:, :prefill], v[:, :prefill],
                                                        memory.MemoryState.initial(weights, 2, 8), 8, **HYPER)
    pieces = [streamed]
    for t in range(prefill, 19):
        piece, streamed_state = memory.memory_read_write(q[:, t : t + 1], k[:, t : t + 1], v[:, t : t + 1], streamed_state, 8,
                                                         **HYPER, position=torch.tensor(t))
        pieces.append(piece)
    assert_close(torch.cat(pieces, dim=1), reads, TOLERANCE[torch.float64], "reads")
    for i in range(len(weights)):
        assert_close(streamed_state.weights[i], state.weights[i], TOLERANCE[torch.float64], f"W_{i}")
        assert_close(streamed_state.momentum[i], state.momentum[i], TOLERANCE[torch.float64], f"S_{i}")
    assert torch.equal(streamed_state.pending_keys, state.pending_keys)


def test_a_symbolic_length_needs_a_bound():
    weights = make_weights((4, 4))
    q, k, v = make_sequence(1, 3, 4, 4)

    class Write(torch.nn.Module):
        def forward(self, q, k, v):
            return memory.memory_read_write(q, k, v, memory.MemoryState.initial(weights, 1, 2), 2, **HYPER)[0]

    length = torch.export.Dim("length", min=2, max=8)
    with pytest.raises(ValueError, match="needs max_seqlen"):
        torch.export.export(Write(), (q, k, v), dynamic_shapes=({1: length},) * 3)


def test_writes_are_differentiable():
    """gradcheck through two writes into the keys, values, queries and the initial weights."""
    weights = [w.requires_grad_() for w in make_weights((3, 4, 3))]
    q, k, v = (t.requires_grad_() for t in make_sequence(1, 7, 3, 3))

    def run(q, k, v, w0, w1):
        reads, state = memory.memory_read_write(q, k, v, memory.MemoryState.initial([w0, w1], 1, 3), 3, **HYPER)
        return reads, state.weights[0], state.weights[1]

    assert torch.autograd.gradcheck(run, (q, k, v, *weights))


def test_initial_state_holds_the_weights_for_every_row_and_starts_empty():
    weights = make_weights((6, 8, 4), dtype=torch.float32)
    state = memory.MemoryState.initial(weights, 3, 5)
    assert [tuple(w.shape) for w in state.weights] == [(3, 8, 6), (3, 4, 8)]
    assert all(torch.equal(w, p.expand_as(w)) for w, p in zip(state.weights, weights, strict=True)), \
        "every row must start from the learned weights"
    assert all(tuple(s.shape) == tuple(w.shape) and not s.any() for s, w in zip(state.momentum, state.weights, strict=True))
    assert state.pending_keys.shape == (3, 5, 6) and state.pending_values.shape == (3, 5, 4)
    assert not state.pending_keys.any() and not state.pending_values.any()


def test_float32_matches_the_float64_reference():
    weights = make_weights((16, 32, 16))
    q, k, v = make_sequence(2, 50, 16, 16)
    initial = memory.MemoryState.initial([w.float() for w in weights], 2, 16)
    reads, state = memory.memory_read_write(q.float(), k.float(), v.float(), initial, 16, **HYPER)
    expected_reads, W, _ = reference_read_write(q, k, v, weights, 16, *HYPER.values())
    assert reads.dtype == torch.float32
    assert_close(reads, expected_reads, TOLERANCE[torch.float32], "reads")
    assert_close(state.weights[1], W[1], TOLERANCE[torch.float32], "W_1")
