"""Neuro-symbolic module: predicate extractor, learned rule weights, projection of conclusions back to d_model.

The learned rules' logits are the weights of two Linear modules that are never called (`rule_premises.weight`,
`rule_conclusions.weight`, each (learned_rules, P)): being Linear weights, Model.init_weights draws them, also for
a model built on the meta device. Declared rules are constants of the generated code, not parameters.
"""


def parameters(cfg, dims) -> dict[str, tuple[int, ...]]:
    p = len(cfg.predicates)
    table = {"extract.weight": (p, dims.d_model), "extract.bias": (p,)}
    if cfg.learned_rules:
        table["rule_premises.weight"] = (cfg.learned_rules, p)
        table["rule_conclusions.weight"] = (cfg.learned_rules, p)
    table["project.weight"] = (dims.d_model, p)
    return table


def forward_flops(cfg, dims, seq_len: int) -> int:
    p = len(cfg.predicates)
    rules = len(cfg.rules) + cfg.learned_rules
    return seq_len * (2 * dims.d_model * p * 2 + cfg.steps * rules * p * 2)


def cache_bytes(cfg, dims, context: int, itemsize: int) -> int:
    return 0
