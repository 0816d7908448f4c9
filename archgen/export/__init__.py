"""Export a generated package for deployment runtimes: a prefill graph and a decode-step graph, as torch.export
programs (.pt2) and ONNX, with a manifest.json that says how to drive them.

    generated/<name>/ --load--> Model (weights or a seeded init) --steps--> Prefill, DecodeStep
        --torch.export--> <graph>.pt2 --torch.onnx--> <graph>.onnx --check--> manifest.json

One public function, `export_package`; `archgen export` and `archgen build --export` call it.
"""

from __future__ import annotations

import contextlib
import hashlib
import inspect
import logging
import shutil
import tempfile
import warnings
from collections.abc import Callable, Collection
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import torch

from archgen.emit.write import replace_directory
from archgen.export.failures import ExportError
from archgen.export.manifest import build_manifest, write_manifest
from archgen.export.onnx_export import WEIGHTS_FILE, export_onnx, onnx_session, run_onnx, save_onnx
from archgen.export.package import Package, load_package
from archgen.export.torch_export import Bounds, Graph, export_program, make_bounds, make_graphs
from archgen.testing import relative_error

FORMATS = ("pt2", "onnx")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 3e-2, torch.float16: 1e-2}  # relative, for the export checks
DEFAULT_OPSET = 18


@dataclass(frozen=True)
class ExportResult:
    directory: Path
    manifest: dict
    files: dict[str, dict[str, Path]]  # graph -> format -> file


def export_package(package: str | Path | ModuleType, output: str | Path | None = None, *,
                   formats: Collection[str] = FORMATS, weights: str | Path | None = None, seed: int = 0,
                   dtype: str = "float32", dynamic: Collection[str] = ("batch", "seq"), max_batch: int = 64,
                   max_len: int | None = None, batch: int = 1, seq: int = 16, opset: int = DEFAULT_OPSET,
                   check: bool = True, progress: Callable[[str], None] | None = None, ragged: bool = False) -> ExportResult:
    """Export the prefill and decode-step graphs of a generated package into `output` (default exports/<name>/).

    package: the generated directory, or the imported package.
    weights: a `save_pretrained` directory; without one the model is initialised from `seed` (recorded).
    dynamic: which of batch and seq stay dynamic, batch in [1, max_batch] and the prompt length in [2, max_len -
        meta tokens] (from 1 with meta tokens); a static dim takes `batch` / `seq`.
    max_len: positions a cache holds, meta tokens included (default: the spec's max_seq_len).
    check: run both graphs (the reloaded .pt2 and onnxruntime) at sizes other than the traced ones and compare with
        eager; a relative error above TOLERANCE[dtype] is an ExportError.
    progress: called with the name of each step as it starts (the CLI shows them; a tiny spec takes tens of seconds).
    ragged: the prefill graph also takes `attention_mask` (B, T) of left-padded prompts (1 token, 0 pad) and the
        caches carry each row's pads, so a batch of prompts of different lengths decodes each row as it would alone.
    The output directory is replaced only when everything succeeded. Failures raise ExportError, whose message names
    the graph, the layer, the op and the spec component.
    """
    with quiet_exporters():
        return _export_package(package, output, formats, weights, seed, dtype, dynamic, max_batch, max_len, batch, seq,
                               opset, check, progress or (lambda step: None), ragged)


