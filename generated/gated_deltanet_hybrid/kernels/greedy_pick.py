"""A decoding step's greedy pick in one launch: the argmax of each row of logits, written as the next token and into
the row of picks at the step's position. The kernel, its launcher, the custom op and the reference.

For logits (B, V), token (B, 1), picks (B, L) and the position p (a 0-dim int64 tensor the step has advanced)::

    i_b = argmax_v logits[b, v]      (the first of equal maxima, as torch.argmax)
    token[b, 0] = i_b
    picks[b, min(p, L - 1)] = i_b

Why: templates/runtime/decoding.py's CUDAGraphDecoder ends every captured step with this, and as torch ops it is four
launches: argmax, a copy, a clamp and an index_copy. torch's argmax reduces one row of 32,001 logits in a single
block: 11.9 µs a token of Hymba+'s step on an H200 (session 13's timeline), the copies ~3 µs more with their gaps.
Here a row's logits (which the LM head's GEMV has just left in L2) are split over up to MAX_SPLITS programs of a
BLOCK_V tile or more each; a program keeps a running maximum and its column per lane, reduces its lanes, and the last
of the row's programs to finish picks among theirs (an int32 counter per row, as kernels/decode_attention.py's
one-launch combine), so no program walks the row alone.

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
MAX_SPLITS = 32
"""The most programs a row's columns are split over (a tile or more each): one program walking Hymba+'s 32,001 logits
in 8 dependent tiles took 10.1 µs on the H200 (session 17), while the row is only 64 KB."""


@triton.jit
def _greedy_pick_kernel(logits_ptr, token_ptr, picks_ptr, position_ptr, top_ptr, column_ptr, counter_ptr, V, L,
                        COLUMNS_PER_SPLIT, stride_logits, stride_token, stride_picks,
                        BLOCK_V: tl.constexpr, BLOCK_SPLITS: tl.constexpr,  # next_pow2(splits)
                        ONE_SPLIT: tl.constexpr):  # the row is one program's: it writes the pick itself
    row = tl.program_id(0).to(tl.int64)
    split = tl.program_id(1)
    splits = tl.num_programs(1)
    lanes = tl.arange(0, BLOCK_V)
    first = split * COLUMNS_PER_SPLIT
    last = tl.minimum(first + COLUMNS_PER_SPLIT, V)
    best = tl.full((BLOCK_V,), float("-inf"), tl.float32)
    best_column = tl.full((BLOCK_V,), V, tl.int32)  # V: no column yet, so the first tile is taken whatever it holds
    for v0 in range(first, last, BLOCK_V):
        columns = v0 + lanes
        x = tl.load(logits_ptr + row * stride_logits + columns, mask=columns < last, other=float("-inf")).to(tl.float32)
        x = tl.where(x != x, float("inf"), x)  # NaN ranks highest, as in torch.argmax
        better = ((x > best) | (best_column >= V)) & (columns < last)  # strictly greater: of equal values the earlier stays
        best = tl.where(better, x, best)
        best_column = tl.where(better, columns, best_column)
    top = tl.max(best, axis=0)
    pick = tl.min(tl.where(best == top, best_column, 2147483647), axis=0)  # the first of the maxima
    if ONE_SPLIT:
        _write_pick(token_ptr, picks_ptr, position_ptr, row, pick, L, stride_token, stride_picks)
    else:
        # The last split of the row to finish picks among the splits' (top, column) in split order. Ordering as in
        # kernels/decode_attention.py's one-launch combine: the barrier puts the stores before the release increment,
        # the acquiring program reads the partials from L2 (.cg).
        tl.store(top_ptr + row * splits + split, top)
        tl.store(column_ptr + row * splits + split, pick)
        tl.debug_barrier()
        done = tl.atomic_add(counter_ptr + row, 1, sem="acq_rel", scope="gpu")
        if done == splits - 1:
            tl.store(counter_ptr + row, 0)  # zero again for the next launch (a CUDA graph's replay reuses it)
            at = tl.arange(0, BLOCK_SPLITS)
            tops = tl.load(top_ptr + row * splits + at, mask=at < splits, other=float("-inf"), cache_modifier=".cg")
            picks = tl.load(column_ptr + row * splits + at, mask=at < splits, other=2147483647, cache_modifier=".cg")
            top = tl.max(tops, axis=0)
            pick = tl.min(tl.where(tops == top, picks, 2147483647), axis=0)  # the first split's: the first column
            _write_pick(token_ptr, picks_ptr, position_ptr, row, pick, L, stride_token, stride_picks)


@triton.jit
def _write_pick(token_ptr, picks_ptr, position_ptr, row, pick, L, stride_token, stride_picks):
    """The row's pick as its next token and into its picks at the step's position (the last column past it)."""
    pick = pick.to(tl.int64)
    tl.store(token_ptr + row * stride_token, pick)
    slot = tl.minimum(tl.load(position_ptr), L - 1)
    tl.store(picks_ptr + row * stride_picks + slot, pick)


def split_columns(V: int) -> tuple[int, int]:
    """(splits, columns a split): a whole number of BLOCK_V tiles each, at most MAX_SPLITS, none empty."""
    tiles = triton.cdiv(V, BLOCK_V)
    per_split = triton.cdiv(tiles, min(tiles, MAX_SPLITS)) * BLOCK_V
    return triton.cdiv(V, per_split), per_split


_SCRATCH: dict[tuple[str, int, int], tuple[Tensor, Tensor, Tensor]] = {}
"""The splits' partials (top, column) and each row's counter by (device, batch, splits): made once (a decoder's warm-up
steps make them before its graph records), the counters zero between launches."""


def _scratch(device: torch.device, batch: int, splits: int) -> tuple[Tensor, Tensor, Tensor]:
    key = (str(device), batch, splits)
    if key not in _SCRATCH:
        _SCRATCH[key] = (torch.empty(batch * splits, dtype=torch.float32, device=device),
                         torch.empty(batch * splits, dtype=torch.int32, device=device),
                         torch.zeros(batch, dtype=torch.int32, device=device))
    return _SCRATCH[key]


def greedy_pick_forward(logits: Tensor, token: Tensor, picks: Tensor, position: Tensor) -> None:
    """The launcher: logits (B, V) with a contiguous last dim, token (B, 1), picks (B, L) int64, position 0-dim."""
    B, V = logits.shape
    if B == 0:
        return
    splits, per_split = split_columns(V)
    tops, columns, counters = _scratch(logits.device, B, splits) if splits > 1 else (token, token, token)
    with on_device(logits):
        _greedy_pick_kernel[(B, splits)](logits, token, picks, position, tops, columns, counters, V, picks.size(1),
                                         per_split, logits.stride(0), token.stride(0), picks.stride(0), BLOCK_V=BLOCK_V,
                                         BLOCK_SPLITS=triton.next_power_of_2(splits), ONE_SPLIT=splits == 1,
                                         num_warps=NUM_WARPS)


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
