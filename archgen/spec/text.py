"""Free text that travels from a spec (or the command line) into generated files: what is allowed, and how to show the rest.

Generated files are UTF-8 Python and Markdown, so text that reaches them must encode as UTF-8 and must not carry
characters that end a line or a file early. A spec's own text is validated (`text_problem`), so `archgen check` refuses
what `build` could not write. Text archgen does not own, such as a file name with a byte that is not UTF-8 (Python
holds it as a lone surrogate), is shown escaped (`printable`) instead.
"""

from __future__ import annotations

import unicodedata

# Tabs and newlines are ordinary in a multi-line description; every other control character is refused.
_ALLOWED_CONTROLS = frozenset("\t\n")
# Bidirectional overrides and isolates reorder how source is displayed ("Trojan Source", CVE-2021-42574).
_BIDI_CONTROLS = frozenset("\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069")


def text_problem(text: str) -> str | None:
    """Why `text` cannot go into a generated file, or None when it can."""
    for index, char in enumerate(text):
        if char in _ALLOWED_CONTROLS:
            continue
        category = unicodedata.category(char)
        if category == "Cs":
            return f"a lone surrogate U+{ord(char):04X} at character {index + 1} (not encodable as UTF-8)"
        if category == "Cc" or char in "\u2028\u2029\ufeff" or char in _BIDI_CONTROLS:
            return f"the control character U+{ord(char):04X} at character {index + 1}"
    return None


def unencodable(text: str) -> str | None:
    """A description of the first character of `text` that cannot be written as UTF-8, or None."""
    for char in text:
        if unicodedata.category(char) == "Cs":
            code = ord(char)
            if 0xDC80 <= code <= 0xDCFF:  # how Python holds a byte that was not UTF-8 (surrogateescape)
                return f"the byte 0x{code - 0xDC00:02X}"
            return f"a lone surrogate U+{code:04X}"
    return None


def printable(text: str) -> str:
    """`text` with characters that cannot be written as UTF-8 or that break lines shown as backslash escapes."""
    text = str(text).encode("utf-8", "surrogateescape" if _only_escaped_bytes(text) else "backslashreplace")
    text = text.decode("utf-8", "backslashreplace")
    return "".join(char if char == " " or not unicodedata.category(char).startswith("C")
                   else char.encode("unicode_escape").decode("ascii") for char in text)


def _only_escaped_bytes(text: str) -> bool:
    return all(0xDC80 <= ord(char) <= 0xDCFF for char in text if unicodedata.category(char) == "Cs")
