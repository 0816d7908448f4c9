"""Mamba-2 state space duality (SSD): pure-PyTorch reference ops.

This file is copied verbatim into every generated model package as ``ops/ssd.py``. It is the
numerical reference that the Triton kernels are tested against, so it is written for clarity and
stability first, imports nothing but ``torch`` and the standard library, and traces cleanly under
``torch.export`` (no Python branching on tensor values).

The SSD recurrence (Dao & Gu, 2024), per head, with a scalar decay and a (P, N) state::

    h_t = exp(dt_t A) · h_{t-1} + dt_t · x_t ⊗ B_t        h_t[p, n], h_{-1} = initial_state or 0
    y_t = h_t C_t + D · x_t                               (h_t C_t)[p] = Σ_n h_t[p, n] C_t[n]

Heads are grouped as in multi-value attention: H = G·R, and the R heads of group g share
B[..., g, :] and C[..., g, :] (head h reads group h // R, as in mamba_ssm).

Contents:
    ssd_scan     a whole sequence at once (training, prefill): chunked, no loop over time
    ssd_step     one position (decoding)
    mamba2_step  a Mamba-2 block's whole decoding step between its projections: conv, SiLU, Δ, ssd_step, z gate
    Mamba2Cache  the decode-time state of one layer

Shapes are written with B batch, T time, H heads, P head dim, G groups, R = H/G heads per group,
N state size, c chunks, L chunk length; the arguments named B, C, D are the SSM parameters.

Numerics: computed in float32 (float64 when the inputs are float64, so gradcheck works); y comes
back in x's dtype and the state always stays in float32 (float64). Every exponent is a sum of
dt·A ≤ 0 over a segment (a difference of float64 prefix sums, masked to -inf above the diagonal before
the exp), so nothing overflows or cancels for any magnitude of dt·A. The graph holds no scan op (cumsum):
prefix sums are matmuls with a triangular matrix, so inductor compiles the training step on every torch.
"""

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

# Mamba-2 packages always ship ssm.py too (its causal_conv1d runs over x, B and C), so the shared helpers live there.
from .ssm import _acc_dtype, _pad_time, _unpad_time, causal_conv1d


