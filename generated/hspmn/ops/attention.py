"""
Attention reference ops: rotary embeddings, qk-norm, a preallocated KV cache and masked grouped-query attention.

This file is copied verbatim into every generated package as `ops/attention.py` and imports only torch and the
standard library. It is the definition the Triton kernels are tested against, and the path a model runs (and
exports) on when no kernel is available, so it favours plain, obviously-correct tensor code.

Notable features:
- RoPE with rotate-half pairing (Llama / HF layout), partial rotary, and linear, NTK-aware and YaRN scaling
- one attention code path for training, prefill, chunked prefill, cached decode and sliding windows: the mask
  is built from absolute positions, never from "which phase are we in"
- grouped-query attention: n_kv_heads divides n_heads (MQA and MHA are the two ends)
- a static KV cache written in place at a start offset that may be a tensor: no reallocation and no
  data-dependent Python branches, so decode can be captured by CUDA graphs and traced by torch.export
- a query that can see no key returns zeros, never NaN

Shape letters: B batch, Hq query heads, Hkv key/value heads, T / Tq / Tk sequence lengths, D head_dim,
R rotary_dim (even, R <= D), L max_len of a cache.
"""

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

ROPE_SCALINGS = ("none", "linear", "ntk", "yarn")

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

    Returns (inv_freq (R/2,) float32 on the CPU, mscale). mscale = 0.1 * ln(factor) + 1 for YaRN with factor > 1,
    else 1.0. Pass it to rope_cos_sin: it scales cos and sin, hence both q and k, so the attention logits of the
    rotated dims grow by mscale**2 (the paper's 1/t). Computed in float64 and rounded once to float32.
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
        if factor > 1:
            mscale = 0.1 * math.log(factor) + 1.0
    return inv_freq.float(), mscale


def rope_cos_sin(inv_freq: Tensor, positions: Tensor, mscale: float = 1.0) -> tuple[Tensor, Tensor]:
    """
    cos and sin of the rotation angles positions * inv_freq, times mscale (see rope_inv_freq), in float32.
    positions (T,) or (B, T), integer (or float, for interpolated positions); returns cos, sin each (T, R/2) or
    (B, T, R/2) on positions.device. Angles are float32 products, as in HF transformers.
    """
    inv_freq = inv_freq.to(device=positions.device, dtype=torch.float32)
    angles = positions.to(torch.float32).unsqueeze(-1) * inv_freq  # (..., T, R/2)
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


@dataclass
class KVCache:
    """
    One attention layer's keys and values, preallocated for L positions; slot t holds position t.

    The buffers are written in place and never reallocated, so their addresses are stable (CUDA graphs) and they
    stay plain tensors (torch.export). Decode writes T new tokens at `start` = the current length and attends over
    the whole buffer with k_positions = arange(L) and k_valid_len = start + T, which masks the unwritten tail.
    A sliding-window layer keeps it simple too: a full-length buffer masked by the window. A ring buffer of
    `window` slots would save memory and is a later optimisation.
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
        return cls(k=torch.zeros(shape, device=device, dtype=dtype), v=torch.zeros(shape, device=device, dtype=dtype))

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
        if isinstance(start, int) and not 0 <= start <= self.max_len - T:
            raise ValueError(f"cannot write {T} tokens at start={start} into a cache of max_len={self.max_len}")
        slots = torch.arange(T, device=self.k.device) + start  # (T,)
        self.k.index_copy_(2, slots, k_new.to(self.k.dtype))
        self.v.index_copy_(2, slots, v_new.to(self.v.dtype))
        return self.k, self.v


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
    Tq, Tk = q_positions.size(-1), k_positions.size(-1)
    qp = q_positions.unsqueeze(-1)  # (..., Tq, 1)
    kp = k_positions.to(q_positions.device).unsqueeze(-2)  # (..., 1, Tk)
    visible = kp <= qp  # (..., Tq, Tk)
    if window is not None:
        visible = visible & (qp - kp < window)
    if k_valid_len is not None:
        valid_len = torch.as_tensor(k_valid_len, device=q_positions.device).reshape(-1, 1, 1)  # (1 or B, 1, 1)
        visible = visible & (torch.arange(Tk, device=q_positions.device) < valid_len)  # (1 or B, Tq, Tk)
    return visible.reshape(-1, 1, Tq, Tk)  # (1 or B, 1, Tq, Tk)


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
) -> Tensor:
    """
    Grouped-query causal attention with the mask built from absolute positions (see attention_mask):
        y[b, h, i] = sum_j softmax_j(scale * q[b, h, i] . k[b, h // G, j]  over visible j) * v[b, h // G, j]
    with G = Hq / Hkv and scale defaulting to 1 / sqrt(D). A query with no visible key gets y = 0.
    q (B, Hq, Tq, D); k (B, Hkv, Tk, D); v (B, Hkv, Tk, Dv); positions (Tq,) / (Tk,) or (B, Tq) / (B, Tk).
    Returns (B, Hq, Tq, Dv) in q.dtype; F.scaled_dot_product_attention accumulates in float32.
    """
    B, Hq, Tq, D = q.shape
    Hkv, Tk = k.size(1), k.size(2)
    if Hq % Hkv != 0:
        raise ValueError(f"n_heads ({Hq}) must be a multiple of n_kv_heads ({Hkv})")
    if q_positions.size(-1) != Tq or k_positions.size(-1) != Tk:
        raise ValueError(
            f"positions must match the sequence lengths: q_positions {tuple(q_positions.shape)} for Tq={Tq}, "
            f"k_positions {tuple(k_positions.shape)} for Tk={Tk}"
        )

    visible = attention_mask(q_positions, k_positions, window, k_valid_len)  # (1 or B, 1, Tq, Tk)
    # A row with no visible key would be a softmax over nothing (NaN). Let it see every key instead, then zero
    # its output, so the result is finite and its gradients are zero.
    sees_any = visible.any(dim=-1, keepdim=True)  # (1 or B, 1, Tq, 1)
    visible = visible | ~sees_any

    if Hkv != Hq:
        k = k.repeat_interleave(Hq // Hkv, dim=1)  # (B, Hq, Tk, D): query head h reads kv head h // G
        v = v.repeat_interleave(Hq // Hkv, dim=1)  # (B, Hq, Tk, Dv)
    # The mask gets an explicit batch dim: SDPA's broadcast check of a batch-1 mask would pin B under torch.export.
    y = F.scaled_dot_product_attention(q, k, v, attn_mask=visible.expand(B, 1, Tq, Tk), scale=scale)  # (B, Hq, Tq, Dv)
    return torch.where(sees_any, y, 0.0)  # where, not masked_fill: it keeps SDPA's output layout, so (B, T, Hq·Dv) stays a view
