"""An imported Bamba (Mamba-2 + attention), Jamba (Mamba-1 + attention + MoE), Falcon-H1 (Mamba-2 beside attention in
every layer, muP multipliers) or Qwen3-Next (Gated DeltaNet + gated attention + MoE) hybrid exports to ONNX prefill and
decode-step graphs, and onnxruntime's greedy decoding, driven only by those graphs and their SSM, convolution and KV
caches, gives transformers' 20 tokens.
"""

from __future__ import annotations

import json

import pytest
import torch

from archgen.importers import import_hf
from tests.conftest import build_package
from tests.importers.hf_models import VOCAB, save_tiny

pytest.importorskip("transformers")
pytest.importorskip("onnxruntime")


@pytest.mark.parametrize("model_type", ["bamba", "jamba", "falcon_h1", "qwen3_next"])
def test_imported_hybrid_generates_transformers_tokens_through_onnxruntime(model_type, tmp_path):
    from archgen.export import export_package
    from archgen.export.onnx_export import onnx_session

    torch.set_num_threads(1)
    hf = save_tiny(model_type, tmp_path / "hf")
    imported = import_hf(tmp_path / "hf", tmp_path / "imported", weights=True)
    package = build_package(imported.spec_path, tmp_path / "generated", preset=None)
    result = export_package(
        package, tmp_path / "export", formats=("onnx",), weights=imported.weights, max_len=48, max_batch=4, check=False
    )
    manifest = json.loads((result.directory / "manifest.json").read_text())
    sessions = {graph: onnx_session(result.directory / f"{graph}.onnx") for graph in ("prefill", "decode")}

    def run(graph, *inputs):
        names = [i["name"] for i in manifest["graphs"][graph]["inputs"]]
        outputs = sessions[graph].run(None, {n: t.numpy() for n, t in zip(names, inputs, strict=True)})
        return [torch.from_numpy(o) for o in outputs]

    prompt = torch.randint(0, VOCAB, (2, 9), generator=torch.Generator().manual_seed(5))
    expected = hf.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=20, do_sample=False)
    logits, *caches = run("prefill", prompt)
    tokens, position = [prompt], prompt.size(1)
    for step in range(20):
        token = logits[:, -1:].argmax(-1)  # (B, 1)
        tokens.append(token)
        if step < 19:
            logits, *caches = run("decode", token, torch.tensor(position), *caches)
            position += 1
    assert torch.equal(torch.cat(tokens, dim=1), expected)