def ssd_scan(
    x: Tensor,
    dt: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    chunk_size: int,
    D: Tensor | None = None,
    initial_state: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """SSD over a whole sequence (training and prefill), by the chunked algorithm.

        h_t = exp(dt_t A) · h_{t-1} + dt_t · x_t ⊗ B_t,    y_t = h_t C_t + D · x_t

    Args:
        x: (B, T, H, P) input.
        dt: (B, T, H) step size, already positive (the caller applies softplus(dt + dt_bias)).
        A: (H,) decay rate per head, negative: pass -exp(A_log).
        B: (B, T, G, N) input projection of each group, H % G == 0.
        C: (B, T, G, N) output projection of each group.
        chunk_size: chunk length L; the result does not depend on it beyond rounding.
        D: (H,) skip connection, or None.
        initial_state: (B, H, P, N) state before the first position, or None for zeros.

    Returns:
        y: (B, T, H, P) in x.dtype.
        final_state: (B, H, P, N) h_{T-1}, float32 (float64 for float64 inputs).

    Algorithm. Split time into chunks of L positions. For t, s in one chunk let
    seg[t, s] = Σ_{s<i≤t} dt_i A (the log of the decay from s to t), and cum[t] = Σ_{i≤t} dt_i A
    (from the chunk start through t). Then, all chunks at once except step 3:
      1. Diagonal blocks, the outputs from inputs of the same chunk, in quadratic (attention) form:
             y_t = Σ_{s≤t} (C_t · B_s) exp(seg[t, s]) dt_s x_s
      2. Each chunk's final state from a zero start:    S_c = Σ_s exp(seg[L-1, s]) dt_s x_s ⊗ B_s
      3. State passing, h_c = exp(A_c) h_{c-1} + S_c with A_c = cum[L-1] of chunk c, solved in
         the same quadratic form one level up, over chunks instead of positions: with the initial
         state as chunk -1 (S_{-1} = h_{-1}),
             h_c = Σ_{c' ≤ c} exp(Σ_{c' < i ≤ c} A_i) S_{c'}        (one einsum, no loop)
         which costs (c+1)² per head and keeps the graph free of a loop whose count depends on T,
         so torch.export records one graph for every T.
      4. Off-diagonal blocks, the outputs from the state entering the chunk:
             y_t += exp(cum[t]) h_{c-1} C_t
    T need not be a multiple of L: the tail is padded with dt = 0 (decay 1, no input), which
    leaves the state unchanged, and the padded outputs are dropped. L is min(chunk_size, T) for a
    concrete T, and chunk_size itself for a symbolic one (the chunk length must not depend on T).
    """
    batch, seqlen, nheads, headdim = x.shape
    ngroups, dstate = B.shape[-2:]
    _check_scan_shapes(x, dt, A, B, C, D, initial_state)
    heads_per_group = nheads // ngroups
    acc = _acc_dtype(x, dt, A, B, C)

    chunk = min(chunk_size, seqlen) if isinstance(seqlen, int) else chunk_size
    nchunks = (seqlen + chunk - 1) // chunk

    def to_chunks(t: Tensor) -> Tensor:
        """(B, T, ...) -> (B, c, L, ...), zero-padded at the end of time, in the accumulation dtype."""
        return _pad_time(t.to(acc), nchunks * chunk).view(batch, nchunks, chunk, *t.shape[2:])

    # Heads are viewed as (G, R) so that B and C are shared, not copied, across a group's heads.
    xdt = to_chunks(x.to(acc) * dt.to(acc).unsqueeze(-1))  # (B, c, L, H, P)
    xdt = xdt.view(batch, nchunks, chunk, ngroups, heads_per_group, headdim)  # (B, c, L, G, R, P)
    B_c, C_c = to_chunks(B), to_chunks(C)  # (B, c, L, G, N)
    log_decay = to_chunks(dt) * A.to(acc)  # (B, c, L, H), dt·A ≤ 0
    log_decay = log_decay.permute(0, 1, 3, 2).reshape(batch, nchunks, ngroups, heads_per_group, chunk)
    prefix = _prefix_sum(log_decay)  # (B, c, G, R, L) float64, Σ_{i≤t} dt_i A within the chunk
    cum = prefix.to(acc)  # (B, c, G, R, L)
    decay = torch.exp(_segment_sum(prefix, acc))  # (B, c, G, R, L, L), [t, s] = decay from s to t, 0 for s > t

    # 1. Diagonal blocks.
    CB = torch.einsum("bclgn,bcsgn->bcgls", C_c, B_c)  # (B, c, G, L, L)
    y_diag = torch.einsum("bcgls,bcgrls,bcsgrp->bclgrp", CB, decay, xdt)  # (B, c, L, G, R, P)

    # 2. Chunk states from a zero start.
    decay_to_end = decay[..., -1, :]  # (B, c, G, R, L), exp(seg[L-1, s])
    chunk_states = torch.einsum("bcsgn,bcgrs,bcsgrp->bcgrpn", B_c, decay_to_end, xdt)  # (B, c, G, R, P, N)

    # 3. State passing, with the initial state as chunk -1.
    if initial_state is None:
        state = x.new_zeros(batch, ngroups, heads_per_group, headdim, dstate, dtype=acc)
    else:
        state = initial_state.to(acc).reshape(batch, ngroups, heads_per_group, headdim, dstate)
    states = torch.cat([state.unsqueeze(1), chunk_states], dim=1)  # (B, 1+c, G, R, P, N)
    chunk_log_decay = F.pad(cum[..., -1].permute(0, 2, 3, 1), (1, 0))  # (B, G, R, 1+c), A_c; chunk -1 gets 0
    chunk_decay = torch.exp(_segment_sum(_prefix_sum(chunk_log_decay), acc))  # (B, G, R, 1+c, 1+c), [c, c'] = decay from c' to c
    h_after = torch.einsum("bgrcd,bdgrpn->bcgrpn", chunk_decay, states)  # (B, 1+c, G, R, P, N) after chunk c-1
    h_enter, state = h_after[:, :-1], h_after[:, -1]  # (B, c, G, R, P, N) entering each chunk, (B, G, R, P, N) final

    # 4. Off-diagonal blocks.
    y_off = torch.einsum("bclgn,bcgrpn,bcgrl->bclgrp", C_c, h_enter, torch.exp(cum))  # (B, c, L, G, R, P)

    y = _unpad_time((y_diag + y_off).reshape(batch, nchunks * chunk, nheads, headdim), seqlen)  # (B, T, H, P)
    if D is not None:
        y = y + D.to(acc)[:, None] * x.to(acc)
    return y.to(x.dtype), state.reshape(batch, nheads, headdim, dstate)


def ssd_step(
    state: Tensor,
    x: Tensor,
    dt: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """One decoding step of `ssd_scan`: the same recurrence at a single position.

        h = exp(dt A) · state + dt · x ⊗ B,    y = h C + D · x

    Args:
        state: (B, H, P, N) the previous state h_{t-1}, float32.
        x: (B, H, P); dt: (B, H), already positive; A: (H,); B, C: (B, G, N); D: (H,) or None.

    Returns:
        y: (B, H, P) in x.dtype.
        new_state: (B, H, P, N) h_t, float32 (float64 for float64 inputs). `state` is left untouched;
            copy the result into the cache (``cache.ssm_state.copy_(new_state)``) to decode in place.
    """
    batch, nheads, headdim = x.shape
    ngroups = B.shape[1]
    if nheads % ngroups != 0:
        raise ValueError(f"the number of heads H = {nheads} must be a multiple of the number of groups G = {ngroups}")
    acc = _acc_dtype(x, dt, A, B, C)
    B_h = B.to(acc).repeat_interleave(nheads // ngroups, dim=1)  # (B, H, N), head h reads group h // R
    C_h = C.to(acc).repeat_interleave(nheads // ngroups, dim=1)  # (B, H, N)
    dt = dt.to(acc)

    decay = torch.exp(dt * A.to(acc))  # (B, H)
    xdt = x.to(acc) * dt.unsqueeze(-1)  # (B, H, P)
    new_state = decay[:, :, None, None] * state.to(acc) + xdt.unsqueeze(-1) * B_h.unsqueeze(2)  # (B, H, P, N)
    y = torch.einsum("bhpn,bhn->bhp", new_state, C_h)  # (B, H, P)
    if D is not None:
        y = y + D.to(acc)[:, None] * x.to(acc)
    return y.to(x.dtype), new_state


def mamba2_step(
    z: Tensor,
    xbc: Tensor,
    dt: Tensor,
    conv_state: Tensor,
    conv_weight: Tensor,
    conv_bias: Tensor | None,
    ssm_state: Tensor,
    A_log: Tensor,
    D: Tensor | None = None,
    dt_bias: Tensor | None = None,
    dt_min: float = 0.0,
    dt_max: float = math.inf,
    ngroups: int = 1,
) -> tuple[Tensor, Tensor, Tensor]:
    """One decoding step of a Mamba-2 block between its in- and out-projections (all but the gated norm):

        x, B, C = split(silu(causal_conv1d(xbc; conv_state)))      the conv at T = 1
        Δ = clamp(softplus(dt + dt_bias), dt_min, dt_max),  A = -exp(A_log)
        y, h = ssd_step(ssm_state, x, Δ, A, B, C, D),       y = y · silu(z)

    Args:
        z: (B, H·P) the gate; xbc: (B, H·P + 2·G·N) the conv's input (x, B, C concatenated); dt: (B, H) raw step
            sizes: this token's slices of the in-projection.
        conv_state: (B, H·P + 2·G·N, K-1); conv_weight: (H·P + 2·G·N, K); conv_bias: (H·P + 2·G·N,) or None.
        ssm_state: (B, H, P, N) float32; A_log, D, dt_bias: (H,) (D and dt_bias may be None).

    Returns:
        y: (B, H·P) in xbc.dtype; new_conv_state like conv_state; new_ssm_state (B, H, P, N) float32. The states
        passed in are left untouched: copy the new ones into the cache. The Triton kernel of the same name
        (kernels/state_update.py) computes this in one launch.
    """
    batch, nheads, headdim, dstate = ssm_state.shape
    d_inner = nheads * headdim
    conv, new_conv_state = causal_conv1d(xbc.unsqueeze(1), conv_weight, conv_bias, conv_state)  # (B, 1, channels)
    x, B, C = F.silu(conv[:, 0]).split([d_inner, ngroups * dstate, ngroups * dstate], dim=-1)
    acc = _acc_dtype(xbc, dt)
    step = dt.to(acc) + dt_bias if dt_bias is not None else dt.to(acc)
    step = F.softplus(step).clamp(dt_min, dt_max)  # (B, H)
    y, new_ssm_state = ssd_step(ssm_state, x.reshape(batch, nheads, headdim), step, -torch.exp(A_log.to(acc)),
                                B.reshape(batch, ngroups, dstate), C.reshape(batch, ngroups, dstate), D)
    return y.reshape(batch, d_inner) * F.silu(z), new_conv_state, new_ssm_state


@dataclass
class Mamba2Cache:
    """Decode-time state of one Mamba-2 layer.

    conv_state: (B, H·P + 2·G·N, K-1) the last K-1 inputs of the causal conv, which runs over the
        channels of x, B and C concatenated in that order; in the model dtype.
    ssm_state: (B, H, P, N) the SSD state h, float32.
    """

    conv_state: Tensor
    ssm_state: Tensor

    @classmethod
    def empty(
        cls,
        batch: int,
        nheads: int,
        headdim: int,
        ngroups: int,
        d_state: int,
        d_conv: int,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> "Mamba2Cache":
        """The state at the start of a sequence (all zeros). d_conv is the conv width K."""
        conv_channels = nheads * headdim + 2 * ngroups * d_state
        return cls(
            conv_state=torch.zeros(batch, conv_channels, d_conv - 1, device=device, dtype=dtype),
            ssm_state=torch.zeros(
                batch, nheads, headdim, d_state, device=device, dtype=torch.promote_types(dtype, torch.float32)
            ),
        )


def _prefix_sum(a: Tensor) -> Tensor:
    """prefix[..., t] = Σ_{i≤t} a[..., i], in float64.

    A masked sum rather than torch.cumsum: a cumulative sum is a scan, which inductor may split across thread blocks
    when there are few rows (on torch 2.11 that split crashed compiling the training step), while a broadcast
    product and a reduction compile everywhere (torch.compile, torch.export, ONNX). Not a matmul with the triangle:
    over the dynamic number of chunks, matmul's folding guards on that size (torch.export then refuses a dynamic
    sequence length). Float64, so that the difference of two prefix sums keeps every float32 digit of a short
    segment (see _segment_sum).

    Args:
        a: (..., L).

    Returns:
        (..., L) float64.
    """
    length = a.shape[-1]
    at_or_before = torch.ones(length, length, dtype=torch.float64, device=a.device).tril()  # [t, i]: i ≤ t
    return (a.to(torch.float64).unsqueeze(-2) * at_or_before).sum(-1)


def _segment_sum(prefix: Tensor, dtype: torch.dtype) -> Tensor:
    """seg[..., t, s] = Σ_{s<i≤t} a[..., i] for s ≤ t, and -inf for s > t, from prefix = _prefix_sum(a).

    exp(seg) is the lower-triangular decay matrix: 1 on the diagonal, Π_{s<i≤t} exp(a_i) below it,
    exactly 0 above. The sums are differences prefix[t] - prefix[s] taken in float64: with large |a|
    (dt·A ≈ -80 a step) the prefix sums reach thousands, and in float32 their difference would lose
    the digits of the short segments; float64 keeps about 1e-12 of absolute error there, far below
    float32's resolution. Masking with -inf before the exp keeps every exponent ≤ 0 and the backward
    pass free of inf·0.

    Args:
        prefix: (..., L) float64.
        dtype: the dtype of the result.

    Returns:
        (..., L, L) in dtype.
    """
    length = prefix.shape[-1]
    seg = (prefix.unsqueeze(-1) - prefix.unsqueeze(-2)).to(dtype)  # [..., t, s] = Σ_{s<i≤t} a_i for s ≤ t
    at_or_below_diagonal = torch.tril(torch.ones(length, length, dtype=torch.bool, device=prefix.device))
    return seg.masked_fill(~at_or_below_diagonal, -torch.inf)


def _check_scan_shapes(
    x: Tensor,
    dt: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Tensor | None,
    initial_state: Tensor | None,
) -> None:
    batch, seqlen, nheads, headdim = x.shape
    ngroups, dstate = B.shape[-2:]
    if nheads % ngroups != 0:
        raise ValueError(f"the number of heads H = {nheads} must be a multiple of the number of groups G = {ngroups}")
    expected = {
        "dt": (dt, (batch, seqlen, nheads)),
        "A": (A, (nheads,)),
        "B": (B, (batch, seqlen, ngroups, dstate)),
        "C": (C, (batch, seqlen, ngroups, dstate)),
        "D": (D, (nheads,)),
        "initial_state": (initial_state, (batch, nheads, headdim, dstate)),
    }
    for name, (t, shape) in expected.items():
        if t is not None and t.shape != shape:
            raise ValueError(
                f"{name} must have shape {shape} for x of shape (B, T, H, P) = {(batch, seqlen, nheads, headdim)} "
                f"and B of shape (B, T, G, N), got {tuple(t.shape)}"
            )
