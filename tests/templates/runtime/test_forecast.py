"""templates/runtime/forecast.py: mean scaling and uniform binning of a time series, and the way back.

What matters: a value inside the range comes back within half a bin width times the scale, values outside clamp to
the end bins, the scale is mean |x| (never 0) and can be taken from a context and applied to what follows it.
"""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from templates.runtime import forecast

# (n_bins, low, high): the Chronos default, the hymba_plus tiny preset, and a narrow grid around 1.
GRIDS = [(4096, -15.0, 15.0), (64, -15.0, 15.0), (64, 0.95, 1.05), (7, -1.0, 2.5)]
GRID_IDS = [f"bins{n}-[{low},{high}]" for n, low, high in GRIDS]


@pytest.mark.parametrize("n_bins, low, high", GRIDS, ids=GRID_IDS)
def test_round_trip_error_is_at_most_half_a_bin_width_times_the_scale(n_bins, low, high):
    generator = torch.Generator().manual_seed(0)
    scale = torch.tensor([[1e-3], [1.0], [37.0], [5e4], [2.0]])  # (5, 1), as a context would give
    scaled = low + (high - low) * torch.rand(5, 123, generator=generator)  # every scaled value inside the range
    series = scaled * scale  # (5, 123), in the series' units
    bins, returned_scale = forecast.tokenize(series, n_bins, low, high, scale)
    values = forecast.detokenize(bins, returned_scale, n_bins, low, high)
    error = (values - series).abs() / scale  # in bins' units: the scaled error
    half_width = (high - low) / n_bins / 2
    assert torch.equal(returned_scale, scale)
    worst = error.max().item()
    assert worst <= half_width * (1 + 1e-4), f"worst scaled error {worst:.3g} > half a bin {half_width:.3g}"


@settings(max_examples=200, deadline=None)
@given(value=st.floats(-1e6, 1e6, allow_nan=False), n_bins=st.integers(1, 300))
def test_every_value_lands_in_a_valid_bin_whose_centre_is_nearest_when_in_range(value, n_bins):
    low, high = -15.0, 15.0
    b = forecast.to_bins(torch.tensor([[value]], dtype=torch.float64), n_bins, low, high)
    assert 0 <= b.item() < n_bins
    centres = forecast.bin_centres(torch.arange(n_bins), n_bins, low, high).double()
    if low <= value <= high:
        nearest = (centres - value).abs().min().item()
        assert abs(centres[b.item()].item() - value) <= nearest + 1e-5


def test_out_of_range_values_clamp_to_the_end_bins():
    bins = forecast.to_bins(torch.tensor([[-100.0, -15.0, 14.999, 15.0, 100.0]]), 64, -15.0, 15.0)
    assert bins.tolist() == [[0, 0, 63, 63, 63]]


def test_mean_scale_is_mean_absolute_value_and_never_zero():
    series = torch.tensor([[-2.0, 2.0, 4.0, -4.0], [0.0, 0.0, 0.0, 0.0], [1.0, 1.0, 1.0, 5.0]])
    assert forecast.mean_scale(series).flatten().tolist() == [3.0, 1.0, 2.0]


def test_a_given_scale_puts_what_follows_the_context_on_the_context_grid():
    context = torch.tensor([[10.0, 10.0, 10.0, 10.0]])
    future = torch.tensor([[20.0, 5.0]])
    _, scale = forecast.tokenize(context, 64, -15.0, 15.0)
    own_bins, own_scale = forecast.tokenize(future, 64, -15.0, 15.0)
    context_bins, same_scale = forecast.tokenize(future, 64, -15.0, 15.0, scale)
    assert same_scale.item() == 10.0 and own_scale.item() == 12.5
    assert torch.equal(context_bins, forecast.to_bins(future / 10.0, 64, -15.0, 15.0))
    assert not torch.equal(context_bins, own_bins)


def test_centres_are_evenly_spaced_inside_the_range():
    centres = forecast.bin_centres(torch.arange(4), 4, -1.0, 1.0)
    assert centres.tolist() == [-0.75, -0.25, 0.25, 0.75]
    assert forecast.bin_centres(torch.arange(4), 4, -1.0, 1.0).dtype == torch.float32
