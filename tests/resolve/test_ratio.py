"""Ratio shorthand: Jamba's placement, wrap-around at the offset, every error, and fuzzing."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from archgen.resolve.layout_types import Slot
from archgen.resolve.ratio import expand_ratio

KNOWN = {"attn", "ssm", "moe", "mlp"}


def names(slots: list[Slot]) -> list[str]:
    return ["|".join(slot.names) for slot in slots]


def only_problem(ratio, offset, n_layers, known=KNOWN):
    slots, problems = expand_ratio(ratio, offset, n_layers, known)
    assert slots == []
    assert len(problems) == 1, [p.message for p in problems]
    assert problems[0].fix and problems[0].column is None
    return problems[0]


def test_jamba_one_attention_per_seven_mambas_at_offset_4():
    slots, problems = expand_ratio({"attn": 1, "ssm": 7}, 4, 32, KNOWN)
    assert problems == []
    assert len(slots) == 32
    assert [index for index, slot in enumerate(slots) if slot == Slot(("attn",))] == [4, 12, 20, 28]
    assert all(slot == Slot(("ssm",)) for index, slot in enumerate(slots) if index % 8 != 4)


def test_moe_on_odd_layers():
    slots, problems = expand_ratio({"moe": 1, "mlp": 1}, 1, 6, KNOWN)
    assert (names(slots), problems) == (["mlp", "moe", "mlp", "moe", "mlp", "moe"], [])


def test_offset_zero_lays_names_out_in_order():
    slots, _ = expand_ratio({"attn": 1, "ssm": 3}, 0, 8, KNOWN)
    assert names(slots) == ["attn", "ssm", "ssm", "ssm"] * 2


def test_names_wrap_around_the_end_of_the_period():
    slots, _ = expand_ratio({"attn": 2, "ssm": 1}, 2, 3, KNOWN)
    assert names(slots) == ["attn", "ssm", "attn"]


def test_mapping_order_not_name_order_decides_the_layout():
    slots, _ = expand_ratio({"ssm": 3, "attn": 1}, 0, 4, KNOWN)
    assert names(slots) == ["ssm", "ssm", "ssm", "attn"]


def test_empty_ratio():
    assert only_problem({}, 0, 32).message == "ratio is empty"


@pytest.mark.parametrize("count", [0, -2, 1.5, True, "3"])
def test_count_must_be_a_whole_number_of_at_least_one(count):
    problem = only_problem({"attn": count, "ssm": 7}, 0, 32)
    assert f"ratio count for 'attn' must be a whole number >= 1, got {count!r}" == problem.message


def test_unknown_name_suggests_the_closest():
    problem = only_problem({"atn": 1, "ssm": 7}, 4, 32)
    assert problem.message == "unknown component 'atn' in the ratio; known components: attn, mlp, moe, ssm"
    assert problem.fix == "replace 'atn' with 'attn'"


@pytest.mark.parametrize("offset", [8, 9, -1])
def test_offset_outside_the_period(offset):
    problem = only_problem({"attn": 1, "ssm": 7}, offset, 32)
    assert problem.message == f"offset={offset} is not a position in the ratio period of 8 layers (attn:1 + ssm:7)"
    assert problem.fix == "use an offset from 0 to 7"


@pytest.mark.parametrize("n_layers", [0, -8])
def test_n_layers_below_one(n_layers):
    assert f"n_layers must be 1 to 512, got {n_layers}" in only_problem({"attn": 1, "ssm": 7}, 4, n_layers).message


@pytest.mark.parametrize(("n_layers", "suggestion"), [(30, "use n_layers=24 or 32"), (5, "use n_layers=8")])
def test_n_layers_not_a_multiple_of_the_period_names_the_nearest_multiples(n_layers, suggestion):
    problem = only_problem({"attn": 1, "ssm": 7}, 4, n_layers)
    assert problem.message == f"n_layers={n_layers} is not a multiple of the ratio period 8 (attn:1 + ssm:7)"
    assert suggestion in problem.fix


def test_independent_problems_are_all_reported():
    _, problems = expand_ratio({"atn": 1, "ssm": 0}, 0, 0, KNOWN)
    assert len(problems) == 3


ratios = st.dictionaries(st.sampled_from(sorted(KNOWN) + ["atn"]), st.integers(-1, 9), max_size=4)


@settings(max_examples=500, deadline=None)
@given(ratios, st.integers(-2, 40), st.integers(-2, 80))
def test_any_ratio_gives_slots_or_problems_and_keeps_the_proportions(ratio, offset, n_layers):
    slots, problems = expand_ratio(ratio, offset, n_layers, KNOWN)
    assert bool(slots) != bool(problems)
    if slots:
        period = sum(ratio.values())
        assert len(slots) == n_layers
        for name, count in ratio.items():
            assert names(slots).count(name) == count * n_layers // period
        assert slots[offset] == Slot((next(iter(ratio)),))
