"""Emit: IR -> a generated package (plan what to write, render templates, write atomically)."""

from __future__ import annotations

from dataclasses import dataclass

from archgen.emit.plan import DEFAULT_OUTPUT, EmitPlan, make_plan
from archgen.emit.render import render_package
from archgen.emit.write import diff_package, write_package
from archgen.passes.cost import cost_report
from archgen.pipeline import Compiled


@dataclass(frozen=True)
class Emitted:
    plan: EmitPlan
    files: dict[str, str]


def emit(compiled: Compiled, spec_path: str, output_root: str = DEFAULT_OUTPUT) -> Emitted:
    """The package's files; `output_root` is the directory it goes into, as the user named it (its README's commands
    use it)."""
    report = cost_report(compiled.ir)
    plan = make_plan(compiled.ir, report, spec_path, output_root)
    return Emitted(plan, render_package(plan, compiled.ir))


__all__ = ["Emitted", "emit", "write_package", "diff_package"]
