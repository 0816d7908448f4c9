"""The protocol every layer kind implements, and the model-wide sizes its formulas read.

A kind is one class in one module of `archgen.kinds` (an instance named `KIND`, or a tuple `KINDS` when one module
holds two closely related kinds). Each stage of the compiler asks the registry (`archgen.kinds.KINDS`) for the kind
of a spec entry or an op and calls the method it needs; no stage branches on kind names:

    spec/checks.py      check(spec, path, model)            cross-field rules, as located Diagnostics
    resolve/resolve.py  resolve(spec, model) -> config      every derived size filled: a frozen dataclass, no Nones
                        lock(spec, config) -> dict          what spec.lock.yaml records (and the hash covers)
    ir/graph.py         parameters(config, dims)            names exactly as the generated module registers them
    passes/shapes.py    output_shape(config, dims, inputs)
    passes/cost.py      forward_flops, cache_bytes, activation_elements, inactive_params
    passes/kernels.py   (a rule names the kind: see archgen.passes.kernels.KERNEL_RULES)
    emit/plan.py        template, template_dims(config, dims), imports(config) (runtime files and the names used from
                        them), flags (has_cache, produces_aux, takes_pads, takes_step), subcomponents(config)
    report/diagram.py   colour

FLOPs count a multiply-add as 2 and include the SSM recurrences; element-wise work (norms, activations, RoPE,
softmax) is not counted, as in the usual 2·N·D accounting.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Generic, Literal, TypeVar

from archgen.errors import Diagnostic

Shape = tuple[int | str, ...]
Role = Literal["mixer", "ffn", "norm", "combine", "head", "extra", "model", "empty"]

SpecT = TypeVar("SpecT")
ConfigT = TypeVar("ConfigT")


@dataclass(frozen=True)
class Dims:
    """Model-wide sizes an op's formulas and templates need."""

    d_model: int
    vocab_size: int
    n_layers: int = 0
    max_seq_len: int = 2048
    norm_eps: float = 1e-5
    init_std: float = 0.02  # the spread Linear and embedding weights start with
    norm_zero_centered: bool = False  # the model's RMSNorm scales by 1 + weight (attention's qk-norm follows it)


