"""Resolve: a validated Spec -> ResolvedSpec, where every derived size is a number and the layout is one entry per layer.

Nothing downstream re-derives a default: each component's kind (archgen.kinds) turns its spec into a typed config with
every size filled in (head_dim, n_kv_heads, dt_rank, Mamba-2 head counts, feed-forward hidden sizes, rotary dims, ...),
once. The resolved document (plain data) is what `spec.lock.yaml` records and what the spec hash is computed over.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any

from archgen import __version__
from archgen.errors import CompileError, Diagnostic
from archgen.kinds import kind_of
from archgen.resolve.layout_types import LayoutProblem, Slot
from archgen.resolve.megatron import expand_megatron
from archgen.resolve.pattern import expand_pattern
from archgen.resolve.ratio import expand_ratio
from archgen.spec import models
from archgen.spec.load import LoadedSpec
from archgen.spec.yaml_source import SourceMap


@dataclass(frozen=True)
class Component:
    """One resolved spec entry: its kind (a key of archgen.kinds.KINDS) and the typed config that kind resolved."""

    kind: str
    config: Any  # the kind's frozen config dataclass (e.g. archgen.kinds.attention.AttentionConfig)
    document: dict  # how spec.lock.yaml records it


def resolve_component(spec: Any, model: models.ModelDims, kind: str | None = None) -> Component:
    kind = kind or spec.kind
    handler = kind_of(kind)
    config = handler.resolve(spec, model)
    return Component(kind, config, handler.lock(spec, config))


@dataclass(frozen=True)
class ResolvedLayer:
    index: int
    mixers: tuple[str, ...]  # names of the mixers run in parallel in this layer (empty: no mixer)
    ffn: str | None  # name of the feed-forward, or None


@dataclass(frozen=True)
class ResolvedSpec:
    name: str
    description: str
    source_file: str
    preset: str | None
    overrides: tuple[str, ...]
    nominal_params: float | None
    model: models.ModelDims
    norm: Component  # the model's norm (every pre-norm, the final norm, parallel branches' norms)
    mixers: dict[str, Component]  # only the ones the layout uses
    ffns: dict[str, Component]
    layers: tuple[ResolvedLayer, ...]
    parallel_combine: str
    meta_tokens: Component | None
    memory: Component | None  # after_layer made non-negative
    symbolic: Component | None
    heads: dict[str, Component]
    document: dict  # the resolved spec as plain data (spec.lock.yaml)
    spec_hash: str  # sha256 of the canonical JSON of `document`

    @property
    def n_layers(self) -> int:
        return len(self.layers)

    @property
    def d_model(self) -> int:
        return self.model.d_model


def resolve(loaded: LoadedSpec) -> ResolvedSpec:
    spec, source_map = loaded.spec, loaded.source_map
    problems: list[Diagnostic] = []
    layout = spec.layout

    mixer_slots = _expand(layout.mixers, ("layout", "mixers"), set(spec.mixers) | {"none"}, layout.n_layers, True, source_map,
                          problems)
    n_layers = layout.n_layers or (len(mixer_slots) if mixer_slots else None)
    ffn_slots = _expand(layout.ffns, ("layout", "ffns"), set(spec.ffns) | {"none"}, n_layers, False, source_map, problems)
    if problems:
        raise CompileError(problems)

    layers = []
    for index, (mixer_slot, ffn_slot) in enumerate(zip(mixer_slots, ffn_slots, strict=True)):
        names = tuple(n for n in mixer_slot.names if n != "none")
        if len(mixer_slot.names) > 1 and len(names) != len(mixer_slot.names):
            problems.append(Diagnostic("layout.mixers", f"layer {index}: 'none' cannot be a parallel branch",
                                       "drop it from the parallel group", source_map.locate(("layout", "mixers"))))
        if len(names) > 1 and any(spec.mixers[n].kind == "none" for n in names):
            problems.append(Diagnostic("layout.mixers", f"layer {index}: a mixer of kind 'none' cannot be a parallel branch",
                                       "drop it from the parallel group", source_map.locate(("layout", "mixers"))))
        names = tuple(n for n in names if spec.mixers[n].kind != "none")  # kind none is an empty slot
        ffn = ffn_slot.names[0]
        ffn = None if ffn == "none" or spec.ffns[ffn].kind == "none" else ffn
        layers.append(ResolvedLayer(index, names, ffn))

    memory = spec.memory
    if memory is not None:
        after = _layer_index(memory.after_layer, len(layers), "memory.after_layer", source_map, problems)
        memory = memory.model_copy(update={"after_layer": after})
    symbolic = spec.symbolic
    if symbolic is not None:
        after = _layer_index(symbolic.after_layer, len(layers), "symbolic.after_layer", source_map, problems)
        symbolic = symbolic.model_copy(update={"after_layer": after})
    if problems:
        raise CompileError(problems)

    model = spec.model
    used_mixers = sorted({n for layer in layers for n in layer.mixers})
    used_ffns = sorted({layer.ffn for layer in layers if layer.ffn})
    mixers = {n: resolve_component(spec.mixers[n], model) for n in used_mixers}
    ffns = {n: resolve_component(spec.ffns[n], model) for n in used_ffns}
    heads = {n: resolve_component(h, model) for n, h in spec.heads.items()}
    meta_tokens = resolve_component(spec.meta_tokens, model, "meta_tokens") if spec.meta_tokens else None
    memory = resolve_component(memory, model) if memory else None
    symbolic = resolve_component(symbolic, model, "symbolic") if symbolic else None

    document = {
        "schema_version": models.SCHEMA_VERSION,
        "name": spec.name,
        "model": model.model_dump(mode="json", exclude=_model_defaults(model)),
        "mixers": {n: m.document for n, m in mixers.items()},
        "ffns": {n: f.document for n, f in ffns.items()},
        "layers": [{"mixers": list(layer.mixers), "ffn": layer.ffn} for layer in layers],
        "parallel_combine": layout.parallel_combine,
        "meta_tokens": meta_tokens.document if meta_tokens else None,
        "memory": memory.document if memory else None,
        "symbolic": symbolic.document if symbolic else None,
        "heads": {n: h.document for n, h in heads.items()},
    }
    canonical = json.dumps(document, sort_keys=True, separators=(",", ":"))
    spec_hash = hashlib.sha256(canonical.encode()).hexdigest()
    return ResolvedSpec(
        name=spec.name, description=spec.description, source_file=source_map.file, preset=loaded.preset,
        overrides=loaded.overrides, nominal_params=spec.nominal_params, model=model,
        norm=resolve_component(model.norm, model), mixers=mixers, ffns=ffns,
        layers=tuple(layers), parallel_combine=layout.parallel_combine, meta_tokens=meta_tokens, memory=memory,
        symbolic=symbolic, heads=heads, document=document, spec_hash=spec_hash,
    )


def _model_defaults(model: models.ModelDims) -> dict:
    """The model settings left out of the lock at their defaults (no multiplier, a plain RMSNorm), so specs written
    before they existed keep their hash."""
    unset: dict = {key: True for key in models.MODEL_MULTIPLIERS if getattr(model, key) == 1.0}
    if not getattr(model.norm, "zero_centered", True):
        unset["norm"] = {"zero_centered"}
    return unset


def lock_document(resolved: ResolvedSpec) -> dict:
    """What `spec.lock.yaml` holds: provenance, the hash and the resolved spec."""
    return {
        "generated_by": f"archgen {__version__}",
        "source": resolved.source_file,
        "preset": resolved.preset,
        "overrides": list(resolved.overrides),
        "spec_hash": resolved.spec_hash,
        "resolved": resolved.document,
    }


# ------------------------------------------------------------------------------------------------------ layout
def _expand(form: Any, path: tuple, names: set[str], n_layers: int | None, allow_parallel: bool,
            source_map: SourceMap, problems: list[Diagnostic]) -> list[Slot]:
    field = ".".join(path)
    what = "mixers" if allow_parallel else "ffns"
    if isinstance(form, models.RatioLayout):
        if n_layers is None:
            problems.append(Diagnostic(field, "a ratio layout needs the number of layers", "set layout.n_layers",
                                       source_map.locate(path)))
            return []
        slots, found = expand_ratio(form.ratio, form.offset, n_layers, names)
        problems += [_layout_diagnostic(p, path, None, source_map) for p in found]
        return slots
    if isinstance(form, models.MegatronLayout):
        slots, found = expand_megatron(form.megatron, form.symbols, what, names, n_layers)
        problems += [_layout_diagnostic(p, path + (("megatron",) if p.field is None else ()), None, source_map) for p in found]
        return slots
    if isinstance(form, list):
        if not form:
            problems.append(Diagnostic(field, f"the {what} list is empty",
                                       "list one item per layer, e.g. [ssm, ssm, attn], or write a pattern",
                                       source_map.locate(path)))
            return []
        slots: list[Slot] = []
        for i, item in enumerate(form):
            item_slots, found = expand_pattern(item, names, None, allow_parallel=allow_parallel)
            problems += [_layout_diagnostic(p, path + (i,), i, source_map) for p in found]
            if not found and len(item_slots) != 1:
                problems.append(Diagnostic(f"{field}[{i}]",
                                           f"each list item is one layer, but {item!r} expands to {len(item_slots)}",
                                           "write one name (or one parallel group a|b) per item", source_map.locate(path + (i,))))
            slots += item_slots
        if n_layers is not None and slots and len(slots) != n_layers and not problems:
            if n_layers % len(slots):
                problems.append(Diagnostic(field, f"the list has {len(slots)} layers but n_layers={n_layers}",
                                           f"list exactly {n_layers} {what}, or set n_layers: {len(slots)}",
                                           source_map.locate(path)))
                return []
            slots = slots * (n_layers // len(slots))
        return slots
    slots, found = expand_pattern(form, names, n_layers, allow_parallel=allow_parallel)
    problems += [_layout_diagnostic(p, path, None, source_map) for p in found]
    return slots


def _layout_diagnostic(problem: LayoutProblem, path: tuple, index: int | None, source_map: SourceMap) -> Diagnostic:
    if problem.field == "n_layers":
        return Diagnostic("layout.n_layers", problem.message, problem.fix, source_map.locate(("layout", "n_layers")))
    if problem.field is not None:
        where = path + tuple(problem.field.split("."))
        return Diagnostic(".".join(map(str, where)), problem.message, problem.fix, source_map.locate(where))
    field = ".".join(str(p) for p in path[:2]) + (f"[{index}]" if index is not None else "")
    return Diagnostic(field, problem.message, problem.fix, source_map.locate_in_text(path, problem.column))


def _layer_index(value: int, n_layers: int, field: str, source_map: SourceMap, problems: list[Diagnostic]) -> int:
    index = value + n_layers if value < 0 else value
    if not 0 <= index < n_layers:
        problems.append(Diagnostic(field, f"{field.split('.')[-1]}={value} is outside the {n_layers} layers",
                                   f"use 0..{n_layers - 1}, or -1 for the last layer",
                                   source_map.locate(tuple(field.split(".")))))
        return 0
    return index
