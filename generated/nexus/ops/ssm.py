"""Selective state space model (Mamba-1): pure-PyTorch reference ops.

This file is copied verbatim into every generated model package as ``ops/ssm.py``. It is the
numerical reference that the Triton kernels are tested against, so it is written for clarity and
stability first, imports nothing but ``torch`` and the standard library, and traces cleanly under
``torch.export`` (no Python branching on tensor values).

The selective SSM (Gu & Dao, 2023), for every channel d and state index n::

    Δ_t  = softplus(delta_t + delta_bias)               (delta_t + delta_bias if not delta_softplus)
    h_t  = exp(Δ_t A) ⊙ h_{t-1}  +  (Δ_t u_t) ⊗ B_t     h_t[d, n], h_{-1} = initial_state or 0
    y_t  = h_t C_t  +  D ⊙ u_t                          (h_t C_t)[d] = Σ_n h_t[d, n] C_t[n]
    y_t  = y_t ⊙ silu(z_t)                              if a gate z is given

Contents:
    causal_conv1d         depthwise causal conv over time that streams through a (K-1)-input state
    causal_conv1d_update_ one decoding step of it, the state updated in place
    selective_scan        a whole sequence at once (training, prefill): chunked, no loop over time
    selective_state_step  one position (decoding)
    MambaCache            the decode-time state of one layer

Layout is channels-last throughout. Shapes are written with B batch, T time, D channels
(d_inner), N state size, K conv width, c chunks, L chunk length; the arguments named B, C, D
are the SSM parameters, which context makes clear.

Numerics: the recurrence runs in float32 (float64 when the inputs are float64, so gradcheck
works); y comes back in the input's dtype and the SSM state always stays in float32 (float64).
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

CHUNK_SIZE = 64
"""Default chunk length L of `selective_scan`. Within a chunk the scan is log2(L) parallel steps
over (B, c, L, D, N) tensors; across chunks it is log2(c) parallel steps over (B, c, D, N). Any
value gives the same result up to rounding: it trades the memory of the in-chunk scan against the
number of chunks."""


def causal_conv1d(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None = None,
    conv_state: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Depthwise causal convolution over time, streaming through a state of the last K-1 inputs.

        x̃ = concat(conv_state, x) along time                          (B, K-1+T, D)
        y[b, t, d] = bias[d] + Σ_{k<K} weight[d, k] · x̃[b, t + k, d]

    so weight[:, -1] multiplies the current input and weight[:, 0] the one K-1 steps back: the
    orientation of torch.nn.Conv1d(D, D, K, groups=D, padding=K-1) truncated to the first T
    outputs, as in Mamba.

    Args:
        x: (B, T, D) inputs.
        weight: (D, K) per-channel taps.
        bias: (D,) or None.
        conv_state: (B, D, K-1) the K-1 inputs just before x, oldest first; None means zeros
            (the start of a sequence).

    Returns:
        y: (B, T, D) in x.dtype, before any activation.
        new_conv_state: (B, D, K-1) in x.dtype: the last K-1 columns of x̃, to pass with the next
            piece of the sequence. Convolving a sequence piece by piece while threading the state
            gives the same y as one call over the whole sequence (T = 1 is a decoding step).
    """
    batch, seqlen, dim = x.shape
    width = weight.shape[-1]
    if weight.shape != (dim, width):
        raise ValueError(f"weight must be (D, K) with D = {dim} channels of x, got {tuple(weight.shape)}")
    if conv_state is None:
        conv_state = x.new_zeros(batch, dim, width - 1)
    elif conv_state.shape != (batch, dim, width - 1):
        raise ValueError(
            f"conv_state must be (B, D, K-1) = {(batch, dim, width - 1)} for x of shape {tuple(x.shape)} "
            f"and kernel width K = {width}, got {tuple(conv_state.shape)}"
        )

    x_ext = torch.cat([conv_state.transpose(1, 2).to(x.dtype), x], dim=1)  # (B, K-1+T, D)
    acc = _acc_dtype(x, weight)
    x_acc, w = x_ext.to(acc), weight.to(acc)

    y = x_acc.new_zeros(batch, seqlen, dim) if bias is None else bias.to(acc).expand(batch, seqlen, dim)
    for k in range(width):  # K taps, a small constant (typically 4)
        y = y + w[:, k] * x_acc[:, k : k + seqlen]  # (B, T, D)

    new_conv_state = x_ext[:, x_ext.shape[1] - (width - 1) :].transpose(1, 2).contiguous()  # (B, D, K-1)
    return y.to(x.dtype), new_conv_state


