"""Model.init_weights: defaults by module type, then each module's own init_weights hook; the same starting
distributions after building on the meta device, and no magic numbers or name matching in the generated code."""

from __future__ import annotations

import math
import re

import pytest
import torch

from tests.conftest import ROOT

HNS = ROOT / "specs" / "hns_ss_jepa_moe.yaml"  # Mamba-1, Mamba-2, attention, MoE with shared experts, Medusa
HYMBA = ROOT / "specs" / "hymba_plus.yaml"  # parallel attention ∥ Mamba with branch scales, meta tokens

OUTPUT_PROJECTIONS = ("o_proj.weight", "out_proj.weight", "down_proj.weight", "w_out")


def special_values_hold(package, model):
    n_layers = len(model.layers)
    output_std = package.model.INIT_STD / math.sqrt(2 * n_layers)
    assert package.model.OUTPUT_STD == pytest.approx(output_std)
    for name, param in model.named_parameters():
        if param.numel() < 4096:
            continue  # too few values for a std
        if name.endswith(OUTPUT_PROJECTIONS):
            assert param.std().item() == pytest.approx(output_std, rel=0.1), name
        elif name.endswith(("w_in", "q_proj.weight", "in_proj.weight", "up_proj.weight")):
            assert param.std().item() == pytest.approx(package.model.INIT_STD, rel=0.1), name
    for name, param in model.named_parameters():
        if name.endswith("_scale") or name.endswith(".D"):
            assert torch.equal(param, torch.ones_like(param)), name
        if name.endswith("mixer.A_log") and param.dim() == 2:  # Mamba-1: log(1..d_state) in every channel
            expected = torch.log(torch.arange(1, param.size(1) + 1, dtype=torch.float32)).expand_as(param)
            assert torch.allclose(param, expected), name
        if name.endswith("A_log") and param.dim() == 1:  # Mamba-2: log of uniform(1, 16) per head
            assert ((param >= 0) & (param <= math.log(16))).all(), name


@pytest.mark.parametrize("spec_path", [HNS, HYMBA], ids=["hns_ss_jepa_moe", "hymba_plus"])
def test_init_weights_sets_every_special_value_also_after_a_meta_device_build(spec_path, build):
    package = build(spec_path)
    torch.manual_seed(0)
    special_values_hold(package, package.Model())
    with torch.device("meta"):
        model = package.Model()
    model.to_empty(device="cpu")
    model.init_weights()
    special_values_hold(package, model)
    for name, param in model.named_parameters():
        assert torch.isfinite(param).all(), name


def test_the_generated_init_names_its_constants_and_matches_no_parameter_names(build):
    source = (build(HNS).__path__[0] + "/model.py")
    text = open(source, encoding="utf-8").read()
    assert not re.search(r"\d\.\d{8,}", text), "a float printed with many digits (write math.log(0.1) or a named constant)"
    init = text[text.index("    def init_weights(self):\n        \"\"\"Initialise every parameter"):]
    init = init[: init.index("\n    def ", 10)]
    assert "endswith" not in init and "named_parameters" not in init
