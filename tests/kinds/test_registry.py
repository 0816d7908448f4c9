"""The kind registry: every kind tag of the spec language has exactly one kind module, and the stages find
everything they need about a kind there."""

from __future__ import annotations

import typing
from dataclasses import fields, is_dataclass

import pytest

from archgen.kinds import KINDS, Dims, kind_of
from archgen.kinds.base import Kind
from archgen.pipeline import compile_spec
from archgen.spec import models
from tests.conftest import ROOT, SPECS

UNIONS = {"mixer": models.MixerSpec, "ffn": models.FeedForwardSpec, "head": models.HeadSpec, "norm": models.NormSpec}


def union_tags(union) -> dict[str, type]:
    members = typing.get_args(typing.get_args(union)[0])
    return {typing.get_args(member.model_fields["kind"].annotation)[0]: member for member in members}


@pytest.mark.parametrize("role", sorted(UNIONS))
def test_every_kind_of_the_spec_language_is_registered_with_its_role(role):
    for tag in union_tags(UNIONS[role]):
        kind = kind_of(tag)
        assert kind.role in (role, "empty"), f"{tag}: role {kind.role}, written in the {role} union"


def test_an_unknown_kind_is_an_error_that_lists_the_known_ones():
    with pytest.raises(KeyError, match="no kind 'gdn'.*attention"):
        kind_of("gdn")


def test_kinds_are_registered_under_their_own_names():
    for name, kind in KINDS.items():
        assert isinstance(kind, Kind)
        assert kind.name == name


@pytest.mark.parametrize("spec_path", SPECS, ids=[s.stem for s in SPECS])
def test_resolved_configs_are_typed_and_have_no_unfilled_sizes(spec_path):
    """Every op's config is its kind's frozen dataclass; a None left in it is a documented choice, not a default."""
    allowed_none = {"rope", "window", "capacity_factor", "original_max_position", "softmax_scale", "dt_floor", "dt_ceiling",
                    "shared_hidden"}
    for op in compile_spec(spec_path, "tiny").ir.ops():
        if op.config is None:
            continue
        assert is_dataclass(op.config), op.name
        for f in fields(op.config):
            value = getattr(op.config, f.name)
            assert value is not None or f.name in allowed_none, f"{op.name}: {f.name} left None"
            assert value != "auto", f"{op.name}: {f.name} left 'auto'"


def test_a_mixer_with_the_default_protocol_needs_only_its_own_methods():
    """A kind that overrides nothing still answers every stage (no cost, no cache, shape kept)."""

    class Bare(Kind):
        name = "bare"
        role = "mixer"

    bare, dims = Bare(), Dims(d_model=8, vocab_size=16)
    assert bare.parameters(None, dims) == {}
    assert bare.forward_flops(None, dims, 10) == 0
    assert bare.cache_bytes(None, dims, 10, 2) == 0
    assert bare.output_shape(None, dims, [("B", "T", 8)]) == ("B", "T", 8)
    assert bare.runtime_files(None) == ()


def test_resolve_fills_every_derived_size_once():
    compiled = compile_spec(ROOT / "specs" / "hymba_plus.yaml", "tiny")
    attn = compiled.resolved.mixers["attn"]
    assert attn.kind == "attention"
    # The lock document records the same sizes the config holds.
    assert attn.document["head_dim"] == attn.config.head_dim
    assert attn.document["n_kv_heads"] == attn.config.n_kv_heads


def test_a_feed_forward_multiplier_becomes_a_hidden_size_rounded_up_to_multiple_of():
    spec = models.MLPSpec(kind="mlp", multiplier=2.67, multiple_of=64)
    model = models.ModelDims(d_model=100, vocab_size=16)
    config = kind_of("mlp").resolve(spec, model)
    assert config.hidden == 320  # int(267) rounded up to a multiple of 64
    assert kind_of("mlp").lock(spec, config) | {"kind": "mlp"} == {
        "kind": "mlp", "activation": "swiglu", "hidden": 320, "multiplier": None, "multiple_of": 64, "bias": False}


def test_attention_derives_head_dim_kv_heads_and_rotary_dim():
    spec = models.AttentionSpec(kind="attention", n_heads=6)
    config = kind_of("attention").resolve(spec, models.ModelDims(d_model=96, vocab_size=16))
    assert (config.head_dim, config.n_kv_heads, config.rope.rotary_dim) == (16, 6, 16)
