"""Load a spec: YAML text -> presets and --set overrides applied -> migrated -> validated `Spec`, or located errors.

`load_spec` is the stage's one public function. Every problem becomes a `Diagnostic` with the file, line and column,
the dotted spec path and a fix; all of them are collected and raised together as one `CompileError`.
"""

from __future__ import annotations

import copy
import difflib
import types
import typing
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pydantic

from archgen.errors import CompileError, Diagnostic, SourceLocation, dotted
from archgen.spec import models
from archgen.spec.checks import check_spec
from archgen.spec.limits import check_model_limits
from archgen.spec.migrate import migrate
from archgen.spec.text import printable
from archgen.spec.text import unencodable as _unencodable
from archgen.spec.yaml_source import SourceMap, check_bounds, decode_spec_bytes, load_yaml, max_spec_bytes


@dataclass(frozen=True)
class LoadedSpec:
    spec: models.Spec
    source_map: SourceMap
    preset: str | None
    overrides: tuple[str, ...]
    warnings: tuple[Diagnostic, ...] = ()


def load_spec(path: str | Path, preset: str | None = None, overrides: tuple[str, ...] | list[str] = ()) -> LoadedSpec:
    path = Path(path)
    file = str(path)
    limit = max_spec_bytes()
    try:
        with path.open("rb") as handle:
            data = handle.read(limit + 1)  # never more than the bound: a huge file is refused without reading it all
    except OSError as error:
        reason = error.strerror or type(error).__name__
        raise CompileError([Diagnostic("", f"cannot read spec: {reason}", "pass the path of a readable UTF-8 YAML file",
                                       SourceLocation(file))]) from None
    return load_spec_text(decode_spec_bytes(data, file, limit), file, preset, overrides)


def load_spec_text(text: str, file: str, preset: str | None = None, overrides: tuple[str, ...] | list[str] = ()) -> LoadedSpec:
    data, source_map = load_yaml(text, file)
    if not isinstance(data, dict):
        got = "an empty document" if data is None else f"a {type(data).__name__}"
        raise CompileError([Diagnostic("", f"a spec must be a mapping of keys to values, got {got}",
                                       "start from an example in specs/, e.g. specs/hspmn.yaml", SourceLocation(file, 1, 1))])
    data = migrate(data, source_map)
    data = copy.deepcopy(data)
    if preset is not None:
        # "tiny,interleaved" applies presets left to right, so size and layout variants compose.
        for name in preset.split(","):
            data = _apply_preset(data, name.strip(), source_map)
    for override in overrides:
        data = _apply_override(data, override, source_map)

    try:
        spec = models.Spec.model_validate(data)
    except pydantic.ValidationError as error:
        raise CompileError([_diagnostic_from_pydantic(item, data, source_map) for item in error.errors()]) from None

    problems = check_spec(spec) + check_model_limits(spec)
    located = [_locate(problem, source_map) for problem in problems]
    errors = [d for d in located if d.severity == "error"]
    if errors:
        raise CompileError(errors)
    warnings = tuple(d for d in located if d.severity == "warning")
    return LoadedSpec(spec, source_map, preset, tuple(overrides), warnings)


# ------------------------------------------------------------------------------------------- presets, overrides
def _apply_preset(data: dict, preset: str, source_map: SourceMap) -> dict:
    presets = data.get("presets") or {}
    if not isinstance(presets, dict) or preset not in presets:
        names = sorted(presets) if isinstance(presets, dict) else []
        fix = f"use one of: {', '.join(names)}" if names else "define it under 'presets:' in the spec"
        close = difflib.get_close_matches(preset, names, n=1)
        if close:
            fix = f"did you mean '{close[0]}'? ({fix})"
        raise CompileError([Diagnostic("presets", f"preset '{preset}' is not defined", fix, source_map.locate(("presets",)))])
    body = presets[preset]
    if not isinstance(body, dict):
        raise CompileError([Diagnostic(f"presets.{preset}", "a preset must be a mapping of spec fields to override",
                                       "write it like the spec itself, e.g. {model: {d_model: 64}}",
                                       source_map.locate(("presets", preset)))])
    for forbidden in ("presets", "schema_version", "name"):
        if forbidden in body:
            raise CompileError([Diagnostic(f"presets.{preset}.{forbidden}", f"a preset cannot change '{forbidden}'",
                                           f"remove '{forbidden}' from the preset",
                                           source_map.locate(("presets", preset, forbidden)))])
    _deep_merge(data, body, (), ("presets", preset), source_map)
    return data


