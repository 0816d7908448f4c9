"""Titans neural memory (Behrouz et al., 2024): an MLP whose weights are written while a sequence is read.

This file is copied verbatim into a generated package as ``ops/memory.py``; it imports only torch.

The memory M_W is an MLP with weights W = (W_0, …, W_{L-1}) and SiLU between layers, no biases:

    M_W(u) = W_{L-1} · silu(W_{L-2} · … silu(W_0 · u))

It is read with queries and written with key → value pairs. The sequence is cut into chunks of C tokens
(chunk j holds positions jC … jC + C - 1 of the sequence, counted from its first token), and each chunk is
one gradient step with momentum and weight decay:

    ℓ_j(W) = 1/C · Σ_{t ∈ chunk j} ||M_W(k_t) - v_t||²        associative loss of the chunk's pairs
    S_{j+1} = momentum · S_j - learning_rate · ∇_W ℓ_j(W_j)     "surprise", accumulated with momentum
    W_{j+1} = (1 - forget) · W_j + S_{j+1}                      forget = weight decay of the memory

The tokens of chunk j read M_{W_j}: the weights from before their own chunk is written, so a read never sees a
pair from its own position or later (causal), and all reads of a chunk are one batched matmul.

Streaming. A chunk is written only once all C of its tokens have arrived. Until then its keys and values wait
in a fixed buffer of C slots in the state (`pending_keys`, `pending_values`); which slots are filled follows from
the position of the first new token (position mod C), which the caller passes. Feeding a sequence in pieces of any
length, down to one token at a time, therefore performs the same writes at the same positions and reads the same
weights as one call over the whole sequence.

Shapes that do not change. Every tensor of the state has a fixed shape, and a call runs a fixed number of chunk
steps whose writes are kept or discarded with `torch.where` (a chunk is kept when its last slot holds a token). So
the same code is a graph torch.export can record for a symbolic position and length: a decode step (one token at
any position) is one masked write, and a prefill of up to `max_seqlen` tokens is ceil(max_seqlen / C) of them.
Eager calls with a concrete position and length run exactly the chunks they touch and write only complete ones.

Gradients. ∇_W ℓ is written out in closed form (the backward of an MLP is a few matmuls, `associative_grad`),
not taken with autograd. The write is therefore ordinary differentiable tensor code: training backpropagates
through every write into the key and value projections and the initial weights (second order, as in Titans'
outer loop) without `create_graph`, and decoding under `torch.no_grad()` still writes.

Shapes: B batch, T new tokens, C chunk length, n waiting tokens (0 ≤ n < C), d_k key/query width, d_v value
width, W_i (B, out_i, in_i) per sequence, or (out_i, in_i) shared by the batch. Memory math runs in float32
(float64 inputs stay float64).
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor


@dataclass
class MemoryState:
    """One batch of sequences' memory: fast weights, their surprise momentum, the pairs of the unfinished chunk."""

    weights: list[Tensor]  # W_i (B, out_i, in_i) float32
    momentum: list[Tensor]  # S_i (B, out_i, in_i) float32, same shapes as weights
    pending_keys: Tensor  # (B, C, d_k): slot s holds the key at chunk offset s once it has arrived, zeros before
    pending_values: Tensor  # (B, C, d_v)

    @classmethod
    def initial(cls, weights: list[Tensor], batch: int, chunk_size: int, device=None) -> "MemoryState":
        """The state at the start of a sequence: the learned initial weights for every row, zero momentum.

        weights: W_i (out_i, in_i), the module's parameters, copied for every row (gradients flow back to them) and
        upcast to float32. Copied, not broadcast: a batched matmul with a stride-0 batch makes torch.export ask
        whether the batch is 1, and every row's weights diverge at its first write anyway.
        """
        device = device or weights[0].device
        dtype = torch.promote_types(weights[0].dtype, torch.float32)
        fast = [w.to(device=device, dtype=dtype).unsqueeze(0).repeat(batch, 1, 1) for w in weights]
        momentum = [torch.zeros(batch, *w.shape, device=device, dtype=dtype) for w in weights]
        keys = torch.zeros(batch, chunk_size, weights[0].size(1), device=device, dtype=dtype)
        values = torch.zeros(batch, chunk_size, weights[-1].size(0), device=device, dtype=dtype)
        return cls(fast, momentum, keys, values)


