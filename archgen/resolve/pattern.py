"""Layout pattern text, e.g. '(ssm*3, attn)*8', expanded to one Slot per layer, and slots rendered back to text.

    sequence := item (',' item)*
    item     := group ('*' INT)?          repetition, INT >= 1
    group    := atom ('|' atom)*          one layer whose branches run in parallel
    atom     := NAME | '(' sequence ')'

'|' builds a single layer, so every branch must be exactly one layer: '(a, b)|c' and '(a*2)|b' are errors,
while '(a|b)|c' is accepted and flattens to 'a|b|c' because it still describes one layer.

A syntax error stops the parse, since the tokens after it can no longer be read with confidence; unknown
names, bad counts and bad parallel groups are collected, so one run reports all of them.
"""

from __future__ import annotations

import itertools
import re
from collections import Counter
from collections.abc import Collection, Sequence
from dataclasses import dataclass

from archgen.resolve.layout_types import MAX_LAYERS, LayoutProblem, Slot, unknown_name_problem

# Each '(' costs a few Python stack frames; this keeps the parser far from the recursion limit.
MAX_NESTING = 64

# A count is anything digit-led, so '2.5' and '3x' are reported as bad counts, not as a count plus stray text.
_TOKEN = re.compile(r"(?P<name>[A-Za-z_][A-Za-z0-9_]*)|(?P<count>-?[0-9][A-Za-z0-9_.]*)|(?P<symbol>[(),*|])")
_STRAY = re.compile(r"[^\sA-Za-z0-9_(),*|]+")
_WHITESPACE = re.compile(r"\s+")
_GRAMMAR_FIX = "separate layers with ',', repeat with '*N', run components in parallel with '|'; e.g. '(ssm*3, attn)*8'"


@dataclass(frozen=True)
class _Token:
    kind: str  # 'name', 'count', 'end', or the symbol itself: '(' ')' ',' '*' '|'
    text: str
    column: int


@dataclass(frozen=True)
class _Repeat:
    """`body` laid out in order, `count` times. The length is stored so size checks never have to expand."""

    body: tuple[Slot | _Repeat, ...]
    count: int
    length: int


def _repeat(body: Sequence[Slot | _Repeat], count: int) -> _Repeat:
    return _Repeat(tuple(body), count, count * sum(_length(part) for part in body))


def _length(node: Slot | _Repeat) -> int:
    return 1 if isinstance(node, Slot) else node.length


def _expand(node: Slot | _Repeat) -> list[Slot]:
    return [node] if isinstance(node, Slot) else [slot for part in node.body for slot in _expand(part)] * node.count


def _shorten(text: str, limit: int = 40) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _tokenize(text: str) -> tuple[list[_Token], list[LayoutProblem]]:
    tokens: list[_Token] = []
    problems: list[LayoutProblem] = []
    position = 0
    while position < len(text):
        if space := _WHITESPACE.match(text, position):
            position = space.end()
        elif token := _TOKEN.match(text, position):
            kind = token.group() if token.lastgroup == "symbol" else token.lastgroup
            tokens.append(_Token(kind, token.group(), position))
            position = token.end()
        else:  # every character that starts no token, '-' before a non-digit included, is in _STRAY's class
            stray = _STRAY.match(text, position)
            message = f"unexpected character {_shorten(stray.group())!r} at column {position}"
            fix = f"component names use only ASCII letters, digits and '_'; {_GRAMMAR_FIX}"
            problems.append(LayoutProblem(message, fix, position))
            position = stray.end()
    return tokens + [_Token("end", "", len(text))], problems


class _SyntaxStop(Exception):
    """Raised once a syntax error is recorded, to unwind the recursive descent in one step."""


