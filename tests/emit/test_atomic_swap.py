"""The swap of a built tree: killed at the exact moment between any two of its steps, `DIR/<name>` is the old tree or
the new one, or (only where the two-rename fallback runs) the next build puts the old one back and says so.

Each case runs a build in a subprocess whose `after_step` hook calls os._exit at one named step, the way SIGKILL
would stop it there: no finally blocks, no cleanup.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from archgen.emit import write
from archgen.emit.write import recover_interrupted_swap, write_package

ROOT = Path(__file__).resolve().parents[2]
OLD = {"__init__.py": "VERSION = 'old'\n", "model.py": "# old\n"}
NEW = {"__init__.py": "VERSION = 'new'\n", "model.py": "# new\n", "ops/extra.py": "# only in the new tree\n"}


def build_and_die_at(step: str, target: Path, exchange: bool) -> int:
    """Write NEW over `target` in a subprocess that exits (status 9, no cleanup) right after `step`."""
    script = textwrap.dedent(f"""
        import os, sys
        sys.path.insert(0, {str(ROOT)!r})
        from archgen.emit import write
        def die(name):
            if name == {step!r}:
                os._exit(9)
        write.after_step = die
        write.write_package({NEW!r}, write.Path({str(target)!r}), exchange={exchange!r})
    """)
    return subprocess.run([sys.executable, "-c", script], timeout=60).returncode


def tree(directory: Path) -> dict[str, str]:
    return {str(p.relative_to(directory)): p.read_text() for p in directory.rglob("*") if p.is_file()}


@pytest.mark.parametrize("step", ["staged", "exchanged", "retired"])
def test_killed_at_any_step_of_an_exchange_the_target_is_the_old_or_the_new_tree(step, tmp_path):
    target = tmp_path / "pkg"
    write_package(OLD, target)
    assert build_and_die_at(step, target, exchange=True) == 9
    assert tree(target) in (OLD, NEW)
    assert tree(target) == (OLD if step == "staged" else NEW)
    notes = write_package(NEW, target)  # the next build cleans what the killed one left
    assert tree(target) == NEW
    assert [p.name for p in tmp_path.iterdir()] == ["pkg"]
    assert bool(notes) == (step != "retired")


def test_killed_between_the_two_renames_the_next_build_recovers_the_old_tree_and_says_so(tmp_path):
    target = tmp_path / "pkg"
    write_package(OLD, target, exchange=False)
    assert build_and_die_at("set-aside", target, exchange=False) == 9
    assert not target.exists()  # the window the fallback has, which the exchange does not

    notes = recover_interrupted_swap(target)
    assert tree(target) == OLD
    assert any("killed between the two renames" in note and "previous tree is back" in note for note in notes)
    assert [p.name for p in tmp_path.iterdir()] == ["pkg"]


def test_the_next_build_after_a_kill_between_renames_recovers_then_builds(tmp_path):
    target = tmp_path / "pkg"
    write_package(OLD, target, exchange=False)
    assert build_and_die_at("set-aside", target, exchange=False) == 9
    notes = write_package(NEW, target)
    assert tree(target) == NEW and any("recovered" in note for note in notes)


@pytest.mark.parametrize("step", ["staged", "renamed", "retired"])
def test_killed_at_other_steps_of_the_fallback_the_target_is_whole(step, tmp_path):
    target = tmp_path / "pkg"
    write_package(OLD, target, exchange=False)
    assert build_and_die_at(step, target, exchange=False) == 9
    assert tree(target) == (OLD if step == "staged" else NEW)


def test_a_first_build_killed_before_its_rename_leaves_no_target_and_no_debris_after_the_next(tmp_path):
    target = tmp_path / "pkg"
    assert build_and_die_at("staged", target, exchange=True) == 9
    assert not target.exists()
    write_package(NEW, target)
    assert tree(target) == NEW and [p.name for p in tmp_path.iterdir()] == ["pkg"]


def test_leftovers_of_a_build_still_running_are_left_alone(tmp_path):
    target = tmp_path / "pkg"
    write_package(OLD, target)
    running = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        busy = tmp_path / f".pkg.building-{running.pid}-abc"
        busy.mkdir()
        assert recover_interrupted_swap(target) == []
        assert busy.exists()
    finally:
        running.kill()
        running.wait()


def test_the_exchange_is_used_where_the_system_offers_it(tmp_path, monkeypatch):
    if getattr(write._libc(), "renameat2", None) is None:
        pytest.skip("no renameat2 in this C library")
    steps = []
    monkeypatch.setattr(write, "after_step", steps.append)
    write_package(OLD, tmp_path / "pkg")
    write_package(NEW, tmp_path / "pkg")
    assert steps == ["staged", "renamed", "staged", "exchanged", "retired"]
