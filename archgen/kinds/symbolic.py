"""Neuro-symbolic module: predicate extractor, learned rule weights, projection of conclusions back to d_model.

The learned rules' logits are the weights of two Linear modules that are never called (`rule_premises.weight`,
`rule_conclusions.weight`, each (learned_rules, P)): being Linear weights, Model.init_weights draws them, also for
a model built on the meta device. Declared rules are constants of the generated code, not parameters.
"""

from __future__ import annotations

from dataclasses import dataclass

from archgen.errors import Diagnostic
from archgen.kinds.base import Dims, Kind
from archgen.spec import models


@dataclass(frozen=True)
class SymbolicConfig:
    after_layer: int  # applied after this layer (non-negative)
    predicates: tuple[str, ...]
    rules: tuple[models.SymbolicRule, ...]
    learned_rules: int
    steps: int


class Symbolic(Kind[models.SymbolicSpec, SymbolicConfig]):
    name = "symbolic"
    role = "extra"
    template = "extras/symbolic"
    class_name = "SymbolicReasoner"

    def check(self, spec, path: str, model) -> list[Diagnostic]:
        problems = []
        declared = set(spec.predicates)
        for i, rule in enumerate(spec.rules):
            for field, names in (("premises", rule.premises), ("conclusion", [rule.conclusion])):
                for predicate in names:
                    if predicate not in declared:
                        problems.append(Diagnostic(f"{path}.rules[{i}].{field}", f"predicate '{predicate}' is not declared",
                                                   f"add it to {path}.predicates ({', '.join(sorted(declared))})"))
        return problems

    def resolve(self, spec, model) -> SymbolicConfig:
        return SymbolicConfig(spec.after_layer, tuple(spec.predicates), tuple(spec.rules), spec.learned_rules, spec.steps)

    def imports(self, config: SymbolicConfig) -> dict[str, tuple[str, ...]]:
        return {"symbolic": ("forward_chain", *(("rule_masks",) if config.rules else ()))}

    def template_dims(self, config: SymbolicConfig, dims: Dims) -> dict:
        index = {name: i for i, name in enumerate(config.predicates)}
        return {"after_layer": config.after_layer, "predicates": list(config.predicates),
                "n_predicates": len(config.predicates), "n_declared": len(config.rules),
                "n_learned": config.learned_rules, "n_rules": len(config.rules) + config.learned_rules,
                "steps": config.steps,
                "rules": [{"premises": tuple(index[p] for p in rule.premises), "conclusion": index[rule.conclusion],
                           "text": f"{' ∧ '.join(rule.premises)} → {rule.conclusion}"} for rule in config.rules]}

    def parameters(self, config: SymbolicConfig, dims: Dims) -> dict[str, tuple[int, ...]]:
        p = len(config.predicates)
        table = {"extract.weight": (p, dims.d_model), "extract.bias": (p,)}
        if config.learned_rules:
            table["rule_premises.weight"] = (config.learned_rules, p)
            table["rule_conclusions.weight"] = (config.learned_rules, p)
        table["project.weight"] = (dims.d_model, p)
        return table

    def forward_flops(self, config: SymbolicConfig, dims: Dims, seq_len: int) -> int:
        p = len(config.predicates)
        rules = len(config.rules) + config.learned_rules
        return seq_len * (2 * dims.d_model * p * 2 + config.steps * rules * p * 2)


KIND = Symbolic()
