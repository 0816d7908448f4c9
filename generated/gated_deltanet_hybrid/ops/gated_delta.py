"""Gated DeltaNet (the gated delta rule): pure-PyTorch reference ops.

This file is copied verbatim into every generated package with a Gated DeltaNet mixer as
``ops/gated_delta.py``. It is the numerical reference a Triton kernel will be tested against, so
it is written for clarity and stability first, imports nothing but ``torch`` and the standard
library, and traces cleanly under ``torch.export`` with a symbolic sequence length (no Python loop
whose count depends on T, no branching on tensor values).

The gated delta rule (Yang, Kautz & Hatamizadeh, "Gated Delta Networks", ICLR 2025), per value
head, with a (K, V) state S, a scalar gate α_t = exp(g_t) ∈ (0, 1] and a write strength β_t::

    S_t = α_t (I − β_t k_t k_tᵀ) S_{t-1} + β_t k_t v_tᵀ        S_{-1} = initial_state, or 0
    o_t = scale · S_tᵀ q_t                                       o_t[v] = scale Σ_k q_t[k] S_t[k, v]

It decays the memory (Mamba-2's gate), then replaces the value stored under key k_t by v_t to the
extent β_t (DeltaNet's rule): S_t = α_t S_{t-1} + β_t k_t (v_t − α_t S_{t-1}ᵀ k_t)ᵀ. The state layout
(K, V) and the head mapping are those of flash-linear-attention's ``chunk_gated_delta_rule``, so
states pass between the two unchanged.

The layer around it (flash-linear-attention's GatedDeltaNet layer and Qwen3-Next; the model
template applies these, the op takes their results):
    q, k, v = silu(causal depthwise conv(x W_q / W_k / W_v))      short conv, width ~4, no bias
    q, k    = l2_normalize(q), l2_normalize(k)                     per head, so ‖k‖ = 1 and β ≤ 1
                                                                   keep I − β k kᵀ a contraction
    g       = −exp(A_log) · softplus(x W_a + dt_bias)              log α_t ≤ 0, per value head
    β       = sigmoid(x W_b)                                       per value head
    out     = (RMSNorm(o) · w ⊙ silu(x W_g)) W_o                   gated RMSNorm over each head's V
scale is 1/√K. Heads may be grouped as in grouped-value attention: q and k have H heads, v, g and
β have HV = H·R heads, and value head h reads key head h // R (as flash-linear-attention does).

Contents:
    l2_normalize          x / √(Σx² + eps) over the last dim (the layer's q/k normalisation)
    gated_delta_rule      a whole sequence at once (training, prefill): chunked, no loop over time
    gated_delta_step      one position (decoding)
    GatedDeltaCache       the decode-time state of one layer

Shapes are written with B batch, T time, H key heads, HV value heads, K key head dim, V value head
dim, c chunks, L chunk length.

Numerics: computed in float32 (float64 when an input is float64, so gradcheck works); o comes back
in v's dtype and the state always stays in float32 (float64). Every exponent is a sum of g ≤ 0
over a segment, summed directly rather than as a difference of prefix sums, so nothing overflows
or cancels for any gate, and the only inverse (of a unit lower-triangular matrix) is computed by
exact block doubling, never by a power series.
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from .ssm import _acc_dtype, _doubling_rounds, _pad_time, _unpad_time

CHUNK_SIZE = 64
"""Default chunk length L of `gated_delta_rule` (flash-linear-attention uses 64 too). Any value
gives the same result up to rounding: it trades the (L, L) intra-chunk matrices against the number
of chunks, whose (K, K) transition matrices the state passing multiplies."""

L2_NORM_EPS = 1e-6
"""eps of `l2_normalize`, as in flash-linear-attention's fused q/k normalisation."""


def l2_normalize(x: Tensor, eps: float = L2_NORM_EPS) -> Tensor:
    """x / √(Σ x² + eps) over the last dim, computed in float32 (float64), returned in x's dtype."""
    acc = _acc_dtype(x)
    x_acc = x.to(acc)
    return (x_acc * torch.rsqrt(x_acc.square().sum(-1, keepdim=True) + eps)).to(x.dtype)


