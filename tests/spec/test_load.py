"""Loading: presets apply and compose, --set overrides are validated like the file, every error of a stage is
reported at once, every shipped spec loads for its base and every preset, and the spec hash is stable and sensitive.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from archgen.errors import CompileError
from archgen.pipeline import compile_spec
from archgen.resolve.resolve import resolve
from archgen.spec.load import load_spec

ROOT = Path(__file__).resolve().parents[2]
SPECS = sorted((ROOT / "specs").glob("*.yaml"))
HYMBA = ROOT / "specs" / "hymba_plus.yaml"
LLAMA = ROOT / "tests" / "specs" / "published" / "llama3_8b.yaml"


def layer_mixers(compiled) -> list[tuple[str, ...]]:
    return [layer.mixers for layer in compiled.resolved.layers]


def errors_of(path, preset=None, overrides=()) -> list:
    with pytest.raises(CompileError) as caught:
        compile_spec(path, preset, overrides)
    return caught.value.diagnostics


def write(tmp_path: Path, text: str, name: str = "spec.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


# ------------------------------------------------------------------------------------------------------ presets
def test_tiny_then_interleaved_takes_sizes_from_tiny_and_the_layout_from_interleaved():
    compiled = compile_spec(HYMBA, "tiny,interleaved")
    assert compiled.resolved.d_model == 64
    assert compiled.resolved.model.vocab_size == 256
    assert compiled.resolved.meta_tokens.config.count == 4
    assert compiled.resolved.mixers["attn"].config.n_heads == 4
    assert layer_mixers(compiled) == [("global_attn",), ("ssm",), ("attn",), ("ssm",)]


def test_later_preset_wins_so_interleaved_then_tiny_keeps_tinys_parallel_layout():
    compiled = compile_spec(HYMBA, "interleaved,tiny")
    assert compiled.resolved.d_model == 64
    assert layer_mixers(compiled) == [("global_attn", "ssm"), ("attn", "ssm"), ("attn", "ssm"), ("global_attn", "ssm")]


def test_preset_list_tolerates_spaces_after_commas():
    assert layer_mixers(compile_spec(HYMBA, "tiny, interleaved")) == layer_mixers(compile_spec(HYMBA, "tiny,interleaved"))


def test_preset_that_nulls_a_field_restores_its_default():
    """tiny sets nominal_params: null, so the tiny model is not held to the 1.5B the base advertises."""
    assert compile_spec(HYMBA).resolved.nominal_params == 1.5e9
    assert compile_spec(HYMBA, "tiny").resolved.nominal_params is None


def test_preset_does_not_leak_into_the_next_load():
    compile_spec(HYMBA, "tiny")
    assert compile_spec(HYMBA).resolved.d_model == 1600


# ---------------------------------------------------------------------------------------------------- overrides
def test_set_overrides_a_field_after_presets():
    compiled = compile_spec(HYMBA, "tiny", ["model.d_model=96", "layout.n_layers=8"])
    assert compiled.resolved.d_model == 96
    assert compiled.resolved.n_layers == 8


def test_set_value_is_read_as_yaml():
    overrides = ["mixers.attn.window=1024", "model.tie_embeddings=true", "mixers.attn.rope.theta=1.0e+4"]
    compiled = compile_spec(LLAMA, None, overrides)
    assert compiled.resolved.mixers["attn"].config.window == 1024
    assert compiled.resolved.model.tie_embeddings is True
    assert compiled.resolved.mixers["attn"].config.rope.theta == 10000.0


def test_set_can_create_a_missing_block():
    compiled = compile_spec(LLAMA, None, ["meta_tokens.count=8"])
    assert compiled.resolved.meta_tokens.config.count == 8


BAD_OVERRIDES = [
    pytest.param("mixers.attn.n_head=8", "mixers.attn.n_head", "unknown key 'n_head'", id="typo"),
    pytest.param("model.d_model=wide", "model.d_model", "input should be a valid integer", id="wrong-type"),
    pytest.param("mixers.attn.n_kv_heads=5", "mixers.attn.n_kv_heads", "n_heads=32 is not divisible by n_kv_heads=5",
                 id="shape-rule"),
    pytest.param("layout.n_layers=-4", "layout.n_layers", "greater than 0", id="negative"),
    pytest.param("ffns.mlp.kind=mlpp", "ffns.mlp", "unknown kind 'mlpp'", id="unknown-kind"),
    pytest.param("layout.mixers=(attn, atn)", "layout.mixers", "replace 'atn' with 'attn'", id="layout"),
    pytest.param("mixers.attn={kind: attention, n_heads: 48}", "mixers.attn.n_heads", "not divisible by n_heads=48",
                 id="whole-mapping"),
    pytest.param("mixers.atn.n_heads=8", "mixers.atn", "did you mean 'attn'?", id="misspelled-component"),
    pytest.param("mixers.fresh.n_heads=8", "mixers.fresh", "set kind to one of: 'mamba', 'mamba2', 'attention'",
                 id="new-component-without-kind"),
    pytest.param("model.norm={eps: 0.1}", "model.norm", "set kind to one of: 'rmsnorm', 'layernorm'", id="norm-kind"),
]


@pytest.mark.parametrize("override, path, message", BAD_OVERRIDES)
def test_bad_override_is_reported_at_the_override(override, path, message):
    errors = errors_of(LLAMA, None, [override])
    assert len(errors) == 1, [e.render() for e in errors]
    error = errors[0]
    assert error.path == path
    assert message in error.message + " " + (error.fix or "")
    assert error.location.file == f"--set {override}"
    assert error.render().startswith(f"--set {override}: error: {path}: ")


def test_override_that_cannot_be_parsed_names_the_syntax():
    (error,) = errors_of(LLAMA, None, ["model.d_model"])
    assert "cannot read override 'model.d_model'" in error.message
    assert "--set dotted.path=value" in error.fix


# ------------------------------------------------------------------------------------------- errors at once
THREE_FIELD_ERRORS = """\
schema_version: 1
name: three
model: {d_model: sixty-four, vocab_size: 256}
mixers:
  attn: {kind: attention, n_heads: 4, windw: 16}