@contextlib.contextmanager
def quiet_exporters():
    """Silence what torch.export, torch.onnx and onnxscript print that says nothing to the user (a line per torchvision
    op they skip, deprecations inside torch): archgen reports its own steps and every real failure."""
    loggers = [logging.getLogger(name) for name in ("torch.onnx", "torch.export", "torch._export", "onnxscript")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            for category in (FutureWarning, DeprecationWarning, UserWarning):
                warnings.filterwarnings("ignore", category=category, module=r"(torch|onnxscript|onnx_ir|onnx)(\.|$)")
            # torch's pytree deprecation raised while unpickling specs, which the warning attributes to the stdlib's
            # copyreg rather than to torch (torch 2.13)
            warnings.filterwarnings("ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated", category=FutureWarning)
            yield
    finally:
        for logger, level in zip(loggers, levels, strict=True):
            logger.setLevel(level)


def _export_package(package, output, formats, weights, seed, dtype, dynamic, max_batch, max_len, batch, seq, opset, check,
                    progress, ragged) -> ExportResult:
    unknown = set(formats) - set(FORMATS)
    if unknown or not formats:
        raise ValueError(f"formats are {', '.join(FORMATS)}; got {', '.join(sorted(unknown)) or 'none'}")
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    pkg = load_package(package)
    model, weights_info = _load_model(pkg, weights, seed, DTYPES[dtype])
    bounds = make_bounds(pkg, set(dynamic), max_batch, max_len, batch, seq)
    graphs = make_graphs(model, bounds, pkg.module.config.VOCAB_SIZE, ragged)
    target = Path(output) if output is not None else Path("exports") / pkg.name
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.exporting-", dir=target.parent))
    staging.chmod(0o755)  # mkdtemp makes it private; the result is an ordinary output directory
    try:
        files: dict[str, dict[str, str]] = {graph.name: {} for graph in graphs}
        protos, programs = {}, []
        for graph in graphs:
            progress(f"tracing {graph.name} with torch.export")
            program = export_program(graph, model, pkg)
            programs.append(program)
            if "pt2" in formats:
                torch.export.save(program, staging / f"{graph.name}.pt2")
                files[graph.name]["pt2"] = f"{graph.name}.pt2"
            if "onnx" in formats:
                progress(f"converting {graph.name} to ONNX")
                protos[graph.name] = export_onnx(program, graph, opset, pkg, model)
        if protos:
            progress("writing the ONNX files")
            for name, file in save_onnx(protos, staging).items():
                files[name]["onnx"] = file
        if check:
            progress("running the exported graphs against eager")
        checks = _check(model, graphs, bounds, staging, files, DTYPES[dtype]) if check else None
        manifest = build_manifest(pkg, bounds, graphs, files, dtype=DTYPES[dtype], weights=weights_info,
                                  opset=opset if "onnx" in formats else None, checks=checks,
                                  notes=_notes(model, programs, ragged), onnx_weights=WEIGHTS_FILE if protos else None)
        write_manifest(manifest, staging)
        replace_directory(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    paths = {graph: {fmt: target / name for fmt, name in by_format.items()} for graph, by_format in files.items()}
    return ExportResult(target, manifest, paths)


def _load_model(pkg: Package, weights: str | Path | None, seed: int, dtype: torch.dtype):
    Model = pkg.module.Model
    if weights is not None:
        model = Model.from_pretrained(weights)
        digest = hashlib.sha256((Path(weights) / "model.safetensors").read_bytes()).hexdigest()
        info = {"source": str(weights), "sha256": digest}
    else:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = Model()
        info = {"source": "seeded initialisation (Model.init_weights after torch.manual_seed)", "seed": seed}
    return model.to(dtype).eval(), info


def _notes(model, programs: list, ragged: bool = False) -> list[str]:
    """What a runtime driving the graphs should know beyond their inputs and outputs."""
    notes = []
    if ragged:
        notes.append("Prompts of different lengths: left-pad them and pass `attention_mask` (B, T) to prefill, 1 for a "
                     "token and 0 for a pad. `position` still counts every slot (pads included: the prompt's padded "
                     "length + meta_tokens), and the caches carry each row's pads (`pads`), so every row decodes as "
                     "it would alone; the logits at pads are meaningless.")
    if "update_memory" in inspect.signature(model.forward).parameters:
        notes.append("The test-time memory is written in both graphs, as model.generate does: a chunk's keys wait in "
                     "fixed-size pending buffers of the cache, and each graph runs a fixed number of masked chunk "
                     "writes (one per decode step; enough for the longest prompt in prefill, so a short prompt costs "
                     "as much memory compute as the longest).")
    kernels = sorted({str(node.target) for program in programs for node in program.graph.nodes
                      if str(node.target).startswith("archgen_v")})
    if kernels:
        notes.append(f"The .pt2 programs hold the Triton kernels {', '.join(kernels)} as single nodes: import the generated "
                     "package before torch.export.load so that they are registered (they run Triton on CUDA tensors and "
                     "the reference on CPU tensors). The ONNX graphs hold their reference ops instead.")
    return notes


def _check(model, graphs: list[Graph], bounds: Bounds, directory: Path, files: dict, dtype: torch.dtype) -> dict:
    """Run each exported file at sizes other than the traced ones, against eager; relative max error per file."""
    B = bounds.batch[1] if bounds.batch[0] == bounds.batch[1] else min(3, bounds.batch[1])
    low, high = bounds.seq
    T = min(max(23, low), high)  # the traced example is 16
    generator = torch.Generator().manual_seed(0)
    vocab = model.lm_head.weight.size(0)
    prompt = (torch.randint(0, vocab, (B, T), generator=generator),)
    prefill, decode = graphs
    if "attention_mask" in prefill.inputs.names:  # the first row left-padded to half its length
        prompt = (*prompt, (torch.arange(T) >= torch.tensor([T // 2] + [0] * (B - 1))[:, None]).long())
    with torch.no_grad():
        eager_prefill = list(prefill.module(*prompt))
        token = eager_prefill[0][:, -1:].argmax(-1)
        decode_args = (token, torch.tensor(T + bounds.meta_tokens), *eager_prefill[1:])
        eager_decode = list(decode.module(*decode_args))
    result = {"batch": B, "seq": T, "tolerance": TOLERANCE[dtype]}
    for graph, args, expected in ((prefill, prompt, eager_prefill), (decode, decode_args, eager_decode)):
        errors = {}
        if "pt2" in files[graph.name]:
            program = torch.export.load(directory / files[graph.name]["pt2"])
            with torch.no_grad():
                errors["pt2"] = _relative_error(list(program.module()(*args)), expected)
        if "onnx" in files[graph.name] and dtype != torch.bfloat16:  # numpy, hence onnxruntime's Python API, has no bfloat16
            session = onnx_session(directory / files[graph.name]["onnx"])
            errors["onnx"] = _relative_error(run_onnx(session, graph, args), expected)
        result[graph.name] = errors
        bad = {fmt: err for fmt, err in errors.items() if not err <= TOLERANCE[dtype]}
        if bad:
            raise ExportError(f"the exported {graph.name} graph does not match eager at batch {B}, prompt {T}: relative "
                              f"error {', '.join(f'{fmt} {err:.2e}' for fmt, err in bad.items())} > {TOLERANCE[dtype]:.0e}")
    return result


def _relative_error(actual: list[torch.Tensor], expected: list[torch.Tensor]) -> float:
    """The worst relative_error over the outputs (inf when their number or a shape differs)."""
    if len(actual) != len(expected):
        return float("inf")
    return max((relative_error(a, e) for a, e in zip(actual, expected, strict=True)), default=0.0)


__all__ = ["export_package", "ExportError", "ExportResult"]
