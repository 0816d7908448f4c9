"""What to emit, read off the IR: one class per component, one block class per distinct layer kind, the layer list.

The plan is plain data with every dimension already a number, so templates only print; they never compute sizes.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from archgen import __version__
from archgen.emit.names import Namespace, camel
from archgen.errors import CompileError, Diagnostic
from archgen.ir.graph import IR
from archgen.ir.kinds import mamba2
from archgen.passes.cost import CostReport
from archgen.resources import TEMPLATES
from archgen.spec import models

# Which runtime file each kind needs (templates/runtime/<file>.py is copied to generated/<name>/ops/<file>.py).
RUNTIME_FILES = {
    "attention": ["attention"],
    "sparse_attention": ["attention", "routing"],
    "mamba": ["ssm"],
    "mamba2": ["ssm", "ssd"],
    "conv": ["ssm"],
    "mlp": [],
    "moe": ["moe"],
}
# Heads and model-level extras: templates/components/{heads,extras}/<kind>.py.j2 holds the module class and an optional
# <kind>_model.py.j2 holds methods added to Model (generation with drafts, EMA updates, forecasting); each may need
# a runtime file of the same name. A declared kind without its template is a build error.
EXTRA_RUNTIME_FILES = {"medusa": ["medusa"], "jepa": ["jepa"], "forecaster": ["forecast"], "titans": ["memory"],
                       "symbolic": ["symbolic"]}
# Which Triton kernel each kind runs on CUDA tensors (kernels/<file>.py is copied to generated/<name>/kernels/<file>.py).
# The reference op of the same name in ops/ stays the fallback everywhere else.
KERNEL_FILES = {"mamba": ["selective_scan"]}
KERNEL_REFERENCES = {"selective_scan": "ssm"}  # kernel -> the runtime file (ops/) whose function of the same name it replaces
MIXER_KINDS = {"attention", "sparse_attention", "mamba", "mamba2", "conv"}


@dataclass
class ComponentPlan:
    name: str  # the spec's name for it
    class_name: str
    kind: str
    cfg: Any  # the resolved spec of the component
    dims: dict[str, Any]  # every literal the template prints
    produces_aux: bool = False
    has_cache: bool = False

    @property
    def template(self) -> str:
        # HSPMN's contextual stream is attention with a router in front: one template serves both.
        return "attention" if self.kind == "sparse_attention" else self.kind


@dataclass
class ParallelPlan:
    class_name: str
    branches: list[ComponentPlan]
    mode: str  # "normalized_mean" | "sum"

    @property
    def produces_aux(self) -> bool:
        return any(b.produces_aux for b in self.branches)

    @property
    def has_cache(self) -> bool:
        return any(b.has_cache for b in self.branches)


@dataclass
class BlockPlan:
    class_name: str
    mixer: ComponentPlan | ParallelPlan | None
    ffn: ComponentPlan | None
    layers: list[int] = field(default_factory=list)

    @property
    def has_cache(self) -> bool:
        return self.mixer is not None and self.mixer.has_cache

    @property
    def description(self) -> str:
        if isinstance(self.mixer, ParallelPlan):
            mixer = " ∥ ".join(f"{b.name} ({b.kind})" for b in self.mixer.branches)
        else:
            mixer = f"{self.mixer.name} ({self.mixer.kind})" if self.mixer else "no mixer"
        ffn = f"{self.ffn.name} ({self.ffn.kind})" if self.ffn else "no feed-forward"
        return f"{mixer}, then {ffn}"


@dataclass
class ExtraPlan:
    """A head (`heads.<name>`) or a model-level extra (`memory`, `symbolic`)."""

    name: str
    class_name: str
    kind: str
    cfg: Any
    dims: dict[str, Any]
    group: str  # "heads" | "extras"

    @property
    def template(self) -> str:
        return f"components/{self.group}/{self.kind}.py.j2"

    @property
    def model_template(self) -> str | None:
        path = f"components/{self.group}/{self.kind}_model.py.j2"
        return path if (TEMPLATES / path).exists() else None


@dataclass
class EmitPlan:
    name: str
    description: str
    version: str
    source: str
    preset: str | None
    command: str
    spec_hash: str
    d_model: int
    vocab_size: int
    tie_embeddings: bool
    norm_kind: str
    norm_eps: float
    norm_bias: bool
    max_seq_len: int
    init_std: float
    n_layers: int
    meta_tokens: int
    components: list[ComponentPlan]
    parallels: list[ParallelPlan]
    blocks: list[BlockPlan]
    layer_blocks: list[str]  # block class name of each layer, in order
    runtime_files: list[str]
    kernel_files: list[str]
    report: CostReport
    layout_text: str
    heads: list[ExtraPlan] = field(default_factory=list)
    memory: ExtraPlan | None = None
    symbolic: ExtraPlan | None = None


def make_plan(ir: IR, report: CostReport, spec_path: str) -> EmitPlan:
    resolved = ir.spec
    _reject_unemitted(ir)
    namespace = Namespace()
    d = resolved.d_model
    components: dict[str, ComponentPlan] = {}
    for name, cfg in list(resolved.mixers.items()) + list(resolved.ffns.items()):
        if cfg.kind == "moe" and cfg.shared_experts:
            # The always-on experts are one wider MLP (their outputs sum, so one MLP of shared·hidden computes the same).
            shared = models.MLPSpec(kind="mlp", activation=cfg.expert.activation, hidden=cfg.expert.hidden * cfg.shared_experts)
            components[f"{name}_shared"] = _component(f"{name}_shared", shared, d, namespace)
        components[name] = _component(name, cfg, d, namespace)
        if cfg.kind == "moe" and cfg.shared_experts:
            components[name].dims["shared_class"] = components[f"{name}_shared"].class_name

    parallels: dict[tuple[str, ...], ParallelPlan] = {}
    blocks: dict[tuple, BlockPlan] = {}
    layer_blocks = []
    for layer in resolved.layers:
        key = (layer.mixers, layer.ffn)
        if key not in blocks:
            if len(layer.mixers) > 1:
                if layer.mixers not in parallels:
                    branches = [components[n] for n in layer.mixers]
                    parallels[layer.mixers] = ParallelPlan(namespace.create("".join(camel(n) for n in layer.mixers) + "Parallel"),
                                                           branches, resolved.parallel_combine)
                mixer = parallels[layer.mixers]
            else:
                mixer = components[layer.mixers[0]] if layer.mixers else None
            ffn = components[layer.ffn] if layer.ffn else None
            parts = [camel(n) for n in layer.mixers] + ([camel(layer.ffn)] if layer.ffn else [])
            blocks[key] = BlockPlan(namespace.create("".join(parts or ["Identity"]) + "Block"), mixer, ffn)
        blocks[key].layers.append(layer.index)
        layer_blocks.append(blocks[key].class_name)

    dims = {"d_model": d, "vocab_size": resolved.model.vocab_size, "n_layers": resolved.n_layers,
            "max_seq_len": resolved.model.max_seq_len}
    heads = [ExtraPlan(name, namespace.create(camel(name) + "Head"), head.kind, head, dict(dims), "heads")
             for name, head in resolved.heads.items() if head.kind != "lm"]
    memory = (ExtraPlan("memory", namespace.create("TitansMemory"), "titans", resolved.memory, dict(dims), "extras")
              if resolved.memory else None)
    symbolic = (ExtraPlan("symbolic", namespace.create("SymbolicReasoner"), "symbolic", resolved.symbolic, dict(dims), "extras")
                if resolved.symbolic else None)
    extras = heads + [e for e in (memory, symbolic) if e is not None]
    used = sorted({f for c in components.values() for f in RUNTIME_FILES[c.kind]}
                  | {f for e in extras for f in EXTRA_RUNTIME_FILES[e.kind]})
    preset = f" --preset {resolved.preset}" if resolved.preset else ""
    overrides = "".join(f" --set {o}" for o in resolved.overrides)
    norm = resolved.model.norm
    layout_text = _layout_text(resolved)
    return EmitPlan(
        name=resolved.name, description=resolved.description.strip(), version=__version__, source=spec_path,
        preset=resolved.preset, command=f"archgen build {spec_path}{preset}{overrides}", spec_hash=resolved.spec_hash,
        d_model=d, vocab_size=resolved.model.vocab_size, tie_embeddings=resolved.model.tie_embeddings,
        norm_kind=norm.kind, norm_eps=norm.eps, norm_bias=getattr(norm, "bias", False),
        max_seq_len=resolved.model.max_seq_len, init_std=resolved.model.init_std, n_layers=resolved.n_layers,
        meta_tokens=resolved.meta_tokens.count if resolved.meta_tokens else 0, components=list(components.values()),
        parallels=list(parallels.values()), blocks=list(blocks.values()), layer_blocks=layer_blocks,
        runtime_files=used, report=report, layout_text=layout_text,
        kernel_files=sorted({f for c in components.values() for f in KERNEL_FILES.get(c.kind, [])}),
        heads=heads, memory=memory, symbolic=symbolic,
    )


def _reject_unemitted(ir: IR) -> None:
    """A declared kind the emitter has no template for is an error, never a silent stand-in."""
    problems = []
    resolved = ir.spec
    declared = [(f"heads.{name}", "heads", head.kind) for name, head in resolved.heads.items() if head.kind != "lm"]
    declared += [(field_name, "extras", kind) for field_name, kind in (("memory", "titans"), ("symbolic", "symbolic"))
                 if getattr(resolved, field_name) is not None]
    for path, group, kind in declared:
        if not (TEMPLATES / "components" / group / f"{kind}.py.j2").exists():
            problems.append(Diagnostic(path, f"'{kind}' is declared but archgen {__version__} cannot emit it yet",
                                       f"remove {path} to build now (its cost still shows in `archgen inspect`)"))
    if problems:
        raise CompileError(problems)


def _component(name: str, cfg: Any, d: int, namespace: Namespace) -> ComponentPlan:
    kind = cfg.kind
    plan = ComponentPlan(name, namespace.create(camel(name)), kind, cfg, {"d_model": d})
    dims = plan.dims
    if kind in ("attention", "sparse_attention"):
        rope = cfg.rope
        dims.update(n_heads=cfg.n_heads, n_kv_heads=cfg.n_kv_heads, head_dim=cfg.head_dim,
                    q_out=cfg.n_heads * cfg.head_dim, kv_out=cfg.n_kv_heads * cfg.head_dim, window=cfg.window,
                    rope=rope is not None, rotary_dim=rope.rotary_dim if rope else None,
                    rope_theta=rope.theta if rope else None, rope_scaling=rope.scaling if rope else None,
                    rope_factor=rope.factor if rope else None,
                    rope_original=rope.original_max_position if rope else None)
        plan.has_cache = True
        plan.produces_aux = kind == "sparse_attention"
    elif kind == "mamba":
        d_inner = cfg.expand * d
        dims.update(d_inner=d_inner, d_state=cfg.d_state, d_conv=cfg.d_conv, dt_rank=cfg.dt_rank,
                    xproj_out=cfg.dt_rank + 2 * cfg.d_state)
        plan.has_cache = True
    elif kind == "mamba2":
        d_inner, conv_channels, n_heads = mamba2.sizes(cfg, type("D", (), {"d_model": d})())
        dims.update(d_inner=d_inner, conv_channels=conv_channels, n_heads=n_heads, head_dim=cfg.head_dim,
                    n_groups=cfg.n_groups, d_state=cfg.d_state, d_conv=cfg.d_conv, chunk_size=cfg.chunk_size,
                    in_proj_out=d_inner + conv_channels + n_heads, bc_width=cfg.n_groups * cfg.d_state)
        plan.has_cache = True
    elif kind == "conv":
        dims.update(d_conv=cfg.d_conv)
        plan.has_cache = True
    elif kind == "mlp":
        dims.update(hidden=cfg.hidden, gated=cfg.activation in ("swiglu", "geglu"))
    elif kind == "moe":
        hidden = cfg.expert.hidden
        gated = cfg.expert.activation in ("swiglu", "geglu")
        dims.update(hidden=hidden, gated=gated, in_width=2 * hidden if gated else hidden, n_experts=cfg.n_experts,
                    top_k=cfg.top_k, shared_hidden=hidden * cfg.shared_experts)
        plan.produces_aux = True
    dims["kind"] = kind
    return plan


def _layout_text(resolved) -> str:
    from archgen.resolve.layout_types import Slot
    from archgen.resolve.pattern import describe_slots

    mixers = describe_slots([Slot(layer.mixers or ("none",)) for layer in resolved.layers])
    ffns = describe_slots([Slot((layer.ffn or "none",)) for layer in resolved.layers])
    return f"mixers {mixers}; feed-forwards {ffns}"
