"""Kernel selection: which functions of an op run Triton kernels (on CUDA tensors), decided once over the IR.

A rule names a kind, a condition on the op's resolved config, and one kernel function: `kernels/<file>.py` defines
the custom op `<function>`, which replaces the reference function of the same name in
`templates/runtime/<reference>.py`. An op may run several kernels (a Mamba-2 block: the causal conv, the SSD scan and
the decode step), one per function, so every matching rule applies; where two rules name the same function, the first
match wins (a rule with a narrower condition goes before the general one). The result is `op.kernels`,
{function: KernelChoice}. The emitter copies the chosen kernel files into the generated package, and an op's template
calls `kernels.<function>` only where `"<function>" in c.kernels`; the reference op stays the fallback everywhere else
(CPU tensors, no triton, float64) and is what an ONNX export lowers each kernel to.

A rule with `when_inputs` also looks at the ops feeding the op (their kinds, configs and own kernels, chosen first):
a parallel layer's combine run by its branches' output projections needs both to end in a plain projection.

To add a kernel: write kernels/<file>.py (kernel, launcher, custom op, reference and `decomposition` side by side),
add a rule here, and call it from the kind's template under `{% if "<function>" in c.kernels %}`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from archgen.ir.graph import IR, KernelChoice, Op
from archgen.kinds import kind_of
from archgen.kinds.mlp import fused_swiglu


@dataclass(frozen=True)
class KernelRule:
    kind: str  # the op kind it applies to
    file: str  # kernels/<file>.py
    function: str  # the custom op the generated code calls as kernels.<function>
    reference: str | None  # the runtime file (ops/<reference>.py) whose function of the same name it replaces; None
    # for a fused form of kernels that have references (the template falls back to their path; never exported)
    description: str  # when and why, in words (reports and docs)
    when: Callable[[Any], bool] = lambda config: True  # a condition on the op's resolved config
    when_inputs: Callable[[list[Op]], bool] | None = None  # a condition on the ops feeding it, after their own choices


def _power_of_two(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


def _ssd_fits(config: Any) -> bool:
    """The SSD kernel's limits: the chunk is its tile length (a power of two ≥ 16), and a head's (P, N) state is one
    register tile (each at most 256)."""
    return _power_of_two(config.chunk_size) and config.chunk_size >= 16 and max(config.head_dim, config.d_state) <= 256


def _gated_delta_fits(config: Any) -> bool:
    """The Gated DeltaNet kernels' limits: the chunk is their (L, L) tile (a power of two from 16 to 64), and all K
    rows of a head's state are one register tile (K and V each at most 256)."""
    return (_power_of_two(config.chunk_size) and 16 <= config.chunk_size <= 64
            and max(config.head_dim, config.head_v_dim) <= 256)


def _conv_fits(config: Any) -> bool:
    return 1 <= config.d_conv <= 16  # the conv kernel unrolls at most 16 taps


def _conv_steps_in_place(config: Any) -> bool:
    """The in-place conv step's kernel: widths 2 to 4 (kernels/causal_conv1d.py's WINDOW_WIDTH, its sliding window;
    others would run the functional kernel and a copy, nothing gained)."""
    return 2 <= config.d_conv <= 4


def _normalized_mean_fits(config: Any) -> bool:
    """The combine kernel: two branches, each under a plain RMSNorm (a zero-centred one scales by 1 + weight)."""
    return (config.mode == "normalized_mean" and len(config.branches) == 2 and config.norm_kind == "rmsnorm"
            and not config.norm.zero_centered)


def _branches_end_in_projections(branches: list[Op]) -> bool:
    """Two branches, each ending in a plain output projection (no bias, nothing after it: `Kind.output_projection`)
    that a decoding step runs as a GEMV."""
    return len(branches) == 2 and all(kind_of(b.kind).output_projection(b.config) and "linear" in b.kernels
                                      for b in branches)


def _qkv_rope_fits(config: Any) -> bool:
    """The qkv GEMV with the rotation in its epilogue (kernels/qkv_rope.py): RoPE applied to the products themselves
    (no qk-norm between), and q_proj's rows whole query heads (no output gate interleaved)."""
    return config.rope is not None and not config.qk_norm and not config.output_gate


GEMV_KINDS = ("mlp", "attention", "mamba2", "mamba", "lm_head")
"""The kinds whose templates build their linear layers as DecodeLinear (and the lm_head) when given the GEMV."""

