"""Depthwise causal conv1d (+ SiLU) as Triton kernels: forward, backward, the one-step update, the ops, the reference.

For every batch b, time t and channel d, with K taps and x̃ = concat(conv_state, x) along time::

    y[b, t, d] = act(bias[d] + Σ_{k<K} weight[d, k] · x̃[b, t + k, d])        act = SiLU or the identity

so weight[:, -1] multiplies the current input, as in templates/runtime/ssm.py's `causal_conv1d` (ops/ssm.py of a
generated package), which this file's reference wraps. Shapes are channels-last: x (B, T, D), possibly strided (the
Mamba blocks hand over a slice of their input projection), weight (D, K), bias (D,), conv_state and the new state
(B, D, K-1) (the last K-1 inputs, oldest first). y and the new state come back in x's dtype; sums run in float32.

Why a kernel: the reference is a Python loop over the K taps, each a full (B, T, D) multiply-add in float32. Here one
pass reads x once from memory (the K shifted tiles of one program overlap and hit the cache) and writes y once: the
op is memory-bound, its floor the bytes of x and y at the copy rate.

The forward's grid is (batch, blocks of BLOCK_T steps, blocks of BLOCK_D channels); the program holding the last
step also writes the new state. The backward, with the SiLU, first writes dL/d pre-activation (the pre-activation
recomputed, once per output, in dy's dtype); then one pass sums it over the taps into dx and, per time block, d weight
and d bias (deterministic; torch adds the blocks up). Recomputing the SiLU's gradient inside that pass instead, at the
K positions each input feeds, took K² shifted loads per input and ran at a fifth of the copy rate on an H200. A
decoding step is the same forward at T = 1 (`causal_conv1d_update`).

Contents: `causal_conv1d` (the entry point, differentiable), `causal_conv1d_update` (one decoding step), the custom
ops `archgen_v1::causal_conv1d` and `archgen_v1::causal_conv1d_backward` (fake implementations, autograd), the launchers
`causal_conv1d_forward` / `causal_conv1d_backward` with their autotune spaces, `causal_conv1d_reference` (the same
signature over ops/ssm.py's loop) and `decomposition` (for ONNX). Needs triton and triton_support.py next to it.
"""

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from torch import Tensor

from .triton_support import Autotuner, dtype_name, interpreting, on_device, op_overload, register_op, strided, triton_on_cpu

SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
ACTIVATIONS = (None, "silu")

# Configs that compile for sm_90 without register spills (triton.compile for GPUTarget("cuda", 90, 32), cuobjdump
# -res-usage): the forward keeps K + 1 tiles of BLOCK_T · BLOCK_D / (32 · num_warps) values per thread.
FORWARD_CONFIGS = [
    {"BLOCK_T": 32, "BLOCK_D": 128, "num_warps": 4},
    {"BLOCK_T": 16, "BLOCK_D": 256, "num_warps": 4},
    {"BLOCK_T": 32, "BLOCK_D": 256, "num_warps": 8},
    {"BLOCK_T": 64, "BLOCK_D": 128, "num_warps": 8},
    {"BLOCK_T": 16, "BLOCK_D": 128, "num_warps": 4},
    # Narrow channel blocks, many threads: more loads in flight per register (flash-linear-attention's conv tunes
    # BLOCK_D 16-128 with 4-32 warps at 64 steps).
    {"BLOCK_T": 64, "BLOCK_D": 64, "num_warps": 8},
    {"BLOCK_T": 64, "BLOCK_D": 32, "num_warps": 4},
]
# The K shifted loads of a tile come from L1/L2, not memory, but still move K times the tile's bytes: at (8, 4096, 4096)
# bf16 the forward ran at 0.6 of the copy rate. The gathering variant loads each input once (one tile, overlapping
# the next by K-1 rows) and forms the taps with tl.gather, shuffles in registers; the tuner chooses between them.
FORWARD_CONFIGS += [
    {"BLOCK_T": 32, "BLOCK_D": 128, "num_warps": 4, "GATHER": True},
    {"BLOCK_T": 64, "BLOCK_D": 128, "num_warps": 4, "GATHER": True},
    {"BLOCK_T": 64, "BLOCK_D": 256, "num_warps": 8, "GATHER": True},
]
SILU_BACKWARD_CONFIGS = [c for c in FORWARD_CONFIGS if not c.get("GATHER")]
BACKWARD_CONFIGS = [
    # The tap sums of dL/d pre-activation: K + 2 tiles live, as in the forward.
    {"BLOCK_T": 32, "BLOCK_D": 128, "num_warps": 4},
    {"BLOCK_T": 16, "BLOCK_D": 256, "num_warps": 4},
    {"BLOCK_T": 32, "BLOCK_D": 256, "num_warps": 8},
    {"BLOCK_T": 64, "BLOCK_D": 128, "num_warps": 8},
    {"BLOCK_T": 64, "BLOCK_D": 64, "num_warps": 8},
    {"BLOCK_T": 64, "BLOCK_D": 32, "num_warps": 4},
]
INTERPRETER_CONFIG = {"BLOCK_T": 8, "BLOCK_D": 16, "num_warps": 4}


