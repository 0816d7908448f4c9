"""The seed specs in specs/: the HNS seed's "7B" is counted, not believed, and every seed has a small `tiny` preset."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from archgen.cli import main
from archgen.passes.cost import cost_report
from archgen.pipeline import compile_spec

ROOT = Path(__file__).resolve().parents[2]
SPECS = sorted((ROOT / "specs").glob("*.yaml"))
HNS = ROOT / "specs" / "hns_ss_jepa_moe.yaml"


def inspect(*args: str):
    result = CliRunner().invoke(main, ["inspect", *map(str, args)])
    assert result.exit_code == 0, result.output
    return result


@pytest.mark.parametrize("preset", [None, "7b"], ids=["base", "7b"])
def test_hns_seven_b_is_reported_far_above_7b_with_a_nominal_params_warning(preset):
    result = inspect(HNS, "--json", *(["--preset", preset] if preset else []))
    report = json.loads(result.stdout)
    assert report["nominal_params"] == 7e9
    assert report["total_params"] > 5 * 7e9
    (warning,) = [w for w in report["warnings"] if w["path"] == "nominal_params"]  # --json carries its warnings
    assert warning["message"].startswith(f"the spec says 7,000,000,000 parameters, the model has {report['total_params']:,}")
    text = inspect(HNS, *(["--preset", preset] if preset else []))
    expected = f"warning: nominal_params: the spec says 7,000,000,000 parameters, the model has {report['total_params']:,}"
    assert expected in text.stderr


def test_hns_routed_experts_alone_are_over_fourteen_times_the_advertised_7b():
    """Why the seed's 7B is wrong: 16 SwiGLU experts at 4 x 4096 in each of 32 layers."""
    d_model, hidden, experts, layers = 4096, 4 * 4096, 16, 32
    routed = layers * experts * 3 * d_model * hidden
    assert routed == 103_079_215_104
    assert cost_report(compile_spec(HNS).ir).total_params > routed > 14 * 7e9


def test_hns_warning_is_printed_with_the_human_table_too():
    result = inspect(HNS)
    assert "warning: nominal_params: the spec says 7,000,000,000 parameters" in result.stderr
    assert "parameters" in result.stdout


def test_hns_tiny_preset_clears_the_nominal_size_so_there_is_no_warning():
    assert "nominal_params" not in inspect(HNS, "--preset", "tiny").stderr


@pytest.mark.parametrize("spec", SPECS, ids=[s.stem for s in SPECS])
def test_every_seed_has_a_small_tiny_preset_with_a_byte_sized_vocabulary_that_compiles(spec):
    presets = yaml.safe_load(spec.read_text(encoding="utf-8")).get("presets") or {}
    assert "tiny" in presets, f"{spec.name} has no tiny preset"
    compiled = compile_spec(spec, "tiny")
    assert compiled.resolved.model.vocab_size >= 256  # every byte is a token
    assert cost_report(compiled.ir, seq_len=64).total_params < 10_000_000, "tiny is for tests on a CPU"
