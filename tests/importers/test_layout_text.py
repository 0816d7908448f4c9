"""Per-layer names written back as pattern text: the pattern language must read each one back to the same layers."""

from __future__ import annotations

import pytest

from archgen.importers.layout import layout_text
from archgen.resolve.pattern import expand_pattern

CASES = [
    (["attn"] * 32, "attn"),
    ((["ssm"] * 3 + ["attn"]) * 8, "(ssm*3, attn)*8"),
    (
        ["ssm"] * 9 + ["attn"] + ["ssm"] * 8 + ["attn"] + ["ssm"] * 8 + ["attn"] + ["ssm"] * 4,
        "ssm*9, attn, ssm*8, attn, ssm*8, attn, ssm*4",
    ),
    (["mlp", "moe"] * 16, "(mlp, moe)*16"),
    (["attn", "local", "local"], "attn, local*2"),
]


@pytest.mark.parametrize("names, text", CASES, ids=[text for _, text in CASES])
def test_layout_text_is_short_and_reads_back_to_the_same_layers(names, text):
    assert layout_text(names) == text
    slots, problems = expand_pattern(text, set(names), len(names), allow_parallel=False)
    assert not problems
    assert [slot.names[0] for slot in slots] == names
