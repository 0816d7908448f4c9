"""Inputs an import must refuse, each with an error that names the field, tensor or file to fix, and nothing written."""

from __future__ import annotations

import json

import pytest
import torch
import yaml
from safetensors.torch import save_file

from archgen.errors import CompileError
from archgen.importers import import_hf
from tests.importers.hf_models import save_tiny

pytest.importorskip("transformers")

LLAMA = {
    "model_type": "llama",
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "vocab_size": 128,
    "rms_norm_eps": 1e-5,
    "hidden_act": "silu",
}


def import_config(tmp_path, fields):
    (tmp_path / "m").mkdir(exist_ok=True)
    (tmp_path / "m" / "config.json").write_text(json.dumps(fields))
    return import_hf(tmp_path / "m", tmp_path / "out")


def messages(error: CompileError) -> str:
    return "\n".join(d.render() for d in error.diagnostics)


def test_a_plain_llama_config_imports(tmp_path):
    assert import_config(tmp_path, LLAMA).n_params == 2 * 128 * 64 + 2 * (4 * 64 * 64 - 2 * 64 * 32 + 3 * 64 * 128 + 2 * 64) + 64


def test_unknown_model_type_names_the_types_that_import(tmp_path):
    with pytest.raises(CompileError) as error:
        import_config(tmp_path, {**LLAMA, "model_type": "gpt_neox"})
    assert "unknown model_type 'gpt_neox'" in messages(error.value) and "mixtral" in messages(error.value)
    assert not (tmp_path / "out").exists()


def test_a_model_type_the_spec_language_cannot_express_yet_says_what_blocks_it(tmp_path):
    with pytest.raises(CompileError) as error:
        import_config(tmp_path, {**LLAMA, "model_type": "zamba2"})
    assert "no weights shared between layers" in messages(error.value)


FALCON_H1 = {**LLAMA, "model_type": "falcon_h1", "mamba_d_ssm": 64, "mamba_n_heads": 4, "mamba_d_state": 8, "mamba_expand": 2}


@pytest.mark.parametrize(
    "field, value, expected",
    [
        ("projectors_bias", True, "biases in_proj and out_proj together"),
        ("mamba_n_heads", 3, "is not mamba_d_ssm = 64"),
        ("ssm_multipliers", [1.0, 2.0], "not a list of 5 multipliers (z, x, B, C, dt)"),
        ("key_multiplier", 0.0, "key_multiplier=0.0 is outside the spec language"),
    ],
)
def test_a_falcon_h1_setting_the_kinds_cannot_express_is_an_error_naming_it(tmp_path, field, value, expected):
    with pytest.raises(CompileError) as error:
        import_config(tmp_path, {**FALCON_H1, field: value})
    assert expected in messages(error.value)
    assert error.value.diagnostics[0].path == field


def test_falcon_h1_s_norm_before_the_gate_is_refused_naming_it(tmp_path):
    """FalconH1Config's default once mamba_rms_norm is on: RMSNorm(y)·SiLU(z), which the mamba2 kind does not compute."""
    with pytest.raises(CompileError) as error:
        import_config(tmp_path, {**FALCON_H1, "mamba_rms_norm": True})
    assert [d.path for d in error.value.diagnostics] == ["mamba_norm_before_gate"]
    assert "not RMSNorm(y)·SiLU(z)" in messages(error.value)


@pytest.mark.parametrize(
    "field, value, expected",
    [
        ("rope_scaling", {"rope_type": "dynamic", "factor": 8.0}, "its frequencies change with the length"),
        ("rope_scaling", {"rope_type": "llama3", "factor": 8.0}, "rope_scaling has no 'original_max_position_embeddings'"),
        ("rope_scaling", {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64, "truncate": False},
         "truncate: false"),
        ("hidden_act", "gelu", "hidden_act='gelu' is outside the spec language"),
        ("attention_dropout", 0.1, "no dropout"),
        ("some_new_switch", True, "'some_new_switch'"),
    ],
)
def test_a_field_outside_the_spec_language_is_an_error_naming_it(tmp_path, field, value, expected):
    with pytest.raises(CompileError) as error:
        import_config(tmp_path, {**LLAMA, field: value})
    assert expected in messages(error.value)
    assert error.value.diagnostics[0].path.startswith(field)


