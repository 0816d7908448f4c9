"""One-token state updates for decoding, as Triton kernels: a Mamba-2 block's `mamba2_step` and a Mamba-1 block's
`mamba_step` (and `mamba_step_low_rank`, which also projects Δ from its low rank: what a generated Mamba-1 layer's
decoding step calls), each the op a generated model's decoding step calls.

Each is the recurrence of its scan at a single position, with the same arguments and results as the reference step in
templates/runtime/ssd.py and ssm.py (ops/ of a generated package)::

    Mamba-2 (per head, scalar decay):  h = exp(Δ A_h) · state + Δ · x ⊗ B_g,   y = h C_g + D_h x        h (P, N)
    Mamba-1 (per channel):            h = exp(Δ A_d) ⊙ state + Δ u · B,       y = (h C + D u) · silu(z)  h (N,)

with Δ = softplus(dt + dt_bias) and A = -exp(A_log) computed in the kernel, from the parameters as a block holds
them. `mamba2_step` is everything a Mamba-2 block does to one token between its in- and out-projections but the
norm: the conv update of the x, B and C channels, SiLU, Δ (clamped to the block's bounds), A = -exp(A_log), the
state update, the D skip and the z gate, in one launch where the unfused step took a dozen (the norm needs every
head's output, so it stays a launch of its own: kernels/rmsnorm.py). Decoding reads the whole state and writes it
back once per token: the step's floor is the state's bytes at the copy rate (2 × 2 MiB for one Bamba-1B layer at
batch 1). The new states are new tensors, as in the references (the states passed in are left untouched): the caller
copies them into its cache, and the op stays functional (exportable, capturable in a CUDA graph). `mamba_step_` and
`mamba2_step_` write the SSM state where it lies instead (each program owns its rows of the state, so nothing races),
which spares its copy: what a generated model's decoding step calls. Mamba-2's conv state stays functional.

The ops are inference-only (no autograd: decoding does not train). Under TRITON_INTERPRET=1 they run on CPU tensors
in Triton's interpreter (the tests); on CPU otherwise they compute the reference.
"""

import math

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from torch import Tensor

from .triton_support import (
    gdc_launch_dependents,
    on_device,
    op_overload,
    programmatic_launch,
    register_op,
    softplus,
    strided,
    triton_on_cpu,
)

SSD_STEP_CONFIG = {"BLOCK_P": 16, "num_warps": 4}
"""Rows of the (P, N) head state per program. The step is launch- and memory-bound; more rows per program than 16
leave too few programs at batch 1 (64 heads × P/16 = 256 programs fill the 132 SMs of an H100/H200 twice)."""
SELECTIVE_STEP_CONFIG = {"BLOCK_D": 8, "num_warps": 2}
"""Channels per program of the Mamba-1 step. With dt_proj inside (`mamba_step_low_rank`) each program also holds a
(BLOCK_D, R) tile of its weight, whose rows (R = 100 at Hymba+'s d_model 1600: 200 bytes, not a multiple of 16) load
2 bytes at a time: at 64 channels that tile took 255 registers and a 48-byte spill stack a thread (ptxas for sm_90,
triton 3.6) and the step 12 µs on the H200 (GPU call 2 of session 9: 32 launches 390 µs a token, 2.6 µs before the
fusion), on 50 programs; at 16, 48 registers, no spill, 200 programs (3200 channels) for the 132 SMs. 8 channels over
2 warps (400 programs) made Hymba+'s whole decoding step 11 µs shorter than 16 over 4 (session 22,
bench/mamba_chain_probe.py: ~0.35 µs a layer, where the step shares the GPU with the attention branch)."""