KERNEL_RULES: list[KernelRule] = [
    KernelRule("mamba", "selective_scan", "selective_scan", "ssm",
               "Mamba-1 sequence scan (prefill and training)"),
    KernelRule("mamba", "causal_conv1d", "causal_conv1d", "ssm",
               "Mamba-1 depthwise causal conv + SiLU, fused (a sequence, or one decoding step at T = 1)",
               when=_conv_fits),
    KernelRule("mamba", "causal_conv1d", "causal_conv1d_update_", "ssm",
               "Mamba-1 decoding step's conv + SiLU with the conv state updated in place in the cache (the step's "
               "copy of the new state into the cache before: a launch per layer and token)", when=_conv_steps_in_place),
    KernelRule("mamba", "in_proj_conv", "in_proj_conv_step_", "ssm",
               "Mamba-1 decoding step's in_proj GEMV with the conv + SiLU in its epilogue, the cache's conv state "
               "shifted in place (the GEMV and causal_conv1d_update_ before: a launch fewer per layer and token on the "
               "step's chain), the same bits", when=_conv_steps_in_place),
    KernelRule("mamba", "state_update", "mamba_step_low_rank", "ssm",
               "Mamba-1 one-token state update (decoding): Δ projected from its low rank (dt_proj), A = -exp(A_log), "
               "the step and the z gate in one launch"),
    KernelRule("mamba2", "causal_conv1d", "causal_conv1d", "ssm",
               "Mamba-2 depthwise causal conv + SiLU over x, B and C, fused (a sequence, or one decoding step)",
               when=_conv_fits),
    KernelRule("mamba2", "ssd", "ssd_scan", "ssd",
               "Mamba-2 chunked SSD scan (prefill and training); the chunk must be a power of two >= 16",
               when=_ssd_fits),
    KernelRule("mamba2", "state_update", "mamba2_step", "ssd",
               "Mamba-2 decoding step between the projections in one launch: conv update, SiLU, softplus Δ, SSD state "
               "update, D skip, z gate", when=_conv_fits),
    KernelRule("gated_deltanet", "causal_conv1d", "causal_conv1d", "ssm",
               "Gated DeltaNet depthwise causal conv + SiLU over q, k and v, fused (a sequence, or one decoding step)",
               when=_conv_fits),
    KernelRule("gated_deltanet", "gated_delta_rule", "gated_delta_rule", "gated_delta",
               "Gated DeltaNet chunked forward and backward (training, prefill, inference, generate, export)",
               when=_gated_delta_fits),
    KernelRule("gated_deltanet", "gated_delta_rule", "gated_delta_step", "gated_delta",
               "Gated DeltaNet one-token state update (decoding)",
               when=lambda config: max(config.head_dim, config.head_v_dim) <= 256),
    KernelRule("sparse_attention", "packed_query_attention", "packed_query_attention", "routing",
               "HSPMN's selected (packed) queries against every causal key, flash-style with a per-row causal bound "
               "(prefill, training and decode)"),
    KernelRule("attention", "packed_query_attention", "sliding_window_attention", "attention",
               "Sliding-window attention in training and forwards without a cache: the packed-query kernels with "
               "every token a query, reading only the key blocks inside the band (H200: 3.7x banded SDPA forward, "
               "2.1x forward + backward; cached decoding keeps the ring buffer's masked SDPA)",
               when=lambda config: config.window is not None and config.head_dim <= 256),
    KernelRule("moe", "swiglu", "swiglu", "moe",
               "SwiGLU experts: silu(gate) * up in one pass forward and backward on the experts' rows (the grouped "
               "form; the fixed-buffer form of export and decoding keeps the reference)",
               when=lambda config: config.expert.activation == "swiglu"),
    KernelRule("attention", "rope", "apply_rope_qk", "attention",
               "RoPE on q and k in one pass (every scaling, partial rotary), in place when no gradient is needed",
               when=lambda config: config.rope is not None),
    KernelRule("attention", "rope", "apply_rope_write_kv", "attention",
               "A cached step's RoPE and KV-cache write in one launch: q rotated, the rotated k and v stored into the "
               "cache's slots (the rotation and two index_copy_ launches before); a ring cache at T = 1",
               when=lambda config: config.rope is not None),
    KernelRule("attention", "rope", "rope_cos_sin", "attention",
               "A decoding step's RoPE angles (cos and sin of positions times the frequencies) in one launch where the "
               "reference's cast, product, cos and sin are four, by the first layer with each RoPE (StepContext shares them)",
               when=lambda config: config.rope is not None),
    KernelRule("attention", "qkv_rope", "qkv_rope_write_kv_", None,
               "A cached decoding step's q, k and v GEMV with RoPE and the KV-cache write in its epilogue (qkv_linear "
               "and apply_rope_write_kv before: a launch fewer per layer and token on the attention branch), the same "
               "bits; not with qk-norm (it comes between the products and the rotation) nor an output gate (q_proj's "
               "rows interleave each head's query and gate)", when=_qkv_rope_fits),
    KernelRule("attention", "decode_attention", "decode_attention", "attention",
               "A cached step's few queries (decoding) over the KV cache, split over the cache (flash-decoding): every "
               "query head of a KV head's group in one tile, the mask computed from the positions, a second launch "
               "combining the splits (cuDNN's SDPA and the additive mask before; prefill, training and export keep "
               "SDPA)", when=lambda config: config.head_dim <= 256),
    KernelRule("attention", "decode_attention", "decode_attention_one_launch", "attention",
               "The decoding step's split-KV attention in one launch: the last split of each (batch row, KV head) to "
               "finish combines the splits (an int32 counter each), where a second launch did",
               when=lambda config: config.head_dim <= 256),
    KernelRule("moe", "moe_router", "moe_router", "moe",
               "MoE router: softmax, top-k and the load-balancing and z-loss statistics in one pass, forward and "
               "backward"),
    KernelRule("mlp", "silu_mul", "silu_mul", "mlp",
               "SwiGLU feed-forward gate silu(gate) * up in one pass forward and backward", when=fused_swiglu),
    KernelRule("parallel_combine", "normalized_mean", "normalized_mean", "norm",
               "A two-branch parallel layer's normalized mean (two RMSNorms, their scales, the mean) in one launch where "
               "no gradient is needed (decoding: six launches a layer); training keeps the fused norms",
               when=_normalized_mean_fits),
    KernelRule("parallel_combine", "normalized_mean", "normalized_mean_add_norm", "norm",
               "The decoding step's combine going on with the block's residual add and its feed-forward's RMSNorm in "
               "the same launch (the fused add + norm a launch of its own after it), rounded as the two launches",
               when=_normalized_mean_fits),
    KernelRule("parallel_combine", "combine_projections", "combining_linear_", None,
               "The decoding step's two branch output projections with the combine, the block's residual add and its "
               "feed-forward norm in the epilogue of whichever finishes last (normalized_mean_add_norm a launch of its "
               "own after them, on the layer's serial chain; H200: Hymba+'s decoding step 0.35% faster)",
               when=_normalized_mean_fits, when_inputs=_branches_end_in_projections),
    KernelRule("rmsnorm", "rmsnorm", "rms_norm", "norm",
               "RMSNorm, with the residual add before a block's feed-forward norm fused into it (a zero-centred norm "
               "gives it 1 + weight in float32)"),
    KernelRule("mlp", "gemv", "swiglu_linear", "linear",
               "SwiGLU feed-forward on a decoding step's few rows: the gate and up products and silu(gate) * up in one "
               "GEMV launch (cuBLAS and the gate kernel: three)", when=fused_swiglu),
    KernelRule("mlp", "gemv", "residual_linear", "linear",
               "A SwiGLU feed-forward's down projection on a decoding step's few rows with the block's residual add in "
               "the GEMV's epilogue (the add a launch of its own before), rounded as the eager add",
               when=lambda config: fused_swiglu(config) and config.output_multiplier == 1),
    KernelRule("attention", "gemv", "qkv_linear", "linear",
               "Attention's q, k and v projections on a decoding step's few rows in one GEMV launch (three), each "
               "program reading its rows from one of the three weights as the checkpoint holds them"),
    KernelRule("lm_head", "greedy_pick", "greedy_pick_", "decoding",
               "A captured decoding step's greedy pick: each row's argmax written as the next token and into the row "
               "of picks at the step's position, one launch (torch's one-block argmax, a copy, a clamp and an "
               "index_copy before: ~15 us a token of Hymba+'s step on an H200)"),
    *(KernelRule(kind, "gemv", "linear", "linear",
                 "Linear layers on a decoding step's few rows (up to kernels/gemv.py's FEW_ROWS): a GEMV streaming the "
                 "weights, where cuBLAS reads them at ~60% of the copy bandwidth; prefill and training stay on cuBLAS")
      for kind in GEMV_KINDS),
]


def select_kernels(ir: IR, rules: list[KernelRule] = KERNEL_RULES) -> IR:
    for op in ir.ops():
        op.kernels = {}
    for on_inputs in (False, True):  # every op's own rules first: a rule on inputs reads their choices
        for op in ir.ops():
            for rule in rules:
                if ((rule.when_inputs is not None) == on_inputs and rule.kind == op.kind and rule.function not in op.kernels
                        and rule.when(op.config) and (not on_inputs or rule.when_inputs(ir.inputs(op.name)))):
                    op.kernels[rule.function] = KernelChoice(rule.file, rule.function, rule.reference, rule.description)
    return ir
