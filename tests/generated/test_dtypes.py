"""Every generated package runs in float64 (for gradient checks), float32, bfloat16 and float16: a forward pass and a
cached decode step at the tiny preset, with finite outputs of the model's dtype that agree with float64."""

from __future__ import annotations

import pytest
import torch

from tests.conftest import SPECS

DTYPES = [torch.float64, torch.float32, torch.bfloat16, torch.float16]
# Relative error of the last decode step's logits against the float64 run: the unit roundoff of the dtype, amplified
# by a few layers of tiny random weights.
TOLERANCE = {torch.float64: 1e-10, torch.float32: 1e-4, torch.bfloat16: 0.15, torch.float16: 0.05}


@pytest.fixture(scope="module")
def packages(tmp_path_factory):
    from archgen.testing import build_generated

    root = tmp_path_factory.mktemp("dtypes")
    return {spec.stem: build_generated(spec, root)[0] for spec in SPECS}


def forward_and_decode(package, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    model = package.Model().eval()
    model.to(dtype)
    tokens = torch.randint(0, 256, (2, 9))
    with torch.no_grad():
        full = model(tokens).logits
        cache = model.empty_cache(2, 32)
        model(tokens[:, :8], cache=cache)
        step = model(tokens[:, 8:], cache=cache).logits
    return full, step


@pytest.mark.parametrize("dtype", DTYPES, ids=[str(d).removeprefix("torch.") for d in DTYPES])
@pytest.mark.parametrize("spec", [s.stem for s in SPECS])
def test_forward_and_a_decode_step_run_in_every_dtype(packages, spec, dtype):
    full, step = forward_and_decode(packages[spec], dtype)
    assert full.dtype == dtype and step.dtype == dtype
    assert torch.isfinite(full).all() and torch.isfinite(step).all()
    reference_full, reference_step = forward_and_decode(packages[spec], torch.float64)
    scale = reference_full.abs().max()
    assert (step.double() - reference_step).abs().max() / scale < TOLERANCE[dtype]
    assert (full.double() - reference_full).abs().max() / scale < TOLERANCE[dtype]
