"""Fuzzing the front end: whatever text or data a spec holds, archgen compiles it or reports located diagnostics.

Random YAML text and bytes, random YAML-able data, and random mutations of the real specs (delete a key, replace a
value with a random scalar, list or mapping, rename a key, insert a key) must give a compiled spec whose cost report
can be computed, or a CompileError whose every diagnostic has a location: never any other exception, never a hang.

Numbers drawn here stay within realistic magnitudes (|int| <= 2**20, finite floats). Huge and non-finite sizes once
crashed or hung archgen; the minimised inputs are pinned below as regression cases (`FORMER_CRASHES`).
"""

from __future__ import annotations

import os
import signal
import tempfile
from contextlib import contextmanager
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from archgen.errors import CompileError
from archgen.passes.cost import cost_report
from archgen.pipeline import compile_spec

ROOT = Path(__file__).resolve().parents[2]
SPECS = sorted((ROOT / "specs").glob("*.yaml")) + sorted((ROOT / "tests" / "specs" / "published").glob("*.yaml"))
# By default the examples are the same on every run (derandomized, no example database), so the suite is
# deterministic and the file takes about 10 s. ARCHGEN_FUZZ_EXAMPLES=5000 runs a longer, random hunt instead.
_HUNT = os.environ.get("ARCHGEN_FUZZ_EXAMPLES")
FUZZ = settings(max_examples=int(_HUNT or 100), deadline=None, derandomize=not _HUNT,
                database=settings.default.database if _HUNT else None, suppress_health_check=[HealthCheck.too_slow])
_WORKDIR = tempfile.TemporaryDirectory(prefix="archgen-fuzz-")


class TooSlow(Exception):
    """Compiling one small spec took longer than the time limit (not an OSError, so archgen cannot swallow it)."""


