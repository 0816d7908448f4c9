"""Differentiable forward chaining over soft predicates: the reasoning step of the neuro-symbolic module.

This file is copied verbatim into a generated package as ``ops/symbolic.py``; it imports only torch.

Truth values live in [0, 1]. A rule r has a premise selection m_r ∈ [0, 1]^P (1: the predicate is a premise,
0: it is not; in between for learned rules) and a conclusion weight c_r ∈ [0, 1]^P (one-hot for a declared rule,
a softmax over predicates for a learned one). One step of chaining:

    strength_r = Π_j (1 − m_rj · (1 − truth_j))                product t-norm over the selected premises
    truth_j   ← 1 − (1 − truth_j) · Π_r (1 − c_rj · strength_r)  probabilistic sum a + b − ab of the old value
                                                                 and every rule concluding j

A premise with m = 0 contributes the factor 1, so a 0/1 mask gives exactly the product of the premises' truth
values. Truth values only grow: chaining adds conclusions, it never retracts. All rules of a step read the truth
values from the start of that step (synchronous), so a chain of n rules needs n steps to reach its end.
"""

import torch
from torch import Tensor


def rule_masks(rules: tuple, n_predicates: int, device=None, dtype=torch.float32) -> tuple[Tensor, Tensor]:
    """Declared rules ((premise indices), conclusion index) → premise masks (R, P) and conclusion one-hots (R, P)."""
    premises = [[float(j in premise_indices) for j in range(n_predicates)] for premise_indices, _ in rules]
    conclusions = [[float(j == conclusion) for j in range(n_predicates)] for _, conclusion in rules]
    shape = (len(rules), n_predicates)  # explicit, so that no rules still gives (0, P)
    return (torch.tensor(premises, device=device, dtype=dtype).reshape(shape),
            torch.tensor(conclusions, device=device, dtype=dtype).reshape(shape))


def forward_chain(truth: Tensor, premises: Tensor, conclusions: Tensor, steps: int) -> Tensor:
    """Apply every rule `steps` times, synchronously.

    truth (..., P) initial truth values; premises (R, P) premise selections m; conclusions (R, P) conclusion
    weights c. Returns the truth values after chaining, (..., P). With no rules (R = 0) truth comes back as is.
    """
    for _ in range(steps):
        strength = (1 - premises * (1 - truth.unsqueeze(-2))).prod(dim=-1)  # (..., R)
        untouched = (1 - conclusions * strength.unsqueeze(-1)).prod(dim=-2)  # (..., P): no rule concluded j
        truth = 1 - (1 - truth) * untouched
    return truth