def _deep_merge(target: dict, patch: dict, path: tuple, patch_path: tuple, source_map: SourceMap) -> None:
    """Merge `patch` into `target`; merged values take the position they have inside the preset."""
    for key, value in patch.items():
        here = path + (key,)
        if isinstance(value, dict) and isinstance(target.get(key), dict):
            _deep_merge(target[key], value, here, patch_path + (key,), source_map)
            continue
        target[key] = copy.deepcopy(value)
        source_map.forget_below(here)  # the base value's positions no longer describe what is there
        for table in (source_map.positions, source_map.text_starts):
            for known in list(table):
                if known[: len(patch_path) + 1] == patch_path + (key,):
                    table[here + known[len(patch_path) + 1 :]] = table[known]


def _apply_override(data: dict, override: str, source_map: SourceMap) -> dict:
    origin = printable(f"--set {override}")
    key_text, sep, value_text = override.partition("=")
    keys = key_text.strip().split(".")
    if not sep or not all(keys):
        raise CompileError([Diagnostic("", f"cannot read override {override!r}",
                                       "write --set dotted.path=value, e.g. --set model.d_model=512", SourceLocation(origin))])
    unreadable = _unencodable(override)
    if unreadable is not None:
        raise CompileError([Diagnostic(printable(".".join(keys)), f"the override holds {unreadable}, which is not text",
                                       "pass the override as UTF-8 text", SourceLocation(printable(origin)))])
    check_bounds(value_text, origin)  # a value is YAML too, and could hold an alias bomb
    try:
        value, _ = load_yaml(value_text, origin)
    except CompileError:
        value = value_text  # not YAML: the text itself (validated as whatever the field wants)
    node = data
    for i, key in enumerate(keys[:-1]):
        child = node.get(key) if isinstance(node, dict) else None
        if child is None:
            child = {}
            node[key] = child
        if not isinstance(child, dict):
            raise CompileError([Diagnostic(".".join(keys[: i + 1]),
                                           f"cannot set '{key_text}': '{'.'.join(keys[: i + 1])}' is not a mapping",
                                           "override a leaf field, e.g. --set mixers.attn.n_heads=8", SourceLocation(origin))])
        node = child
    node[keys[-1]] = value
    source_map.forget_below(tuple(keys))
    source_map.origins[tuple(keys)] = origin
    return data


# ------------------------------------------------------------------------------------------ pydantic -> located
_UNION_TAGS = {"pattern", "list", "ratio"}


def _spec_path(loc: tuple, data: Any, error_type: str) -> tuple:
    """Turn pydantic's loc into a path through the data: drop discriminator tags and union member names."""
    path: list = []
    node = data
    for i, part in enumerate(loc):
        last = i == len(loc) - 1
        if isinstance(node, dict) and part in node:
            path.append(part)
            node = node[part]
        elif isinstance(node, list) and isinstance(part, int) and part < len(node):
            path.append(part)
            node = node[part]
        elif last and error_type == "missing":
            path.append(part)
        elif part == "[key]":
            continue  # pydantic's marker for "the key itself", which the path already ends at
        elif isinstance(part, str) and (part in _UNION_TAGS or (isinstance(node, dict) and node.get("kind") == part)):
            continue  # a discriminator tag, not a key of the document
        elif last and isinstance(node, dict):
            path.append(part)
    return tuple(path)


def _siblings(data: Any, path: tuple) -> list[str]:
    """The other keys of the mapping that holds `path`'s last key."""
    node = data
    for part in path[:-1]:
        node = node.get(part) if isinstance(node, dict) else None
    return [str(key) for key in node if key != path[-1]] if isinstance(node, dict) and path else []


def _kind_tags(path: tuple) -> list[str]:
    """The `kind` values the spec language accepts at `path` (e.g. every mixer kind at mixers.<name>), read from the
    models' annotations: pydantic's error for a missing tag does not list them."""
    annotation = _annotation_at(models.Spec, path)
    members = typing.get_args(annotation) or (annotation,)
    return [tag for member in members for tag in _kind_literals(member)]


def _unwrap(annotation: Any) -> Any:
    """Strip Annotated[...] and Optional from an annotation."""
    while typing.get_origin(annotation) is typing.Annotated:
        annotation = typing.get_args(annotation)[0]
    members = [a for a in typing.get_args(annotation) if a is not type(None)]
    if typing.get_origin(annotation) in (typing.Union, types.UnionType) and len(members) == 1:
        return _unwrap(members[0])
    return annotation


def model_at(root: type[pydantic.BaseModel], loc: tuple) -> type[pydantic.BaseModel] | None:
    """The model whose mapping pydantic's `loc` (discriminator tags included) ends at, walking the annotations from
    `root` (models.Spec, a recipe's Recipe); None where it is no model or the walk cannot get there."""
    return _as_model(_annotation_at(root, loc))


