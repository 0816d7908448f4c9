"""Issue 12's whole-model table, its bar rows and its plot, merged from the GPU runs' JSON files, on any machine.

Each GPU run measures a few cells of the table (the budget of one device call never holds all of it), so the README's
table is assembled from several runs: this script takes their JSON files, oldest first, keeps for every cell (model,
variant, part) the figure of the latest run that measured it, and writes
  whole_model_table.md   the table (training tokens/s with MFU and shape, prefill tokens/s, batch-1 and batch-32
                         decode ms/token against the floor, peak memory), each cell tagged with the run it came from;
                         the bar rows, each a ratio measured inside one run (never across runs); and every cell or
                         ratio that no run has measured yet
  whole_model.png        bench/whole_model.py's plot (decode ms/token per variant against the floor, training and
                         prefill tokens/s), a row per model, transformers' BambaForCausalLM beside Bamba's variants
  whole_model_merged.json
It reads bench/whole_model.py's whole_model.json, bench/decode.py's decode.json (batch-1 CUDA-graph decoding, the
transformers peer) and bench/train_profile.py's train_profile.json (a training step of the package as generated).

    python bench/whole_model_table.py bench/results/whole_model_seeds.h200.json ... --out /tmp/table
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from types import SimpleNamespace

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.whole_model import MODELS, bar_rows  # noqa: E402

VARIANT_NAMES = {"kernels": "(a) kernels", "reference": "(b) references", "compiled": "(c) references compiled",
                 "transformers": "(d) transformers"}
DECODE_BATCHES = (1, 32)
TRAIN_BAR = 0.4  # issue 12: training MFU of Bamba-1B and Hymba+ at >= 16k tokens


def source_name(path: Path, document: dict) -> str:
    date = document.get("date") or document.get("meta", {}).get("date", "")
    return f"{path.name} ({str(date)[:10]})"


def cells_of(path: Path, document: dict) -> tuple[dict, list[dict], dict]:
    """(cells, bar rows, context) of one run: cells[model][variant][part] = figures; context[model] = the model's
    parameters, floors and config, as far as the run recorded them."""
    cells: dict = {}
    rows: list[dict] = []
    context: dict = {}
    if "sections" in document:  # bench/train_profile.py
        sections = document["sections"]
        for name, section in sections.items():
            model, _, variant = name.partition(" ")
            if variant != "kernels" or "tokens_per_s" not in section:
                continue
            shape = sections.get(model, {})
            train = {"tokens_per_s": section["tokens_per_s"], "mfu": section.get("mfu"), "batch": shape.get("batch"),
                     "seq_len": shape.get("seq_len"), "peak_memory_gib": section.get("peak_memory_gib")}
            cells.setdefault(model, {}).setdefault("kernels", {})["train"] = train
            context[model] = {"parameters": shape.get("parameters")}
            rows.append({"figure": f"{model} training MFU, {train['batch']} x {train['seq_len']} tokens",
                         "archgen": train["mfu"], "unit": "fraction of measured bf16 matmul rate",
                         "reference": "bf16 matmul rate", "reference_value": shape.get("matmul_flops_per_s"),
                         "ratio": train["mfu"], "bar": TRAIN_BAR, "command": document["meta"].get("command")})
        return cells, rows, context
    if "models" in document and any("batch_1" in entry for entry in document["models"].values()):  # bench/decode.py
        for model, entry in document["models"].items():
            batch_1 = entry.get("batch_1", {})
            if "graph_ms_per_token" in batch_1:
                ms, floor = batch_1["graph_ms_per_token"], batch_1["floor_ms_per_token"]
                cells.setdefault(model, {}).setdefault("kernels", {})["decode_batch_1"] = {
                    "ms_per_token": ms, "floor_ms_per_token": floor, "times_floor": ms / floor}
            peer = entry.get("transformers", {})
            if "ms_per_token" in peer:
                cells.setdefault(model, {}).setdefault("transformers", {})["decode_batch_1"] = {
                    "ms_per_token": peer["ms_per_token"], "version": peer.get("version")}
        for row in document.get("bars", []):  # named as bench/whole_model.py names the same figures
            model = row["figure"].split()[0]
            peer = "HBM floor" if row["reference"].startswith("HBM floor") else "transformers"
            if "batch-1 decode (graph)" in row["figure"]:
                rows.append({**row, "figure": f"{model} batch-1 decode vs {peer}"})
        return cells, rows, context
    for model, entry in document.get("models", {}).items():  # bench/whole_model.py
        config = entry.get("config", {})
        variants = {variant: {part: figures for part, figures in parts.items() if isinstance(figures, dict)}
                    for variant, parts in entry.get("variants", {}).items()}
        for parts in variants.values():  # runs before session 8 trained at the configured shape and did not say so
            if "train" in parts and "batch" not in parts["train"]:
                parts["train"] = {**parts["train"], "batch": config.get("batch"), "seq_len": config.get("seq_len")}
        entry = {**entry, "variants": variants}
        peer = entry.get("transformers", {})
        if peer:
            variants["transformers"] = {part: {**peer[part], "version": peer.get("version")}
                                        for part in ("prefill", "decode_batch_1") if part in peer}
        variants = {variant: parts for variant, parts in variants.items() if parts}
        if variants:
            cells[model] = variants
            context[model] = {key: entry.get(key) for key in ("parameters", "active_parameters", "config")}
        if variants and "config" in entry:
            rows += bar_rows(model, entry, document.get("command", ""))
        if "figures" in entry:  # one HSPMN block at the seed's shape
            context[model] = {"figures": entry["figures"]}
    return cells, rows, context


def merge(paths: list[Path]) -> dict:
    """Every cell's latest figure, tagged with its run; the latest bar row of each figure, tagged likewise."""
    cells: dict = {}
    bars: dict = {}
    context: dict = {}
    sources = []
    for path in paths:
        document = json.loads(path.read_text())
        source = source_name(path, document)
        sources.append(source)
        run_cells, rows, run_context = cells_of(path, document)
        for model, variants in run_cells.items():
            for variant, parts in variants.items():
                for part, figures in parts.items():
                    cells.setdefault(model, {}).setdefault(variant, {})[part] = {**figures, "source": source}
        for row in rows:
            bars[row["figure"]] = {**row, "source": source}
        for model, values in run_context.items():
            context.setdefault(model, {}).update({k: v for k, v in values.items() if v is not None})
            if "figures" in values:
                context[model]["source"] = source
    return {"sources": sources, "cells": cells, "bars": list(bars.values()), "context": context}