@triton.jit
def _selective_step_kernel(
    state_ptr, state_stride_b, state_stride_d, state_stride_n,
    u_ptr, u_stride_b, u_stride_d,
    delta_ptr, delta_stride_b, delta_stride_d,  # Δ before its bias (B, D), or its low rank (B, R) with PROJECT_DELTA
    delta_weight_ptr, delta_weight_stride_d, delta_weight_stride_r, rank,  # dt_proj's weight (D, R)
    A_log_ptr, A_log_stride_d, A_log_stride_n,  # A = -exp(A_log), as a Mamba block keeps it
    B_ptr, B_stride_b, B_stride_n,
    C_ptr, C_stride_b, C_stride_n,
    D_ptr, z_ptr, z_stride_b, z_stride_d, bias_ptr,
    y_ptr, y_stride_b, y_stride_d,
    new_state_ptr, new_state_stride_b, new_state_stride_d, new_state_stride_n,  # the state itself when in place
    dim, dstate,
    HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr,
    PROJECT_DELTA: tl.constexpr,  # Δ = dt_proj's weight · the low-rank Δ, for this program's channels
    BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
    PDL: tl.constexpr,  # let a programmatically launched next kernel (the out_proj GEMV) start: see _mamba2_step_kernel
):
    if PDL:
        gdc_launch_dependents()
    b = tl.program_id(0)
    d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    n = tl.arange(0, BLOCK_N)
    d_in = d < dim
    n_in = n < dstate
    dn_in = d_in[:, None] & n_in[None, :]
    b64 = b.to(tl.int64)
    if PROJECT_DELTA:
        r = tl.arange(0, BLOCK_R)
        r_in = r < rank
        low = tl.load(delta_ptr + b64 * delta_stride_b + r * delta_stride_d, mask=r_in, other=0.0).to(tl.float32)
        weight = tl.load(delta_weight_ptr + d[:, None] * delta_weight_stride_d + r[None, :] * delta_weight_stride_r,
                         mask=d_in[:, None] & r_in[None, :], other=0.0).to(tl.float32)
        dt = tl.sum(weight * low[None, :], axis=1)
    else:
        dt = tl.load(delta_ptr + b64 * delta_stride_b + d * delta_stride_d, mask=d_in, other=0.0).to(tl.float32)
    if HAS_BIAS:
        dt += tl.load(bias_ptr + d, mask=d_in, other=0.0).to(tl.float32)
    dt = softplus(dt)
    u = tl.load(u_ptr + b64 * u_stride_b + d * u_stride_d, mask=d_in, other=0.0).to(tl.float32)
    A = -tl.exp(tl.load(A_log_ptr + d[:, None] * A_log_stride_d + n[None, :] * A_log_stride_n, mask=dn_in,
                        other=0.0).to(tl.float32))
    B = tl.load(B_ptr + b64 * B_stride_b + n * B_stride_n, mask=n_in, other=0.0).to(tl.float32)
    C = tl.load(C_ptr + b64 * C_stride_b + n * C_stride_n, mask=n_in, other=0.0).to(tl.float32)
    state = tl.load(state_ptr + b64 * state_stride_b + d[:, None] * state_stride_d + n[None, :] * state_stride_n,
                    mask=dn_in, other=0.0).to(tl.float32)
    state = tl.exp(dt[:, None] * A) * state + (dt * u)[:, None] * B[None, :]
    y = tl.sum(state * C[None, :], axis=1)
    if HAS_D:
        y += tl.load(D_ptr + d, mask=d_in, other=0.0).to(tl.float32) * u
    if HAS_Z:
        z = tl.load(z_ptr + b64 * z_stride_b + d * z_stride_d, mask=d_in, other=0.0).to(tl.float32)
        y *= z * tl.sigmoid(z)
    # each program reads and writes only its own (BLOCK_D, N) rows of the state: writing in place cannot race
    tl.store(new_state_ptr + b64 * new_state_stride_b + d[:, None] * new_state_stride_d + n[None, :] * new_state_stride_n,
             state.to(new_state_ptr.dtype.element_ty), mask=dn_in)
    tl.store(y_ptr + b64 * y_stride_b + d * y_stride_d, y.to(y_ptr.dtype.element_ty), mask=d_in)


@triton.jit
def _conv_silu_step(xbc_ptr, xbc_stride_b, xbc_stride_c, state_ptr, state_stride_b, state_stride_c, state_stride_k,
                    weight_ptr, weight_stride_c, weight_stride_k, bias_ptr, new_state_ptr, b64, channels, valid,
                    store_mask, conv_channels, HAS_CONV_BIAS: tl.constexpr, WIDTH: tl.constexpr):
    """silu(bias + Σ_k w[c, k] x̃[c, k]) of one token at `channels` (x̃ = the K-1 stored inputs, then the new one), in
    float32; where store_mask, writes those channels' new conv state (B, channels, K-1) contiguous: shifted by one."""
    new_base = new_state_ptr + (b64 * conv_channels + channels) * (WIDTH - 1)
    x_new = tl.load(xbc_ptr + b64 * xbc_stride_b + channels * xbc_stride_c, mask=valid, other=0.0)
    acc = tl.load(weight_ptr + channels * weight_stride_c + (WIDTH - 1) * weight_stride_k, mask=valid,
                  other=0.0).to(tl.float32) * x_new.to(tl.float32)
    for k in tl.static_range(WIDTH - 1):
        old = tl.load(state_ptr + b64 * state_stride_b + channels * state_stride_c + k * state_stride_k, mask=valid,
                      other=0.0)
        acc += tl.load(weight_ptr + channels * weight_stride_c + k * weight_stride_k, mask=valid,
                       other=0.0).to(tl.float32) * old.to(tl.float32)
        if k > 0:
            tl.store(new_base + (k - 1), old.to(new_state_ptr.dtype.element_ty), mask=store_mask)
    if WIDTH > 1:
        tl.store(new_base + (WIDTH - 2), x_new.to(new_state_ptr.dtype.element_ty), mask=store_mask)
    if HAS_CONV_BIAS:
        acc += tl.load(bias_ptr + channels, mask=valid, other=0.0).to(tl.float32)
    return acc * tl.sigmoid(acc)