class _Parser:
    def __init__(self, text: str, tokens: list[_Token], known_names: frozenset[str], allow_parallel: bool):
        self.text, self.tokens, self.index = text, tokens, 0
        self.known_names, self.allow_parallel = known_names, allow_parallel
        self.problems: list[LayoutProblem] = []
        self.reported_unknown: set[str] = set()
        self.nesting = 0

    def peek(self) -> _Token:
        return self.tokens[self.index]

    def take(self) -> _Token:
        self.index += 1
        return self.tokens[self.index - 1]

    def report(self, message: str, fix: str, column: int) -> None:
        self.problems.append(LayoutProblem(message, fix, column))

    def stop(self, message: str, fix: str, column: int) -> _SyntaxStop:
        self.report(message, fix, column)
        return _SyntaxStop()

    def unexpected(self, expected: str, fix: str) -> _SyntaxStop:
        token = self.peek()
        found = "the end of the pattern" if token.kind == "end" else repr(_shorten(token.text))
        return self.stop(f"expected {expected} at column {token.column}, found {found}", fix, token.column)

    def unclosed(self, paren: _Token) -> _SyntaxStop:
        return self.stop(f"'(' at column {paren.column} is never closed", "add the matching ')'", paren.column)

    def parse(self) -> Slot | _Repeat:
        tree = self.sequence()
        if self.peek().kind == ")":
            column = self.peek().column
            raise self.stop(f"')' at column {column} has no matching '('", "remove it or add the '(' it closes", column)
        if self.peek().kind != "end":
            raise self.unexpected("',' or the end of the pattern", _GRAMMAR_FIX)
        return tree

    def sequence(self) -> Slot | _Repeat:
        items = [self.item()]
        while self.peek().kind == ",":
            comma = self.take()
            if self.peek().kind in ("end", ")"):
                fix = "remove it or add a layer after it"
                raise self.stop(f"trailing ',' at column {comma.column}", fix, comma.column)
            items.append(self.item())
        return items[0] if len(items) == 1 else _repeat(items, 1)

    def item(self) -> Slot | _Repeat:
        group = self.group()
        if self.peek().kind != "*":
            return group
        star = self.take()
        if self.peek().kind != "count":
            fix = "write a whole number >= 1 after '*', e.g. 'ssm*3'"
            raise self.stop(f"'*' at column {star.column} has no count", fix, star.column)
        return _repeat([group], self.count(self.take()))

    def count(self, token: _Token) -> int:
        """The repeat count; a bad one is reported and read as 1, so the rest of the pattern is still checked."""
        shown, column = _shorten(token.text), token.column
        if not re.fullmatch(r"-?[0-9]+", token.text):
            fix = "use a whole number >= 1, e.g. 'ssm*3'"
            self.report(f"repeat count {shown!r} at column {column} is not a whole number", fix, column)
            return 1
        digits = token.text.lstrip("-").lstrip("0") or "0"
        magnitude = int(digits) if len(digits) <= 9 else MAX_LAYERS + 1  # int() refuses over 4300 digits
        value = -magnitude if token.text.startswith("-") else magnitude
        if value < 1:
            fix = "use a count >= 1, or delete the item to leave it out"
            self.report(f"repeat count must be at least 1, got {shown} at column {column}", fix, column)
        elif value > MAX_LAYERS:
            fix = "use a smaller count"
            self.report(f"repeat count {shown} at column {column} is above the limit of {MAX_LAYERS}", fix, column)
        return value if 1 <= value <= MAX_LAYERS else 1

    def group(self) -> Slot | _Repeat:
        starts, branches, bars = [self.peek().column], [self.atom()], []
        while self.peek().kind == "|":
            bars.append(self.take())
            starts.append(self.peek().column)
            branches.append(self.atom())
        if not bars:
            return branches[0]
        if not self.allow_parallel:
            column = bars[0].column
            message = f"'|' at column {column}: parallel composition is only for mixers, not feed-forward placement"
            self.report(message, "give one feed-forward component per layer, e.g. 'moe, mlp', not 'moe|mlp'", column)
            return Slot(())
        ends = [bar.column for bar in bars] + [self.peek().column]
        names: list[str] = []
        for branch, start, end in zip(branches, starts, ends, strict=True):
            if _length(branch) == 1:
                names.extend(_expand(branch)[0].names)
                continue
            source = _shorten(self.text[start:end].strip())
            layers = _length(branch)
            message = f"parallel branch {source!r} at column {start} is {layers} layers; '|' joins single layers"
            fix = "put '|' between single components and repeat the group, e.g. '(attn|ssm)*2', not '(attn*2)|ssm'"
            self.report(message, fix, start)
        for name, times in Counter(names).items():
            if times > 1:
                message = f"'{name}' appears {times} times in the parallel layer at column {starts[0]}"
                fix = f"list '{name}' once; each branch of a parallel layer is a different component"
                self.report(message, fix, starts[0])
        return Slot(tuple(dict.fromkeys(names)))

    def atom(self) -> Slot | _Repeat:
        token = self.peek()
        if token.kind == "name":
            self.take()
            if token.text not in self.known_names and token.text not in self.reported_unknown:
                self.reported_unknown.add(token.text)
                where = f"at column {token.column}"
                self.problems.append(unknown_name_problem(token.text, self.known_names, token.column, where))
            return Slot((token.text,))
        if token.kind != "(":
            raise self.unexpected("a component name or '('", f"start each layer with a component name; {_GRAMMAR_FIX}")
        self.take()
        if self.peek().kind == ")":
            fix = "put at least one layer inside the parentheses, or remove them"
            raise self.stop(f"empty group '()' at column {token.column}", fix, token.column)
        if self.peek().kind == "end":
            raise self.unclosed(token)
        if self.nesting == MAX_NESTING:
            message = f"parentheses nested over {MAX_NESTING} deep at column {token.column}"
            raise self.stop(message, "flatten the pattern", token.column)
        self.nesting += 1
        inner = self.sequence()
        self.nesting -= 1
        if self.peek().kind == "end":
            raise self.unclosed(token)
        if self.peek().kind != ")":
            raise self.unexpected("',' or ')'", _GRAMMAR_FIX)
        self.take()
        return inner


