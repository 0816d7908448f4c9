"""bench/whole_model.py's ratios of (a) to (b) and (c): a reference variant that trained at a smaller shape than (a)
(it did not fit at 8 × 2048) is compared with (a) at that same shape, never with (a)'s 8 × 2048 figure, and a
variant run without (a) (a compile, one model a run) is compared with (a) measured in the same run."""

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


def peer_recorder(monkeypatch, tokens_per_s: float = 4000.0, prefill_tokens_per_s: float = 90000.0) -> list:
    measured = []

    def measure_peer(bench, variant, train_shape=None, prefill=False):
        measured.append((variant, train_shape, prefill))
        figures = {"train": train(tokens_per_s, *train_shape)} if train_shape is not None else {}
        return {**figures, **({"prefill": {"tokens_per_s": prefill_tokens_per_s}} if prefill else {})}

    monkeypatch.setattr(whole_model, "measure_peer", measure_peer)
    return measured


def test_a_reference_that_trained_smaller_is_compared_with_kernels_at_its_shape(monkeypatch):
    measured = peer_recorder(monkeypatch)
    variants = {"kernels": {"train": train(25000.0, 8, 2048)}, "reference": {"train": train(500.0, 1, 512)},
                "compiled": {"train": train(2000.0, 1, 512)}}
    bench = SimpleNamespace(result=SimpleNamespace(variants=variants))
    for variant in ("reference", "compiled"):
        whole_model.kernels_in_this_run(bench, variant)
    assert measured == [("kernels", (1, 512), False)], "one same-shape run of (a) serves (b) and (c)"
    rows = {row["figure"]: row for row in whole_model.bar_rows("hymba_plus", entry(variants), "cmd")}
    reference = rows["hymba_plus train tokens/s at 1 x 512, kernels vs reference"]
    compiled = rows["hymba_plus train tokens/s at 1 x 512, kernels vs compiled"]
    assert (reference["archgen"], reference["reference_value"], reference["ratio"]) == (4000.0, 500.0, 8.0)
    assert compiled["ratio"] == pytest.approx(2.0)
    assert rows["hymba_plus training MFU, 8 x 2048 tokens"]["archgen"] == 0.1


def test_a_reference_at_the_kernels_shape_needs_no_second_run(monkeypatch):
    monkeypatch.setattr(whole_model, "measure_peer", lambda *args: pytest.fail("(a) already trained at this shape"))
    variants = {"kernels": {"train": train(60000.0, 8, 2048), "prefill": {"tokens_per_s": 2e5}},
                "compiled": {"train": train(43000.0, 8, 2048), "prefill": {"tokens_per_s": 1e5}}}
    whole_model.kernels_in_this_run(SimpleNamespace(result=SimpleNamespace(variants=variants)), "compiled")
    rows = {row["figure"]: row for row in whole_model.bar_rows("bamba_1b", entry(variants), "cmd")}
    assert rows["bamba_1b train tokens/s at 8 x 2048, kernels vs compiled"]["ratio"] == pytest.approx(60 / 43)
    assert rows["bamba_1b prefill tokens/s, kernels vs compiled"]["ratio"] == pytest.approx(2.0)


def test_a_compile_run_on_its_own_takes_kernels_prefill_from_the_same_run(monkeypatch):
    """`--variants compiled` alone: one fresh (a) model gives both the training peer at (c)'s shape and the prefill."""
    measured = peer_recorder(monkeypatch, prefill_tokens_per_s=110000.0)
    variants = {"compiled": {"train": train(2000.0, 1, 512), "prefill": {"tokens_per_s": 22000.0}},
                "reference": {"train": train(500.0, 1, 512), "prefill": {"tokens_per_s": 4000.0}}}
    bench = SimpleNamespace(result=SimpleNamespace(variants=variants))
    for variant in ("compiled", "reference"):
        whole_model.kernels_in_this_run(bench, variant)
    assert measured == [("kernels", (1, 512), True)], "one (a) model, measured once, for (b) and (c)"
    rows = {row["figure"]: row for row in whole_model.bar_rows("nexus", entry(variants), "cmd")}
    assert rows["nexus prefill tokens/s, kernels vs compiled"]["ratio"] == pytest.approx(5.0)
    assert rows["nexus prefill tokens/s, kernels vs reference"]["ratio"] == pytest.approx(27.5)
    assert rows["nexus train tokens/s at 1 x 512, kernels vs compiled"]["ratio"] == pytest.approx(2.0)
    assert not any("MFU" in figure for figure in rows), "(a) did not train at its own shape in this run"


def test_a_failed_peer_is_recorded_and_gives_no_ratio(monkeypatch):
    monkeypatch.setattr(whole_model, "measure_peer", lambda *args: {"prefill_error": "OutOfMemoryError"})
    variants = {"compiled": {"prefill": {"tokens_per_s": 22000.0}}}
    whole_model.kernels_in_this_run(SimpleNamespace(result=SimpleNamespace(variants=variants)), "compiled")
    assert variants["compiled"]["prefill"]["kernels_in_this_run"] == {"prefill_error": "OutOfMemoryError"}
    assert whole_model.bar_rows("nexus", entry(variants), "cmd") == []


def test_only_orders_the_models_within_each_kind_of_step():
    plan = whole_model.plan_steps(["hns_ss_jepa_moe_1b", "hymba_plus"], ("kernels", "reference", "compiled"))
    assert plan == [("hns_ss_jepa_moe_1b", "kernels"), ("hymba_plus", "kernels"), ("hns_ss_jepa_moe_1b", "reference"),
                    ("hymba_plus", "reference"), ("hns_ss_jepa_moe_1b", "compiled"), ("hymba_plus", "compiled")]
    assert whole_model.plan_steps(None, ("kernels", "transformers"))[:3] == [
        ("bamba_1b", "kernels"), ("bamba_1b", "transformers"), ("hymba_plus", "kernels")]
