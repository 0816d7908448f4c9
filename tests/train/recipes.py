"""Small corpora and recipes for the training tests: tiny sequences, few steps, everything under tmp_path."""

from __future__ import annotations

import json
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]

PARAGRAPHS = [
    "The quick brown fox jumps over the lazy dog. " * 3,
    "A state space model reads a sequence one token at a time and keeps a fixed-size state. " * 2,
    "Attention compares every query with every key that came before it. " * 2,
    "Mixtures of experts route each token to a few of many feed-forward networks. " * 2,
    "Checkpoints are written into a hidden directory and renamed into place when complete. " * 2,
    "Tokens per second, loss and learning rate are logged every few steps. " * 2,
]


def write_corpus(directory: Path, copies: int = 6) -> Path:
    """A JSONL file of short English documents (the same few, repeated, so a tiny model can learn them quickly)."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "corpus.jsonl"
    rows = [{"text": text, "id": i} for i in range(copies) for text in PARAGRAPHS]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def recipe_dict(data: Path, spec: str = "hspmn", **overrides) -> dict:
    recipe = {
        "schema_version": 1,
        "spec": {"path": str(ROOT / "specs" / f"{spec}.yaml"), "preset": "tiny"},
        "data": {"train": [str(data)], "validation": {"fraction": 0.2}, "seq_len": 16, "cache_dir": str(data.parent / "cache")},
        "tokenizer": {"kind": "bytes"},
        "optimizer": {"lr": 1.0e-2, "weight_decay": 0.0},
        "schedule": {"kind": "cosine", "warmup_steps": 0, "min_lr_ratio": 0.5},
        "batch": {"tokens": 64, "micro_batch": 2},
        "steps": 4,
        "eval": {"interval": 100, "batches": 2},
        "log_interval": 1,
        "seed": 0,
        "output": str(data.parent / "run"),
    }
    for dotted, value in overrides.items():
        node = recipe
        *parents, leaf = dotted.split("__")
        for key in parents:
            node = node.setdefault(key, {})
        node[leaf] = value
    return recipe


def write_recipe(path: Path, recipe: dict) -> Path:
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path
