"""`archgen export-spec`: a spec that is exactly a transformers model type becomes its config.json and checkpoint,
which transformers loads and runs to the same logits; importing the exported config gives the same spec hash."""

from __future__ import annotations

import pytest
import torch

from archgen.errors import CompileError
from archgen.importers import export_spec, import_hf
from archgen.pipeline import compile_spec
from tests.conftest import build_package
from tests.importers.hf_models import VOCAB, save_tiny

pytest.importorskip("transformers")

EXPORTABLE = ["llama", "mistral", "mixtral", "mamba", "mamba2", "bamba", "jamba", "llama-rope_llama3"]


@pytest.mark.parametrize("case", EXPORTABLE)
def test_exported_checkpoint_loads_in_transformers_and_reimports_to_the_same_hash(case, tmp_path):
    from transformers import AutoModelForCausalLM

    original = save_tiny(case, tmp_path / "hf", **({"attention_bias": False, "mlp_bias": False} if case == "llama" else {}))
    imported = import_hf(tmp_path / "hf", tmp_path / "imported", weights=True, name="roundtrip")
    exported = export_spec(imported.spec_path, tmp_path / "exported", weights=imported.weights)
    assert exported.model_type == case.split("-")[0]

    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "exported").eval()
    prompts = torch.randint(0, VOCAB, (2, 19), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        expected = original(prompts).logits
        assert ((reloaded(prompts).logits - expected).abs().max() / expected.abs().max()).item() < 1e-5

    again = import_hf(tmp_path / "exported", tmp_path / "reimported", name="roundtrip")
    assert again.spec_hash == imported.spec_hash


HAND_WRITTEN = """\
schema_version: 1
name: hybrid
model: {d_model: 64, vocab_size: 96, norm: {kind: rmsnorm, eps: 1.0e-6}, max_seq_len: 512}
mixers:
  ssm: {kind: mamba2, head_dim: 16, d_state: 16, chunk_size: 32}
  attn: {kind: attention, n_heads: 4, n_kv_heads: 1, rope: {theta: 50000, rotary_dim: 4}}
ffns:
  mlp: {kind: mlp, activation: swiglu, hidden: 160}  # a multiplier would hash differently: resolve keeps multiple_of
layout: {n_layers: 6, mixers: "(ssm*2, attn)*2", ffns: mlp}
"""


def test_a_model_trained_with_archgen_loads_in_transformers_and_round_trips(tmp_path):
    """A hand-written Mamba-2/attention hybrid (partial RoPE, GQA) is a Bamba: its weights load in transformers."""
    from transformers import AutoModelForCausalLM

    spec = tmp_path / "hybrid.yaml"
    spec.write_text(HAND_WRITTEN)
    torch.manual_seed(0)
    model = build_package(spec, tmp_path / "generated", preset=None).Model().eval()
    model.save_pretrained(tmp_path / "trained")
    assert export_spec(spec, tmp_path / "hf", weights=tmp_path / "trained").model_type == "bamba"
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    prompts = torch.randint(0, 96, (1, 40), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        expected = model(prompts).logits
        assert ((reloaded(prompts).logits - expected).abs().max() / expected.abs().max()).item() < 1e-4
    assert import_hf(tmp_path / "hf", tmp_path / "back", name="hybrid").spec_hash == compile_spec(spec).resolved.spec_hash


def test_a_spec_that_is_no_transformers_model_type_gets_the_reasons(tmp_path):
    spec = tmp_path / "hybrid.yaml"
    spec.write_text(HAND_WRITTEN.replace("activation: swiglu", "activation: gelu"))
    with pytest.raises(CompileError) as error:
        export_spec(spec, tmp_path / "hf")
    assert "bamba's feed-forward is a SwiGLU MLP" in str(error.value)
    assert not (tmp_path / "hf").exists()


@pytest.mark.parametrize(
    "change, reason",
    [
        (("ssm: {kind: mamba2,", "ssm: {kind: mamba2, output_norm: false,"), "mixers.ssm: output_norm is False"),
        (("ssm: {kind: mamba2,", "ssm: {kind: mamba2, d_inner: 96,"), "mixers.ssm: d_inner is 96, not expand·d_model = 128"),
        (("attn: {kind: attention,", "attn: {kind: attention, output_gate: true,"), "mixers.attn: output_gate is True"),
        (("activation: swiglu,", "activation: swiglu, output_multiplier: 0.5,"), "ffns.mlp: output_multiplier is 0.5"),
        (("eps: 1.0e-6}", "eps: 1.0e-6, zero_centered: true}"), "the model's norm is zero-centred"),
    ],
)
def test_falcon_h1_and_qwen3_next_settings_are_not_exported_as_a_model_type_without_them(tmp_path, change, reason):
    spec = tmp_path / "hybrid.yaml"
    spec.write_text(HAND_WRITTEN.replace(*change))
    with pytest.raises(CompileError) as error:
        export_spec(spec, tmp_path / "hf")
    assert reason in str(error.value)
