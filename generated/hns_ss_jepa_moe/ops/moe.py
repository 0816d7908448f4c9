"""Mixture-of-experts routing and expert computation: the pure-PyTorch reference.

Copied verbatim into every generated package as ``ops/moe.py``; it imports only torch and the standard
library.

- ``route_top_k``: softmax over experts, keep the k most probable, optionally renormalise their weights.
- ``moe_forward``: route, then run the experts on exactly the N*k assignments. Two forms of one function:
  - ``moe_grouped`` (eager, training and inference): the assignments sorted by expert, each expert's rows a
    contiguous range; the experts run as grouped GEMMs (``torch._grouped_mm`` on a CUDA GPU with sm90+ and bf16
    operands, else one matmul per expert over its range), then the rows go back to token order and combine.
    Permutations are gathers both ways (backward too): no scatter-add, deterministic.
    With the experts spread over processes (expert parallelism), ``experts_on_processes`` sends the rows to the
    process holding their expert and the outputs back (all_to_all).
  - ``moe_fixed_buffer`` (what torch.export / ONNX trace): two ``torch.bmm`` over a fixed-shape (E, C, d)
    buffer, so every shape is known from N alone and there is no data-dependent control flow; dropless, it
    computes E/k times the useful rows.
- capacity: dropless by default; with a capacity factor each expert keeps its first C assignments in token order
  and the rest contribute zero.
- auxiliary terms: Switch/GShard load balancing, ST-MoE router z-loss, routing entropy.

Shapes: N tokens (batch and time flattened), d = d_model, E experts, k = top_k, h = expert hidden size,
C = slots per expert. Routing, the weighted combine and the losses run in float32 (float64 stays float64); the
expert matmuls run in the dtype of x and the weights, as nn.Linear would.
"""

import math
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor


def _relu2(x: Tensor) -> Tensor:
    return F.relu(x).square()


# name -> (nonlinearity, gated). A gated expert's w_in is (E, d, 2h) laid out [gate | up]: act(x@gate) * (x@up).
ACTIVATIONS: dict[str, tuple[Callable[[Tensor], Tensor], bool]] = {
    "swiglu": (F.silu, True),
    "geglu": (F.gelu, True),
    "gelu": (F.gelu, False),
    "silu": (F.silu, False),
    "relu2": (_relu2, False),
}


@dataclass
class RouterOutput:
    """The top-k routing decision for N tokens over E experts."""

    expert_index: Tensor  # (N, k) long, chosen experts, most probable first
    expert_weight: Tensor  # (N, k) float32 or wider, their combine weights
    router_probs: Tensor | None  # (N, E) softmax over experts, same dtype; None when the caller routed (moe_router)
    router_logits: Tensor  # (N, E) same dtype


def route_top_k(logits: Tensor, top_k: int, normalize: bool = True) -> RouterOutput:
    """Softmax over experts, then keep the k most probable.

        p = softmax(logits),   (w, i) = topk(p, k),   w <- w / sum(w)  if normalize

    logits: (N, E), any float dtype; routing is computed in float32 or wider.
    normalize=True makes the k weights sum to one (Mixtral); False keeps the raw probabilities (Switch, DeepSeek).
    With top_k=1 and normalize=True every weight is exactly 1, so the router gets no gradient through the
    output; use normalize=False there.
    """
    if logits.dim() != 2:
        raise ValueError(
            f"expected router logits of shape (N, E), got {tuple(logits.shape)}; flatten batch and time first"
        )
    n_experts = logits.shape[1]
    if not 1 <= top_k <= n_experts:
        raise ValueError(f"top_k must be in [1, {n_experts}] for {n_experts} experts, got {top_k}")
    logits = _upcast(logits)
    probs = logits.softmax(dim=-1)  # (N, E)
    weight, index = probs.topk(top_k, dim=-1)  # (N, k)
    if normalize:
        weight = weight / weight.sum(dim=-1, keepdim=True)
    return RouterOutput(expert_index=index, expert_weight=weight, router_probs=probs, router_logits=logits)


