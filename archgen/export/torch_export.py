"""torch.export of the prefill and decode-step graphs, with the batch and sequence dims dynamic between stated bounds.

Two settings make one graph hold for every size in the bounds:
- `backed_size_oblivious`: while tracing, a dynamic dim is assumed to be at least 2 wherever an op only asks "is it
  1?" to pick a memory layout (broadcast or view). Without it, an example batch of 2 leaves a guard `batch != 1`
  and batch 1 could not be exported. The generated code and runtime ops avoid the remaining such questions
  (reshapes of non-contiguous tensors), and the tests check batch 1 and a 1-token decode against eager.
- the prefill sequence dim starts at 2 (at 1 with meta tokens, which are always prepended): a prompt of one token is
  a decode step at position 0.
A later re-trace of a program (lowering its kernels for ONNX, locating a failed node) runs under the same setting
(`shape_semantics`): a re-trace without it answers "is it 1?" from the example sizes and writes them
into the graph's shapes, so that, say, a prefill traced at one chunk gathers past the end of its tensors at two.
"""

from __future__ import annotations

import contextlib
import io
from dataclasses import dataclass, field

import torch
import torch.fx.experimental._config as fx_config
from torch import nn
from torch.export import Dim, ExportedProgram

from archgen.export.failures import explain, guard_sites
from archgen.export.package import Package
from archgen.export.steps import DecodeStep, Prefill, cache_leaves, padded

EXAMPLE_BATCH = 2  # example sizes for tracing dynamic dims; the checks then run other sizes
EXAMPLE_SEQ = 16


@dataclass(frozen=True)
class Bounds:
    """Sizes the graphs accept: a dynamic dim has (min, max), a static one min == max."""

    batch: tuple[int, int]
    seq: tuple[int, int]  # prompt length of the prefill graph
    max_len: int  # positions a cache holds (meta tokens included); the decode position must stay below it
    meta_tokens: int

    @property
    def dynamic(self) -> dict[str, tuple[int, int]]:
        return {name: span for name, span in (("batch", self.batch), ("seq", self.seq)) if span[0] != span[1]}

    def example(self, name: str) -> int:
        low, high = getattr(self, name)
        return min(max(EXAMPLE_BATCH if name == "batch" else EXAMPLE_SEQ, low), high)


@dataclass
class Tensors:
    """Names, symbolic shapes (a dim is an int or "batch" / "seq") and dtypes of a graph's flat inputs or outputs."""

    names: list[str] = field(default_factory=list)
    shapes: list[list[int | str]] = field(default_factory=list)
    dtypes: list[torch.dtype] = field(default_factory=list)

    def add(self, name: str, shape: list[int | str], dtype: torch.dtype) -> None:
        self.names.append(name)
        self.shapes.append(shape)
        self.dtypes.append(dtype)


@dataclass
class Graph:
    name: str  # "prefill" | "decode"
    module: nn.Module
    args: tuple
    dynamic_shapes: tuple
    inputs: Tensors
    outputs: Tensors


def make_bounds(package: Package, dynamic: set[str], max_batch: int, max_len: int | None,
                batch: int = 1, seq: int = EXAMPLE_SEQ) -> Bounds:
    """Bounds from the package's limits: seq up to max_len minus the meta tokens; static dims at `batch` / `seq`."""
    meta = package.module.config.META_TOKENS
    spec_max = package.module.config.MAX_SEQ_LEN
    max_len = max_len or spec_max
    if max_len > spec_max:
        raise ValueError(f"max_len {max_len} exceeds the spec's model.max_seq_len {spec_max}, the most positions the "
                         f"generated scans are built for; raise model.max_seq_len in the spec and rebuild")
    unknown = dynamic - {"batch", "seq"}
    if unknown:
        raise ValueError(f"--dynamic takes batch and/or seq, got {', '.join(sorted(unknown))}")
    if max_len <= meta + 1:
        raise ValueError(f"max_len {max_len} leaves no room for a prompt after {meta} meta tokens")
    batch_span = (1, max_batch) if "batch" in dynamic else (batch, batch)
    seq_span = (1 if meta else 2, max_len - meta) if "seq" in dynamic else (seq, seq)
    if not 1 <= seq_span[0] <= seq_span[1] <= max_len - meta:
        raise ValueError(f"a prompt of {seq} tokens does not fit a cache of {max_len} positions with {meta} meta tokens")
    return Bounds(batch_span, seq_span, max_len, meta)