def causal_conv1d_update_(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    conv_state: Tensor,
    silu: bool = False,
) -> Tensor:
    """One decoding step (x (B, 1, D)) of `causal_conv1d` (then SiLU if `silu`) with the new state written over
    `conv_state`: returns y (B, 1, D). The reference of the kernels' in-place step (archgen_v1::causal_conv1d_update_),
    the functional call and a copy."""
    y, new_conv_state = causal_conv1d(x, weight, bias, conv_state)
    conv_state.copy_(new_conv_state)
    return F.silu(y) if silu else y


def in_proj_conv_step_(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    conv_weight: Tensor,
    conv_bias: Tensor | None,
    conv_state: Tensor,
    silu: bool = False,
) -> tuple[Tensor, Tensor]:
    """One decoding step (x (B, 1, K)) of a Mamba-1 layer's in_proj (weight (N, K)) and conv: the first D =
    conv_weight.shape[0] outputs through `causal_conv1d_update_` (the state shifted in place), the rest (z) as they
    are; returns (x (B, 1, D), z (B, 1, N - D)). The reference of the kernel that does both in one launch
    (archgen_v1::in_proj_conv_step_)."""
    x, z = F.linear(x, weight, bias).split([conv_weight.shape[0], weight.shape[0] - conv_weight.shape[0]], dim=-1)
    return causal_conv1d_update_(x, conv_weight, conv_bias, conv_state, silu), z


