"""templates/runtime/norm.py, the generated RMSNorm's reference op: the definition, and with the residual stream the
pair (norm(x + residual), x + residual) that the fused kernel (kernels/rmsnorm.py) must reproduce."""

import torch

from templates.runtime import norm
from tests.numerics import assert_close


def test_rms_norm_is_the_definition_and_the_residual_form_adds_first():
    g = torch.Generator().manual_seed(0)
    x, residual = torch.randn(3, 5, 16, generator=g), torch.randn(3, 5, 16, generator=g)
    weight = 1 + 0.1 * torch.randn(16, generator=g)
    x64 = x.double()
    expected = x64 * torch.rsqrt(x64.pow(2).mean(-1, keepdim=True) + 1e-6) * weight.double()
    assert_close(norm.rms_norm(x, weight, 1e-6), expected, 1e-6)
    y, s = norm.rms_norm(x, weight, 1e-6, residual)
    assert torch.equal(s, x + residual)
    assert torch.equal(y, norm.rms_norm(x + residual, weight, 1e-6))
