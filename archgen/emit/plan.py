"""What to emit, read off the IR: one class per component, one block class per distinct layer kind, the layer list.

The plan is built from the IR's ops only (their kinds, configs, shapes and chosen kernels); the resolved spec is read
for provenance (name, hash, preset). It is plain data with every dimension already a number, so templates only
print; they never compute sizes. Each kind says what its template prints (`template_dims`) and which runtime files
it needs (archgen/kinds/<kind>.py).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from archgen import __version__
from archgen.emit.names import TEMPLATE_NAMES, Namespace, camel
from archgen.errors import CompileError, Diagnostic
from archgen.ir.graph import IR, KernelChoice, Op
from archgen.kinds import Dims, kind_of
from archgen.passes.cost import CostReport, count
from archgen.resources import TEMPLATES


@dataclass
class ComponentPlan:
    name: str  # the spec's name for it
    class_name: str
    kind: str
    cfg: Any  # the kind's resolved config
    dims: dict[str, Any]  # every literal the template prints
    template: str  # templates/components/<template>.py.j2
    produces_aux: bool = False
    has_cache: bool = False
    takes_pads: bool = False  # its forward takes pads= (a ragged batch's left padding)
    takes_step: bool = False  # its forward takes step= (the forward's StepContext, shared by every layer)
    takes_residual: bool = False  # a feed-forward whose forward adds the block's stream itself (residual=)
    takes_residual_norm: bool = False  # a mixer that adds the block's stream and runs its ffn_norm (residual=, norm=)
    output_projection: str | None = None  # its last linear layer, where nothing follows it (Kind.output_projection)
    defers_projection: bool = False  # its forward takes project= (a parallel layer's combine runs that projection)
    takes_input_norm: bool = False  # its forward takes input_norm= (a parallel layer's decoding step: Kind.folds_input_norm)
    kernels: dict[str, KernelChoice] = field(default_factory=dict)  # {function: the Triton kernel the pass chose}

    @property
    def linear(self) -> str:
        """The class of its linear layers: DecodeLinear, which runs a decoding step's few rows on the GEMV kernel, where
        the kernel pass chose it for this kind; else nn.Linear."""
        return "DecodeLinear" if "linear" in self.kernels else "nn.Linear"


@dataclass
class ParallelPlan:
    class_name: str
    branches: list[ComponentPlan]
    mode: str  # "normalized_mean" | "sum"
    kernels: dict[str, KernelChoice] = field(default_factory=dict)  # the combine's (normalized_mean in one launch)
    takes_residual_norm: bool = False  # its forward adds the block's stream and runs its ffn_norm (residual=, norm=)
    combines_projections: bool = False  # a decoding step runs the branches' output projections with the combine
    recording_order: list[int] = field(default_factory=list)  # branch indices, the decoding step's order: heaviest first
    folds_input_norm: bool = False  # the block hands it x un-normed and its norm; a decoding step's branches fold it

    @property
    def n_branches(self) -> int:
        return len(self.branches)

    @property
    def recorded_branches(self) -> list[tuple[int, ComponentPlan]]:
        """(index, branch) in the order a decoding step records them (see `heaviest_first`)."""
        return [(i, self.branches[i]) for i in self.recording_order or range(len(self.branches))]

    @property
    def produces_aux(self) -> bool:
        return any(b.produces_aux for b in self.branches)

    @property
    def has_cache(self) -> bool:
        return any(b.has_cache for b in self.branches)

    @property
    def takes_pads(self) -> bool:
        return any(b.takes_pads for b in self.branches)

    @property
    def takes_step(self) -> bool:
        return any(b.takes_step for b in self.branches)


def heaviest_first(branches: list[Op]) -> list[int]:
    """The order a decoding step records a parallel layer's branches in: most weights first, ties in layout order.
    A replay dispatches the branches' first kernels in the order they were recorded, and the layer waits for its
    longest branch: Hymba+'s Mamba branch (16.2 M weights, four kernels) ran ~4 µs behind its attention (6.1 M, three)
    and started ~0.7 µs after it when recorded second (docs/design.md, session 21)."""
    weights = [sum(count(shape) for shape in op.params.values()) for op in branches]
    return sorted(range(len(branches)), key=lambda i: -weights[i])


@dataclass
class BlockPlan:
    class_name: str
    mixer: ComponentPlan | ParallelPlan | None
    ffn: ComponentPlan | None
    shape: str | None  # the residual stream's shape from shape inference, e.g. "(B, T+4, 64)"; None: an empty layer
    layers: list[int] = field(default_factory=list)

    @property
    def has_cache(self) -> bool:
        return self.mixer is not None and self.mixer.has_cache

    @property
    def kinds(self) -> tuple[str, ...]:
        """The kinds of the components in this block (parallel branches included), for gradient checkpointing by kind."""
        mixers = self.mixer.branches if isinstance(self.mixer, ParallelPlan) else [self.mixer] if self.mixer else []
        return tuple(dict.fromkeys(c.kind for c in [*mixers, *([self.ffn] if self.ffn else [])]))

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
    kind_template: str  # "<group>/<kind>"
    out_shape: str  # from shape inference

    @property
    def template(self) -> str:
        return f"components/{self.kind_template}.py.j2"

    @property
    def model_template(self) -> str | None:
        path = f"components/{self.kind_template}_model.py.j2"
        return path if (TEMPLATES / path).exists() else None


@dataclass
class EmitPlan:
    name: str
    description: str
    version: str
    source: str
    preset: str | None
    command: str  # the archgen build command that regenerates the package, -o included when it was given
    package_dir: str  # where the package was written, as the build was told (generated/<name>)
    spec_hash: str
    d_model: int
    vocab_size: int
    aligned_vocab: int  # vocab_size rounded up to VOCAB_ALIGNMENT: the rows the training-time output product runs on
    shapes: dict[str, str]  # from shape inference: "embed", "backbone" (with meta tokens), "final" (after the norm), "logits"
    tie_embeddings: bool
    norm_module: str  # the model norm's constructor over d_model, e.g. "RMSNorm(512, eps=1e-05)", "FusedRMSNorm(...)"
    norm_kernel: KernelChoice | None  # the norms' kernel: FusedRMSNorm runs it, blocks fuse the residual add into it
    norm_zero_centered: bool  # the model's RMSNorms scale by 1 + weight: ZeroCenteredRMSNorm
    norm_folds_scale: bool  # the model's norm takes forward(x, scale=...): norm(x) × scale with the scale in its weight
    gemv_kernel: KernelChoice | None  # the GEMV of a decoding step's linear layers, which DecodeLinear runs
    lm_head_linear: str  # the lm_head's class: "DecodeLinear" where the kernel pass gave it the GEMV, else "nn.Linear"
    greedy_pick_kernel: KernelChoice | None  # a captured decoding step's greedy pick in one kernel (pick_greedy)
    max_seq_len: int
    init_std: float
    n_layers: int
    meta_tokens: int
    components: list[ComponentPlan]
    parallels: list[ParallelPlan]
    blocks: list[BlockPlan]
    layer_blocks: list[str]  # block class name of each layer, in order
    runtime_files: list[str]  # the import table's files and the kernels' references (kernels/__init__.py lowers to them)
    import_lines: list[str]  # `from .ops.<file> import <names>`, one per runtime file, from the ops' import tables
    preludes: list[str]  # components/<template>_prelude.py.j2 of the component templates used: written once each
    kernel_files: list[str]
    report: CostReport
    layout_text: str
    heads: list[ExtraPlan] = field(default_factory=list)
    memory: ExtraPlan | None = None
    symbolic: ExtraPlan | None = None
    # the model-level scalars (ModelDims): 1.0 writes nothing
    embedding_multiplier: float = 1.0
    residual_multiplier: float = 1.0
    logit_divisor: float = 1.0
    step_hooks: list[str] = field(default_factory=list)  # Model methods to call after every optimizer step (JEPA's update_target)
    init_hooks: list[str] = field(default_factory=list)  # Model methods init_weights calls last (JEPA's reset_target)
    takes_step: bool = False  # some component reads the forward's StepContext: the model makes one, every block passes it


DEFAULT_OUTPUT = "generated"  # archgen build's -o default
# Output-layer rows are padded to a multiple of this in training (LMHead in the model template). cuBLAS's Hopper GEMMs
# need 16-byte-aligned rows; 64 as nanoGPT's 50257 -> 50304 also keeps the tiles whole.
VOCAB_ALIGNMENT = 64

ROLE_ORDER = {"mixer": 0, "ffn": 1}  # component classes: mixers, then feed-forwards, each by name


@dataclass(frozen=True)
class _Layer:
    """One layer as the IR holds it: its mixer op(s) (parallel branches, in order) and its feed-forward op."""

    index: int
    mixers: tuple[Op, ...]
    ffn: Op | None
    combine: Op | None  # the parallel_combine op of a parallel layer


def _layers(ir: IR) -> list[_Layer]:
    by_layer: dict[int, dict[str, Any]] = {i: {"mixers": [], "ffn": None, "combine": None} for i in range(ir.dims.n_layers)}
    for op in ir.ops():
        role = kind_of(op.kind).role
        if op.layer is None or role not in ("mixer", "ffn", "combine"):
            continue
        entry = by_layer[op.layer]
        if role == "mixer":
            entry["mixers"].append(op)
        elif role == "ffn":
            entry["ffn"] = op
        else:
            entry["combine"] = op
    return [_Layer(i, tuple(e["mixers"]), e["ffn"], e["combine"]) for i, e in by_layer.items()]


def make_plan(ir: IR, report: CostReport, spec_path: str, output_root: str = DEFAULT_OUTPUT) -> EmitPlan:
    resolved = ir.spec  # provenance only: name, description, hash, preset, overrides
    _reject_unemitted(ir)
    configs = [(op.kind, op.config) for op in ir.ops()]
    configs += [(sub_kind, sub_config) for op in ir.ops()
                for _, sub_kind, sub_config in kind_of(op.kind).subcomponents(op.config)]
    imports = _import_table(configs)
    greedy_pick = ir.op("lm_head").kernels.get("greedy_pick_")
    if greedy_pick is not None:  # pick_greedy's fallback (model.py.j2)
        imports["decoding"].add(greedy_pick.function)
    namespace = Namespace(TEMPLATE_NAMES | {name for names in imports.values() for name in names})
    dims = ir.dims
    d = dims.d_model
    layers = _layers(ir)

    component_ops: dict[str, Op] = {}
    for layer in layers:
        for op in layer.mixers + ((layer.ffn,) if layer.ffn else ()):
            component_ops.setdefault(op.component, op)
    components: dict[str, ComponentPlan] = {}
    for name, op in sorted(component_ops.items(), key=lambda item: (ROLE_ORDER[kind_of(item[1].kind).role], item[0])):
        kind = kind_of(op.kind)
        parts = {suffix: _component(f"{name}_{suffix}", sub_kind, sub_config, dims, namespace, None)
                 for suffix, sub_kind, sub_config in kind.subcomponents(op.config)}
        for part in parts.values():
            components[part.name] = part
        components[name] = _component(name, op.kind, op.config, dims, namespace, op.kernels)
        for suffix, part in parts.items():
            components[name].dims[f"{suffix}_class"] = part.class_name

    parallels: dict[tuple[str, ...], ParallelPlan] = {}
    blocks: dict[tuple, BlockPlan] = {}
    layer_blocks = []
    for layer in layers:
        mixer_names = tuple(op.component for op in layer.mixers)
        ffn_name = layer.ffn.component if layer.ffn else None
        key = (mixer_names, ffn_name)
        if key not in blocks:
            if layer.combine is not None:
                if mixer_names not in parallels:
                    branches = [components[n] for n in mixer_names]
                    combine = layer.combine
                    # an auxiliary loss would ride on the returned (h, x): the fused residual and norm are for plain outputs
                    fuses_norm = (kind_of(combine.kind).takes_residual_norm(combine.config, combine.kernels)
                                  and not any(b.produces_aux for b in branches))
                    # the projections' epilogue writes (h, x): only where the mixer returns them
                    projects = fuses_norm and "combining_linear_" in combine.kernels
                    for branch in branches if projects else ():
                        branch.defers_projection = True
                    # the block's norm inside each branch's first GEMV: only where every branch folds it
                    folds_norm = projects and all(kind_of(op.kind).folds_input_norm(op.config, op.kernels)
                                                  for op in layer.mixers)
                    for branch in branches if folds_norm else ():
                        branch.takes_input_norm = True
                    parallels[mixer_names] = ParallelPlan(namespace.create("".join(camel(n) for n in mixer_names) + "Parallel"),
                                                          branches, combine.config.mode, dict(combine.kernels), fuses_norm,
                                                          projects, heaviest_first(layer.mixers), folds_norm)
                mixer = parallels[mixer_names]
            else:
                mixer = components[mixer_names[0]] if mixer_names else None
            ffn = components[ffn_name] if ffn_name else None
            parts = [camel(n) for n in mixer_names] + ([camel(ffn_name)] if ffn_name else [])
            last = layer.ffn or layer.combine or (layer.mixers[0] if layer.mixers else None)
            shape = shape_text(last.out_shape) if last is not None else None
            blocks[key] = BlockPlan(namespace.create("".join(parts or ["Identity"]) + "Block"), mixer, ffn, shape)
        blocks[key].layers.append(layer.index)
        layer_blocks.append(blocks[key].class_name)

    extra_dims = {"d_model": d, "vocab_size": dims.vocab_size, "n_layers": dims.n_layers, "max_seq_len": dims.max_seq_len}
    heads, extras = [], {}
    for op in ir.ops():
        kind = kind_of(op.kind)
        if kind.role == "head":
            heads.append(ExtraPlan(op.component, namespace.create(camel(op.component) + "Head"), op.kind, op.config,
                                   extra_dims | kind.template_dims(op.config, dims), "heads", kind.template,
                                   shape_text(op.out_shape)))
    for op in ir.ops():
        kind = kind_of(op.kind)
        if kind.role == "extra":
            extras[op.name] = ExtraPlan(op.name, namespace.create(kind.class_name or camel(op.name)), op.kind,
                                        op.config, extra_dims | kind.template_dims(op.config, dims), "extras", kind.template,
                                        shape_text(op.out_shape))
    preset = f" --preset {resolved.preset}" if resolved.preset else ""
    overrides = "".join(f" --set {o}" for o in resolved.overrides)
    output = "" if output_root == DEFAULT_OUTPUT else f" -o {output_root}"
    norm_op = ir.op("norm_f")
    norm_dims = kind_of(norm_op.kind).template_dims(norm_op.config, dims)  # "kernel_module": its constructor with a kernel
    meta = [op for op in ir.ops() if op.kind == "meta_tokens"]
    shapes = {"embed": ir.op("embed").out_shape, "backbone": (meta[0] if meta else ir.op("embed")).out_shape,
              "final": norm_op.out_shape, "logits": ir.op("lm_head").out_shape}
    return EmitPlan(
        name=resolved.name, description=resolved.description.strip(), version=__version__, source=spec_path,
        preset=resolved.preset, command=f"archgen build {spec_path}{preset}{overrides}{output}", spec_hash=resolved.spec_hash,
        package_dir=f"{output_root}/{resolved.name}",
        d_model=d, vocab_size=dims.vocab_size, aligned_vocab=-(-dims.vocab_size // VOCAB_ALIGNMENT) * VOCAB_ALIGNMENT,
        shapes={key: shape_text(shape) for key, shape in shapes.items()},
        tie_embeddings=ir.op("lm_head").config.tied,
        norm_module=norm_dims["kernel_module" if norm_op.kernels else "module"], norm_kernel=norm_op.kernels.get("rms_norm"),
        norm_zero_centered=norm_dims["zero_centered"], norm_folds_scale=norm_dims["folds_scale"],
        gemv_kernel=next((op.kernels["linear"] for op in ir.ops() if "linear" in op.kernels), None),
        lm_head_linear="DecodeLinear" if "linear" in ir.op("lm_head").kernels else "nn.Linear", greedy_pick_kernel=greedy_pick,
        max_seq_len=dims.max_seq_len, init_std=dims.init_std, n_layers=dims.n_layers,
        meta_tokens=meta[0].config.count if meta else 0, components=list(components.values()),
        parallels=list(parallels.values()), blocks=list(blocks.values()), layer_blocks=layer_blocks,
        # a kernel's reference lowers it
        runtime_files=sorted({*imports, *PACKAGE_RUNTIME, *(k.reference for k in kernel_functions(ir) if k.reference)}),
        import_lines=[f"from .ops.{file} import {', '.join(sorted(names))}" for file, names in sorted(imports.items())],
        preludes=_preludes(components.values()), report=report, layout_text=_layout_text(layers),
        kernel_files=sorted({kernel.file for op in ir.ops() for kernel in op.kernels.values()}),
        heads=heads, memory=extras.get("memory"), symbolic=extras.get("symbolic"),
        embedding_multiplier=resolved.model.embedding_multiplier, residual_multiplier=resolved.model.residual_multiplier,
        logit_divisor=resolved.model.logit_divisor,
        step_hooks=sorted({hook for h in heads if (hook := kind_of(h.kind).after_optimizer_step)}),
        init_hooks=sorted({hook for h in heads if (hook := kind_of(h.kind).after_init_weights)}),
        takes_step=any(c.takes_step for c in components.values()),
    )


def shape_text(shape: tuple) -> str:
    """("B", "T+4", 64) -> "(B, T+4, 64)", as the generated code's comments write shapes."""
    return "(" + ", ".join(str(size) for size in shape) + ")"