def selective_scan(
    u: Tensor,
    delta: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Tensor | None = None,
    z: Tensor | None = None,
    delta_bias: Tensor | None = None,
    delta_softplus: bool = True,
    initial_state: Tensor | None = None,
    chunk_size: int = CHUNK_SIZE,
    max_seqlen: int | None = None,
) -> tuple[Tensor, Tensor]:
    """Selective scan over a whole sequence (training and prefill).

        Δ_t = softplus(delta_t + delta_bias)                (delta_t + delta_bias if not delta_softplus)
        h_t = exp(Δ_t A) ⊙ h_{t-1} + (Δ_t u_t) ⊗ B_t        h_{-1} = initial_state, or 0
        y_t = h_t C_t + D ⊙ u_t,   then  y_t ⊙ silu(z_t)    if z is given

    Args:
        u: (B, T, D) input.
        delta: (B, T, D) step size before the bias and softplus.
        A: (D, N) state matrix (diagonal per channel), negative real: pass -exp(A_log).
        B: (B, T, N) input projection, shared by all channels.
        C: (B, T, N) output projection, shared by all channels.
        D: (D,) skip connection, or None.
        z: (B, T, D) gate, or None.
        delta_bias: (D,) added to delta before the softplus, or None.
        delta_softplus: apply softplus to delta + delta_bias (True in Mamba).
        initial_state: (B, D, N) state before the first position, or None for zeros.
        chunk_size: chunk length L of the algorithm (see below); the result does not depend on it
            beyond rounding.
        max_seqlen: an upper bound on T, used only when T is symbolic (torch.export with a dynamic
            sequence length): it fixes the number of doubling rounds across chunks, so one graph
            serves every T up to the bound. A concrete T uses exactly the rounds it needs.

    Returns:
        y: (B, T, D) in u.dtype.
        final_state: (B, D, N) h_{T-1}, float32 (float64 for float64 inputs).

    Algorithm. The decay exp(Δ_t A) differs per (d, n), so the Mamba-2 trick of one L×L decay
    matrix per head would need an (L, L, D, N) tensor per chunk, and the classic rescaling
    h_t = e^{S_t} Σ_{s≤t} e^{-S_s} x_s (S = cumsum ΔA) overflows once |S| passes ~88, which two
    steps with Δ = 5, A = -16 already do. Instead:
      1. Within each chunk of L positions (all chunks at once), a log-depth Hillis–Steele scan over
         (decay, input) pairs gives every state from a zero start and the decay since the chunk
         start. It only ever multiplies numbers in [0, 1], so it is stable for any Δ·A (underflow
         to 0 is the exact limit), and chunking bounds its depth, and so the full-size tensors
         autograd keeps, at log2(L) instead of log2(T).
      2. The same scan over the chunk axis, on each chunk's (total decay, final state) pair with
         the initial state as step zero, gives the state entering every chunk, as the fused kernel
         carries it from one block of the sequence to the next. Its number of rounds is fixed by a
         bound on the number of chunks, never by a Python loop over them, so the graph that
         torch.export records holds for every T up to max_seqlen.
      3. Each state is its in-chunk part plus the entering state times the in-chunk decay; y
         contracts it with C.
    T need not be a multiple of L: the tail is padded with identity steps (decay 1, input 0),
    which leave the state unchanged. L is min(chunk_size, T) for a concrete T, and chunk_size
    itself for a symbolic one (the in-chunk depth must not depend on T).
    """
    batch, seqlen, dim = u.shape
    dstate = A.shape[-1]
    _check_scan_shapes(u, delta, A, B, C, D, z, delta_bias, initial_state)
    acc = _acc_dtype(u, delta, A, B, C)

    dt = _step_size(delta, delta_bias, delta_softplus, acc)  # (B, T, D)
    decay = torch.exp(dt.unsqueeze(-1) * A.to(acc))  # (B, T, D, N) in [0, 1]
    inp = (dt * u.to(acc)).unsqueeze(-1) * B.to(acc).unsqueeze(2)  # (B, T, D, N)

    chunk = min(chunk_size, seqlen) if isinstance(seqlen, int) else chunk_size
    nchunks = (seqlen + chunk - 1) // chunk
    decay = _pad_time(decay, nchunks * chunk, 1.0).view(batch, nchunks, chunk, dim, dstate)  # (B, c, L, D, N)
    inp = _pad_time(inp, nchunks * chunk).view(batch, nchunks, chunk, dim, dstate)  # (B, c, L, D, N)

    # 1. In-chunk: decay since the chunk start, and the state from a zero start.
    decay_in, h_in = _affine_scan(decay, inp, dim=2, rounds=(chunk - 1).bit_length())  # (B, c, L, D, N) each

    # 2. Across chunks: the states after each chunk, with the initial state as the step before chunk 0.
    state = u.new_zeros(batch, dim, dstate, dtype=acc) if initial_state is None else initial_state.to(acc)
    steps_decay = F.pad(decay_in[:, :, -1], (0, 0, 0, 0, 1, 0), value=0.0)  # (B, 1+c, D, N), step 0 forgets
    steps_inp = torch.cat([state.unsqueeze(1), h_in[:, :, -1]], dim=1)  # (B, 1+c, D, N), step 0 sets the state
    _, h_after = _affine_scan(steps_decay, steps_inp, dim=1, rounds=_doubling_rounds(seqlen, chunk, max_seqlen, "selective_scan"))
    h_enter, state = h_after[:, :-1], h_after[:, -1]  # (B, c, D, N) entering each chunk, (B, D, N) final

    # 3. Every state, then the output (padded positions are dropped last).
    h = h_in + decay_in * h_enter.unsqueeze(2)  # (B, c, L, D, N)
    C_chunks = _pad_time(C.to(acc), nchunks * chunk).view(batch, nchunks, chunk, dstate)  # (B, c, L, N)
    y = torch.einsum("bcldn,bcln->bcld", h, C_chunks).reshape(batch, nchunks * chunk, dim)  # (B, c·L, D)
    y = _unpad_time(y, seqlen)  # (B, T, D)
    y = _skip_and_gate(y, u, D, z, acc)
    return y.to(u.dtype), state


def selective_state_step(
    state: Tensor,
    u: Tensor,
    delta: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Tensor | None = None,
    z: Tensor | None = None,
    delta_bias: Tensor | None = None,
    delta_softplus: bool = True,
) -> tuple[Tensor, Tensor]:
    """One decoding step of `selective_scan`: the same recurrence at a single position.

        h = exp(Δ A) ⊙ state + (Δ u) ⊗ B,    y = h C + D ⊙ u,   then  y ⊙ silu(z)  if z is given

    Args:
        state: (B, D, N) the previous state h_{t-1}, float32.
        u, delta: (B, D) input and step size (before bias and softplus) at this position.
        A: (D, N); B, C: (B, N); D: (D,) or None; z: (B, D) or None; delta_bias: (D,) or None;
        delta_softplus: as in `selective_scan`.

    Returns:
        y: (B, D) in u.dtype.
        new_state: (B, D, N) h_t, float32 (float64 for float64 inputs). `state` is left untouched;
            copy the result into the cache (``cache.ssm_state.copy_(new_state)``) to decode in place.
    """
    acc = _acc_dtype(u, delta, A, B, C)
    dt = _step_size(delta, delta_bias, delta_softplus, acc)  # (B, D)
    decay = torch.exp(dt.unsqueeze(-1) * A.to(acc))  # (B, D, N)
    new_state = decay * state.to(acc) + (dt * u.to(acc)).unsqueeze(-1) * B.to(acc).unsqueeze(1)  # (B, D, N)
    y = (new_state * C.to(acc).unsqueeze(1)).sum(-1)  # (B, D); elementwise, not einsum: no reshape to pin B under torch.export
    y = _skip_and_gate(y, u, D, z, acc)
    return y.to(u.dtype), new_state


