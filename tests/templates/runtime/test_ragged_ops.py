"""The runtime ops' part in ragged (left-padded) batches: attention's hide_pads, the Titans memory with a position per
row, the MoE router and HSPMN's token router leaving pads out. Whole models on padded batches are tested in
tests/generated/test_ragged.py."""

import torch
import torch.nn.functional as F

from templates.runtime import attention, memory, moe, routing
from tests.numerics import assert_close

NEVER = attention.NEVER_WRITTEN


def randn(*shape, seed, dtype=torch.float64):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def test_hide_pads_counts_each_row_from_its_first_token_and_hides_its_pads():
    slots = torch.tensor([0, 1, 2, 3, NEVER])  # a ring's slots, the last never written
    hidden = attention.hide_pads(slots, torch.tensor([0, 2]))
    assert hidden.tolist() == [[0, 1, 2, 3, NEVER], [NEVER, NEVER, 0, 1, NEVER]]


def test_padded_attention_equals_each_row_alone():
    """Two rows, the second with 3 left pads, through the masked form with a window: the real rows match."""
    T, pads = 7, torch.tensor([0, 3])
    q, k, v = (randn(2, 4, T, 8, seed=s) for s in (1, 2, 3))
    slots = torch.arange(T)
    y = attention.attention(q, k[:, :2], v[:, :2], q_positions=slots - pads[:, None],
                            k_positions=attention.hide_pads(slots, pads), window=3)
    for row, p in enumerate(pads.tolist()):
        alone = attention.attention(q[row:row + 1, :, p:], k[row:row + 1, :2, p:], v[row:row + 1, :2, p:],
                                    q_positions=slots[: T - p], k_positions=slots[: T - p], window=3)
        assert_close(y[row:row + 1, :, p:], alone, what=f"row {row}")
    assert torch.equal(y[1, :, :3], torch.zeros_like(y[1, :, :3])), "a pad query sees no key: zeros"


def memory_inputs(batch, seqlen, seed):
    q = F.normalize(randn(batch, seqlen, 6, seed=seed), dim=-1)
    k = F.normalize(randn(batch, seqlen, 6, seed=seed + 1), dim=-1)
    return q, k, randn(batch, seqlen, 6, seed=seed + 2)


def test_memory_rows_at_their_own_positions_write_what_each_row_writes_alone():
    """Row 1 has 5 left pads (negative positions): prefill, then three one-token steps, against each row alone with
    the scalar-position op; chunks of 4, so both rows complete chunks at different calls."""
    weights = [randn(8, 6, seed=10) * 0.4, randn(6, 8, seed=11) * 0.4]
    args = dict(chunk_size=4, learning_rate=0.5, momentum=0.9, forget=0.01)
    pads, T = torch.tensor([0, 5]), 11
    q, k, v = memory_inputs(2, T + 3, seed=20)
    state = memory.MemoryState.initial(weights, 2, 4)
    reads, state = memory.memory_read_write(q[:, :T], k[:, :T], v[:, :T], state, position=-pads, **args)
    steps = [reads]
    for t in range(T, T + 3):
        read, state = memory.memory_read_write(q[:, t:t + 1], k[:, t:t + 1], v[:, t:t + 1], state, position=t - pads, **args)
        steps.append(read)
    padded = torch.cat(steps, dim=1)
    for row, p in enumerate(pads.tolist()):
        alone_state = memory.MemoryState.initial(weights, 1, 4)
        alone, alone_state = memory.memory_read_write(q[row:row + 1, p:], k[row:row + 1, p:], v[row:row + 1, p:],
                                                      alone_state, position=0, **args)
        assert_close(padded[row:row + 1, p:], alone, what=f"row {row}'s reads")
        for got, expected in zip(state.weights, alone_state.weights, strict=True):
            assert_close(got[row:row + 1], expected, what=f"row {row}'s written weights")
        assert_close(state.pending_keys[row:row + 1], alone_state.pending_keys, what=f"row {row}'s waiting keys")


def test_moe_capacity_goes_to_real_tokens_before_pads():
    """Left pads come first in token order, so without `valid` they would win an expert's slots."""
    E, d, h, N, pads = 4, 8, 16, 12, 6
    w_in, w_out = randn(E, d, 2 * h, seed=1, dtype=torch.float32), randn(E, h, d, seed=2, dtype=torch.float32)
    x, logits = randn(N, d, seed=3, dtype=torch.float32), randn(N, E, seed=4, dtype=torch.float32)
    valid = torch.arange(N) >= pads
    args = dict(top_k=2, capacity_factor=0.5)
    y, _ = moe.moe_forward(x, logits, w_in, w_out, valid=valid, **args)
    pads_last = torch.cat([torch.arange(pads, N), torch.arange(pads)])  # the same tokens, the pads after the real ones
    expected, _ = moe.moe_forward(x[pads_last], logits[pads_last], w_in, w_out, **args)
    assert_close(y[pads:], expected[: N - pads], what="real tokens' outputs")
    unmasked, stats = moe.moe_forward(x, logits, w_in, w_out, **args)
    assert int(stats["dropped"]) > 0 and not torch.allclose(unmasked[pads:], y[pads:]), "capacity should bind here"


def test_router_losses_leave_pads_out():
    logits, valid = randn(2, 9, seed=5), torch.arange(9) >= torch.tensor([[0], [4]])
    masked = routing.selection_losses(logits, 0.2, valid=valid)
    subset = routing.selection_losses(logits[valid][None], 0.2)
    for name in subset:
        assert_close(masked[name], subset[name], what=name)
    expert_logits = randn(18, 4, seed=6)
    index = expert_logits.topk(2, dim=-1).indices
    flat_valid = valid.reshape(18)
    assert_close(moe.load_balancing_loss(expert_logits, index, 4, valid=flat_valid),
                 moe.load_balancing_loss(expert_logits[flat_valid], index[flat_valid], 4), tol=1e-6,
                 what="load balancing")  # the unmasked loss counts assignments in float32
    assert_close(moe.router_z_loss(expert_logits, valid=flat_valid), moe.router_z_loss(expert_logits[flat_valid]),
                 what="z-loss")
