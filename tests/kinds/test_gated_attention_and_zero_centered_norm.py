"""Qwen3-Next's pieces of the spec language: attention's output_gate, the model norm's zero_centered (which
attention's qk-norm follows) and the moe kind's shared_gate: sizes, costs, the lock, and the generated layers against
plain ones whose weights stand in for the gates and the offset.

That they compute what transformers' Qwen3-Next computes is tested by tests/importers/test_hf_equivalence.py."""

from __future__ import annotations

import pytest
import torch
import yaml

from archgen.kinds import Dims, kind_of
from archgen.pipeline import compile_spec
from archgen.spec import models
from tests.conftest import assert_kernels_match_references, build_spied_package
from tests.numerics import assert_close

ATTENTION, MOE = kind_of("attention"), kind_of("moe")
MODEL = models.ModelDims(d_model=64, vocab_size=128)
DIMS = Dims(d_model=64, vocab_size=128)


def spec_text(name: str, gated: bool) -> str:
    attn = {"kind": "attention", "n_heads": 4, "n_kv_heads": 2, "head_dim": 16, "qk_norm": True, "qkv_bias": True,
            "output_gate": gated}
    moe = {"kind": "moe", "n_experts": 4, "top_k": 2, "expert": {"hidden": 32}, "shared_experts": 1, "shared_hidden": 48,
           "shared_gate": gated, "z_loss_weight": 0.0}  # fmt: skip
    norm = {"kind": "rmsnorm", "eps": 1e-6, "zero_centered": gated}
    layout = {"n_layers": 2, "mixers": "attn", "ffns": "moe"}
    return yaml.safe_dump({"schema_version": 1, "name": name, "model": {"d_model": 64, "vocab_size": 128, "norm": norm},
                           "mixers": {"attn": attn}, "ffns": {"moe": moe}, "layout": layout})  # fmt: skip


def test_the_output_gate_doubles_q_proj_and_its_cost():
    plain = ATTENTION.resolve(models.AttentionSpec(kind="attention", n_heads=4, head_dim=16, qkv_bias=True), MODEL)
    gated = ATTENTION.resolve(models.AttentionSpec(kind="attention", n_heads=4, head_dim=16, qkv_bias=True,
                                                   output_gate=True), MODEL)  # fmt: skip
    table = ATTENTION.parameters(gated, DIMS)
    assert (table["q_proj.weight"], table["q_proj.bias"]) == ((128, 64), (128,))  # per head: 16 query dims, 16 gate dims
    extra = ATTENTION.forward_flops(gated, DIMS, 10) - ATTENTION.forward_flops(plain, DIMS, 10)
    assert extra == 2 * 10 * 64 * 64  # the gate's 64 more output features of q_proj, per token


def test_the_shared_gate_is_one_weight_row_and_its_matmul():
    spec = models.MoESpec(kind="moe", n_experts=4, expert=models.FeedForwardShape(hidden=32), shared_experts=1)
    gated = spec.model_copy(update={"shared_gate": True})
    plain_config, gated_config = MOE.resolve(spec, MODEL), MOE.resolve(gated, MODEL)
    assert set(MOE.parameters(gated_config, DIMS)) - set(MOE.parameters(plain_config, DIMS)) == {"shared_expert_gate.weight"}
    assert MOE.parameters(gated_config, DIMS)["shared_expert_gate.weight"] == (1, 64)
    assert MOE.forward_flops(gated_config, DIMS, 10) - MOE.forward_flops(plain_config, DIMS, 10) == 2 * 10 * 64


def test_settings_at_their_defaults_stay_out_of_the_lock(tmp_path):
    """Specs written before these fields existed keep their hash; set ones are recorded."""
    documents = {}
    for gated in (False, True):
        path = tmp_path / f"{gated}.yaml"
        path.write_text(spec_text("lock", gated))
        documents[gated] = compile_spec(path).resolved.document
    assert "zero_centered" not in documents[False]["model"]["norm"]
    assert "output_gate" not in documents[False]["mixers"]["attn"]
    assert "shared_gate" not in documents[False]["ffns"]["moe"]
    assert documents[True]["model"]["norm"]["zero_centered"] is True
    assert documents[True]["mixers"]["attn"]["output_gate"] is True
    assert documents[True]["ffns"]["moe"]["shared_gate"] is True


