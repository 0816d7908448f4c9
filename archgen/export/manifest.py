"""manifest.json: what a deployment runtime needs to drive the exported graphs without reading any Python."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from archgen import __version__
from archgen.export.package import Package
from archgen.export.torch_export import Bounds, Graph, Tensors

MANIFEST_VERSION = 1

GENERATION = (
    "Run `prefill` on the prompt (B, T): it returns the logits of every prompt position and every cache tensor, "
    "filled. Then repeat `decode`: feed one token per row (B, 1), `position` (int64 scalar) = the number of "
    "positions already in the cache, and every cache tensor as `past.<name>` (the previous step's "
    "`present.<name>`, in manifest order); it returns the next logits (B, 1, V) and the updated caches. After a "
    "prompt of T tokens the first decode position is T + meta_tokens, each step adds 1, and it must stay below "
    "max_len. A prompt of one token (no meta tokens) is a decode step at position 0 from all-zero caches."
)


def build_manifest(package: Package, bounds: Bounds, graphs: list[Graph], files: dict[str, dict[str, str]], *,
                   dtype: torch.dtype, weights: dict, opset: int | None, checks: dict | None,
                   notes: list[str] = (), onnx_weights: str | None = None) -> dict:
    decode = next(g for g in graphs if g.name == "decode")
    cache = [{"name": name.removeprefix("past."), "shape": shape, "dtype": _dtype(dt)}
             for name, shape, dt in zip(decode.inputs.names, decode.inputs.shapes, decode.inputs.dtypes, strict=True)
             if name.startswith("past.")]
    return {
        "manifest_version": MANIFEST_VERSION,
        "model": package.name,
        "spec": package.source,
        "preset": package.preset,
        "spec_hash": package.spec_hash,
        "exported_by": f"archgen {__version__}, torch {torch.__version__.split('+')[0]}",
        "weights": weights,
        "dtype": _dtype(dtype),
        "vocab_size": package.module.config.VOCAB_SIZE,
        "meta_tokens": bounds.meta_tokens,
        "max_len": bounds.max_len,
        "dynamic_dims": {name: {"min": low, "max": high} for name, (low, high) in bounds.dynamic.items()},
        "static_dims": {name: span[0] for name, span in (("batch", bounds.batch), ("seq", bounds.seq))
                        if name not in bounds.dynamic},
        "onnx_opset": opset,
        "onnx_weights": onnx_weights,  # external data shared by the .onnx graphs (keep it beside them)
        "cache": cache,
        "graphs": {g.name: {"files": files.get(g.name, {}), "inputs": _tensors(g.inputs), "outputs": _tensors(g.outputs)}
                   for g in graphs},
        "generation": GENERATION,
        "notes": list(notes),
        "checks": checks,
    }


def write_manifest(manifest: dict, directory: Path) -> Path:
    path = directory / "manifest.json"
    path.write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    return path


def _tensors(tensors: Tensors) -> list[dict]:
    return [{"name": n, "shape": s, "dtype": _dtype(d)}
            for n, s, d in zip(tensors.names, tensors.shapes, tensors.dtypes, strict=True)]


def _dtype(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")
