"""
Attention reference ops: rotary embeddings, qk-norm, a preallocated KV cache and masked grouped-query attention.

This file is copied verbatim into every generated package as `ops/attention.py` and imports only torch and the
standard library. It is the definition the Triton kernels are tested against, and the path a model runs (and
exports) on when no kernel is available, so it favours plain, obviously-correct tensor code.

Notable features:
- RoPE with rotate-half pairing (Llama / HF layout), partial rotary, and linear, NTK-aware, YaRN and Llama-3.1
  scaling
- one visibility rule for training, prefill, chunked prefill, cached decode and sliding windows, stated on
  absolute positions (attention_mask); `attention` picks how to compute it from the call's structure, never from
  "which phase are we in":
    keys are the queries' own tokens (k_positions is q_positions, 1-D)  -> SDPA's causal fast path, no mask built
                                                                           (flash / cuDNN on a GPU)
    ... with a sliding window shorter than the sequence                 -> sliding_window_attention: banded SDPA
                                                                           over query chunks, O(T·W) (FlexAttention
                                                                           with a block mask on CUDA when
                                                                           USE_FLEX_ATTENTION; the Triton kernel of
                                                                           that name where the kernel pass chose it)
    anything else (decode against a cache, per-sequence positions)      -> SDPA with an explicit (Tq, Tk) mask; a
                                                                           decode step's mask is one row per query
                                                                           (a decode step's few queries: the split-KV
                                                                           kernel kernels/decode_attention.py where
                                                                           the kernel pass chose it, decode_attention
                                                                           here its reference)
  while torch.export traces, always the explicit-mask form (masked_attention), which every exporter lowers
- grouped-query attention: n_kv_heads divides n_heads (MQA and MHA are the two ends), through SDPA's enable_gqa
  (no copy of K/V) where torch has it
- a static KV cache written in place at a start offset that may be a tensor: no reallocation and no
  data-dependent Python branches, so decode can be captured by CUDA graphs and traced by torch.export
- a ring-buffer KV cache of `window` slots for sliding-window layers: memory bounded by the window
- a query that can see no key returns zeros, never NaN
- a StepContext per forward: RoPE's angles and the mask (an additive AttentionMask, which SDPA takes as it is) are
  computed by the first layer of each attention component and reused by the others, not recomputed in every layer
- left-padded (ragged) batches: hide_pads turns a cache's slot positions into each row's own positions with its
  pad slots hidden, so a padded row attends exactly as it would alone

Shape letters: B batch, Hq query heads, Hkv key/value heads, T / Tq / Tk sequence lengths, D head_dim,
R rotary_dim (even, R <= D), L max_len of a cache.
"""

import math
from dataclasses import dataclass
from functools import cache, lru_cache

import torch
import torch.nn.functional as F
from torch import Tensor

ROPE_SCALINGS = ("none", "linear", "ntk", "yarn", "llama3")

# SDPA reads grouped K/V heads in place from torch 2.5 on; before, K/V are expanded to every query head.
SDPA_HAS_GQA = tuple(int(part) for part in torch.__version__.split(".")[:2]) >= (2, 5)
# Sliding windows on CUDA through FlexAttention with a block mask (only the blocks the band touches are computed)
# instead of banded SDPA: off until bench/attn_moe_kernels.py has checked and timed it on the GPU.
USE_FLEX_ATTENTION = False
# Query rows per SDPA call of the banded sliding-window path (at least the window): each call reads
# chunk + window - 1 keys, so larger chunks waste less on the band's edges but build a larger mask.
BANDED_MIN_CHUNK = 128
# Head dims FlexAttention's generated kernels are known to take; others use the banded path.
FLEX_HEAD_DIMS = (16, 32, 64, 128, 256)

# -----------------------------------------------------------------------------
# Rotary position embeddings


