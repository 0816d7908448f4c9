"""The bad-spec corpus: every file in tests/specs/bad/ is a realistic mistake that must fail with a located message.

Each corpus file states what it must produce in header comments:

    # expect: <text>          a substring of some rendered diagnostic (repeatable: all must appear in one run)
    # expect-line: <n>        the 1-based line the diagnostic matching the first `expect` points at
    # expect-column: <n>      ... and its 1-based column
    # preset: <names>         compile with this --preset
    # set: <path=value>       compile with this --set override (repeatable)
    # xfail: <reason>         a known archgen bug: the case fails today and the test is a strict xfail
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml

from archgen.errors import CompileError, Diagnostic
from archgen.pipeline import compile_spec

BAD = Path(__file__).resolve().parents[1] / "specs" / "bad"
CORPUS = sorted(BAD.glob("*.yaml"))
_HEADER = re.compile(r"^#\s*(expect|expect-line|expect-column|preset|set|xfail):\s?(.*)$")


@dataclass
class Case:
    path: Path
    expects: list[str] = field(default_factory=list)
    line: int | None = None
    column: int | None = None
    preset: str | None = None
    overrides: list[str] = field(default_factory=list)
    xfail: str | None = None


def read_case(path: Path) -> Case:
    case = Case(path)
    for text in path.read_text(encoding="utf-8").splitlines():
        match = _HEADER.match(text)
        if not match:
            continue
        key, value = match.group(1), match.group(2).rstrip()
        if key == "expect":
            case.expects.append(value)
        elif key == "expect-line":
            case.line = int(value)
        elif key == "expect-column":
            case.column = int(value)
        elif key == "preset":
            case.preset = value
        elif key == "set":
            case.overrides.append(value)
        else:
            case.xfail = value
    return case


def corpus_params():
    for path in CORPUS:
        case = read_case(path)
        marks = [pytest.mark.xfail(strict=True, reason=case.xfail)] if case.xfail else []
        yield pytest.param(case, id=path.stem, marks=marks)


def compile_error(case: Case) -> list[Diagnostic]:
    with pytest.raises(CompileError) as caught:
        compile_spec(case.path, case.preset, case.overrides)
    return caught.value.diagnostics


def test_corpus_is_large_and_every_file_states_what_it_must_produce():
    assert len(CORPUS) >= 30
    for path in CORPUS:
        assert read_case(path).expects, f"{path.name} has no '# expect:' line"


@pytest.mark.parametrize("case", list(corpus_params()))
def test_bad_spec_fails_with_every_expected_message_at_the_expected_place(case: Case):
    diagnostics = compile_error(case)
    rendered = [d.render() for d in diagnostics]
    shown = "\n".join(rendered)
    for expected in case.expects:
        assert any(expected in text for text in rendered), f"{expected!r} not in:\n{shown}"
    for diagnostic in diagnostics:
        assert diagnostic.location is not None and diagnostic.location.file, f"unlocated: {diagnostic.render()}"
    if case.line is not None or case.column is not None:
        first = next(d for d in diagnostics if case.expects[0] in d.render())
        assert first.location.file == str(case.path), shown
        if case.line is not None:
            assert first.location.line == case.line, shown
        if case.column is not None:
            assert first.location.column == case.column, shown


def test_every_diagnostic_in_the_whole_corpus_says_what_to_change():
    """The README promises a `fix:` line under every error: walk every corpus file (xfail ones too) and collect misses."""
    without_fix = []
    for path in CORPUS:
        case = read_case(path)
        try:
            compile_spec(case.path, case.preset, case.overrides)
        except CompileError as error:
            without_fix += [f"{path.name}: {d.render()}" for d in error.diagnostics if not (d.fix and d.fix.strip())]
    assert not without_fix, "diagnostics without a fix:\n" + "\n".join(without_fix)


# ------------------------------------------------------------------------------------------- nothing ever runs
SPEC_TAIL = """
model: {d_model: 64, vocab_size: 256}
mixers:
  attn: {kind: attention, n_heads: 4}
layout: {n_layers: 2, mixers: attn}
"""

# Each payload writes the marker file when loaded by yaml.unsafe_load; the test proves that first, so the
# payload is live, then proves archgen never runs it.
PAYLOADS = {
    "apply-sequence": "description: !!python/object/apply:builtins.exec [\"open(r'{marker}', 'w').close()\"]",
    "apply-mapping": "description: !!python/object/apply:builtins.exec {{args: [\"open(r'{marker}', 'w').close()\"]}}",
    "apply-on-model": "extra: !!python/object/apply:builtins.exec [\"open(r'{marker}', 'w').close()\"]",
}


@pytest.mark.parametrize("payload", list(PAYLOADS.values()), ids=list(PAYLOADS))
def test_python_tags_run_nothing(payload, tmp_path):
    marker = tmp_path / "RAN"
    text = f"schema_version: 1\nname: tagged\n{payload.format(marker=marker)}\n{SPEC_TAIL}"
    yaml.unsafe_load(text)
    assert marker.exists(), "the payload is live: an unsafe loader runs it"
    marker.unlink()

    spec = tmp_path / "tagged.yaml"
    spec.write_text(text, encoding="utf-8")
    with pytest.raises(CompileError):
        compile_spec(spec)
    assert not marker.exists()
