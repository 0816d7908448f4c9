"""The spec language: pydantic models of a hybrid architecture, one model per component kind.

Every component family is a discriminated union on `kind`, so only the tagged branch is validated and an error names
it. Models are frozen and forbid unknown keys: a typo is an error with a path, never a silently ignored field.
Only shapes and hyper-parameters live here; cross-field rules that need the whole spec (d_model against heads, names
used by the layout) are checked in `archgen.spec.checks`, which reports all of them at once.
"""

from __future__ import annotations

import keyword
import sys
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Discriminator, Field, StringConstraints, Tag, field_validator
from pydantic_core import PydanticCustomError

from archgen.spec.text import text_problem

SCHEMA_VERSION = 1

# Names from a spec become Python identifiers and file names in generated code: keep them to a safe alphabet.
Identifier = Annotated[str, StringConstraints(pattern=r"^[a-z_][a-z0-9_]{0,62}$")]
PresetName = Annotated[str, StringConstraints(pattern=r"^[a-z0-9_]{1,63}$")]  # "7b" is a fine preset name
# Integers are strict (YAML's `yes` must not become 1) and bounded far above any real model, so a typo such as
# d_model: 1e9 is an error rather than an hour of arithmetic; floats must be finite.
MAX_SIZE = 2**24
PositiveInt = Annotated[int, Field(gt=0, le=MAX_SIZE, strict=True)]
Count = Annotated[int, Field(ge=0, le=MAX_SIZE, strict=True)]
Depth = Annotated[int, Field(gt=0, le=256, strict=True)]  # layers inside one head or module
PositiveFloat = Annotated[float, Field(gt=0, allow_inf_nan=False)]
Probability = Annotated[float, Field(ge=0, le=1, allow_inf_nan=False)]
LossWeight = Annotated[float, Field(ge=0, le=1e6, allow_inf_nan=False)]

# "none" means an empty slot in layouts; the others are attributes every torch module (or ModuleDict) already has,
# which a component of that name would overwrite in the generated code.
RESERVED_NAMES = frozenset({
    "none", "add_module", "apply", "bfloat16", "buffers", "call_super_init", "children", "clear", "compile", "cpu",
    "cuda", "double", "dump_patches", "eval", "extra_repr", "float", "forward", "get_buffer", "get_extra_state",
    "get_parameter", "get_submodule", "half", "ipu", "items", "keys", "load_state_dict", "modules", "mtia",
    "named_buffers", "named_children", "named_modules", "named_parameters", "parameters", "pop", "register_buffer",
    "register_module", "register_parameter", "requires_grad_", "set_extra_state", "set_submodule", "share_memory",
    "state_dict", "to", "to_empty", "train", "training", "type", "update", "values", "xpu", "zero_grad",
})


# A model's name is the name of its generated package, imported from the folder that holds it: that folder comes first
# on sys.path, so a package named like a module the generated code (or torch, which it imports) imports would shadow it.
# The list is fixed rather than read from the environment, so a spec is accepted or refused the same way everywhere.
GENERATED_IMPORTS = frozenset({"torch", "triton", "safetensors", "numpy", "onnx", "onnxruntime", "onnxscript", "archgen",
                               "generated"})
TORCH_DEPENDENCIES = frozenset({"filelock", "fsspec", "jinja2", "markupsafe", "mpmath", "networkx", "sympy", "typing_extensions",
                                "setuptools", "pkg_resources", "functorch", "torchgen", "yaml", "opt_einsum", "optree"})
SHADOWED_MODULES = frozenset(sys.stdlib_module_names) | GENERATED_IMPORTS | TORCH_DEPENDENCIES


def spec_rule_error(message: str, fix: str) -> PydanticCustomError:
    """A validation error that carries its fix to the diagnostic (pydantic's own errors carry only a message)."""
    return PydanticCustomError("spec_rule", "{message}", {"message": message, "fix": fix})


def package_name_problem(name: str) -> tuple[str, str] | None:
    """(message, fix) when `name` cannot be the name of an importable generated package, else None."""
    suggestion = (name.strip("_") or "model")[:56] + "_model"
    if keyword.iskeyword(name):
        return f"'{name}' is a Python keyword, so the package could not be imported", f"pick another name, e.g. '{suggestion}'"
    if name.startswith("__") or name.endswith("__"):
        return f"'{name}' is a dunder name, which Python reserves for its own use", f"pick another name, e.g. '{suggestion}'"
    if name in SHADOWED_MODULES:
        what = "the standard library's" if name in sys.stdlib_module_names else "a"
        return (f"'{name}' is the name of {what} module '{name}', which the generated package (or torch) imports: "
                f"the package would shadow it", f"pick another name, e.g. '{suggestion}'")
    return None