@triton.jit
def _mamba2_step_kernel(
    z_ptr, z_stride_b, z_stride_c,
    xbc_ptr, xbc_stride_b, xbc_stride_c,
    dt_ptr, dt_stride_b, dt_stride_h,
    conv_state_ptr, conv_state_stride_b, conv_state_stride_c, conv_state_stride_k,
    conv_weight_ptr, conv_weight_stride_c, conv_weight_stride_k, conv_bias_ptr,
    state_ptr, state_stride_b, state_stride_h, state_stride_p, state_stride_n,
    A_log_ptr, D_ptr, dt_bias_ptr, dt_min, dt_max,
    y_ptr,  # (B, H·P) contiguous, in xbc's dtype
    new_conv_state_ptr,  # (B, conv channels, K-1) contiguous, in the conv state's dtype
    new_state_ptr, new_state_stride_b, new_state_stride_h, new_state_stride_p, new_state_stride_n,  # or the state
    nheads, heads_per_group, ngroups, headdim, dstate,
    HAS_CONV_BIAS: tl.constexpr, HAS_D: tl.constexpr, HAS_DT_BIAS: tl.constexpr,
    WIDTH: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr,
    PDL: tl.constexpr,  # let a programmatically launched next kernel start early (triton_support.programmatic_launch)
):
    if PDL:  # at once: the dependent (a GEMV) can read nothing of this kernel's before its gdc_wait, which waits for
        # this kernel's end; meanwhile its programs take the SMs this grid leaves free and load their first weights
        gdc_launch_dependents()
    b = tl.program_id(0)
    h = tl.program_id(1)
    g = h // heads_per_group
    p = tl.program_id(2) * BLOCK_P + tl.arange(0, BLOCK_P)
    n = tl.arange(0, BLOCK_N)
    p_in = p < headdim
    n_in = n < dstate
    b64 = b.to(tl.int64)
    d_inner = nheads * headdim
    conv_channels = d_inner + 2 * ngroups * dstate
    # B and C of a group are convolved by every head of the group; the group's first head, first block of rows,
    # writes their new conv state.
    writes_group = (n * 0 + h % heads_per_group + tl.program_id(2)) == 0  # a (BLOCK_N,) mask
    x = _conv_silu_step(xbc_ptr, xbc_stride_b, xbc_stride_c, conv_state_ptr, conv_state_stride_b,
                        conv_state_stride_c, conv_state_stride_k, conv_weight_ptr, conv_weight_stride_c,
                        conv_weight_stride_k, conv_bias_ptr, new_conv_state_ptr, b64, h * headdim + p, p_in, p_in,
                        conv_channels, HAS_CONV_BIAS, WIDTH)
    B = _conv_silu_step(xbc_ptr, xbc_stride_b, xbc_stride_c, conv_state_ptr, conv_state_stride_b,
                        conv_state_stride_c, conv_state_stride_k, conv_weight_ptr, conv_weight_stride_c,
                        conv_weight_stride_k, conv_bias_ptr, new_conv_state_ptr, b64, d_inner + g * dstate + n, n_in,
                        n_in & writes_group, conv_channels, HAS_CONV_BIAS, WIDTH)
    C = _conv_silu_step(xbc_ptr, xbc_stride_b, xbc_stride_c, conv_state_ptr, conv_state_stride_b,
                        conv_state_stride_c, conv_state_stride_k, conv_weight_ptr, conv_weight_stride_c,
                        conv_weight_stride_k, conv_bias_ptr, new_conv_state_ptr, b64,
                        d_inner + (ngroups + g) * dstate + n, n_in, n_in & writes_group, conv_channels,
                        HAS_CONV_BIAS, WIDTH)
    # x, B and C are rounded to the input dtype, as the unfused path stores them between its ops.
    x = x.to(xbc_ptr.dtype.element_ty).to(tl.float32)
    B = B.to(xbc_ptr.dtype.element_ty).to(tl.float32)
    C = C.to(xbc_ptr.dtype.element_ty).to(tl.float32)

    dt = tl.load(dt_ptr + b64 * dt_stride_b + h * dt_stride_h).to(tl.float32)
    if HAS_DT_BIAS:
        dt += tl.load(dt_bias_ptr + h).to(tl.float32)
    dt = tl.minimum(tl.maximum(softplus(dt), dt_min), dt_max)
    decay = tl.exp(-dt * tl.exp(tl.load(A_log_ptr + h).to(tl.float32)))  # exp(Δ·A), A = -exp(A_log)
    pn_in = p_in[:, None] & n_in[None, :]
    state = tl.load(state_ptr + b64 * state_stride_b + h * state_stride_h + p[:, None] * state_stride_p
                    + n[None, :] * state_stride_n, mask=pn_in, other=0.0).to(tl.float32)
    state = decay * state + (dt * x)[:, None] * B[None, :]
    y = tl.sum(state * C[None, :], axis=1)
    if HAS_D:
        y += tl.load(D_ptr + h).to(tl.float32) * x
    z = tl.load(z_ptr + b64 * z_stride_b + (h * headdim + p) * z_stride_c, mask=p_in, other=0.0).to(tl.float32)
    y *= z * tl.sigmoid(z)
    # each program reads and writes only its own (BLOCK_P, N) rows of its head's state: writing in place cannot race
    # (the conv state can not: every head of a group reads the B and C taps one program rewrites)
    tl.store(new_state_ptr + b64 * new_state_stride_b + h * new_state_stride_h + p[:, None] * new_state_stride_p
             + n[None, :] * new_state_stride_n, state.to(new_state_ptr.dtype.element_ty), mask=pn_in)
    tl.store(y_ptr + b64 * d_inner + h * headdim + p, y.to(y_ptr.dtype.element_ty), mask=p_in)


