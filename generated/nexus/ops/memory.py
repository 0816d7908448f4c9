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
in the state (`pending_keys`, `pending_values`), so feeding a sequence in pieces of any length, down to one
token at a time, performs the same writes at the same positions and reads the same weights as one call over the
whole sequence.

Gradients. ∇_W ℓ is written out in closed form (the backward of an MLP is a few matmuls, `associative_grad`),
not taken with autograd. The write is therefore ordinary differentiable tensor code: training backpropagates
through every write into the key and value projections and the initial weights (second order, as in Titans'
outer loop) without `create_graph`, and decoding under `torch.no_grad()` still writes.

Shapes: B batch, T new tokens, C chunk length, n pending tokens (0 ≤ n < C), d_k key/query width, d_v value
width, W_i (B, out_i, in_i) per sequence, or (out_i, in_i) shared by the batch. Memory math runs in float32
(float64 inputs stay float64).
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor


@dataclass
class MemoryState:
    """One batch of sequences' memory: fast weights, their surprise momentum, the keys of the unfinished chunk."""

    weights: list[Tensor]  # W_i (B, out_i, in_i) float32
    momentum: list[Tensor]  # S_i (B, out_i, in_i) float32, same shapes as weights
    pending_keys: Tensor  # (B, n, d_k): keys of the chunk being filled, n < chunk_size
    pending_values: Tensor  # (B, n, d_v)

    @classmethod
    def initial(cls, weights: list[Tensor], batch: int, device=None) -> "MemoryState":
        """The state at the start of a sequence: the learned initial weights for every row, zero momentum.

        weights: W_i (out_i, in_i), the module's parameters. Float32 parameters are broadcast, not copied, so an
        untouched state costs no memory and gradients flow back to the parameters; lower precision is upcast.
        """
        device = device or weights[0].device
        dtype = torch.promote_types(weights[0].dtype, torch.float32)
        fast = [w.to(device=device, dtype=dtype).expand(batch, -1, -1) for w in weights]
        zero = torch.zeros((), device=device, dtype=dtype)
        momentum = [zero.expand(batch, *w.shape) for w in weights]
        empty = torch.zeros(batch, 0, weights[0].size(1), device=device, dtype=dtype)
        return cls(fast, momentum, empty, empty.new_zeros(batch, 0, weights[-1].size(0)))


def memory_mlp(u: Tensor, weights: list[Tensor]) -> Tensor:
    """M_W(u): u (B, T, in_0) → (B, T, out_{L-1}), SiLU between layers. W_i is (B, out, in) or shared (out, in)."""
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
                      learning_rate: float, momentum: float, forget: float) -> tuple[Tensor, MemoryState]:
    """Read the memory at every new token and write every chunk that the new tokens complete.

    queries, keys (B, T, d_k), values (B, T, d_v): the T tokens that follow the n pending ones in `state`.
    Returns reads M_{W_j}(q_t) (B, T, d_v), each with the weights from before its chunk's write, and the new
    state. The tokens are placed after the pending ones, so chunk boundaries stay at multiples of chunk_size
    in the whole sequence however it is split into calls.
    """
    n = state.pending_keys.size(1)
    keys = torch.cat([state.pending_keys, keys], dim=1)  # (B, n + T, d_k)
    values = torch.cat([state.pending_values, values], dim=1)  # (B, n + T, d_v)
    total = keys.size(1)
    weights, surprise = state.weights, state.momentum
    reads = []
    for start in range(0, total, chunk_size):
        end = start + chunk_size
        reads.append(memory_mlp(queries[:, max(start - n, 0) : end - n], weights))  # the new tokens of this chunk
        if end <= total:  # complete: write it; a partial last chunk waits in the state
            weights, surprise = write_chunk(weights, surprise, keys[:, start:end], values[:, start:end],
                                            learning_rate, momentum, forget)
    written = total // chunk_size * chunk_size
    return torch.cat(reads, dim=1), MemoryState(weights, surprise, keys[:, written:], values[:, written:])