class SpecModel(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


# ---------------------------------------------------------------------------------------------------------- norms
class RMSNormSpec(SpecModel):
    kind: Literal["rmsnorm"]
    eps: PositiveFloat = 1e-5
    # Scale by 1 + weight, the weights starting at 0 (Qwen3-Next's norms); attention's qk-norm follows the model's norm.
    zero_centered: bool = False


class LayerNormSpec(SpecModel):
    kind: Literal["layernorm"]
    eps: PositiveFloat = 1e-5
    bias: bool = True


NormSpec = Annotated[RMSNormSpec | LayerNormSpec, Field(discriminator="kind")]


# --------------------------------------------------------------------------------------------------------- mixers
class MambaSpec(SpecModel):
    """Mamba-1 selective SSM (Gu & Dao, 2023)."""

    kind: Literal["mamba"]
    d_state: PositiveInt = 16
    d_conv: PositiveInt = 4
    expand: PositiveInt = 2
    dt_rank: PositiveInt | Literal["auto"] = "auto"  # auto: ceil(d_model / 16), as in the paper
    conv_bias: bool = True
    bias: bool = False  # in/out projection biases
    dt_min: PositiveFloat = 1e-3  # range of the initial step size (initialisation only)
    dt_max: PositiveFloat = 1e-1
    # Jamba's mixer: RMSNorms on Δ (dt_rank wide), B and C (d_state wide) between x_proj and the scan, eps as the model's.
    inner_norms: bool = False


class InProjMultipliers(SpecModel):
    """A factor for each section of a Mamba-2 in_proj output: the gate z, the SSM input x, B, C and the step Δ."""

    z: PositiveFloat = 1.0
    x: PositiveFloat = 1.0
    B: PositiveFloat = 1.0
    C: PositiveFloat = 1.0
    dt: PositiveFloat = 1.0


class Mamba2Spec(SpecModel):
    """Mamba-2 SSD (Dao & Gu, 2024): scalar decay per head, B/C shared within groups, chunked scan."""

    kind: Literal["mamba2"]
    head_dim: PositiveInt = 64
    n_heads: PositiveInt | None = None  # default: expand * d_model / head_dim
    n_groups: PositiveInt = 1
    d_state: PositiveInt = 128
    d_conv: PositiveInt = 4
    expand: PositiveInt = 2
    chunk_size: PositiveInt = 256
    conv_bias: bool = True
    bias: bool = False
    # The gated RMSNorm before out_proj: over all d_inner channels (False), or over each of the n_groups channel groups
    # on its own (True), as mamba_ssm's and transformers' Mamba-2 normalise when n_groups > 1.
    grouped_norm: bool = False
    # Δ = softplus(dt + dt_bias) clamped to [dt_floor, dt_ceiling] in every step (mamba_ssm's dt_limit; Nemotron-H
    # floors Δ at its time_step_min). None: no bound.
    dt_floor: PositiveFloat | None = None
    dt_ceiling: PositiveFloat | None = None
    # The SSM's inner width (x, z and y channels) where it is not expand·d_model (Falcon-H1's mamba_d_ssm): expand unused.
    d_inner: PositiveInt | None = None
    # The gated output RMSNorm(y·SiLU(z)) before out_proj (Mamba-2's); false: y·SiLU(z) with no norm (Falcon-H1's).
    output_norm: bool = True
    # muP multipliers (Falcon-H1): the input of in_proj, each section of its output, and the output of out_proj.
    input_multiplier: PositiveFloat = 1.0
    in_proj_multipliers: InProjMultipliers = InProjMultipliers()
    output_multiplier: PositiveFloat = 1.0


class GatedDeltaNetSpec(SpecModel):
    """Gated DeltaNet (Yang, Kautz & Hatamizadeh, 2025): the gated delta rule with a (head_dim × head_v_dim) state per
    value head, short causal convolutions on q, k and v, and a gated RMSNorm on the output (Qwen3-Next's linear layer)."""

    kind: Literal["gated_deltanet"]
    n_heads: PositiveInt  # query/key heads
    head_dim: PositiveInt = 128  # query/key head dim K
    n_v_heads: PositiveInt | None = None  # value heads, a multiple of n_heads (grouped values); default n_heads
    head_v_dim: PositiveInt | None = None  # value head dim V; default head_dim
    d_conv: PositiveInt = 4  # width of the causal depthwise convolution on q, k and v
    conv_bias: bool = False
    output_gate: bool = True  # RMSNorm(o) ⊙ SiLU(x W_g); False: RMSNorm(o) alone
    allow_neg_eigval: bool = False  # β = 2·sigmoid(.) ∈ (0, 2) instead of sigmoid(.): state-tracking (Grazzi et al.)
    chunk_size: PositiveInt = 64  # chunk length of the chunked algorithm; the result does not depend on it


class RopeSpec(SpecModel):
    theta: PositiveFloat = 10000.0
    scaling: Literal["none", "linear", "ntk", "yarn", "llama3"] = "none"
    factor: PositiveFloat = 1.0
    original_max_position: PositiveInt | None = None  # required by yarn and llama3
    rotary_dim: PositiveInt | None = None  # default: the whole head_dim
    # yarn: the ramp between kept and interpolated pairs ends at beta_fast and beta_slow turns over
    # original_max_position (default 32 and 1); attention_factor scales cos and sin (default 0.1·ln(factor) + 1).
    beta_fast: PositiveFloat | None = None
    beta_slow: PositiveFloat | None = None
    attention_factor: PositiveFloat | None = None
    # llama3: wavelengths below original_max_position / high_freq_factor are kept, above / low_freq_factor
    # interpolated, blended in between (default 1 and 4, Llama 3.1's).
    low_freq_factor: PositiveFloat | None = None
    high_freq_factor: PositiveFloat | None = None


class AttentionFields(SpecModel):
    n_heads: PositiveInt
    n_kv_heads: PositiveInt | None = None  # default n_heads (plain multi-head); fewer for grouped-query attention
    head_dim: PositiveInt | None = None  # default d_model / n_heads
    rope: RopeSpec | None = RopeSpec()
    window: PositiveInt | None = None  # sliding window length in tokens; None = full causal
    qk_norm: bool = False
    qkv_bias: bool = False
    out_bias: bool = False


class AttentionSpec(AttentionFields):
    """Causal grouped-query attention with rotary positions."""

    kind: Literal["attention"]
    softmax_scale: PositiveFloat | None = None  # the scores' factor; default 1/sqrt(head_dim) (Granite: 1/head_dim)
    # muP multipliers (Falcon-H1): the input of the q, k and v projections and the output of o_proj.
    input_multiplier: PositiveFloat = 1.0
    output_multiplier: PositiveFloat = 1.0
    # Gated attention (Qwen3-Next): each head's output scaled by sigmoid of a gate that q_proj computes beside its query.
    output_gate: bool = False


class SparseAttentionSpec(AttentionFields):
    """HSPMN's contextual stream: a per-token router picks a fraction of tokens whose queries attend to all causal keys."""

    kind: Literal["sparse_attention"]
    fraction: Annotated[float, Field(gt=0, le=1)] = 0.2
    entropy_weight: LossWeight = 0.01
    fraction_weight: LossWeight = 0.1


class ConvSpec(SpecModel):
    """HSPMN's reflexive stream mixer: depthwise causal convolution over d_model, then an activation."""

    kind: Literal["conv"]
    d_conv: PositiveInt = 4
    bias: bool = True
    activation: Literal["silu", "none"] = "silu"


class NoMixerSpec(SpecModel):
    kind: Literal["none"]


MixerSpec = Annotated[
    MambaSpec | Mamba2Spec | AttentionSpec | SparseAttentionSpec | ConvSpec | GatedDeltaNetSpec | NoMixerSpec,
    Field(discriminator="kind"),
]


# --------------------------------------------------------------------------------------------------- feed-forwards
Activation = Literal["swiglu", "geglu", "gelu", "relu", "silu", "relu2"]


class FeedForwardShape(SpecModel):
    activation: Activation = "swiglu"
    hidden: PositiveInt | None = None  # give hidden, or multiplier × d_model rounded up to multiple_of
    multiplier: Annotated[float, Field(gt=0, le=1024, allow_inf_nan=False)] | None = None
    multiple_of: PositiveInt = 1
    bias: bool = False


class MLPSpec(FeedForwardShape):
    kind: Literal["mlp"]
    # muP multipliers (Falcon-H1): gate_proj's output before the activation (gated activations only), down_proj's output.
    gate_multiplier: PositiveFloat = 1.0
    output_multiplier: PositiveFloat = 1.0


class MoESpec(SpecModel):
    kind: Literal["moe"]
    n_experts: PositiveInt
    top_k: PositiveInt = 2
    expert: FeedForwardShape
    shared_experts: Count = 0  # always-on experts of the same shape (DeepSeek-style)
    # the shared experts' total hidden width, where it is not shared_experts × the routed experts' (Granite's shared MLP)
    shared_hidden: PositiveInt | None = None
    # each token's shared-expert output scaled by sigmoid(x·w), a learned gate (Qwen3-Next's shared_expert_gate)
    shared_gate: bool = False
    normalize_top_k: bool = True  # renormalise the k routing weights to sum to one
    load_balancing_weight: LossWeight = 0.01
    z_loss_weight: LossWeight = 0.001
    capacity_factor: PositiveFloat | None = None  # None: dropless


class NoFeedForwardSpec(SpecModel):
    kind: Literal["none"]


FeedForwardSpec = Annotated[MLPSpec | MoESpec | NoFeedForwardSpec, Field(discriminator="kind")]


# ------------------------------------------------------------------------------------------------------- layout
class RatioLayout(SpecModel):
    """Jamba-style placement: names fill each period of sum(ratio) layers in order, starting at `offset`."""

    ratio: dict[Identifier, PositiveInt]
    offset: Count = 0


MegatronSymbol = Literal["M", "*", "-", "E"]


class MegatronLayout(SpecModel):
    """Megatron-Core's hybrid layer pattern ("M-M-M*-", one symbol per layer: M Mamba, * attention, - MLP, E MoE;
    '|' marks pipeline stages and changes nothing), with the spec component each symbol stands for. Under
    layout.mixers only M and * name components (the other layers have no mixer); under layout.ffns only - and E."""

    megatron: str
    symbols: dict[MegatronSymbol, Identifier]


def _layout_form(value: object) -> str | None:
    if isinstance(value, str):
        return "pattern"
    if isinstance(value, list):
        return "list"
    if isinstance(value, MegatronLayout) or isinstance(value, dict) and "megatron" in value:
        return "megatron"
    if isinstance(value, (dict, RatioLayout)):
        return "ratio"
    return None


# A layout is a pattern expression ("(ssm*3, attn)*8"), an explicit list (one pattern item per layer), a ratio, or a
# Megatron-Core hybrid pattern.
LayoutForm = Annotated[
    Annotated[str, Tag("pattern")] | Annotated[list[str], Tag("list")] | Annotated[RatioLayout, Tag("ratio")]
    | Annotated[MegatronLayout, Tag("megatron")],
    Discriminator(
        _layout_form,
        custom_error_type="layout_form",
        custom_error_message="expected a pattern string like '(ssm*3, attn)*8', a list with one item per layer, "
        "a mapping {ratio: {attn: 1, ssm: 7}, offset: 4}, or {megatron: 'M-M*-', symbols: {M: ssm, '*': attn}}",
    ),
]


class LayoutSpec(SpecModel):
    n_layers: PositiveInt | None = None  # required by ratio layouts; otherwise the mixer pattern's length
    mixers: LayoutForm
    ffns: LayoutForm = "none"
    # How the branches of a parallel layer `(a|b)` combine: Hymba normalises each branch and mixes with learned scales.
    parallel_combine: Literal["normalized_mean", "sum"] = "normalized_mean"


# ---------------------------------------------------------------------------------------- model-level extras
class MetaTokensSpec(SpecModel):
    """Hymba's learnable prefix, prepended on the first forward of a sequence."""

    count: PositiveInt


class TitansMemorySpec(SpecModel):
    """Titans-style neural memory written at test time by gradient steps on an associative loss."""

    kind: Literal["titans"]
    after_layer: Annotated[int, Field(strict=True)] = -1  # read the memory after this layer (negative counts from the end)
    depth: Annotated[int, Field(gt=0, le=16, strict=True)] = 2  # layers of the memory MLP (Titans uses 1 to 4)
    hidden: PositiveInt | None = None  # default d_model
    chunk_size: PositiveInt = 64
    learning_rate: PositiveFloat = 0.01
    momentum: Probability = 0.9
    forget: Probability = 0.01  # weight decay applied at every write


class SymbolicRule(SpecModel):
    premises: list[Identifier] = Field(min_length=1)
    conclusion: Identifier


class SymbolicSpec(SpecModel):
    """Differentiable forward chaining over soft predicates extracted from hidden states."""

    after_layer: Annotated[int, Field(strict=True)] = -1
    predicates: list[Identifier] = Field(min_length=1)
    rules: list[SymbolicRule] = []
    learned_rules: Count = 0
    steps: Depth = 2


class LMHeadSpec(SpecModel):
    kind: Literal["lm"]
    loss_weight: LossWeight = 1.0


class MedusaHeadSpec(SpecModel):
    """K extra heads predicting tokens t+2 … t+K+1 for draft-and-verify decoding."""

    kind: Literal["medusa"]
    # Bounded near the paper's sizes (4-5 heads, 1 block), which also bounds the n_heads x hidden_layers parameter table.
    n_heads: Annotated[int, Field(gt=0, le=16, strict=True)] = 4
    hidden_layers: Annotated[int, Field(ge=0, le=16, strict=True)] = 1  # residual SiLU blocks before each head's projection
    loss_weight: LossWeight = 0.2


class JEPAHeadSpec(SpecModel):
    """Latent prediction against an EMA target encoder, with an L2 and/or VICReg objective."""

    kind: Literal["jepa"]
    predictor_layers: Depth = 2
    predictor_hidden: PositiveInt | None = None  # default d_model
    latent_dim: PositiveInt | None = None  # default d_model
    mask_ratio: Annotated[float, Field(gt=0, lt=1)] = 0.15
    ema_momentum: Annotated[float, Field(gt=0, lt=1)] = 0.996
    l2_weight: LossWeight = 1.0
    vicreg_invariance_weight: LossWeight = 25.0
    vicreg_variance_weight: LossWeight = 25.0
    vicreg_covariance_weight: LossWeight = 1.0
    loss_weight: LossWeight = 1.0


class ForecasterHeadSpec(SpecModel):
    """Time-series forecasting over mean-scaled, uniformly binned values."""

    kind: Literal["forecaster"]
    n_bins: PositiveInt = 256
    # after mean scaling
    value_range: tuple[Annotated[float, Field(allow_inf_nan=False)], Annotated[float, Field(allow_inf_nan=False)]] = (-15.0, 15.0)
    loss_weight: LossWeight = 1.0


HeadSpec = Annotated[
    LMHeadSpec | MedusaHeadSpec | JEPAHeadSpec | ForecasterHeadSpec, Field(discriminator="kind")
]


# -------------------------------------------------------------------------------------------------------- model
class ModelDims(SpecModel):
    d_model: PositiveInt
    vocab_size: PositiveInt
    tie_embeddings: bool = False
    norm: NormSpec = RMSNormSpec(kind="rmsnorm")
    max_seq_len: PositiveInt = 2048
    init_std: PositiveFloat = 0.02
    # Scalars some published models apply (Granite, muP-trained models): the embeddings are multiplied by
    # embedding_multiplier, each layer's mixer and feed-forward outputs by residual_multiplier before their residual
    # add, and the logits divided by logit_divisor. 1.0 is no scaling (left out of the lock, so older specs keep
    # their hash).
    embedding_multiplier: PositiveFloat = 1.0
    residual_multiplier: PositiveFloat = 1.0
    logit_divisor: PositiveFloat = 1.0


MODEL_MULTIPLIERS = ("embedding_multiplier", "residual_multiplier", "logit_divisor")


class Spec(SpecModel):
    """A whole architecture as written by a person (presets not yet applied)."""

    schema_version: int
    name: Identifier
    description: str = ""
    # the size the architecture is advertised at; inspect warns when off by >10%
    nominal_params: Annotated[float, Field(gt=0, le=1e15, allow_inf_nan=False)] | None = None
    model: ModelDims
    mixers: dict[Identifier, MixerSpec]
    ffns: dict[Identifier, FeedForwardSpec] = {}
    layout: LayoutSpec
    meta_tokens: MetaTokensSpec | None = None
    memory: TitansMemorySpec | None = None
    symbolic: SymbolicSpec | None = None
    heads: dict[Identifier, HeadSpec] = {}
    presets: dict[PresetName, dict] = {}

    @field_validator("name")
    @classmethod
    def _importable_package_name(cls, name: str) -> str:
        problem = package_name_problem(name)
        if problem is not None:
            raise spec_rule_error(*problem)
        return name

    @field_validator("description")
    @classmethod
    def _writable_text(cls, text: str) -> str:
        problem = text_problem(text)
        if problem is not None:
            raise spec_rule_error(f"the description holds {problem}, which a generated file cannot carry",
                                  "delete the character (the description is copied into docstrings and the README)")
        return text