# ---------------------------------------------------------------------------------------------------------------
# Mamba-2
# ---------------------------------------------------------------------------------------------------------------


def _ssd_step_reference(state: Tensor, x: Tensor, step: Tensor, A: Tensor, B: Tensor, C: Tensor,
                        D: Tensor | None) -> tuple[Tensor, Tensor]:
    """ops/ssd.py's `ssd_step` (step = Δ (B, H)), in `step`'s dtype."""
    acc = step.dtype
    repeats = x.shape[1] // B.shape[1]
    B_h = B.to(acc).repeat_interleave(repeats, dim=1)  # (B, H, N): head h reads group h // R
    C_h = C.to(acc).repeat_interleave(repeats, dim=1)
    decay = torch.exp(step * A.to(acc))  # (B, H)
    new_state = decay[:, :, None, None] * state.to(acc) + (step[:, :, None] * x.to(acc))[..., None] * B_h[:, :, None]
    y = torch.einsum("bhpn,bhn->bhp", new_state, C_h)
    if D is not None:
        y = y + D.to(acc)[:, None] * x.to(acc)
    return y.to(x.dtype), new_state


def _mamba2_step_impl(z: Tensor, xbc: Tensor, dt: Tensor, conv_state: Tensor, conv_weight: Tensor,
                      conv_bias: Tensor | None, ssm_state: Tensor, A_log: Tensor, D: Tensor | None,
                      dt_bias: Tensor | None, dt_min: float, dt_max: float,
                      ngroups: int) -> tuple[Tensor, Tensor, Tensor]:
    """archgen_v1::mamba2_step -> (y (B, H·P) in xbc.dtype, new_conv_state like conv_state, new_ssm_state
    (B, H, P, N) float32)."""
    if not (xbc.is_cuda or triton_on_cpu()):
        return mamba2_step_reference(z, xbc, dt, conv_state, conv_weight, conv_bias, ssm_state, A_log, D, dt_bias,
                                     dt_min, dt_max, ngroups)
    return _launch_mamba2_step(z, xbc, dt, conv_state, conv_weight, conv_bias, ssm_state, A_log, D, dt_bias, dt_min,
                               dt_max, ngroups)


def _mamba2_step_in_place_impl(z: Tensor, xbc: Tensor, dt: Tensor, conv_state: Tensor, conv_weight: Tensor,
                               conv_bias: Tensor | None, ssm_state: Tensor, A_log: Tensor, D: Tensor | None,
                               dt_bias: Tensor | None, dt_min: float, dt_max: float,
                               ngroups: int) -> tuple[Tensor, Tensor]:
    """archgen_v1::mamba2_step_ -> (y, new_conv_state) as mamba2_step's; ssm_state updated where it lies."""
    args = (z, xbc, dt, conv_state, conv_weight, conv_bias, ssm_state, A_log, D, dt_bias, dt_min, dt_max, ngroups)
    if not (xbc.is_cuda or triton_on_cpu()):
        y, new_conv_state, new_state = mamba2_step_reference(*args)
        ssm_state.copy_(new_state)
        return y, new_conv_state
    y, new_conv_state, _ = _launch_mamba2_step(*args, out_state=ssm_state)
    return y, new_conv_state