def memory_mlp(u: Tensor, weights: list[Tensor]) -> Tensor:
    """M_W(u): u (B, T, in_0) → (B, T, out_{L-1}), SiLU between layers. W_i is (B, out, in) or shared (out, in)."""
    u = u.to(weights[0].dtype)  # the memory's own precision: float32, or float64 in a float64 model
    for i, w in enumerate(weights):
        u = u @ w.mT  # (B, T, out_i)
        if i < len(weights) - 1:
            u = F.silu(u)
    return u


def silu_grad(a: Tensor) -> Tensor:
    """d silu(a) / da = σ(a) · (1 + a · (1 - σ(a)))."""
    s = torch.sigmoid(a)
    return s * (1 + a * (1 - s))


def associative_grad(weights: list[Tensor], keys: Tensor, values: Tensor) -> list[Tensor]:
    """∇_W ℓ for ℓ(W) = 1/C · Σ_t ||M_W(k_t) - v_t||², per sequence, in closed form.

    keys (B, C, d_k), values (B, C, d_v) → one gradient (B, out_i, in_i) per layer. Backward through the MLP,
    with a_i = W_i h_i the pre-activations and h_{i+1} = silu(a_i):

        g_{L-1} = 2/C · (M_W(k) - v)                  ∂ℓ/∂a_{L-1}
        ∇W_i    = g_iᵀ h_i                              summed over the chunk's tokens
        g_{i-1} = (g_i W_i) ⊙ silu'(a_{i-1})
    """
    inputs, pre_activations = [], []
    h = keys
    for i, w in enumerate(weights):
        inputs.append(h)
        a = h @ w.mT  # (B, C, out_i)
        pre_activations.append(a)
        h = F.silu(a) if i < len(weights) - 1 else a
    g = 2.0 / keys.size(1) * (h - values)  # (B, C, d_v)
    grads = [None] * len(weights)
    for i in reversed(range(len(weights))):
        grads[i] = g.mT @ inputs[i]  # (B, out_i, in_i)
        if i > 0:
            g = (g @ weights[i]) * silu_grad(pre_activations[i - 1])  # (B, C, in_i)
    return grads


def write_chunk(state_weights: list[Tensor], momentum: list[Tensor], keys: Tensor, values: Tensor,
                learning_rate: float, momentum_decay: float, forget: float) -> tuple[list[Tensor], list[Tensor]]:
    """One write: S ← momentum_decay · S - learning_rate · ∇ℓ(W),  W ← (1 - forget) · W + S. Returns (W, S)."""
    grads = associative_grad(state_weights, keys, values)
    momentum = [momentum_decay * s - learning_rate * g for s, g in zip(momentum, grads)]
    weights = [(1 - forget) * w + s for w, s in zip(state_weights, momentum)]
    return weights, momentum


