"""Megatron-Core hybrid layer patterns as a layout form: the symbols, the roles of mixers and feed-forwards, pipeline
separators, and every error located at its key or column."""

from __future__ import annotations

import pytest

from archgen.errors import CompileError
from archgen.pipeline import compile_spec
from archgen.resolve.megatron import expand_megatron

NAMES = {"ssm", "attn", "mlp", "moe", "none"}


def names(slots):
    return [slot.names[0] for slot in slots]


def test_mixer_role_keeps_m_and_star_and_leaves_mlp_layers_empty():
    slots, problems = expand_megatron("M-M*-|ME", {"M": "ssm", "*": "attn"}, "mixers", NAMES, None)
    assert problems == []
    assert names(slots) == ["ssm", "none", "ssm", "attn", "none", "ssm", "none"]


def test_ffn_role_keeps_dash_and_e():
    slots, problems = expand_megatron("M-M*-|ME", {"-": "mlp", "E": "moe"}, "ffns", NAMES, 7)
    assert problems == []
    assert names(slots) == ["none", "mlp", "none", "none", "mlp", "none", "moe"]


@pytest.mark.parametrize("text, symbols, role, expected", [
    ("M*", {"M": "ssm"}, "mixers", "does not say which component"),
    ("M-", {"M": "ssm", "-": "mlp"}, "mixers", "'-' is an MLP layer in Megatron's pattern, not one of the mixers"),
    ("MX", {"M": "ssm"}, "mixers", "'X' at column 1 is not a Megatron layer symbol"),
    ("MM/M", {"M": "ssm"}, "mixers", "multi-token-prediction"),
    ("M", {"M": "sssm"}, "mixers", "unknown component 'sssm'"),
    ("||", {}, "mixers", "no layers"),
])
def test_errors_say_what_to_change(text, symbols, role, expected):
    _, problems = expand_megatron(text, symbols, role, NAMES, None)
    assert any(expected in p.message for p in problems), [p.message for p in problems]
    assert all(p.fix for p in problems)


SPEC = """\
schema_version: 1
name: nemotron_like
model: {d_model: 64, vocab_size: 128}
mixers:
  ssm: {kind: mamba2, head_dim: 16, d_state: 16, chunk_size: 16}
  attn: {kind: attention, n_heads: 4, n_kv_heads: 2}
ffns:
  mlp: {kind: mlp, activation: relu2, hidden: 128}
layout:
  n_layers: 7
  mixers: {megatron: "M-M*-|M-", symbols: {M: ssm, "*": attn}}
  ffns: {megatron: "M-M*-|M-", symbols: {"-": mlp}}
"""


def test_a_megatron_layout_resolves_to_one_sublayer_per_layer(tmp_path):
    spec = tmp_path / "nemotron_like.yaml"
    spec.write_text(SPEC)
    layers = compile_spec(spec).resolved.layers
    assert [(layer.mixers, layer.ffn) for layer in layers] == [
        (("ssm",), None), ((), "mlp"), (("ssm",), None), (("attn",), None), ((), "mlp"), (("ssm",), None), ((), "mlp")]


def test_megatron_errors_point_at_the_key_and_the_column(tmp_path):
    spec = tmp_path / "bad.yaml"
    spec.write_text(SPEC.replace('"M-M*-|M-", symbols: {M: ssm', '"M-M*-|M-Q", symbols: {M: ssn'))
    with pytest.raises(CompileError) as error:
        compile_spec(spec)
    found = {d.path: d for d in error.value.diagnostics}
    assert found["layout.mixers.symbols.M"].location.line == 11
    column_error = next(d for d in error.value.diagnostics if "'Q'" in d.message)
    assert column_error.location.column == SPEC.splitlines()[10].index('"M-M*-') + 2 + 8  # 1-based, after the quote
