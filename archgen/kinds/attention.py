"""Causal grouped-query attention: q/k/v/o projections, optional qk-norm, RoPE (no parameters), sliding window, and
muP multipliers on the input and output (Falcon-H1; element-wise, not counted as FLOPs)."""

from __future__ import annotations

from dataclasses import dataclass

from archgen.errors import Diagnostic
from archgen.kinds.base import Dims, Kind, divisors, multipliers_text
from archgen.spec import models


@dataclass(frozen=True)
class RopeConfig:
    theta: float
    scaling: str  # "none" | "linear" | "ntk" | "yarn"
    factor: float
    original_max_position: int | None  # the trained context; yarn and llama3 need it, the others ignore it
    rotary_dim: int
    # the scaling's own settings that differ from rope_inv_freq's defaults (yarn: beta_fast, beta_slow,
    # attention_factor; llama3: low_freq_factor, high_freq_factor), as keyword arguments of rope_inv_freq
    settings: tuple[tuple[str, float], ...] = ()


# Which scaling reads each optional RopeSpec setting.
ROPE_SETTINGS = {"beta_fast": "yarn", "beta_slow": "yarn", "attention_factor": "yarn", "low_freq_factor": "llama3",
                 "high_freq_factor": "llama3"}


# Optional settings of the attention kind, left out of the lock at these values.
LOCK_DEFAULTS = {"softmax_scale": None, "input_multiplier": 1.0, "output_multiplier": 1.0, "output_gate": False}


@dataclass(frozen=True)
class AttentionConfig:
    n_heads: int
    n_kv_heads: int
    head_dim: int
    rope: RopeConfig | None  # None: no positional rotation
    window: int | None  # sliding window length in tokens; None: full causal
    qk_norm: bool
    qkv_bias: bool
    out_bias: bool
    softmax_scale: float | None  # None: 1/sqrt(head_dim)
    input_multiplier: float  # muP: the projections' input is scaled by this ...
    output_multiplier: float  # ... and o_proj's output by this (sparse_attention: 1)
    output_gate: bool  # q_proj gives each head's query and its output gate, interleaved per head (sparse_attention: no)


def visible_keys(seq_len: int, window: int | None) -> int:
    """Σ over query positions i of the keys it sees: min(i + 1, window)."""
    if window is None or window >= seq_len:
        return seq_len * (seq_len + 1) // 2
    return window * (window + 1) // 2 + (seq_len - window) * window


