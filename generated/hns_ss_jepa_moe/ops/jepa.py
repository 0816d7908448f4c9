"""JEPA (joint-embedding predictive architecture) world-model head: the pure-PyTorch pieces it is built from.

Copied verbatim into every generated package with a `jepa` head as ``ops/jepa.py``; it imports only torch.

The head hides some positions of the input from the backbone and predicts, from what is left, the latents that a
slowly moving copy of the backbone (the target encoder) computes on the whole input (I-JEPA, Assran et al. 2023):

    context = backbone_θ(embed(x) with masked positions replaced by a learned mask token)
    target  = layer_norm(backbone_θ̄(embed(x)))         no gradient
    loss    = L(predictor(context[mask]), target[mask])
    θ̄ ← m·θ̄ + (1 − m)·θ                                after each optimizer step

Contents:
    random_mask        which positions the context encoder does not see
    hidden_rows        x[mask] for such a mask, with a shape torch.compile knows
    vicreg_terms       VICReg's invariance, variance and covariance terms between predictions and targets
    backbone_weights   the online parameters the target encoder mirrors
    EMATarget          the target encoder: the backbone's modules copied with their weights as buffers
"""

import copy

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor


def random_mask(batch: int, length: int, ratio: float, generator: torch.Generator | None = None,
                device: torch.device | str | None = None) -> Tensor:
    """(batch, length) bool, True at the positions to hide: n = max(1, round(ratio · length)) per row, uniformly.

    Every row hides exactly n positions, so the ratio holds per sequence, not only on average. The noise is drawn on
    the generator's device and then moved, so a CPU generator gives the same masks on every device.
    """
    if not 0 < ratio < 1:
        raise ValueError(f"mask ratio must be in (0, 1), got {ratio}")
    n = hidden_count(length, ratio)
    draw_on = generator.device if generator is not None else device
    noise = torch.rand(batch, length, generator=generator, device=draw_on)
    chosen = noise.topk(n, dim=1).indices  # (batch, n): a uniformly random n-subset of each row
    mask = torch.zeros(batch, length, dtype=torch.bool, device=noise.device).scatter_(1, chosen, True)
    return mask.to(device) if device is not None else mask


def hidden_rows(x: Tensor, mask: Tensor, count: int) -> Tensor:
    """x[mask] for a mask that hides exactly `count` positions in every row (random_mask's): x (B, T, ...) ->
    (B · count, ...), rows in the same (sequence, position) order.

    A gather at the hidden positions rather than boolean indexing, whose output size depends on the mask's values:
    torch.compile would have to stop its graph there (a graph break).
    """
    positions = torch.argsort((~mask).to(torch.uint8), dim=1, stable=True)[:, :count]  # (B, count) hidden, in order
    index = positions.view(*positions.shape, *([1] * (x.dim() - 2))).expand(*positions.shape, *x.shape[2:])
    return x.gather(1, index).flatten(0, 1)


def hidden_count(length: int, ratio: float) -> int:
    """How many of `length` positions random_mask hides: max(1, round(ratio · length)), rounded half up."""
    return min(length, max(1, int(ratio * length + 0.5)))


def vicreg_terms(predictions: Tensor, targets: Tensor, eps: float = 1e-4) -> tuple[Tensor, Tensor, Tensor]:
    """VICReg (Bardes et al. 2022) between predictions P and targets Z, both (N, D), computed in float32 or wider.

        invariance  = mean((P − Z)²)
        variance    = ½ (h(P) + h(Z)),     h(X) = mean_j relu(1 − sqrt(Var(X[:, j]) + eps))
        covariance  = q(P) + q(Z),         q(X) = Σ_{i≠j} Cov(X)[i, j]² / D

    Var and Cov are over the N rows with N − 1 in the denominator (1 when N = 1, whose spread is zero). The variance
    hinge keeps every dimension's standard deviation near 1 and the covariance term decorrelates dimensions, against
    latents collapsing to a constant. In the JEPA head Z comes from the no-grad target encoder, so its halves only
    report the targets' spread and the gradient acts through P. Returns the three terms unweighted.
    """
    p, z = _upcast(predictions), _upcast(targets)
    invariance = F.mse_loss(p, z)
    p_hinge, p_off = _spread_terms(p, eps)
    z_hinge, z_off = _spread_terms(z, eps)
    return invariance, (p_hinge + z_hinge) / 2, p_off + z_off


