"""Kernel selection: the pass gives each op the kernel of the first matching rule, and the emitter ships and calls
exactly the kernels the ops were given."""

from __future__ import annotations

from pathlib import Path

from archgen.emit import emit
from archgen.passes.kernels import KERNEL_RULES, KernelRule, select_kernels
from archgen.pipeline import compile_spec
from tests.conftest import ROOT

NEXUS = ROOT / "specs" / "nexus.yaml"  # Mamba-1 and attention
HSPMN = ROOT / "specs" / "hspmn.yaml"  # convolution and sparse attention
ATTENTION_ONLY = """\
schema_version: 1
name: attention_only
model: {d_model: 32, vocab_size: 64, max_seq_len: 64, norm: {kind: layernorm, eps: 1.0e-5}}
mixers:
  attn: {kind: attention, n_heads: 2, n_kv_heads: 1}
ffns:
  mlp: {kind: mlp, activation: swiglu, hidden: 64}
layout: {mixers: attn*2, ffns: mlp}
"""


def test_every_mamba_op_gets_the_selective_scan_every_rmsnorm_its_kernel_and_nothing_else_a_kernel():
    ir = compile_spec(NEXUS, "tiny").ir
    chosen = {op.name: op.kernel.file for op in ir.ops() if op.kernel is not None}
    expected = {op.name: {"mamba": "selective_scan", "rmsnorm": "rmsnorm"}[op.kind] for op in ir.ops()
                if op.kind in ("mamba", "rmsnorm")}
    assert {"selective_scan", "rmsnorm"} <= set(expected.values()) and chosen == expected


def test_every_sparse_attention_op_gets_the_packed_query_kernel():
    ir = compile_spec(HSPMN, "tiny").ir
    chosen = {op.name: op.kernel.file for op in ir.ops() if op.kernel is not None}
    sparse = {op.name for op in ir.ops() if op.kind == "sparse_attention"}
    assert sparse and {name for name, file in chosen.items() if file != "rmsnorm"} == sparse
    assert set(chosen.values()) == {"packed_query_attention", "rmsnorm"}


def test_a_rule_with_a_condition_applies_only_where_it_holds():
    ir = compile_spec(NEXUS, "tiny").ir
    windowed = KernelRule("attention", "windowed_attention", "attention", "attention", "test rule",
                          when=lambda config: config.window is not None)
    full = KernelRule("attention", "full_attention", "attention", "attention", "test rule")
    select_kernels(ir, [windowed, full, *KERNEL_RULES])
    for op in ir.ops():
        if op.kind == "attention":
            assert op.kernel.file == ("windowed_attention" if op.config.window else "full_attention")


def test_the_emitted_package_ships_and_calls_only_the_chosen_kernels():
    compiled = compile_spec(NEXUS, "tiny")
    files = emit(compiled, Path(NEXUS).relative_to(ROOT).as_posix()).files
    assert "kernels/selective_scan.py" in files
    assert "kernels.selective_scan(" in files["model.py"]

    for op in compiled.ir.ops():
        op.kernel = None  # as if no rule matched
    files = emit(compiled, Path(NEXUS).relative_to(ROOT).as_posix()).files
    assert not any(path.startswith("kernels/") for path in files)
    assert "kernels." not in files["model.py"] and "use_kernel" not in files["model.py"]


def test_a_model_without_a_kernel_kind_has_no_kernels_package(tmp_path):
    spec = tmp_path / "attention_only.yaml"
    spec.write_text(ATTENTION_ONLY)
    files = emit(compile_spec(spec, None), "attention_only.yaml").files
    assert not any(path.startswith("kernels/") for path in files)
