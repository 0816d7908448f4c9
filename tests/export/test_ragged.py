"""A ragged batch through the exported graphs (`archgen export --attention-mask`): the prefill graph takes the
attention_mask of left-padded prompts, the caches carry each row's pads, and greedy decoding driven only by
onnxruntime gives every row the tokens `generate` gives it alone. ONNX only (the graphs are converted from the
torch.export programs, and loading a .pt2 back takes longer than the whole ONNX run); tests/export/test_graphs.py
checks both formats against eager for every spec.

Hymba+ at `tiny`: meta tokens (placed after each row's pads inside the graph), Mamba (its state skips the pads),
sliding-window attention with its ring buffer (4 + 9 + 14 positions pass the window of 16) and global attention.
"""

from __future__ import annotations

import pytest
import torch

from archgen.export import export_package
from archgen.export.onnx_export import onnx_session
from tests.conftest import build_package

pytestmark = pytest.mark.filterwarnings("ignore:.*LeafSpec.*:FutureWarning")  # torch.onnx's own deprecated internals

LENGTHS = (3, 9, 6)
NEW_TOKENS = 14


@pytest.fixture(scope="module")
def ragged_export(tmp_path_factory):
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("ragged")
    package = build_package("specs/hymba_plus.yaml", root / "package")
    torch.manual_seed(3)
    model = package.Model().eval()
    model.save_pretrained(root / "weights")
    result = export_package(package, root / "export", formats=("onnx",), weights=root / "weights", ragged=True,
                            max_len=40, max_batch=4)
    return package, model, result


def test_the_prefill_graph_takes_the_mask_and_the_caches_carry_the_pads(ragged_export):
    _, _, result = ragged_export
    graphs = result.manifest["graphs"]
    assert [i["name"] for i in graphs["prefill"]["inputs"]] == ["input_ids", "attention_mask"]
    assert {"name": "pads", "shape": ["batch"], "dtype": "int64"} in result.manifest["cache"]
    assert "past.pads" in [i["name"] for i in graphs["decode"]["inputs"]]
    checks = result.manifest["checks"]  # the export's own check ran a batch with a left-padded row
    assert checks["prefill"]["onnx"] < 1e-4 and checks["decode"]["onnx"] < 1e-4


def test_greedy_decoding_through_onnx_gives_each_row_its_own_tokens(ragged_export):
    _, model, result = ragged_export
    generator = torch.Generator().manual_seed(4)
    prompts = [torch.randint(1, 256, (n,), generator=generator) for n in LENGTHS]
    T = max(LENGTHS)
    input_ids = torch.stack([torch.cat([p.new_zeros(T - len(p)), p]) for p in prompts])
    attention_mask = torch.stack([torch.arange(T) >= T - len(p) for p in prompts]).long()
    manifest = result.manifest

    sessions = {g: onnx_session(result.files[g]["onnx"]) for g in ("prefill", "decode")}

    def run(graph, *inputs):
        names = [i["name"] for i in manifest["graphs"][graph]["inputs"]]
        outputs = sessions[graph].run(None, {n: t.numpy() for n, t in zip(names, inputs, strict=True)})
        return [torch.from_numpy(o) for o in outputs]

    logits, *caches = run("prefill", input_ids, attention_mask)
    position = T + manifest["meta_tokens"]
    tokens = []
    for step in range(NEW_TOKENS):
        token = logits[:, -1:].argmax(-1)  # (B, 1)
        tokens.append(token)
        if step + 1 < NEW_TOKENS:
            logits, *caches = run("decode", token, torch.tensor(position), *caches)
            position += 1
    decoded = torch.cat(tokens, dim=1)
    with torch.no_grad():
        for row, prompt in enumerate(prompts):
            alone = model.generate(prompt[None], NEW_TOKENS, temperature=0)[0, len(prompt):]
            assert torch.equal(decoded[row], alone), f"row {row}: {decoded[row].tolist()} != {alone.tolist()} alone"
