"""Kernel selection: which op runs which Triton kernel (on CUDA tensors), decided once over the IR.

A rule names a kind, a condition on the op's resolved config, and the kernel: `kernels/<file>.py` defines the
custom op `<function>`, which replaces the reference function of the same name in `templates/runtime/<reference>.py`.
The first rule whose kind and condition match an op wins. The emitter copies the chosen kernel files into the
generated package, and an op's template calls its kernel only when `op.kernel` is set; the reference op stays the
fallback everywhere else (CPU tensors, no triton).

To add a kernel: write kernels/<file>.py (kernel, launcher, custom op, reference side by side), add a rule here,
and call it from the kind's template under `{% if c.kernel %}`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from archgen.ir.graph import IR, KernelChoice


@dataclass(frozen=True)
class KernelRule:
    kind: str  # the op kind it applies to
    file: str  # kernels/<file>.py
    function: str  # the custom op the generated code calls as kernels.<function>
    reference: str  # the runtime file (ops/<reference>.py) whose function of the same name it replaces
    description: str  # when and why, in words (reports and docs)
    when: Callable[[Any], bool] = lambda config: True  # a condition on the op's resolved config


KERNEL_RULES: list[KernelRule] = [
    KernelRule("mamba", "selective_scan", "selective_scan", "ssm",
               "Mamba-1 sequence scan (prefill and training); decoding keeps the one-step reference update"),
    KernelRule("sparse_attention", "packed_query_attention", "packed_query_attention", "routing",
               "HSPMN's selected (packed) queries against every causal key, flash-style with a per-row causal bound "
               "(prefill, training and decode)"),
    KernelRule("moe", "swiglu", "swiglu", "moe",
               "SwiGLU experts: silu(gate) * up in one pass forward and backward on the experts' rows (the grouped "
               "form; the fixed-buffer form of export and decoding keeps the reference)",
               when=lambda config: config.expert.activation == "swiglu"),
    KernelRule("rmsnorm", "rmsnorm", "rms_norm", "norm",
               "RMSNorm, with the residual add before a block's feed-forward norm fused into it"),
]


def select_kernels(ir: IR, rules: list[KernelRule] = KERNEL_RULES) -> IR:
    for op in ir.ops():
        op.kernel = None
        for rule in rules:
            if rule.kind == op.kind and rule.when(op.config):
                op.kernel = KernelChoice(rule.file, rule.function, rule.reference, rule.description)
                break
    return ir
