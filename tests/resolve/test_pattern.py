"""Layout pattern grammar: expansions, every error with its column, tiling, rendering back, and fuzzing."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from archgen.resolve.layout_types import MAX_LAYERS, Slot
from archgen.resolve.pattern import describe_slots, expand_pattern

KNOWN = {"ssm", "attn", "moe", "mlp", "a", "b", "c"}


def layers(*names: str) -> list[Slot]:
    """layers('ssm', 'attn|ssm') -> [Slot(('ssm',)), Slot(('attn', 'ssm'))]"""
    return [Slot(tuple(name.split("|"))) for name in names]


def expand_ok(text: str, n_layers: int | None = None, **options) -> list[Slot]:
    slots, problems = expand_pattern(text, KNOWN, n_layers, **options)
    assert problems == [], [p.message for p in problems]
    return slots


def only_problem(text: str, n_layers: int | None = None, known=KNOWN, **options):
    slots, problems = expand_pattern(text, known, n_layers, **options)
    assert slots == []
    assert len(problems) == 1, [p.message for p in problems]
    assert problems[0].fix, "every problem says what to change"
    return problems[0]


# --- expansions ---------------------------------------------------------------------------------------------------


def test_hybrid_block_repeated_gives_32_layers_with_attention_every_fourth():
    slots = expand_ok("(ssm*3, attn)*8")
    assert slots == layers("ssm", "ssm", "ssm", "attn") * 8
    assert len(slots) == 32


def test_parallel_heads_give_one_two_branch_slot_per_layer():
    assert expand_ok("(attn|ssm)*32") == layers("attn|ssm") * 32


def test_plain_list_keeps_order():
    assert expand_ok("ssm, ssm, attn") == layers("ssm", "ssm", "attn")


def test_single_name_is_one_layer():
    assert expand_ok("moe") == layers("moe")


@pytest.mark.parametrize("text", ["ssm,ssm,attn", "  ssm ,\tssm,\nattn  ", "(ssm)*2, attn", "((ssm*2)), (attn)"])
def test_whitespace_and_redundant_parentheses_do_not_change_the_expansion(text):
    assert expand_ok(text) == layers("ssm", "ssm", "attn")


def test_parallel_of_parallel_flattens():
    assert expand_ok("(a|b)|c") == layers("a|b|c")
    assert expand_ok("a|(b|c)*1") == layers("a|b|c")


def test_nested_repetition_multiplies():
    assert expand_ok("((a, b*2)*2, c)*3") == layers("a", "b", "b", "a", "b", "b", "c") * 3


# --- layer count and tiling -----------------------------------------------------------------------------------------


def test_single_name_tiles_to_n_layers():
    assert expand_ok("moe", n_layers=32) == layers("moe") * 32


def test_pattern_that_divides_n_layers_is_tiled():
    assert expand_ok("ssm*3, attn", n_layers=32) == layers("ssm", "ssm", "ssm", "attn") * 8


def test_pattern_of_exactly_n_layers_is_unchanged():
    assert expand_ok("(ssm*3, attn)*8", n_layers=32) == expand_ok("(ssm*3, attn)*8")


def test_pattern_that_does_not_divide_n_layers_names_divisors_and_nearby_multiples():
    problem = only_problem("ssm, ssm, attn", n_layers=32)
    assert problem.message == "pattern expands to 3 layers, which does not divide n_layers=32"
    assert "1, 2, 4, 8, 16 or 32" in problem.fix
    assert "multiple of 3 (30 or 33)" in problem.fix
    assert problem.column is None


def test_pattern_longer_than_n_layers_suggests_its_own_length():
    problem = only_problem("ssm*5", n_layers=3)
    assert "does not divide n_layers=3" in problem.message
    assert "multiple of 5 (5)" in problem.fix


@pytest.mark.parametrize("n_layers", [0, -4, MAX_LAYERS + 1])
def test_n_layers_out_of_range(n_layers):
    problem = only_problem("ssm", n_layers=n_layers)
    assert f"got {n_layers}" in problem.message and problem.column is None


# --- errors ----------------------------------------------------------------------------------------------------------

ERRORS = [
    # (pattern, substring of the message, column)
    ("", "layout pattern is empty", 0),
    ("   ", "layout pattern is empty", 0),
    ("(ssm, attn", "'(' at column 0 is never closed", 0),
    ("ssm, (attn*2", "'(' at column 5 is never closed", 5),
    ("(", "'(' at column 0 is never closed", 0),
    ("ssm)", "')' at column 3 has no matching '('", 3),
    ("(ssm), attn)*2", "')' at column 11 has no matching '('", 11),
    ("ssm $ attn", "unexpected character '$' at column 4", 4),
    ("ssm-attn", "unexpected character '-' at column 3", 3),
    ("ssm, attné", "unexpected character 'é' at column 9", 9),
    ("ssm, attn,", "trailing ',' at column 9", 9),
    ("(ssm, )*2", "trailing ',' at column 4", 4),
    ("ssm*", "'*' at column 3 has no count", 3),
    ("ssm*, attn", "'*' at column 3 has no count", 3),
    ("ssm*attn", "'*' at column 3 has no count", 3),
    ("ssm*0", "repeat count must be at least 1, got 0 at column 4", 4),
    ("ssm * -3", "repeat count must be at least 1, got -3 at column 6", 6),
    ("ssm*2.5", "repeat count '2.5' at column 4 is not a whole number", 4),
    ("ssm*3x", "repeat count '3x' at column 4 is not a whole number", 4),
    ("ssm, ()", "empty group '()' at column 5", 5),
    ("ssm, , attn", "expected a component name or '(' at column 5, found ','", 5),
    ("*3", "expected a component name or '(' at column 0, found '*'", 0),
    ("ssm|", "expected a component name or '(' at column 4, found the end of the pattern", 4),
    ("ssm attn", "expected ',' or the end of the pattern at column 4, found 'attn'", 4),
    ("(ssm attn)", "expected ',' or ')' at column 5, found 'attn'", 5),
    ("(a, b)|c", "parallel branch '(a, b)' at column 0 is 2 layers; '|' joins single layers", 0),
    ("c|(a*2)", "parallel branch '(a*2)' at column 2 is 2 layers", 2),
    ("ssm, attn|attn", "'attn' appears 2 times in the parallel layer at column 5", 5),
    ("(a|b)|a", "'a' appears 2 times in the parallel layer at column 0", 0),
    ("ssm*999999999", "repeat count 999999999 at column 4 is above the limit of 512", 4),
    ("(ssm*500)*500", "pattern expands to 250000 layers, above the limit of 512", 0),
]


@pytest.mark.parametrize(("text", "message", "column"), ERRORS, ids=[repr(e[0]) for e in ERRORS])
def test_error_message_and_column(text, message, column):
    problem = only_problem(text)
    assert message in problem.message
    assert problem.column == column


def test_count_with_thousands_of_digits_is_a_clean_error():
    problem = only_problem("ssm*" + "9" * 5000)
    assert "above the limit" in problem.message and len(problem.message) < 200


def test_deep_nesting_is_a_clean_error():
    problem = only_problem("(" * 500 + "ssm" + ")" * 500)
    assert "nested over 64 deep" in problem.message


def test_unknown_name_names_the_known_ones_and_suggests_the_closest():
    problem = only_problem("(ssm*3, atn)*8")
    assert problem.message == "unknown component 'atn' at column 8; known components: a, attn, b, c, mlp, moe, ssm"
    assert problem.fix == "replace 'atn' with 'attn'"
    assert problem.column == 8


def test_unknown_name_without_close_match_lists_the_choices():
    problem = only_problem("zebra", known={"ssm", "attn"})
    assert problem.fix == "use one of: attn, ssm"


def test_every_unknown_name_is_reported_once_in_one_pass():
    slots, problems = expand_pattern("atn, sm, atn, xyz*0", KNOWN)
    assert slots == []
    assert [(p.column, p.message.split(";")[0]) for p in problems] == [
        (0, "unknown component 'atn' at column 0"),
        (5, "unknown component 'sm' at column 5"),
        (14, "unknown component 'xyz' at column 14"),
        (18, "repeat count must be at least 1, got 0 at column 18"),
    ]


def test_parallel_is_refused_outside_mixers():
    problem = only_problem("moe, mlp|moe", allow_parallel=False)
    assert "'|' at column 8: parallel composition is only for mixers" in problem.message
    assert problem.column == 8
    assert expand_ok("moe, mlp", allow_parallel=False) == layers("moe", "mlp")


# --- rendering back ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "rendered"),
    [
        ("(ssm*3, attn)*8", "(ssm*3, attn)*8"),
        ("(attn|ssm)*32", "(attn|ssm)*32"),
        ("ssm, ssm, attn", "ssm*2, attn"),
        ("moe", "moe"),
        ("moe*32", "moe*32"),
        ("a|b, a|b, c", "(a|b)*2, c"),
        ("(a, b, a, b)*2", "(a, b)*4"),
    ],
)
def test_describe_slots_is_compact(text, rendered):
    assert describe_slots(expand_ok(text)) == rendered


def test_describe_empty():
    assert describe_slots([]) == ""


# --- fuzzing -------------------------------------------------------------------------------------------------------


def assert_slots_or_problems(text: str, **options) -> None:
    slots, problems = expand_pattern(text, KNOWN, **options)
    assert bool(slots) != bool(problems), (text, slots, problems)
    for problem in problems:
        assert problem.message and problem.fix
        assert problem.column is None or 0 <= problem.column <= len(text)


@settings(max_examples=300, deadline=None)
@given(st.text())
def test_any_text_gives_slots_or_problems(text):
    assert_slots_or_problems(text)


TOKENS = ["ssm", "attn", "a", "atn", "(", ")", ",", "*", "|", "3", "0", "-1", "2.5", " ", "$", "99999999"]


@settings(max_examples=500, deadline=None)
@given(st.lists(st.sampled_from(TOKENS), max_size=20).map("".join), st.booleans(), st.none() | st.integers(-2, 70))
def test_any_token_soup_gives_slots_or_problems(text, allow_parallel, n_layers):
    assert_slots_or_problems(text, allow_parallel=allow_parallel, n_layers=n_layers)


NAMES = sorted(KNOWN)

names_in_parallel = st.lists(st.sampled_from(NAMES), min_size=1, max_size=3, unique=True)
single_layer = names_in_parallel.map(lambda names: ("|".join(names), [Slot(tuple(names))]))


def _combine(children):
    """Larger valid patterns from smaller ones, each with the expansion it must give."""
    sequence = st.lists(children, min_size=1, max_size=3).map(
        lambda items: (", ".join(text for text, _ in items), [slot for _, slots in items for slot in slots])
    )
    repeated = st.tuples(children, st.integers(1, 3)).map(
        lambda pair: (f"({pair[0][0]})*{pair[1]}", pair[0][1] * pair[1])
    )
    return sequence | repeated


valid_patterns = st.recursive(single_layer, _combine, max_leaves=12)


@settings(max_examples=300, deadline=None)
@given(valid_patterns, st.integers(1, 4))
def test_generated_patterns_expand_to_the_expected_layers_and_tile(pattern, tiles):
    text, expected = pattern
    assert expand_pattern(text, KNOWN) == (expected, [])
    assert expand_pattern(text, KNOWN, len(expected) * tiles) == (expected * tiles, [])


@settings(max_examples=300, deadline=None)
@given(valid_patterns)
def test_describe_slots_round_trips(pattern):
    _, expected = pattern
    assert expand_pattern(describe_slots(expected), KNOWN) == (expected, [])