# ---------------------------------------------------------------------------------------------------------------
# Kernels
# ---------------------------------------------------------------------------------------------------------------


@triton.jit
def _extended_input(x_ptr, x_stride_b, x_stride_t, x_stride_d, state_ptr, state_stride_b, state_stride_d,
                    state_stride_k, b, src, d, d_in, seqlen, HAS_STATE: tl.constexpr, WIDTH: tl.constexpr):
    """x̃ at input positions src (time of x; negative = from the conv state, -1 its newest), float32, 0 elsewhere."""
    from_x = (src >= 0) & (src < seqlen)
    value = tl.load(x_ptr + b.to(tl.int64) * x_stride_b + src[:, None] * x_stride_t + d[None, :] * x_stride_d,
                    mask=from_x[:, None] & d_in[None, :], other=0.0).to(tl.float32)
    if HAS_STATE:
        from_state = (src < 0) & (src >= 1 - WIDTH)
        value += tl.load(state_ptr + b.to(tl.int64) * state_stride_b + d[None, :] * state_stride_d
                         + (src + WIDTH - 1)[:, None] * state_stride_k,
                         mask=from_state[:, None] & d_in[None, :], other=0.0).to(tl.float32)
    return value


@triton.jit
def _conv_at(x_ptr, x_stride_b, x_stride_t, x_stride_d, state_ptr, state_stride_b, state_stride_d, state_stride_k,
             weight_ptr, weight_stride_d, weight_stride_k, bias, b, t, d, d_in, seqlen,
             HAS_STATE: tl.constexpr, WIDTH: tl.constexpr):
    """The pre-activation bias + Σ_k w[:, k] x̃[t + k] at output times t (BLOCK_T, BLOCK_D), float32."""
    acc = tl.zeros((t.shape[0], d.shape[0]), dtype=tl.float32) + bias[None, :]
    for k in tl.static_range(WIDTH):
        w = tl.load(weight_ptr + d * weight_stride_d + k * weight_stride_k, mask=d_in, other=0.0).to(tl.float32)
        acc += w[None, :] * _extended_input(x_ptr, x_stride_b, x_stride_t, x_stride_d, state_ptr, state_stride_b,
                                            state_stride_d, state_stride_k, b, t - (WIDTH - 1) + k, d, d_in, seqlen,
                                            HAS_STATE, WIDTH)
    return acc


