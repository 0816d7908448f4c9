"""What cannot be exported fails with a message naming the graph, the layer, the op and the spec component, and
`archgen build --export` writes a checked export next to the build."""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner

from archgen.cli import main
from archgen.export import ExportError, export_package
from tests.conftest import ROOT, build_package

HSPMN = ROOT / "specs" / "hspmn.yaml"


@pytest.fixture
def hspmn(tmp_path):
    """HSPMN with one layer: every kind of failure shows in layer 0, and the exports these tests start stay quick."""
    return build_package(HSPMN, tmp_path / "package", overrides=("layout.n_layers=1",))


def test_data_dependent_control_flow_is_located(hspmn, tmp_path, monkeypatch):
    original = hspmn.model.Context.forward

    def forward(self, x, positions, cache=None, pads=None, step=None):
        y, aux = original(self, x, positions, cache, pads=pads, step=step)
        if y.sum() > 0:  # a Python branch on a tensor's value
            y = 2 * y
        return y, aux

    monkeypatch.setattr(hspmn.model.Context, "forward", forward)
    with pytest.raises(ExportError) as caught:
        export_package(hspmn, tmp_path / "export", formats=("pt2",), check=False)
    message = str(caught.value)
    assert "cannot export the prefill graph of hspmn (" in message and "specs/hspmn.yaml, preset tiny) to torch.export" in message
    assert "layer: layers.0.mixer.context  <- spec mixers.context (sparse_attention)" in message
    assert "op:    `if y.sum() > 0:  # a Python branch on a tensor's value`" in message
    assert "tensor arithmetic" in message  # the fix
    assert not (tmp_path / "export").exists(), "a failed export leaves no output"


def test_shape_guard_on_a_dynamic_dim_is_located(hspmn, tmp_path, monkeypatch):
    original = hspmn.model.Swiglu.forward

    def forward(self, x, residual=None):  # the block hands a SwiGLU feed-forward its residual stream
        if x.size(0) == 1:  # specialises the dynamic batch
            return original(self, x, residual)
        return original(self, x, residual)

    monkeypatch.setattr(hspmn.model.Swiglu, "forward", forward)
    with pytest.raises(ExportError) as caught:
        export_package(hspmn, tmp_path / "export", formats=("pt2",), check=False)
    message = str(caught.value)
    assert "layer: layers.0.ffn  <- spec ffns.swiglu (mlp)" in message
    assert "op:    `if x.size(0) == 1:  # specialises the dynamic batch`" in message
    assert "guard: " in message and "dynamic dim" in message


def test_op_without_onnx_lowering_is_located(hspmn, tmp_path, monkeypatch):
    original = hspmn.model.Reflex.forward

    def forward(self, x, positions=None, cache=None, pads=None):
        y = original(self, x, positions, cache, pads=pads)
        order = torch.argsort(y, dim=-1, stable=True)  # ONNX has no stable sort
        return y + 0 * order.to(y.dtype)

    monkeypatch.setattr(hspmn.model.Reflex, "forward", forward)
    with pytest.raises(ExportError) as caught:
        export_package(hspmn, tmp_path / "export", formats=("onnx",), check=False)
    message = str(caught.value)
    assert "cannot export the prefill graph of hspmn (" in message and "specs/hspmn.yaml, preset tiny) to ONNX" in message
    assert "layer: layers.0.mixer.reflex  <- spec mixers.reflex (conv)" in message
    assert "op:    aten.sort.stable" in message and "torch.argsort(y, dim=-1, stable=True)" in message


def test_build_export_writes_checked_graphs(tmp_path):
    runner = CliRunner()
    with runner.isolated_filesystem(temp_dir=tmp_path):
        result = runner.invoke(main, ["build", str(HSPMN), "--preset", "tiny", "--set", "layout.n_layers=1", "-o", "gen",
                                      "--export", "pt2"])
        assert result.exit_code == 0, result.output
        assert "exported gen/hspmn/ to exports/hspmn/" in " ".join(result.output.split())
        manifest = json.loads(open("exports/hspmn/manifest.json").read())
    assert manifest["graphs"]["decode"]["files"] == {"pt2": "decode.pt2"} and manifest["onnx_opset"] is None
    assert manifest["weights"] == {"source": "seeded initialisation (Model.init_weights after torch.manual_seed)", "seed": 0}
    checks = manifest["checks"]
    assert (checks["batch"], checks["seq"]) == (3, 23) and max(checks["prefill"]["pt2"], checks["decode"]["pt2"]) < 1e-4