def test_a_zero_centred_norm_runs_the_rmsnorm_kernel_on_one_plus_its_weight(tmp_path, monkeypatch):
    """The generated ZeroCenteredFusedRMSNorm hands the kernel 1 + weight in float32: the same logits and gradients as
    its reference (ZeroCenteredRMSNorm's float32 computation), the block's residual add fused, with offsets far from
    0 so that a weight taken as given would differ."""
    spec = tmp_path / "spec.yaml"
    spec.write_text(yaml.safe_dump({
        "schema_version": 1, "name": "zero_centred", "model": {"d_model": 16, "vocab_size": 32, "norm": {
            "kind": "rmsnorm", "eps": 1e-6, "zero_centered": True}},
        "mixers": {"attn": {"kind": "attention", "n_heads": 2, "head_dim": 8}},
        "ffns": {"mlp": {"kind": "mlp", "activation": "gelu", "hidden": 32}},
        "layout": {"n_layers": 2, "mixers": "attn", "ffns": "mlp"}}))  # fmt: skip
    package = build_spied_package(spec, tmp_path / "out", monkeypatch, ("rms_norm",))
    torch.manual_seed(0)
    model = package.Model()
    with torch.no_grad():
        for name, value in model.named_parameters():
            if name.endswith("norm.weight") or name == "norm_f.weight":
                value.normal_(0.0, 0.5)
    assert_kernels_match_references(package, model, torch.randint(0, 32, (2, 9)))
    assert package.calls["rms_norm"] == 2 * 2 + 1, package.calls  # two norms a block (one fused with the add), norm_f


def test_gated_layers_equal_plain_ones_whose_weights_stand_in_for_the_gates(build, tmp_path):
    """A zero-centred norm with weight w is a plain one with 1 + w; an attention gate pinned at +60 (sigmoid 1 in
    float32) leaves each head's output as it is; a zero shared gate (sigmoid ½) halves the shared expert's output."""
    packages = {}
    for gated in (True, False):
        path = tmp_path / f"{gated}.yaml"
        path.write_text(spec_text("gated" if gated else "plain", gated))
        packages[gated] = build(path, preset=None)
    torch.manual_seed(0)
    gated, plain = packages[True].Model().eval(), packages[False].Model().eval()
    state, plain_state = gated.state_dict(), {}
    for name, value in state.items():
        if name.endswith("norm.weight") or name == "norm_f.weight":
            value.normal_(0.0, 0.1)  # offsets from 1
            plain_state[name] = 1 + value
        elif name.endswith("q_proj.weight") or name.endswith("q_proj.bias"):  # per head: 16 query rows, 16 gate rows
            rows = value.view(4, 2, 16, -1)
            rows[:, 1] = 0.0
            if name.endswith("bias"):
                rows[:, 1] = 60.0
            plain_state[name] = rows[:, 0].reshape(64, -1).squeeze(-1).clone()
        elif name.endswith("shared_expert_gate.weight"):
            value.zero_()
        elif name.endswith("shared_expert.down_proj.weight"):
            plain_state[name] = value / 2
        else:
            plain_state[name] = value
    gated.load_state_dict(state)
    plain.load_state_dict(plain_state)
    tokens = torch.randint(0, 128, (2, 19))
    with torch.no_grad():
        assert_close(gated(tokens).logits, plain(tokens).logits, what="logits")
        assert torch.equal(gated.generate(tokens, 6, temperature=0), plain.generate(tokens, 6, temperature=0))


@pytest.mark.parametrize("field", ["output_gate", "zero_centered", "shared_gate"])
def test_each_setting_changes_the_spec_hash(tmp_path, field):
    hashes = set()
    for gated in (False, True):
        text = spec_text("hash", False).replace(f"{field}: false", f"{field}: {str(gated).lower()}")
        path = tmp_path / f"{gated}.yaml"
        path.write_text(text)
        hashes.add(compile_spec(path).resolved.spec_hash)
    assert len(hashes) == 2