def rope_inv_freq(
    rotary_dim: int,
    theta: float,
    scaling: str = "none",
    factor: float = 1.0,
    original_max_position: int | None = None,
    beta_fast: float = 32.0,
    beta_slow: float = 1.0,
    attention_factor: float | None = None,
    low_freq_factor: float = 1.0,
    high_freq_factor: float = 4.0,
) -> tuple[Tensor, float]:
    """
    Inverse frequencies of the rotary embedding, and YaRN's magnitude correction `mscale`.

        inv_freq[i] = theta ** (-2i / R)        i = 0 .. R/2 - 1   (pair i rotates by position * inv_freq[i])

    scaling:
      "none"    as above
      "linear"  inv_freq / factor: position interpolation, position p rotates like p / factor
      "ntk"     NTK-aware: theta becomes theta * factor ** (R / (R - 2)), so the lowest frequency is
                interpolated by exactly `factor` and the highest is left alone
      "yarn"    each frequency is blended between interpolated (inv_freq / factor) and kept (inv_freq)
                according to how many turns it makes over original_max_position: more than beta_fast turns ->
                kept, fewer than beta_slow -> interpolated, a linear ramp in between. The ramp ends are rounded
                to whole pair indices, as in the YaRN reference code and HF transformers, so checkpoints match.
      "llama3"  Llama 3.1's split by wavelength 2π / inv_freq against original_max_position L: wavelengths shorter
                than L / high_freq_factor are kept, longer than L / low_freq_factor interpolated (inv_freq / factor),
                and in between blended by s = (L / wavelength - low_freq_factor) / (high_freq_factor - low_freq_factor)
                as (1 - s) * inv_freq / factor + s * inv_freq.

    Returns (inv_freq (R/2,) float32 on the CPU, mscale). mscale = 0.1 * ln(factor) + 1 for YaRN with factor > 1
    (or `attention_factor` where a checkpoint states its own), else 1.0. Pass it to rope_cos_sin: it scales cos and
    sin, hence both q and k, so the attention logits of the rotated dims grow by mscale**2 (the paper's 1/t).
    Computed in float64 and rounded once to float32.
    """
    if rotary_dim <= 0 or rotary_dim % 2 != 0:
        raise ValueError(f"rotary_dim must be a positive even number, got {rotary_dim}")
    if scaling not in ROPE_SCALINGS:
        raise ValueError(f"unknown rope scaling {scaling!r}; expected one of {ROPE_SCALINGS}")
    if scaling != "none" and factor <= 0:
        raise ValueError(f"rope scaling factor must be positive, got {factor} for scaling={scaling!r}")
    R = rotary_dim
    exponents = torch.arange(0, R, 2, dtype=torch.float64) / R  # (R/2,) = 2i / R

    if scaling == "ntk":
        if R == 2:
            raise ValueError("rope scaling 'ntk' needs rotary_dim > 2: its exponent R / (R - 2) is undefined for R = 2")
        theta = theta * factor ** (R / (R - 2))
    inv_freq = theta**-exponents  # (R/2,)

    mscale = 1.0
    if scaling == "linear":
        inv_freq = inv_freq / factor
    elif scaling == "yarn":
        if original_max_position is None:
            raise ValueError("rope scaling 'yarn' needs original_max_position (the context length it was trained on)")

        def pair_index(turns: float) -> float:
            # the (fractional) pair index whose frequency makes `turns` full turns over original_max_position
            return R * math.log(original_max_position / (turns * 2 * math.pi)) / (2 * math.log(theta))

        low = max(math.floor(pair_index(beta_fast)), 0)
        high = min(math.ceil(pair_index(beta_slow)), R - 1)  # R - 1, not R/2 - 1: as in the reference code
        if low == high:
            high += 0.001  # avoid 0/0 in the ramp
        pair = torch.arange(R // 2, dtype=torch.float64)  # (R/2,)
        ramp = ((pair - low) / (high - low)).clamp(0, 1)  # (R/2,) 0: keep .. 1: interpolate
        inv_freq = inv_freq * (1 - ramp) + inv_freq / factor * ramp
        if attention_factor is not None:
            mscale = attention_factor
        elif factor > 1:
            mscale = 0.1 * math.log(factor) + 1.0
    elif scaling == "llama3":
        if original_max_position is None:
            raise ValueError("rope scaling 'llama3' needs original_max_position (the context length it was trained on)")
        if high_freq_factor <= low_freq_factor:
            raise ValueError(f"rope scaling 'llama3' needs high_freq_factor > low_freq_factor, got {high_freq_factor} "
                             f"and {low_freq_factor}")
        wavelength = 2 * math.pi / inv_freq  # (R/2,) tokens per full turn
        blend = (original_max_position / wavelength - low_freq_factor) / (high_freq_factor - low_freq_factor)
        blended = (1 - blend) * inv_freq / factor + blend * inv_freq  # (R/2,)
        inv_freq = torch.where(wavelength > original_max_position / low_freq_factor, inv_freq / factor,
                               torch.where(wavelength < original_max_position / high_freq_factor, inv_freq, blended))
    return inv_freq.float(), mscale


def rope_cos_sin(inv_freq: Tensor, positions: Tensor, mscale: float = 1.0) -> tuple[Tensor, Tensor]:
    """
    cos and sin of the rotation angles positions * inv_freq, times mscale (see rope_inv_freq), in float32.
    positions (T,) or (B, T), integer (or float, for interpolated positions); returns cos, sin each (T, R/2) or
    (B, T, R/2) on positions.device. Angles are float32 products, as in HF transformers.
    """
    inv_freq = inv_freq.to(device=positions.device, dtype=torch.float32)
    # integer positions meet the float32 frequencies in the product itself (cast exactly: positions < 2**24), one
    # launch fewer than casting them first
    positions = positions.to(torch.float32) if positions.is_floating_point() else positions
    angles = positions.unsqueeze(-1) * inv_freq  # (..., T, R/2) float32
    if mscale == 1.0:  # no product to launch (a decode step runs this in every attention layer)
        return angles.cos(), angles.sin()
    return angles.cos() * mscale, angles.sin() * mscale


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """
    Rotate the first R = 2 * cos.size(-1) channels of x; channels R .. D-1 pass through (partial rotary).
    Rotate-half pairing (Llama / HF): channel i pairs with channel i + R/2 and (a, b) becomes
    (a cos - b sin, b cos + a sin), i.e. the complex number a + ib multiplied by e^(i * angle).
    x (B, H, T, D); cos, sin (T, R/2) or (B, T, R/2). Computed in at least float32, returned in x.dtype.
    """
    D = x.size(-1)
    R = 2 * cos.size(-1)
    if R > D:
        raise ValueError(f"rotary_dim {R} (2 * cos.size(-1)) exceeds head_dim {D}")
    cos, sin = cos.unsqueeze(-3), sin.unsqueeze(-3)  # (1, T, R/2) or (B, 1, T, R/2): broadcast over heads
    dtype = torch.promote_types(x.dtype, torch.float32)
    a = x[..., : R // 2].to(dtype)  # (B, H, T, R/2)
    b = x[..., R // 2 : R].to(dtype)  # (B, H, T, R/2)
    rotated = torch.cat([a * cos - b * sin, b * cos + a * sin], dim=-1).to(x.dtype)  # (B, H, T, R)
    if R == D:
        return rotated
    return torch.cat([rotated, x[..., R:]], dim=-1)  # (B, H, T, D)


def apply_rope_qk(q: Tensor, k: Tensor, cos: Tensor, sin: Tensor) -> tuple[Tensor, Tensor]:
    """
    apply_rope on q (B, Hq, T, D) and k (B, Hk, T, D) with the same angles: what the Triton kernel kernels/rope.py
    computes in one pass (in place when no gradient is needed).
    """
    return apply_rope(q, cos, sin), apply_rope(k, cos, sin)


def apply_rope_write_kv(
    q: Tensor, k: Tensor, v: Tensor, cos: Tensor, sin: Tensor, k_cache: Tensor, v_cache: Tensor, slots: Tensor
) -> Tensor:
    """
    A cached step's RoPE and cache write: q rotated (returned), and k rotated and v copied into rows `slots` (T,) of
    k_cache and v_cache (B, Hk, L, D) (a cache's `slots`), cast to their dtype, in place. What the Triton kernel
    kernels/rope.py computes in one launch (the attention template calls the kernel, or else
    apply_rope_qk and the cache's write, which are these ops).
    """
    q, k = apply_rope_qk(q, k, cos, sin)
    k_cache.index_copy_(2, slots, k.to(k_cache.dtype))
    v_cache.index_copy_(2, slots, v.to(v_cache.dtype))
    return q


# -----------------------------------------------------------------------------
# QK-norm


def qk_norm(x: Tensor, weight: Tensor | None, eps: float) -> Tensor:
    """
    RMSNorm over the head dim, applied to q and k before RoPE by models with qk-norm:
        y = x / sqrt(mean(x**2, -1) + eps) * weight
    x (..., D), weight (D,) or None. Computed in float32 (float64 stays float64) with a single cast back to
    x.dtype at the end.
    """
    dtype = torch.promote_types(x.dtype, torch.float32)
    x32 = x.to(dtype)
    y = x32 * torch.rsqrt(x32.pow(2).mean(dim=-1, keepdim=True) + eps)  # (..., D)
    if weight is not None:
        y = y * weight.to(dtype)
    return y.to(x.dtype)


# -----------------------------------------------------------------------------
# KV cache


_SLOT_POSITIONS: dict[tuple[str, int], Tensor] = {}
"""KVCache.key_positions' arange(L) by (device, L): a few kilobytes each, kept for the process."""


def tracing() -> bool:
    """Whether torch.compile or torch.export is tracing: a tensor made now belongs to the trace, not to the caller."""
    return torch.compiler.is_compiling() or torch.compiler.is_exporting()


def new_token_positions(start: int | Tensor, T: int, device: torch.device) -> Tensor:
    """(T,) the positions start .. start+T-1 of new tokens. One token at a tensor start (a decode step) is a view of
    it: nothing to launch."""
    if isinstance(start, Tensor) and T == 1:
        return start.reshape(1)
    return torch.arange(T, device=device) + start


@dataclass
class KVCache:
    """
    One attention layer's keys and values, preallocated for L positions; slot t holds position t.

    The buffers are written in place and never reallocated, so their addresses are stable (CUDA graphs) and they
    stay plain tensors (torch.export). Decode writes T new tokens at `start` = the current length and attends over
    the whole buffer with k_positions = arange(L): slots not yet written hold positions past every query, so
    causality hides them. A sliding-window layer's cache is RingKVCache: `window` slots instead of L.
    """

    k: Tensor  # (B, Hkv, L, D)
    v: Tensor  # (B, Hkv, L, D)

    @classmethod
    def empty(
        cls,
        batch: int,
        n_kv_heads: int,
        max_len: int,
        head_dim: int,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> "KVCache":
        # zeros, not torch.empty: masked keys get probability 0, but 0 * NaN garbage in v would still be NaN
        shape = (batch, n_kv_heads, max_len, head_dim)
        cache = cls(k=torch.zeros(shape, device=device, dtype=dtype), v=torch.zeros(shape, device=device, dtype=dtype))
        if not tracing():
            cache.key_positions(0, 1)  # made now, before a CUDA graph records the steps that read it
        return cache

    @classmethod
    def ring_buffer(
        cls,
        batch: int,
        n_kv_heads: int,
        window: int,
        head_dim: int,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> "RingKVCache":
        """The cache of a sliding-window layer: a RingKVCache of `window` slots (same update() call)."""
        return RingKVCache.empty(batch, n_kv_heads, window, head_dim, device=device, dtype=dtype)

    @property
    def max_len(self) -> int:
        return self.k.size(2)

    def write(self, k_new: Tensor, v_new: Tensor, start: int | Tensor) -> tuple[Tensor, Tensor]:
        """
        Copy k_new, v_new (B, Hkv, T, D) into slots start .. start+T-1, in place, cast to the cache dtype.
        start is an int or a 0-dim integer tensor (no host sync either way; a tensor start is only range-checked
        by the device). Returns the full buffers (B, Hkv, L, D) to attend over.
        """
        B, Hkv, T, D = k_new.shape
        if v_new.shape != k_new.shape:
            raise ValueError(f"k_new and v_new differ in shape: {tuple(k_new.shape)} and {tuple(v_new.shape)}")
        if (B, Hkv, D) != (self.k.size(0), self.k.size(1), self.k.size(3)):
            raise ValueError(
                f"cannot write (B, Hkv, T, D) = {tuple(k_new.shape)} into a cache of shape {tuple(self.k.shape)}: "
                f"B, Hkv and D must match"
            )
        slots = self.slots(start, T)  # (T,)
        self.k.index_copy_(2, slots, k_new.to(self.k.dtype))
        self.v.index_copy_(2, slots, v_new.to(self.v.dtype))
        return self.k, self.v

    def slots(self, start: int | Tensor, T: int) -> Tensor:
        """
        (T,) the slots a write of T tokens at start fills: start .. start+T-1 (a view of a tensor start when T == 1,
        nothing launched). `write` copies into them; a kernel that writes the cache itself (kernels/rope.py's
        apply_rope_write_kv) takes them, and then `write` is not called. A RingKVCache answers the same question.
        """
        if isinstance(start, int) and not 0 <= start <= self.max_len - T:
            raise ValueError(f"cannot write {T} tokens at start={start} into a cache of max_len={self.max_len}")
        return new_token_positions(start, T, self.k.device)

    def key_positions(self, start: int | Tensor, T: int) -> Tensor:
        """(L,) the position of every slot write returns, once T tokens were written at start: arange(L), made once per
        length and device (a decoding step launched it on the attention branch's stream, where it waited for SMs
        behind the other branch's GEMVs; a graph decoder's caches are copies of their dataclasses each step, so the
        cache object cannot keep it). Made anew while tracing (a kept tensor would outlive the trace) and while a CUDA
        graph records (the launch runs only at replay: a kept tensor would hold nothing until then)."""
        if tracing():
            return torch.arange(self.max_len, device=self.k.device)
        key = (str(self.k.device), self.max_len)
        kept = _SLOT_POSITIONS.get(key)
        if kept is not None:
            return kept
        positions = torch.arange(self.max_len, device=self.k.device)
        if not (positions.is_cuda and torch.cuda.is_current_stream_capturing()):
            _SLOT_POSITIONS[key] = positions
        return positions

    def update(self, k_new: Tensor, v_new: Tensor, start: int | Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """
        Write the new tokens (see write) and return what to attend over: keys (B, Hkv, L, D), values and the
        position of every slot (L,) = arange(L). The same call as RingKVCache.update. (A model's attention layers
        write, and take the positions from the forward's StepContext, which asks the first layer's cache once.)
        """
        k, v = self.write(k_new, v_new, start)
        return k, v, self.key_positions(start, k_new.size(2))


# A position no query reaches: a ring slot not yet written carries it, so causality hides the slot.
NEVER_WRITTEN = torch.iinfo(torch.int64).max


@dataclass
class RingKVCache:
    """
    A sliding-window layer's keys and values in a ring of `window` slots: position p lives in slot p % window.

    A query at position t sees keys t - window + 1 .. t, so no older key is ever read again and the cache's memory
    is bounded by the window, not by the sequence (decoding 3 windows' worth of tokens keeps `window` slots).
    The slots' positions follow from `start` alone (the ring is filled in order), so nothing but the two buffers
    is stored, addresses are stable (CUDA graphs), and a tensor `start` traces under torch.export.
    Rewinding (Medusa's rejected drafts) cannot be done by resetting a length, since newer tokens overwrote older
    ones in place: snapshot the buffers instead (they are window-sized).
    """

    k: Tensor  # (B, Hkv, W, D)
    v: Tensor  # (B, Hkv, W, D)

    @classmethod
    def empty(
        cls,
        batch: int,
        n_kv_heads: int,
        window: int,
        head_dim: int,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> "RingKVCache":
        if window < 1:
            raise ValueError(f"window must be at least 1, got {window}")
        shape = (batch, n_kv_heads, window, head_dim)  # zeros: see KVCache.empty
        return cls(k=torch.zeros(shape, device=device, dtype=dtype), v=torch.zeros(shape, device=device, dtype=dtype))

    @property
    def window(self) -> int:
        return self.k.size(2)

    def slot_positions(self, length: int | Tensor) -> Tensor:
        """(W,) the position held by each slot once positions 0 .. length-1 were written; NEVER_WRITTEN if none."""
        W = self.window
        slots = torch.arange(W, device=self.k.device)  # (W,)
        positions = length - W + torch.remainder(slots - length, W)  # (W,) the newest p < length with p % W == slot
        return torch.where(positions >= 0, positions, NEVER_WRITTEN)

    def update(self, k_new: Tensor, v_new: Tensor, start: int | Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """
        Attend-and-write for T new tokens at positions start .. start+T-1: returns the keys (B, Hkv, S, D), values
        and key positions (S,) the new queries must attend over (write, then key_positions), and leaves the newest
        W tokens in the ring.
        """
        k, v = self.write(k_new, v_new, start)
        return k, v, self.key_positions(start, k_new.size(2))

    def key_positions(self, start: int | Tensor, T: int) -> Tensor:
        """(S,) the position of every key write returns for T tokens written at start (NEVER_WRITTEN: none yet)."""
        if T == 1:
            return self.slot_positions(start + 1)
        return torch.cat([self.slot_positions(start), new_token_positions(start, T, self.k.device)])

    def write(self, k_new: Tensor, v_new: Tensor, start: int | Tensor) -> tuple[Tensor, Tensor]:
        """
        Write T new tokens at positions start .. start+T-1 and return the keys (B, Hkv, S, D) and values the new
        queries must attend over, the newest W tokens left in the ring.

        T == 1 (a decode step): the new token overwrites position start - W, which its window no longer covers,
        so the ring itself is returned (S = W). T > 1: the new tokens would overwrite keys their own earlier
        queries still see, so the returned keys are the ring before the write followed by the new tokens
        (S = W + T), and only then is the ring written.
        """
        B, Hkv, T, D = k_new.shape
        if v_new.shape != k_new.shape:
            raise ValueError(f"k_new and v_new differ in shape: {tuple(k_new.shape)} and {tuple(v_new.shape)}")
        if (B, Hkv, D) != (self.k.size(0), self.k.size(1), self.k.size(3)):
            raise ValueError(
                f"cannot write (B, Hkv, T, D) = {tuple(k_new.shape)} into a ring cache of shape {tuple(self.k.shape)}: "
                f"B, Hkv and D must match"
            )
        if isinstance(start, int) and start < 0:
            raise ValueError(f"start must be a position (>= 0), got {start}")
        if T == 1:
            slots = self.slots(start, T)  # (1,)
            self.k.index_copy_(2, slots, k_new.to(self.k.dtype))
            self.v.index_copy_(2, slots, v_new.to(self.v.dtype))
            return self.k, self.v
        k = torch.cat([self.k, k_new.to(self.k.dtype)], dim=2)  # (B, Hkv, W + T, D)
        v = torch.cat([self.v, v_new.to(self.v.dtype)], dim=2)
        # The ring keeps the newest W positions: slot s now holds the newest p < start + T with p % W == s, a new
        # token when p >= start. Gathered with a (W,) index, so shapes stay static for any T (export, ONNX).
        newest = self.slot_positions(start + T)  # (W,) NEVER_WRITTEN where nothing was ever written
        from_new = (newest >= start) & (newest != NEVER_WRITTEN)  # (W,)
        index = (newest - start).clamp(0, T - 1)  # (W,) which new token, where from_new
        keep = from_new[:, None]  # (W, 1) broadcasts over (B, Hkv, W, D)
        self.k.copy_(torch.where(keep, k_new.to(self.k.dtype).index_select(2, index), self.k))
        self.v.copy_(torch.where(keep, v_new.to(self.v.dtype).index_select(2, index), self.v))
        return k, v

    def slots(self, start: int | Tensor, T: int) -> Tensor | None:
        """
        (T,) the ring slots a write of T tokens at start fills in place, as KVCache.slots: position p goes to slot
        p % W. Only a decoding step (T == 1) is such a write; None for T > 1, whose write returns the ring before it
        followed by the new tokens (see write), which no slots describe.
        """
        if T != 1:
            return None
        if isinstance(start, int) and start < 0:
            raise ValueError(f"start must be a position (>= 0), got {start}")
        return torch.remainder(new_token_positions(start, T, self.k.device), self.window)  # (1,)


def hide_pads(k_positions: Tensor, pads: Tensor) -> Tensor:
    """
    The keys' positions in a left-padded (ragged) batch, where row b's first pads[b] slots hold padding.
    k_positions (S,) slot positions (a cache's, or the sequence's own) -> (B, S): each row's positions counted from
    its first real token, and NEVER_WRITTEN for its pad slots (and for slots never written), which lies past every
    query, so causality hides them. The queries' positions are `positions - pads[:, None]` (negative at pads: a
    pad query sees no key and comes out as zeros). Distances between real tokens are those of the unpadded row, so
    windows, RoPE and causality give each row exactly what it gets alone.
    """
    positions = k_positions - pads[:, None]  # (B, S)
    return torch.where((positions >= 0) & (k_positions != NEVER_WRITTEN), positions, NEVER_WRITTEN)


# -----------------------------------------------------------------------------
# Attention


def attention_mask(
    q_positions: Tensor,
    k_positions: Tensor,
    window: int | None = None,
    k_valid_len: int | Tensor | None = None,
) -> Tensor:
    """
    Boolean visibility, True where query i may attend to key j:
        k_pos[j] <= q_pos[i]  and  (window is None or q_pos[i] - k_pos[j] < window)  and  j < k_valid_len
    q_positions (Tq,) or (B, Tq); k_positions (Tk,) or (B, Tk); k_valid_len an int, a 0-dim tensor or (B,).
    Returns (1, 1, Tq, Tk) or (B, 1, Tq, Tk), ready to broadcast over heads.
    """
    if window is not None and window < 1:
        raise ValueError(f"window must be at least 1 (the query itself), got {window}")
    Tk = k_positions.size(-1)
    qp = q_positions.unsqueeze(-1)  # (..., Tq, 1)
    kp = k_positions.to(q_positions.device).unsqueeze(-2)  # (..., 1, Tk)
    visible = kp <= qp  # (..., Tq, Tk)
    if window is not None:
        visible = visible & (qp - kp < window)
    if k_valid_len is not None:
        valid_len = torch.as_tensor(k_valid_len, device=q_positions.device).reshape(-1, 1, 1)  # (1 or B, 1, 1)
        visible = visible & (torch.arange(Tk, device=q_positions.device) < valid_len)  # (1 or B, Tq, Tk)
    if visible.dim() == 2:
        visible = visible.unsqueeze(0)
    return visible.unsqueeze(1)  # (1 or B, 1, Tq, Tk); not a reshape(-1, ...), which Tq = 0 (no query) leaves ambiguous


def is_exporting() -> bool:
    """True while torch.export (and the ONNX exporter built on it) traces: take the explicit-mask forms then."""
    check = getattr(torch.compiler, "is_exporting", None)
    return bool(check is not None and check())


def attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    q_positions: Tensor,
    k_positions: Tensor,
    window: int | None = None,
    scale: float | None = None,
    k_valid_len: int | Tensor | None = None,
    queries_see_themselves: bool = False,
) -> Tensor:
    """
    Grouped-query causal attention with visibility from absolute positions (see attention_mask):
        y[b, h, i] = sum_j softmax_j(scale * q[b, h, i] . k[b, h // G, j]  over visible j) * v[b, h // G, j]
    with G = Hq / Hkv and scale defaulting to 1 / sqrt(D). A query with no visible key gets y = 0.
    q (B, Hq, Tq, D); k (B, Hkv, Tk, D); v (B, Hkv, Tk, Dv); positions (Tq,) / (Tk,) or (B, Tq) / (B, Tk).
    Returns (B, Hq, Tq, Dv) in q.dtype; F.scaled_dot_product_attention accumulates in float32.

    Passing the same 1-D tensor as q_positions and k_positions says "the keys are these queries' own tokens, at
    increasing positions" (a model's start + arange(T)): query i then sees keys 0..i, the causal triangle, and the
    call takes the maskless causal / sliding-window paths. Any other call is computed with an explicit mask.
    queries_see_themselves=True says each query's own key is among k and visible to it (a cache just written with
    these tokens, no padding): no row is empty, so the masked form skips its empty-row guard (four launches fewer
    in each layer of a decode step).
    """
    Hq, Tq = q.shape[1:3]
    Hkv, Tk = k.size(1), k.size(2)
    if Hq % Hkv != 0:
        raise ValueError(f"n_heads ({Hq}) must be a multiple of n_kv_heads ({Hkv})")
    if q_positions.size(-1) != Tq or k_positions.size(-1) != Tk:
        raise ValueError(
            f"positions must match the sequence lengths: q_positions {tuple(q_positions.shape)} for Tq={Tq}, "
            f"k_positions {tuple(k_positions.shape)} for Tk={Tk}"
        )
    if window is not None and window < 1:
        raise ValueError(f"window must be at least 1 (the query itself), got {window}")
    self_attention = k_positions is q_positions and q_positions.dim() == 1 and k_valid_len is None
    if is_exporting() or not self_attention:
        return masked_attention(q, k, v, q_positions=q_positions, k_positions=k_positions, window=window,
                                scale=scale, k_valid_len=k_valid_len, queries_see_themselves=queries_see_themselves)
    if window is None or window >= Tq:
        return causal_attention(q, k, v, scale=scale)
    return sliding_window_attention(q, k, v, window, scale=scale)


def _sdpa(q: Tensor, k: Tensor, v: Tensor, **kwargs) -> Tensor:
    """SDPA with grouped K/V heads read in place where torch can, else expanded to every query head."""
    Hq, Hkv = q.size(1), k.size(1)
    if Hq == Hkv:
        return F.scaled_dot_product_attention(q, k, v, **kwargs)
    if SDPA_HAS_GQA:
        return F.scaled_dot_product_attention(q, k, v, enable_gqa=True, **kwargs)
    k = k.repeat_interleave(Hq // Hkv, dim=1)  # (B, Hq, Tk, D): query head h reads kv head h // G
    v = v.repeat_interleave(Hq // Hkv, dim=1)
    return F.scaled_dot_product_attention(q, k, v, **kwargs)


def causal_attention(q: Tensor, k: Tensor, v: Tensor, *, scale: float | None = None) -> Tensor:
    """
    Query i sees keys 0..i (Tq == Tk): SDPA's is_causal path, which never materialises the mask and runs on the
    flash / cuDNN backends on a GPU. q (B, Hq, T, D), k (B, Hkv, T, D), v (B, Hkv, T, Dv) -> (B, Hq, T, Dv).
    """
    return _sdpa(q, k, v, is_causal=True, scale=scale)


def sliding_window_attention(q: Tensor, k: Tensor, v: Tensor, window: int, *, scale: float | None = None) -> Tensor:
    """
    Query i sees keys i-window+1 .. i (Tq == Tk, the keys are the queries' own tokens): FlexAttention's block-sparse
    kernel where USE_FLEX_ATTENTION and it applies, else banded SDPA. The reference a Triton kernel of the same name
    replaces (kernels/packed_query_attention.py). q (B, Hq, T, D), k (B, Hkv, T, D), v (B, Hkv, T, Dv) ->
    (B, Hq, T, Dv).
    """
    D = q.size(-1)
    # Flex's compiled kernel has no float32 lowering on the H200 (inductor: no valid choices): half precision only.
    half = q.dtype in (torch.bfloat16, torch.float16)
    if USE_FLEX_ATTENTION and q.is_cuda and half and D in FLEX_HEAD_DIMS and v.size(-1) == D and flex_attention_available():
        return flex_sliding_window_attention(q, k, v, window, scale=scale)
    return banded_sliding_window_attention(q, k, v, window, scale=scale)


def banded_sliding_window_attention(
    q: Tensor, k: Tensor, v: Tensor, window: int, *, scale: float | None = None
) -> Tensor:
    """
    Query i sees keys i-window+1 .. i (Tq == Tk), computed in query chunks of c >= window rows: a chunk starting
    at s reads only keys s-window+1 .. s+c-1, with a (c, c+window-1) band mask. Memory and work are O(T·(c+W))
    instead of O(T²). q (B, Hq, T, D), k (B, Hkv, T, D), v (B, Hkv, T, Dv) -> (B, Hq, T, Dv).
    """
    T = q.size(2)
    chunk = max(window, BANDED_MIN_CHUNK)
    outputs = []
    for s in range(0, T, chunk):
        e = min(s + chunk, T)
        lo = max(s - window + 1, 0)
        q_pos = torch.arange(s, e, device=q.device)[:, None]  # (c, 1)
        k_pos = torch.arange(lo, e, device=q.device)[None, :]  # (1, e - lo)
        band = (k_pos <= q_pos) & (q_pos - k_pos < window)  # (c, e - lo): every row sees itself
        outputs.append(_sdpa(q[:, :, s:e], k[:, :, lo:e], v[:, :, lo:e], attn_mask=band, scale=scale))
    return torch.cat(outputs, dim=2)  # (B, Hq, T, Dv)


def flex_attention_available() -> bool:
    try:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention  # noqa: F401
    except ImportError:
        return False
    return True


@cache
def _flex_attention(compiled: bool):
    from torch.nn.attention.flex_attention import flex_attention

    # flex_attention runs its fused kernel only when compiled; eager it computes densely (fine for tests on CPU).
    return torch.compile(flex_attention, dynamic=False) if compiled else flex_attention


FLEX_BLOCK = 128  # FlexAttention's default sparse block (query and key)


@lru_cache(maxsize=32)
def _sliding_window_block_mask(T: int, window: int, device: str):
    """The sliding window's BlockMask, built from block indices: O((T / 128)²) booleans, never the (T, T) mask."""
    from torch.nn.attention.flex_attention import BlockMask

    def sliding_window(b, h, q_idx, kv_idx):
        return (kv_idx <= q_idx) & (q_idx - kv_idx < window)

    n = -(-T // FLEX_BLOCK)
    block = torch.arange(n, device=device)
    lo, hi = block * FLEX_BLOCK, (block * FLEX_BLOCK + FLEX_BLOCK - 1).clamp(max=T - 1)  # first / last index
    q_lo, q_hi, k_lo, k_hi = lo[:, None], hi[:, None], lo[None, :], hi[None, :]
    touched = (k_lo <= q_hi) & (q_lo - k_hi < window)  # (n, n) some (query, key) pair of the blocks is visible
    full = (k_hi <= q_lo) & (q_hi - k_lo < window)  # every pair is visible: no mask_mod needed
    if T % FLEX_BLOCK:  # the short last blocks always go through mask_mod
        full[-1, :] = False
        full[:, -1] = False
    partial = touched & ~full
    return BlockMask.from_kv_blocks(*_kv_blocks(partial), *_kv_blocks(full), BLOCK_SIZE=FLEX_BLOCK,
                                    mask_mod=sliding_window, seq_lengths=(T, T))


def _kv_blocks(blocks: Tensor) -> tuple[Tensor, Tensor]:
    """(nq, nk) bool -> BlockMask's (1, 1, nq) counts and (1, 1, nq, nk) indices, each row's blocks first."""
    counts = blocks.sum(dim=-1, dtype=torch.int32)
    indices = torch.sort((~blocks).to(torch.uint8), dim=-1, stable=True).indices.to(torch.int32)
    return counts[None, None], indices[None, None]


def flex_sliding_window_attention(
    q: Tensor, k: Tensor, v: Tensor, window: int, *, scale: float | None = None
) -> Tensor:
    """
    Query i sees keys i-window+1 .. i (Tq == Tk) through FlexAttention: the block mask lists only the key blocks
    each query block's band touches (those wholly inside the band skip the mask), so work is O(T·W). The block
    mask is built once per (T, window, device).
    q (B, Hq, T, D), k (B, Hkv, T, D), v (B, Hkv, T, Dv) -> (B, Hq, T, Dv).
    """
    block_mask = _sliding_window_block_mask(q.size(2), window, str(q.device))
    flex = _flex_attention(compiled=q.is_cuda)
    return flex(q, k, v, block_mask=block_mask, scale=scale, enable_gqa=q.size(1) != k.size(1))


def masked_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    q_positions: Tensor,
    k_positions: Tensor,
    window: int | None = None,
    scale: float | None = None,
    k_valid_len: int | Tensor | None = None,
    queries_see_themselves: bool = False,
) -> Tensor:
    """
    `attention` with the (Tq, Tk) visibility mask built from positions: the exact form for any positions, and the
    one torch.export and ONNX get. Same arguments and result as `attention`.
    """
    mask = AttentionMask.build(q_positions, k_positions, window, k_valid_len, queries_see_themselves, dtype=q.dtype)
    return attend(q, k, v, mask, scale=scale)


def attend(q: Tensor, k: Tensor, v: Tensor, mask: "AttentionMask", *, scale: float | None = None) -> Tensor:
    """
    Attention under a mask already built (masked_attention builds it from positions; a StepContext builds one per
    forward and shares it). q (B, Hq, Tq, D); k (B, Hkv, Tk, D); v (B, Hkv, Tk, Dv) -> (B, Hq, Tq, Dv).
    """
    B, Hq, Tq = q.shape[:3]
    Hkv, Tk = k.size(1), k.size(2)
    # The mask gets an explicit batch dim: SDPA's broadcast check of a batch-1 mask would pin B under torch.export.
    bias = mask.bias.expand(B, 1, Tq, Tk)  # (B, 1, Tq, Tk)
    if Hkv != Hq and is_exporting():
        # expanded K/V: the form every exporter lowers (a decode step eager reads the cache in place instead)
        k = k.repeat_interleave(Hq // Hkv, dim=1)  # (B, Hq, Tk, D): query head h reads kv head h // G
        v = v.repeat_interleave(Hq // Hkv, dim=1)  # (B, Hq, Tk, Dv)
    y = _sdpa(q, k, v, attn_mask=bias, scale=scale)  # (B, Hq, Tq, Dv)
    if mask.sees_any is None:
        return y
    # zeros where a row sees no key (y is finite there); keeps SDPA's output layout, so (B, T, Hq·Dv) stays a view
    return y * mask.sees_any


def decode_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    q_positions: Tensor,
    k_positions: Tensor,
    window: int | None = None,
    scale: float | None = None,
) -> Tensor:
    """
    A cached step's queries q (B, Hq, T, D) over the keys and values a cache's write returned (B, Hkv, S, D), the
    visibility of attention_mask from q_positions (T,) or (B, T) and k_positions (S,) or (B, S) (StepContext's
    token_positions and key_positions), a query that sees no key giving zeros: the masked SDPA a decoding step runs,
    as one call. kernels/decode_attention.py's op of this name computes the same with the mask built inside the kernel.
    """
    return masked_attention(q, k, v, q_positions=q_positions, k_positions=k_positions, window=window, scale=scale)


def decode_attention_one_launch(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    q_positions: Tensor,
    k_positions: Tensor,
    window: int | None = None,
    scale: float | None = None,
) -> Tensor:
    """
    `decode_attention`: the reference of kernels/decode_attention.py's op of this name, which computes the same in
    one launch (the splits of the cache combined by the last of them to finish, not by a second launch).
    """
    return decode_attention(q, k, v, q_positions, k_positions, window=window, scale=scale)


@dataclass
class AttentionMask:
    """
    A masked attention's visibility as SDPA adds it: 0 where a query sees a key, -inf where it does not, in the
    queries' dtype (SDPA on CUDA turns a boolean mask into this with two launches of its own, every call).
    sees_any marks the rows that see some key; a row that sees none is let see every key (a finite softmax) and
    its output is zeroed. None when every query sees at least itself, which needs no guard.
    """

    bias: Tensor  # (1 or B, 1, Tq, Tk)
    sees_any: Tensor | None = None  # (1 or B, 1, Tq, 1) bool

    @classmethod
    def build(
        cls,
        q_positions: Tensor,
        k_positions: Tensor,
        window: int | None = None,
        k_valid_len: int | Tensor | None = None,
        queries_see_themselves: bool = False,
        dtype: torch.dtype = torch.float32,
    ) -> "AttentionMask":
        """The mask of attention_mask(q_positions, k_positions, window, k_valid_len); queries_see_themselves as in
        `attention`."""
        visible = attention_mask(q_positions, k_positions, window, k_valid_len)  # (1 or B, 1, Tq, Tk)
        sees_any = None
        if not queries_see_themselves:
            sees_any = visible.any(dim=-1, keepdim=True)  # (1 or B, 1, Tq, 1)
            visible = visible | ~sees_any
        bias = torch.zeros(visible.shape, dtype=dtype, device=visible.device).masked_fill_(~visible, float("-inf"))
        return cls(bias, sees_any)


# -----------------------------------------------------------------------------
# What the attention layers of one forward share


class StepContext:
    """
    One forward's positions (a decode step, a prompt, a training batch) and what attention layers derive from them
    alone: RoPE's cos and sin, and the mask over the keys they attend to. Every layer of one attention component
    (one class of a generated model) has the same frequencies, window and cache geometry, so the component's first
    layer computes these and the others reuse them; a decode step would otherwise launch the same angles and mask
    once per layer, a dozen kernels each. The model makes one per forward and hands it to every layer (the blocks'
    `step` argument); a layer called alone makes its own. Under torch.compile each layer computes its own: with each
    layer compiled on its own (`compile: true` in training), a memo that the first layer writes and the others read
    would give every layer class two graphs, and inside a graph these are a few fused elementwise ops.
    """

    def __init__(self, positions: Tensor, pads: Tensor | None = None):
        self.positions = positions  # (T,) slots: start + arange(T)
        self.pads = pads  # (B,) each row's left padding in a ragged batch, or None
        # each row's positions counted from its first token: (T,), or (B, T) in a ragged batch
        self.token_positions = positions if pads is None else positions - pads[:, None]
        self._shared: dict[tuple[str, str], object] = {}

    def _per_component(self, component: str, what: str, compute):
        """compute(), called by the first layer of `component` that asks for `what` and kept for the others (each
        layer calls it under torch.compile: see the class)."""
        if torch.compiler.is_compiling():
            return compute()
        key = (component, what)
        if key not in self._shared:
            self._shared[key] = compute()
        return self._shared[key]

    def rope_cos_sin(self, key: str, inv_freq: Tensor, mscale: float = 1.0, angles=None) -> tuple[Tensor, Tensor]:
        """rope_cos_sin(inv_freq, token_positions, mscale), computed by the first layer that asks for `key`: a RoPE's
        definition (kinds/attention.py's rope_key), so that every layer with the same frequencies shares them, or a
        component's name. `angles`: a function of the same signature that computes them instead (a decoding step:
        the kernel, one launch)."""
        compute = angles or rope_cos_sin
        return self._per_component(key, "rope", lambda: compute(inv_freq, self.token_positions, mscale))

    def cache_slots(self, component: str, cache) -> Tensor | None:
        """
        cache.slots(start, T) for these tokens: where a KVCache / RingKVCache write of them goes (None where that
        write is no slot write: a ring at T > 1), asked of the first layer's cache of `component` (one geometry for
        all its layers). A ring's slot is a remainder: one launch a step for the component, not one a layer.
        """
        return self._per_component(component, "slots", lambda: cache.slots(self.positions[0], self.positions.size(-1)))

    def attention_mask(
        self, component: str, cache=None, window: int | None = None, dtype: torch.dtype = torch.float32
    ) -> AttentionMask:
        """
        The mask of the queries at token_positions over the keys a KVCache / RingKVCache `write` of these tokens
        returned (their positions: cache.key_positions), or over the tokens themselves without a cache; the keys
        hold each query's own (a cache is written before it is read). Pad slots hidden, causal, within `window`.
        Built by the first layer of `component`, whose cache stands for every layer's: one component's caches have
        one geometry.
        """
        return self._per_component(component, "mask", lambda: self._build_mask(component, cache, window, dtype))

    def key_positions(self, component: str, cache) -> Tensor:
        """
        The positions of the keys a KVCache / RingKVCache `write` of these tokens returned (cache.key_positions, (S,)),
        pad slots hidden in a ragged batch ((B, S), hide_pads): what a kernel that builds the mask itself takes
        (kernels/decode_attention.py). Computed by the first layer of `component`, as attention_mask is.
        """
        return self._per_component(component, "key_positions", lambda: self._key_positions(cache))

    def _key_positions(self, cache) -> Tensor:
        T = self.positions.size(-1)
        k_positions = self.positions if cache is None else cache.key_positions(self.positions[0], T)  # (S,)
        if self.pads is not None:
            k_positions = hide_pads(k_positions, self.pads)  # (B, S)
        return k_positions

    def _build_mask(self, component: str, cache, window: int | None, dtype: torch.dtype) -> AttentionMask:
        k_positions = self.key_positions(component, cache)  # (S,) or (B, S)
        return AttentionMask.build(
            self.token_positions, k_positions, window, queries_see_themselves=self.pads is None, dtype=dtype
        )