@triton.jit
def _silu_bwd_kernel(
    x_ptr, x_stride_b, x_stride_t, x_stride_d,
    weight_ptr, weight_stride_d, weight_stride_k,
    bias_ptr,
    state_ptr, state_stride_b, state_stride_d, state_stride_k,
    dy_ptr, dy_stride_b, dy_stride_t, dy_stride_d,
    dpre_ptr,  # (B, T, D) in dy's dtype, contiguous: dL/d pre-activation
    seqlen, dim,
    HAS_BIAS: tl.constexpr, HAS_STATE: tl.constexpr, WIDTH: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """dL/d pre-activation = dy · SiLU'(pre), the pre-activation recomputed as the forward computes it."""
    b = tl.program_id(0)
    t = tl.program_id(1) * BLOCK_T + tl.arange(0, BLOCK_T)
    d = tl.program_id(2) * BLOCK_D + tl.arange(0, BLOCK_D)
    d_in = d < dim
    if HAS_BIAS:
        bias = tl.load(bias_ptr + d, mask=d_in, other=0.0).to(tl.float32)
    else:
        bias = tl.zeros((BLOCK_D,), dtype=tl.float32)
    pre = _conv_at(x_ptr, x_stride_b, x_stride_t, x_stride_d, state_ptr, state_stride_b, state_stride_d,
                   state_stride_k, weight_ptr, weight_stride_d, weight_stride_k, bias, b, t, d, d_in, seqlen,
                   HAS_STATE, WIDTH)
    td_in = (t < seqlen)[:, None] & d_in[None, :]
    dy = tl.load(dy_ptr + b.to(tl.int64) * dy_stride_b + t[:, None] * dy_stride_t + d[None, :] * dy_stride_d,
                 mask=td_in, other=0.0).to(tl.float32)
    sig = tl.sigmoid(pre)
    dpre = dy * sig * (1.0 + pre * (1.0 - sig))
    tl.store(dpre_ptr + (b.to(tl.int64) * seqlen + t[:, None]) * dim + d[None, :], dpre.to(dpre_ptr.dtype.element_ty),
             mask=td_in)


@triton.jit
def _dpre_at(dpre_ptr, dpre_stride_b, dpre_stride_t, dpre_stride_d, b, t, d, d_in, seqlen):
    """dL/d pre-activation at output times t, float32, 0 outside [0, T)."""
    valid = ((t >= 0) & (t < seqlen))[:, None] & d_in[None, :]
    return tl.load(dpre_ptr + b.to(tl.int64) * dpre_stride_b + t[:, None] * dpre_stride_t + d[None, :] * dpre_stride_d,
                   mask=valid, other=0.0).to(tl.float32)


@triton.jit
def _conv_from_window(x_ptr, x_stride_b, x_stride_t, x_stride_d, state_ptr, state_stride_b, state_stride_d,
                      state_stride_k, weight_ptr, weight_stride_d, weight_stride_k, bias, b, t, d, d_in, seqlen,
                      HAS_STATE: tl.constexpr, WIDTH: tl.constexpr):
    """`_conv_at` at output times t, but the tile's inputs x̃[t - (K-1)] are loaded once and the taps gathered from
    them (tl.gather along time): the last K-1 rows have no inputs past the tile and are wrong (the caller masks them)."""
    rows = tl.arange(0, t.shape[0])
    window = _extended_input(x_ptr, x_stride_b, x_stride_t, x_stride_d, state_ptr, state_stride_b, state_stride_d,
                             state_stride_k, b, t - (WIDTH - 1), d, d_in, seqlen, HAS_STATE, WIDTH)
    acc = tl.zeros((t.shape[0], d.shape[0]), dtype=tl.float32) + bias[None, :]
    for k in tl.static_range(WIDTH):
        w = tl.load(weight_ptr + d * weight_stride_d + k * weight_stride_k, mask=d_in, other=0.0).to(tl.float32)
        tap = tl.broadcast_to(tl.minimum(rows + k, t.shape[0] - 1)[:, None], (t.shape[0], d.shape[0]))
        acc += w[None, :] * tl.gather(window, tap, axis=0)
    return acc


@triton.jit
def _conv_fwd_kernel(
    x_ptr, x_stride_b, x_stride_t, x_stride_d,
    weight_ptr, weight_stride_d, weight_stride_k,
    bias_ptr,
    state_ptr, state_stride_b, state_stride_d, state_stride_k,
    y_ptr, y_stride_b, y_stride_t, y_stride_d,
    new_state_ptr, new_state_stride_b, new_state_stride_d, new_state_stride_k,
    seqlen, dim,
    HAS_BIAS: tl.constexpr, HAS_STATE: tl.constexpr, SILU: tl.constexpr, WIDTH: tl.constexpr,
    GATHER: tl.constexpr,  # time tiles overlap by K-1 rows, each input loaded once (else K shifted loads per tile)
    BLOCK_K: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr,
):
    b = tl.program_id(0)
    tb = tl.program_id(1)
    d = tl.program_id(2) * BLOCK_D + tl.arange(0, BLOCK_D)
    d_in = d < dim
    if HAS_BIAS:
        bias = tl.load(bias_ptr + d, mask=d_in, other=0.0).to(tl.float32)
    else:
        bias = tl.zeros((BLOCK_D,), dtype=tl.float32)
    if GATHER:
        t = tb * (BLOCK_T - (WIDTH - 1)) + tl.arange(0, BLOCK_T)
        t_out = (t < seqlen) & (tl.arange(0, BLOCK_T) < BLOCK_T - (WIDTH - 1))
        acc = _conv_from_window(x_ptr, x_stride_b, x_stride_t, x_stride_d, state_ptr, state_stride_b, state_stride_d,
                                state_stride_k, weight_ptr, weight_stride_d, weight_stride_k, bias, b, t, d, d_in,
                                seqlen, HAS_STATE, WIDTH)
    else:
        t = tb * BLOCK_T + tl.arange(0, BLOCK_T)
        t_out = t < seqlen
        acc = _conv_at(x_ptr, x_stride_b, x_stride_t, x_stride_d, state_ptr, state_stride_b, state_stride_d,
                       state_stride_k, weight_ptr, weight_stride_d, weight_stride_k, bias, b, t, d, d_in, seqlen,
                       HAS_STATE, WIDTH)
    if SILU:
        acc = acc * tl.sigmoid(acc)
    tl.store(y_ptr + b.to(tl.int64) * y_stride_b + t[:, None] * y_stride_t + d[None, :] * y_stride_d,
             acc.to(y_ptr.dtype.element_ty), mask=t_out[:, None] & d_in[None, :])
    if tb == tl.num_programs(1) - 1:  # the last K-1 entries of x̃ become the new state
        j = tl.arange(0, BLOCK_K)
        src = seqlen - (WIDTH - 1) + j
        tail = _extended_input(x_ptr, x_stride_b, x_stride_t, x_stride_d, state_ptr, state_stride_b, state_stride_d,
                               state_stride_k, b, src, d, d_in, seqlen, HAS_STATE, WIDTH)
        tl.store(new_state_ptr + b.to(tl.int64) * new_state_stride_b + d[None, :] * new_state_stride_d
                 + j[:, None] * new_state_stride_k, tail.to(new_state_ptr.dtype.element_ty),
                 mask=(j < WIDTH - 1)[:, None] & d_in[None, :])


@triton.jit
def _conv_bwd_kernel(
    x_ptr, x_stride_b, x_stride_t, x_stride_d,
    weight_ptr, weight_stride_d, weight_stride_k,
    state_ptr, state_stride_b, state_stride_d, state_stride_k,
    dpre_ptr, dpre_stride_b, dpre_stride_t, dpre_stride_d,  # dL/d pre-activation (dy, or _silu_bwd_kernel's)
    dx_ptr, dx_stride_b, dx_stride_t, dx_stride_d,
    dstate_ptr,  # (B, D, K-1) float32: dL/d conv_state through y (the new state's gradient is added by the caller)
    dweight_part_ptr,  # (B, time blocks, K, D) float32
    dbias_part_ptr,  # (B, time blocks, D) float32
    seqlen, dim,
    HAS_STATE: tl.constexpr, WIDTH: tl.constexpr,
    BLOCK_K: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr,
):
    b = tl.program_id(0)
    tb = tl.program_id(1)
    d = tl.program_id(2) * BLOCK_D + tl.arange(0, BLOCK_D)
    d_in = d < dim
    s = tb * BLOCK_T + tl.arange(0, BLOCK_T)  # input times whose gradient this program writes
    part_base = b.to(tl.int64) * tl.num_programs(1) + tb
    # d pre-activation at this block's own output times: d weight and d bias sum it against the taps' inputs.
    dpre_own = _dpre_at(dpre_ptr, dpre_stride_b, dpre_stride_t, dpre_stride_d, b, s, d, d_in, seqlen)
    tl.store(dbias_part_ptr + part_base * dim + d, tl.sum(dpre_own, axis=0), mask=d_in)
    dx = tl.zeros((BLOCK_T, BLOCK_D), dtype=tl.float32)
    for k in tl.static_range(WIDTH):
        x_tap = _extended_input(x_ptr, x_stride_b, x_stride_t, x_stride_d, state_ptr, state_stride_b, state_stride_d,
                                state_stride_k, b, s - (WIDTH - 1) + k, d, d_in, seqlen, HAS_STATE, WIDTH)
        tl.store(dweight_part_ptr + (part_base * WIDTH + k) * dim + d, tl.sum(dpre_own * x_tap, axis=0), mask=d_in)
        # Input s feeds output s + K-1-k through tap k.
        if k == WIDTH - 1:
            dpre = dpre_own
        else:
            dpre = _dpre_at(dpre_ptr, dpre_stride_b, dpre_stride_t, dpre_stride_d, b, s + (WIDTH - 1 - k), d, d_in,
                            seqlen)
        w = tl.load(weight_ptr + d * weight_stride_d + k * weight_stride_k, mask=d_in, other=0.0).to(tl.float32)
        dx += w[None, :] * dpre
    tl.store(dx_ptr + b.to(tl.int64) * dx_stride_b + s[:, None] * dx_stride_t + d[None, :] * dx_stride_d,
             dx.to(dx_ptr.dtype.element_ty), mask=(s < seqlen)[:, None] & d_in[None, :])
    if HAS_STATE:  # noqa: SIM102 -- a constexpr branch: compiled only when there is a state
        if tb == 0:  # the state's entries e = 0..K-2 feed outputs t = e - k
            j = tl.arange(0, BLOCK_K)
            dstate = tl.zeros((BLOCK_K, BLOCK_D), dtype=tl.float32)
            for k in tl.static_range(WIDTH):
                # Names of their own: inside a runtime branch the compiler will not let `dpre` and `w` change
                # type (BLOCK_K rows here, BLOCK_T above; bf16 here, float32 above).
                dpre_state = _dpre_at(dpre_ptr, dpre_stride_b, dpre_stride_t, dpre_stride_d, b, j - k, d, d_in, seqlen)
                w_state = tl.load(weight_ptr + d * weight_stride_d + k * weight_stride_k, mask=d_in, other=0.0)
                dstate += w_state.to(tl.float32)[None, :] * dpre_state
            tl.store(dstate_ptr + (b.to(tl.int64) * dim + d[None, :]) * (WIDTH - 1) + j[:, None], dstate,
                     mask=(j < WIDTH - 1)[:, None] & d_in[None, :])


# ---------------------------------------------------------------------------------------------------------------
# Launchers and tuning
# ---------------------------------------------------------------------------------------------------------------


FORWARD_TUNER = Autotuner("causal_conv1d.forward", FORWARD_CONFIGS, INTERPRETER_CONFIG)
BACKWARD_TUNER = Autotuner("causal_conv1d.backward", BACKWARD_CONFIGS, INTERPRETER_CONFIG)
SILU_BACKWARD_TUNER = Autotuner("causal_conv1d.silu_backward", SILU_BACKWARD_CONFIGS, INTERPRETER_CONFIG)


def _config(tuner: Autotuner, key: str, launch, explicit: dict | None, candidates: list[dict] | None = None) -> dict:
    known = tuner.known(key, explicit)
    return known if known is not None else tuner.tune(key, launch, candidates)


def tuned_configs() -> dict:
    """{"forward"|"silu_backward"|"backward": {key: config}} chosen so far (triton_support.tuning_table() has them
    too)."""
    return {"forward": dict(FORWARD_TUNER.chosen), "silu_backward": dict(SILU_BACKWARD_TUNER.chosen),
            "backward": dict(BACKWARD_TUNER.chosen)}


def _key(dim: int, width: int, conv_state: Tensor | None, dtype: torch.dtype, length: str = "") -> str:
    """The tuning bucket. With a conv state every tap load is two masked loads (x and the state): at (8, 4096, 4096)
    the gathering forward won with a state and lost without one, so the two are tuned apart."""
    return f"D{dim}-K{width}{length}{'-state' if conv_state is not None else ''}-{dtype_name(dtype)}"


def _launch_options(config: dict) -> dict:
    return {"BLOCK_T": config["BLOCK_T"], "BLOCK_D": config["BLOCK_D"], "num_warps": config.get("num_warps", 4)}


def causal_conv1d_forward(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None = None,
    conv_state: Tensor | None = None,
    silu: bool = False,
    *,
    config: dict | None = None,
) -> tuple[Tensor, Tensor]:
    """Run the forward kernel: (y (B, T, D), new_conv_state (B, D, K-1)), both in x's dtype."""
    _check_inputs(x, weight, bias, conv_state)
    batch, seqlen, dim = x.shape
    width = weight.shape[1]
    y = torch.empty((batch, seqlen, dim), dtype=x.dtype, device=x.device)
    new_state = torch.empty((batch, dim, width - 1), dtype=x.dtype, device=x.device)
    if batch == 0 or dim == 0:
        return y, new_state
    args = (*strided(x, 3), *strided(weight, 2), bias, *strided(conv_state, 3), *strided(y, 3),
            *strided(new_state, 3), seqlen, dim)
    constexprs = {"HAS_BIAS": bias is not None, "HAS_STATE": conv_state is not None, "SILU": bool(silu),
                  "WIDTH": width, "BLOCK_K": max(1, triton.next_power_of_2(width - 1))}

    def launch(cfg):
        gather = cfg.get("GATHER", False)
        rows = cfg["BLOCK_T"] - (width - 1) if gather else cfg["BLOCK_T"]  # new outputs per time tile
        grid = (batch, max(1, triton.cdiv(seqlen, rows)), triton.cdiv(dim, cfg["BLOCK_D"]))
        _conv_fwd_kernel[grid](*args, **constexprs, GATHER=gather, **_launch_options(cfg))

    key = _key(dim, width, conv_state, x.dtype, f"-T{'1' if seqlen == 1 else 'n'}")
    # A gathering tile recomputes K-1 of its rows: only worth it when that is a small part of the tile.
    candidates = [c for c in FORWARD_CONFIGS if not c.get("GATHER") or c["BLOCK_T"] >= 8 * (width - 1)]
    with on_device(x):
        launch(_config(FORWARD_TUNER, key, launch, config, candidates))
    return y, new_state


def _silu_backward(dy: Tensor, x: Tensor, weight: Tensor, bias: Tensor | None, conv_state: Tensor | None) -> Tensor:
    """dL/d pre-activation = dy · SiLU'(pre), (B, T, D) in dy's dtype."""
    batch, seqlen, dim = x.shape
    width = weight.shape[1]
    dpre = torch.empty((batch, seqlen, dim), dtype=dy.dtype, device=x.device)

    def launch(cfg):
        grid = (batch, triton.cdiv(seqlen, cfg["BLOCK_T"]), triton.cdiv(dim, cfg["BLOCK_D"]))
        _silu_bwd_kernel[grid](
            *strided(x, 3), *strided(weight, 2), bias, *strided(conv_state, 3), *strided(dy, 3), dpre, seqlen, dim,
            HAS_BIAS=bias is not None, HAS_STATE=conv_state is not None, WIDTH=width, **_launch_options(cfg),
        )

    launch(_config(SILU_BACKWARD_TUNER, _key(dim, width, conv_state, x.dtype), launch, None))
    return dpre


def _linear_backward(dpre: Tensor, x: Tensor, weight: Tensor, conv_state: Tensor | None, dx: Tensor,
                     dstate: Tensor | None, config: dict | None) -> tuple[Tensor, Tensor]:
    """Fill dx (and dstate's part through y) from dL/d pre-activation; return (dweight, dbias) in float32."""
    batch, seqlen, dim = x.shape
    width = weight.shape[1]
    parts = {}

    def launch(cfg):
        blocks = triton.cdiv(seqlen, cfg["BLOCK_T"])
        parts["dweight"] = torch.empty((batch, blocks, width, dim), dtype=torch.float32, device=x.device)
        parts["dbias"] = torch.empty((batch, blocks, dim), dtype=torch.float32, device=x.device)
        _conv_bwd_kernel[(batch, blocks, triton.cdiv(dim, cfg["BLOCK_D"]))](
            *strided(x, 3), *strided(weight, 2), *strided(conv_state, 3), *strided(dpre, 3), *strided(dx, 3), dstate,
            parts["dweight"], parts["dbias"], seqlen, dim,
            HAS_STATE=conv_state is not None, WIDTH=width, BLOCK_K=max(1, triton.next_power_of_2(width - 1)),
            **_launch_options(cfg),
        )

    launch(_config(BACKWARD_TUNER, _key(dim, width, conv_state, x.dtype), launch, config))
    return parts["dweight"].sum((0, 1)).t(), parts["dbias"].sum((0, 1))


def causal_conv1d_backward(
    dy: Tensor,
    dnew_state: Tensor | None,
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    conv_state: Tensor | None,
    silu: bool,
    *,
    config: dict | None = None,
) -> tuple[Tensor, Tensor, Tensor | None, Tensor | None]:
    """Run the backward kernels: (dx, dweight, dbias, dconv_state), each in its input's dtype, None when absent.
    With the SiLU, a first pass writes dL/d pre-activation (the pre-activation recomputed once per output); the
    second sums it over the taps (config: that pass's, to bypass its autotuner)."""
    batch, seqlen, dim = x.shape
    width = weight.shape[1]
    device = x.device
    dx = torch.empty((batch, seqlen, dim), dtype=x.dtype, device=device)
    dstate = torch.zeros((batch, dim, width - 1), dtype=torch.float32, device=device) if conv_state is not None else None
    dweight = torch.zeros((dim, width), dtype=torch.float32, device=device)
    dbias = torch.zeros((dim,), dtype=torch.float32, device=device)
    if batch == 0 or dim == 0 or seqlen == 0:
        dx.zero_()
    else:
        with on_device(x):
            dpre = _silu_backward(dy, x, weight, bias, conv_state) if silu else dy
            dweight, dbias = _linear_backward(dpre, x, weight, conv_state, dx, dstate, config)
    if dnew_state is not None:  # the new state is x̃[T + j]: from x where T-(K-1)+j ≥ 0, else from the old state
        for j in range(width - 1):
            src = seqlen - (width - 1) + j
            if src >= 0:
                dx[:, src] += dnew_state[:, :, j].to(dx.dtype)
            elif dstate is not None:
                dstate[:, :, src + width - 1] += dnew_state[:, :, j].float()
    return (dx, dweight.to(weight.dtype), dbias.to(bias.dtype) if bias is not None else None,
            dstate.to(conv_state.dtype) if dstate is not None else None)


# ---------------------------------------------------------------------------------------------------------------
# Custom ops
# ---------------------------------------------------------------------------------------------------------------


def _forward_impl(x: Tensor, weight: Tensor, bias: Tensor | None, conv_state: Tensor | None,
                  silu: bool) -> tuple[Tensor, Tensor]:
    """archgen_v1::causal_conv1d -> (y, new_conv_state). CPU tensors take the reference (outside the kernel tests)."""
    if not (x.is_cuda or triton_on_cpu()):
        return causal_conv1d_reference(x, weight, bias, conv_state, "silu" if silu else None)
    return causal_conv1d_forward(x, weight, bias, conv_state, silu)


def _forward_fake(x, weight, bias, conv_state, silu):
    batch, seqlen, dim = x.shape
    return x.new_empty((batch, seqlen, dim)), x.new_empty((batch, dim, weight.shape[1] - 1))


def _backward_impl(dy: Tensor, dnew_state: Tensor | None, x: Tensor, weight: Tensor, bias: Tensor | None,
                   conv_state: Tensor | None, silu: bool) -> list[Tensor]:
    """archgen_v1::causal_conv1d_backward -> [dx, dweight, dbias, dconv_state]; absent inputs get empty (0,) tensors."""
    grads = causal_conv1d_backward(dy, dnew_state, x, weight, bias, conv_state, silu)
    return [g if g is not None else x.new_empty((0,)) for g in grads]


def _backward_fake(dy, dnew_state, x, weight, bias, conv_state, silu):
    def like(t):
        return torch.empty_like(t, memory_format=torch.contiguous_format) if t is not None else x.new_empty((0,))

    return [like(x), like(weight), like(bias), like(conv_state)]


def _setup_context(ctx, inputs, output):
    x, weight, bias, conv_state, silu = inputs
    ctx.save_for_backward(x, weight, bias, conv_state)
    ctx.silu = silu
    ctx.set_materialize_grads(False)


def _backward(ctx, dy, dnew_state):
    x, weight, bias, conv_state = ctx.saved_tensors
    if dy is None:
        dy = torch.zeros_like(x)
    dx, dweight, dbias, dstate = causal_conv1d_backward_op(dy, dnew_state, x, weight, bias, conv_state, ctx.silu)
    return (dx, dweight, dbias if bias is not None else None, dstate if conv_state is not None else None, None)


causal_conv1d_backward_op = register_op("causal_conv1d_backward", _backward_impl, _backward_fake)
causal_conv1d_op = register_op("causal_conv1d", _forward_impl, _forward_fake, backward=_backward,
                               setup_context=_setup_context)


# ---------------------------------------------------------------------------------------------------------------
# Entry points and reference
# ---------------------------------------------------------------------------------------------------------------


def causal_conv1d(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None = None,
    conv_state: Tensor | None = None,
    activation: str | None = None,
) -> tuple[Tensor, Tensor]:
    """The fused causal conv1d (+ SiLU with activation="silu"), differentiable: (y, new_conv_state), as ops/ssm.py's
    `causal_conv1d` followed by the activation. Needs CUDA tensors (or TRITON_INTERPRET=1)."""
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
    if not (x.is_cuda or triton_on_cpu() or torch.compiler.is_exporting()):
        raise RuntimeError(f"the Triton causal_conv1d kernel needs CUDA tensors, got x on {x.device}: call the "
                           "reference (ops/ssm.py causal_conv1d) instead, or set TRITON_INTERPRET=1 before importing "
                           "triton (slow; for tests)")
    return causal_conv1d_op(x, weight, bias, conv_state, activation == "silu")


def causal_conv1d_update(
    x: Tensor,
    conv_state: Tensor,
    weight: Tensor,
    bias: Tensor | None = None,
    activation: str | None = None,
) -> tuple[Tensor, Tensor]:
    """One decoding step: x (B, D) -> (y (B, D), new_conv_state (B, D, K-1)); `conv_state` is left untouched (copy
    the result into the cache). The forward kernel at T = 1: one launch, the state update included."""
    y, new_state = causal_conv1d(x.unsqueeze(1), weight, bias, conv_state, activation)
    return y.squeeze(1), new_state


def causal_conv1d_reference(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None = None,
    conv_state: Tensor | None = None,
    activation: str | None = None,
) -> tuple[Tensor, Tensor]:
    """The same computation with torch's grouped conv1d in float32 (float64 for float64 inputs): the tests' truth."""
    batch, _, dim = x.shape
    width = weight.shape[1]
    acc = torch.float64 if x.dtype == torch.float64 or weight.dtype == torch.float64 else torch.float32
    if conv_state is None:
        conv_state = x.new_zeros(batch, dim, width - 1)
    extended = torch.cat([conv_state.transpose(1, 2).to(x.dtype), x], dim=1)  # (B, K-1+T, D)
    y = F.conv1d(extended.to(acc).transpose(1, 2), weight.to(acc).unsqueeze(1),
                 bias.to(acc) if bias is not None else None, groups=dim).transpose(1, 2)  # (B, T, D)
    if activation == "silu":
        y = F.silu(y)
    new_state = extended[:, extended.shape[1] - (width - 1):].transpose(1, 2).contiguous()
    return y.to(x.dtype), new_state


def decomposition(reference, max_seqlen: int) -> dict:
    """{archgen_v1::causal_conv1d: the op written with `reference`} (ops/ssm.py's causal_conv1d), for ONNX."""

    def causal_conv1d_decomposed(x, weight, bias, conv_state, silu):
        y, new_state = reference(x, weight, bias, conv_state)
        return (F.silu(y) if silu else y), new_state

    return {op_overload("causal_conv1d"): causal_conv1d_decomposed}


def _check_inputs(x, weight, bias, conv_state) -> None:
    if x.dim() != 3 or weight.dim() != 2:
        raise ValueError(f"x must be (B, T, D) and weight (D, K), got {tuple(x.shape)} and {tuple(weight.shape)}")
    batch, _, dim = x.shape
    width = weight.shape[1]
    expected = {"weight": (weight, (dim, width)), "bias": (bias, (dim,)),
                "conv_state": (conv_state, (batch, dim, width - 1))}
    for name, (t, shape) in expected.items():
        if t is None:
            continue
        if tuple(t.shape) != shape:
            raise ValueError(f"{name} must have shape {shape} for x {tuple(x.shape)} and K = {width}, got "
                             f"{tuple(t.shape)}")
        if t.dtype not in SUPPORTED_DTYPES:
            raise TypeError(f"{name} is {t.dtype}; the kernels take {', '.join(map(str, SUPPORTED_DTYPES))}")
    if x.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"x is {x.dtype}; the kernels take {', '.join(map(str, SUPPORTED_DTYPES))}")
    if width < 1 or width > 16:
        raise ValueError(f"the kernel width K must be between 1 and 16, got {width}")
    if x.device.type != "cuda" and not interpreting():
        raise RuntimeError(f"the Triton kernels need CUDA tensors, got {x.device}")
