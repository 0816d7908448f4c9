"""The MoE router in one pass: softmax, top-k and the statistics of both auxiliary losses in one Triton kernel
(forward), the gradient reaching the router logits in another (backward); the custom ops, their autotune space and
the reference.

For router logits z (N, E) and the tokens that count for the losses (valid (N,) bool, all by default; V of them)::

    p = softmax(z)                          (w, i) = top-k(p),  w <- w / Σ w  if normalize
    load balancing  = E · Σ_e f_e · P_e     f_e = (assignments of the counted tokens to e) / (V·k)    (no gradient)
                                            P_e = Σ_counted p[:, e] / V
    z-loss          = Σ_counted lse(z)² / V

the definitions of ops/moe.py's route_top_k, load_balancing_loss and router_z_loss, computed in float32. The kernel
writes the routing (expert_index (N, k) int64, expert_weight (N, k) float32) and, per program, the partial sums of
f's counts, of P and of lse²; torch adds the partials (deterministic, no atomics) and forms the two losses.
Backward, with g the gradient reaching p (dP_e / V from the balance, and through the weights: dw / S − Σ dw·w / S
for the chosen experts when normalised, S = Σ_chosen p; dw unnormalised)::

    dz = p · (g − Σ_e p·g)  +  (d z-loss / V) · 2 · lse · p      (the z-loss term for counted tokens only)

Why a kernel: the reference runs a softmax for the routing and another for the balance, a top-k, a logsumexp, a
scatter-add of the counts and a dozen small reductions and elementwise ops, forward and again backward: a few
dozen launches over (N, E) tensors, each too small to fill the GPU. Here one launch reads the logits once forward
and once backward.

How: a program takes BLOCK_N tokens, all E experts in one (BLOCK_N, next_pow2(E)) tile; top-k is k rounds of
arg-max (lowest expert on ties) with the chosen expert masked out; lse (N,) is saved for the backward.

Contents: `moe_router` (the entry point: differentiable), the custom ops `archgen_v1::moe_router` and
`archgen_v1::moe_router_backward` (fake implementations, autograd), the launchers `moe_router_forward` /
`moe_router_backward` with their autotune space, `moe_router_reference`, and `decomposition` for ONNX. CPU tensors
take the reference unless TRITON_INTERPRET=1 and ARCHGEN_TRITON_ON_CPU=1 (the tests).
"""

import torch
import triton
import triton.language as tl
from torch import Tensor

from .triton_support import (
    Autotuner,
    calls_implementation_directly,
    dtype_name,
    on_device,
    op_overload,
    register_op,
    triton_on_cpu,
)

SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
MAX_EXPERTS = 1024
"""Most experts one tile holds (a program keeps BLOCK_N × next_pow2(E) float32 values in registers)."""
MAX_TILE = 8192
"""Most elements of a program's (BLOCK_N, next_pow2(E)) tile: a few float32 copies of it stay live in registers."""
CONFIGS = [{"BLOCK_N": rows, "num_warps": warps} for rows in (32, 64, 128) for warps in (2, 4)]
DEFAULT_CONFIG = {"BLOCK_N": 64, "num_warps": 4}
INTERPRETER_CONFIG = {"BLOCK_N": 16, "num_warps": 1}


# ---------------------------------------------------------------------------------------------------------------
# Kernels
# ---------------------------------------------------------------------------------------------------------------


