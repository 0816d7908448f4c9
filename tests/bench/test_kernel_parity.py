"""bench/kernel_parity.py's checks on a CPU in bfloat16 (the GPU's dtype; its dry run is float32): the verdict against
a float32 pass of the references, the per-spec sizes of the parity check, and decode after a parity check whose
float32 pass ran out of memory (gpu9/call1: HNS's decode then failed on a bf16 input and a float32 expert weight).
The models run their reference ops here (use_kernel is false for CPU tensors): what is tested is the bench."""

from __future__ import annotations

import weakref

import pytest
import torch

from bench.harness import ROOT, load_module
from tests.conftest import build_package

SIZES = {"device": "cpu", "dtype": "bfloat16", "batch": 2, "length": 12, "prompt": 5, "new_tokens": 3, "tolerance": 1e-2}


@pytest.fixture(scope="module")
def kernel_parity():
    with pytest.MonkeyPatch.context() as patch:
        patch.syspath_prepend(str(ROOT / "bench"))  # the script imports its sibling `harness` as a script does
        yield load_module("kernel_parity", "bench/kernel_parity.py")


@pytest.fixture(scope="module")
def hns(tmp_path_factory):
    """Tiny HNS (Mamba-1, attention, MoE, JEPA and Medusa heads): the spec whose decode failed."""
    return build_package(ROOT / "specs/hns_ss_jepa_moe.yaml", tmp_path_factory.mktemp("hns"), "tiny",
                         ("model.d_model=32", "layout.n_layers=2", "layout.mixers=ssm, attn"))


def bf16_model(package):
    torch.manual_seed(0)
    return package.Model().to(torch.bfloat16)


def test_parity_and_decode_in_bf16_with_the_parity_checks_own_batch(kernel_parity, hns):
    model = bf16_model(hns)
    results = kernel_parity.run_checks(hns, model, SIZES, kernel_parity.spy_on_kernels(hns), {"batch": 1})
    parity, decode = results["parity"], results["decode"]
    assert (parity["batch"], decode["batch"]) == (1, 2)
    assert parity["pass"] and decode["pass"], results
    # the same ops on both sides: identical, and both as far from the float32 pass
    assert parity["logits_relative_norm_error"] == 0 and parity["gradients_compared"] > 0
    float32 = parity["against_float32"]["logits"]
    assert 0 < float32["kernels"] == float32["references"] < 0.05
    assert set(parity["passes"]) == {"kernels", "references", "float32"}
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}


def test_decode_after_a_float32_pass_that_ran_out_of_memory(kernel_parity, hns, monkeypatch):
    """The failed pass's activations stay allocated while its error is in flight (its traceback holds their frames):
    converting the model back then runs out of memory too, part-way, so the model must be converted back only once
    the error is dropped, and decode must run on the model in its own dtype."""
    model = bf16_model(hns)
    held = []  # the failed pass's memory, alive while its error is
    forward_backward = kernel_parity._forward_backward

    def failing_in_float32(package, model, *args):
        if next(model.parameters()).dtype == torch.float32:
            activations = torch.empty(8)
            held.append(weakref.ref(activations))
            raise torch.OutOfMemoryError("CUDA out of memory (the float32 pass's activations)")
        return forward_backward(package, model, *args)

    to = model.to

    def out_of_memory_while_held(*args, **kwargs):
        if any(ref() is not None for ref in held):
            parameters = list(model.parameters())
            for p in parameters[: len(parameters) // 2]:  # converted until the memory ran out
                p.data = p.data.to(torch.bfloat16)
            raise torch.OutOfMemoryError("CUDA out of memory (converting back)")
        return to(*args, **kwargs)

    monkeypatch.setattr(kernel_parity, "_forward_backward", failing_in_float32)
    monkeypatch.setattr(model, "to", out_of_memory_while_held)
    results = kernel_parity.run_checks(hns, model, SIZES, kernel_parity.spy_on_kernels(hns))
    assert "error" not in results["decode"] and results["decode"]["pass"], results["decode"].get("error")
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    # the error parity reports is the pass's own, not one of converting back
    assert held and results["parity"]["error"].startswith("OutOfMemoryError: CUDA out of memory (the float32 pass's")
    assert not results["parity"]["pass"] and "model_not_restored" not in results["parity"]


def test_a_model_that_cannot_be_put_back_is_not_decoded(kernel_parity, hns, monkeypatch):
    model = bf16_model(hns)
    monkeypatch.setattr(kernel_parity, "_restore", lambda model, dtypes: "OutOfMemoryError: converting back")
    results = kernel_parity.run_checks(hns, model, SIZES, kernel_parity.spy_on_kernels(hns))
    assert results["parity"]["model_not_restored"] == "OutOfMemoryError: converting back"
    assert not results["decode"]["pass"] and results["decode"]["error"].startswith("not run: after parity")
