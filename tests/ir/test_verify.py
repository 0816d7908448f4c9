"""The IR verifier: a broken invariant after lowering or a pass is an error naming the op and the pass."""

from __future__ import annotations

import pytest

from archgen.errors import CompileError
from archgen.ir.graph import KernelChoice
from archgen.passes.verify import verify_ir
from archgen.pipeline import compile_spec
from tests.conftest import ROOT

HYMBA = ROOT / "specs" / "hymba_plus.yaml"


def compiled_ir():
    return compile_spec(HYMBA, "tiny", verify=True).ir


def message(error: CompileError) -> str:
    return "\n".join(d.message for d in error.diagnostics)


def test_every_shipped_spec_verifies_after_every_pass():
    verify_ir(compiled_ir(), "test")


def test_a_parameter_table_out_of_step_with_its_config_is_caught():
    ir = compiled_ir()
    ir.op("layers.0.mixer").params["extra.weight"] = (1,)
    with pytest.raises(CompileError) as error:
        verify_ir(ir, "a pass")
    assert "invalid IR after a pass: layers.0.mixer: its parameter table" in message(error.value)


def test_a_cycle_and_a_lost_shape_are_caught():
    ir = compiled_ir()
    ir.graph.add_edge("norm_f", "embed")
    ir.op("lm_head").out_shape = None
    with pytest.raises(CompileError) as error:
        verify_ir(ir, "infer_shapes")
    text = message(error.value)
    assert "the graph has a cycle" in text
    assert "lm_head: no output shape" in text


def test_a_kernel_without_a_rule_for_the_kind_is_caught():
    ir = compiled_ir()
    ir.op("layers.0.mixer").kernels = {"selective_scan": KernelChoice("selective_scan", "selective_scan", "ssm", "hand-set")}
    kind = ir.op("layers.0.mixer").kind
    assert kind != "mamba"
    with pytest.raises(CompileError, match="has no rule for kind"):
        verify_ir(ir, "select_kernels")