def mamba_step(
    state: Tensor,
    u: Tensor,
    delta: Tensor,
    A_log: Tensor,
    B: Tensor,
    C: Tensor,
    D: Tensor | None = None,
    z: Tensor | None = None,
    delta_bias: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """A Mamba block's decoding step as its parameters hold it: `selective_state_step` with A = -exp(A_log) (D, N) and
    Δ = softplus(delta + delta_bias). The Triton kernel of the same name (kernels/state_update.py) computes A in its one
    launch, where this is three ops more."""
    A = -torch.exp(A_log.to(_acc_dtype(u, A_log)))
    return selective_state_step(state, u, delta, A, B, C, D, z, delta_bias, delta_softplus=True)


def mamba_step_low_rank(
    state: Tensor,
    u: Tensor,
    delta_low: Tensor,
    delta_proj_weight: Tensor,
    A_log: Tensor,
    B: Tensor,
    C: Tensor,
    D: Tensor | None = None,
    z: Tensor | None = None,
    delta_bias: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """`mamba_step` with Δ before its bias projected from its low rank: delta_low (B, R) · delta_proj_weight (D, R)ᵀ
    (dt_proj without its bias, which the step adds). The Triton kernel of the same name projects in the step's launch."""
    return mamba_step(state, u, F.linear(delta_low, delta_proj_weight), A_log, B, C, D, z, delta_bias)


@dataclass
class MambaCache:
    """Decode-time state of one Mamba layer.

    conv_state: (B, D, K-1) the last K-1 inputs of the causal conv, in the model dtype.
    ssm_state: (B, D, N) the SSM state h, float32.
    """

    conv_state: Tensor
    ssm_state: Tensor

    @classmethod
    def empty(
        cls,
        batch: int,
        d_inner: int,
        d_conv: int,
        d_state: int,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> "MambaCache":
        """The state at the start of a sequence (all zeros). d_conv is the conv width K."""
        return cls(
            conv_state=torch.zeros(batch, d_inner, d_conv - 1, device=device, dtype=dtype),
            ssm_state=torch.zeros(
                batch, d_inner, d_state, device=device, dtype=torch.promote_types(dtype, torch.float32)
            ),
        )


def _affine_scan(decay: Tensor, inp: Tensor, dim: int, rounds: int) -> tuple[Tensor, Tensor]:
    """Inclusive scan of h_t = decay_t ⊙ h_{t-1} + inp_t along `dim`, h_{-1} = 0.

    A step is the affine map h ↦ a ⊙ h + b, and steps compose associatively:

        (a₂, b₂) ∘ (a₁, b₁) = (a₂ a₁,  a₂ b₁ + b₂)              (step 1, then step 2)

    Hillis–Steele: after the round with stride s, position t holds the composition of the steps
    in (t - 2s, t], clipped at the start; each round is elementwise over everything. The shift by
    the stride is a pad with the identity step (decay 1, input 0) and a cut back to the length, so
    it is valid for any stride, and a round whose stride reaches past the start changes nothing:
    `rounds` need only be at least ceil(log2(length)), and the length may be symbolic.

    Args:
        decay, inp: the same shape, decay in [0, 1].
        dim: the axis to scan.
        rounds: the number of doubling rounds.

    Returns:
        (Π_{s≤t} decay_s, h_t) for every position t, both of the input shape.
    """
    length = decay.shape[dim]
    front = (0, 0) * (decay.dim() - dim - 1)  # F.pad counts from the last dim
    for r in range(rounds):
        stride = 2**r
        prev_decay = F.pad(decay, front + (stride, 0), value=1.0).narrow(dim, 0, length)  # step t - stride
        prev_inp = F.pad(inp, front + (stride, 0)).narrow(dim, 0, length)
        inp = inp + decay * prev_inp
        decay = decay * prev_decay
    return decay, inp


def _doubling_rounds(seqlen: int, chunk: int, max_seqlen: int | None, op: str) -> int:
    """Rounds of a doubling scan across chunks (`_affine_scan` here, gated_delta.py's `_chained_affine_scan`) for the
    1 + ceil(T / L) steps of a sequence of T positions; `op` names the caller in the error.

    A concrete T needs ceil(log2(steps)). A symbolic T (torch.export with a dynamic sequence length)
    takes the rounds of the bound max_seqlen, and T <= max_seqlen becomes a check of the graph.
    """
    if not isinstance(seqlen, int):
        if max_seqlen is None:
            raise ValueError(
                f"{op} needs max_seqlen when the sequence length is symbolic (torch.export with a "
                "dynamic sequence length): the number of doubling rounds across chunks is fixed by it"
            )
        torch._check(seqlen <= max_seqlen, lambda: f"sequence length {seqlen} exceeds max_seqlen={max_seqlen}")
        seqlen = max_seqlen
    steps = 1 + -(-seqlen // chunk)
    return (steps - 1).bit_length()


def _pad_time(t: Tensor, length: int, value: float = 0.0) -> Tensor:
    """t (B, T, ...) -> (B, length, ...) for length >= T: the first T positions are t, the rest `value`.

    A gather of `length` rows and a mask rather than F.pad and a reshape: under torch.export with a
    symbolic T, the size arithmetic of a pad by (-T mod L) leaves guards (is T + pad >= T? a
    multiple of L?) that the shape solver cannot discharge, while a gather has its size by
    construction. `_unpad_time` is the inverse, for the same reason a gather rather than a slice.
    """
    seqlen = t.shape[1]
    index = torch.arange(length, device=t.device)  # (length,)
    rows = t.index_select(1, index.clamp(max=seqlen - 1))  # (B, length, ...)
    inside = (index < seqlen).view(1, length, *[1] * (t.dim() - 2))
    return torch.where(inside, rows, value)


def _unpad_time(t: Tensor, seqlen: int) -> Tensor:
    """The first `seqlen` positions of t (B, length, ...) along dim 1."""
    return t.index_select(1, torch.arange(seqlen, device=t.device))


def _step_size(delta: Tensor, delta_bias: Tensor | None, delta_softplus: bool, acc: torch.dtype) -> Tensor:
    """Δ = softplus(delta + delta_bias), in the accumulation dtype."""
    dt = delta.to(acc)
    if delta_bias is not None:
        dt = dt + delta_bias.to(acc)
    return F.softplus(dt) if delta_softplus else dt


def _skip_and_gate(y: Tensor, u: Tensor, D: Tensor | None, z: Tensor | None, acc: torch.dtype) -> Tensor:
    """y + D ⊙ u, then ⊙ silu(z); each term only when given."""
    if D is not None:
        y = y + D.to(acc) * u.to(acc)
    if z is not None:
        y = y * F.silu(z.to(acc))
    return y


def _acc_dtype(*tensors: Tensor) -> torch.dtype:
    """float32, or float64 when an input is float64 (so that gradcheck runs in double precision).

    Decided in Python from the dtypes (not with torch.promote_types, which torch.export records as a graph node)."""
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def _check_scan_shapes(
    u: Tensor,
    delta: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Tensor | None,
    z: Tensor | None,
    delta_bias: Tensor | None,
    initial_state: Tensor | None,
) -> None:
    batch, seqlen, dim = u.shape
    dstate = A.shape[-1]
    expected = {
        "delta": (delta, (batch, seqlen, dim)),
        "A": (A, (dim, dstate)),
        "B": (B, (batch, seqlen, dstate)),
        "C": (C, (batch, seqlen, dstate)),
        "D": (D, (dim,)),
        "z": (z, (batch, seqlen, dim)),
        "delta_bias": (delta_bias, (dim,)),
        "initial_state": (initial_state, (batch, dim, dstate)),
    }
    for name, (t, shape) in expected.items():
        if t is not None and t.shape != shape:
            raise ValueError(
                f"{name} must have shape {shape} for u of shape (B, T, D) = {(batch, seqlen, dim)} "
                f"and A of shape (D, N) = {tuple(A.shape)}, got {tuple(t.shape)}"
            )