def number(value: float, form: str) -> str:
    return format(value, form) if isinstance(value, (int, float)) and math.isfinite(value) else "?"


def cell_text(figures: dict | None, part: str, tags: dict) -> str:
    if figures is None:
        return "—"
    tag = f" [{tags[figures['source']]}]"
    if part == "train":
        shape = f" at {figures['batch']} × {figures['seq_len']}" if figures.get("batch") else ""
        mfu = f" ({number(100 * figures['mfu'], '.1f')}% MFU)" if figures.get("mfu") is not None else ""
        return f"{number(figures['tokens_per_s'], ',.0f')}{mfu}{shape}{tag}"
    if part == "prefill":
        return f"{number(figures['tokens_per_s'], ',.0f')}{tag}"
    floor = f" ({number(figures['times_floor'], '.2f')}× floor)" if "times_floor" in figures else ""
    return f"{number(figures['ms_per_token'], '.3f')}{floor}{tag}"


def missing(merged: dict) -> list[str]:
    """The cells of issue 12's table that no run measured, and the (a)-vs-(b)/(c) ratios that no run measured inside
    itself (their cells may come from different runs, which gives no ratio)."""
    out = []
    figures = {row["figure"] for row in merged["bars"]}
    for model in MODELS:
        variants = merged["cells"].get(model, {})
        wanted = ["kernels", "reference", "compiled", *(["transformers"] if model == "bamba_1b" else [])]
        for variant in wanted:
            parts = {"compiled": ("train", "prefill"), "transformers": ("prefill", "decode_batch_1")}.get(
                variant, ("train", "prefill", *(f"decode_batch_{b}" for b in DECODE_BATCHES)))
            gone = [part for part in parts if part not in variants.get(variant, {})]
            if gone:
                out.append(f"{model} {VARIANT_NAMES[variant]}: {', '.join(gone)} not measured")
        for other in ("reference", "compiled"):
            parts = ("train", "prefill") if other == "compiled" else ("train", "prefill", "batch-1 decode", "batch-32 decode")
            for part in parts:
                if not any(figure.startswith(f"{model} ") and f"kernels vs {other}" in figure and
                           (part in figure if "decode" in part else f" {part} " in f" {figure} ") for figure in figures):
                    out.append(f"{model} (a) vs {VARIANT_NAMES[other]}, {part}: no ratio measured inside one run")
    return out


