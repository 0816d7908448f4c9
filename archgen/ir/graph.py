"""Lower a ResolvedSpec to the IR: a networkx DiGraph whose nodes are typed ops and whose edges carry activations.

Node ids are the dotted module paths the generated model uses ("layers.3.mixer"), so a parameter's full name is
node id + "." + its name in the op's parameter table. Each op carries its kind's resolved config; the passes fill in
shapes (archgen.passes.shapes) and the kernel it runs (archgen.passes.kernels), and the emitter reads ops only.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import networkx as nx

from archgen.kinds import Dims, Shape, kind_of
from archgen.kinds.embedding import LMHeadConfig
from archgen.kinds.parallel_combine import ParallelCombineConfig
from archgen.resolve.resolve import Component, ResolvedSpec


@dataclass(frozen=True)
class KernelChoice:
    """A Triton kernel function an op runs on CUDA tensors instead of the reference function of the same name."""

    file: str  # kernels/<file>.py, copied to generated/<name>/kernels/
    function: str  # the name the generated code calls (kernels.<function>)
    # templates/runtime/<reference>.py holds the reference function of the same name; None for a fused form of kernels
    # whose references are there (its template's fallback is those kernels' path, its op never reaches an export)
    reference: str | None
    rule: str  # why this op got it (the rule's description), for reports and tests


@dataclass
class Op:
    name: str  # node id and module path
    kind: str  # a key of archgen.kinds.KINDS
    config: Any  # the kind's resolved config
    layer: int | None = None  # the layer the op belongs to
    component: str | None = None  # the spec name of the component ("attn", "ssm", ...)
    spec_path: str | None = None  # where it is declared ("mixers.attn", "heads.medusa", "memory")
    params: dict[str, tuple[int, ...]] = field(default_factory=dict)
    in_shapes: list[Shape] = field(default_factory=list)
    out_shape: Shape | None = None
    kernels: dict[str, KernelChoice] = field(default_factory=dict)  # {function: its kernel}, by the kernel-selection pass


@dataclass
class IR:
    graph: nx.DiGraph
    dims: Dims
    spec: ResolvedSpec  # provenance for the emitted files (name, hash, lock document); never re-derived from
    order: list[str] = field(default_factory=list)  # ops in execution order

    def ops(self) -> list[Op]:
        return [self.graph.nodes[name]["op"] for name in self.order]

    def op(self, name: str) -> Op:
        return self.graph.nodes[name]["op"]

    def inputs(self, name: str) -> list[Op]:
        return [self.op(source) for source in self.graph.predecessors(name)]


class _Builder:
    def __init__(self, dims: Dims):
        self.graph = nx.DiGraph()
        self.order: list[str] = []
        self.dims = dims
        # Layers share their component's config object, so a 512-layer model computes each parameter table once.
        self._params: dict[tuple[str, int], dict[str, tuple[int, ...]]] = {}

    def add(self, name: str, kind: str, config: Any, inputs: list[str], layer: int | None = None,
            component: str | None = None, spec_path: str | None = None) -> str:
        key = (kind, id(config))
        if key not in self._params:
            self._params[key] = kind_of(kind).parameters(config, self.dims)
        params = dict(self._params[key])
        self.graph.add_node(name, op=Op(name, kind, config, layer, component, spec_path, params))
        for source in inputs:
            self.graph.add_edge(source, name)
        self.order.append(name)
        return name

    def add_component(self, name: str, entry: Component, inputs: list[str], layer: int | None, component: str | None,
                      spec_path: str) -> str:
        return self.add(name, entry.kind, entry.config, inputs, layer, component, spec_path)


def lower(resolved: ResolvedSpec) -> IR:
    model = resolved.model
    dims = Dims(resolved.d_model, model.vocab_size, resolved.n_layers, model.max_seq_len, model.norm.eps, model.init_std,
                resolved.norm.config.zero_centered)
    b = _Builder(dims)
    norm = resolved.norm
    x = b.add("embed", "embedding", None, [])
    if resolved.meta_tokens is not None:
        x = b.add_component("meta", resolved.meta_tokens, [x], None, None, "meta_tokens")

    for layer in resolved.layers:
        i = layer.index
        if layer.mixers:
            h = b.add_component(f"layers.{i}.mixer_norm", norm, [x], i, None, "model.norm")
            if len(layer.mixers) == 1:
                name = layer.mixers[0]
                h = b.add_component(f"layers.{i}.mixer", resolved.mixers[name], [h], i, name, f"mixers.{name}")
            else:
                branches = [b.add_component(f"layers.{i}.mixer.{n}", resolved.mixers[n], [h], i, n, f"mixers.{n}")
                            for n in layer.mixers]
                combine = ParallelCombineConfig(layer.mixers, resolved.parallel_combine, norm.kind, norm.config)
                h = b.add(f"layers.{i}.mixer", "parallel_combine", combine, branches, i, spec_path="layout.parallel_combine")
            x = b.add(f"layers.{i}.mixer_residual", "add", None, [x, h], i)
        if layer.ffn is not None:
            h = b.add_component(f"layers.{i}.ffn_norm", norm, [x], i, None, "model.norm")
            h = b.add_component(f"layers.{i}.ffn", resolved.ffns[layer.ffn], [h], i, layer.ffn, f"ffns.{layer.ffn}")
            x = b.add(f"layers.{i}.ffn_residual", "add", None, [x, h], i)
        for extra in ("memory", "symbolic"):
            entry = getattr(resolved, extra)
            if entry is not None and entry.config.after_layer == i:
                h = b.add_component(extra, entry, [x], i, None, extra)
                x = b.add(f"{extra}_residual", "add", None, [x, h], i)

    if resolved.meta_tokens is not None:
        x = b.add("drop_meta", "drop_meta", resolved.meta_tokens.config, [x], spec_path="meta_tokens")
    x = b.add_component("norm_f", norm, [x], None, None, "model.norm")
    b.add("lm_head", "lm_head", LMHeadConfig(model.tie_embeddings), [x])
    for name, head in resolved.heads.items():
        if kind_of(head.kind).builds_op:
            b.add_component(f"heads.{name}", head, [x], None, name, f"heads.{name}")
    return IR(b.graph, dims, resolved, b.order)
