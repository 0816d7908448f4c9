"""Every SSM kernel a generated Mamba-2 model selects (causal conv1d + SiLU, SSD scan, decode step) gives the model the
same logits, gradients and cached decoding as its reference ops (Mamba-1's three: tests/generated/test_kernels.py).

The kernels run in Triton's interpreter on CPU tensors (tests/conftest.py sets TRITON_INTERPRET=1), so the model is
one tiny layer; the kernels' own numerics at odd sizes are in tests/kernels/. A spy counts the kernel calls, so a model
that silently fell back to its references fails here.
"""

from __future__ import annotations

import math
import textwrap

import pytest
import torch

from tests.conftest import assert_kernels_match_references, build_spied_package, decode_in_steps
from tests.numerics import assert_close

# 4 heads of 8 in 2 B/C groups (2 heads per group), chunks of 16 over 19 positions: a partial last chunk.
SMALL_MAMBA2 = textwrap.dedent("""\
    schema_version: 1
    name: small_mamba2
    model: {d_model: 16, vocab_size: 64, max_seq_len: 64, norm: {kind: rmsnorm, eps: 1.0e-5}}
    mixers:
      ssm: {kind: mamba2, n_heads: 4, head_dim: 8, n_groups: 2, d_state: 8, d_conv: 4, expand: 2, chunk_size: 16}
    ffns:
      mlp: {kind: mlp, activation: swiglu, hidden: 32}
    layout: {mixers: ssm, ffns: mlp}
    """)
KERNEL_FUNCTIONS = ("causal_conv1d", "ssd_scan", "mamba2_step")
# what the model calls: the decoding step writes the SSM state in place (mamba2_step_, over mamba2_step's kernel)
SPIED = ("causal_conv1d", "ssd_scan", "state_update_module.mamba2_step_")


@pytest.fixture
def package(tmp_path, monkeypatch):
    """The built package, its kernels spied on: package.calls counts each kernel function's calls."""
    spec = tmp_path / "spec.yaml"
    spec.write_text(SMALL_MAMBA2)
    return build_spied_package(spec, tmp_path / "out", monkeypatch, SPIED)


def test_kernels_and_references_give_the_same_logits_and_gradients(package):
    torch.manual_seed(0)
    model = package.Model()
    tokens = torch.randint(0, 64, (2, 20))
    assert_kernels_match_references(package, model, tokens)
    assert package.calls["causal_conv1d"] == package.calls["ssd_scan"] == 1, package.calls


def test_cached_decoding_with_kernels_equals_the_full_forward(package):
    """A kernel prefill hands its conv and SSM states to the kernel decode steps; the logits match one full pass."""
    torch.manual_seed(1)
    model = package.Model().eval()
    tokens = torch.randint(0, 64, (2, 20))
    with torch.no_grad():
        package.model.USE_KERNELS = False
        full = model(tokens).logits
        package.model.USE_KERNELS = True
    cached = decode_in_steps(model, tokens, prefill=17)
    assert package.calls["mamba2_step_"] == 3 and package.calls["causal_conv1d"] == 1, package.calls
    assert_close(cached, full, 1e-5, "cached logits")


def test_every_kernel_op_lowers_to_its_reference_op_for_onnx(package):
    """kernels.decompositions() covers each custom op the model can put in an exported graph, and the decode step's
    lowering (ops/ssd.py's mamba2_step) computes what its kernel computes."""
    table = package.kernels.decompositions()
    assert {f"archgen_v1.{name}.default" for name in KERNEL_FUNCTIONS} <= {str(op) for op in table}  # (+ RMSNorm's)
    torch.manual_seed(2)
    channels = 4 * 8 + 2 * 2 * 8
    args = (torch.randn(2, 32), torch.randn(2, channels), torch.randn(2, 4), torch.randn(2, channels, 3),
            torch.randn(channels, 4), torch.randn(channels), torch.randn(2, 4, 8, 8), torch.randn(4), torch.randn(4),
            torch.randn(4), 0.0, math.inf, 2)
    step = torch.ops.archgen_v1.mamba2_step.default
    lowered = table[step](*args)
    expected = step(*args)  # the kernel, in the interpreter
    for got, want, name in zip(lowered, expected, ("y", "conv_state", "ssm_state"), strict=True):
        assert_close(got, want, 1e-5, name)
