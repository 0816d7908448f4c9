"""The command line: `check` exits 0 or 2 with located messages and never a traceback; `inspect` prints the totals,
JSON and an SVG diagram; `schema` prints the JSON Schema of the spec language.
"""

from __future__ import annotations

import json
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from archgen.cli import main
from archgen.kinds import KINDS
from tests.spec.test_bad_specs import CORPUS, read_case

ROOT = Path(__file__).resolve().parents[1]
SPECS = sorted((ROOT / "specs").glob("*.yaml"))
LLAMA = ROOT / "tests" / "specs" / "published" / "llama3_8b.yaml"
HYMBA = ROOT / "specs" / "hymba_plus.yaml"
BAD = ROOT / "tests" / "specs" / "bad"
SVG = "{http://www.w3.org/2000/svg}"


def run(*args: str):
    result = CliRunner().invoke(main, [str(a) for a in args])
    assert "Traceback" not in result.output, result.output
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result


# --------------------------------------------------------------------------------------------------------- check
@pytest.mark.parametrize("spec", SPECS, ids=[s.stem for s in SPECS])
def test_check_exits_0_on_every_shipped_spec_and_lists_what_it_checked(spec):
    result = run("check", spec)
    assert result.exit_code == 0, result.output
    presets = yaml.safe_load(spec.read_text(encoding="utf-8"))["presets"]
    checked = " ".join(result.stdout.split())  # rich may wrap the line
    assert checked.startswith("ok: ") and "base" in checked
    assert all(f"preset {name}" in checked for name in presets)


def test_check_exits_2_with_the_located_message_and_fix_on_stderr():
    spec = BAD / "gqa_not_divisible.yaml"
    result = run("check", spec)
    assert result.exit_code == 2
    assert f"{spec}:13:5: error: mixers.attn.n_kv_heads: n_heads=32 is not divisible by n_kv_heads=6" in result.stderr
    assert "fix: use one of 1, 2, 4, 8, 16, 32" in result.stderr
    assert result.stderr.rstrip().endswith("1 error")
    assert result.stdout == ""


def cli_corpus():
    for path in CORPUS:
        case = read_case(path)
        if not case.xfail:
            yield pytest.param(case, id=path.stem)


@pytest.mark.parametrize("case", list(cli_corpus()))
def test_check_exits_2_on_every_bad_spec_with_its_messages_and_no_traceback(case):
    args = ["check", case.path] + (["--preset", case.preset] if case.preset else [])
    for override in case.overrides:
        args += ["--set", override]
    result = run(*args)
    assert result.exit_code == 2, result.output
    for expected in case.expects:
        assert expected.split("\n")[0] in result.stderr, result.stderr