@triton.jit
def _router_fwd_kernel(
    logits_ptr, valid_ptr, index_ptr, weight_ptr, lse_ptr, counts_ptr, prob_sums_ptr, z_sums_ptr,
    N, E, stride_logits,
    TOP_K: tl.constexpr, NORMALIZE: tl.constexpr, HAS_VALID: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_K: tl.constexpr,
):
    program = tl.program_id(0)
    rows = program * BLOCK_N + tl.arange(0, BLOCK_N)
    experts = tl.arange(0, BLOCK_E)
    row_inside = rows < N
    inside = row_inside[:, None] & (experts < E)[None, :]
    rows64 = rows.to(tl.int64)
    z = tl.load(logits_ptr + rows64[:, None] * stride_logits + experts[None, :], mask=inside,
                other=-float("inf")).to(tl.float32)
    z_max = tl.where(row_inside, tl.max(z, axis=1), 0.0)
    e = tl.exp(z - z_max[:, None])
    total = tl.where(row_inside, tl.sum(e, axis=1), 1.0)  # rows past N (all -inf) stay finite
    p = e / total[:, None]
    lse = z_max + tl.log(total)
    tl.store(lse_ptr + rows, lse, mask=row_inside)

    counted = row_inside
    if HAS_VALID:
        counted = counted & (tl.load(valid_ptr + rows, mask=row_inside, other=0) != 0)
    counted_f = counted.to(tl.float32)

    remaining = tl.where(inside, p, -1.0)
    slots = tl.arange(0, BLOCK_K)
    chosen = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.int32)
    chosen_p = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    counts = tl.zeros((BLOCK_E,), dtype=tl.float32)
    for j in tl.static_range(TOP_K):
        best = tl.max(remaining, axis=1)
        pick = tl.min(tl.where(remaining == best[:, None], experts[None, :], BLOCK_E), axis=1)  # lowest on ties
        is_pick = experts[None, :] == pick[:, None]
        chosen = tl.where(slots[None, :] == j, pick[:, None], chosen)
        chosen_p = tl.where(slots[None, :] == j, best[:, None], chosen_p)
        counts += tl.sum(tl.where(is_pick, counted_f[:, None], 0.0), axis=0)
        remaining = tl.where(is_pick, -1.0, remaining)
    if NORMALIZE:  # the k weights sum to one
        chosen_p = chosen_p / tl.sum(chosen_p, axis=1)[:, None]
    out_at = rows64[:, None] * TOP_K + slots[None, :]
    out_inside = row_inside[:, None] & (slots < TOP_K)[None, :]
    tl.store(index_ptr + out_at, chosen.to(tl.int64), mask=out_inside)
    tl.store(weight_ptr + out_at, chosen_p, mask=out_inside)

    tl.store(counts_ptr + program * E + experts, counts, mask=experts < E)
    tl.store(prob_sums_ptr + program * E + experts, tl.sum(tl.where(counted[:, None], p, 0.0), axis=0),
             mask=experts < E)
    tl.store(z_sums_ptr + program, tl.sum(tl.where(counted, lse * lse, 0.0), axis=0))


