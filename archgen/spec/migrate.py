"""Schema versions: a spec written for an older schema is rewritten step by step, never silently reinterpreted.

Version 1 is the first published schema, so the chain of steps is empty today; each future change to the spec
language that renames or moves a field adds one `_STEPS[n]` that rewrites version n data into version n + 1.
"""

from __future__ import annotations

from collections.abc import Callable

from archgen.errors import CompileError, Diagnostic
from archgen.spec.models import SCHEMA_VERSION
from archgen.spec.yaml_source import SourceMap

_STEPS: dict[int, Callable[[dict], dict]] = {}


def migrate(data: dict, source_map: SourceMap) -> dict:
    version = data.get("schema_version")
    if version is None:
        raise CompileError([Diagnostic("schema_version", "required key 'schema_version' is missing",
                                       f"add 'schema_version: {SCHEMA_VERSION}' as the first line", source_map.locate(()))])
    if not isinstance(version, int) or isinstance(version, bool) or version < 1 or version > SCHEMA_VERSION:
        raise CompileError([Diagnostic("schema_version",
                                       f"schema_version {version!r} is not known to this archgen (it reads 1..{SCHEMA_VERSION})",
                                       f"write schema_version: {SCHEMA_VERSION}, or upgrade archgen if the spec is newer",
                                       source_map.locate(("schema_version",)))])
    while version < SCHEMA_VERSION:
        data = _STEPS[version](data)
        version += 1
        data["schema_version"] = version
    return data
