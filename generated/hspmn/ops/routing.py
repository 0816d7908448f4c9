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
- ``sparse_query_attention``: causal attention for the selected queries. Prefill / training (the keys are the
  queries' own tokens) packs the selected queries, attends only them and scatters the rows back: work and
  memory scale with the selected fraction and no (T, T) mask exists. A decode step and torch.export take the
  masked dense form (exact, exportable), which over a handful of queries is cheap.
- ``pack_selected`` / ``gather_tokens`` / ``scatter_tokens`` / ``packed_query_attention``: the pieces, for a
  caller that also projects only the selected tokens.
"""

import math
from functools import cache

import torch
import torch.nn.functional as F
from torch import Tensor

# Packed queries per attention call: each call reads the keys up to its last query, so smaller chunks skip more of
# the causal triangle's empty half but launch more calls.
PACKED_QUERY_CHUNK = 256
# FlexAttention (compiled, CUDA only) for the packed queries instead of chunked SDPA; off until measured on a GPU.
USE_FLEX_ATTENTION = False


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


def selection_losses(router_logits: Tensor, target_fraction: float, valid: Tensor | None = None) -> dict[str, Tensor]:
    """Regularisers for the token router, p = sigmoid(l) over all tokens.

        router_entropy   = mean H(p),  H(p) = -p log p - (1 - p) log(1 - p)   minimised: crisp 0/1 decisions,
                                                                              so training noise rarely flips one
        router_fraction  = (mean p - target_fraction)^2                      expected selected fraction on target

    H is computed from the logits, p * softplus(-l) + (1 - p) * softplus(l), so it is finite for any l.
    router_logits (B, T); both terms are float32 scalars, to be weighted by the caller. valid (B, T) bool, if given,
    leaves out a ragged batch's pads: the means run over the valid tokens only.
    """
    if not 0.0 <= target_fraction <= 1.0:
        raise ValueError(f"target_fraction must be in [0, 1], got {target_fraction}")
    logits = router_logits.float()
    p = torch.sigmoid(logits)
    entropy = p * F.softplus(-logits) + (1 - p) * F.softplus(logits)
    if valid is None:
        mean_entropy, mean_p = entropy.mean(), p.mean()
    else:
        count = valid.sum().clamp(min=1)
        mean_entropy, mean_p = torch.where(valid, entropy, 0.0).sum() / count, torch.where(valid, p, 0.0).sum() / count
    return {
        "router_entropy": mean_entropy,
        "router_fraction": (mean_p - target_fraction).square(),
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

    q (B, H, T, D); k (B, Hkv, Tk, D) and v (B, Hkv, Tk, Dv) with G = H / Hkv (grouped-query attention); selected
    (B, T) bool; q_positions (T,) or (B, T) and k_positions (Tk,) or (B, Tk) are absolute positions, so a decode
    step (T = 1) against a cache is the same call as prefill. A cache slot not yet written should carry a position
    larger than any query's. A query that sees no key gets zeros, never NaN. scale defaults to 1 / sqrt(D).
    Returns (B, H, T, Dv) in the dtype of q.

    Passing the same 1-D tensor as q_positions and k_positions says "the keys are these queries' own tokens, at
    increasing positions": query t then sees keys 0..t, and only the selected queries are computed (packed, see
    packed_query_attention; one host sync for their count). Other calls, and torch.export, use the masked form.
    """
    B, H, T = q.shape[:3]
    Hkv, Tk = k.shape[1], k.shape[2]
    if H % Hkv != 0:
        raise ValueError(f"n_heads ({H}) must be a multiple of n_kv_heads ({Hkv}) for grouped-query attention")
    if selected.shape != (B, T):
        raise ValueError(f"expected selected of shape (B, T) = ({B}, {T}), got {tuple(selected.shape)}")
    if q_positions.shape[-1] != T or k_positions.shape[-1] != Tk:
        raise ValueError(f"positions must match the sequence lengths: q_positions {tuple(q_positions.shape)} for "
                         f"T={T}, k_positions {tuple(k_positions.shape)} for Tk={Tk}")
    self_attention = k_positions is q_positions and q_positions.dim() == 1
    if _is_exporting() or not self_attention:
        return masked_sparse_query_attention(q, k, v, selected, q_positions=q_positions, k_positions=k_positions,
                                             scale=scale)
    index, valid = pack_selected(selected)  # (B, S), (B, S)
    q_packed = gather_tokens(q, index, dim=2)  # (B, H, S, D)
    # keys are these tokens, at increasing positions: in key-index space a query's position is its token index
    y_packed = packed_query_attention(q_packed, k, v, index, valid, scale=scale)  # (B, H, S, Dv)
    return scatter_tokens(y_packed, index, valid, T, dim=2)  # (B, H, T, Dv)


def pack_selected(selected: Tensor) -> tuple[Tensor, Tensor]:
    """The selected tokens of each sequence, in order, padded to the largest count S.

    selected (B, T) bool -> index (B, S) long, the token of each packed row, and valid (B, S) bool. Padding rows
    hold unselected tokens (a row's indices are distinct, so scattering back writes each token once); valid marks
    the real ones. S needs one host sync; while torch.export traces, S = T (every token, static shapes), and a
    decode step (T = 1) keeps S = 1 without a sync, so it can be recorded in a CUDA graph.
    """
    B, T = selected.shape
    counts = selected.sum(dim=1, keepdim=True)  # (B, 1)
    # selected tokens first, each group in token order; unique sort keys, so no stable sort (ONNX has none)
    key = (~selected).long() * T + torch.arange(T, device=selected.device)  # (B, T)
    index = torch.argsort(key, dim=1)  # (B, T)
    if not _is_exporting() and T > 1:
        index = index[:, : int(counts.max()) if B else 0]  # (B, S)
    valid = torch.arange(index.shape[1], device=selected.device) < counts  # (B, S)
    return index, valid


def gather_tokens(x: Tensor, index: Tensor, dim: int) -> Tensor:
    """x[b, ..., index[b, s], ...] along `dim` (the token axis): (B, .., T, ..) -> (B, .., S, ..)."""
    shape = [1] * x.dim()
    shape[0], shape[dim] = index.shape
    return x.gather(dim, index.view(shape).expand(*x.shape[:dim], index.shape[1], *x.shape[dim + 1 :]))


def scatter_tokens(y: Tensor, index: Tensor, valid: Tensor, length: int, dim: int, fill: Tensor | None = None
                   ) -> Tensor:
    """The inverse of gather_tokens for the valid rows: (B, .., S, ..) -> (B, .., length, ..); the other tokens
    get zeros, or `fill` (broadcast to a row, e.g. an output projection's bias: what a zero row projects to)."""
    shape = [1] * y.dim()
    shape[0], shape[dim] = index.shape
    out_shape = list(y.shape)
    out_shape[dim] = length
    rest = y.new_zeros(()) if fill is None else fill.to(y.dtype)
    y = torch.where(valid.view(shape), y, rest)
    return rest.expand(out_shape).scatter(dim, index.view(shape).expand_as(y), y)


def packed_query_attention(
    q: Tensor, k: Tensor, v: Tensor, q_positions: Tensor, valid: Tensor, *, scale: float | None = None
) -> Tensor:
    """Causal attention of packed queries against keys at positions 0, 1, .., Tk-1 (a sequence from its start, or
    a KVCache's slots, whose unwritten tail lies past every query).

        out[b, h, s] = sum_{j <= q_positions[b, s]} softmax_j(scale * q[b, h, s] . k[b, h // G, j]) v[b, h // G, j]

    q (B, H, S, D) packed queries; k (B, Hkv, Tk, D), v (B, Hkv, Tk, Dv); q_positions (B, S); valid (B, S) (other
    rows come back as zeros). Returns (B, H, S, Dv). The packed rows are sorted by position within each sequence,
    so a chunk of rows needs the keys up to its last row only: chunked SDPA with a (chunk, keys) mask skips most
    of the causal triangle's empty half; FlexAttention (USE_FLEX_ATTENTION, CUDA) skips it block by block. While
    torch.export traces: one SDPA call with the (S, Tk) mask.
    """
    B, H, S, D = q.shape
    if S == 0:
        return q.new_zeros(B, H, 0, v.shape[-1])
    positions = torch.where(valid, q_positions, 0)  # (B, S) padding rows see key 0 only
    if _is_exporting():
        visible = torch.arange(k.shape[2], device=q.device) <= positions[..., None]  # (B, S, Tk)
        y = _sdpa(q, k, v, attn_mask=visible[:, None], scale=scale)
    elif USE_FLEX_ATTENTION and q.is_cuda and D in (16, 32, 64, 128, 256) and v.shape[-1] == D:
        y = _flex_packed_attention(q, k, v, positions, scale)
    else:
        y = _chunked_packed_attention(q, k, v, positions, scale)
    return torch.where(valid[:, None, :, None], y, 0.0)


def _chunked_packed_attention(q: Tensor, k: Tensor, v: Tensor, positions: Tensor, scale: float | None) -> Tensor:
    B, S = positions.shape
    n_chunks = math.ceil(S / PACKED_QUERY_CHUNK)
    padded = F.pad(positions, (0, n_chunks * PACKED_QUERY_CHUNK - S))  # (B, n * chunk)
    key_ends = padded.view(B, n_chunks, PACKED_QUERY_CHUNK).amax(dim=(0, 2)) + 1  # (n,) keys each chunk reads
    # rounded up to 16 keys (GPU attention kernels want a mask row aligned to 16 elements); the mask hides the extra
    key_ends = (torch.div(key_ends + 15, 16, rounding_mode="floor") * 16).clamp(max=k.shape[2]).tolist()
    outputs = []
    for i, key_end in enumerate(key_ends):
        rows = slice(i * PACKED_QUERY_CHUNK, min((i + 1) * PACKED_QUERY_CHUNK, S))
        visible = torch.arange(key_end, device=q.device) <= positions[:, rows, None]  # (B, c, key_end)
        outputs.append(_sdpa(q[:, :, rows], k[:, :, :key_end], v[:, :, :key_end], attn_mask=visible[:, None],
                             scale=scale))
    return torch.cat(outputs, dim=2)  # (B, H, S, Dv)


@cache
def _compiled_flex_attention():
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=False)


