"""Read YAML safely and remember where every value came from.

Only plain data is built (mappings, sequences, strings, numbers, booleans, null): the document is composed into
nodes with PyYAML's safe resolver and converted here, so no tag can construct an object or run code.
Each value's position is kept in a table keyed by its path, so a later stage can point at the line of any field.
"""

from __future__ import annotations

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


def load_yaml(text: str, file: str) -> tuple[Any, SourceMap]:
    """Parse `text` into plain Python data and a SourceMap. Raises CompileError (located) on invalid YAML."""
    source_map = SourceMap(file)
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
    except yaml.YAMLError as error:
        raise CompileError([Diagnostic("", f"invalid YAML: {error}", None, SourceLocation(file))]) from None
    if node is None:
        return None, source_map
    problems: list[Diagnostic] = []
    data = _to_python(node, (), source_map, problems)
    if problems:
        raise CompileError(problems)
    return data, source_map


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
