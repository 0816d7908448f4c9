"""
Draft-and-verify decoding with Medusa heads: the acceptance rule and rolling a cache back to the accepted prefix.

This file is copied verbatim into a generated package as `ops/medusa.py` and imports only torch and the standard
library.

One decoding step, greedy, batch 1 (Medusa, Cai et al. 2024, with a single candidate chain instead of a tree):

    draft     d_0 = argmax p(· | x_≤n)              the base model's next token (always right)
              d_k = argmax head_k(h_n),  k = 1..K   head k guesses the token k steps after d_0
    verify    one forward over d_0 … d_K on top of the cache gives v_j = argmax p(· | x_≤n, d_0 … d_j)
    accept    a = 1 + the number of leading k with d_k = v_(k-1)   (1 ≤ a ≤ K + 1)

d_0 … d_(a-1) are exactly what greedy decoding emits next, and v_(a-1) is the token after them, so the output
equals plain greedy decoding token for token; the heads only decide how many tokens one forward yields.

After the verify pass the cache holds all K + 1 draft positions; only the first a may stay. Attention caches
rewind by position: resetting the cache length is enough, since the rejected slots are masked (their positions lie
after every later query's) until later tokens overwrite them. A recurrent state (SSM, convolution) has no
positions to rewind: it has already absorbed the rejected tokens. So every recurrent state is snapshotted before
the verify pass and, when a draft token is rejected, restored and advanced over the accepted prefix again.
"""

import dataclasses
from dataclasses import dataclass, field

import torch
from torch import Tensor


def accepted_length(draft: Tensor, verified: Tensor) -> int:
    """a = 1 + the length of the longest prefix of draft[1:] that equals verified[:-1].

    draft (L,): d_0 (the base model's own token) then the heads' guesses. verified (L,): the base model's greedy
    token after each draft position. Guess d_k stands only if every earlier guess stood, hence the cumulative product.
    """
    if draft.shape != verified.shape or draft.dim() != 1:
        raise ValueError(
            f"draft and verified must be 1-D and the same length, got {tuple(draft.shape)} and {tuple(verified.shape)}"
        )
    matches = (draft[1:] == verified[:-1]).long()  # (L - 1,)
    return 1 + int(matches.cumprod(0).sum())


@dataclass
class StateSnapshot:
    """Everything reachable in a cache, as it was: copies of its recurrent-state tensors, references to the rest."""

    saved: list[tuple[object, object, object]]  # (container, key or attribute name, value: a copy if it holds tensors)
    recurrent: bool  # whether any tensor was copied; if not, the cache rewinds by its length alone

    def restore(self) -> None:
        # Put back by assignment, parents before children: right whether a layer updates its state in place or
        # replaces it. The copies are not used again, so they can become the live state as they are.
        for container, key, value in self.saved:
            if isinstance(container, (dict, list)):
                container[key] = value
            else:
                setattr(container, key, value)


def snapshot_states(cache: object, rewindable: tuple[type, ...] = ()) -> StateSnapshot:
    """Snapshot a cache before a forward that may have to be undone.

    Walks dataclass fields, dicts and lists from `cache`: tensors (and tuples of them) are copied, every other
    value (the cache length, nested containers) is kept by reference. Instances of `rewindable` (position-indexed
    caches such as the attention KV cache, the large ones) are kept by reference and not copied: restoring the
    cache length rewinds them.
    """
    saved, recurrent = [], False
    for container, key, value in _slots(cache, rewindable):
        if isinstance(value, Tensor) or (isinstance(value, tuple) and _holds_tensor(value)):
            value, recurrent = _copy(value), True
        saved.append((container, key, value))
    return StateSnapshot(saved, recurrent)


def _slots(obj: object, rewindable: tuple[type, ...]):
    """(container, key, value) for every value below obj, parents before children."""
    if isinstance(obj, rewindable):
        return
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        items = [(f.name, getattr(obj, f.name)) for f in dataclasses.fields(obj)]
    elif isinstance(obj, dict):
        items = list(obj.items())
    elif isinstance(obj, list):
        items = list(enumerate(obj))
    else:
        return
    for key, value in items:
        yield obj, key, value
        yield from _slots(value, rewindable)


def _holds_tensor(value: tuple) -> bool:
    return any(isinstance(v, Tensor) or (isinstance(v, tuple) and _holds_tensor(v)) for v in value)


def _copy(value):
    """A tensor's clone; a tuple (immutable, so saved whole) with every tensor in it cloned."""
    if isinstance(value, Tensor):
        return value.clone()
    if isinstance(value, tuple):
        copied = [_copy(v) for v in value]
        return type(value)(*copied) if hasattr(value, "_fields") else tuple(copied)
    return value


@dataclass
class MedusaStats:
    """What draft-and-verify decoding achieved: how many tokens each verify forward accepted."""

    accepted: list[int] = field(default_factory=list)  # a per verify forward, 1 ≤ a ≤ K + 1
    reruns: int = 0  # verify passes whose recurrent states had to be restored and advanced over the accepted prefix

    @property
    def mean_accepted_length(self) -> float:
        """Tokens per verify forward; plain greedy decoding gets 1."""
        return sum(self.accepted) / len(self.accepted) if self.accepted else 0.0
