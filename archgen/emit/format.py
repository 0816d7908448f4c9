"""The last step of generation: every Python file archgen rendered goes through ruff's formatter.

The version is pinned (pyproject.toml), settings are passed on the command line and `--isolated` ignores any
configuration around the output folder, so the same spec gives the same bytes on every machine. Files copied
verbatim (ops/, kernels/<op>.py) are left as their authors wrote them.
"""

from __future__ import annotations

import subprocess
from functools import cache

from archgen.errors import CompileError, Diagnostic

LINE_LENGTH = 130  # the project's own (pyproject.toml [tool.ruff])


@cache
def ruff_binary() -> str:
    try:
        from ruff.__main__ import find_ruff_bin

        return str(find_ruff_bin())
    except Exception as error:  # not installed, or its binary missing (RuffNotFound)
        fix = "install archgen's dependencies again (pip install ruff==0.17.6)"
        raise CompileError([Diagnostic("", f"cannot format the emitted code: ruff is missing ({error})", fix)]) from None


def format_python(text: str, path: str) -> str:
    """`text` as `ruff format` writes it; `path` names the file in errors (and tells ruff it is Python)."""
    command = [ruff_binary(), "format", "--isolated", f"--line-length={LINE_LENGTH}", "--stdin-filename", path, "-"]
    result = subprocess.run(command, input=text, capture_output=True, text=True, encoding="utf-8", check=False)
    if result.returncode != 0:
        message = f"ruff could not format the emitted {path}: {result.stderr.strip()}"
        raise CompileError([Diagnostic("", message, "this is an archgen bug: please report it with the spec")])
    return result.stdout