def divisors(n: int) -> list[int]:
    """For fixes that name acceptable values: the divisors of n, ascending."""
    small = [d for d in range(1, int(n**0.5) + 1) if n % d == 0]
    return sorted(set(small + [n // d for d in small]))


def multipliers_text(input_multiplier: float, output_multiplier: float, *inner: tuple[str, tuple[float, ...]]) -> list[str]:
    """The docstring's list of a component's multipliers that are not 1: 'input × 1.25', "in_proj's (z, x) × (0.5, 2.0)"."""
    text = [f"input × {input_multiplier}"] if input_multiplier != 1 else []
    text += [f"{what} × {values[0] if len(values) == 1 else values}" for what, values in inner if set(values) != {1.0}]
    return text + ([f"output × {output_multiplier}"] if output_multiplier != 1 else [])


class Kind(Generic[SpecT, ConfigT]):
    """One layer kind. Defaults describe a kind that owns nothing, costs nothing and keeps no cache."""

    name: ClassVar[str]  # the spec's `kind` tag, and the op kind in the IR
    role: ClassVar[Role]
    template: ClassVar[str | None] = None  # templates/components/<template>.py.j2 (heads and extras: <group>/<kind>)
    class_name: ClassVar[str | None] = None  # a model-level extra's class (components are named after the spec)
    colour: ClassVar[str] = "#8d99ae"  # its boxes in diagram.svg
    has_cache: ClassVar[bool] = False  # keeps decoding state (its module has empty_cache)
    produces_aux: ClassVar[bool] = False  # forward returns (y, {name: weighted auxiliary loss})
    takes_pads: ClassVar[bool] = False  # forward takes `pads`, each row's left padding in a ragged batch (attention_mask)
    # a mixer's forward takes `step`, the forward's StepContext (ops/attention.py): what its layers derive from the
    # positions alone (RoPE angles, the attention mask), computed by the first layer and shared by the rest
    takes_step: ClassVar[bool] = False
    builds_op: ClassVar[bool] = True  # False for a spec entry that is already part of the backbone (the `lm` head)
    after_optimizer_step: ClassVar[str | None] = None  # a head's Model method training calls after every optimizer step
    # a head's Model method that init_weights calls last, and __init__ on the meta device (where it makes no weights)
    after_init_weights: ClassVar[str | None] = None
    # a head's extra passes of the backbone in a training step, (with gradient, without): training FLOPs count them
    backbone_passes_in_training: ClassVar[tuple[int, int]] = (0, 0)

    # -------------------------------------------------------------------------------- spec -> resolved config
    def check(self, spec: SpecT, path: str, model: Any) -> list[Diagnostic]:
        """Rules across this entry's fields (and the model's sizes); `path` is the entry's dotted spec path."""
        return []

    def resolve(self, spec: SpecT, model: Any) -> ConfigT:
        """The config the later stages read: every derived size a number. `model` is the spec's ModelDims."""
        raise NotImplementedError(f"kind '{self.name}' does not resolve a spec entry")

    def lock(self, spec: SpecT, config: ConfigT) -> dict:
        """The entry as spec.lock.yaml records it: the spec as written, with the sizes resolve derived filled in."""
        return spec.model_dump(mode="json")

    # ------------------------------------------------------------------------------------------ IR and cost
    def parameters(self, config: ConfigT, dims: Dims) -> dict[str, tuple[int, ...]]:
        return {}

    def output_shape(self, config: ConfigT, dims: Dims, inputs: list[Shape]) -> Shape:
        return tuple(inputs[0])

    def forward_flops(self, config: ConfigT, dims: Dims, seq_len: int) -> int:
        """One sequence of seq_len tokens, batch 1."""
        return 0

    def cache_bytes(self, config: ConfigT, dims: Dims, context: int, itemsize: int) -> int:
        """Decode-time state for one sequence at `context` tokens."""
        return 0

    def positions_added(self, config: ConfigT) -> int:
        """Positions this op adds to the sequence every op after it processes (Hymba's meta tokens prepend theirs,
        dropping them before the output layer takes them away): the cost model counts the ops in between at
        seq_len plus these."""
        return 0

    def activation_elements(self, config: ConfigT, dims: Dims, seq_len: int) -> int:
        """The largest intermediate the op holds at once, in elements (batch 1)."""
        return 0

    def inactive_params(self, config: ConfigT, dims: Dims) -> int:
        """Parameters a token does not use (routed experts it is not sent to)."""
        return 0

    # ---------------------------------------------------------------------------------------------- emission
    def takes_residual(self, config: ConfigT, kernels: dict) -> bool:
        """A feed-forward's forward takes `residual=` (the block's stream) and returns residual + its output, adding it
        itself (in its last product's epilogue, on a decoding step), so the block emits `x = self.ffn(h, residual=x)`
        rather than `x = x + self.ffn(h)`. `kernels`: the op's chosen kernels {function: choice}."""
        return False

    def output_projection(self, config: ConfigT) -> str | None:
        """The attribute of the mixer's last linear layer where its output is that layer's product and nothing more
        (no bias, no multiplier after it), which a parallel layer's combine may then run itself (forward(...,
        project=False) returns its input instead: kernels/combine_projections.py); None where something follows it."""
        return None

    def takes_residual_norm(self, config: ConfigT, kernels: dict) -> bool:
        """A mixer's forward takes `residual=` (the block's stream) and `norm=` (the block's feed-forward norm, a
        FusedRMSNorm) and returns (norm(residual + y), residual + y), what `self.ffn_norm(y, x)` returns, computing
        them with its own output in one launch on a decoding step; the block then emits
        `h, x = self.mixer(self.mixer_norm(x), ..., residual=x, norm=self.ffn_norm)`. `kernels`: the op's chosen
        kernels {function: choice}."""
        return False

    def folds_input_norm(self, config: ConfigT, kernels: dict) -> bool:
        """A mixer whose decoding step applies the block's RMSNorm inside its first GEMV (kernels/gemv.py, "RMSNorm
        folded in"): its forward takes `input_norm=` (the block's norm, not yet applied to x) and norms x itself on
        every path that does not fold it. A parallel layer whose branches all fold it is handed x un-normed, and its
        decoding step hands the norm on: the norm's launch leaves the layer's chain. `kernels`: the op's chosen
        kernels {function: choice}."""
        return False

    def template_dims(self, config: ConfigT, dims: Dims) -> dict[str, Any]:
        """Every literal the kind's template prints."""
        return {"d_model": dims.d_model}

    def imports(self, config: ConfigT) -> dict[str, tuple[str, ...]]:
        """{runtime file: the names its template uses from it}: templates/runtime/<file>.py is copied to the
        package's ops/<file>.py, and the model's import lines are written from these tables (emit/plan.py)."""
        return {}

    def runtime_files(self, config: ConfigT) -> tuple[str, ...]:
        return tuple(self.imports(config))

    def subcomponents(self, config: ConfigT) -> list[tuple[str, str, Any]]:
        """(suffix, kind, config) of modules the emitted class builds from other kinds' classes (MoE's shared
        experts are one MLP); each becomes a class `<Name><Suffix>` the template finds as dims['<suffix>_class']."""
        return []
