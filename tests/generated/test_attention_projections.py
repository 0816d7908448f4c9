"""Attention's q, k and v where a backward follows: one product on the three weights stacked (Hymba+'s k and v alone
are 320-column GEMMs), the same outputs and gradients as the three projections, which inference and a
tensor-parallel split (`tensor_parallel`: each projection's module splits and reduces) keep."""

from pathlib import Path

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from tests.numerics import assert_close

ROOT = Path(__file__).resolve().parents[2]


class CountProducts(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.products = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.products += func in (torch.ops.aten.mm.default, torch.ops.aten.addmm.default)
        return func(*args, **(kwargs or {}))


def attention_layer(model):
    return next(module for module in model.modules() if hasattr(module, "q_proj") and hasattr(module, "tp_plan"))


def run(layer, x, positions):
    counter = CountProducts()
    with counter:
        y = layer(x, positions)
    return y, counter.products


@pytest.mark.parametrize("spec", ["specs/hymba_plus.yaml", "specs/gated_deltanet_hybrid.yaml"])  # GQA + window; qk-norm
def test_one_stacked_product_gives_the_three_projections_and_their_gradients(build, spec):
    package = build(ROOT / spec, "tiny")
    torch.manual_seed(0)
    layer = attention_layer(package.Model())
    x = torch.randn(2, 9, layer.q_proj.in_features, requires_grad=True)
    positions = torch.arange(9)
    stacked, products = run(layer, x, positions)
    assert products == 2, "q, k and v as one product, then o_proj"
    leaves = (x, layer.q_proj.weight, layer.k_proj.weight, layer.v_proj.weight)
    grad = torch.randn_like(stacked)
    got = torch.autograd.grad(stacked, leaves, grad)

    layer.tensor_parallel = True  # as split_tensor_parallel marks a split module: each projection its own module
    separate, products = run(layer, x, positions)
    assert products == 4
    assert_close(stacked, separate, 1e-6, "output")
    want = torch.autograd.grad(separate, leaves, grad)
    for name, value, expected in zip(("input", "q_proj", "k_proj", "v_proj"), got, want, strict=True):
        assert_close(value, expected, 1e-6, f"{name} gradient")

    layer.tensor_parallel = False
    with torch.no_grad():
        assert run(layer, x, positions)[1] == 4, "inference keeps the projections' modules"