FLEX_BLOCK = 128  # FlexAttention's default sparse block (query and key)


def _flex_packed_attention(q: Tensor, k: Tensor, v: Tensor, positions: Tensor, scale: float | None) -> Tensor:
    """The packed queries through FlexAttention. The BlockMask comes from block indices: a block of packed rows
    spans positions p_min..p_max (rows are sorted), so key block [k_lo, k_hi] is skipped when k_lo > p_max and
    needs no mask when k_hi <= p_min; O(S/128 · Tk/128) booleans, never the (S, Tk) mask."""
    from torch.nn.attention.flex_attention import BlockMask

    B, H, S, _ = q.shape
    Tk = k.shape[2]

    def visible(b, h, q_idx, kv_idx):
        return kv_idx <= positions[b, q_idx]

    nq, nk = -(-S // FLEX_BLOCK), -(-Tk // FLEX_BLOCK)
    padded = F.pad(positions, (0, nq * FLEX_BLOCK - S), value=-1).view(B, nq, FLEX_BLOCK)  # -1: sees nothing
    p_max = padded.amax(dim=-1)[:, :, None]  # (B, nq, 1)
    p_min = torch.where(padded >= 0, padded, Tk).amin(dim=-1)[:, :, None]  # (B, nq, 1)
    k_lo = torch.arange(nk, device=q.device) * FLEX_BLOCK  # (nk,)
    k_hi = (k_lo + FLEX_BLOCK - 1).clamp(max=Tk - 1)
    full = k_hi <= p_min  # (B, nq, nk)
    if S % FLEX_BLOCK:  # rows of the short last block beyond S: through mask_mod
        full[:, -1] = False
    if Tk % FLEX_BLOCK:
        full[:, :, -1] = False
    partial = (k_lo <= p_max) & ~full
    block_mask = BlockMask.from_kv_blocks(*_kv_blocks(partial), *_kv_blocks(full), BLOCK_SIZE=FLEX_BLOCK,
                                          mask_mod=visible, seq_lengths=(S, Tk))
    flex = _compiled_flex_attention()
    return flex(q, k, v, block_mask=block_mask, scale=scale, enable_gqa=H != k.shape[1])


def _kv_blocks(blocks: Tensor) -> tuple[Tensor, Tensor]:
    """(B, nq, nk) bool -> BlockMask's (B, 1, nq) counts and (B, 1, nq, nk) indices, each row's blocks first."""
    counts = blocks.sum(dim=-1, dtype=torch.int32)
    indices = torch.sort((~blocks).to(torch.uint8), dim=-1, stable=True).indices.to(torch.int32)
    return counts[:, None], indices[:, None]


def _sdpa(q: Tensor, k: Tensor, v: Tensor, **kwargs) -> Tensor:
    return F.scaled_dot_product_attention(q, k, v, enable_gqa=q.shape[1] != k.shape[1], **kwargs)


def _is_exporting() -> bool:
    """True while torch.export or torch.compile traces (export runs dynamo too): take the static-shape forms, since a
    packed count S read on the host would be a graph break under torch.compile(fullgraph=True)."""
    return torch.compiler.is_compiling()


def masked_sparse_query_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    selected: Tensor,
    *,
    q_positions: Tensor,
    k_positions: Tensor,
    scale: float | None = None,
) -> Tensor:
    """sparse_query_attention's masked dense form: SDPA computes every row and the unselected rows are zeroed. It is
    exact for any positions, and the form torch.export and ONNX get. Same arguments and result."""
    B, H, T = q.shape[:3]
    Hkv, Tk = k.shape[1], k.shape[2]
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
