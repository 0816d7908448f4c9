"""The Gated DeltaNet kernel a generated model selects (kernels/gated_delta_rule.py) gives the model the logits and the
cached decoding of its reference op, runs wherever no gradient is needed, and never while training.

The kernels run in Triton's interpreter on CPU tensors (tests/conftest.py sets TRITON_INTERPRET=1), so the model is
one tiny layer; the kernels' own numerics at odd sizes are in tests/kernels/test_gated_delta_rule.py. A spy counts
the kernel calls, so a model that silently fell back to its reference fails here.
"""

from __future__ import annotations

import textwrap
from collections import Counter

import pytest
import torch

from tests.conftest import build_package
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


@pytest.fixture
def package(tmp_path, monkeypatch):
    """The built package, its Gated DeltaNet kernel spied on: package.calls counts its calls."""
    pytest.importorskip("triton")
    monkeypatch.setenv("ARCHGEN_TRITON_ON_CPU", "1")  # the kernels in Triton's interpreter, not their CPU fallbacks
    spec = tmp_path / "spec.yaml"
    spec.write_text(SMALL_GATED_DELTANET)
    package = build_package(spec, tmp_path / "out", preset=None)
    if package.kernels.gated_delta_rule is None:
        pytest.skip("triton did not import")
    if not torch.cuda.is_available():  # the kernels take CPU tensors only in Triton's interpreter
        monkeypatch.setattr(package.model, "use_kernel",
                            lambda kernel, x: package.model.USE_KERNELS and kernel is not None)
    package.calls = Counter()
    kernel = package.kernels.gated_delta_rule

    def counted(*args, **kwargs):
        package.calls["gated_delta_rule"] += 1
        return kernel(*args, **kwargs)

    monkeypatch.setattr(package.kernels, "gated_delta_rule", counted)
    return package


def test_inference_with_the_kernel_gives_the_reference_logits(package):
    torch.manual_seed(0)
    model = package.Model().eval()
    tokens = torch.randint(0, 64, (2, 19))
    with torch.no_grad():
        package.model.USE_KERNELS = False
        expected = model(tokens).logits
        package.model.USE_KERNELS = True
        actual = model(tokens).logits
    assert package.calls["gated_delta_rule"] == 1, package.calls
    assert_close(actual, expected, 1e-5, "logits")


def test_training_runs_the_reference_so_gradients_exist(package):
    """With grad mode on the layer takes the reference (the kernels are forward-only): the loss backpropagates."""
    torch.manual_seed(1)
    model = package.Model()
    tokens = torch.randint(0, 64, (2, 20))
    model(tokens[:, :-1], targets=tokens[:, 1:]).loss.backward()
    assert package.calls["gated_delta_rule"] == 0, package.calls
    assert model.layers[0].mixer.A_log.grad is not None


def test_cached_decoding_after_a_kernel_prefill_equals_the_full_forward(package):
    """The kernel's prefill hands its final state to the decode steps; the logits match one full pass."""
    torch.manual_seed(2)
    model = package.Model().eval()
    tokens = torch.randint(0, 64, (2, 20))
    with torch.no_grad():
        package.model.USE_KERNELS = False
        full = model(tokens).logits
        package.model.USE_KERNELS = True
        cache = model.empty_cache(2, 20)
        steps = [model(tokens[:, :17], cache=cache).logits]
        steps += [model(tokens[:, t : t + 1], cache=cache).logits for t in range(17, 20)]
    assert package.calls["gated_delta_rule"] == 1, package.calls
    assert_close(torch.cat(steps, dim=1), full, 1e-5, "cached logits")


def test_the_kernel_lowers_to_the_reference_op_for_onnx(package):
    assert "archgen_v1.gated_delta_rule.default" in {str(op) for op in package.kernels.decompositions()}
