"""The exported graphs of every spec, reloaded from disk, against the eager model with the same weights.

The graphs were traced at batch 2 and a 16-token prompt; they are checked at other sizes (batch 1 and 3, prompts of
9 and 23 tokens, a single decode token), in both formats: the reloaded .pt2 program and onnxruntime on the CPU.
"""

from __future__ import annotations

import pytest
import torch

from archgen.export import TOLERANCE as EXPORT_TOLERANCE
from archgen.export.steps import cache_leaves, writing_kwargs
from tests.conftest import SPECS
from tests.numerics import relative_error

NAMES = [p.stem for p in SPECS]
FORMATS = ["pt2", "onnx"]
SIZES = [pytest.param(1, 9, id="B1-T9"), pytest.param(3, 23, id="B3-T23")]
TOLERANCE = EXPORT_TOLERANCE[torch.float32]  # what `archgen export` promises, float32


def assert_outputs_close(actual: list[torch.Tensor], expected: list[torch.Tensor], names: list[str], label: str):
    assert len(actual) == len(expected) == len(names), f"{label}: {len(actual)} outputs, expected {len(expected)}"
    errors = {name: relative_error(a, e) for name, a, e in zip(names, actual, expected, strict=True)}
    worst = max(errors, key=errors.get)
    assert errors[worst] < TOLERANCE, f"{label}: relative error {errors[worst]:.2e} in {worst}"


def eager_prefill(exp, prompt: torch.Tensor):
    """Logits and every cache tensor in manifest order, from the eager model with a max_len cache; and the cache."""
    cache = exp.model.empty_cache(prompt.size(0), exp.manifest["max_len"])
    with torch.no_grad():
        logits = exp.model(prompt, cache=cache, **writing_kwargs(exp.model)).logits  # a memory is written, as in the graphs
    return [logits, *cache_tensors(exp, cache)], cache


def cache_tensors(exp, cache) -> list[torch.Tensor]:
    leaves = dict(cache_leaves(cache))
    return [leaves[c["name"]] for c in exp.manifest["cache"]]


def output_names(exp, graph: str) -> list[str]:
    return [o["name"] for o in exp.manifest["graphs"][graph]["outputs"]]


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("batch,seq", SIZES)
@pytest.mark.parametrize("name", NAMES)
def test_prefill_matches_eager(exported, name, batch, seq, fmt):
    exp = exported(name)
    prompt = torch.randint(0, exp.manifest["vocab_size"], (batch, seq), generator=torch.Generator().manual_seed(seq))
    expected, _ = eager_prefill(exp, prompt)
    assert_outputs_close(exp.run("prefill", fmt, prompt), expected, output_names(exp, "prefill"), f"{name} prefill {fmt}")


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("seq", [2, 16, 32, 41])
def test_chunked_prefill_at_chunk_boundaries(exported, seq, fmt):
    """gated_deltanet_hybrid's chunked scan (chunks of 16 at tiny, traced at one) at the shortest prompt, exactly one
    and two chunks, and three with a tail (9 and 23 are above). Its ONNX graph once held the traced one chunk in its
    shapes: lowering the RMSNorm kernel re-traced the program without the export's shape semantics."""
    test_prefill_matches_eager(exported, "gated_deltanet_hybrid", 2, seq, fmt)


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("batch,seq", SIZES)
@pytest.mark.parametrize("name", NAMES)
def test_decode_step_matches_eager(exported, name, batch, seq, fmt):
    """One token against caches filled by an eager prefill, at position prompt + meta tokens; the inputs stay as
    they were (the graph is functional)."""
    exp = exported(name)
    generator = torch.Generator().manual_seed(100 + seq)
    prompt = torch.randint(0, exp.manifest["vocab_size"], (batch, seq), generator=generator)
    token = torch.randint(0, exp.manifest["vocab_size"], (batch, 1), generator=generator)
    (_, *filled), cache = eager_prefill(exp, prompt)
    past, snapshot = [t.clone() for t in filled], [t.clone() for t in filled]
    position = torch.tensor(seq + exp.manifest["meta_tokens"])
    actual = exp.run("decode", fmt, token, position, *past)
    with torch.no_grad():
        expected = [exp.model(token, cache=cache, **writing_kwargs(exp.model)).logits, *cache_tensors(exp, cache)]
    assert_outputs_close(actual, expected, output_names(exp, "decode"), f"{name} decode {fmt}")
    assert all(torch.equal(p, s) for p, s in zip(past, snapshot, strict=True)), "the decode graph wrote into its inputs"