def _launch_mamba2_step(z, xbc, dt, conv_state, conv_weight, conv_bias, ssm_state, A_log, D, dt_bias, dt_min, dt_max,
                        ngroups, out_state=None):
    """(y, new conv state, new SSM state): the SSM state in out_state (the state itself, in place) or a new float32
    tensor."""
    batch, nheads, headdim, dstate = ssm_state.shape
    width = conv_weight.shape[1]
    d_inner = nheads * headdim
    conv_channels = d_inner + 2 * ngroups * dstate
    expected = {"z": (z, (batch, d_inner)), "xbc": (xbc, (batch, conv_channels)), "dt": (dt, (batch, nheads)),
                "conv_state": (conv_state, (batch, conv_channels, width - 1)), "A_log": (A_log, (nheads,))}
    for name, (t, shape) in expected.items():
        if tuple(t.shape) != shape:
            raise ValueError(f"mamba2_step: {name} must be {shape} for ssm_state (B, H, P, N) = "
                             f"{tuple(ssm_state.shape)}, {ngroups} group(s) and conv width {width}, got "
                             f"{tuple(t.shape)}")
    if nheads % ngroups:
        raise ValueError(f"mamba2_step: the heads H = {nheads} must be a multiple of the groups G = {ngroups}")
    y = torch.empty((batch, d_inner), dtype=xbc.dtype, device=xbc.device)
    new_conv_state = torch.empty((batch, conv_channels, width - 1), dtype=conv_state.dtype, device=xbc.device)
    new_state = out_state if out_state is not None else torch.empty((batch, nheads, headdim, dstate),
                                                                    dtype=torch.float32, device=xbc.device)
    block_p = SSD_STEP_CONFIG["BLOCK_P"]
    with on_device(xbc):
        _mamba2_step_kernel[(batch, nheads, triton.cdiv(headdim, block_p))](
            *strided(z, 2), *strided(xbc, 2), *strided(dt, 2), *strided(conv_state, 3), *strided(conv_weight, 2),
            conv_bias, *strided(ssm_state, 4), A_log, D, dt_bias, dt_min, dt_max, y, new_conv_state,
            *strided(new_state, 4), nheads, nheads // ngroups, ngroups, headdim, dstate,
            HAS_CONV_BIAS=conv_bias is not None, HAS_D=D is not None, HAS_DT_BIAS=dt_bias is not None,
            WIDTH=width, BLOCK_P=block_p, BLOCK_N=triton.next_power_of_2(dstate), PDL=programmatic_launch(xbc.device),
            num_warps=SSD_STEP_CONFIG["num_warps"],
        )
    return y, new_conv_state, new_state


def _mamba2_step_fake(z, xbc, dt, conv_state, conv_weight, conv_bias, ssm_state, A_log, D, dt_bias, dt_min, dt_max,
                      ngroups):
    return (xbc.new_empty(z.shape), torch.empty_like(conv_state),
            ssm_state.new_empty(ssm_state.shape, dtype=torch.float32))


def _mamba2_step_in_place_fake(z, xbc, dt, conv_state, conv_weight, conv_bias, ssm_state, A_log, D, dt_bias, dt_min,
                               dt_max, ngroups):
    return xbc.new_empty(z.shape), torch.empty_like(conv_state)


