"""bench/whole_model.py's ratios of (a) to (b) and (c): a reference variant that trained at a smaller shape than (a)
(it did not fit at 8 × 2048) is compared with (a) at that same shape, never with (a)'s 8 × 2048 figure."""

from pathlib import Path
from types import SimpleNamespace

import pytest

from bench import whole_model

ROOT = Path(__file__).resolve().parents[2]


def train(tokens_per_s: float, batch: int, seq_len: int) -> dict:
    return {"tokens_per_s": tokens_per_s, "batch": batch, "seq_len": seq_len, "out_of_memory_at": [], "mfu": 0.1}


def entry(variants: dict) -> dict:
    return {"device": "H200", "config": {"batch": 8, "seq_len": 2048, "decode_batches": [1, 32]},
            "matmul_flops_per_s": 7.7e14, "variants": variants}


def test_a_reference_that_trained_smaller_is_compared_with_kernels_at_its_shape(monkeypatch):
    measured = []

    def measure_training(bench, variant, batch, seq_len):
        measured.append((variant, batch, seq_len))
        return train(4000.0, batch, seq_len)

    monkeypatch.setattr(whole_model, "measure_training", measure_training)
    variants = {"kernels": {"train": train(25000.0, 8, 2048)}, "reference": {"train": train(500.0, 1, 512)},
                "compiled": {"train": train(2000.0, 1, 512)}}
    bench = SimpleNamespace(result=SimpleNamespace(variants=variants))
    for variant in ("reference", "compiled"):
        whole_model.kernels_at_the_same_shape(bench, variant)
    assert measured == [("kernels", 1, 512)], "one same-shape run of (a) serves (b) and (c)"
    rows = {row["figure"]: row for row in whole_model.bar_rows("hymba_plus", entry(variants), "cmd")}
    reference = rows["hymba_plus train tokens/s at 1 x 512, kernels vs reference"]
    compiled = rows["hymba_plus train tokens/s at 1 x 512, kernels vs compiled"]
    assert (reference["archgen"], reference["reference_value"], reference["ratio"]) == (4000.0, 500.0, 8.0)
    assert compiled["ratio"] == pytest.approx(2.0)
    assert rows["hymba_plus training MFU, 8 x 2048 tokens"]["archgen"] == 0.1


def test_a_reference_at_the_kernels_shape_needs_no_second_run(monkeypatch):
    monkeypatch.setattr(whole_model, "measure_training", lambda *args: pytest.fail("(a) already trained at this shape"))
    variants = {"kernels": {"train": train(60000.0, 8, 2048)}, "compiled": {"train": train(43000.0, 8, 2048)}}
    whole_model.kernels_at_the_same_shape(SimpleNamespace(result=SimpleNamespace(variants=variants)), "compiled")
    rows = {row["figure"]: row for row in whole_model.bar_rows("bamba_1b", entry(variants), "cmd")}
    assert rows["bamba_1b train tokens/s at 8 x 2048, kernels vs compiled"]["ratio"] == pytest.approx(60 / 43)