class Attention(Kind[models.AttentionSpec, AttentionConfig]):
    name = "attention"
    role = "mixer"
    template = "attention"
    colour = "#e4572e"
    has_cache = True
    takes_pads = True
    takes_step = True
    rope_function = "apply_rope_qk"  # the runtime op the template rotates q and k with (the kernel's reference)
    # what the template uses from ops/attention.py besides RoPE: a cache, a shared mask (attend) or none (attention)
    attention_functions = ("KVCache", "StepContext", "attend", "attention")

    def check(self, spec, path: str, model) -> list[Diagnostic]:
        problems: list[Diagnostic] = []
        d_model = model.d_model
        n_kv = spec.n_kv_heads or spec.n_heads
        if spec.n_heads % n_kv:
            options = ", ".join(map(str, divisors(spec.n_heads)))
            problems.append(Diagnostic(f"{path}.n_kv_heads", f"n_heads={spec.n_heads} is not divisible by n_kv_heads={n_kv}",
                                       f"use one of {options}"))
        head_dim = spec.head_dim
        if head_dim is None:
            if d_model % spec.n_heads:
                options = ", ".join(str(d) for d in divisors(d_model) if d <= 256)
                problems.append(Diagnostic(f"{path}.n_heads",
                                           f"d_model={d_model} is not divisible by n_heads={spec.n_heads}, "
                                           "so head_dim cannot be derived",
                                           f"set head_dim explicitly, or use n_heads in {options}"))
                return problems
            head_dim = d_model // spec.n_heads
        if spec.rope is not None:
            rotary = spec.rope.rotary_dim or head_dim
            if rotary > head_dim:
                problems.append(Diagnostic(f"{path}.rope.rotary_dim", f"rotary_dim={rotary} exceeds head_dim={head_dim}",
                                           f"use an even rotary_dim <= {head_dim}"))
            if rotary % 2:
                field = "rope.rotary_dim" if spec.rope.rotary_dim else "head_dim"
                problems.append(Diagnostic(f"{path}.{field}",
                                           f"RoPE rotates pairs of dimensions, so {field.split('.')[-1]}={rotary} must be even",
                                           f"use {rotary - 1} or {rotary + 1}"))
            scaling = spec.rope.scaling
            if scaling in ("yarn", "llama3") and spec.rope.original_max_position is None:
                problems.append(Diagnostic(f"{path}.rope.original_max_position",
                                           f"{'YaRN' if scaling == 'yarn' else 'Llama-3'} scaling needs the context "
                                           "length the model was trained at",
                                           "set rope.original_max_position, e.g. 4096" if scaling == "yarn" else
                                           "set rope.original_max_position, e.g. 8192 (Llama 3.1's)"))
            for setting, owner in ROPE_SETTINGS.items():
                if getattr(spec.rope, setting) is not None and scaling != owner:
                    problems.append(Diagnostic(f"{path}.rope.{setting}",
                                               f"rope.{setting} belongs to scaling '{owner}', but scaling is '{scaling}'",
                                               f"remove {setting}, or set scaling: {owner}"))
            if scaling == "llama3":
                low, high = spec.rope.low_freq_factor or 1.0, spec.rope.high_freq_factor or 4.0
                if high <= low:
                    problems.append(Diagnostic(f"{path}.rope.high_freq_factor",
                                               f"high_freq_factor={high} must exceed low_freq_factor={low}",
                                               "Llama 3.1 uses low_freq_factor: 1 and high_freq_factor: 4"))
            if spec.rope.scaling != "none" and spec.rope.factor == 1.0:
                problems.append(Diagnostic(f"{path}.rope.factor",
                                           f"rope scaling '{spec.rope.scaling}' with factor 1.0 changes nothing",
                                           "set factor > 1 or scaling: none", severity="warning"))
        return problems

    def resolve(self, spec, model) -> AttentionConfig:
        head_dim = spec.head_dim or model.d_model // spec.n_heads
        rope = spec.rope
        if rope is not None:
            settings = tuple((k, float(getattr(rope, k))) for k in ROPE_SETTINGS if getattr(rope, k) is not None)
            rope = RopeConfig(rope.theta, rope.scaling, rope.factor, rope.original_max_position, rope.rotary_dim or head_dim,
                              settings)
        return AttentionConfig(spec.n_heads, spec.n_kv_heads or spec.n_heads, head_dim, rope, spec.window, spec.qk_norm,
                               spec.qkv_bias, spec.out_bias, getattr(spec, "softmax_scale", None),
                               getattr(spec, "input_multiplier", 1.0), getattr(spec, "output_multiplier", 1.0),
                               getattr(spec, "output_gate", False))

    def lock(self, spec, config: AttentionConfig) -> dict:
        rope = None
        if spec.rope is not None:
            # Unset scaling settings are left out, so specs written before they existed keep their hash.
            unset = {k for k in ROPE_SETTINGS if getattr(spec.rope, k) is None}
            rope = spec.rope.model_copy(update={"rotary_dim": config.rope.rotary_dim}).model_dump(mode="json", exclude=unset)
        filled = {"head_dim": config.head_dim, "n_kv_heads": config.n_kv_heads}
        document = {**spec.model_copy(update=filled).model_dump(mode="json"), "rope": rope}
        # Settings at their defaults are left out, so specs written before they existed keep their hash.
        for setting, default in LOCK_DEFAULTS.items():
            if setting in document and document[setting] == default:
                del document[setting]
        return document

    def parameters(self, config: AttentionConfig, dims: Dims) -> dict[str, tuple[int, ...]]:
        d, hd = dims.d_model, config.head_dim
        q_out, kv_out = config.n_heads * hd, config.n_kv_heads * hd
        q_rows = 2 * q_out if config.output_gate else q_out  # each head's query, then its gate
        table = {"q_proj.weight": (q_rows, d), "k_proj.weight": (kv_out, d), "v_proj.weight": (kv_out, d)}
        if config.qkv_bias:
            table.update({"q_proj.bias": (q_rows,), "k_proj.bias": (kv_out,), "v_proj.bias": (kv_out,)})
        table["o_proj.weight"] = (d, q_out)
        if config.out_bias:
            table["o_proj.bias"] = (d,)
        if config.qk_norm:
            table.update({"q_norm.weight": (hd,), "k_norm.weight": (hd,)})
        return table

    def projection_flops(self, config: AttentionConfig, dims: Dims, q_rows: float, kv_rows: float) -> float:
        q_side = 3 if config.output_gate else 2  # q_proj (twice as wide with the gate) and o_proj
        return 2 * dims.d_model * config.head_dim * (q_rows * config.n_heads * q_side + kv_rows * config.n_kv_heads * 2)

    def forward_flops(self, config: AttentionConfig, dims: Dims, seq_len: int) -> int:
        scores_and_values = 4 * config.n_heads * config.head_dim * visible_keys(seq_len, config.window)
        return self.projection_flops(config, dims, seq_len, seq_len) + scores_and_values

    def cache_bytes(self, config: AttentionConfig, dims: Dims, context: int, itemsize: int) -> int:
        kept = context if config.window is None else min(context, config.window)
        return 2 * config.n_kv_heads * config.head_dim * kept * itemsize

    def activation_elements(self, config: AttentionConfig, dims: Dims, seq_len: int) -> int:
        """q, k, v and the output, plus one head's score matrix (fused kernels never hold all)."""
        kept = seq_len if config.window is None else min(seq_len, config.window)
        return seq_len * config.head_dim * (2 * config.n_heads + 2 * config.n_kv_heads) + seq_len * kept

    def imports(self, config: AttentionConfig) -> dict[str, tuple[str, ...]]:
        rope = (self.rope_function, "rope_cos_sin", "rope_inv_freq") if config.rope else ()
        return {"attention": (*self.attention_functions, *rope)}

    def output_projection(self, config: AttentionConfig) -> str | None:
        return "o_proj" if not config.out_bias and config.output_multiplier == 1 else None

    def folds_input_norm(self, config: AttentionConfig, kernels: dict) -> bool:
        """The fused q, k and v step (kernels/qkv_rope.py) takes the norm; an input multiplier would come between."""
        return "qkv_rope_write_kv_" in kernels and config.input_multiplier == 1

    def template_dims(self, config: AttentionConfig, dims: Dims) -> dict:
        rope = config.rope
        return {"router": False, "qk_norm": config.qk_norm, "qkv_bias": config.qkv_bias, "out_bias": config.out_bias,
                "norm_eps": dims.norm_eps, "inv_freq_size": rope.rotary_dim // 2 if rope else None,
                "d_model": dims.d_model, "n_heads": config.n_heads, "n_kv_heads": config.n_kv_heads,
                "head_dim": config.head_dim, "q_out": config.n_heads * config.head_dim,
                "q_rows": (2 if config.output_gate else 1) * config.n_heads * config.head_dim,  # q_proj's outputs
                "kv_out": config.n_kv_heads * config.head_dim, "window": config.window,
                    "rope": rope is not None, "rotary_dim": rope.rotary_dim if rope else None,
                    "rope_theta": rope.theta if rope else None, "rope_scaling": rope.scaling if rope else None,
                    "rope_factor": rope.factor if rope else None, "rope_original": rope.original_max_position if rope else None,
                    "rope_settings": dict(rope.settings) if rope else {}, "rope_key": rope_key(rope),
                    "softmax_scale": config.softmax_scale,
                "input_multiplier": config.input_multiplier, "output_multiplier": config.output_multiplier,
                "multipliers": multipliers_text(config.input_multiplier, config.output_multiplier),
                "output_gate": config.output_gate,
                "qk_norm_class": "ZeroCenteredRMSNorm" if dims.norm_zero_centered else "RMSNorm"}


def rope_key(rope) -> str | None:
    """What a forward's StepContext keeps a RoPE's angles under: its definition, so that attention components with the
    same RoPE (Hymba+'s windowed and global layers) share one computation a step."""
    if rope is None:
        return None
    scaled = "" if rope.scaling == "none" else (f", {rope.scaling} x{rope.factor} from {rope.original_max_position}"
                                                + "".join(f", {k} {v}" for k, v in sorted(dict(rope.settings).items())))
    return f"rope {rope.rotary_dim}, theta {rope.theta}{scaled}"


KIND = Attention()
