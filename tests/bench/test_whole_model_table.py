"""bench/whole_model_table.py: the README's whole-model table merged from several GPU runs. Each cell is the latest
run's figure and names that run; a ratio comes from inside one run only; what no run measured is listed."""

import json
from pathlib import Path

from bench import whole_model_table


def whole_model_run(path: Path, variants: dict, transformers: dict | None = None) -> Path:
    entry = {"parameters": 1_045_286_144, "device": "H200", "matmul_flops_per_s": 7.7e14,
             "config": {"batch": 8, "seq_len": 2048, "decode_batches": [1, 32]}, "variants": variants}
    if transformers:
        entry["transformers"] = transformers
    path.write_text(json.dumps({"date": "2026-12-01", "command": "python bench/whole_model.py", "models": {"bamba_1b": entry}}))
    return path


def decode(ms: float, floor: float) -> dict:
    return {"ms_per_token": ms, "floor_ms_per_token": floor, "times_floor": ms / floor}


def test_each_cell_is_the_latest_runs_and_names_it(tmp_path):
    first = whole_model_run(tmp_path / "first.json", {
        "kernels": {"train": {"tokens_per_s": 62000.0, "mfu": 0.5}, "prefill": {"tokens_per_s": 230000.0},
                    "decode_batch_1": decode(1.8, 0.5), "decode_batch_32": decode(2.9, 0.7)},
        "reference": {"train": {"tokens_per_s": 23000.0, "mfu": 0.19}, "prefill": {"tokens_per_s": 68000.0},
                      "decode_batch_1": decode(13.9, 0.5), "decode_batch_32": decode(14.8, 0.7)}},
        {"version": "5.17.0", "prefill": {"tokens_per_s": 3500.0}, "decode_batch_1": {"ms_per_token": 21.5}})
    second = tmp_path / "decode.json"  # bench/decode.py's form: batch-1 decoding with the CUDA graph only
    second.write_text(json.dumps({"date": "2026-12-02", "models": {"bamba_1b": {
        "batch_1": {"graph_ms_per_token": 0.94, "floor_ms_per_token": 0.5},
        "transformers": {"version": "5.17.0", "ms_per_token": 21.0}}}, "bars": [
        {"figure": "bamba_1b batch-1 decode (graph), bf16", "archgen": 0.94, "unit": "ms/token",
         "reference": "HBM floor: weight + cache bytes over the copy bandwidth", "reference_value": 0.5, "ratio": 0.5 / 0.94,
         "bar": 0.5}]}))
    third = whole_model_run(tmp_path / "compiled.json", {
        "compiled": {"train": {"tokens_per_s": 43000.0, "mfu": 0.35, "batch": 8, "seq_len": 2048,
                               "kernels_at_this_shape": {"tokens_per_s": 60000.0, "batch": 8, "seq_len": 2048}},
                     "prefill": {"tokens_per_s": 115000.0, "kernels_in_this_run": {"tokens_per_s": 220000.0}}}})
    merged = whole_model_table.merge([first, second, third])
    kernels = merged["cells"]["bamba_1b"]["kernels"]
    assert kernels["decode_batch_1"]["ms_per_token"] == 0.94 and kernels["decode_batch_1"]["source"].startswith("decode.json")
    assert kernels["decode_batch_32"]["ms_per_token"] == 2.9 and kernels["decode_batch_32"]["source"].startswith("first.json")
    assert kernels["train"]["batch"] == 8, "a run that did not name its training shape trained at the configured one"
    bars = {row["figure"]: row for row in merged["bars"]}
    assert bars["bamba_1b batch-1 decode vs HBM floor"]["source"].startswith("decode.json"), "the same figure, renamed"
    assert bars["bamba_1b prefill tokens/s, kernels vs compiled"]["ratio"] == 220000.0 / 115000.0
    assert bars["bamba_1b train tokens/s at 8 x 2048, kernels vs compiled"]["ratio"] == 60000.0 / 43000.0
    text = whole_model_table.table(merged)
    assert "| 0.940 (1.88× floor) [2] |" in text and "| 2.900 (4.14× floor) [1] |" in text
    assert "hymba_plus (b) references: train, prefill, decode_batch_1, decode_batch_32 not measured" in text
    assert "bamba_1b (a) vs (c) references compiled" not in text, "both of (c)'s ratios were measured inside run 3"
    whole_model_table.plot_merged(merged, tmp_path / "table.png")
    assert (tmp_path / "table.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cells_from_different_runs_give_no_ratio(tmp_path):
    kernels = whole_model_run(tmp_path / "a.json", {"kernels": {"prefill": {"tokens_per_s": 230000.0}}})
    compiled = whole_model_run(tmp_path / "c.json", {"compiled": {"prefill": {"tokens_per_s": 115000.0}}})
    merged = whole_model_table.merge([kernels, compiled])
    assert not [row for row in merged["bars"] if "kernels vs compiled" in row["figure"]]
    gaps = whole_model_table.missing(merged)
    assert "bamba_1b (a) vs (c) references compiled, prefill: no ratio measured inside one run" in gaps
