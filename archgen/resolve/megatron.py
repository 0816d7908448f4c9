"""Megatron-Core's hybrid layer pattern ("M-M-M*-M-") expanded to one Slot per layer for one role.

Megatron writes one symbol per layer: M a Mamba layer, * attention, - an MLP, E a mixture of experts. In archgen a
layer is a mixer and a feed-forward, so under `layout.mixers` an M or * layer is a layer with that mixer and a - or
E layer has none; under `layout.ffns` it is the other way round. '|' separates pipeline stages (it does not change
the model) and is skipped; '/' starts Megatron's multi-token-prediction layers, which have no place in a spec.
"""

from __future__ import annotations

from archgen.resolve.layout_types import LayoutProblem, Slot, unknown_name_problem

ROLES = {"mixers": ("M", "*"), "ffns": ("-", "E")}
MEANING = {"M": "a Mamba layer", "*": "an attention layer", "-": "an MLP layer", "E": "a mixture-of-experts layer"}
PIPELINE_SEPARATOR = "|"


def expand_megatron(text: str, symbols: dict[str, str], role: str, names: set[str],
                    n_layers: int | None) -> tuple[list[Slot], list[LayoutProblem]]:
    """`role` is 'mixers' or 'ffns'; `names` the components it may use."""
    own = ROLES[role]
    other = "ffns" if role == "mixers" else "mixers"
    problems: list[LayoutProblem] = []
    for symbol, name in symbols.items():
        if symbol not in own:
            problems.append(LayoutProblem(f"'{symbol}' is {MEANING[symbol]} in Megatron's pattern, not one of the {role}",
                                          f"map '{symbol}' under layout.{other}.symbols", None, f"symbols.{symbol}"))
        elif name not in names:
            problem = unknown_name_problem(name, names - {"none"}, None, f"for '{symbol}'")
            problems.append(LayoutProblem(problem.message, problem.fix, None, f"symbols.{symbol}"))
    slots: list[Slot] = []
    for column, char in enumerate(text):
        if char == PIPELINE_SEPARATOR or char.isspace():
            continue
        if char == "/":
            problems.append(LayoutProblem("'/' starts Megatron's multi-token-prediction layers, which a spec does not have",
                                          "drop the part from '/' on", column))
            break
        if char not in MEANING:
            problems.append(LayoutProblem(f"'{char}' at column {column} is not a Megatron layer symbol",
                                          "use M (Mamba), * (attention), - (MLP), E (MoE); '|' between pipeline stages", column))
            continue
        if char in own and char not in symbols:
            problems.append(LayoutProblem(f"the pattern has {MEANING[char]} ('{char}') at column {column} but symbols "
                                          "does not say which component it is", f"add '{char}': <name> to symbols",
                                          None, "symbols"))
            symbols = {**symbols, char: "none"}  # report it once
        slots.append(Slot((symbols[char] if char in own else "none",)))
    if not slots and not problems:
        problems.append(LayoutProblem("the Megatron pattern has no layers", "write one symbol per layer, e.g. 'M-M*-'", 0))
    if n_layers is not None and slots and len(slots) != n_layers and not problems:
        problems.append(LayoutProblem(f"the Megatron pattern has {len(slots)} layers but n_layers={n_layers}",
                                      f"write {n_layers} symbols, or set n_layers: {len(slots)}", None, "n_layers"))
    return slots, problems
