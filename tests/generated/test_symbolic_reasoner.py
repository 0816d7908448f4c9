"""The symbolic module as generated into a model (specs/nexus.yaml at its tiny preset, heads dropped while JEPA is
built elsewhere): declared rules chain one step at a time, learned rules conclude where their logits point, only
derived truth reaches the residual stream, and gradients reach the predicate extractor. The chaining arithmetic
itself is tested in tests/templates/runtime/test_symbolic.py.
"""

from __future__ import annotations

import pytest
import torch

from archgen.pipeline import compile_spec
from tests.conftest import assert_parameters_match_the_cost_model

NEXUS = "specs/nexus.yaml"
NO_HEADS = ("heads={}",)
P1, P2, P3, P4 = range(4)  # nexus declares p1 → p2 and p2 → p3 over predicates p1..p4


def reasoner(build, *overrides):
    torch.manual_seed(0)
    return build(NEXUS, overrides=NO_HEADS + overrides).Model().symbolic


def set_truth(module, logits):
    """Make the extractor ignore x and give every token the truth values σ(logits)."""
    with torch.no_grad():
        module.extract.weight.zero_()
        module.extract.bias.copy_(torch.tensor(logits))


X = torch.randn(2, 5, 128, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("steps,p3_after", [pytest.param(1, "initial", id="one-step"), pytest.param(2, "true", id="two-steps")])
def test_declared_rules_chain_p1_to_p3_in_two_steps(build, steps, p3_after):
    module = reasoner(build, "symbolic.learned_rules=0", f"symbolic.steps={steps}")
    set_truth(module, [10.0, -10.0, -10.0, -10.0])  # p1 true, p2 p3 p4 false
    _, truth = module(X)
    initial = torch.sigmoid(torch.tensor(-10.0)).item()
    assert (truth[..., P2] >= 0.99).all(), "p1 → p2 did not fire"
    if p3_after == "true":
        assert (truth[..., P3] >= 0.99).all(), f"p3 = {truth[..., P3].min().item():.4f} after two steps"
    else:
        assert torch.allclose(truth[..., P3], torch.full_like(truth[..., P3], initial), atol=1e-3), "p3 became true in one step"
    assert torch.allclose(truth[..., P4], torch.full_like(truth[..., P4], initial), atol=1e-6), "p4 is concluded by no rule"


def test_a_learned_rule_concludes_where_its_logits_point(build):
    """One learned rule whose premise logits select p4 and whose conclusion logits select p1: p4 true makes p1 true."""
    module = reasoner(build, "symbolic.rules=[]", "symbolic.learned_rules=1", "symbolic.steps=1")
    set_truth(module, [-10.0, -10.0, -10.0, 10.0])
    with torch.no_grad():
        module.rule_premises.weight.copy_(torch.tensor([[-20.0, -20.0, -20.0, 20.0]]))
        module.rule_conclusions.weight.copy_(torch.tensor([[20.0, -20.0, -20.0, -20.0]]))
    _, truth = module(X)
    assert (truth[..., P1] >= 0.99).all(), f"p1 = {truth[..., P1].min().item():.4f}"
    assert (truth[..., P2] < 1e-3).all() and (truth[..., P3] < 1e-3).all()


def test_only_derived_truth_reaches_the_residual_stream(build):
    """No premise holds, so no rule fires and the module adds (almost) nothing; once p1 holds it adds W_p(truth − truth₀)."""
    module = reasoner(build, "symbolic.learned_rules=0")
    set_truth(module, [-10.0, -10.0, -10.0, -10.0])
    quiet, _ = module(X)
    assert quiet.abs().max() < 1e-3 * module.project.weight.abs().max()
    set_truth(module, [10.0, -10.0, -10.0, -10.0])
    fired, truth = module(X)
    initial = torch.sigmoid(torch.tensor([10.0, -10.0, -10.0, -10.0]))
    torch.testing.assert_close(fired, module.project(truth - initial))


def test_gradients_flow_to_the_extractor_from_a_loss_on_p3(build):
    module = reasoner(build)  # nexus as written: two declared rules and four learned ones
    _, truth = module(X)
    truth[..., P3].sum().backward()
    assert module.extract.weight.grad is not None and module.extract.weight.grad.abs().sum() > 0
    assert module.rule_premises.weight.grad.abs().sum() > 0 and module.rule_conclusions.weight.grad.abs().sum() > 0


def test_the_model_reports_the_truth_values_as_a_head_output(build):
    model = build(NEXUS, overrides=NO_HEADS).Model()
    out = model(torch.randint(0, 256, (2, 9)))
    truth = out.heads["symbolic"]
    assert truth.shape == (2, 9, 4)
    assert ((truth >= 0) & (truth <= 1)).all()


VARIANTS = [
    pytest.param((), id="nexus"),
    pytest.param(("symbolic.learned_rules=0",), id="declared-only"),
    pytest.param(("symbolic.rules=[]",), id="learned-only"),
    pytest.param(("symbolic.rules=[]", "symbolic.learned_rules=0"), id="no-rules"),
]


@pytest.mark.parametrize("overrides", VARIANTS)
def test_parameters_match_the_cost_model_and_the_model_runs(build, overrides):
    overrides = NO_HEADS + overrides
    model = build(NEXUS, overrides=overrides).Model()
    ir = compile_spec(NEXUS, "tiny", overrides).ir
    assert_parameters_match_the_cost_model(model, ir)
    assert torch.isfinite(model(torch.randint(0, 256, (1, 4))).logits).all()
