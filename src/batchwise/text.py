"""User text made safe to show: control characters escaped visibly.

Tags, custom_ids, error messages and answers come from users and providers. Printed raw, an
escape sequence in one of them (`\\x1b[2J` clears the screen) would act on the reader's
terminal, or hide itself in a CSV opened there. `visible` writes every control character, and
the Unicode bidirectional overrides that reorder text, as a Python-style escape instead.
"""

from __future__ import annotations

import re

__all__ = ["visible"]

#: C0 and C1 control characters, DEL, and the bidirectional embedding/override/isolate marks
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f\u202a-\u202e\u2066-\u2069]")
#: the same, but sparing newline and tab (for multi-line text such as an answer)
_CONTROL_BUT_LINES = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\u202a-\u202e\u2066-\u2069]")


def _escape(match: re.Match[str]) -> str:
    char = match.group(0)
    code = ord(char)
    if char == "\n":
        return "\\n"
    if char == "\t":
        return "\\t"
    if char == "\r":
        return "\\r"
    return f"\\x{code:02x}" if code <= 0xFF else f"\\u{code:04x}"


def visible(text: str, *, keep_lines: bool = False) -> str:
    """`text` with every control character written as an escape (`\\x1b`, `\\n`, `\\u202e`).

    With `keep_lines`, newlines and tabs stay as they are (multi-line text); everything else
    that could move the cursor, clear the screen or reorder the line is still escaped.
    """
    pattern = _CONTROL_BUT_LINES if keep_lines else _CONTROL
    return pattern.sub(_escape, text) if pattern.search(text) else text