def test_a_clamped_mamba2_step_imports_as_bounds_on_delta(tmp_path):
    fields = {"model_type": "mamba2", "hidden_size": 64, "num_hidden_layers": 2, "vocab_size": 128, "state_size": 8,
              "num_heads": 8, "head_dim": 16, "n_groups": 2, "expand": 2, "layer_norm_epsilon": 1e-5,
              "time_step_limit": [0.001, 0.1]}
    spec = yaml.safe_load(import_config(tmp_path, fields).spec_path.read_text())
    assert spec["mixers"]["ssm"]["dt_floor"] == 0.001 and spec["mixers"]["ssm"]["dt_ceiling"] == 0.1
    with pytest.raises(CompileError) as error:
        import_config(tmp_path, {**fields, "time_step_limit": [0.1, 0.001]})
    assert [d.path for d in error.value.diagnostics] == ["time_step_limit"]


@pytest.mark.parametrize(("bounds", "expected"), [
    ({"time_step_min": 0.3}, {}),  # initialisation only (transformers < 5.25 floored Δ there)
    ({"time_step_limit": [0.3, 2.0]}, {"dt_floor": 0.3, "dt_ceiling": 2.0}),
    ({"mamba_dt_limit": [0.3, 1e9], "time_step_limit": [0.0, 1.0]}, {"dt_floor": 0.3, "dt_ceiling": 1e9}),  # legacy first
])
def test_nemotron_h_bounds_delta_by_its_time_step_limit(tmp_path, bounds, expected):
    fields = {"model_type": "nemotron_h", "hidden_size": 64, "vocab_size": 128, "layer_norm_epsilon": 1e-5,
              "hybrid_override_pattern": "M*-M", "num_attention_heads": 4, "mamba_num_heads": 8, "mamba_head_dim": 16,
              "ssm_state_size": 8, "n_groups": 1, "intermediate_size": 128, **bounds}
    ssm = yaml.safe_load(import_config(tmp_path, fields).spec_path.read_text())["mixers"]["ssm"]
    assert {key: ssm[key] for key in ("dt_floor", "dt_ceiling") if key in ssm} == expected


def test_nemotron_h_expert_layers_say_what_the_moe_kind_lacks(tmp_path):
    fields = {"model_type": "nemotron_h", "hidden_size": 64, "vocab_size": 128, "layer_norm_epsilon": 1e-5,
              "hybrid_override_pattern": "M*EM", "num_attention_heads": 4, "mamba_num_heads": 8, "mamba_head_dim": 16,
              "ssm_state_size": 8, "n_groups": 1}
    with pytest.raises(CompileError) as error:
        import_config(tmp_path, fields)
    assert "sigmoid scores with a correction bias" in messages(error.value)
    assert not (tmp_path / "out").exists()


