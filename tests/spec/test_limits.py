"""Hostile spec files: huge, deeply nested, alias bombs, binary bytes, text a generated file cannot carry.

Each is refused quickly, with a located diagnostic that carries a fix, and through the command line with exit 2 and
no traceback. The time limits are far above what the bounded reader takes (milliseconds) and far below what the
unbounded one took (a 324-byte alias bomb ran past 60 s; 10,000 nested brackets ended in a RecursionError).
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from archgen.errors import CompileError
from archgen.spec.load import load_spec, load_spec_text
from archgen.spec.yaml_source import MAX_DEPTH, MAX_SPEC_BYTES, MAX_VALUES

ROOT = Path(__file__).resolve().parents[2]
VALID = """schema_version: 1
name: bounded
model: {d_model: 64, vocab_size: 256}
mixers:
  attn: {kind: attention, n_heads: 4}
layout: {n_layers: 2, mixers: attn}
"""


def refused(text: str, seconds: float = 5.0) -> CompileError:
    started = time.perf_counter()
    with pytest.raises(CompileError) as caught:
        load_spec_text(text, "hostile.yaml")
    assert time.perf_counter() - started < seconds
    for diagnostic in caught.value.diagnostics:
        assert diagnostic.location is not None and diagnostic.location.line is not None, diagnostic.render()
        assert diagnostic.fix, diagnostic.render()
    return caught.value


def billion_laughs(levels: int) -> str:
    lines = ["a0: &a0 [lol, lol, lol, lol, lol, lol, lol, lol, lol]"]
    lines += [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 9)}]" for i in range(1, levels)]
    return "\n".join(lines) + "\n"


@pytest.mark.parametrize("levels", [6, 9, 12])
def test_an_alias_bomb_is_refused_at_the_alias_that_passes_the_bound(levels):
    error = refused(billion_laughs(levels))
    (diagnostic,) = error.diagnostics
    assert f"more than {MAX_VALUES:,} values" in diagnostic.message
    assert diagnostic.location.line == 6  # a5 is the first level whose expansion (9**6 values) passes 100,000


def test_aliases_within_the_bound_still_work():
    text = VALID + "presets:\n  small: &small {model: {d_model: 32}}\n  also_small: *small\n"
    assert load_spec_text(text, "ok.yaml", "also_small").spec.model.d_model == 32


@pytest.mark.parametrize("opening, closing", [("[", "]"), ("{a: ", "}")], ids=["sequences", "mappings"])
@pytest.mark.parametrize("depth", [MAX_DEPTH + 1, 600, 10_000])
def test_deep_nesting_is_refused_not_a_recursion_error(opening, closing, depth):
    error = refused("x: " + opening * depth + "1" * (opening != "[") + closing * depth)
    assert f"nested more than {MAX_DEPTH} levels deep" in error.diagnostics[0].message


def test_deep_block_nesting_is_refused_at_the_first_level_too_deep():
    text = "".join(" " * i + f"k{i}:\n" for i in range(200)) + " " * 200 + "v: 1\n"
    error = refused(text)
    assert error.diagnostics[0].location.line == MAX_DEPTH + 1


def test_nesting_within_the_bound_is_read():
    depth = MAX_DEPTH - 2
    with pytest.raises(CompileError) as caught:
        load_spec_text(VALID + "extra: " + "[" * depth + "]" * depth + "\n", "ok.yaml")
    assert "unknown key 'extra'" in caught.value.diagnostics[0].message  # read, then refused as a spec


def test_a_file_above_the_size_bound_is_refused_before_it_is_read(tmp_path):
    spec = tmp_path / "huge.yaml"
    spec.write_text(VALID + "# " + "x" * (20 * MAX_SPEC_BYTES) + "\n", encoding="utf-8")
    started = time.perf_counter()
    with pytest.raises(CompileError) as caught:
        load_spec(spec)
    assert time.perf_counter() - started < 1.0
    (diagnostic,) = caught.value.diagnostics
    assert f"above the limit of {MAX_SPEC_BYTES:,} bytes" in diagnostic.message
    assert "ARCHGEN_MAX_SPEC_BYTES" in diagnostic.fix
    assert (diagnostic.location.file, diagnostic.location.line) == (str(spec), 1)


def test_the_size_bound_can_be_raised(tmp_path, monkeypatch):
    spec = tmp_path / "padded.yaml"
    spec.write_text(VALID + "# " + "x" * MAX_SPEC_BYTES + "\n", encoding="utf-8")
    with pytest.raises(CompileError):
        load_spec(spec)
    monkeypatch.setenv("ARCHGEN_MAX_SPEC_BYTES", str(2 * MAX_SPEC_BYTES))
    assert load_spec(spec).spec.name == "bounded"


@pytest.mark.parametrize("data, line, column", [
    (b"\xff\xfe\x00\x00binary", 1, 1),
    (VALID.encode() + b"description: caf\xc3\xa9 \xe9t\xe9\n", 7, 19),
    (b"schema_version: 1\nname: x\x80\n", 2, 8),
])
def test_bytes_that_are_not_utf8_are_located_by_line_and_column(tmp_path, data, line, column):
    spec = tmp_path / "binary.yaml"
    spec.write_bytes(data)
    with pytest.raises(CompileError) as caught:
        load_spec(spec)
    (diagnostic,) = caught.value.diagnostics
    assert "is not UTF-8" in diagnostic.message and diagnostic.fix
    assert (diagnostic.location.line, diagnostic.location.column) == (line, column)


def test_a_control_character_in_the_file_is_located():
    error = refused(VALID + "description: a\x01b\n")
    assert "U+0001" in error.diagnostics[0].message
    assert (error.diagnostics[0].location.line, error.diagnostics[0].location.column) == (7, 15)


# ------------------------------------------------------------------------------------------ through the CLI
def cli(*args: str | bytes, cwd: Path = ROOT, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run archgen in a subprocess: argv bytes that are not UTF-8 reach Python as they would from a shell."""
    command = [sys.executable.encode(), b"-m", b"archgen", *(a if isinstance(a, bytes) else str(a).encode() for a in args)]
    environment = {**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}
    return subprocess.run(command, cwd=cwd, capture_output=True, timeout=120, env=environment)


