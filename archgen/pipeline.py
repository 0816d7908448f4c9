"""The compiler front half as one flat function: load -> resolve -> lower -> passes."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from archgen.ir.graph import IR, lower
from archgen.passes import PASSES
from archgen.passes.verify import verify_ir
from archgen.resolve.resolve import ResolvedSpec, resolve
from archgen.spec.load import LoadedSpec, load_spec


@dataclass(frozen=True)
class Compiled:
    loaded: LoadedSpec
    resolved: ResolvedSpec
    ir: IR


def compile_spec(path: str | Path, preset: str | None = None, overrides: tuple[str, ...] | list[str] = (),
                 verify: bool | None = None) -> Compiled:
    """verify: check the IR after lowering and after every pass (default: the ARCHGEN_VERIFY_IR environment variable)."""
    verify = os.environ.get("ARCHGEN_VERIFY_IR", "") not in ("", "0") if verify is None else verify
    loaded = load_spec(path, preset, overrides)
    resolved = resolve(loaded)
    ir = lower(resolved)
    if verify:
        verify_ir(ir, "lower")
    for run_pass in PASSES:
        ir = run_pass(ir)
        if verify:
            verify_ir(ir, run_pass.__name__)
    return Compiled(loaded, resolved, ir)