def _either(options: Sequence[int]) -> str:
    """[1, 2, 4] -> '1, 2 or 4'."""
    words = [str(option) for option in options]
    return words[0] if len(words) == 1 else ", ".join(words[:-1]) + " or " + words[-1]


def _tile(slots: list[Slot], n_layers: int | None) -> tuple[list[Slot], list[LayoutProblem]]:
    """Repeat the pattern's own layers up to n_layers, so that 'moe' alone fills a 32-layer model."""
    length = len(slots)
    if n_layers is None or n_layers % length == 0:
        return slots * (1 if n_layers is None else n_layers // length), []
    divisors = [d for d in range(1, n_layers + 1) if n_layers % d == 0]
    multiples = [m for m in (n_layers // length * length, (n_layers // length + 1) * length) if m > 0]
    message = f"pattern expands to {length} layers, which does not divide n_layers={n_layers}"
    fix = (
        f"make the pattern {_either(divisors)} layer{'s' if divisors != [1] else ''} long, "
        f"or set n_layers to a multiple of {length} ({_either(multiples)})"
    )
    return [], [LayoutProblem(message, fix, None)]


def expand_pattern(
    text: str, known_names: Collection[str], n_layers: int | None = None, *, allow_parallel: bool = True
) -> tuple[list[Slot], list[LayoutProblem]]:
    """One Slot per layer for `text`, tiled to `n_layers` when given; or no slots and every problem found."""
    layer_count_problems = []
    if n_layers is not None and not 1 <= n_layers <= MAX_LAYERS:
        fix = "set n_layers to the model's depth, e.g. 32"
        layer_count_problems.append(LayoutProblem(f"n_layers must be 1 to {MAX_LAYERS}, got {n_layers}", fix, None))
    tokens, problems = _tokenize(text)
    if problems:
        return [], problems + layer_count_problems
    if tokens[0].kind == "end":
        example = ", ".join(sorted(known_names)[:2]) or "attn"
        empty = LayoutProblem("layout pattern is empty", f"write at least one layer, e.g. '{example}'", 0)
        return [], [empty] + layer_count_problems
    parser = _Parser(text, tokens, frozenset(known_names), allow_parallel)
    try:
        tree = parser.parse()
    except _SyntaxStop:
        tree = None
    problems = sorted(parser.problems, key=lambda problem: problem.column) + layer_count_problems
    if tree is None or problems:
        return [], problems
    if _length(tree) > MAX_LAYERS:
        message = f"pattern expands to {_length(tree)} layers, above the limit of {MAX_LAYERS}"
        return [], [LayoutProblem(message, "use smaller repeat counts", 0)]
    return _tile(_expand(tree), n_layers)


def _run_length(slots: Sequence[Slot]) -> str:
    parts = []
    for slot, run in itertools.groupby(slots):
        layer, count = "|".join(slot.names), len(list(run))
        if count > 1:  # 'a|b*3' would parse as a|(b*3), so a repeated parallel layer needs parentheses
            layer = f"({layer})*{count}" if len(slot.names) > 1 else f"{layer}*{count}"
        parts.append(layer)
    return ", ".join(parts)


def describe_slots(slots: Sequence[Slot]) -> str:
    """Compact pattern text for `slots`, e.g. '(ssm*3, attn)*8'; expand_pattern of the result gives `slots` back."""
    slots = list(slots)
    period = next((p for p in range(1, len(slots)) if len(slots) % p == 0 and slots[p:] == slots[:-p]), len(slots))
    if period == len(slots) or period == 1:
        return _run_length(slots)
    return f"({_run_length(slots[:period])})*{len(slots) // period}"
