"""
Time-series tokenization for the forecaster head: mean scaling and uniform binning, as in Chronos.

This file is copied verbatim into a generated package as `ops/forecast.py` and imports only torch.

A real-valued series becomes a sequence of bin indices in three steps, and comes back in two:

    scale   s = mean_t |x_t| over the context window (s = 1 where that mean is 0)
    bin     b_t = clamp(floor((x_t / s - low) / w), 0, n_bins - 1),    w = (high - low) / n_bins
    value   x̂_t = s · (low + (b_t + 1/2) · w)                          (the centre of bin b_t, scaled back)

so a value whose scaled form lies in [low, high] comes back within w/2 · s of where it started; values outside
the range land in the first or last bin. Mean scaling keeps series of any magnitude on one grid, and the scale
comes from the context only, so a forecast never peeks at the values it predicts.

Shapes: B series, T time steps. Series are float tensors (B, T); bins are int64 (B, T); scales are (B, 1).
"""

import torch
from torch import Tensor


def mean_scale(context: Tensor) -> Tensor:
    """s = mean_t |x_t| per series, (B, T) → (B, 1); an all-zero context gets s = 1 so dividing by s is safe."""
    scale = context.abs().mean(dim=-1, keepdim=True)  # (B, 1)
    return torch.where(scale > 0, scale, torch.ones_like(scale))


def to_bins(scaled: Tensor, n_bins: int, low: float, high: float) -> Tensor:
    """Index of the uniform bin over [low, high] that holds each scaled value; out-of-range values clamp to the ends."""
    width = (high - low) / n_bins
    return torch.floor((scaled - low) / width).clamp(0, n_bins - 1).long()


def bin_centres(bins: Tensor, n_bins: int, low: float, high: float) -> Tensor:
    """The scaled value each bin stands for: low + (b + 1/2) · w, as float32."""
    width = (high - low) / n_bins
    return low + (bins.float() + 0.5) * width


def tokenize(
    series: Tensor, n_bins: int, low: float, high: float, scale: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """series (B, T) → (bins (B, T), scale (B, 1)). The scale is the series' own mean |x| unless one is given (pass
    the context's scale to bin values that follow the context on the context's grid)."""
    series = series.float()
    if scale is None:
        scale = mean_scale(series)
    return to_bins(series / scale, n_bins, low, high), scale


def detokenize(bins: Tensor, scale: Tensor, n_bins: int, low: float, high: float) -> Tensor:
    """bins (B, T) and scale (B, 1) → values (B, T): each bin's centre, scaled back to the series' units."""
    return bin_centres(bins, n_bins, low, high) * scale
