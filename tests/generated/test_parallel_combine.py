"""A parallel layer's normalized mean (Hymba+): (scale_a × norm_a(a) + scale_b × norm_b(b)) / 2, with each scale
folded into its RMSNorm's weight, gives the output and every gradient of the formula as written; a LayerNorm model,
whose norm takes no scale, keeps the formula."""

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from tests.numerics import assert_close

ROOT = Path(__file__).resolve().parents[2]


def parallel_mixer(model):
    return next(module for module in model.modules() if hasattr(module, "attn_scale") and hasattr(module, "ssm_scale"))


@pytest.mark.parametrize("norm", ["rmsnorm", "layernorm"])
def test_the_combine_equals_the_normalized_mean_as_written(build, norm):
    package = build(ROOT / "specs/hymba_plus.yaml", "tiny", (f"model.norm.kind={norm}",))
    torch.manual_seed(0)
    mixer = parallel_mixer(package.Model())
    with torch.no_grad():
        for parameter in (mixer.attn_scale, mixer.ssm_scale, mixer.attn_norm.weight, mixer.ssm_norm.weight):
            parameter.copy_(torch.randn_like(parameter))
    x, positions = torch.randn(2, 9, 64, requires_grad=True), torch.arange(9)
    y = mixer(x, positions)
    attn_out, ssm_out = mixer.attn(x, positions), mixer.ssm(x, positions)
    expected = (mixer.attn_scale * mixer.attn_norm(attn_out) + mixer.ssm_scale * mixer.ssm_norm(ssm_out)) / 2
    if norm == "rmsnorm":  # the norm as a formula, not the module that now takes the scale
        expected_attn = F.rms_norm(attn_out, (64,), mixer.attn_norm.weight, mixer.attn_norm.eps)
        expected_ssm = F.rms_norm(ssm_out, (64,), mixer.ssm_norm.weight, mixer.ssm_norm.eps)
        expected = (mixer.attn_scale * expected_attn + mixer.ssm_scale * expected_ssm) / 2
    assert_close(y, expected, 1e-6, "output")
    leaves = (x, mixer.attn_scale, mixer.ssm_scale, mixer.attn_norm.weight, mixer.ssm_norm.weight)
    names = ("input", "attn_scale", "ssm_scale", "attn_norm.weight", "ssm_norm.weight")
    grad = torch.randn_like(y)
    got, want = torch.autograd.grad(y, leaves, grad), torch.autograd.grad(expected, leaves, grad)
    for name, value, reference in zip(names, got, want, strict=True):
        assert_close(value, reference, 1e-5, f"{name} gradient")


def test_without_a_gradient_the_combine_is_one_kernel_that_equals_the_norms(build, monkeypatch):
    """Decoding (no gradient): the two norms, scales and the mean in one launch of kernels/normalized_mean.py (here in
    Triton's interpreter), equal to the training form's fused norms."""
    pytest.importorskip("triton")
    monkeypatch.setenv("ARCHGEN_TRITON_ON_CPU", "1")
    package = build(ROOT / "specs/hymba_plus.yaml", "tiny")
    if package.kernels.normalized_mean is None:
        pytest.skip("triton did not import")
    calls = []
    combine = package.kernels.normalized_mean
    monkeypatch.setattr(package.kernels, "normalized_mean", lambda *args: calls.append(1) or combine(*args))
    monkeypatch.setattr(package.model, "use_kernel", lambda kernel, x: kernel is package.kernels.normalized_mean)
    torch.manual_seed(0)
    mixer = parallel_mixer(package.Model())
    with torch.no_grad():
        for parameter in (mixer.attn_scale, mixer.ssm_scale, mixer.attn_norm.weight, mixer.ssm_norm.weight):
            parameter.copy_(torch.randn_like(parameter))
    x, positions = torch.randn(2, 9, 64), torch.arange(9)
    expected = mixer(x, positions)  # with gradients enabled: the norms
    assert not calls
    with torch.no_grad():
        y = mixer(x, positions)
    assert len(calls) == 1
    assert_close(y, expected, 1e-5, "output")