def _annotation_at(root: type[pydantic.BaseModel], loc: tuple) -> Any:
    """The annotation (Annotated and Optional stripped) of what `loc` ends at; None where the walk meets what it
    cannot follow (a key no model has, a union without a `kind` tag in the loc)."""
    annotation: Any = root
    for part in loc:
        annotation = _unwrap(annotation)
        origin = typing.get_origin(annotation)
        if origin in (typing.Union, types.UnionType):
            tagged = [m for m in typing.get_args(annotation) if part in _kind_literals(m)]
            if not tagged:
                return None
            annotation = tagged[0]
        elif _as_model(annotation) is not None:
            field = annotation.model_fields.get(str(part))
            if field is None:
                return None
            annotation = field.annotation
        elif origin is dict:
            annotation = typing.get_args(annotation)[1]
        elif origin in (list, tuple) and isinstance(part, int):
            annotation = typing.get_args(annotation)[0]
        else:
            return None
    return _unwrap(annotation)


def _as_model(annotation: Any) -> type[pydantic.BaseModel] | None:
    annotation = _unwrap(annotation)
    return annotation if isinstance(annotation, type) and issubclass(annotation, pydantic.BaseModel) else None


def _kind_literals(member: Any) -> tuple:
    kind = getattr(member, "model_fields", {}).get("kind")
    return typing.get_args(kind.annotation) if kind is not None else ()


def unknown_key_fix(root: type[pydantic.BaseModel], loc: tuple, path: tuple, every_name: Iterable[str],
                    schema_command: str = "archgen schema") -> str:
    """The fix for the key that pydantic's `loc` (`path` in the document) ends at, which its mapping does not take.
    Where another mapping near it takes the key, that one: a nested mapping (MoE's `hidden` under `expert`), the
    enclosing one (attention's `n_kv_heads` written inside its `rope`) or a neighbour (a recipe's `seq_len` under
    `data`, not `batch`). Else the closest key that this mapping takes (of `every_name`, every model's, where the
    walk from `root` cannot name the mapping); else remove it."""
    key, holder = str(loc[-1]), model_at(root, loc[:-1])
    if nested := _fields_holding(holder, key):
        return f"'{key}' belongs under '{nested[0]}': {nested[0]}: {{{key}: ...}}"
    if len(path) >= 2:
        enclosing = model_at(root, loc[:-2])
        if enclosing is not None and key in enclosing.model_fields:
            level = f"one level up, in {dotted(path[:-2])}" if len(path) >= 3 else "at the top level"
            return f"'{key}' belongs {level}, beside '{path[-2]}'"
        if neighbours := [name for name in _fields_holding(enclosing, key) if name != path[-2]]:
            where = dotted((*path[:-2], neighbours[0]))
            return f"'{key}' belongs under '{where}': {neighbours[0]}: {{{key}: ...}}"
    allowed = sorted(holder.model_fields) if holder is not None else sorted(every_name)
    close = difflib.get_close_matches(key, [name for name in allowed if name != key], n=1)
    if close:
        return f"did you mean '{close[0]}'?"
    return f"remove '{key}' (see `{schema_command}` for the allowed keys)"


def _fields_holding(model: type[pydantic.BaseModel] | None, key: str) -> list[str]:
    """The fields of `model` whose value is a mapping that takes `key`."""
    fields = model.model_fields.items() if model is not None else ()
    return [name for name, field in fields if key in getattr(_as_model(field.annotation), "model_fields", ())]


def missing_key_fix(key: str, model: type[pydantic.BaseModel] | None, where_else: str = "") -> str:
    """Add the key; where its value is a mapping, with that mapping's required keys, or the keys it takes."""
    if model is None:
        return f"add '{key}: ...' here{where_else}"
    required = [name for name, field in model.model_fields.items() if field.is_required()]
    if required:
        return f"add '{key}: {{{', '.join(f'{name}: ...' for name in required)}}}' here"
    return f"add '{key}: {{...}}' here (its keys: {', '.join(model.model_fields)})"


def _all_field_names() -> set[str]:
    names: set[str] = set()
    for obj in vars(models).values():
        if isinstance(obj, type) and issubclass(obj, pydantic.BaseModel):
            names.update(obj.model_fields)
    return names


_FIELD_NAMES = _all_field_names()


