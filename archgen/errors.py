"""Diagnostics: problems found in a spec, carried as values with a source location until the CLI prints them."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

Severity = Literal["error", "warning"]


@dataclass(frozen=True)
class SourceLocation:
    file: str
    line: int | None = None  # 1-based
    column: int | None = None  # 1-based

    def __str__(self) -> str:
        parts = [self.file]
        if self.line is not None:
            parts.append(str(self.line))
            if self.column is not None:
                parts.append(str(self.column))
        return ":".join(parts)


@dataclass(frozen=True)
class Diagnostic:
    """One problem: where it is (file position and spec path), what is wrong, and what to change."""

    path: str  # dotted spec path, e.g. "mixers.attn.n_kv_heads"; "" for the whole document
    message: str
    fix: str | None = None
    location: SourceLocation | None = None
    severity: Severity = "error"

    def render(self) -> str:
        where = f"{self.location}: " if self.location else ""
        at = f"{self.path}: " if self.path else ""
        text = f"{where}{self.severity}: {at}{self.message}"
        if self.fix:
            text += f"\n    fix: {self.fix}"
        return text


@dataclass
class CompileError(Exception):
    """Raised at a stage boundary when a spec has errors; carries every diagnostic found, not only the first."""

    diagnostics: list[Diagnostic] = field(default_factory=list)

    def __str__(self) -> str:
        return "\n".join(d.render() for d in self.diagnostics)


def dotted(path: tuple[str | int, ...] | list[str | int]) -> str:
    """('mixers', 'attn', 'rope', 'theta') -> 'mixers.attn.rope.theta'; list indices become '[3]'."""
    text = ""
    for part in path:
        if isinstance(part, int):
            text += f"[{part}]"
        else:
            text += f".{part}" if text else str(part)
    return text
