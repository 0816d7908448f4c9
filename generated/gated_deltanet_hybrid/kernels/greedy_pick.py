"""A decoding step's greedy pick in one launch: the argmax of each row of logits, written as the next token and into
the row of picks at the step's position. The kernel, its launcher, the custom op and the reference.

For logits (B, V), token (B, 1), picks (B, L) and the position p (a 0-dim int64 tensor the step has advanced)::

    i_b = argmax_v logits[b, v]      (the first of equal maxima, as torch.argmax)
    token[b, 0] = i_b
    picks[b, min(p, L - 1)] = i_b

Why: templates/runtime/decoding.py's CUDAGraphDecoder ends every captured step with this, and as torch ops it is four
launches: argmax, a copy, a clamp and an index_copy. torch's argmax reduces one row of 32,001 logits in a single
block: 11.9 µs a token of Hymba+'s step on an H200 (session 13's timeline), the copies ~3 µs more with their gaps.
Here one program per row streams its logits (which the LM head's GEMV has just left in L2) in BLOCK_V tiles, keeps a
running maximum and its column per lane, and reduces the lanes once at the end.

NaN: a NaN logit counts as +inf (torch.argmax picks a NaN); a row holding both +inf and NaN may pick the +inf where
torch picks the NaN. Such logits have no greedy token worth the difference.

CPU tensors take the reference unless TRITON_INTERPRET=1 and ARCHGEN_TRITON_ON_CPU=1 (the tests).
"""

import torch
import triton
import triton.language as tl
from torch import Tensor

from .triton_support import on_device, register_op, triton_on_cpu

BLOCK_V = 4096
"""Logits a program loads at a time: 8 KB of bf16, 16 a thread over 8 warps."""
NUM_WARPS = 8


@triton.jit
def _greedy_pick_kernel(logits_ptr, token_ptr, picks_ptr, position_ptr, V, L, stride_logits, stride_token,
                        stride_picks, BLOCK_V: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    lanes = tl.arange(0, BLOCK_V)
    best = tl.full((BLOCK_V,), float("-inf"), tl.float32)
    best_column = tl.full((BLOCK_V,), V, tl.int32)  # V: no column yet, so the first tile is taken whatever it holds
    for v0 in range(0, V, BLOCK_V):
        columns = v0 + lanes
        x = tl.load(logits_ptr + row * stride_logits + columns, mask=columns < V, other=float("-inf")).to(tl.float32)
        x = tl.where(x != x, float("inf"), x)  # NaN ranks highest, as in torch.argmax
        better = (x > best) | (best_column >= V)  # strictly greater: of equal values the earlier column stays
        best = tl.where(better, x, best)
        best_column = tl.where(better, columns, best_column)
    top = tl.max(best, axis=0)
    pick = tl.min(tl.where(best == top, best_column, 2147483647), axis=0).to(tl.int64)  # the first of the maxima
    tl.store(token_ptr + row * stride_token, pick)
    slot = tl.minimum(tl.load(position_ptr), L - 1)
    tl.store(picks_ptr + row * stride_picks + slot, pick)


def greedy_pick_forward(logits: Tensor, token: Tensor, picks: Tensor, position: Tensor) -> None:
    """The launcher: logits (B, V) with a contiguous last dim, token (B, 1), picks (B, L) int64, position 0-dim."""
    B, V = logits.shape
    if B == 0:
        return
    with on_device(logits):
        _greedy_pick_kernel[(B,)](logits, token, picks, position, V, picks.size(1), logits.stride(0), token.stride(0),
                                  picks.stride(0), BLOCK_V=BLOCK_V, num_warps=NUM_WARPS)


# ---------------------------------------------------------------------------------------------------------------
# Custom op
# ---------------------------------------------------------------------------------------------------------------


def _check(logits: Tensor, token: Tensor, picks: Tensor, position: Tensor) -> None:
    B = logits.size(0)
    if logits.dim() != 2 or logits.size(1) == 0:
        raise ValueError(f"greedy_pick_: logits must be (batch, vocabulary) with a vocabulary, got {tuple(logits.shape)}")
    if token.shape != (B, 1) or token.dtype != torch.long or picks.dim() != 2 or picks.size(0) != B:
        raise ValueError(f"greedy_pick_: token must be ({B}, 1) int64 and picks ({B}, length), got "
                         f"{tuple(token.shape)} {token.dtype} and {tuple(picks.shape)}")
    if picks.dtype != torch.long or position.dim() != 0 or position.dtype != torch.long:
        raise ValueError(f"greedy_pick_: picks must be int64 and the position a 0-dim int64 tensor, got "
                         f"{picks.dtype} and {tuple(position.shape)} {position.dtype}")


def _impl(logits: Tensor, token: Tensor, picks: Tensor, position: Tensor) -> None:
    """archgen_v1::greedy_pick_: token and picks written where they lie."""
    _check(logits, token, picks, position)
    if not (logits.is_cuda or triton_on_cpu()):
        greedy_pick_reference(logits, token, picks, position)
        return
    greedy_pick_forward(logits if logits.stride(-1) == 1 else logits.contiguous(), token, picks, position)


def _fake(logits, token, picks, position) -> None:
    return None


greedy_pick_op = register_op("greedy_pick_", _impl, _fake, mutates_args=("token", "picks"))


def greedy_pick_(logits: Tensor, token: Tensor, picks: Tensor, position: Tensor) -> None:
    """Each row's argmax of logits (B, V) into token (B, 1) and into picks (B, L) at column min(position, L - 1)."""
    greedy_pick_op(logits, token, picks, position)


def greedy_pick_reference(logits: Tensor, token: Tensor, picks: Tensor, position: Tensor) -> None:
    """The same with torch ops (templates/runtime/decoding.py's greedy_pick_)."""
    pick = logits.argmax(dim=-1, keepdim=True)
    token.copy_(pick)
    picks.index_copy_(1, position.clamp(max=picks.size(1) - 1).view(1), pick)


def decomposition(reference, max_seqlen: int) -> dict:
    """Nothing to lower: the pick runs in CUDAGraphDecoder's step, never in an exported graph."""
    return {}
