"""templates/runtime/symbolic.py (differentiable forward chaining) against rules applied one at a time by hand."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from templates.runtime import symbolic


def chain_by_hand(truth, premises, conclusions, steps):
    """Each step: every rule's strength from the step's starting values, then folded into each conclusion with
    a + b - ab, one rule and one predicate at a time."""
    n_rules, n_predicates = premises.shape
    for _ in range(steps):
        start = truth.clone()
        truth = truth.clone()
        for r in range(n_rules):
            strength = torch.ones(truth.shape[:-1], dtype=truth.dtype)
            for j in range(n_predicates):
                strength = strength * (1 - premises[r, j] * (1 - start[..., j]))
            for j in range(n_predicates):
                fired = conclusions[r, j] * strength
                truth[..., j] = truth[..., j] + fired - truth[..., j] * fired
    return truth


def truth_values(*values):
    return torch.tensor([values], dtype=torch.float64)  # (1, P)


def test_rule_masks_mark_premises_and_conclusions():
    premises, conclusions = symbolic.rule_masks((((0,), 1), ((0, 2), 3)), 4)
    assert premises.tolist() == [[1, 0, 0, 0], [1, 0, 1, 0]]
    assert conclusions.tolist() == [[0, 1, 0, 0], [0, 0, 0, 1]]


def test_rule_masks_of_no_rules_keep_the_predicate_axis():
    premises, conclusions = symbolic.rule_masks((), 5)
    assert premises.shape == conclusions.shape == (0, 5)


@pytest.mark.parametrize("steps,expect_p3", [pytest.param(1, False, id="one-step"), pytest.param(2, True, id="two-steps")])
def test_a_chain_of_two_rules_takes_two_steps(steps, expect_p3):
    """p1 → p2, p2 → p3 with p1 true: p2 after one step, p3 only after two (rules read the step's start values)."""
    premises, conclusions = symbolic.rule_masks((((0,), 1), ((1,), 2)), 3, dtype=torch.float64)
    truth = symbolic.forward_chain(truth_values(0.999, 0.0, 0.0), premises, conclusions, steps)
    assert truth[0, 1] >= 0.99
    assert (truth[0, 2] >= 0.99) if expect_p3 else (truth[0, 2] == 0.0), f"p3 = {truth[0, 2].item():.4f} after {steps} step(s)"


def test_a_conjunction_is_the_product_of_its_premises():
    premises, conclusions = symbolic.rule_masks((((0, 1), 2),), 3, dtype=torch.float64)
    truth = symbolic.forward_chain(truth_values(0.5, 0.8, 0.1), premises, conclusions, 1)
    strength = 0.5 * 0.8
    assert truth[0, 2].item() == pytest.approx(0.1 + strength - 0.1 * strength)
    assert truth[0, :2].tolist() == [0.5, 0.8], "premises are not changed by firing"


def test_no_rules_leave_the_truth_values_unchanged():
    truth = truth_values(0.2, 0.7)
    empty = torch.zeros(0, 2, dtype=torch.float64)
    torch.testing.assert_close(symbolic.forward_chain(truth, empty, empty, 3), truth, rtol=0, atol=1e-15)  # 1 - (1 - t) rounds


@settings(max_examples=40, deadline=None)
@given(n_predicates=st.integers(1, 5), n_rules=st.integers(0, 6), steps=st.integers(1, 3), seed=st.integers(0, 2**16))
def test_matches_rules_applied_one_at_a_time(n_predicates, n_rules, steps, seed):
    """Soft premise selections and soft conclusions, as learned rules have; truth stays in [0, 1] and never falls."""
    g = torch.Generator().manual_seed(seed)
    truth = torch.rand(2, 3, n_predicates, generator=g, dtype=torch.float64)
    premises = torch.rand(n_rules, n_predicates, generator=g, dtype=torch.float64)
    conclusions = torch.softmax(torch.randn(n_rules, n_predicates, generator=g, dtype=torch.float64) * 3, dim=-1)
    chained = symbolic.forward_chain(truth, premises, conclusions, steps)
    torch.testing.assert_close(chained, chain_by_hand(truth, premises, conclusions, steps), rtol=1e-12, atol=1e-12)
    assert ((chained >= truth - 1e-15) & (chained <= 1)).all()


def test_gradients_reach_the_truth_values_and_the_rule_weights():
    g = torch.Generator().manual_seed(0)
    truth = torch.rand(2, 4, generator=g, dtype=torch.float64).requires_grad_()
    premises = torch.rand(3, 4, generator=g, dtype=torch.float64).requires_grad_()
    conclusions = torch.rand(3, 4, generator=g, dtype=torch.float64).requires_grad_()
    assert torch.autograd.gradcheck(lambda t, p, c: symbolic.forward_chain(t, p, c, 2), (truth, premises, conclusions))