@contextmanager
def time_limit(seconds: float):
    def expire(_signum, _frame):
        raise TooSlow(f"compiling took over {seconds} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def compile_or_report(text: str | bytes, preset: str | None = None, seconds: float = 10) -> None:
    """Compile `text` as a spec file; pass if it compiles (and costs) or fails with located diagnostics only."""
    path = Path(_WORKDIR.name) / "fuzzed.yaml"
    path.write_bytes(text if isinstance(text, bytes) else text.encode("utf-8"))
    with time_limit(seconds):
        try:
            compiled = compile_spec(path, preset)
        except CompileError as error:
            assert error.diagnostics, "a CompileError must carry at least one diagnostic"
            for diagnostic in error.diagnostics:
                assert diagnostic.location is not None and diagnostic.location.file, f"unlocated: {diagnostic.render()}"
                assert diagnostic.message
                assert diagnostic.fix, f"no fix: {diagnostic.render()}"
            return
        cost_report(compiled.ir, seq_len=64)


def dump(data) -> str:
    return yaml.safe_dump(data, sort_keys=False, allow_unicode=True)


# ------------------------------------------------------------------------------------------ random text, bytes
YAML_ALPHABET = (st.sampled_from(list("abcdkmnst_0123456789 :-,[]{}()|*#&!?'\"\n\t.%@`>"))
                 | st.characters(exclude_categories=["Cs"]))


@FUZZ
@given(st.text(YAML_ALPHABET, max_size=200))
def test_random_text_compiles_or_reports_located_errors(text):
    compile_or_report(text)


@FUZZ
@given(st.binary(max_size=100))
def test_random_bytes_compile_or_report_located_errors(data):
    compile_or_report(data)


@FUZZ
@given(st.text(YAML_ALPHABET, max_size=80), st.sampled_from(SPECS), st.integers(min_value=0, max_value=10_000))
def test_random_text_spliced_into_a_real_spec_compiles_or_reports_located_errors(text, spec, at):
    source = spec.read_text(encoding="utf-8")
    at %= len(source) + 1
    compile_or_report(source[:at] + text + source[at:])


# ------------------------------------------------------------------------------------------------- random data
NUMBERS = st.integers(-(2**20), 2**20) | st.sampled_from([0, -1, 1, 2, 3, 7, 64, 4096]) | st.floats(-1e6, 1e6)
SCALARS = st.none() | st.booleans() | NUMBERS | st.text(max_size=12) | st.sampled_from(["auto", "none", "attn", "ssm"])
KEYS = st.sampled_from(["schema_version", "name", "model", "mixers", "ffns", "layout", "kind", "d_model", "n_heads",
                        "vocab_size", "n_layers", "presets", "ratio", "offset", "heads"]) | st.text(max_size=8)
DATA = st.recursive(SCALARS, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(KEYS, inner, max_size=4), max_leaves=20)


@FUZZ
@given(DATA)
def test_random_data_compiles_or_reports_located_errors(data):
    compile_or_report(dump(data))


@FUZZ
@given(st.dictionaries(KEYS, DATA, max_size=8))
def test_random_mapping_with_schema_version_compiles_or_reports_located_errors(data):
    compile_or_report(dump({"schema_version": 1, **data}))


# ------------------------------------------------------------------------------------------ mutated real specs
def paths(node, prefix=()):
    """Every path to a value inside `node` (dict keys and list indices)."""
    found = []
    items = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else []
    for key, value in items:
        found.append(prefix + (key,))
        found += paths(value, prefix + (key,))
    return found


def parent_of(data, path):
    node = data
    for key in path[:-1]:
        node = node[key]
    return node


@st.composite
def mutated_specs(draw):
    """A real spec with one to three mutations: delete, replace, rename or insert; compiled as base or tiny."""
    spec = draw(st.sampled_from(SPECS))
    data = yaml.safe_load(spec.read_text(encoding="utf-8"))
    for _ in range(draw(st.integers(min_value=1, max_value=3))):
        where = draw(st.sampled_from(paths(data)))
        parent, key = parent_of(data, where), where[-1]
        mutation = draw(st.sampled_from(["delete", "replace", "rename", "insert"]))
        if mutation == "delete":
            del parent[key]
        elif mutation == "replace":
            parent[key] = draw(DATA)
        elif mutation == "rename" and isinstance(parent, dict):
            parent[draw(KEYS)] = parent.pop(key)
        elif isinstance(parent, dict):
            parent[draw(KEYS)] = draw(DATA)
        else:
            parent.insert(key, draw(DATA))
    return data, draw(st.sampled_from([None, "tiny"]))


@FUZZ
@given(mutated_specs())
def test_mutated_spec_compiles_or_reports_located_errors(case):
    data, preset = case
    compile_or_report(dump(data), preset)


@pytest.mark.parametrize("spec", SPECS, ids=[s.stem for s in SPECS])
def test_unmutated_specs_compile(spec):
    """The mutation test starts from specs that compile, so every failure it finds comes from a mutation."""
    compile_or_report(spec.read_bytes())


# ------------------------------------------------------------------------------------- known crashes, minimised
def minimal_spec(*, d_model: str = "64", vocab_size: str = "256", mixer: str = "{kind: attention, n_heads: 4}",
                 ffn: str | None = None, extra: str = "") -> str:
    """A two-layer spec with one mixer `m` (and one feed-forward `f`), plus `extra` top-level text."""
    lines = ["schema_version: 1", "name: minimal", f"model: {{d_model: {d_model}, vocab_size: {vocab_size}}}",
             f"mixers: {{m: {mixer}}}"]
    if ffn:
        lines.append(f"ffns: {{f: {ffn}}}")
    lines += [extra, "layout: {n_layers: 2, mixers: m" + (", ffns: f}" if ffn else "}")]
    return "\n".join(lines) + "\n"


HUGE = "1" + "0" * 400

FORMER_CRASHES = [
    pytest.param(
        minimal_spec(extra="!reference note: 1"),
        id="tag-on-a-key",
    ),
    pytest.param(
        minimal_spec(d_model="!!int sixty-four"),
        id="int-tag-on-text",
    ),
    pytest.param(
        minimal_spec(ffn="{kind: mlp, multiplier: .inf}"),
        id="ffn-multiplier-inf",
    ),
    pytest.param(
        minimal_spec(d_model="1000000007"),
        id="d_model-1e9-hangs",
    ),
    pytest.param(
        minimal_spec(d_model=HUGE, mixer="{kind: mamba}"),
        id="mamba-d_model-1e400",
    ),
    pytest.param(
        minimal_spec(extra="heads: {jepa: {kind: jepa, predictor_layers: 1180591620717411303424}}"),
        id="jepa-predictor_layers-2e70",
    ),
    pytest.param(
        minimal_spec(extra="memory: {kind: titans, depth: 1180591620717411303424}"),
        id="titans-depth-2e70",
    ),
    pytest.param(
        minimal_spec(vocab_size=HUGE),
        id="cost-vocab_size-1e400",
    ),
]


@pytest.mark.parametrize("text", FORMER_CRASHES)
def test_known_crash_input_compiles_or_reports_located_errors(text):
    compile_or_report(text, seconds=2)


# ------------------------------------------------------------------------- anything check accepts also builds
TEXT_FIELDS = st.text(st.characters(), max_size=40) | st.sampled_from(["\x00", "\ud800", '"""', "\\", "\u202e", "\x1b[0m"])


@settings(max_examples=int(_HUNT or 25), deadline=None, derandomize=not _HUNT, database=None,
          suppress_health_check=[HealthCheck.too_slow])
@given(TEXT_FIELDS, st.sampled_from(SPECS[:4]))
def test_any_description_check_accepts_also_renders_as_valid_python(text, spec):
    """Free text is validated at load, so a spec that checks never makes `build` fail (NUL, surrogates, controls)."""
    from archgen.emit import emit

    data = yaml.safe_load(spec.read_text(encoding="utf-8"))
    data["description"] = text
    path = Path(_WORKDIR.name) / "described.yaml"
    path.write_bytes(dump(data).encode("utf-8", "surrogatepass"))
    try:
        compiled = compile_spec(path, "tiny")
    except CompileError as error:
        assert all(d.fix and d.location for d in error.diagnostics)
        return
    files = emit(compiled, "described.yaml").files  # compiles every generated .py; raises on invalid Python
    for body in files.values():
        body.encode("utf-8")  # every file can be written as UTF-8