@pytest.mark.parametrize("text", [billion_laughs(9), "x: " + "[" * 10_000 + "]" * 10_000], ids=["alias-bomb", "deep"])
def test_hostile_files_exit_2_with_a_located_error_and_no_traceback(tmp_path, text):
    spec = tmp_path / "hostile.yaml"
    spec.write_text(text, encoding="utf-8")
    result = cli("check", spec)
    stderr = result.stderr.decode("utf-8", "replace")
    assert result.returncode == 2, stderr
    assert "Traceback" not in stderr and f"{spec}:" in stderr and "fix:" in stderr


def test_a_file_name_with_a_byte_that_is_not_utf8_builds(tmp_path):
    directory = os.fsencode(tmp_path)
    spec = directory + b"/spec\xff.yaml"
    with open(spec, "wb") as handle:
        handle.write((ROOT / "specs" / "hspmn.yaml").read_bytes())
    result = cli("build", spec, "--preset", "tiny", "-o", directory + b"/out")
    stderr = result.stderr.decode("utf-8", "replace")
    assert result.returncode == 0, stderr
    header = (tmp_path / "out" / "hspmn" / "model.py").read_text(encoding="utf-8").splitlines()[0]
    assert "spec\\\\xff.yaml" in header  # shown escaped in the docstring, never a UnicodeEncodeError


@pytest.mark.parametrize("override", [b"description=x\xffy", b"model.d\xff=3"], ids=["value", "key"])
def test_an_override_with_a_byte_that_is_not_utf8_is_an_error_not_a_traceback(tmp_path, override):
    result = cli("build", ROOT / "specs" / "hspmn.yaml", "--preset", "tiny", "--set", override, "-o", tmp_path)
    stderr = result.stderr.decode("utf-8", "replace")
    assert result.returncode == 2, stderr
    assert "Traceback" not in stderr and "the override holds the byte 0xFF" in stderr and "fix:" in stderr
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize("description", ['"a\\0b"', '"a\\ud800b"', '"a\\x1bb"', '"a\\u2028b"'],
                         ids=["nul", "lone-surrogate", "escape", "line-separator"])
def test_text_that_check_refuses_is_what_build_could_not_write(tmp_path, description):
    spec = tmp_path / "text.yaml"
    spec.write_text(VALID + f"description: {description}\n", encoding="utf-8")
    for command in ("check", "build"):
        result = cli(command, spec, "-o", tmp_path / "out") if command == "build" else cli(command, spec)
        stderr = result.stderr.decode("utf-8", "replace")
        assert result.returncode == 2, stderr
        assert "Traceback" not in stderr and "description: the description holds" in stderr
    assert not (tmp_path / "out").exists()


def test_printable_text_of_every_script_builds(tmp_path):
    spec = tmp_path / "text.yaml"
    text = 'Ünïcödé — 漢字 \\"\\"\\" ends a docstring? \\\\ backslash, tab\\there, emoji 🙂, {{ jinja }} {% raw %}'
    spec.write_text(VALID + f'description: "{text}"\n', encoding="utf-8")
    result = cli("build", spec, "-o", tmp_path / "out")
    assert result.returncode == 0, result.stderr.decode("utf-8", "replace")
    assert "漢字" in (tmp_path / "out" / "bounded" / "model.py").read_text(encoding="utf-8")