def _spread_terms(x: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    """h(x) and q(x) of `vicreg_terms` for x (N, D), from one covariance matrix."""
    n, dim = x.shape
    centred = x - x.mean(dim=0)
    covariance = centred.T @ centred / max(n - 1, 1)  # (D, D)
    variance = covariance.diagonal()  # (D,)
    hinge = F.relu(1 - torch.sqrt(variance + eps)).mean()
    off_diagonal = covariance - torch.diag(variance)
    return hinge, off_diagonal.square().sum() / dim


def _upcast(x: Tensor) -> Tensor:
    return x if x.dtype == torch.float64 else x.float()


def backbone_weights(model: nn.Module) -> dict[str, Tensor]:
    """The parameters `model.hidden_states` reads: all but the heads' and the unembedding's (when not tied).

    A tied unembedding is the embedding's tensor, which named_parameters lists once, as `embed.weight`.
    """
    return {name: p for name, p in model.named_parameters() if not name.startswith(("heads.", "lm_head."))}


class EMATarget(nn.Module):
    """The target encoder: a copy of the backbone's modules with their weights as buffers, moved as an exponential
    moving average of the online parameters.

        θ̄ ← m·θ̄ + (1 − m)·θ          for every backbone parameter θ (`update_`)

    `reset_(model)` makes the copy (every child of the model but its heads and unembedding, and its own parameters
    such as meta tokens), each parameter turned into a buffer of the same name: the copy of
    `layers.0.mixer.in_proj.weight` is the buffer `layers.0.mixer.in_proj.weight` under this module, so it takes no
    gradient, is not in model.parameters(), moves with `.to()` and is saved and loaded with the model's state dict.
    The target pass runs the model's own `hidden_states` on the copy: nothing is made or swapped while it runs, so
    torch.compile traces it in the model's one graph.

    Under FSDP or tensor parallelism the online parameters are DTensors (shards); the copy is whole on every process
    (no module of it is sharded or split) and each update gathers one online tensor at a time.
    """

    def __init__(self):
        super().__init__()
        self.gradient_checkpointing = False  # read by hidden_states: the no-grad target pass keeps nothing to recompute
        self.float32_target: dict[str, tuple[Tensor, int]] = {}  # update_'s float32 accumulators (and the version
        # of the buffer each last wrote) of a half-precision target, by name

    @torch.no_grad()
    def reset_(self, model: nn.Module) -> None:
        """θ̄ ← θ. The first call makes the copy of the backbone (on the model's device, the meta device included)."""
        if not self._modules and not self._buffers:
            for name, child in model.named_children():
                if name not in ("heads", "lm_head"):
                    self.add_module(name, _weights_as_buffers(copy.deepcopy(child)))
            for name, p in model.named_parameters(recurse=False):
                self.register_buffer(name, p.detach().clone())
        for _, target, online in self._pairs(model):
            target.copy_(online)

    @torch.no_grad()
    def update_(self, model: nn.Module, momentum: float) -> None:
        """θ̄ ← m·θ̄ + (1 − m)·θ, tensor by tensor, accumulated in float32.

        In bfloat16 a step of (1 − m)·(θ − θ̄) with m = 0.996 is below half a unit in the last place of θ̄ for most
        weights and would round away, freezing the target. So a half-precision target keeps a float32 copy of
        itself (`float32_target`, outside the state dict) that takes the update, and the buffer the target pass
        reads is that copy rounded. The copy is (re)made from the buffer whenever something else wrote the buffer
        since the last update (a load_state_dict, a resume, .to()): the buffer's version counter says so.
        """
        for name, target, online in self._pairs(model):
            if target.dtype in (torch.float32, torch.float64):
                target.mul_(momentum).add_(online, alpha=1 - momentum)
                continue
            accumulator, version = self.float32_target.get(name, (None, None))
            if accumulator is None or version != target._version or accumulator.device != target.device:
                accumulator = target.float()
            accumulator.mul_(momentum).add_(online.float(), alpha=1 - momentum)
            target.copy_(accumulator)
            self.float32_target[name] = (accumulator, target._version)

    @torch.no_grad()
    def hidden_states(self, model: nn.Module, input_ids: Tensor) -> Tensor:
        """model.hidden_states(input_ids) (B, T, d_model) computed by the copy, with the target weights."""
        return type(model).hidden_states(self, input_ids)

    def _pairs(self, model: nn.Module):
        """(name, target copy, whole online tensor) for every backbone parameter."""
        if not self._modules and not self._buffers:
            raise RuntimeError("the JEPA target encoder has no copy of the backbone yet: call reset_(model) first "
                               "(the generated Model's __init__ does)")
        for name, p in backbone_weights(model).items():
            yield name, self.get_buffer(name), p.full_tensor() if hasattr(p, "full_tensor") else p


def _weights_as_buffers(module: nn.Module) -> nn.Module:
    """Turn every parameter of `module` and its children into a buffer of the same name (same tensor, no gradient)."""
    for child in module.modules():
        for name, p in list(child._parameters.items()):
            del child._parameters[name]
            child.register_buffer(name, None if p is None else p.detach())
    return module
