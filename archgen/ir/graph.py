"""Lower a ResolvedSpec to the IR: a networkx DiGraph whose nodes are typed ops and whose edges carry activations.

Node ids are the dotted module paths the generated model uses ("layers.3.mixer"), so a parameter's full name is
node id + "." + its name in the op's parameter table. Shapes are filled in by `archgen.passes.shapes`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import networkx as nx

from archgen.ir.kinds import KINDS, Dims
from archgen.ir.kinds.parallel_combine import ParallelCombine
from archgen.resolve.resolve import ResolvedSpec

Shape = tuple[int | str, ...]


@dataclass
class Op:
    name: str  # node id and module path
    kind: str  # a key of archgen.ir.kinds.KINDS
    cfg: Any  # the resolved component spec (or a small config of the op's own)
    layer: int | None = None  # the layer the op belongs to
    component: str | None = None  # the spec name of the component ("attn", "ssm", ...)
    params: dict[str, tuple[int, ...]] = field(default_factory=dict)
    in_shapes: list[Shape] = field(default_factory=list)
    out_shape: Shape | None = None


@dataclass
class IR:
    graph: nx.DiGraph
    dims: Dims
    spec: ResolvedSpec  # carried as plain data for later stages (names, hash, layout); not re-derived
    order: list[str] = field(default_factory=list)  # ops in execution order

    def ops(self) -> list[Op]:
        return [self.graph.nodes[name]["op"] for name in self.order]

    def op(self, name: str) -> Op:
        return self.graph.nodes[name]["op"]


class _Builder:
    def __init__(self, dims: Dims):
        self.graph = nx.DiGraph()
        self.order: list[str] = []
        self.dims = dims

    def add(self, name: str, kind: str, cfg: Any, inputs: list[str], layer: int | None = None,
            component: str | None = None) -> str:
        params = KINDS[kind].parameters(cfg, self.dims)
        self.graph.add_node(name, op=Op(name, kind, cfg, layer, component, params))
        for source in inputs:
            self.graph.add_edge(source, name)
        self.order.append(name)
        return name


def lower(resolved: ResolvedSpec) -> IR:
    dims = Dims(resolved.d_model, resolved.model.vocab_size, resolved.n_layers)
    b = _Builder(dims)
    norm = resolved.model.norm
    x = b.add("embed", "embedding", "embedding", [])
    if resolved.meta_tokens is not None:
        x = b.add("meta", "meta_tokens", _Tagged("meta_tokens", resolved.meta_tokens), [x])

    for layer in resolved.layers:
        i = layer.index
        if layer.mixers:
            h = b.add(f"layers.{i}.mixer_norm", norm.kind, norm, [x], i)
            if len(layer.mixers) == 1:
                name = layer.mixers[0]
                cfg = resolved.mixers[name]
                h = b.add(f"layers.{i}.mixer", cfg.kind, cfg, [h], i, name)
            else:
                branches = [b.add(f"layers.{i}.mixer.{n}", resolved.mixers[n].kind, resolved.mixers[n], [h], i, n)
                            for n in layer.mixers]
                combine = ParallelCombine("parallel_combine", layer.mixers, resolved.parallel_combine, norm)
                h = b.add(f"layers.{i}.mixer", "parallel_combine", combine, branches, i)
            x = b.add(f"layers.{i}.mixer_residual", "add", None, [x, h], i)
        if layer.ffn is not None:
            cfg = resolved.ffns[layer.ffn]
            h = b.add(f"layers.{i}.ffn_norm", norm.kind, norm, [x], i)
            h = b.add(f"layers.{i}.ffn", cfg.kind, cfg, [h], i, layer.ffn)
            x = b.add(f"layers.{i}.ffn_residual", "add", None, [x, h], i)
        if resolved.memory is not None and resolved.memory.after_layer == i:
            h = b.add("memory", "titans", resolved.memory, [x], i)
            x = b.add("memory_residual", "add", None, [x, h], i)
        if resolved.symbolic is not None and resolved.symbolic.after_layer == i:
            h = b.add("symbolic", "symbolic", _Tagged("symbolic", resolved.symbolic), [x], i)
            x = b.add("symbolic_residual", "add", None, [x, h], i)

    x = b.add("norm_f", norm.kind, norm, [x])
    b.add("lm_head", "lm_head", "tied" if resolved.model.tie_embeddings else "untied", [x])
    for name, head in resolved.heads.items():
        if head.kind != "lm":
            b.add(f"heads.{name}", head.kind, head, [x], component=name)
    return IR(b.graph, dims, resolved, b.order)


class _Tagged:
    """Gives a spec without a `kind` field (meta tokens, symbolic) the kind its formulas dispatch on."""

    def __init__(self, kind: str, spec: Any):
        self.kind = kind
        self.spec = spec

    def __getattr__(self, item: str) -> Any:
        return getattr(self.spec, item)