def memory_read_write(queries: Tensor, keys: Tensor, values: Tensor, state: MemoryState, chunk_size: int,
                      learning_rate: float, momentum: float, forget: float, *, position: int | Tensor = 0,
                      max_seqlen: int | None = None) -> tuple[Tensor, MemoryState]:
    """Read the memory at every new token and write every chunk that the new tokens complete.

    queries, keys (B, T, d_k), values (B, T, d_v): the T tokens at positions position … position + T - 1 of the
    sequence. position (an int, or a 0-dim tensor in an exported decode step) fixes the chunk boundaries, which stay at
    multiples of chunk_size however the sequence is split into calls; the n = position mod C tokens before it in
    their chunk wait in `state`. Returns the reads M_{W_j}(q_t) (B, T, d_v), each with the weights from before its
    chunk's write, and the new state.

    max_seqlen bounds T when it is symbolic (torch.export with a dynamic prompt length): it fixes the number of chunk
    steps, so one graph serves every T up to the bound (see `_chunk_steps`).

    Layout: the new tokens are placed on `span` slots counted from the start of the unfinished chunk, after the n
    waiting ones; slot s is in chunk s // C of this call. Chunk j is read with W_j and written when its last slot is
    filled; the slots after the last complete chunk become the new pending buffer.

    position (B,), a tensor: each row at its own position (a ragged batch), see `memory_read_write_rows`.
    """
    if isinstance(position, Tensor) and position.dim() == 1:
        return memory_read_write_rows(queries, keys, values, state, chunk_size, learning_rate, momentum, forget,
                                      position=position, max_seqlen=max_seqlen)
    dtype = state.weights[0].dtype  # float32, or float64 in a float64 model: the callers' float32 inputs follow it
    queries, keys, values = queries.to(dtype), keys.to(dtype), values.to(dtype)
    chunk = chunk_size
    seqlen = queries.size(1)
    waiting = position % chunk  # n: tokens of the unfinished chunk already in the state
    steps = _chunk_steps(waiting, seqlen, chunk, max_seqlen)
    span = steps * chunk
    slot = torch.arange(span, device=queries.device)  # (span,)
    new_index = slot - waiting  # which new token each slot holds, where 0 <= new_index < T
    is_new = (new_index >= 0) & (new_index < seqlen)  # (span,)
    is_waiting = slot < waiting  # slots of the tokens from earlier calls
    filled = is_new | is_waiting

    def lay_out(new: Tensor, pending: Tensor | None) -> Tensor:
        """(B, T, d) new tokens (and the (B, C, d) waiting ones) on the span slots, zeros elsewhere: (B, span, d)."""
        laid = torch.where(is_new.unsqueeze(-1), new.index_select(1, new_index.clamp(0, seqlen - 1)), 0.0)
        if pending is not None:
            old = pending.index_select(1, slot.clamp(max=chunk - 1))  # (B, span, d)
            laid = torch.where(is_waiting.unsqueeze(-1), old, laid)
        return laid

    slot_keys, slot_values = lay_out(keys, state.pending_keys), lay_out(values, state.pending_values)
    slot_queries = lay_out(queries, None)
    weights, surprise = state.weights, state.momentum
    concrete = isinstance(waiting, int) and isinstance(seqlen, int)  # eager: whether a chunk completes is known here
    reads = []
    for j in range(steps):
        # A gather, not a slice: a batched matmul on a strided slice makes torch.export ask whether the batch is 1,
        # which a dynamic batch cannot answer; index_select returns a fresh contiguous (B, C, d) tensor.
        part = torch.arange(j * chunk, (j + 1) * chunk, device=queries.device)
        chunk_queries, chunk_keys, chunk_values = (t.index_select(1, part) for t in (slot_queries, slot_keys, slot_values))
        reads.append(memory_mlp(chunk_queries, weights))  # (B, C, d_v)
        end = (j + 1) * chunk
        if concrete and end > waiting + seqlen:
            continue  # a partial chunk waits in the state: no write to compute and discard (decoding's common case)
        written, written_surprise = write_chunk(weights, surprise, chunk_keys, chunk_values,
                                                learning_rate, momentum, forget)
        if concrete:
            weights, surprise = written, written_surprise
        else:  # traced with a tensor position or a symbolic length: keep the write only if the chunk's last slot is filled
            complete = filled[end - 1]  # 0-dim bool
            weights = [torch.where(complete, w_new, w) for w_new, w in zip(written, weights)]
            surprise = [torch.where(complete, s_new, s) for s_new, s in zip(written_surprise, surprise)]
    reads = torch.cat(reads, dim=1).index_select(1, waiting + torch.arange(seqlen, device=queries.device))  # (B, T, d_v)

    done = filled.view(steps, chunk)[:, -1].sum() * chunk  # slots in complete chunks (a 0-dim tensor)
    carry = done + torch.arange(chunk, device=queries.device)  # (C,): the unfinished chunk's slots
    keep = (carry < span) & filled.index_select(0, carry.clamp(max=span - 1))
    pending = [torch.where(keep.unsqueeze(-1), t.index_select(1, carry.clamp(max=span - 1)), 0.0)
               for t in (slot_keys, slot_values)]
    return reads, MemoryState(weights, surprise, *pending)