def moe_router(
    router_logits: Tensor, top_k: int, normalize: bool = True, valid: Tensor | None = None
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The routing and both auxiliary losses of a MoE layer: (expert_index (N, k), expert_weight (N, k),
    load_balancing_loss, router_z_loss), as route_top_k and the two loss functions below define them.

    The Triton kernel of the same name (kernels/moe_router.py) computes all four from one softmax, in one pass;
    this is its reference. valid (N,) bool marks the tokens the losses count (a ragged batch's pads left out).
    """
    routing = route_top_k(router_logits, top_k, normalize)
    n_experts = router_logits.shape[-1]
    return (
        routing.expert_index,
        routing.expert_weight,
        load_balancing_loss(router_logits, routing.expert_index, n_experts, valid=valid),
        router_z_loss(router_logits, valid=valid),
    )


def total_experts(w_in: Tensor, expert_group=None) -> int:
    """E, the experts of the layer: w_in's, or with expert parallelism this process's E / P times the P processes."""
    return w_in.shape[0] * (1 if expert_group is None else dist.get_world_size(expert_group))


def expert_capacity(n_tokens: int, n_experts: int, top_k: int, capacity_factor: float | None = None) -> int:
    """Slots per expert, C.

    Dropless (capacity_factor None): C = n_tokens. A token's k experts are distinct, so no expert can receive more
    than n_tokens assignments; this bound is k times smaller than N*k and still static given N.
    Otherwise C = ceil(capacity_factor * n_tokens * top_k / n_experts), capped at n_tokens (more is never used).
    Exporting with a dynamic N: give the Dim a minimum that keeps C >= 2, or export specialises on C = 1.
    """
    if capacity_factor is None:
        return n_tokens
    if capacity_factor <= 0:
        raise ValueError(f"capacity_factor must be positive or None (dropless), got {capacity_factor}")
    return min(n_tokens, math.ceil(capacity_factor * n_tokens * top_k / n_experts))


def expert_mlp(x: Tensor, w_in: Tensor, w_out: Tensor, activation: str = "swiglu") -> Tensor:
    """Every expert's MLP on its own rows, as two batched matmuls.

        gated:  y = (act(x @ w_gate) * (x @ w_up)) @ w_out,   w_in = [w_gate | w_up]
        plain:  y = act(x @ w_in) @ w_out

    x (E, C, d), w_in (E, d, h) or (E, d, 2h) when gated, w_out (E, h, d) -> (E, C, d). No biases, so rows of
    zeros stay zero.
    """
    act, gated = _activation(activation)
    h = torch.bmm(x, w_in)  # (E, C, h) or (E, C, 2h)
    if gated:
        gate, up = h.chunk(2, dim=-1)  # (E, C, h) each
        h = act(gate) * up
    else:
        h = act(h)
    return torch.bmm(h, w_out)  # (E, C, d)


def moe_forward(
    x: Tensor,
    router_logits: Tensor,
    w_in: Tensor,
    w_out: Tensor,
    *,
    top_k: int,
    activation: str = "swiglu",
    capacity_factor: float | None = None,
    normalize: bool = True,
    fused_swiglu: Callable[[Tensor], Tensor] | None = None,
    valid: Tensor | None = None,
    routing: tuple[Tensor, Tensor] | None = None,
    expert_group=None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Route each token to its top-k experts and sum their outputs, weighted by the router.

        y[n] = sum_j  w[n, j] * expert_{i[n, j]}(x[n])      over the assignments (n, j) that fit in capacity

    x (N, d); router_logits (N, E); w_in (E, d, 2h) gated or (E, d, h); w_out (E, h, d). Returns y (N, d) in the
    dtype of x and stats:
        tokens_per_expert  (E,) long   assignments routed to each expert, before capacity
        dropped            ()   long   assignments over capacity (they contribute zero)
        expert_index       (N, k) long the routing decision, for load_balancing_loss

    Assignment a = n*k + j is numbered token-major and the N*k assignments are stably sorted by expert, so within
    an expert they stay in token order; with capacity C an expert keeps its first C assignments (lower token
    indices win). Eager it runs moe_grouped (only the N*k useful rows); while torch.export traces it runs
    moe_fixed_buffer (static shapes). Both compute the same function.

    fused_swiglu: a drop-in for `swiglu` below (the generated model passes kernels.swiglu, one pass forward and
    backward on CUDA); the grouped form uses it for activation="swiglu", the fixed-buffer form never.
    valid (N,) bool marks a ragged batch's real tokens (False: padding). With a capacity, the pads are routed after
    every real token, so they never take a slot a real token would get; dropless, each token is computed on its own
    and the pads change nothing.
    routing: (expert_index, expert_weight) (N, k) each, already decided from router_logits (the generated layer's
    moe_router, which computes the losses in the same pass); None routes here with route_top_k.
    expert_group: a torch.distributed process group over which the E experts are spread (expert parallelism, set up
    by training): w_in and w_out are then this process's E / P experts, the rank-th block of them, and the rows of
    x are this process's own tokens, routed over all E experts (moe_grouped with experts_on_processes); the same
    function as with every expert on one process.
    """
    if x.dim() != 2:
        raise ValueError(f"expected x of shape (N, d), got {tuple(x.shape)}; flatten batch and time first")
    N, d = x.shape
    E = total_experts(w_in, expert_group)
    _check_expert_weights(w_in, w_out, d, activation)
    if router_logits.shape != (N, E):
        raise ValueError(f"expected router_logits of shape (N, E) = ({N}, {E}), got {tuple(router_logits.shape)}")
    if valid is not None and capacity_factor is not None:
        # The real tokens first (in token order), then the pads: capacity is given out in that order.
        order = torch.argsort((~valid).long() * N + torch.arange(N, device=x.device))  # (N,) unique keys: no stable sort
        inverse = torch.argsort(order)
        if routing is not None:
            routing = (routing[0].index_select(0, order), routing[1].index_select(0, order))
        y, stats = moe_forward(x.index_select(0, order), router_logits.index_select(0, order), w_in, w_out, top_k=top_k,
                               activation=activation, capacity_factor=capacity_factor, normalize=normalize,
                               fused_swiglu=fused_swiglu, routing=routing, expert_group=expert_group)
        return y.index_select(0, inverse), stats | {"expert_index": stats["expert_index"].index_select(0, inverse)}
    if routing is None:
        routing = route_top_k(router_logits, top_k, normalize)
    else:
        routing = RouterOutput(expert_index=routing[0], expert_weight=routing[1], router_probs=None,
                               router_logits=router_logits)
    capacity = expert_capacity(N, E, top_k, capacity_factor)
    # A decode step's few tokens take the fixed-buffer form on a GPU: static shapes and no host sync, so the step can
    # be recorded in a CUDA graph (ops/decoding.py); its E/k waste is a few rows.
    small = x.is_cuda and N <= DECODE_TOKENS
    # Under torch.compile the grouped form needs torch._grouped_mm: its per-expert matmul loop reads the counts on the
    # host (a graph break), so compiled graphs without it take the fixed-buffer form (static shapes, E/k× the rows).
    static = _is_exporting() or (torch.compiler.is_compiling() and not grouped_mm_available(x, w_in, w_out))
    if expert_group is None and (static or small or _capturing()):
        return moe_fixed_buffer(x, routing, w_in, w_out, activation=activation, capacity=capacity)
    return moe_grouped(x, routing, w_in, w_out, activation=activation, capacity=capacity,
                       fused_swiglu=fused_swiglu if activation == "swiglu" else None, expert_group=expert_group)


def moe_grouped(
    x: Tensor, routing: RouterOutput, w_in: Tensor, w_out: Tensor, *, activation: str, capacity: int,
    fused_swiglu: Callable[[Tensor], Tensor] | None = None, expert_group=None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """moe_forward's eager form: the experts compute exactly the N*k assigned rows.

    Sorted by expert, expert e's assignments are rows first[e] .. first[e] + count[e] - 1 of x_sorted; each
    expert's MLP is one matmul pair over its range (grouped_expert_mlp). Assignments past capacity are computed
    and weighted by zero (with capacity they are few; dropless there are none), so every shape is N*k. With an
    expert_group the rows travel to the processes that hold their experts and back (experts_on_processes).
    """
    N, d = x.shape
    E = total_experts(w_in, expert_group)
    top_k = routing.expert_index.shape[1]
    n_assign = N * top_k
    flat_expert = routing.expert_index.reshape(n_assign)  # (N*k,)
    sorted_expert, order = torch.sort(flat_expert, stable=True)  # order: sorted position -> assignment
    positions = torch.arange(n_assign, device=x.device)
    inverse = torch.empty_like(order).scatter_(0, order, positions)  # assignment -> sorted position
    tokens_per_expert = torch.zeros(E, dtype=torch.long, device=x.device)
    tokens_per_expert = tokens_per_expert.scatter_add(0, flat_expert, torch.ones_like(flat_expert))  # (E,)
    first = tokens_per_expert.cumsum(0) - tokens_per_expert  # (E,)
    kept_sorted = positions - first[sorted_expert] < capacity  # (N*k,) rank within its expert < C
    kept = kept_sorted.index_select(0, inverse)  # (N*k,) in assignment order

    x_sorted = DispatchRows.apply(x, order, inverse, top_k)  # (N*k, d) row r is token order[r] // k
    if expert_group is None:
        out_sorted = grouped_expert_mlp(x_sorted, tokens_per_expert, w_in, w_out, activation, fused_swiglu)  # (N*k, d)
    else:
        out_sorted = experts_on_processes(x_sorted, tokens_per_expert, w_in, w_out, activation, fused_swiglu, expert_group)
    out = PermuteRows.apply(out_sorted, inverse, order)  # (N*k, d) back in assignment order
    weight = torch.where(kept.view(N, top_k), routing.expert_weight, 0.0)  # (N, k) dropped assignments weigh 0
    # y = sum_j w[:, j] * out[:, j] in float32, one (N, d) pass per j: each product promotes a row of x's dtype on the
    # fly, where converting the (N, k, d) rows first would write and read them again in float32.
    parts = out.view(N, top_k, d).unbind(dim=1)  # k x (N, d)
    y = parts[0] * weight[:, :1]  # (N, d) float32 (or wider)
    for j in range(1, top_k):
        y = torch.addcmul(y, parts[j], weight[:, j : j + 1])  # (N, d)
    stats = {"tokens_per_expert": tokens_per_expert, "dropped": (~kept).sum(), "expert_index": routing.expert_index}
    return y.to(x.dtype), stats


def grouped_expert_mlp(x_sorted: Tensor, tokens_per_expert: Tensor, w_in: Tensor, w_out: Tensor,
                       activation: str, fused_swiglu: Callable[[Tensor], Tensor] | None = None) -> Tensor:
    """Every expert's MLP on its contiguous range of rows of x_sorted (N*k, d) -> (N*k, d).

    torch._grouped_mm where the GPU runs it (CUDA sm90+, bf16, 16-byte aligned rows); otherwise one matmul pair
    per expert, which needs the counts on the host (one sync). fused_swiglu, if given, replaces the activation.

    torch._grouped_mm's contract (aten GroupMM.cu / GroupMMCommon.cuh, torch/_meta_registrations.py), as called
    here: mat_a 2-D (M_total, K) with its rows split into groups by `offs`, mat_b 3-D (E, K, N); either operand
    row- or column-major (all four combinations are compiled), its other stride a multiple of 16 bytes; offs int32,
    the cumulative END of each group (the last = M_total; an empty group repeats the previous end); bf16 in and out
    with float32 accumulation. Autograd gives d mat_a as a grouped mm against mat_b transposed (2-D x 3-D again)
    and d mat_b as the 2-D x 2-D form, ragged along K, with mat_a transposed (column-major): the layout in which
    an empty group is allowed and no group size needs aligning.
    """
    activate = fused_swiglu or (lambda h: _activate(h, activation))
    if grouped_mm_available(x_sorted, w_in, w_out):
        offsets = tokens_per_expert.cumsum(0).to(torch.int32)  # (E,) end of each expert's rows
        h = torch._grouped_mm(x_sorted.contiguous(), w_in, offs=offsets)  # (N*k, h) or (N*k, 2h)
        return torch._grouped_mm(activate(h).contiguous(), w_out, offs=offsets)  # (N*k, d)
    outputs = []
    for e, rows in enumerate(x_sorted.split(tokens_per_expert.tolist())):
        outputs.append(activate(rows @ w_in[e]) @ w_out[e])  # (n_e, d)
    return torch.cat(outputs)


def experts_on_processes(x_sorted: Tensor, tokens_per_expert: Tensor, w_in: Tensor, w_out: Tensor, activation: str,
                         fused_swiglu: Callable[[Tensor], Tensor] | None, group) -> Tensor:
    """grouped_expert_mlp with the E experts spread over the P processes of `group`, E / P each (process r holds
    experts r·E/P … (r+1)·E/P − 1 as w_in, w_out): x_sorted (N*k, d), this process's rows sorted by expert, and
    tokens_per_expert (E,) -> the experts' outputs (N*k, d) in the same order.

    Sorted by expert, the rows for each process are contiguous. Two all_to_all exchanges (autograd through
    torch.distributed.nn, so the backward sends the gradients the other way): the rows to the processes that hold
    their experts, which run their experts on the rows from every process, and the outputs back. The row counts
    travel first (one small all_to_all, and one host sync for the split sizes).
    """
    from torch.distributed.nn.functional import all_to_all_single

    processes, local = dist.get_world_size(group), w_in.shape[0]
    sending = tokens_per_expert.view(processes, local)  # (P, E/P) rows for each process's experts
    receiving = torch.empty_like(sending)  # (P, E/P) rows from each process for my experts
    dist.all_to_all_single(receiving, sending, group=group)
    send_rows, receive_rows = sending.sum(dim=1).tolist(), receiving.sum(dim=1).tolist()
    rows = all_to_all_single(x_sorted.new_empty(sum(receive_rows), x_sorted.shape[1]), x_sorted, receive_rows,
                             send_rows, group=group)  # (R, d) by sending process, then by expert
    expert = torch.arange(local, device=rows.device).repeat(processes).repeat_interleave(receiving.flatten())  # (R,)
    by_expert = torch.sort(expert, stable=True).indices  # (R,) rows regrouped by my expert, senders in order
    out = grouped_expert_mlp(rows.index_select(0, by_expert), receiving.sum(dim=0), w_in, w_out, activation, fused_swiglu)
    out = out.index_select(0, torch.argsort(by_expert))  # (R, d) back in the order received
    return all_to_all_single(x_sorted.new_empty(x_sorted.shape), out, send_rows, receive_rows, group=group)  # (N*k, d)


# At most this many tokens (a decode step, batch included) run moe_fixed_buffer on CUDA; see moe_forward.
DECODE_TOKENS = 64


def _capturing() -> bool:
    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()


# Set by tests to run the torch._grouped_mm branch where it is not the default (e.g. bf16 on a CPU).
FORCE_GROUPED_MM = False


# torch._grouped_mm on CUDA bf16: on since bench/moe_check.py on an H200 (torch 2.11, 2026-12-01) found every bf16
# form, this one included, within 1e-2 of float32 math with the same routing, outputs and every gradient, at odd
# sizes and at 32,768 tokens. (An earlier check had rounded only one side's router logits to bf16, which flips
# near-tied top-k choices: that, not _grouped_mm, was its 0.06 error.) The per-expert loop stays the fallback where
# _grouped_mm is missing; it is exact everywhere but launches 2E matmuls and syncs once.
USE_GROUPED_MM = True


def grouped_mm_available(x: Tensor, w_in: Tensor, w_out: Tensor) -> bool:
    if not (USE_GROUPED_MM or FORCE_GROUPED_MM) or not hasattr(torch, "_grouped_mm"):
        return False
    if not (x.dtype == w_in.dtype == w_out.dtype == torch.bfloat16):
        return False
    aligned = all(n % 8 == 0 for n in (*x.shape[1:], *w_in.shape[1:], *w_out.shape[1:]))  # 16-byte rows
    if FORCE_GROUPED_MM:
        return aligned
    return aligned and x.is_cuda and _cuda_capability(x.device.index) >= (9, 0)


@cache
def _cuda_capability(index: int | None) -> tuple[int, int]:
    return torch.cuda.get_device_capability(index)


def _activate(h: Tensor, activation: str) -> Tensor:
    act, gated = _activation(activation)
    if gated:
        gate, up = h.chunk(2, dim=-1)
        return act(gate) * up
    return act(h)


def swiglu(h: Tensor) -> Tensor:
    """silu(gate) * up for h (..., 2h) = [gate | up] -> (..., h): the reference of kernels/swiglu.py (its ONNX
    lowering), in the dtype of h as the experts' other element-wise ops."""
    gate, up = h.chunk(2, dim=-1)
    return F.silu(gate) * up


class DispatchRows(torch.autograd.Function):
    """x_sorted[r] = x[order[r] // k]: each token copied to its k sorted rows.

    Backward gathers each token's k row gradients (inverse[n*k + j] is the sorted row of assignment (n, j)) and
    sums them: a gather and a sum, where autograd's indexing backward would scatter-add.
    """

    @staticmethod
    def forward(ctx, x: Tensor, order: Tensor, inverse: Tensor, top_k: int) -> Tensor:
        ctx.save_for_backward(inverse)
        ctx.top_k = top_k
        return x.index_select(0, torch.div(order, top_k, rounding_mode="floor"))

    @staticmethod
    def backward(ctx, grad: Tensor):
        (inverse,) = ctx.saved_tensors
        per_assignment = grad.index_select(0, inverse)  # (N*k, d) in assignment order
        return per_assignment.view(-1, ctx.top_k, grad.shape[-1]).sum(dim=1), None, None, None


class PermuteRows(torch.autograd.Function):
    """y = x[index] for a permutation `index`; backward is the gather by its inverse."""

    @staticmethod
    def forward(ctx, x: Tensor, index: Tensor, inverse: Tensor) -> Tensor:
        ctx.save_for_backward(inverse)
        return x.index_select(0, index)

    @staticmethod
    def backward(ctx, grad: Tensor):
        (inverse,) = ctx.saved_tensors
        return grad.index_select(0, inverse), None, None


def moe_fixed_buffer(
    x: Tensor, routing: RouterOutput, w_in: Tensor, w_out: Tensor, *, activation: str, capacity: int
) -> tuple[Tensor, dict[str, Tensor]]:
    """moe_forward's static-shape form, the one torch.export and ONNX get.

    Dispatch is a gather into an (E, C, d) buffer (empty slots read a zero row), the experts are two bmm, and the
    combine reads each assignment's slot back and sums over its k, so neither writes one place twice: the result
    is deterministic. The dropless buffer is sized for the worst case (all N tokens on one expert), so it
    spends E/k times the necessary FLOPs.
    """
    N, d = x.shape
    E = w_in.shape[0]
    top_k = routing.expert_index.shape[1]
    C = capacity
    n_assign = N * top_k

    # Sort the assignments by expert; `first[e]` is where expert e's run starts in sorted order.
    flat_expert = routing.expert_index.reshape(n_assign)  # (N*k,)
    # The key (expert, assignment) is unique, so any sort keeps token order within an expert: no stable sort, which
    # ONNX does not have.
    key = flat_expert * n_assign + torch.arange(n_assign, device=x.device)  # (N*k,) unique (expert, assignment)
    order = torch.argsort(key)  # (N*k,) sorted position -> assignment
    sorted_expert = flat_expert[order]  # (N*k,)
    tokens_per_expert = torch.zeros(E, dtype=torch.long, device=x.device)
    tokens_per_expert = tokens_per_expert.scatter_add(0, flat_expert, torch.ones_like(flat_expert))  # (E,)
    first = tokens_per_expert.cumsum(0) - tokens_per_expert  # (E,)

    # Dispatch: slot (e, c) holds sorted position first[e] + c if expert e has more than c assignments,
    # else it reads the zero row N.
    slots = torch.arange(C, device=x.device)  # (C,)
    filled = slots < tokens_per_expert[:, None]  # (E, C)
    sorted_pos = (first[:, None] + slots).clamp(max=n_assign - 1)  # (E, C)
    slot_token = torch.where(filled, order[sorted_pos] // top_k, N)  # (E, C)
    x_padded = F.pad(x, (0, 0, 0, 1))  # (N+1, d)
    out = expert_mlp(x_padded[slot_token], w_in, w_out, activation)  # (E, C, d)

    # Combine: each assignment reads back slot (e, rank); those over capacity read the zero slot (e, C).
    rank = torch.arange(n_assign, device=x.device) - first[sorted_expert]  # (N*k,) position within its expert
    kept = rank < C  # (N*k,)
    sorted_rank = torch.where(kept, rank, C)  # (N*k,)
    slot_rank = torch.empty_like(sorted_rank).scatter(0, order, sorted_rank)  # (N*k,) in assignment order
    out_padded = F.pad(out, (0, 0, 0, 1))  # (E, C+1, d)
    y = out_padded[flat_expert, slot_rank].view(N, top_k, d).to(routing.expert_weight.dtype)  # (N, k, d)
    y = (y * routing.expert_weight[..., None]).sum(dim=1)  # (N, d)

    stats = {
        "tokens_per_expert": tokens_per_expert,
        "dropped": (~kept).sum(),
        "expert_index": routing.expert_index,
    }
    return y.to(x.dtype), stats


def load_balancing_loss(router_logits: Tensor, expert_index: Tensor, n_experts: int, valid: Tensor | None = None) -> Tensor:
    """Switch Transformer / GShard auxiliary loss; 1.0 for perfectly uniform routing, E for total collapse.

        loss = E * sum_e f_e * P_e
        f_e  = fraction of the routed assignments that chose expert e   (counts, no gradient)
        P_e  = mean over tokens of softmax(router_logits)[:, e]          (carries the gradient)

    router_logits (..., E); expert_index (..., k) long, e.g. RouterOutput.expert_index or stats["expert_index"].
    valid (...) bool, if given, counts only those tokens (a ragged batch's pads left out).
    """
    if router_logits.shape[-1] != n_experts:
        raise ValueError(f"router_logits has {router_logits.shape[-1]} experts in its last dim, expected {n_experts}")
    probs = _upcast(router_logits).reshape(-1, n_experts).softmax(dim=-1)  # (N, E)
    flat_index = expert_index.reshape(-1)
    if valid is None:
        counts = torch.zeros(n_experts, dtype=torch.float32, device=router_logits.device)
        counts = counts.scatter_add(0, flat_index, torch.ones_like(flat_index, dtype=torch.float32))  # (E,)
        f = counts / flat_index.numel()  # (E,)
        p = probs.mean(dim=0)  # (E,)
        return n_experts * (f * p).sum()
    weight = valid.reshape(-1, 1).to(probs.dtype)  # (N, 1)
    counts = torch.zeros(n_experts, dtype=probs.dtype, device=router_logits.device)
    counts = counts.scatter_add(0, flat_index, weight.expand(-1, expert_index.shape[-1]).reshape(-1))  # (E,)
    tokens = weight.sum().clamp(min=1)
    f = counts / (tokens * expert_index.shape[-1])  # (E,)
    p = (probs * weight).sum(dim=0) / tokens  # (E,)
    return n_experts * (f * p).sum()


def router_z_loss(router_logits: Tensor, valid: Tensor | None = None) -> Tensor:
    """ST-MoE router z-loss, mean over tokens of logsumexp(logits)^2: keeps router logits small.

    router_logits (..., E); valid (...) bool, if given, averages over those tokens only (a ragged batch's pads left out).
    """
    z = torch.logsumexp(_upcast(router_logits), dim=-1).square()  # (...)
    if valid is None:
        return z.mean()
    return torch.where(valid, z, 0.0).sum() / valid.sum().clamp(min=1)


def router_entropy(router_logits: Tensor) -> Tensor:
    """Mean over tokens of the entropy of softmax(logits), in nats; log(E) is uniform, 0 is one-hot.

    A reported statistic. router_logits (..., E); -inf logits (masked experts) contribute 0.
    """
    probs = _upcast(router_logits).softmax(dim=-1)
    return torch.special.entr(probs).sum(dim=-1).mean()


def _is_exporting() -> bool:
    check = getattr(torch.compiler, "is_exporting", None)
    return bool(check is not None and check())


def _upcast(t: Tensor) -> Tensor:
    return t.to(torch.promote_types(t.dtype, torch.float32))


def _activation(name: str) -> tuple[Callable[[Tensor], Tensor], bool]:
    if name not in ACTIVATIONS:
        raise ValueError(f"unknown expert activation {name!r}; expected one of {sorted(ACTIVATIONS)}")
    return ACTIVATIONS[name]


def _check_expert_weights(w_in: Tensor, w_out: Tensor, d: int, activation: str) -> None:
    _, gated = _activation(activation)
    if w_in.dim() != 3 or w_out.dim() != 3:
        raise ValueError(f"expected stacked expert weights w_in (E, d, h_in), w_out (E, h, d); "
                         f"got {tuple(w_in.shape)} and {tuple(w_out.shape)}")
    E, d_in, h_in = w_in.shape
    E_out, h, d_out = w_out.shape
    h_expected = 2 * h if gated else h
    if E_out != E or d_in != d or d_out != d or h_in != h_expected:
        layout = "(E, d, 2h) = [gate | up]" if gated else "(E, d, h)"
        raise ValueError(f"expert weights do not match d={d} and {activation!r}: w_in {tuple(w_in.shape)} should be "
                         f"{layout} and w_out {tuple(w_out.shape)} should be (E, h, d)")
