"""The forecaster head as generated into specs/hymba_plus.yaml (tiny preset: 64 bins over [-15, 15], vocabulary
256, so series tokens are ids 192…255): bin logits per position, a loss only on series rows, forecasting through
the cache exactly as by full forwards, and on a real series (monthly Mauna Loa CO2, shipped with statsmodels) a
briefly trained model beats the seasonal-naive forecast. Binning itself is tested in
tests/templates/runtime/test_forecast.py.
"""

from __future__ import annotations

import time

import pytest
import torch
import torch.nn.functional as F

from templates.runtime import forecast

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: one thread is faster on shared CPUs

HYMBA = "specs/hymba_plus.yaml"
N_BINS, OFFSET, LOW, HIGH = 64, 192, -15.0, 15.0


@pytest.fixture
def model(build):
    torch.manual_seed(0)
    return build(HYMBA).Model()


def test_loss_scores_the_next_bin_on_series_rows_only(model):
    generator = torch.Generator().manual_seed(1)
    text = torch.randint(0, OFFSET, (1, 17), generator=generator)
    series = torch.randint(OFFSET, 256, (1, 17), generator=generator)
    tokens = torch.cat([text, series])  # (2, 17): row 0 text, row 1 a series
    out = model(tokens[:, :-1], targets=tokens[:, 1:])
    bin_logits = out.heads["forecaster"]
    assert bin_logits.shape == (2, 16, N_BINS)
    expected = F.cross_entropy(bin_logits[1], tokens[1, 1:] - OFFSET)
    assert out.aux_losses["forecaster"].item() == pytest.approx(expected.item(), rel=1e-5)

    text_only = model(text[:, :-1], targets=text[:, 1:]).aux_losses["forecaster"]
    assert text_only.item() == 0.0 and text_only.requires_grad


def test_tokenize_series_puts_bins_on_the_last_ids_of_the_vocabulary(model):
    series = torch.tensor([[3.0, -1.0, 0.5, 40.0, 0.0], [1e4, 2e4, 3e4, 4e4, 5e4]])
    tokens, scale = model.tokenize_series(series)
    assert tokens.dtype == torch.long and tokens.min() >= OFFSET and tokens.max() < 256
    assert torch.equal(scale, forecast.mean_scale(series))
    assert torch.equal(tokens - OFFSET, forecast.to_bins(series / scale, N_BINS, LOW, HIGH))


def test_forecast_through_the_cache_equals_forecasting_by_full_forwards(model):
    model.eval()
    series = torch.randn(2, 11, generator=torch.Generator().manual_seed(2)).cumsum(1) + 5.0  # (2, 11)
    values = model.forecast(series, horizon=6)
    tokens, scale = model.tokenize_series(series)
    with torch.no_grad():
        for _ in range(6):
            bin_logits = model.heads["forecaster"](model.hidden_states(tokens), model.lm_head)  # (2, T, 64), no cache
            next_bin = bin_logits[:, -1].argmax(-1, keepdim=True)
            tokens = torch.cat([tokens, next_bin + OFFSET], dim=1)
    expected = forecast.detokenize(tokens[:, 11:] - OFFSET, scale, N_BINS, LOW, HIGH)
    assert values.shape == (2, 6)
    assert torch.equal(values, expected)


def test_sampled_paths_are_reproducible_and_lie_on_bin_centres(model):
    model.eval()
    series = torch.rand(3, 9, generator=torch.Generator().manual_seed(3)) + 1.0
    paths = model.forecast(series, horizon=4, num_samples=5, generator=torch.Generator().manual_seed(0))
    again = model.forecast(series, horizon=4, num_samples=5, generator=torch.Generator().manual_seed(0))
    assert paths.shape == (3, 5, 4) and torch.equal(paths, again)
    scale = forecast.mean_scale(series)  # (3, 1)
    bins = (paths / scale[:, :, None] - LOW) / ((HIGH - LOW) / N_BINS) - 0.5
    assert torch.allclose(bins, bins.round(), atol=1e-3), "every value must be a bin centre times the context's scale"


