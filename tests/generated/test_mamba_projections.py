"""Mamba-1's x_proj and dt_proj over a sequence when Δ's rank is not a multiple of 8 (Hymba+'s 100; its tiny preset's 4):
the products run with the rank padded by zero weights (sequence_projections), which changes neither Δ, B, C nor any
gradient; an aligned rank has no such method."""

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from tests.numerics import assert_close

ROOT = Path(__file__).resolve().parents[2]


def mamba_layer(model):
    return next(module for module in model.modules() if hasattr(module, "x_proj") and hasattr(module, "A_log"))


def test_padded_projections_equal_the_unpadded_products_and_their_gradients(build):
    package = build(ROOT / "specs/hymba_plus.yaml", "tiny")  # Δ rank 4, d_state 16: x_proj's 36 rows padded to 40
    torch.manual_seed(0)
    layer = mamba_layer(package.Model())
    rank, d_state, d_inner = layer.dt_proj.in_features, layer.A_log.size(1), layer.D.numel()
    x = torch.randn(2, 7, d_inner, requires_grad=True)
    dt, B_ssm, C_ssm = layer.sequence_projections(x)
    expected_dt, expected_B, expected_C = F.linear(x, layer.x_proj.weight).split([rank, d_state, d_state], dim=-1)
    expected_dt = F.linear(expected_dt, layer.dt_proj.weight)
    for name, value, expected in (("Δ", dt, expected_dt), ("B", B_ssm, expected_B), ("C", C_ssm, expected_C)):
        assert value.shape == expected.shape, name
        assert_close(value, expected, 1e-6, name)
    leaves = (x, layer.x_proj.weight, layer.dt_proj.weight)
    grads = [torch.randn_like(t) for t in (expected_dt, expected_B, expected_C)]
    got = torch.autograd.grad((dt, B_ssm, C_ssm), leaves, grads)
    want = torch.autograd.grad((expected_dt, expected_B, expected_C), leaves, grads)
    for name, value, expected in zip(("input", "x_proj.weight", "dt_proj.weight"), got, want, strict=True):
        assert value.shape == expected.shape, name
        assert_close(value, expected, 1e-6, f"{name} gradient")


@pytest.mark.parametrize("rank", [8, 100])
def test_only_an_unaligned_rank_pads(build, rank):
    package = build(ROOT / "specs/hymba_plus.yaml", "tiny", (f"mixers.ssm.dt_rank={rank}",))
    assert hasattr(mamba_layer(package.Model()), "sequence_projections") == (rank % 8 != 0)