@triton.jit
def _router_bwd_kernel(
    logits_ptr, valid_ptr, index_ptr, weight_ptr, lse_ptr, d_weight_ptr, d_prob_sums_ptr, d_z_sum_ptr, d_logits_ptr,
    N, E, stride_logits, stride_d_logits,
    TOP_K: tl.constexpr, NORMALIZE: tl.constexpr, HAS_VALID: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_E: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    experts = tl.arange(0, BLOCK_E)
    row_inside = rows < N
    expert_inside = experts < E
    inside = row_inside[:, None] & expert_inside[None, :]
    rows64 = rows.to(tl.int64)
    z = tl.load(logits_ptr + rows64[:, None] * stride_logits + experts[None, :], mask=inside,
                other=-float("inf")).to(tl.float32)
    lse = tl.load(lse_ptr + rows, mask=row_inside, other=0.0)
    p = tl.where(inside, tl.exp(z - lse[:, None]), 0.0)

    counted = row_inside
    if HAS_VALID:
        counted = counted & (tl.load(valid_ptr + rows, mask=row_inside, other=0) != 0)
    d_prob_sums = tl.load(d_prob_sums_ptr + experts, mask=expert_inside, other=0.0)
    g = tl.where(counted[:, None], d_prob_sums[None, :], 0.0)  # dL/dp from Σ_counted p

    if NORMALIZE:  # w_j = p_j / S, S = Σ_chosen p: dL/dp_j = (dw_j − Σ_l dw_l · w_l) / S
        weighted = tl.zeros((BLOCK_N,), dtype=tl.float32)
        chosen_total = tl.zeros((BLOCK_N,), dtype=tl.float32)
        for j in tl.static_range(TOP_K):
            pick = tl.load(index_ptr + rows64 * TOP_K + j, mask=row_inside, other=-1)
            w = tl.load(weight_ptr + rows64 * TOP_K + j, mask=row_inside, other=0.0)
            dw = tl.load(d_weight_ptr + rows64 * TOP_K + j, mask=row_inside, other=0.0)
            weighted += dw * w
            chosen_total += tl.sum(tl.where(experts[None, :] == pick[:, None], p, 0.0), axis=1)
        chosen_total = tl.where(row_inside, chosen_total, 1.0)
    for j in tl.static_range(TOP_K):
        pick = tl.load(index_ptr + rows64 * TOP_K + j, mask=row_inside, other=-1)
        dw = tl.load(d_weight_ptr + rows64 * TOP_K + j, mask=row_inside, other=0.0)
        if NORMALIZE:
            dw = (dw - weighted) / chosen_total
        g += tl.where(experts[None, :] == pick[:, None], dw[:, None], 0.0)

    dz = p * (g - tl.sum(p * g, axis=1)[:, None])
    d_z_sum = tl.load(d_z_sum_ptr)
    dz += tl.where(counted[:, None], (2.0 * d_z_sum) * lse[:, None] * p, 0.0)
    tl.store(d_logits_ptr + rows64[:, None] * stride_d_logits + experts[None, :],
             dz.to(d_logits_ptr.dtype.element_ty), mask=inside)


# ---------------------------------------------------------------------------------------------------------------
# Launchers and tuning
# ---------------------------------------------------------------------------------------------------------------


FORWARD_TUNER = Autotuner("moe_router.forward", CONFIGS, INTERPRETER_CONFIG, default=DEFAULT_CONFIG)
BACKWARD_TUNER = Autotuner("moe_router.backward", CONFIGS, INTERPRETER_CONFIG, default=DEFAULT_CONFIG)


def shape_key(E: int, top_k: int, dtype: torch.dtype) -> str:
    """The tuning bucket: experts (as their tile's width), top-k and dtype; the token count only scales the grid."""
    return f"E{triton.next_power_of_2(E)}-k{top_k}-{dtype_name(dtype)}"


def candidates(E: int) -> list[dict]:
    """The configs whose (BLOCK_N, next_pow2(E)) float32 tile stays within MAX_TILE elements (registers), the
    default first; for very many experts, one config of as many rows as fit."""
    width = triton.next_power_of_2(E)
    fitting = [c for c in CONFIGS if c["BLOCK_N"] * width <= MAX_TILE]
    if not fitting:
        return [{"BLOCK_N": max(MAX_TILE // width, 1), "num_warps": 4}]
    return sorted(fitting, key=lambda c: c != DEFAULT_CONFIG)


def _config(tuner: Autotuner, key: str, launch, explicit: dict | None, E: int) -> dict:
    known = tuner.known(key, explicit)
    return known if known is not None else tuner.tune(key, launch, candidates(E))


def moe_router_forward(logits: Tensor, valid: Tensor | None, top_k: int, normalize: bool, *,
                       config: dict | None = None) -> tuple[Tensor, ...]:
    """Run the forward kernel: (expert_index (N, k) int64, expert_weight (N, k) float32, lse (N,) float32,
    counts (E,), prob_sums (E,), z_sum ()) with the sums over the counted tokens, all float32."""
    N, E = logits.shape
    device = logits.device
    index = torch.empty((N, top_k), dtype=torch.int64, device=device)
    weight = torch.empty((N, top_k), dtype=torch.float32, device=device)
    lse = torch.empty((N,), dtype=torch.float32, device=device)
    partial = {}

    def launch(cfg):
        programs = triton.cdiv(N, cfg["BLOCK_N"])
        partial["counts"] = torch.empty((programs, E), dtype=torch.float32, device=device)
        partial["prob_sums"] = torch.empty((programs, E), dtype=torch.float32, device=device)
        partial["z_sums"] = torch.empty((programs,), dtype=torch.float32, device=device)
        _router_fwd_kernel[(programs,)](
            logits, valid if valid is not None else logits, index, weight, lse, partial["counts"],
            partial["prob_sums"], partial["z_sums"], N, E, logits.stride(0), TOP_K=top_k, NORMALIZE=normalize,
            HAS_VALID=valid is not None, BLOCK_N=cfg["BLOCK_N"], BLOCK_E=triton.next_power_of_2(E),
            BLOCK_K=triton.next_power_of_2(top_k), num_warps=cfg["num_warps"])

    if not N:
        zeros = torch.zeros((E,), dtype=torch.float32, device=device)
        return index, weight, lse, zeros, zeros.clone(), zeros.new_zeros(())
    with on_device(logits):
        launch(_config(FORWARD_TUNER, shape_key(E, top_k, logits.dtype), launch, config, E))
    return (index, weight, lse, partial["counts"].sum(dim=0), partial["prob_sums"].sum(dim=0),
            partial["z_sums"].sum())


def moe_router_backward(d_weight: Tensor, d_prob_sums: Tensor, d_z_sum: Tensor, logits: Tensor, valid: Tensor | None,
                        index: Tensor, weight: Tensor, lse: Tensor, normalize: bool, *,
                        config: dict | None = None) -> Tensor:
    """Run the backward kernel: the gradient reaching the logits (N, E), in their dtype."""
    N, E = logits.shape
    top_k = index.shape[1]
    d_logits = torch.empty_like(logits, memory_format=torch.contiguous_format)
    d_weight = d_weight.to(torch.float32).contiguous()
    d_prob_sums = d_prob_sums.to(torch.float32).contiguous()
    d_z_sum = d_z_sum.to(torch.float32).reshape(1)

    def launch(cfg):
        _router_bwd_kernel[(triton.cdiv(N, cfg["BLOCK_N"]),)](
            logits, valid if valid is not None else logits, index, weight, lse, d_weight, d_prob_sums, d_z_sum,
            d_logits, N, E, logits.stride(0), d_logits.stride(0), TOP_K=top_k, NORMALIZE=normalize,
            HAS_VALID=valid is not None, BLOCK_N=cfg["BLOCK_N"], BLOCK_E=triton.next_power_of_2(E),
            num_warps=cfg["num_warps"])

    if N:
        with on_device(logits):
            launch(_config(BACKWARD_TUNER, shape_key(E, top_k, logits.dtype), launch, config, E))
    return d_logits


def autotune(config: dict, params: dict[str, tuple[int, ...]], batch: int, seqlen: int, dtype: torch.dtype,
             device: torch.device | str) -> None:
    """The build-time tuning hook (`archgen build --autotune`): route batch × seqlen tokens over the experts of a
    MoE op of this resolved config (top_k, normalize_top_k) and these parameter shapes (router.weight (E, d)),
    forward and backward, so that inside triton_support.tuning_session() each tuner tunes that bucket. The router's
    logits are float32 whatever the model's dtype (the layer upcasts them)."""
    del dtype
    E = params["router.weight"][0]
    generator = torch.Generator(device=device).manual_seed(0)
    logits = torch.randn((batch * seqlen, E), generator=generator, device=device)
    normalize = config.get("normalize_top_k", True)
    index, weight, lse, _, _, _ = moe_router_forward(logits, None, config["top_k"], normalize)
    moe_router_backward(torch.ones_like(weight), torch.ones(E, device=device), torch.ones((), device=device), logits,
                        None, index, weight, lse, normalize)


# ---------------------------------------------------------------------------------------------------------------
# Custom ops
# ---------------------------------------------------------------------------------------------------------------


def _use_kernel(t: Tensor) -> bool:
    return t.is_cuda or triton_on_cpu()


def _forward_impl(logits: Tensor, valid: Tensor | None, top_k: int,
                  normalize: bool) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """archgen_v1::moe_router -> (expert_index, expert_weight, lse, counts, prob_sums, z_sum)."""
    if not _use_kernel(logits):
        return _reference_parts(logits, valid, top_k, normalize)
    return moe_router_forward(logits, valid, top_k, normalize)


def _forward_fake(logits, valid, top_k, normalize):
    N, E = logits.shape
    f32 = torch.float32
    return (logits.new_empty((N, top_k), dtype=torch.int64), logits.new_empty((N, top_k), dtype=f32),
            logits.new_empty((N,), dtype=f32), logits.new_empty((E,), dtype=f32), logits.new_empty((E,), dtype=f32),
            logits.new_empty((), dtype=f32))


def _backward_impl(d_weight: Tensor, d_prob_sums: Tensor, d_z_sum: Tensor, logits: Tensor, valid: Tensor | None,
                   index: Tensor, weight: Tensor, lse: Tensor, normalize: bool) -> Tensor:
    """archgen_v1::moe_router_backward -> d_logits. CPU tensors take autograd through the reference parts."""
    if not _use_kernel(logits):
        with torch.enable_grad():
            leaf = logits.detach().requires_grad_()
            _, w, _, _, prob_sums, z_sum = _reference_parts(leaf, valid, index.shape[1], normalize)
            (d_logits,) = torch.autograd.grad((w, prob_sums, z_sum), leaf, (d_weight, d_prob_sums, d_z_sum))
        return d_logits
    return moe_router_backward(d_weight, d_prob_sums, d_z_sum, logits, valid, index, weight, lse, normalize)


def _backward_fake(d_weight, d_prob_sums, d_z_sum, logits, valid, index, weight, lse, normalize):
    return torch.empty_like(logits, memory_format=torch.contiguous_format)


def _setup_context(ctx, inputs, output):
    logits, valid, _top_k, normalize = inputs
    index, weight, lse, counts, _, _ = output
    ctx.save_for_backward(logits, valid, index, weight, lse)
    ctx.normalize = normalize
    ctx.mark_non_differentiable(index, lse, counts)
    ctx.backward = backward_op


def _backward(ctx, _d_index, d_weight, _d_lse, _d_counts, d_prob_sums, d_z_sum):
    logits, valid, index, weight, lse = ctx.saved_tensors
    d_logits = ctx.backward(d_weight, d_prob_sums, d_z_sum, logits, valid, index, weight, lse, ctx.normalize)
    return d_logits, None, None, None


backward_op = register_op("moe_router_backward", _backward_impl, _backward_fake)
router_op = register_op("moe_router", _forward_impl, _forward_fake, backward=_backward, setup_context=_setup_context)


class _EagerRouter(torch.autograd.Function):
    """archgen_v1::moe_router's implementation and autograd without the custom ops' dispatch, for eager mode, as
    kernels/rmsnorm.py does (there the custom ops' dispatch cost the host 0.21 ms per forward+backward on the H200;
    the router's kernels take a few microseconds, so its call is all host time). torch.compile and torch.export
    take the custom ops."""

    @staticmethod
    def forward(ctx, logits, valid, top_k, normalize):
        output = _forward_impl(logits, valid, top_k, normalize)
        _setup_context(ctx, (logits, valid, top_k, normalize), output)
        ctx.backward = _backward_impl
        return output

    backward = staticmethod(_backward)



# ---------------------------------------------------------------------------------------------------------------
# Entry point and reference
# ---------------------------------------------------------------------------------------------------------------


def moe_router(router_logits: Tensor, top_k: int, normalize: bool = True,
               valid: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(expert_index (N, k), expert_weight (N, k), load_balancing, z_loss): ops/moe.py's `moe_router`, in one pass;
    differentiable in the logits through the weights and both losses. router_logits (N, E); valid (N,) bool marks
    the tokens the losses count (a ragged batch's pads left out)."""
    _check(router_logits, top_k, valid)
    N, E = router_logits.shape
    valid = valid.contiguous() if valid is not None else None
    op = _EagerRouter.apply if calls_implementation_directly(router_logits) else router_op
    index, weight, _, counts, prob_sums, z_sum = op(router_logits.contiguous(), valid, top_k, normalize)
    tokens = N if valid is None else valid.sum().clamp(min=1)
    load_balancing = E * (counts / (tokens * top_k) * prob_sums / tokens).sum()
    return index, weight, load_balancing, z_sum / tokens


def _check(logits: Tensor, top_k: int, valid: Tensor | None) -> None:
    if logits.dim() != 2:
        raise ValueError(f"expected router logits of shape (N, E), got {tuple(logits.shape)}; flatten batch and time first")
    N, E = logits.shape
    if logits.dtype not in SUPPORTED_DTYPES:
        raise ValueError(f"the router kernel takes logits of {SUPPORTED_DTYPES}, got {logits.dtype}")
    if not 1 <= top_k <= E:
        raise ValueError(f"top_k must be in [1, {E}] for {E} experts, got {top_k}")
    if E > MAX_EXPERTS:
        raise ValueError(f"the router kernel holds at most {MAX_EXPERTS} experts per tile, got {E}: use the reference")
    if valid is not None and (valid.shape != (N,) or valid.dtype != torch.bool):
        raise ValueError(f"valid must be ({N},) bool, got {tuple(valid.shape)} {valid.dtype}")


def _reference_parts(logits: Tensor, valid: Tensor | None, top_k: int, normalize: bool) -> tuple[Tensor, ...]:
    """The op's outputs written with torch (float32, or wider for float64 logits)."""
    z = logits.to(torch.promote_types(logits.dtype, torch.float32))
    p = z.softmax(dim=-1)
    weight, index = p.topk(top_k, dim=-1)
    if normalize:
        weight = weight / weight.sum(dim=-1, keepdim=True)
    lse = torch.logsumexp(z, dim=-1)
    counted = torch.ones_like(lse) if valid is None else valid.to(lse.dtype)
    counts = torch.zeros(z.shape[1], dtype=lse.dtype, device=z.device)
    counts = counts.scatter_add(0, index.reshape(-1), counted[:, None].expand(-1, top_k).reshape(-1))
    return index, weight, lse, counts, (p * counted[:, None]).sum(dim=0), (lse.square() * counted).sum()


def moe_router_reference(router_logits: Tensor, top_k: int, normalize: bool = True,
                         valid: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The same four results from _reference_parts: what the tests compare the kernel with."""
    N, E = router_logits.shape
    index, weight, _, counts, prob_sums, z_sum = _reference_parts(router_logits, valid, top_k, normalize)
    tokens = N if valid is None else valid.sum().clamp(min=1)
    return index, weight, E * (counts / (tokens * top_k) * prob_sums / tokens).sum(), z_sum / tokens


def decomposition(reference=None, max_seqlen: int | None = None) -> dict:
    """{archgen_v1::moe_router: its outputs written with torch ops}: how exporters that cannot run Triton (ONNX) lower
    it. The op's outputs are the parts the losses are formed from, not the package reference's (ops/moe.py
    `moe_router`) results, so they are written with this file's _reference_parts; `reference` and `max_seqlen` are
    accepted for the common signature of kernels' decompositions."""
    del reference, max_seqlen
    return {op_overload("moe_router"): _reference_parts}
