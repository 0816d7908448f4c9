"""The kernels a generated Gated DeltaNet model selects give it the logits, gradients and cached decoding of its
reference ops: the fused causal conv1d + SiLU and the chunked gated delta rule (kernels/gated_delta_rule.py), both
with backward kernels, in training and inference, and the one-token decode step.

The kernels run in Triton's interpreter on CPU tensors (tests/conftest.py sets TRITON_INTERPRET=1), so the model is
one tiny layer; the kernels' own numerics at odd sizes are in tests/kernels/. A spy counts the kernel calls, so a
model that silently fell back to its references fails here.
"""

from __future__ import annotations

import textwrap

import pytest
import torch

from tests.conftest import assert_kernels_match_references, build_spied_package, decode_in_steps
from tests.numerics import assert_close

# 2 key heads read by 4 value heads of 16, chunks of 16 over 19 positions: a partial last chunk.
SMALL_GATED_DELTANET = textwrap.dedent("""\
    schema_version: 1
    name: small_gated_deltanet
    model: {d_model: 32, vocab_size: 64, max_seq_len: 64, norm: {kind: rmsnorm, eps: 1.0e-5}}
    mixers:
      gdn: {kind: gated_deltanet, n_heads: 2, n_v_heads: 4, head_dim: 16, head_v_dim: 16, chunk_size: 16}
    ffns:
      mlp: {kind: mlp, activation: swiglu, hidden: 64}
    layout: {mixers: gdn, ffns: mlp}
    """)
KERNEL_FUNCTIONS = ("causal_conv1d", "gated_delta_rule", "gated_delta_step")


@pytest.fixture
def package(tmp_path, monkeypatch):
    """The built package, its kernels spied on: package.calls counts each kernel function's calls."""
    spec = tmp_path / "spec.yaml"
    spec.write_text(SMALL_GATED_DELTANET)
    return build_spied_package(spec, tmp_path / "out", monkeypatch, KERNEL_FUNCTIONS)


def test_inference_with_the_kernel_gives_the_reference_logits(package):
    torch.manual_seed(0)
    model = package.Model().eval()
    tokens = torch.randint(0, 64, (2, 19))
    with torch.no_grad():
        package.model.USE_KERNELS = False
        expected = model(tokens).logits
        package.model.USE_KERNELS = True
        actual = model(tokens).logits
    assert package.calls["gated_delta_rule"] == package.calls["causal_conv1d"] == 1, package.calls
    assert_close(actual, expected, 1e-5, "logits")


def test_training_takes_both_kernels_with_the_references_gradients(package):
    """With grad mode on the layer runs the conv kernel and the chunked rule's kernel, forward and backward: logits and
    every gradient as with the references alone."""
    torch.manual_seed(1)
    model = package.Model()
    tokens = torch.randint(0, 64, (2, 20))
    assert_kernels_match_references(package, model, tokens)
    assert package.calls["causal_conv1d"] == 1 and package.calls["gated_delta_rule"] == 1, package.calls


def test_cached_decoding_after_a_kernel_prefill_equals_the_full_forward(package):
    """The kernel's prefill hands its final state to the kernel's decode steps; the logits match one full pass."""
    torch.manual_seed(2)
    model = package.Model().eval()
    tokens = torch.randint(0, 64, (2, 20))
    with torch.no_grad():
        package.model.USE_KERNELS = False
        full = model(tokens).logits
        package.model.USE_KERNELS = True
    cached = decode_in_steps(model, tokens, prefill=17)
    assert package.calls["gated_delta_rule"] == 1 and package.calls["gated_delta_step"] == 3, package.calls
    assert package.calls["causal_conv1d"] == 4, package.calls
    assert_close(cached, full, 1e-5, "cached logits")


def test_every_kernel_op_lowers_to_its_reference_op_for_onnx(package):
    table = {str(op) for op in package.kernels.decompositions()}
    assert {f"archgen_v1.{name}.default" for name in KERNEL_FUNCTIONS} <= table