def gated_delta_rule(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    g: Tensor,
    beta: Tensor,
    scale: float | None = None,
    initial_state: Tensor | None = None,
    chunk_size: int = CHUNK_SIZE,
    max_seqlen: int | None = None,
) -> tuple[Tensor, Tensor]:
    """The gated delta rule over a whole sequence (training and prefill), by the chunked WY algorithm.

        S_t = exp(g_t) (I − β_t k_t k_tᵀ) S_{t-1} + β_t k_t v_tᵀ,    o_t = scale · S_tᵀ q_t

    Args:
        q: (B, T, H, K) queries, L2-normalised by the caller.
        k: (B, T, H, K) keys, L2-normalised by the caller.
        v: (B, T, HV, V) values, HV a multiple of H.
        g: (B, T, HV) log of the gate α, ≤ 0: pass −exp(A_log) · softplus(a + dt_bias).
        beta: (B, T, HV) write strength, in [0, 1]: pass sigmoid(b).
        scale: multiplies the queries; None means 1/√K.
        initial_state: (B, HV, K, V) state before the first position, or None for zeros.
        chunk_size: chunk length L; the result does not depend on it beyond rounding.
        max_seqlen: an upper bound on T, used only when T is symbolic (torch.export with a dynamic
            sequence length): it fixes the number of doubling rounds across chunks, so one graph
            serves every T up to the bound. A concrete T uses exactly the rounds it needs.

    Returns:
        o: (B, T, HV, V) in v.dtype.
        final_state: (B, HV, K, V) S_{T-1}, float32 (float64 for float64 inputs).

    Algorithm. Write the step as S_t = α_t S_{t-1} + k_t u_tᵀ with the pseudo-value
    u_t = β_t (v_t − α_t S_{t-1}ᵀ k_t). In a chunk of L positions entering with state S₀, let
    γ_t = Π_{i≤t} α_i (decay from the chunk start through t) and D[t, s] = Π_{s<i≤t} α_i for s ≤ t.
    Then α_t S_{t-1} = γ_t S₀ + Σ_{s<t} D[t, s] k_s u_sᵀ, so the u_t solve a unit lower-triangular
    system (the UT transform of the WY representation):
        (I + A) u = β ⊙ v − (βγ ⊙ k) S₀,      A[t, s] = β_t D[t, s] (k_t · k_s) for s < t
    With T⁻¹ = (I + A)⁻¹, U = T⁻¹ (β ⊙ v) and W = T⁻¹ (βγ ⊙ k), u = U − W S₀, and
      1. outputs, with P[t, s] = D[t, s] (q_t · k_s) for s ≤ t:
             o = P U + (γ ⊙ q − P W) S₀                     (the first term from a zero state)
      2. the state after the chunk, an affine map of the state entering it:
             S_L = M S₀ + B,   M = γ_L I − K̃ᵀ W,   B = K̃ᵀ U,   K̃[s] = D[L-1, s] k_s
      3. state passing across chunks: the affine maps (M, B) compose associatively, so a
         log-depth Hillis–Steele scan over the chunk axis, with the initial state as step zero
         (M = 0, B = S_{-1}), gives the state entering every chunk. Its number of rounds is fixed
         by a bound on the number of chunks, never by a Python loop over them, so the graph that
         torch.export records holds for every T up to max_seqlen.
    All chunks are processed at once in 1 and 2. T⁻¹ is computed by block doubling (see
    `_unit_lower_inverse`), log2(L) rounds of matmuls, which ONNX exports (it has no triangular
    solve) and which is as stable as forward substitution. T need not be a multiple of L: the tail
    is padded with identity steps (g = 0, β = 0), which leave the state unchanged, and the padded
    outputs are dropped. L is min(chunk_size, T) for a concrete T, and chunk_size itself for a
    symbolic one.
    """
    batch, seqlen, _, dk = q.shape
    nv_heads, dv = v.shape[-2:]
    _check_shapes(q, k, v, g, beta, initial_state)
    acc = _acc_dtype(q, k, v, g, beta)
    scale = dk**-0.5 if scale is None else scale

    chunk = min(chunk_size, seqlen) if isinstance(seqlen, int) else chunk_size
    nchunks = (seqlen + chunk - 1) // chunk

    def to_chunks(t: Tensor) -> Tensor:
        """(B, T, HV, ...) -> (B, HV, c, L, ...), zero-padded at the end of time, in the accumulation dtype."""
        t = _pad_time(t.to(acc), nchunks * chunk)
        return t.view(batch, nchunks, chunk, *t.shape[2:]).movedim(3, 1)

    q_c = to_chunks(_per_value_head(q, nv_heads)) * scale  # (B, HV, c, L, K)
    k_c = to_chunks(_per_value_head(k, nv_heads))  # (B, HV, c, L, K)
    v_c = to_chunks(v)  # (B, HV, c, L, V)
    g_c, beta_c = to_chunks(g), to_chunks(beta)  # (B, HV, c, L) each; padding: g = 0, β = 0

    prefix = _prefix_sum(g_c)  # (B, HV, c, L) float64, Σ_{i≤t} g_i within the chunk
    gamma = torch.exp(prefix.to(acc))  # (B, HV, c, L), γ_t
    decay = torch.exp(_segment_sum(prefix, acc))  # (B, HV, c, L, L), D[t, s]; 0 for s > t
    strictly_lower = torch.tril(torch.ones(chunk, chunk, dtype=torch.bool, device=q.device), diagonal=-1)

    # The UT transform: T⁻¹ = (I + A)⁻¹, then U and W.
    A = (beta_c.unsqueeze(-1) * decay * (k_c @ k_c.mT)).masked_fill(~strictly_lower, 0.0)  # (B, HV, c, L, L)
    T_inv = _unit_lower_inverse(A)  # (B, HV, c, L, L)
    U = T_inv @ (beta_c.unsqueeze(-1) * v_c)  # (B, HV, c, L, V)
    W = T_inv @ ((beta_c * gamma).unsqueeze(-1) * k_c)  # (B, HV, c, L, K)

    # 1. Outputs from a zero entering state, and the queries that read the entering state.
    P = (q_c @ k_c.mT) * decay  # (B, HV, c, L, L), lower triangular with its diagonal
    o_zero = P @ U  # (B, HV, c, L, V)
    q_state = gamma.unsqueeze(-1) * q_c - P @ W  # (B, HV, c, L, K)

    # 2. Each chunk's affine map S ↦ M S + B, with M stored as M − I so that zero padding is the identity map.
    k_tail = decay[..., -1, :].unsqueeze(-1) * k_c  # (B, HV, c, L, K), K̃
    eye = torch.eye(dk, dtype=acc, device=q.device)
    M_minus_I = torch.expm1(g_c.sum(-1))[..., None, None] * eye - k_tail.mT @ W  # (B, HV, c, K, K), γ_L − 1 exactly
    B_c = k_tail.mT @ U  # (B, HV, c, K, V)

    # 3. State passing, with the initial state as the step before chunk 0 (M = 0 forgets, B sets the state).
    if initial_state is None:
        state = q.new_zeros(batch, nv_heads, dk, dv, dtype=acc)
    else:
        state = initial_state.to(acc)
    steps_M = torch.cat([(-eye).expand(batch, nv_heads, 1, dk, dk), M_minus_I], dim=2)  # (B, HV, 1+c, K, K)
    steps_B = torch.cat([state.unsqueeze(2), B_c], dim=2)  # (B, HV, 1+c, K, V)
    s_after = _chained_affine_scan(steps_M, steps_B, rounds=_doubling_rounds(seqlen, chunk, max_seqlen, "gated_delta_rule"))
    # A gather, not a slice: a matmul reshapes its operand, which on a sliced view makes torch.export guard c != 1.
    s_enter = s_after.index_select(2, torch.arange(nchunks, device=q.device))  # (B, HV, c, K, V) entering each chunk
    state = s_after[:, :, -1]  # (B, HV, K, V) after the last

    o = o_zero + q_state @ s_enter  # (B, HV, c, L, V)
    o = _unpad_time(o.movedim(1, 3).reshape(batch, nchunks * chunk, nv_heads, dv), seqlen)  # (B, T, HV, V)
    return o.to(v.dtype), state