def table(merged: dict) -> str:
    sources = merged["sources"]
    tags = {source: i + 1 for i, source in enumerate(sources)}
    header = ("| model | variant | training step, tokens/s | prefill tokens/s | batch-1 decode ms/token | "
              "batch-32 decode ms/token | peak GiB (train / prefill / decode b1) |")
    lines = ["## The table", "", header, "|" + "---|" * 7]
    parts = ("train", "prefill", *(f"decode_batch_{b}" for b in DECODE_BATCHES))
    for model in [*MODELS, *(m for m in merged["cells"] if m not in MODELS)]:
        variants = merged["cells"].get(model, {})
        parameters = merged["context"].get(model, {}).get("parameters")
        label = f"{model} ({parameters / 1e9:.2f} B)" if parameters else model
        for variant in [v for v in dict.fromkeys((*VARIANT_NAMES, *variants)) if v in variants]:
            figures = variants[variant]
            peaks = " / ".join(number(figures.get(part, {}).get("peak_memory_gib", math.nan), ".1f")
                               for part in ("train", "prefill", "decode_batch_1"))
            row = [label, VARIANT_NAMES.get(variant, variant), *(cell_text(figures.get(p), p, tags) for p in parts), peaks]
            lines.append("| " + " | ".join(row) + " |")
            label = ""
    lines += ["", "Runs: " + "; ".join(f"[{tags[s]}] {s}" for s in sources), "", "## Bar rows (each ratio inside one run)",
              "", "| figure | archgen | peer | ratio | bar | verdict | run |", "|---|---|---|---|---|---|---|"]
    for row in sorted(merged["bars"], key=lambda row: row["figure"]):
        if not isinstance(row.get("ratio"), (int, float)):
            continue
        verdict = "pass" if row["ratio"] >= row["bar"] else "miss"
        lines.append(f"| {row['figure']} | {number(row['archgen'], '.4g')} {row.get('unit', '')} | "
                     f"{number(row['reference_value'], '.4g')} ({row['reference']}) | {row['ratio']:.3f} | {row['bar']} | "
                     f"{verdict} | [{tags[row['source']]}] |")
    lines += ["", "## The seeds' headline claims", ""]
    block = merged["context"].get("hspmn_block")
    if block:
        figures = block["figures"]
        lines.append(f"- HSPMN, one block at batch {figures['batch']} × {figures['seq_len']}: forward "
                     f"{number(figures.get('forward', {}).get('tokens_per_s', math.nan) / 1e6, '.2f')} M tokens/s "
                     f"(seed: {figures['seed']['forward_tokens_per_s'] / 1e6:.2f} M on an {figures['seed']['device']}), "
                     f"forward + backward "
                     f"{number(figures.get('forward_backward', {}).get('tokens_per_s', math.nan) / 1e6, '.2f')} M tokens/s "
                     f"(seed: ~{figures['seed']['train_tokens_per_s'] / 1e3:.0f} k) [{tags[block['source']]}]")
    hns = merged["cells"].get("hns_ss_jepa_moe_1b", {}).get("kernels")
    if hns:
        parameters = merged["context"].get("hns_ss_jepa_moe_1b", {}).get("parameters")
        lines.append(f"- HNS-SS-JEPA-MoE `1b` ({number((parameters or math.nan) / 1e9, '.2f')} B parameters; the seed: "
                     f"\">100k tokens/s, <20 ms/token\" for a \"7B\"): training {cell_text(hns.get('train'), 'train', tags)}, "
                     f"prefill {cell_text(hns.get('prefill'), 'prefill', tags)}, batch-1 decode "
                     f"{cell_text(hns.get('decode_batch_1'), 'decode_batch_1', tags)}")
    gaps = missing(merged)
    lines += ["", "## Not measured yet", "", *(f"- {gap}" for gap in gaps or ["nothing"])]
    return "\n".join(lines) + "\n"


def plot_merged(merged: dict, path: Path) -> None:
    """bench/whole_model.py's figure from the merged cells: a row per model, (d) as one more variant of Bamba's."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot

    from archgen.benchmark import plot_into

    names = [name for name in MODELS if name in merged["cells"]]
    figure, axes = pyplot.subplots(len(names), 2, figsize=(11, 3.6 * len(names)), squeeze=False)
    for (decode_axis, throughput_axis), name in zip(axes, names, strict=True):
        cells = merged["cells"][name]
        shown = [v for v in VARIANT_NAMES if v != "transformers" or name == "bamba_1b"]  # one colour per variant
        variants = {VARIANT_NAMES.get(v, v): cells.get(v, {}) for v in dict.fromkeys((*shown, *cells))}
        config = {"decode_batches": list(DECODE_BATCHES), **merged["context"].get(name, {}).get("config", {})}
        config.setdefault("batch", 8)
        config.setdefault("seq_len", 2048)
        plot_into(SimpleNamespace(config=config, variants=variants), decode_axis, throughput_axis)
        decode_axis.set_title(f"{name}: decoding")
    figure.suptitle(f"archgen whole-model benchmark, bf16, {len(merged['sources'])} GPU runs merged "
                    "(whole_model_table.md names each figure's run)")
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    pyplot.close(figure)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("files", nargs="+", type=Path, help="JSON files of GPU runs, oldest first")
    parser.add_argument("--out", type=Path, default=Path("out"))
    args = parser.parse_args()
    merged = merge(args.files)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "whole_model_merged.json").write_text(json.dumps(merged, indent=2, default=str) + "\n")
    text = f"Made by `python bench/whole_model_table.py {' '.join(map(str, args.files))} --out DIR`.\n\n" + table(merged)
    (args.out / "whole_model_table.md").write_text(text)
    plot_merged(merged, args.out / "whole_model.png")
    print(text)


if __name__ == "__main__":
    main()