def mamba2_step_reference(
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
    """ops/ssd.py's `mamba2_step`, plainly: the conv update of the x, B, C channels and SiLU, Δ = clamp(softplus(dt +
    dt_bias)), ops/ssd.py's `ssd_step` with A = -exp(A_log), then the z gate; in float32 (float64 for float64 inputs).
    Returns (y, new_conv_state, new_ssm_state)."""
    batch, nheads, headdim, dstate = ssm_state.shape
    acc = torch.float64 if xbc.dtype == torch.float64 else torch.float32
    extended = torch.cat([conv_state, xbc.unsqueeze(-1).to(conv_state.dtype)], dim=-1)  # (B, channels, K)
    conv = (extended.to(acc) * conv_weight.to(acc)).sum(-1)
    if conv_bias is not None:
        conv = conv + conv_bias.to(acc)
    x, B, C = F.silu(conv).to(xbc.dtype).split([nheads * headdim, ngroups * dstate, ngroups * dstate], dim=-1)
    step = dt.to(acc) + (dt_bias.to(acc) if dt_bias is not None else 0.0)
    step = F.softplus(step).clamp(dt_min, dt_max)  # (B, H)
    y, new_state = _ssd_step_reference(ssm_state, x.reshape(batch, nheads, headdim), step, -torch.exp(A_log.to(acc)),
                                      B.reshape(batch, ngroups, dstate), C.reshape(batch, ngroups, dstate), D)
    y = y.reshape(batch, nheads * headdim).to(acc) * F.silu(z.to(acc))
    return y.to(xbc.dtype), extended[:, :, 1:].contiguous(), new_state


# ---------------------------------------------------------------------------------------------------------------
# Mamba-1
# ---------------------------------------------------------------------------------------------------------------


def _mamba_step_impl(state: Tensor, u: Tensor, delta: Tensor, A_log: Tensor, B: Tensor, C: Tensor, D: Tensor | None,
                     z: Tensor | None, delta_bias: Tensor | None) -> tuple[Tensor, Tensor]:
    """archgen_v1::mamba_step -> (y (B, D) in u.dtype, new_state (B, D, N) float32)."""
    if not (u.is_cuda or triton_on_cpu()):
        return mamba_step_reference(state, u, delta, A_log, B, C, D, z, delta_bias)
    return _launch_mamba_step(state, u, delta, A_log, B, C, D, z, delta_bias)


def _mamba_step_in_place_impl(state: Tensor, u: Tensor, delta: Tensor, A_log: Tensor, B: Tensor, C: Tensor,
                              D: Tensor | None, z: Tensor | None, delta_bias: Tensor | None) -> Tensor:
    """archgen_v1::mamba_step_ -> y (B, D) in u.dtype; state (B, D, N) updated where it lies."""
    if not (u.is_cuda or triton_on_cpu()):
        y, new_state = mamba_step_reference(state, u, delta, A_log, B, C, D, z, delta_bias)
        state.copy_(new_state)
        return y
    y, _ = _launch_mamba_step(state, u, delta, A_log, B, C, D, z, delta_bias, out_state=state)
    return y


def _launch_mamba_step(state, u, delta, A_log, B, C, D, z, delta_bias, out_state=None, delta_proj_weight=None):
    """(y, new state): the new state in out_state (the state itself, for the in-place op) or a new float32 tensor.
    With delta_proj_weight (D, R), delta is Δ's low rank (B, R), projected in the kernel."""
    batch, dim = u.shape
    dstate = A_log.shape[1]
    if state.shape != (batch, dim, dstate):
        raise ValueError(f"mamba_step: state must be (B, D, N) = {(batch, dim, dstate)}, got "
                         f"{tuple(state.shape)}")
    y = torch.empty((batch, dim), dtype=u.dtype, device=u.device)
    new_state = out_state if out_state is not None else torch.empty((batch, dim, dstate), dtype=torch.float32,
                                                                    device=u.device)
    if y.numel() == 0 or dstate == 0:
        return y.zero_(), new_state.zero_()
    rank = delta_proj_weight.size(1) if delta_proj_weight is not None else 1
    block_d = SELECTIVE_STEP_CONFIG["BLOCK_D"]
    with on_device(u):
        _selective_step_kernel[(batch, triton.cdiv(dim, block_d))](
            *strided(state, 3), *strided(u, 2), *strided(delta, 2), *strided(delta_proj_weight, 2), rank,
            *strided(A_log, 2), *strided(B, 2), *strided(C, 2), D, *strided(z, 2), delta_bias, *strided(y, 2),
            *strided(new_state, 3), dim, dstate, HAS_D=D is not None, HAS_Z=z is not None,
            HAS_BIAS=delta_bias is not None, PROJECT_DELTA=delta_proj_weight is not None, BLOCK_D=block_d,
            BLOCK_N=triton.next_power_of_2(dstate), BLOCK_R=triton.next_power_of_2(rank),
            PDL=programmatic_launch(u.device), num_warps=SELECTIVE_STEP_CONFIG["num_warps"],
        )
    return y, new_state


def _check_low_rank(u: Tensor, delta_low: Tensor, delta_proj_weight: Tensor) -> None:
    (batch, dim), rank = u.shape, delta_proj_weight.size(-1)
    if delta_proj_weight.shape != (dim, rank) or delta_low.shape != (batch, rank):
        raise ValueError(f"mamba_step_low_rank: delta_proj_weight must be (D, R) and delta_low (B, R) with (B, D) = "
                         f"{(batch, dim)}, got {tuple(delta_proj_weight.shape)} and {tuple(delta_low.shape)}")


def _mamba_step_low_rank_impl(state: Tensor, u: Tensor, delta_low: Tensor, delta_proj_weight: Tensor, A_log: Tensor,
                              B: Tensor, C: Tensor, D: Tensor | None, z: Tensor | None,
                              delta_bias: Tensor | None) -> tuple[Tensor, Tensor]:
    """archgen_v1::mamba_step_low_rank -> (y (B, D) in u.dtype, new_state (B, D, N) float32)."""
    _check_low_rank(u, delta_low, delta_proj_weight)
    if not (u.is_cuda or triton_on_cpu()):
        return mamba_step_low_rank_reference(state, u, delta_low, delta_proj_weight, A_log, B, C, D, z, delta_bias)
    return _launch_mamba_step(state, u, delta_low, A_log, B, C, D, z, delta_bias, delta_proj_weight=delta_proj_weight)


def _mamba_step_low_rank_in_place_impl(state: Tensor, u: Tensor, delta_low: Tensor, delta_proj_weight: Tensor,
                                       A_log: Tensor, B: Tensor, C: Tensor, D: Tensor | None, z: Tensor | None,
                                       delta_bias: Tensor | None) -> Tensor:
    """archgen_v1::mamba_step_low_rank_ -> y (B, D) in u.dtype; state (B, D, N) updated where it lies."""
    _check_low_rank(u, delta_low, delta_proj_weight)
    if not (u.is_cuda or triton_on_cpu()):
        y, new_state = mamba_step_low_rank_reference(state, u, delta_low, delta_proj_weight, A_log, B, C, D, z,
                                                     delta_bias)
        state.copy_(new_state)
        return y
    y, _ = _launch_mamba_step(state, u, delta_low, A_log, B, C, D, z, delta_bias, out_state=state,
                              delta_proj_weight=delta_proj_weight)
    return y


def _mamba_step_low_rank_fake(state, u, delta_low, delta_proj_weight, A_log, B, C, D, z, delta_bias):
    return _mamba_step_fake(state, u, delta_low, A_log, B, C, D, z, delta_bias)


def _mamba_step_low_rank_in_place_fake(state, u, delta_low, delta_proj_weight, A_log, B, C, D, z, delta_bias):
    return u.new_empty(u.shape)


def _mamba_step_fake(state, u, delta, A_log, B, C, D, z, delta_bias):
    return u.new_empty(u.shape), u.new_empty((*u.shape, A_log.shape[1]), dtype=torch.float32)


def _mamba_step_in_place_fake(state, u, delta, A_log, B, C, D, z, delta_bias):
    return u.new_empty(u.shape)


def mamba_step_reference(
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
    """ops/ssm.py's `mamba_step`, plainly: ops/ssm.py's `selective_state_step` with A = -exp(A_log) and Δ =
    softplus(delta + delta_bias), in float32 (float64 for float64 inputs)."""
    acc = torch.float64 if any(t.dtype == torch.float64 for t in (state, u, delta, A_log, B, C)) else torch.float32
    step = F.softplus(delta.to(acc) + (delta_bias.to(acc) if delta_bias is not None else 0.0))  # (B, D)
    new_state = (torch.exp(step.unsqueeze(-1) * -torch.exp(A_log.to(acc))) * state.to(acc)
                 + (step * u.to(acc)).unsqueeze(-1) * B.to(acc).unsqueeze(1))  # (B, D, N)
    y = (new_state * C.to(acc).unsqueeze(1)).sum(-1)
    if D is not None:
        y = y + D.to(acc) * u.to(acc)
    if z is not None:
        y = y * F.silu(z.to(acc))
    return y.to(u.dtype), new_state


# ---------------------------------------------------------------------------------------------------------------
# Custom ops and entry points
# ---------------------------------------------------------------------------------------------------------------


def mamba_step_low_rank_reference(state: Tensor, u: Tensor, delta_low: Tensor, delta_proj_weight: Tensor,
                                  A_log: Tensor, B: Tensor, C: Tensor, D: Tensor | None = None, z: Tensor | None = None,
                                  delta_bias: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """mamba_step_reference with Δ before its bias = delta_low (B, R) · delta_proj_weight (D, R)ᵀ, in float32 (float64
    for float64 inputs): the kernel's product, unrounded."""
    acc = torch.float64 if delta_low.dtype == torch.float64 else torch.float32
    delta = delta_low.to(acc) @ delta_proj_weight.to(acc).T  # (B, D)
    return mamba_step_reference(state, u, delta, A_log, B, C, D, z, delta_bias)


mamba_step_op = register_op("mamba_step", _mamba_step_impl, _mamba_step_fake)
mamba_step_low_rank_op = register_op("mamba_step_low_rank", _mamba_step_low_rank_impl, _mamba_step_low_rank_fake)
mamba_step_low_rank_in_place_op = register_op("mamba_step_low_rank_", _mamba_step_low_rank_in_place_impl,
                                              _mamba_step_low_rank_in_place_fake, mutates_args=("state",))
mamba_step_in_place_op = register_op("mamba_step_", _mamba_step_in_place_impl, _mamba_step_in_place_fake,
                                     mutates_args=("state",))
mamba2_step_op = register_op("mamba2_step", _mamba2_step_impl, _mamba2_step_fake)
mamba2_step_in_place_op = register_op("mamba2_step_", _mamba2_step_in_place_impl, _mamba2_step_in_place_fake,
                                      mutates_args=("ssm_state",))


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
    """A Mamba-1 block's SSM step as its parameters hold it, in one launch, as ops/ssm.py's `mamba_step`: the
    selective state step with A = -exp(A_log) (D, N) computed in the kernel and Δ = softplus(delta + delta_bias).
    Returns (y (B, D) gated by silu(z), new_state (B, D, N) float32)."""
    return mamba_step_op(state, u, delta, A_log, B, C, D, z, delta_bias)


def mamba_step_(
    state: Tensor,
    u: Tensor,
    delta: Tensor,
    A_log: Tensor,
    B: Tensor,
    C: Tensor,
    D: Tensor | None = None,
    z: Tensor | None = None,
    delta_bias: Tensor | None = None,
) -> Tensor:
    """`mamba_step` with the new state written over `state` (a decoding cache's) by the kernel itself: no copy of it
    afterwards, one launch fewer per Mamba-1 layer and token. Returns y (B, D). While torch.export traces, the
    functional op and a copy (the exported graph and its ONNX lowering keep the functional form)."""
    if torch.compiler.is_exporting():
        y, new_state = mamba_step_op(state, u, delta, A_log, B, C, D, z, delta_bias)
        state.copy_(new_state)
        return y
    return mamba_step_in_place_op(state, u, delta, A_log, B, C, D, z, delta_bias)


def mamba_step_low_rank(state: Tensor, u: Tensor, delta_low: Tensor, delta_proj_weight: Tensor, A_log: Tensor,
                        B: Tensor, C: Tensor, D: Tensor | None = None, z: Tensor | None = None,
                        delta_bias: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """`mamba_step` with Δ's projection in the same launch: Δ before its bias = dt_proj's weight (D, R) times the
    low-rank Δ (B, R) of x_proj, each program computing its channels' (a (BLOCK_D, R) tile of the weight), so a
    Mamba-1 decoding step launches no GEMV for dt_proj. As ops/ssm.py's `mamba_step_low_rank`."""
    return mamba_step_low_rank_op(state, u, delta_low, delta_proj_weight, A_log, B, C, D, z, delta_bias)


def mamba_step_low_rank_(state: Tensor, u: Tensor, delta_low: Tensor, delta_proj_weight: Tensor, A_log: Tensor,
                         B: Tensor, C: Tensor, D: Tensor | None = None, z: Tensor | None = None,
                         delta_bias: Tensor | None = None) -> Tensor:
    """`mamba_step_low_rank` with the new state written over `state`, as `mamba_step_`: what a generated Mamba-1
    layer's decoding step calls. Returns y (B, D)."""
    args = (state, u, delta_low, delta_proj_weight, A_log, B, C, D, z, delta_bias)
    if torch.compiler.is_exporting():
        y, new_state = mamba_step_low_rank_op(*args)
        state.copy_(new_state)
        return y
    return mamba_step_low_rank_in_place_op(*args)


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
    """A Mamba-2 block's decoding step between its two projections, in one launch, as ops/ssd.py's `mamba2_step`:
    the conv update of the x, B and C channels, SiLU, Δ = clamp(softplus(dt + dt_bias), dt_min, dt_max), the SSD
    state update with A = -exp(A_log), the D skip and the z gate: y = (h C + D x) · silu(z). z (B, H·P), xbc
    (B, H·P + 2·G·N) and dt (B, H) are this token's slices of the in-projection (views, any strides); conv_state
    (B, channels, K-1); conv_weight (channels, K); ssm_state (B, H, P, N). Returns (y (B, H·P), new_conv_state,
    new_ssm_state float32); the states passed in are left untouched."""
    return mamba2_step_op(z, xbc, dt, conv_state, conv_weight, conv_bias, ssm_state, A_log, D, dt_bias, dt_min,
                          dt_max, ngroups)


def mamba2_step_(
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
) -> tuple[Tensor, Tensor]:
    """`mamba2_step` with the new SSM state written over `ssm_state` (a decoding cache's) by the kernel itself: no copy
    of it afterwards. Returns (y (B, H·P), new_conv_state): the conv state stays functional (see the kernel). While
    torch.export traces, the functional op and a copy (exported graphs and their ONNX lowering keep that form)."""
    args = (z, xbc, dt, conv_state, conv_weight, conv_bias, ssm_state, A_log, D, dt_bias, dt_min, dt_max, ngroups)
    if torch.compiler.is_exporting():
        y, new_conv_state, new_state = mamba2_step_op(*args)
        ssm_state.copy_(new_state)
        return y, new_conv_state
    return mamba2_step_in_place_op(*args)


def decomposition(reference, max_seqlen: int) -> dict:
    """{the custom op `reference` is the reference of: `reference`}, for ONNX. This file holds three ops, and a generated
    package calls this once per op it uses, with the ops/ function of the op's name: ops/ssd.py's `mamba2_step`,
    ops/ssm.py's `mamba_step` or `mamba_step_low_rank`, each with its op's signature, so it is the decomposition as it
    stands. max_seqlen is unused (one position)."""
    ops = ("mamba2_step", "mamba_step", "mamba_step_low_rank")
    if reference.__name__ not in ops:
        raise ValueError(f"state_update has no op whose reference is {reference.__name__!r}; it lowers "
                         f"{', '.join(ops)}")
    return {op_overload(reference.__name__): reference}
