"""Read YAML safely and remember where every value came from.

Only plain data is built (mappings, sequences, strings, numbers, booleans, null): the document is composed into
nodes with PyYAML's safe resolver and converted here, so no tag can construct an object or run code.
Each value's position is kept in a table keyed by its path, so a later stage can point at the line of any field.

A spec file is untrusted input, so reading it is bounded before anything is built: the file's size (`MAX_SPEC_BYTES`,
overridable through ARCHGEN_MAX_SPEC_BYTES), the nesting depth (PyYAML's composer recurses once per level and ends in a
RecursionError near 500), and the number of values once aliases are expanded (a "billion laughs" document of a few
hundred bytes expands to billions of values). The bounds are checked on PyYAML's event stream, which is flat and
keeps aliases unexpanded, so a hostile document is refused in time linear in its length.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

import yaml

from archgen.errors import CompileError, Diagnostic, SourceLocation, dotted

Path = tuple[str | int, ...]


@dataclass
class SourceMap:
    """Positions of the values of one document, by path; falls back to the nearest enclosing value."""

    file: str
    positions: dict[Path, tuple[int, int]] = field(default_factory=dict)  # path -> (line, column), 1-based
    origins: dict[Path, str] = field(default_factory=dict)  # path -> a note on where a value came from (preset, --set)
    # path -> (line, column) of the first character of a one-line string's text, so errors inside it can point at a column
    text_starts: dict[Path, tuple[int, int]] = field(default_factory=dict)

    def locate_in_text(self, path: Path, offset: int | None) -> SourceLocation:
        """The location of character `offset` inside the string at `path` (falls back to the value's position)."""
        if offset is not None and path in self.text_starts and path not in self.origins:
            line, column = self.text_starts[path]
            return SourceLocation(self.file, line, column + offset)
        return self.locate(path)

    def forget_below(self, path: Path) -> None:
        """Drop the positions of `path` and everything under it (its value was replaced by a preset or --set)."""
        for table in (self.positions, self.text_starts, self.origins):
            for known in [k for k in table if k[: len(path)] == path]:
                del table[known]

    def locate(self, path: Path) -> SourceLocation:
        probe = tuple(path)
        # A problem with a value that an override replaced part of (an unknown kind set by --set) belongs to the override.
        overridden = [key for key in self.origins if probe and key[: len(probe)] == probe]
        if overridden:
            return SourceLocation(self.origins[min(overridden)])
        while True:
            if probe in self.origins:
                return SourceLocation(self.origins[probe])
            if probe in self.positions:
                line, column = self.positions[probe]
                return SourceLocation(self.file, line, column)
            if not probe:
                return SourceLocation(self.file)
            probe = probe[:-1]


MAX_SPEC_BYTES = 1 << 20  # the seed specs are 2-5 KB; a megabyte of YAML takes PyYAML seconds to read
MAX_DEPTH = 32  # the deepest real path is 6 levels (presets.tiny.mixers.attn.rope.theta)
MAX_VALUES = 100_000  # values after alias expansion: a list layout of one item per layer stays far below it


def max_spec_bytes() -> int:
    """The size bound on a spec file: MAX_SPEC_BYTES, or ARCHGEN_MAX_SPEC_BYTES when set to a positive integer."""
    configured = os.environ.get("ARCHGEN_MAX_SPEC_BYTES", "").strip()
    return int(configured) if configured.isdigit() and int(configured) > 0 else MAX_SPEC_BYTES


def decode_spec_bytes(data: bytes, file: str, limit: int | None = None) -> str:
    """Check the size of a spec file's bytes and decode them as UTF-8; raise located diagnostics otherwise."""
    limit = max_spec_bytes() if limit is None else limit
    if len(data) > limit:
        shown = f"{len(data):,} bytes" if len(data) <= limit + 1 else f"more than {limit:,} bytes"
        raise CompileError([Diagnostic("", f"the spec file is {shown}, above the limit of {limit:,} bytes",
                                       "a spec describes an architecture in a few kilobytes: check that this is the right file, "
                                       "or "
                                       f"raise the limit with ARCHGEN_MAX_SPEC_BYTES={max(limit * 2, len(data))}",
                                       SourceLocation(file, 1, 1))])
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as error:
        line, column = _line_column(data, error.start)
        bad = data[error.start : error.end].hex(" ")
        raise CompileError([Diagnostic("", f"byte {bad} is not UTF-8 ({error.reason})",
                                       "save the spec as UTF-8 text (a spec is YAML, never binary), or delete the byte",
                                       SourceLocation(file, line, column))]) from None


def _line_column(data: bytes, offset: int) -> tuple[int, int]:
    """1-based line and column (in characters) of byte `offset` of `data`, which is UTF-8 up to there."""
    before = data[:offset]
    line_start = before.rfind(b"\n") + 1
    return before.count(b"\n") + 1, len(before[line_start:].decode("utf-8", "replace")) + 1


def load_yaml(text: str, file: str) -> tuple[Any, SourceMap]:
    """Parse `text` into plain Python data and a SourceMap. Raises CompileError (located) on invalid YAML."""
    source_map = SourceMap(file)
    check_bounds(text, file)
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.MarkedYAMLError as error:
        mark = error.problem_mark or error.context_mark
        location = SourceLocation(file, mark.line + 1, mark.column + 1) if mark else SourceLocation(file)
        problem = error.problem or str(error)
        fix = "fix the YAML syntax at this position"
        if error.context and error.context_mark is not None:
            # PyYAML says where the construct it could not finish began ("while parsing a flow mapping ... line 11").
            mark = error.context_mark
            fix = f"{error.context} that starts at line {mark.line + 1}, column {mark.column + 1}: check it is closed"
        raise CompileError([Diagnostic("", f"invalid YAML: {problem}", fix, location)]) from None
    except yaml.reader.ReaderError as error:
        # A character YAML does not allow in a document (a control character, a lone surrogate escape's code point).
        line, column = _text_line_column(text, error.position)
        shown = f"{chr(error.character)!r} (U+{error.character:04X})"
        raise CompileError([Diagnostic("", f"invalid YAML: character {shown} is not allowed",
                                       "delete the character; inside a double-quoted string it can be written as an escape",
                                       SourceLocation(file, line, column))]) from None
    except yaml.YAMLError as error:
        raise CompileError([Diagnostic("", f"invalid YAML: {error}", "fix the YAML syntax (see the YAML message above)",
                                       SourceLocation(file))]) from None
    if node is None:
        return None, source_map
    problems: list[Diagnostic] = []
    data = _to_python(node, (), source_map, problems)
    if problems:
        raise CompileError(problems)
    return data, source_map


def _text_line_column(text: str, offset: int) -> tuple[int, int]:
    before = text[:offset]
    return before.count("\n") + 1, offset - (before.rfind("\n") + 1) + 1


_EventParser = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # libyaml when present: the bound check costs little


def check_bounds(text: str, file: str) -> None:
    """Refuse documents nested deeper than MAX_DEPTH or holding more than MAX_VALUES values once aliases expand.

    Walks the event stream lazily, where an alias is one event: each collection's expanded size and height are summed
    as it closes and remembered under its anchor, so an alias costs what its anchor costs without being expanded, and
    the walk stops at the first bound passed. A syntax error ends the walk silently: the composer that runs next
    reports it with PyYAML's own message.
    """
    try:
        _BoundedWalk(file).run(yaml.parse(text, Loader=_EventParser))
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        if "nesting depth" in (getattr(error, "problem", None) or "") and mark is not None:  # libyaml's own cap: 1000 levels
            raise CompileError([Diagnostic("", f"values are nested more than {MAX_DEPTH} levels deep", _FLATTEN,
                                           SourceLocation(file, mark.line + 1, mark.column + 1))]) from None
        # libyaml refuses a few documents PyYAML reads: walk PyYAML's own events instead.
        try:
            _BoundedWalk(file).run(yaml.parse(text, Loader=yaml.SafeLoader))
        except yaml.YAMLError:
            return


_FLATTEN = "flatten the structure: a spec nests a few levels (presets.tiny.mixers.attn.rope.theta is 6)"


class _BoundedWalk:
    def __init__(self, file: str) -> None:
        self.file = file
        self.sizes: list[int] = []  # expanded values inside each open collection
        self.heights: list[int] = []  # levels of nesting inside each open collection (1 for a collection of scalars)
        self.anchor_names: list[str | None] = []
        self.anchors: dict[str, tuple[int, int]] = {}  # anchor -> (expanded values, height), the value itself included
        self.total = 0

    def run(self, events) -> None:
        for event in events:
            if isinstance(event, yaml.CollectionStartEvent):
                self.add(event, 1, 1)
                self.sizes.append(0)
                self.heights.append(1)
                self.anchor_names.append(event.anchor)
            elif isinstance(event, yaml.CollectionEndEvent):
                inside, height, anchor = self.sizes.pop(), self.heights.pop(), self.anchor_names.pop()
                if self.sizes:
                    self.sizes[-1] += inside  # the collection itself was counted in its parent when it opened
                    self.heights[-1] = max(self.heights[-1], height + 1)
                if anchor is not None:
                    self.anchors[anchor] = (inside + 1, height)
            elif isinstance(event, yaml.ScalarEvent):
                self.add(event, 1, 0)
                if event.anchor is not None:
                    self.anchors[event.anchor] = (1, 0)
            elif isinstance(event, yaml.AliasEvent):
                self.add(event, *self.anchors.get(event.anchor, (1, 0)))

    def add(self, event: yaml.Event, size: int, height: int) -> None:
        """Count a value of `size` expanded values nested `height` levels deep at the current position."""
        self.total += size
        if self.sizes:
            self.sizes[-1] += size
            self.heights[-1] = max(self.heights[-1], height + 1)
        if self.total > MAX_VALUES:
            raise self.refuse(event, f"the document expands to more than {MAX_VALUES:,} values (through aliases or sheer length)",
                              "write the values out plainly: a spec needs neither aliases that repeat large parts "
                              "nor this many values")
        if len(self.sizes) + height > MAX_DEPTH:
            raise self.refuse(event, f"values are nested more than {MAX_DEPTH} levels deep", _FLATTEN)

    def refuse(self, event: yaml.Event, message: str, fix: str) -> CompileError:
        mark = event.start_mark
        return CompileError([Diagnostic("", message, fix, SourceLocation(self.file, mark.line + 1, mark.column + 1))])


_scalar_loader = yaml.SafeLoader("")


def _to_python(node: yaml.Node, path: Path, source_map: SourceMap, problems: list[Diagnostic]) -> Any:
    source_map.positions[path] = (node.start_mark.line + 1, node.start_mark.column + 1)
    if node.tag not in _PLAIN_TAGS:
        problems.append(_problem(node, path, f"tag {node.tag!r} is not allowed in a spec", source_map, "remove the tag"))
        return None
    if isinstance(node, yaml.MappingNode):
        result: dict[str, Any] = {}
        for key_node, value_node in node.value:
            if not isinstance(key_node, yaml.ScalarNode) or key_node.tag not in _PLAIN_TAGS:
                problems.append(_problem(key_node, path, "mapping keys must be plain names (no tags, merge keys or complex keys)",
                                         source_map, "write the key as a plain name"))
                continue
            key = _scalar(key_node, path, source_map, problems)
            if key is None:
                continue
            key = str(key)
            if key in result:
                problems.append(_problem(key_node, path + (key,), f"key '{key}' appears twice", source_map, "keep one of them"))
                continue
            result[key] = _to_python(value_node, path + (key,), source_map, problems)
            # Point at the key rather than the value: for a nested block the key's line is the one a person looks for.
            source_map.positions[path + (key,)] = (key_node.start_mark.line + 1, key_node.start_mark.column + 1)
        return result
    if isinstance(node, yaml.SequenceNode):
        return [_to_python(item, path + (i,), source_map, problems) for i, item in enumerate(node.value)]
    if node.start_mark.line == node.end_mark.line:
        quote = 1 if node.style in ("'", '"') else 0
        source_map.text_starts[path] = (node.start_mark.line + 1, node.start_mark.column + 1 + quote)
    return _scalar(node, path, source_map, problems)


def _scalar(node: yaml.ScalarNode, path: Path, source_map: SourceMap, problems: list[Diagnostic]) -> Any:
    """Build a plain scalar; an explicit tag that does not fit its text (`!!int sixty-four`) is a located problem."""
    try:
        return _scalar_loader.construct_object(node)
    except (yaml.YAMLError, ValueError, KeyError, TypeError) as error:
        problems.append(_problem(node, path, f"cannot read {node.value!r} as {node.tag.rsplit(':', 1)[-1]}: {error}",
                                 source_map, "remove the explicit tag or fix the value"))
        return None


_PLAIN_TAGS = {
    "tag:yaml.org,2002:map",
    "tag:yaml.org,2002:seq",
    "tag:yaml.org,2002:str",
    "tag:yaml.org,2002:int",
    "tag:yaml.org,2002:float",
    "tag:yaml.org,2002:bool",
    "tag:yaml.org,2002:null",
}


def _problem(node: yaml.Node, path: Path, message: str, source_map: SourceMap, fix: str | None = None) -> Diagnostic:
    location = SourceLocation(source_map.file, node.start_mark.line + 1, node.start_mark.column + 1)
    return Diagnostic(dotted(path), message, fix, location)