def monthly_co2() -> torch.Tensor:
    """Mauna Loa CO2 (ppm), the weekly series that ships inside statsmodels, as 526 monthly means (1958-03 … 2001-12);
    the few missing weeks are filled by interpolation."""
    statsmodels = pytest.importorskip("statsmodels.api", reason="statsmodels (in the test extra) ships the CO2 series")
    weekly = statsmodels.datasets.co2.load_pandas().data["co2"]
    return torch.tensor(weekly.resample("MS").mean().interpolate().to_numpy(), dtype=torch.float32)


def test_trained_forecaster_beats_seasonal_naive_on_co2(build):
    """Train on 1958-1991, then forecast 12 months ahead from 29 origins in 1991-2001, each from the 36 months before.

    Seasonal naive repeats the last 12 months, so it misses a year of growth (~1.5 ppm); the model sees the trend.
    After mean scaling a 4-year window of CO2 stays within a few percent of 1, so the 64 bins span [0.95, 1.05]
    (0.55 ppm wide at 350 ppm) instead of the preset's [-15, 15], in which the whole series would fill one bin.
    """
    start = time.perf_counter()
    series = monthly_co2()
    context, horizon, season, train_end = 36, 12, 12, 400
    torch.manual_seed(0)
    model = build(HYMBA, overrides=["heads.forecaster.value_range=[0.95, 1.05]"]).Model()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    generator = torch.Generator().manual_seed(0)
    for _ in range(80):
        starts = torch.randint(0, train_end - context - horizon + 1, (8,), generator=generator)
        windows = torch.stack([series[s : s + context + horizon] for s in starts])  # (8, 48)
        _, scale = model.tokenize_series(windows[:, :context])  # scaled by the context, as when forecasting
        tokens, _ = model.tokenize_series(windows, scale)
        loss = model(tokens[:, :-1], targets=tokens[:, 1:]).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    model.eval()
    origins = range(train_end, len(series) - horizon + 1, 4)
    contexts = torch.stack([series[o - context : o] for o in origins])  # (29, 36)
    truth = torch.stack([series[o : o + horizon] for o in origins])  # (29, 12)
    seasonal_naive = contexts[:, -season:]  # (29, 12): the same month one year earlier
    model_mae = (model.forecast(contexts, horizon) - truth).abs().mean().item()
    naive_mae = (seasonal_naive - truth).abs().mean().item()
    elapsed = time.perf_counter() - start
    print(f"CO2 12-month MAE over {len(origins)} origins: model {model_mae:.3f} ppm, "
          f"seasonal naive {naive_mae:.3f} ppm ({elapsed:.0f} s)")
    assert model_mae < naive_mae, f"model MAE {model_mae:.3f} ppm is not below seasonal-naive MAE {naive_mae:.3f} ppm"


def test_decoding_leaves_the_heads_out_and_a_loss_without_them_is_refused(model, monkeypatch):
    model.eval()
    tokens = torch.randint(0, 256, (1, 9), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        full = model(tokens)
        bare = model(tokens, run_heads=False)
    assert torch.equal(bare.logits, full.logits) and bare.heads == {} and "forecaster" in full.heads
    with pytest.raises(ValueError, match="run_heads=True"):
        model(tokens[:, :-1], targets=tokens[:, 1:], run_heads=False)

    calls = []
    head = model.heads["forecaster"]
    monkeypatch.setattr(head, "forward", lambda *args, **kwargs: calls.append(1) or type(head).forward(head, *args, **kwargs))
    generated = model.generate(tokens, max_new_tokens=3, cuda_graph=False)
    assert calls == [], "a decoding step (or generate's prefill) ran the forecaster head, whose output it drops"
    assert torch.equal(generated[:, :9], tokens) and generated.shape == (1, 12)