def memory_read_write_rows(queries: Tensor, keys: Tensor, values: Tensor, state: MemoryState, chunk_size: int,
                           learning_rate: float, momentum: float, forget: float, *, position: Tensor,
                           max_seqlen: int | None = None) -> tuple[Tensor, MemoryState]:
    """memory_read_write with a position per row, position (B,): row b's new tokens are at positions position[b] …
    position[b] + T - 1, and those at negative positions are a left-padded batch's pads, which are neither written nor
    counted (their reads are meaningless). Each row's chunks stay at multiples of chunk_size of its own positions,
    so a padded row writes exactly what it writes alone.

    The same layout as memory_read_write, one row of slots per sequence: every call runs ceil((C - 1 + T) / C) chunk
    steps (enough for any row's waiting count) and keeps a chunk's write in the rows whose chunk is complete.
    """
    dtype = state.weights[0].dtype
    queries, keys, values = queries.to(dtype), keys.to(dtype), values.to(dtype)
    chunk = chunk_size
    B, seqlen = queries.shape[:2]
    first = position.clamp(min=0)  # (B,) the position of each row's first real token among the new ones
    waiting = first % chunk  # (B,) tokens of each row's unfinished chunk already in the state
    offset = waiting + position - first  # (B,) the slot of new token 0 (negative past a row's pads)
    steps = _chunk_steps(waiting, seqlen, chunk, max_seqlen)
    span = steps * chunk
    slot = torch.arange(span, device=queries.device)  # (span,)
    new_index = slot - offset[:, None]  # (B, span) which new token each slot holds
    is_waiting = slot < waiting[:, None]  # (B, span)
    is_new = ~is_waiting & (new_index < seqlen)  # (B, span); past the waiting slots new_index is a real token's
    filled = is_new | is_waiting
    source = new_index.clamp(0, seqlen - 1)  # (B, span)

    def lay_out(new: Tensor, pending: Tensor | None) -> Tensor:
        laid = torch.where(is_new.unsqueeze(-1), new.gather(1, source.unsqueeze(-1).expand(-1, -1, new.size(-1))), 0.0)
        if pending is not None:
            old = pending.index_select(1, slot.clamp(max=chunk - 1))  # (B, span, d)
            laid = torch.where(is_waiting.unsqueeze(-1), old, laid)
        return laid

    slot_keys, slot_values = lay_out(keys, state.pending_keys), lay_out(values, state.pending_values)
    slot_queries = lay_out(queries, None)
    weights, surprise = state.weights, state.momentum
    reads = []
    for j in range(steps):
        part = torch.arange(j * chunk, (j + 1) * chunk, device=queries.device)
        chunk_queries, chunk_keys, chunk_values = (t.index_select(1, part) for t in (slot_queries, slot_keys, slot_values))
        reads.append(memory_mlp(chunk_queries, weights))  # (B, C, d_v)
        written, written_surprise = write_chunk(weights, surprise, chunk_keys, chunk_values,
                                                learning_rate, momentum, forget)
        complete = filled[:, (j + 1) * chunk - 1].view(-1, 1, 1)  # (B, 1, 1): the rows whose chunk j is complete
        weights = [torch.where(complete, w_new, w) for w_new, w in zip(written, weights, strict=True)]
        surprise = [torch.where(complete, s_new, s) for s_new, s in zip(written_surprise, surprise, strict=True)]
    reads = torch.cat(reads, dim=1)  # (B, span, d_v)
    read_slot = (offset[:, None] + torch.arange(seqlen, device=queries.device)).clamp(0, span - 1)  # (B, T)
    reads = reads.gather(1, read_slot.unsqueeze(-1).expand(-1, -1, reads.size(-1)))  # (B, T, d_v)

    done = filled.view(B, steps, chunk)[:, :, -1].sum(dim=1) * chunk  # (B,) slots in complete chunks
    carry = (done[:, None] + torch.arange(chunk, device=queries.device)).clamp(max=span - 1)  # (B, C)
    keep = (done[:, None] + torch.arange(chunk, device=queries.device) < span) & filled.gather(1, carry)  # (B, C)
    pending = [torch.where(keep.unsqueeze(-1), t.gather(1, carry.unsqueeze(-1).expand(-1, -1, t.size(-1))), 0.0)
               for t in (slot_keys, slot_values)]
    return reads, MemoryState(weights, surprise, *pending)


def _chunk_steps(waiting: int | Tensor, seqlen: int, chunk: int, max_seqlen: int | None) -> int:
    """How many chunks the n waiting and T new tokens can touch: ceil((n + T) / C), with bounds where they are symbolic.

    A waiting count from a tensor position is at most C - 1; a symbolic T takes max_seqlen, and T <= max_seqlen
    becomes a check of the exported graph.
    """
    if not isinstance(seqlen, int):
        if max_seqlen is None:
            raise ValueError("memory_read_write needs max_seqlen when the sequence length is symbolic (torch.export "
                             "with a dynamic prompt length): the number of chunk steps is fixed by it")
        torch._check(seqlen <= max_seqlen, lambda: f"sequence length {seqlen} exceeds max_seqlen={max_seqlen}")
        seqlen = max_seqlen
    most_waiting = waiting if isinstance(waiting, int) else chunk - 1
    return max(1, -(-(most_waiting + seqlen) // chunk))