def _diagnostic_from_pydantic(item: dict, data: Any, source_map: SourceMap) -> Diagnostic:
    kind = item["type"]
    path = _spec_path(tuple(item["loc"]), data, kind)
    message = item["msg"]
    value = item.get("input")
    context = item.get("ctx") or {}
    field = str(path[-1]) if path else "the value"
    fix = f"see `archgen schema` for what '{field}' accepts"
    if kind == "spec_rule":
        message, fix = context["message"], context["fix"]
    elif kind == "extra_forbidden":
        key = path[-1] if path else "?"
        message = f"unknown key '{key}'"
        fix = unknown_key_fix(models.Spec, tuple(item["loc"]), path, _FIELD_NAMES)
    elif kind == "missing":
        message = f"required key '{path[-1]}' is missing"
        fix = missing_key_fix(str(path[-1]), model_at(models.Spec, tuple(item["loc"])))
    elif kind in ("union_tag_invalid", "union_tag_not_found"):
        expected = context.get("expected_tags") or ", ".join(f"'{tag}'" for tag in _kind_tags(path))
        if kind == "union_tag_not_found":
            message = "missing 'kind'"
        else:
            message = f"unknown kind {context.get('tag')!r}"
        fix = f"set kind to one of: {expected}"
        siblings = _siblings(data, path)
        close = difflib.get_close_matches(str(path[-1]), siblings, n=1) if kind == "union_tag_not_found" and path else []
        if close:  # most often a misspelled name in --set, which made a new entry instead of changing one
            message = f"'{path[-1]}' is not one of {dotted(path[:-1])} ({', '.join(siblings)}), and as a new entry it has no kind"
            fix = f"did you mean '{close[0]}'? (a new entry needs a kind: one of {expected})"
    elif kind == "literal_error":
        message = f"{value!r} is not allowed"
        fix = f"use {context.get('expected', 'one of the listed values')}"
    elif kind == "string_pattern_mismatch":
        message = f"{value!r} is not a valid name"
        fix = "use lower-case letters, digits and underscores, starting with a letter or underscore (at most 63 characters)"
    elif kind.startswith(("greater_than", "less_than")):
        message = f"{value!r}: {message[0].lower()}{message[1:]}"
        bound = next(iter(context.values()), None)
        fix = f"use a value {_BOUND_WORDS.get(kind, 'within the bound')} {bound}" if bound is not None else "change the value"
    elif kind == "value_error":
        message = message.removeprefix("Value error, ")
    else:
        message = f"{_shown(value)}: {message[0].lower()}{message[1:]}" if "input" in item else message
        fix = _type_fix(kind, value, field, context)
    return Diagnostic(dotted(path), message, fix, source_map.locate(path))


_BOUND_WORDS = {"greater_than": "above", "greater_than_equal": "of at least", "less_than": "below",
                "less_than_equal": "of at most"}


def _shown(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else f"{text[:57]}..."


def _type_fix(kind: str, value: Any, field: str, context: dict) -> str:
    """What to write instead of a value of the wrong type, from pydantic's error type and the value given."""
    if kind in ("int_parsing", "int_type", "int_from_float"):
        if isinstance(value, str) and value.strip().lstrip("+-").isdigit():
            return f"remove the quotes: {field}: {int(value)}"
        if isinstance(value, float) and value == value and abs(value) < 1e18:
            low, high = int(value // 1), int(value // 1) + 1
            nearest = f"{low}" if low == value else f"{low} or {high}"
            return f"use a whole number, e.g. {field}: {nearest}"
        if isinstance(value, bool):
            return f"write a whole number (true/false are booleans), e.g. {field}: 64"
        return f"write a whole number without quotes, e.g. {field}: 64"
    if kind in ("float_parsing", "float_type", "finite_number"):
        if isinstance(value, str):
            try:
                return f"remove the quotes: {field}: {float(value)!r}"
            except ValueError:
                pass
        if kind == "finite_number":
            return f"use a finite number, e.g. {field}: 1.0e-5"
        return f"write a number without quotes, e.g. {field}: 0.01"
    if kind in ("bool_parsing", "bool_type"):
        return f"write true or false, e.g. {field}: true"
    if kind in ("string_type", "string_too_long", "string_too_short"):
        return f"write text, e.g. {field}: example (quote it if it starts with a digit or holds ': ')"
    if kind in ("dict_type", "model_type", "model_attributes_type", "mapping_type"):
        return f"write a mapping of keys to values under '{field}', e.g. {{key: value}}"
    if kind in ("too_short", "too_long"):
        bound = context.get("min_length") if kind == "too_short" else context.get("max_length")
        return f"give {'at least' if kind == 'too_short' else 'at most'} {bound} item{'s' if bound != 1 else ''} under '{field}'"
    if kind in ("list_type", "tuple_type"):
        return f"write a list under '{field}', e.g. [a, b]"
    if kind == "layout_form":
        return "write a pattern string like '(ssm*3, attn)*8', a list with one item per layer, or {ratio: {attn: 1, ssm: 7}}"
    return f"see `archgen schema` for what '{field}' accepts"


def _locate(problem: Diagnostic, source_map: SourceMap) -> Diagnostic:
    if problem.location is not None:
        return problem
    path = tuple(int(p) if p.isdigit() else p for p in problem.path.replace("[", ".").replace("]", "").split(".") if p)
    return Diagnostic(problem.path, problem.message, problem.fix, source_map.locate(path), problem.severity)