def _preludes(components) -> list[str]:
    """Definitions a component template shares between its classes (a cache dataclass), written once per model."""
    paths = [f"components/{t}_prelude.py.j2" for t in sorted({c.template for c in components})]
    return [path for path in paths if (TEMPLATES / path).exists()]


# What Model itself uses from the runtime ops, whatever its kinds: generate's CUDA-graph decoding and token choice.
MODEL_IMPORTS = {"decoding": ("CUDAGraphDecoder", "EndOfSequence", "as_streamer", "new_token_count", "penalize_repeats",
                              "sample")}


# Runtime files every package holds whatever its kinds: training (its __init__ exports CUDAGraphTrainStep).
PACKAGE_RUNTIME = ("training",)


def _import_table(configs: list[tuple[str, Any]]) -> dict[str, set[str]]:
    """{runtime file: every name some op's template uses from it}: the one table the import lines are written from."""
    table: dict[str, set[str]] = {file: set(names) for file, names in MODEL_IMPORTS.items()}
    for kind, config in configs:
        for file, names in kind_of(kind).imports(config).items():
            table.setdefault(file, set()).update(names)
        if kind_of(kind).takes_step:  # the model makes the forward's StepContext
            table.setdefault("attention", set()).add("StepContext")
    return table


def kernel_functions(ir: IR) -> list[KernelChoice]:
    """Every kernel function some op runs, once each, by file then function (rule descriptions dropped: they vary
    by kind while the function and its reference do not)."""
    chosen = {(k.file, k.function): k.reference for op in ir.ops() for k in op.kernels.values()}
    return [KernelChoice(file, function, reference, "") for (file, function), reference in sorted(chosen.items())]


