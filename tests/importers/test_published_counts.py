"""At the published sizes, the imported spec has exactly the parameters transformers builds (on the meta device).

The fixtures in published/ are the config.json fields of Meta-Llama-3-8B, Llama-3.1-8B and Llama-3.2-1B (llama3
RoPE), Mistral-7B-v0.1, Qwen2-7B, Qwen3-8B, Mixtral-8x7B-v0.1, Jamba-v0.1, mamba-2.8b-hf, a mamba2-2.7b in
transformers' format, Bamba-9B, Nemotron-H-8B (older config spellings: hybrid_override_pattern,
attention_head_dim), Falcon-H1-0.5B (with the fields transformers 5 no longer reads, attn_layer_indices and
mamba_use_mlp) and Qwen3-Next-80B-A3B (full_attention_interval rather than layer_types), written from their published
numbers; and Granite-4.0-H-Tiny (MoE) and -Micro (dense), whose
shapes follow the published model cards (not compared with the hub files here, so no known count is asserted).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from archgen.importers.config import HFConfig
from archgen.importers.hf_import import dump_spec, spec_document
from archgen.passes.cost import cost_report
from archgen.pipeline import compile_spec

pytest.importorskip("transformers")

PUBLISHED = sorted((Path(__file__).parent / "published").glob("*.json"))
KNOWN = {
    "llama3_8b": 8_030_261_248,
    "llama3_1_8b": 8_030_261_248,
    "llama3_2_1b": 1_235_814_400,
    "mamba_2p8b": 2_768_345_600,
    "mistral_7b_v0_1": 7_241_732_096,
    "nemotron_h_8b": 8_100_852_736,
    "qwen3_next_80b_a3b": 79_674_391_296,  # its safetensors total (Qwen3-Coder-Next has the same shapes)
}


@pytest.mark.parametrize("path", PUBLISHED, ids=[p.stem for p in PUBLISHED])
def test_inspect_count_equals_transformers_num_parameters(path, tmp_path):
    from transformers import AutoConfig, AutoModelForCausalLM

    fields = json.loads(path.read_text())
    spec = tmp_path / "spec.yaml"
    spec.write_text(dump_spec(spec_document(HFConfig(fields, str(path)), path.stem, str(path))))
    archgen_count = cost_report(compile_spec(spec).ir).total_params

    with torch.device("meta"):
        hf = AutoModelForCausalLM.from_config(AutoConfig.for_model(**fields))
    assert archgen_count == hf.num_parameters()
    if path.stem in KNOWN:
        assert archgen_count == KNOWN[path.stem]


def test_bamba_rotates_half_of_each_head_without_a_field_saying_so():
    """BambaConfig fixes partial_rotary_factor at 0.5; the published config does not carry it."""
    path = Path(__file__).parent / "published" / "bamba_9b.json"
    document = spec_document(HFConfig(json.loads(path.read_text()), str(path)), "bamba_9b", str(path))
    assert document["mixers"]["attn"]["rope"] == {"theta": 10000.0, "rotary_dim": 64}
