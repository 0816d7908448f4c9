"""Builds are byte-identical, atomic, and `build --check` sees drift."""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner

from archgen.cli import main
from archgen.emit import emit, write_package
from archgen.pipeline import compile_spec
from tests.conftest import ROOT, SPECS


@pytest.mark.parametrize("spec_path", SPECS, ids=[p.stem for p in SPECS])
def test_two_builds_are_byte_identical(spec_path, tmp_path, monkeypatch):
    runner = CliRunner()
    for out in ("a", "b"):  # the same -o (the package's README names it), from two directories
        (tmp_path / out).mkdir()
        monkeypatch.chdir(tmp_path / out)
        result = runner.invoke(main, ["build", str(spec_path), "--preset", "tiny", "-o", ".", "--quiet"])
        assert result.exit_code == 0, result.output
    files_a = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*") if p.is_file())
    files_b = sorted(p.relative_to(tmp_path / "b") for p in (tmp_path / "b").rglob("*") if p.is_file())
    assert files_a == files_b
    for relative in files_a:
        assert (tmp_path / "a" / relative).read_bytes() == (tmp_path / "b" / relative).read_bytes(), relative


def test_failed_write_leaves_previous_output_intact(tmp_path, monkeypatch):
    spec = ROOT / "specs" / "hspmn.yaml"
    emitted = emit(compile_spec(spec, "tiny"), "specs/hspmn.yaml")
    target = tmp_path / "hspmn"
    write_package(emitted.files, target)
    before = {p: p.read_bytes() for p in target.rglob("*") if p.is_file()}

    def broken_write(self, *args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(Path, "write_text", broken_write)
    with pytest.raises(OSError, match="disk full"):
        write_package({**emitted.files, "model.py": "changed"}, target)
    monkeypatch.undo()
    assert {p: p.read_bytes() for p in target.rglob("*") if p.is_file()} == before
    assert [p.name for p in tmp_path.iterdir()] == ["hspmn"], "the staging directory must be removed"


def test_build_check_reports_drift(tmp_path):
    runner = CliRunner()
    args = ["build", str(ROOT / "specs" / "hspmn.yaml"), "--preset", "tiny", "-o", str(tmp_path)]
    assert runner.invoke(main, args + ["--quiet"]).exit_code == 0
    assert runner.invoke(main, args + ["--check"]).exit_code == 0
    model = tmp_path / "hspmn" / "model.py"
    model.write_text(model.read_text() + "# hand edit\n")
    result = runner.invoke(main, args + ["--check"])
    assert result.exit_code == 1
    assert "# hand edit" in result.output


def test_committed_generated_packages_are_up_to_date(monkeypatch):
    """generated/ is what specs/ and templates/ produce (CI runs `archgen build --check` too)."""
    from archgen.emit import diff_package

    monkeypatch.chdir(ROOT)  # `archgen build` records the spec path as given, relative to the repository
    for spec in SPECS:
        compiled = compile_spec(spec.relative_to(ROOT))
        emitted = emit(compiled, spec.relative_to(ROOT).as_posix())
        diffs = diff_package(emitted.files, ROOT / "generated" / compiled.resolved.name)
        assert not diffs, f"generated/{compiled.resolved.name} is stale: run `archgen build`\n" + "\n".join(diffs)[:3000]