@pytest.fixture
def sharded_llama(tmp_path):
    """A tiny llama saved as three shards with an index."""
    model = save_tiny("llama", tmp_path / "hf")
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    (tmp_path / "hf" / "model.safetensors").unlink()
    names = sorted(state)
    weight_map = {}
    for i, part in enumerate((names[:5], names[5:12], names[12:])):
        shard = f"model-{i + 1:05d}-of-00003.safetensors"
        save_file({n: state[n] for n in part}, str(tmp_path / "hf" / shard), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(part, shard))
    (tmp_path / "hf" / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return model, tmp_path / "hf"


def test_sharded_checkpoints_convert(sharded_llama, tmp_path):
    from safetensors import safe_open

    model, source = sharded_llama
    result = import_hf(source, tmp_path / "out", weights=True)
    with safe_open(str(result.weights / "model.safetensors"), "pt") as converted:
        assert torch.equal(converted.get_tensor("layers.1.ffn.up_proj.weight"), model.model.layers[1].mlp.up_proj.weight)


def test_missing_shard_is_named(sharded_llama, tmp_path):
    _, source = sharded_llama
    (source / "model-00002-of-00003.safetensors").unlink()
    with pytest.raises(CompileError) as error:
        import_hf(source, tmp_path / "out", weights=True)
    assert "model-00002-of-00003.safetensors listed in the index is missing" in messages(error.value)
    assert not (tmp_path / "out").exists()


def test_truncated_shard_is_named(sharded_llama, tmp_path):
    _, source = sharded_llama
    shard = source / "model-00003-of-00003.safetensors"
    shard.write_bytes(shard.read_bytes()[:-100])
    with pytest.raises(CompileError) as error:
        import_hf(source, tmp_path / "out", weights=True)
    assert "truncated" in messages(error.value) and "model-00003-of-00003" in messages(error.value)


def test_dtype_mismatch_with_the_config_is_an_error_unless_a_dtype_is_chosen(tmp_path):
    from safetensors import safe_open

    save_tiny("llama", tmp_path / "hf")
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    (tmp_path / "hf" / "config.json").write_text(json.dumps({**config, "dtype": "bfloat16"}))
    with pytest.raises(CompileError) as error:
        import_hf(tmp_path / "hf", tmp_path / "out", weights=True)
    assert "is float32, but the config declares dtype bfloat16" in messages(error.value)
    result = import_hf(tmp_path / "hf", tmp_path / "out", weights=True, dtype="bfloat16")
    with safe_open(str(result.weights / "model.safetensors"), "pt") as converted:
        assert converted.get_tensor("embed.weight").dtype == torch.bfloat16


def test_shape_mismatch_names_both_sides(tmp_path):
    save_tiny("llama", tmp_path / "hf")
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    (tmp_path / "hf" / "config.json").write_text(json.dumps({**config, "intermediate_size": 96}))
    with pytest.raises(CompileError) as error:
        import_hf(tmp_path / "hf", tmp_path / "out", weights=True)
    text = messages(error.value)
    assert (
        "model.layers.0.mlp.down_proj.weight (64, 128)" in text and "archgen's layers.0.ffn.down_proj.weight is (64, 96)" in text
    )


def test_granite_experts_are_converted_one_at_a_time_and_a_missing_expert_is_named(tmp_path):
    """Stacked experts are read by index and the shared MLP's halves by row span; a checkpoint with fewer experts
    than the config is an error naming the checkpoint tensor and archgen's parameter."""
    from safetensors import safe_open

    model = save_tiny("granitemoehybrid", tmp_path / "hf")
    result = import_hf(tmp_path / "hf", tmp_path / "out", weights=True)
    moe, shared = model.model.layers[1].block_sparse_moe, model.model.layers[1].shared_mlp
    with safe_open(str(result.weights / "model.safetensors"), "pt") as converted:
        assert torch.equal(converted.get_tensor("layers.1.ffn.w_in")[2], moe.experts.gate_up_proj[2].t())
        assert torch.equal(converted.get_tensor("layers.1.ffn.shared_expert.up_proj.weight"), shared.input_linear.weight[48:])
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    (tmp_path / "hf" / "config.json").write_text(json.dumps({**config, "num_local_experts": 5}))
    with pytest.raises(CompileError) as error:
        import_hf(tmp_path / "hf", tmp_path / "again", weights=True)
    assert "model.layers.0.block_sparse_moe.input_linear.weight (4, 64, 64)" in messages(error.value)
    assert "archgen's layers.0.ffn.w_in is (5, 64, 64)" in messages(error.value)
    assert not (tmp_path / "again").exists()


def test_qwen3_next_s_fused_projections_are_gathered_per_key_head_and_its_mtp_layers_skipped(tmp_path):
    """q, k, v and the gate z of Gated DeltaNet layer 0 come from the per-key-head blocks of in_proj_qkvz; a published
    checkpoint's multi-token-prediction tensors (mtp.*), which transformers does not load either, are skipped; a
    config whose value heads do not fit the checkpoint is an error naming the fused tensor."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    model = save_tiny("qwen3_next", tmp_path / "hf")
    checkpoint = tmp_path / "hf" / "model.safetensors"
    state = load_file(str(checkpoint))
    save_file({**state, "mtp.fc.weight": torch.zeros(64, 128)}, str(checkpoint), metadata={"format": "pt"})
    result = import_hf(tmp_path / "hf", tmp_path / "out", weights=True)
    fused = model.model.layers[0].linear_attn.in_proj_qkvz.weight.view(2, 16 + 16 + 16 + 16, 64)  # 2 key heads
    with safe_open(str(result.weights / "model.safetensors"), "pt") as converted:
        assert torch.equal(converted.get_tensor("layers.0.mixer.k_proj.weight"), fused[:, 16:32].reshape(32, 64))
        assert torch.equal(converted.get_tensor("layers.0.mixer.g_proj.weight"), fused[:, 48:].reshape(32, 64))
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    (tmp_path / "hf" / "config.json").write_text(json.dumps({**config, "linear_value_head_dim": 16}))
    with pytest.raises(CompileError) as error:
        import_hf(tmp_path / "hf", tmp_path / "again", weights=True)
    assert "model.layers.0.linear_attn.in_proj_qkvz.weight (128, 64)" in messages(error.value)
