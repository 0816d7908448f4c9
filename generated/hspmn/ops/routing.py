"""HSPMN contextual-stream token selection: the pure-PyTorch reference.

Copied verbatim into every generated package as ``ops/routing.py``; it imports only torch.

An HSPMN v2.1 block splits into two streams: the reflexive stream processes every token, the contextual stream
only the tokens a router selects. Selected queries attend to all causal keys (every token keeps its key and
value) and their outputs are scattered back, gated.

Selection is a per-token threshold, never a ranking. Top-k over the sequence makes token t's selection depend on
the tokens after it, so prefill (whole sequence) and decode (prefix only) would choose differently and training
would learn from information inference does not have. Here token t is selected iff its own router logit is
positive, so:
- a selection depends only on that token's hidden state: causal, and the same in prefill and in decode;
- training with the noise off (``training=False``) picks exactly the tokens inference picks;
- training samples each token independently with probability sigmoid(logit), so mean sigmoid(logit) is the
  expected selected fraction, which ``selection_losses`` holds near the spec's target. The fraction is a
  learned average rather than a per-sequence guarantee: that is the price of causality.

- ``select_tokens``: the decision, with a binary Gumbel-softmax straight-through gate in training.
- ``selection_losses``: binary entropy (crisp decisions) and fraction (keep near the target) regularisers.
- ``sparse_query_attention``: causal attention for the selected queries, masked dense form (exact, exportable).
"""

import torch
import torch.nn.functional as F
from torch import Tensor


def select_tokens(
    router_logits: Tensor,
    *,
    training: bool,
    temperature: float = 1.0,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, Tensor]:
    """Pick the tokens of the contextual stream from a per-token router.

        inference:  selected = l > 0,                gate = selected
        training:   z = l + log(u) - log(1 - u),     u ~ U(0, 1)      (logistic noise)
                    selected = z > 0,                soft = sigmoid(z / temperature)
                    gate = selected + (soft - soft.detach())           (straight-through)

    The logistic variable is the difference of two Gumbel(0, 1) draws, so `z > 0` is the Gumbel-max trick over
    the two choices {select: l, skip: 0}: a token is selected with probability sigmoid(l), and soft is its binary
    Gumbel-softmax (binary concrete) relaxation. The gate's value is exactly the hard 0/1 decision; its gradient
    is that of soft, so the router learns. The temperature shapes only that gradient (small: sharper and
    higher-variance, large: smoother and more biased); it never changes which tokens are picked.

    router_logits (B, T), one logit per token. Returns gate (B, T) in the dtype of router_logits, with
    values in {0, 1}, and selected (B, T) bool. generator seeds the noise, for reproducible training steps.
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    if not training:
        selected = router_logits > 0
        return selected.to(router_logits.dtype), selected
    logits = router_logits.float()
    u = torch.rand(logits.shape, generator=generator, device=logits.device)
    u = u.clamp(min=torch.finfo(torch.float32).tiny)  # rand is in [0, 1): keep log(u) finite
    z = logits + (torch.log(u) - torch.log1p(-u))  # (B, T) logit plus Logistic(0, 1) noise
    selected = z > 0
    soft = torch.sigmoid(z / temperature)
    gate = selected.float() + (soft - soft.detach())  # forward: exactly 0/1; backward: d soft
    return gate.to(router_logits.dtype), selected


def selection_losses(router_logits: Tensor, target_fraction: float) -> dict[str, Tensor]:
    """Regularisers for the token router, p = sigmoid(l) over all tokens.

        router_entropy   = mean H(p),  H(p) = -p log p - (1 - p) log(1 - p)   minimised: crisp 0/1 decisions,
                                                                              so training noise rarely flips one
        router_fraction  = (mean p - target_fraction)^2                      expected selected fraction on target

    H is computed from the logits, p * softplus(-l) + (1 - p) * softplus(l), so it is finite for any l.
    router_logits (B, T); both terms are float32 scalars, to be weighted by the caller.
    """
    if not 0.0 <= target_fraction <= 1.0:
        raise ValueError(f"target_fraction must be in [0, 1], got {target_fraction}")
    logits = router_logits.float()
    p = torch.sigmoid(logits)
    entropy = p * F.softplus(-logits) + (1 - p) * F.softplus(logits)
    return {
        "router_entropy": entropy.mean(),
        "router_fraction": (p.mean() - target_fraction).square(),
    }


def sparse_query_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    selected: Tensor,
    *,
    q_positions: Tensor,
    k_positions: Tensor,
    scale: float | None = None,
) -> Tensor:
    """Causal attention for the selected queries only; rows of unselected queries are zero.

        out[b, h, t] = sum_s softmax_s(scale * q[b, h, t] . k[b, h // G, s]  over k_pos[s] <= q_pos[t]) v[b, h // G, s]
                       if selected[b, t], else 0

    Masked dense form: SDPA computes every row and the unselected rows are zeroed. It is exact and exportable; a
    path that gathers and computes only the selected rows belongs to a kernel.

    q (B, H, T, D); k (B, Hkv, Tk, D) and v (B, Hkv, Tk, Dv) with G = H / Hkv (grouped-query attention); selected
    (B, T) bool; q_positions (T,) or (B, T) and k_positions (Tk,) or (B, Tk) are absolute positions, so a decode
    step (T = 1) against a cache is the same call as prefill. A cache slot not yet written should carry a position
    larger than any query's. A query that sees no key gets zeros, never NaN. scale defaults to 1 / sqrt(D).
    Returns (B, H, T, Dv) in the dtype of q.
    """
    B, H, T, D = q.shape
    Hkv, Tk = k.shape[1], k.shape[2]
    if H % Hkv != 0:
        raise ValueError(f"n_heads ({H}) must be a multiple of n_kv_heads ({Hkv}) for grouped-query attention")
    if selected.shape != (B, T):
        raise ValueError(f"expected selected of shape (B, T) = ({B}, {T}), got {tuple(selected.shape)}")
    if q_positions.shape[-1] != T or k_positions.shape[-1] != Tk:
        raise ValueError(f"positions must match the sequence lengths: q_positions {tuple(q_positions.shape)} for "
                         f"T={T}, k_positions {tuple(k_positions.shape)} for Tk={Tk}")
    visible = k_positions.unsqueeze(-2) <= q_positions.unsqueeze(-1)  # (T, Tk) or (B, T, Tk)
    visible = visible.reshape(-1, 1, T, Tk)  # (1 or B, 1, T, Tk)
    # A row with no visible key would be a softmax over nothing (NaN, also in its gradients): let it see every key,
    # then zero it along with the unselected rows.
    sees_any = visible.any(dim=-1, keepdim=True)  # (1 or B, 1, T, 1)
    visible = visible | ~sees_any
    # The mask gets an explicit batch dim: SDPA's broadcast check of a batch-1 mask would pin B under torch.export.
    mask = visible.expand(B, 1, T, Tk)  # (B, 1, T, Tk)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=H != Hkv)  # (B, H, T, Dv)
    keep = selected[:, None, :, None] & sees_any  # (B, 1, T, 1)
    return torch.where(keep, out, 0.0)  # (B, H, T, Dv); where, not masked_fill: it keeps SDPA's output layout
