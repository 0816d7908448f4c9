"""The muP multipliers of the attention, mamba2 and mlp kinds (Falcon-H1's), the mamba2 kind's own inner width
(d_inner) and its optional output norm: sizes, the lock, and the generated layers against the same layers without
multipliers whose weights carry them instead.

That they compute what transformers' Falcon-H1 computes is tested by tests/importers/test_hf_equivalence.py."""

from __future__ import annotations

import pytest
import torch
import yaml

from archgen.errors import CompileError
from archgen.kinds import Dims, kind_of
from archgen.pipeline import compile_spec
from archgen.spec import models
from tests.numerics import assert_close

MAMBA2, ATTENTION, MLP = kind_of("mamba2"), kind_of("attention"), kind_of("mlp")
MODEL = models.ModelDims(d_model=64, vocab_size=128)
DIMS = Dims(d_model=64, vocab_size=128)
SSM = {"kind": "mamba2", "head_dim": 16, "n_groups": 2, "d_state": 8, "chunk_size": 8, "d_inner": 96}
MULTIPLIERS = {
    "ssm": {"input_multiplier": 1.25, "output_multiplier": 0.24,
            "in_proj_multipliers": {"z": 0.35, "x": 0.25, "B": 0.45, "C": 0.5, "dt": 0.3}},
    "attn": {"input_multiplier": 1.3, "output_multiplier": 0.9},
    "mlp": {"gate_multiplier": 0.88, "output_multiplier": 0.59},
}


def spec_text(multipliers: bool, output_norm: bool) -> str:
    mixers = {"ssm": {**SSM, "output_norm": output_norm}, "attn": {"kind": "attention", "n_heads": 4}}
    ffns = {"mlp": {"kind": "mlp", "hidden": 96}}
    if multipliers:
        for name, fields in MULTIPLIERS.items():
            (ffns if name == "mlp" else mixers)[name].update(fields)
    layout = {"n_layers": 2, "mixers": "ssm|attn", "ffns": "mlp", "parallel_combine": "sum"}
    name = "mup_scaled" if multipliers else "mup_plain"
    return yaml.safe_dump({"schema_version": 1, "name": name, "model": {"d_model": 64, "vocab_size": 128}, "mixers": mixers,
                           "ffns": ffns, "layout": layout})


def test_d_inner_sizes_the_ssm_apart_from_expand():
    config = MAMBA2.resolve(models.Mamba2Spec(**SSM), MODEL)
    assert (config.d_inner, config.n_heads) == (96, 6)
    table = MAMBA2.parameters(config, DIMS)
    assert table["in_proj.weight"] == (96 + 96 + 2 * 2 * 8 + 6, 64)  # z, x, B, C, Δ
    assert table["conv1d.weight"] == (96 + 2 * 2 * 8, 1, 4)
    assert (table["norm.weight"], table["out_proj.weight"]) == ((96,), (64, 96))
    assert MAMBA2.cache_bytes(config, DIMS, context=10, itemsize=2) == 128 * 3 * 2 + 96 * 8 * 4


def test_without_an_output_norm_the_ssm_has_no_norm_weight():
    config = MAMBA2.resolve(models.Mamba2Spec(**SSM, output_norm=False), MODEL)
    assert "norm.weight" not in MAMBA2.parameters(config, DIMS)


def test_settings_at_their_defaults_stay_out_of_the_lock_and_set_ones_are_recorded():
    """Specs written before these fields existed keep their hash."""
    plain = {
        MAMBA2: models.Mamba2Spec(kind="mamba2", head_dim=16),
        ATTENTION: models.AttentionSpec(kind="attention", n_heads=4),
        MLP: models.MLPSpec(kind="mlp", hidden=96),
    }
    new_fields = {"d_inner", "output_norm", "input_multiplier", "in_proj_multipliers", "output_multiplier", "gate_multiplier"}
    for kind, spec in plain.items():
        assert not new_fields & set(kind.lock(spec, kind.resolve(spec, MODEL))), kind.name
    spec = models.Mamba2Spec(**SSM, **MULTIPLIERS["ssm"])
    locked = MAMBA2.lock(spec, MAMBA2.resolve(spec, MODEL))
    assert locked["d_inner"] == 96 and locked["output_multiplier"] == 0.24
    assert locked["in_proj_multipliers"] == MULTIPLIERS["ssm"]["in_proj_multipliers"]


def test_the_multipliers_change_the_spec_hash(tmp_path):
    hashes = set()
    for multipliers in (False, True):
        path = tmp_path / f"{multipliers}.yaml"
        path.write_text(spec_text(multipliers, True))
        hashes.add(compile_spec(path).resolved.spec_hash)
    assert len(hashes) == 2


def test_a_multiplier_must_be_positive(tmp_path):
    path = tmp_path / "spec.yaml"
    path.write_text(spec_text(True, True).replace("output_multiplier: 0.9", "output_multiplier: 0.0"))
    with pytest.raises(CompileError) as caught:
        compile_spec(path)
    assert any(d.path == "mixers.attn.output_multiplier" for d in caught.value.diagnostics)


@pytest.mark.parametrize("output_norm", [True, False], ids=["output_norm", "no-output_norm"])
def test_a_layer_with_multipliers_equals_the_plain_layer_with_the_multipliers_in_its_weights(tmp_path, build, output_norm):
    """No biases: in_proj(m·x)·s = (m·s·W)x per section, o_proj(y)·m = (m·W)y, silu(g·gate_proj x) = silu((g·W)x),
    and attention of m·x is attention with q, k and v weights scaled by m."""
    packages = {}
    for multipliers in (True, False):
        path = tmp_path / f"{multipliers}.yaml"
        path.write_text(spec_text(multipliers, output_norm))
        packages[multipliers] = build(path, preset=None)
    torch.manual_seed(0)
    scaled = packages[True].Model().eval()
    plain = packages[False].Model().eval()
    plain.load_state_dict(scaled.state_dict())
    ssm, attn = MULTIPLIERS["ssm"], MULTIPLIERS["attn"]
    with torch.no_grad():
        for layer in plain.layers:
            sections = torch.tensor([96, 96, 16, 16, 6])
            in_proj_scale = torch.tensor(list(ssm["in_proj_multipliers"].values())).repeat_interleave(sections)
            layer.mixer.ssm.in_proj.weight.mul_(ssm["input_multiplier"] * in_proj_scale[:, None])
            layer.mixer.ssm.out_proj.weight.mul_(ssm["output_multiplier"])
            for projection in (layer.mixer.attn.q_proj, layer.mixer.attn.k_proj, layer.mixer.attn.v_proj):
                projection.weight.mul_(attn["input_multiplier"])
            layer.mixer.attn.o_proj.weight.mul_(attn["output_multiplier"])
            layer.ffn.gate_proj.weight.mul_(MULTIPLIERS["mlp"]["gate_multiplier"])
            layer.ffn.down_proj.weight.mul_(MULTIPLIERS["mlp"]["output_multiplier"])
        tokens = torch.randint(0, 128, (2, 19))
        assert_close(scaled(tokens).logits, plain(tokens).logits, what="logits")
        # and decoding from the cache keeps them equal
        assert torch.equal(scaled.generate(tokens, 8, temperature=0), plain.generate(tokens, 8, temperature=0))