def gated_delta_step(
    state: Tensor,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    g: Tensor,
    beta: Tensor,
    scale: float | None = None,
) -> tuple[Tensor, Tensor]:
    """One decoding step of `gated_delta_rule`: the recurrence at a single position.

        S = exp(g) S_prev + β k (v − exp(g) S_prevᵀ k)ᵀ,    o = scale · Sᵀ q

    Args:
        state: (B, HV, K, V) the previous state S_{t-1}, float32.
        q, k: (B, H, K), L2-normalised; v: (B, HV, V); g, beta: (B, HV); scale: None means 1/√K.

    Returns:
        o: (B, HV, V) in v.dtype.
        new_state: (B, HV, K, V) S_t, float32 (float64 for float64 inputs). `state` is left untouched;
            copy the result into the cache (``cache.recurrent_state.copy_(new_state)``) to decode in place.
    """
    nv_heads, dk = v.shape[1], q.shape[-1]
    if nv_heads % q.shape[1] != 0:
        raise ValueError(f"the value heads HV = {nv_heads} must be a multiple of the key heads H = {q.shape[1]}")
    acc = _acc_dtype(q, k, v, g, beta)
    scale = dk**-0.5 if scale is None else scale
    q, k = (t.to(acc).repeat_interleave(nv_heads // t.shape[1], dim=1) for t in (q, k))  # (B, HV, K)
    decayed = torch.exp(g.to(acc))[..., None, None] * state.to(acc)  # (B, HV, K, V), α S_prev
    # Elementwise products and sums rather than einsum: no reshape to pin B under torch.export.
    u = beta.to(acc).unsqueeze(-1) * (v.to(acc) - (decayed * k.unsqueeze(-1)).sum(-2))  # (B, HV, V)
    new_state = decayed + k.unsqueeze(-1) * u.unsqueeze(-2)  # (B, HV, K, V)
    o = scale * (new_state * q.unsqueeze(-1)).sum(-2)  # (B, HV, V)
    return o.to(v.dtype), new_state


@dataclass
class GatedDeltaCache:
    """Decode-time state of one Gated DeltaNet layer.

    conv_state: (B, 2·H·K + HV·V, Kc-1) the last Kc-1 inputs of the short causal conv, which runs over
        the channels of q, k and v concatenated in that order; in the model dtype.
    recurrent_state: (B, HV, K, V) the state S, float32.
    """

    conv_state: Tensor
    recurrent_state: Tensor

    @classmethod
    def empty(
        cls,
        batch: int,
        nheads: int,
        nv_heads: int,
        head_k_dim: int,
        head_v_dim: int,
        d_conv: int,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> "GatedDeltaCache":
        """The state at the start of a sequence (all zeros). d_conv is the conv width Kc."""
        conv_channels = 2 * nheads * head_k_dim + nv_heads * head_v_dim
        return cls(
            conv_state=torch.zeros(batch, conv_channels, d_conv - 1, device=device, dtype=dtype),
            recurrent_state=torch.zeros(
                batch, nv_heads, head_k_dim, head_v_dim, device=device, dtype=torch.promote_types(dtype, torch.float32)
            ),
        )


def _unit_lower_inverse(A: Tensor) -> Tensor:
    """(I + A)⁻¹ for A (..., L, L) strictly lower triangular, by block doubling.

    Keep X, the inverse of the block diagonal of I + A in blocks of size b (at b = 1, X = I). Within
    each block of size 2b, I + A = diag(X₁⁻¹, X₂⁻¹) + E with E the lower-left b×b quarter, and
    (XE)² = 0, so the inverse is exactly X − X E X. log2(L) rounds of two matmuls over all blocks at
    once (as (L, L) matmuls with E masked; the masks depend only on L) reach b ≥ L. Unlike the
    Neumann series Σ(−A)ⁿ or its product form, no intermediate is larger than the inverse itself:
    each round is a block step of forward substitution.
    """
    length = A.shape[-1]
    index = torch.arange(length, device=A.device)
    # X = I at A's shape: an eye that broadcasts inside a matmul makes torch.export guard the number of chunks.
    inverse = torch.eye(length, dtype=A.dtype, device=A.device) + torch.zeros_like(A)
    block = 1
    while block < length:  # log2(L) rounds, L a constant of the graph
        same_pair = (index[:, None] // (2 * block)) == (index[None, :] // (2 * block))
        other_half = (index[:, None] // block) != (index[None, :] // block)
        lower_left = A.masked_fill(~(same_pair & other_half), 0.0)  # (..., L, L), E
        inverse = inverse - inverse @ lower_left @ inverse
        block *= 2
    return inverse


def _chained_affine_scan(M_minus_I: Tensor, B: Tensor, rounds: int) -> Tensor:
    """Inclusive scan of S_c = M_c S_{c-1} + B_c along dim 2, S_{-1} = 0, for matrices M_c.

    A step is the affine map S ↦ M S + B, and steps compose associatively:

        (M₂, B₂) ∘ (M₁, B₁) = (M₂ M₁,  M₂ B₁ + B₂)                   (step 1, then step 2)

    kept as N = M − I:  N = N₂ + N₁ + N₂ N₁,  B = B₂ + B₁ + N₂ B₁, so that the zero step is the identity
    map. Hillis–Steele: after the round with stride s, position c holds the composition of the steps in
    (c - 2s, c], clipped at the start. The shift by the stride is a zero pad and a cut back to the
    length, so any stride is valid and a round reaching past the start changes nothing: `rounds` need
    only be at least ceil(log2(length)), and the length may be symbolic.

    Args:
        M_minus_I: (B, HV, n, K, K).
        B: (B, HV, n, K, V).
        rounds: the number of doubling rounds.

    Returns:
        (B, HV, n, K, V): S_c for every step c.
    """
    length = B.shape[2]
    for r in range(rounds):
        stride = 2**r
        prev_M = F.pad(M_minus_I, (0, 0, 0, 0, stride, 0)).narrow(2, 0, length)  # step c - stride
        prev_B = F.pad(B, (0, 0, 0, 0, stride, 0)).narrow(2, 0, length)
        B = B + prev_B + M_minus_I @ prev_B
        M_minus_I = M_minus_I + prev_M + M_minus_I @ prev_M
    return B



def _prefix_sum(a: Tensor) -> Tensor:
    """prefix[..., t] = Σ_{i≤t} a[..., i], in float64, as a matmul with the upper-triangular ones matrix.

    Not torch.cumsum: inductor may split a scan over few rows across thread blocks, which crashed compiling on
    torch 2.11; a matmul compiles everywhere. Float64, so that differences of prefix sums keep a short segment's
    float32 digits (_segment_sum). The same helper as ops/ssd.py's, which a Gated DeltaNet package does not ship.
    """
    length = a.shape[-1]
    at_or_before = torch.ones(length, length, dtype=torch.float64, device=a.device).triu()  # [i, t]: i ≤ t
    return a.to(torch.float64) @ at_or_before


def _segment_sum(prefix: Tensor, dtype: torch.dtype) -> Tensor:
    """seg[..., t, s] = Σ_{s<i≤t} a[..., i] for s ≤ t, and -inf for s > t, from prefix = _prefix_sum(a), in dtype.

    exp(seg) is the lower-triangular decay matrix: 1 on the diagonal, Π_{s<i≤t} exp(a_i) below it,
    exactly 0 above. Differences of float64 prefix sums lose nothing a float32 result keeps, however large
    the prefix sums grow. Masking with -inf before the exp keeps every exponent ≤ 0 and the backward pass
    free of inf·0.
    """
    length = prefix.shape[-1]
    seg = (prefix.unsqueeze(-1) - prefix.unsqueeze(-2)).to(dtype)  # [..., t, s] = Σ_{s<i≤t} a_i for s ≤ t
    at_or_below_diagonal = torch.tril(torch.ones(length, length, dtype=torch.bool, device=prefix.device))
    return seg.masked_fill(~at_or_below_diagonal, -torch.inf)


def _per_value_head(x: Tensor, nv_heads: int) -> Tensor:
    """(B, T, H, K) -> (B, T, HV, K): value head h reads key head h // (HV / H)."""
    return x.repeat_interleave(nv_heads // x.shape[2], dim=2)





def _check_shapes(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    g: Tensor,
    beta: Tensor,
    initial_state: Tensor | None,
) -> None:
    batch, seqlen, nheads, dk = q.shape
    nv_heads, dv = v.shape[-2:]
    if v.dim() != 4 or nv_heads % nheads != 0:
        raise ValueError(
            f"v must be (B, T, HV, V) with HV a multiple of the H = {nheads} heads of q, got {tuple(v.shape)}"
        )
    expected = {
        "k": (k, (batch, seqlen, nheads, dk)),
        "v": (v, (batch, seqlen, nv_heads, dv)),
        "g": (g, (batch, seqlen, nv_heads)),
        "beta": (beta, (batch, seqlen, nv_heads)),
        "initial_state": (initial_state, (batch, nv_heads, dk, dv)),
    }
    for name, (t, shape) in expected.items():
        if t is not None and t.shape != shape:
            raise ValueError(
                f"{name} must have shape {shape} for q of shape (B, T, H, K) = {(batch, seqlen, nheads, dk)} "
                f"and v of shape (B, T, HV, V), got {tuple(t.shape)}"
            )