def _reject_unemitted(ir: IR) -> None:
    """A declared kind the emitter has no template for is an error, never a silent stand-in."""
    problems = []
    for op in ir.ops():
        kind = kind_of(op.kind)
        if kind.role in ("head", "extra") and not (TEMPLATES / "components" / f"{kind.template}.py.j2").exists():
            problems.append(Diagnostic(op.spec_path, f"'{op.kind}' is declared but archgen {__version__} cannot emit it yet",
                                       f"remove {op.spec_path} to build now (its cost still shows in `archgen inspect`)"))
    if problems:
        raise CompileError(problems)


def _component(name: str, kind_name: str, config: Any, dims: Dims, namespace: Namespace,
               kernels: dict[str, KernelChoice] | None) -> ComponentPlan:
    kind = kind_of(kind_name)
    template_dims = kind.template_dims(config, dims)
    template_dims["kind"] = kind_name
    return ComponentPlan(name, namespace.create(camel(name)), kind_name, config, template_dims, kind.template,
                         produces_aux=kind.produces_aux, has_cache=kind.has_cache, takes_pads=kind.takes_pads,
                         takes_step=kind.takes_step, takes_residual=kind.takes_residual(config, kernels or {}),
                         takes_residual_norm=kind.takes_residual_norm(config, kernels or {}),
                         output_projection=kind.output_projection(config), kernels=dict(kernels or {}))


def _layout_text(layers: list[_Layer]) -> str:
    from archgen.resolve.layout_types import Slot
    from archgen.resolve.pattern import describe_slots

    mixers = describe_slots([Slot(tuple(op.component for op in layer.mixers) or ("none",)) for layer in layers])
    ffns = describe_slots([Slot((layer.ffn.component if layer.ffn else "none",)) for layer in layers])
    return f"mixers {mixers}; feed-forwards {ffns}"