ffns:
  mlp: {kind: mlp}
  moe: {kind: moe, n_experts: 4}
layout: {n_layers: 2, mixers: attn, ffns: mlp}
"""

THREE_RULE_ERRORS = """\
schema_version: 1
name: three
model: {d_model: 64, vocab_size: 256}
mixers:
  attn: {kind: attention, n_heads: 4, n_kv_heads: 3}
  ssd: {kind: mamba2, head_dim: 16, n_groups: 3}
ffns:
  moe: {kind: moe, n_experts: 2, top_k: 4, expert: {hidden: 64}}
layout: {n_layers: 2, mixers: attn, ffns: moe}
"""

THREE_LAYOUT_ERRORS = """\
schema_version: 1
name: three
model: {d_model: 64, vocab_size: 256}
mixers:
  attn: {kind: attention, n_heads: 4}
  ssm: {kind: mamba}
ffns:
  mlp: {kind: mlp, hidden: 128}
layout:
  n_layers: 4
  mixers: (ssm, atn)*2
  ffns: mlpp
memory: {kind: titans, after_layer: 9}
"""

ERRORS_AT_ONCE = {
    "validation": (THREE_FIELD_ERRORS, {"model.d_model": 3, "mixers.attn.windw": 5, "ffns.moe.expert": 8}),
    "shape-rules": (THREE_RULE_ERRORS, {"mixers.attn.n_kv_heads": 5, "mixers.ssd.n_groups": 6, "ffns.moe.top_k": 8}),
}


@pytest.mark.parametrize("text, expected", list(ERRORS_AT_ONCE.values()), ids=list(ERRORS_AT_ONCE))
def test_three_independent_errors_are_reported_together_each_at_its_line(text, expected, tmp_path):
    errors = errors_of(write(tmp_path, text))
    assert {e.path: e.location.line for e in errors} == expected


def test_three_independent_layout_errors_are_reported_together(tmp_path):
    """Layout names for mixers and ffns are checked in one pass; the memory layer waits for a valid layout."""
    errors = errors_of(write(tmp_path, THREE_LAYOUT_ERRORS))
    assert [e.path for e in errors] == ["layout.mixers", "layout.ffns"]
    assert "replace 'atn' with 'attn'" in errors[0].fix
    assert "replace 'mlpp' with 'mlp'" in errors[1].fix
    fixed = THREE_LAYOUT_ERRORS.replace("atn", "attn").replace("mlpp", "mlp")
    (memory,) = errors_of(write(tmp_path, fixed))
    assert memory.path == "memory.after_layer"
    assert memory.location.line == 13


# ------------------------------------------------------------------------------------- every spec, every preset
def spec_presets() -> list:
    cases = []
    for spec in SPECS:
        presets = yaml.safe_load(spec.read_text(encoding="utf-8")).get("presets") or {}
        cases += [pytest.param(spec, preset, id=f"{spec.stem}-{preset or 'base'}") for preset in [None, *presets]]
    return cases


@pytest.mark.parametrize("spec, preset", spec_presets())
def test_every_shipped_spec_compiles_for_base_and_every_preset(spec, preset):
    compiled = compile_spec(spec, preset)
    assert compiled.resolved.n_layers >= 1
    assert compiled.resolved.preset == preset
    assert all(d.severity == "warning" for d in compiled.loaded.warnings)


# ---------------------------------------------------------------------------------------------------- spec hash
def spec_hash(path, preset=None, overrides=()) -> str:
    return resolve(load_spec(path, preset, overrides)).spec_hash


@pytest.mark.parametrize("spec", SPECS, ids=[s.stem for s in SPECS])
def test_spec_hash_is_the_same_on_two_loads(spec):
    first, second = spec_hash(spec), spec_hash(spec)
    assert first == second
    assert len(first) == 64 and int(first, 16) >= 0


def test_spec_hash_changes_when_a_field_changes():
    base = spec_hash(LLAMA)
    assert spec_hash(LLAMA, overrides=["mixers.attn.rope.theta=10000"]) != base
    assert spec_hash(LLAMA, overrides=["model.max_seq_len=8193"]) != base
    assert spec_hash(LLAMA, overrides=["mixers.attn.n_kv_heads=4"]) != base


def test_spec_hash_ignores_comments_key_order_and_defaults_written_out(tmp_path):
    data = yaml.safe_load(LLAMA.read_text(encoding="utf-8"))
    data["mixers"]["attn"].update({"qk_norm": False, "window": None})  # the defaults, written out
    reordered = {key: data[key] for key in reversed(list(data))}
    text = "# a comment that changes nothing\n" + yaml.safe_dump(reordered, sort_keys=True)
    assert spec_hash(write(tmp_path, text)) == spec_hash(LLAMA)


def test_spec_hash_changes_with_the_name(tmp_path):
    text = LLAMA.read_text(encoding="utf-8").replace("name: llama3_8b", "name: llama3_8b_copy")
    assert spec_hash(write(tmp_path, text)) != spec_hash(LLAMA)


def test_same_resolved_model_from_a_preset_or_from_overrides_has_the_same_hash():
    tiny = spec_hash(HYMBA, "tiny,interleaved")
    assert spec_hash(HYMBA, "tiny,interleaved", ["model.d_model=64"]) == tiny
