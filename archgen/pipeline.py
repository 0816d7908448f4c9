"""The compiler front half as one flat function: load -> resolve -> lower -> passes."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from archgen.ir.graph import IR, lower
from archgen.passes import PASSES
from archgen.resolve.resolve import ResolvedSpec, resolve
from archgen.spec.load import LoadedSpec, load_spec


@dataclass(frozen=True)
class Compiled:
    loaded: LoadedSpec
    resolved: ResolvedSpec
    ir: IR


def compile_spec(path: str | Path, preset: str | None = None, overrides: tuple[str, ...] | list[str] = ()) -> Compiled:
    loaded = load_spec(path, preset, overrides)
    resolved = resolve(loaded)
    ir = lower(resolved)
    for run_pass in PASSES:
        ir = run_pass(ir)
    return Compiled(loaded, resolved, ir)