def make_graphs(model: nn.Module, bounds: Bounds, vocab_size: int, ragged: bool = False) -> list[Graph]:
    dims = {name: Dim(name, min=low, max=high) for name, (low, high) in bounds.dynamic.items()}
    batch_dim = "batch" if "batch" in dims else bounds.batch[0]
    seq_dim = "seq" if "seq" in dims else bounds.seq[0]
    B, T = bounds.example("batch"), bounds.example("seq")
    logits_dtype = model.lm_head.weight.dtype
    template = cache_leaves(model.empty_cache(B, bounds.max_len, **padded(ragged)))

    def dim0(shape: tuple[int, ...]) -> list[int | str]:
        return [batch_dim, *shape[1:]]

    def spec(*axes):
        """dynamic_shapes for one tensor: {axis: Dim} for the named dims that are dynamic."""
        return {axis: dims[name] for axis, name in axes if name in dims} or None

    prefill_in, prefill_out = Tensors(), Tensors()
    prefill_in.add("input_ids", [batch_dim, seq_dim], torch.int64)
    prefill_args, prefill_dims = (torch.randint(0, vocab_size, (B, T)),), (spec((0, "batch"), (1, "seq")),)
    if ragged:
        prefill_in.add("attention_mask", [batch_dim, seq_dim], torch.int64)
        prefill_args, prefill_dims = (*prefill_args, torch.ones(B, T, dtype=torch.int64)), prefill_dims * 2
    prefill_out.add("logits", [batch_dim, seq_dim, vocab_size], logits_dtype)
    for name, t in template:
        prefill_out.add(f"present.{name}", dim0(tuple(t.shape)), t.dtype)
    prefill = Graph("prefill", Prefill(model, bounds.max_len, ragged), prefill_args, prefill_dims, prefill_in, prefill_out)

    decode_in, decode_out = Tensors(), Tensors()
    decode_in.add("input_ids", [batch_dim, 1], torch.int64)
    decode_in.add("position", [], torch.int64)
    decode_out.add("logits", [batch_dim, 1, vocab_size], logits_dtype)
    for name, t in template:
        decode_in.add(f"past.{name}", dim0(tuple(t.shape)), t.dtype)
        decode_out.add(f"present.{name}", dim0(tuple(t.shape)), t.dtype)
    past = tuple(t for _, t in template)
    decode = Graph("decode", DecodeStep(model, bounds.max_len, ragged),
                   (torch.randint(0, vocab_size, (B, 1)), torch.tensor(min(T, bounds.max_len - 1)), *past),
                   (spec((0, "batch")), None, tuple(spec((0, "batch")) for _ in past)), decode_in, decode_out)
    return [prefill, decode]


def export_program(graph: Graph, model: nn.Module, package: Package) -> ExportedProgram:
    """torch.export.export of one graph; a failure becomes an ExportError naming the layer, op and spec component."""
    try:
        return _export(graph)
    except Exception as error:  # noqa: BLE001 - every exporter failure is explained, then re-raised
        sites = []
        if "Constraints violated" in str(error):
            try:  # trace again, recording where each guard on a dynamic dim was added
                with guard_sites(model, sites):
                    _export(graph)
            except Exception:  # noqa: BLE001
                pass
        raise explain(error, package=package, model=model, graph=graph.name, stage="torch.export", sites=sites) from error


def shape_semantics():
    """The setting every trace of an exported graph runs under, its export and each re-trace (see the module docstring)."""
    return fx_config.patch(backed_size_oblivious=True)


def _export(graph: Graph) -> ExportedProgram:
    # On failure torch.export prints the partial graph to stderr; the ExportError says what matters instead.
    with shape_semantics(), torch.no_grad(), contextlib.redirect_stderr(io.StringIO()):
        return torch.export.export(graph.module, graph.args, dynamic_shapes=graph.dynamic_shapes)