def test_check_in_a_real_process_exits_2_without_a_traceback():
    """The same through the installed entry point's module, so nothing the test runner catches can hide a crash."""
    spec = BAD / "pattern_unbalanced_paren.yaml"
    result = subprocess.run([sys.executable, "-m", "archgen.cli", "check", str(spec)], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert f"{spec}:13:11: error: layout.mixers: '(' at column 0 is never closed" in result.stderr


def test_check_reports_a_broken_preset_and_names_it(tmp_path):
    spec = tmp_path / "spec.yaml"
    base = LLAMA.read_text(encoding="utf-8")
    spec.write_text(base + "presets:\n  narrow:\n    mixers:\n      attn: {n_kv_heads: 7}\n", encoding="utf-8")
    result = run("check", spec)
    assert result.exit_code == 2
    assert "n_heads=32 is not divisible by n_kv_heads=7 (preset narrow)" in result.stderr
    preset_line = len(base.splitlines()) + 4
    assert f"{spec}:{preset_line}:14: error: mixers.attn.n_kv_heads" in result.stderr  # the preset's line, not the base's


def test_check_of_a_missing_file_exits_2_with_a_message(tmp_path):
    result = run("check", tmp_path / "nope.yaml")
    assert result.exit_code == 2
    assert "cannot read spec" in result.stderr


def test_check_with_a_bad_override_names_the_override():
    result = run("check", LLAMA, "--set", "mixers.attn.n_kv_heads=5")
    assert result.exit_code == 2
    assert "--set mixers.attn.n_kv_heads=5: error: mixers.attn.n_kv_heads: n_heads=32 is not divisible" in result.stderr


# ------------------------------------------------------------------------------------------------------- inspect
def test_inspect_prints_the_per_layer_table_and_the_totals():
    result = run("inspect", LLAMA)
    assert result.exit_code == 0, result.output
    assert "llama3_8b: 32 layers, d_model 4096" in result.stdout
    assert "8,030,261,248 (8.03B)" in result.stdout
    for row in ("parameters", "active parameters per token", "embedding parameters", "weights in bfloat16",
                "cache per sequence @ 2,048 tokens (bfloat16)"):
        assert row in result.stdout


def test_inspect_json_parses_and_carries_the_totals():
    result = run("inspect", LLAMA, "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["total_params"] == 8_030_261_248
    assert report["name"] == "llama3_8b"
    assert report["n_layers"] == 32 == len(report["layout"])
    assert len(report["spec_hash"]) == 64


def test_inspect_json_follows_preset_and_overrides():
    report = json.loads(run("inspect", HYMBA, "--preset", "tiny", "--set", "layout.n_layers=8", "--json").stdout)
    assert report["preset"] == "tiny"
    assert report["n_layers"] == 8


def test_inspect_exits_2_on_a_bad_spec_without_a_traceback():
    result = run("inspect", BAD / "pattern_unknown_name.yaml")
    assert result.exit_code == 2
    assert "replace 'atn' with 'attn'" in result.stderr
    assert result.stdout == ""
    as_json = run("inspect", BAD / "pattern_unknown_name.yaml", "--json")
    assert as_json.exit_code == 2 and as_json.stderr == ""
    assert json.loads(as_json.stdout)["errors"][0]["fix"] == "replace 'atn' with 'attn'"


def test_diagram_is_an_svg_with_one_box_per_mixer_branch_and_feed_forward(tmp_path):
    out = tmp_path / "hymba.svg"
    result = run("inspect", HYMBA, "--preset", "tiny", "--diagram", out)
    assert result.exit_code == 0, result.output
    assert f"diagram written to {out}" in " ".join(result.stdout.split())
    root = ET.parse(out).getroot()
    assert root.tag == f"{SVG}svg"
    titles = [t.text for t in root.iter(f"{SVG}title")]
    layer_boxes = [t for t in titles if t.startswith("layer ")]
    assert len(layer_boxes) == 4 * 2 + 4  # 4 layers of attention|mamba, each with an mlp
    assert "layer 0: global_attn (attention)" in titles
    assert "4 learnable meta tokens, prepended to every sequence" in titles


def test_diagram_is_written_with_json_output_too(tmp_path):
    out = tmp_path / "llama.svg"
    result = run("inspect", LLAMA, "--json", "--diagram", out)
    json.loads(result.stdout)
    ET.parse(out)


# -------------------------------------------------------------------------------------------------------- schema
MIXER_KINDS = {name for name, kind in KINDS.items() if kind.role == "mixer"} | {"none"}
# Every registered kind a spec names with `kind:` (ops of the backbone itself, and extras without a tag, are not).
SPEC_KINDS = {name for name, kind in KINDS.items() if kind.role in ("mixer", "ffn", "norm", "head")} | {"titans"}


def schema() -> dict:
    result = run("schema")
    assert result.exit_code == 0
    return json.loads(result.stdout)


def test_schema_is_json_schema_that_names_every_mixer_kind():
    document = schema()
    assert document["title"] == "Spec"
    (mixer,) = document["properties"]["mixers"]["patternProperties"].values()
    assert set(mixer["discriminator"]["mapping"]) == MIXER_KINDS
    kinds = {definition["properties"]["kind"].get("const") for definition in document["$defs"].values()
             if "kind" in definition.get("properties", {})}
    assert SPEC_KINDS <= kinds


@pytest.mark.parametrize("spec", SPECS + [LLAMA], ids=[s.stem for s in SPECS + [LLAMA]])
def test_every_shipped_spec_validates_against_the_printed_schema(spec):
    """An editor using `archgen schema` accepts every shipped spec, read by a plain YAML 1.1 loader (PyYAML's, where
    1.5e9 is a string and 1.5e+9 a number)."""
    jsonschema = pytest.importorskip("jsonschema")
    jsonschema.validate(yaml.safe_load(spec.read_text(encoding="utf-8")), schema())


def test_schema_names_its_dialect_and_identity():
    document = schema()
    assert document["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    assert document["$id"].startswith("urn:archgen:")


def test_committed_schema_is_current():
    """docs/spec.schema.json is what the specs' modelines point editors at."""
    committed = json.loads((ROOT / "docs" / "spec.schema.json").read_text(encoding="utf-8"))
    assert committed == schema(), "docs/spec.schema.json is stale: run `archgen schema -o docs/spec.schema.json`"


@pytest.mark.parametrize("spec", SPECS + [ROOT / "bench/specs/bamba_1b.yaml"], ids=lambda s: s.stem)
def test_every_shipped_spec_names_the_schema_for_editors(spec):
    first = spec.read_text(encoding="utf-8").splitlines()[0]
    assert first.startswith("# yaml-language-server: $schema=")
    assert (spec.parent / first.split("=", 1)[1]).resolve() == (ROOT / "docs" / "spec.schema.json").resolve()


def test_schema_install_maps_specs_and_keeps_other_settings(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / ".vscode").mkdir()
    (tmp_path / ".vscode/settings.json").write_text('{"editor.tabSize": 2}')
    result = run("schema", "--install")
    assert result.exit_code == 0, result.output
    settings = json.loads((tmp_path / ".vscode/settings.json").read_text())
    assert settings["editor.tabSize"] == 2
    assert settings["yaml.schemas"] == {".archgen/spec.schema.json": ["specs/*.yaml"]}
    assert json.loads((tmp_path / ".archgen/spec.schema.json").read_text()) == schema()


def test_schema_install_refuses_settings_it_cannot_read_and_writes_nothing(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / ".vscode").mkdir()
    original = '{\n  // a comment VS Code allows\n  "editor.tabSize": 2\n}\n'
    (tmp_path / ".vscode/settings.json").write_text(original)
    result = run("schema", "--install")
    assert result.exit_code == 2
    assert "nothing was written" in result.output and "yaml.schemas" in result.output
    assert (tmp_path / ".vscode/settings.json").read_text() == original
    assert not (tmp_path / ".archgen").exists()


def test_check_reports_a_base_spec_problem_once_for_all_presets(tmp_path):
    spec = tmp_path / "typo.yaml"
    spec.write_text("schema_version: 1\nname: typo\nmodel: {d_model: 64, vocab_size: 256}\n"
                    "mixers:\n  attn: {kind: attention, n_heads: 4}\n"
                    "layout:\n  mixers: (atn*2)\npresets:\n  tiny: {model: {d_model: 32}}\n  small: {model: {d_model: 48}}\n",
                    encoding="utf-8")
    result = run("check", spec)
    assert result.exit_code == 2
    assert result.stderr.count("unknown component 'atn'") == 1
    assert "(base and every preset)" in result.stderr and "1 error" in result.stderr


@pytest.mark.parametrize("text, dims", [("both", ["batch", "seq"]), ("batch,seq", ["batch", "seq"]), ("seq", ["seq"]),
                                        ("none", []), ("", [])])
def test_export_dynamic_accepts_what_its_help_offers(text, dims):
    from archgen.cli import dynamic_dims

    assert dynamic_dims(text) == dims


def test_export_dynamic_names_an_unknown_dim(tmp_path):
    result = run("export", tmp_path, "--dynamic", "batch,time")
    assert result.exit_code == 2 and "unknown dim 'time'" in result.output


def test_piped_output_does_not_wrap_mid_sentence(tmp_path):
    result = subprocess.run([sys.executable, "-m", "archgen", "build", SPECS[0], "-o", tmp_path], capture_output=True, text=True,
                            check=False, cwd=ROOT, env={**__import__("os").environ, "COLUMNS": "40"})
    assert result.returncode == 0, result.stderr
    (line,) = [line for line in result.stdout.splitlines() if line.strip()]
    assert line.startswith("built ") and line.endswith("parameters")


# ------------------------------------------------------------------------------------------------- --quiet / --json
def test_check_json_carries_located_errors_and_exits_2(tmp_path):
    spec = tmp_path / "typo.yaml"
    spec.write_text("schema_version: 1\nname: typo\nmodel: {d_model: 64, vocab_size: 256}\n"
                    "mixers:\n  attn: {kind: attention, n_heads: 4}\n"
                    "layout:\n  mixers: (atn*2)\n", encoding="utf-8")
    result = run("check", spec, "--json")
    assert result.exit_code == 2
    document = json.loads(result.stdout)
    (error,) = document["errors"]
    assert document["ok"] is False and error["line"] == 7 and error["path"] == "layout.mixers" and error["fix"]


def test_check_json_and_quiet_on_a_valid_spec():
    document = json.loads(run("check", SPECS[0], "--json").stdout)
    assert document["ok"] is True and document["checked"][0] == "base"
    quiet = run("check", SPECS[0], "--quiet")
    assert quiet.exit_code == 0 and quiet.stdout == ""


def test_build_json_lists_what_it_built(tmp_path):
    result = run("build", SPECS[0], "--preset", "tiny", "-o", tmp_path, "--json")
    (built,) = json.loads(result.stdout)["built"]
    assert built["package"] == str(tmp_path / built["package"].split("/")[-1]) and built["parameters"] > 0
    assert len(built["spec_hash"]) == 64