@pytest.mark.parametrize("name", NAMES)
def test_greedy_generation_through_onnx_decode_steps(exported, name):
    """20 tokens generated only by onnxruntime (prefill graph, then decode steps fed their own caches) are the
    tokens of model.generate at temperature 0."""
    exp = exported(name)
    prompt = torch.randint(0, exp.manifest["vocab_size"], (2, 5), generator=torch.Generator().manual_seed(7))
    expected = exp.model.generate(prompt, max_new_tokens=20, temperature=0)  # writes the test-time memory, as the graphs do

    logits, *caches = exp.run("prefill", "onnx", prompt)
    position = prompt.size(1) + exp.manifest["meta_tokens"]
    tokens = [prompt]
    for step in range(20):
        token = logits[:, -1:].argmax(-1)  # (B, 1)
        tokens.append(token)
        if step < 19:
            logits, *caches = exp.run("decode", "onnx", token, torch.tensor(position), *caches)
            position += 1
    assert torch.equal(torch.cat(tokens, dim=1), expected)


@pytest.mark.parametrize("name", NAMES)
def test_manifest_describes_the_graphs(exported, name):
    exp = exported(name)
    manifest = exp.manifest
    assert manifest["spec_hash"] == exp.package.SPEC_HASH
    assert manifest["weights"]["source"].endswith("weights") and len(manifest["weights"]["sha256"]) == 64
    assert manifest["dtype"] == "float32" and manifest["onnx_opset"] >= 18
    meta = manifest["meta_tokens"]
    assert manifest["dynamic_dims"] == {"batch": {"min": 1, "max": 64},
                                        "seq": {"min": 1 if meta else 2, "max": manifest["max_len"] - meta}}
    # The cache layout is the model's own cache, with the batch dim symbolic.
    layout = [(name, ["batch", *t.shape[1:]], str(t.dtype).removeprefix("torch."))
              for name, t in cache_leaves(exp.model.empty_cache(1, manifest["max_len"]))]
    assert [(c["name"], c["shape"], c["dtype"]) for c in manifest["cache"]] == layout
    # The ONNX files have exactly the manifest's inputs and outputs, with its dim names.
    for graph in ("prefill", "decode"):
        session = exp.session(graph)
        for declared, actual in ((manifest["graphs"][graph]["inputs"], session.get_inputs()),
                                 (manifest["graphs"][graph]["outputs"], session.get_outputs())):
            assert [(v["name"], v["shape"]) for v in declared] == [(v.name, v.shape) for v in actual]
    assert manifest["graphs"]["prefill"]["files"] == {"pt2": "prefill.pt2", "onnx": "prefill.onnx"}
    assert manifest["onnx_weights"] == "weights.onnx.data"


@pytest.mark.parametrize("name", NAMES)
def test_onnx_graphs_share_one_copy_of_the_weights(exported, name):
    """Both .onnx files point into weights.onnx.data, which holds every weight once (plus alignment padding)."""
    import onnx

    exp = exported(name)
    weight_bytes = sum(t.numel() * t.element_size() for t in exp.model.state_dict().values())
    shared = (exp.directory / "weights.onnx.data").stat().st_size
    assert shared <= 1.1 * weight_bytes + 4096 * 64, f"weights.onnx.data holds {shared} bytes for {weight_bytes} bytes of weights"
    for graph in ("prefill", "decode"):
        proto = onnx.load(str(exp.directory / f"{graph}.onnx"), load_external_data=False)
        inline = [t.name for t in proto.graph.initializer if len(t.raw_data) >= 1024]
        assert not inline, f"{graph}.onnx stores {len(inline)} tensors of 1 KiB or more inline, e.g. {inline[:3]}"
        assert any(t.data_location == onnx.TensorProto.EXTERNAL for t in proto.graph.initializer)


@pytest.mark.parametrize("name", NAMES)
def test_kernels_stay_single_nodes_in_pt2_and_reference_ops_in_onnx(exported, name):
    """Each Mamba-1 layer's scan is one archgen_v1::selective_scan node of the .pt2 (its Triton kernel on a GPU); the ONNX
    graphs hold standard ops only (the op lowered to the reference scan)."""
    import onnx

    exp = exported(name)
    # the backbone's layers only: a JEPA head's target encoder copies them (c46977f) but prefill does not run it
    mamba1_layers = sum(1 for m in exp.model.layers.modules() if hasattr(m, "x_proj") and hasattr(m, "A_log"))
    kernels = getattr(exp.package.model, "kernels", None)
    kernels_available = getattr(kernels, "selective_scan", None) is not None
    program = torch.export.load(exp.directory / "prefill.pt2")  # after exp.package: the op is registered
    scans = [n for n in program.graph.nodes if str(n.target) == "archgen_v1.selective_scan.default"]
    assert len(scans) == (mamba1_layers if kernels_available else 0)
    for graph in ("prefill", "decode"):
        proto = onnx.load(str(exp.directory / f"{graph}.onnx"), load_external_data=False)
        assert {node.domain for node in proto.graph.node} <= {"", "ai.onnx"}, f"{graph}.onnx has non-standard ops"
