"""The command line: `archgen import hf` and `archgen export-spec`, their output and exit codes."""

from __future__ import annotations

import json

import yaml
from click.testing import CliRunner

from archgen.cli import main

LLAMA = {
    "model_type": "llama",
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "vocab_size": 128,
    "rms_norm_eps": 1e-5,
    "hidden_act": "silu",
}


def test_import_then_inspect_then_export_spec(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(LLAMA))
    runner = CliRunner()
    result = runner.invoke(
        main, ["import", "hf", str(tmp_path / "config.json"), "-o", str(tmp_path / "out"), "--name", "tiny_llama"]
    )
    assert result.exit_code == 0, result.output
    assert "model_type llama" in result.output
    spec = yaml.safe_load((tmp_path / "out" / "spec.yaml").read_text())
    assert spec["name"] == "tiny_llama" and spec["layout"] == {"n_layers": 4, "mixers": "attn", "ffns": "mlp"}
    result = runner.invoke(main, ["export-spec", str(tmp_path / "out" / "spec.yaml"), "-o", str(tmp_path / "hf")])
    assert result.exit_code == 0, result.output
    exported = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert exported["model_type"] == "llama" and exported["num_key_value_heads"] == 2


def test_import_errors_exit_2_and_name_the_field(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({**LLAMA, "rope_scaling": {"rope_type": "longrope", "factor": 4.0}}))
    result = CliRunner().invoke(main, ["import", "hf", str(tmp_path), "-o", str(tmp_path / "out")])
    assert result.exit_code == 2
    assert "rope_scaling.rope_type" in result.output and "longrope" in result.output
    assert not (tmp_path / "out").exists()


def test_a_hub_id_that_is_no_local_path_says_to_download_it_first(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(main, ["import", "hf", "meta-llama/Llama-3.2-1B", "-o", "out"])
    assert result.exit_code == 2 and not (tmp_path / "out").exists()
    assert "archgen reads a downloaded model and fetches nothing" in result.output
    assert "`archgen import hf models/Llama-3.2-1B`" in result.output
    result = CliRunner().invoke(main, ["import", "hf", "missing.json", "-o", "out"])
    assert result.exit_code == 2 and "'missing.json' does not exist" in result.output and "download" not in result.output
