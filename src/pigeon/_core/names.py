"""Dot-separated names and the patterns that match them.

Queue, service and topic names are segments joined by dots (``orders.eu``).
A pattern matches names segment by segment:

Rule 1: ``*`` matches exactly one segment; ``>`` matches one or more
segments and may only be last; any other segment matches itself.
Rule 2: a pattern with an empty segment, or ``*``/``>`` inside a segment
(``ord*``), is invalid: it raises ``ValueError`` naming the rule broken.
Rule 3: a pattern "matches" another pattern (a subscription checked
against a grant) only if it matches every name the other matches: a ``*``
there is matched only by ``*`` or ``>``, and a ``>`` only by ``>``.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Pattern:
    """A compiled name pattern (see the module docstring)."""

    text: str
    segments: tuple[str, ...]

    def matches(self, name: str) -> bool:
        parts = name.split(".")
        segments = self.segments
        for index, segment in enumerate(segments):
            if segment == ">":
                return len(parts) > index
            if index >= len(parts):
                return False
            part = parts[index]
            if part == ">":  # it spans segments one segment cannot (Rule 3)
                return False
            if segment != "*" and segment != part:  # (a "*" there is no literal: Rule 3)
                return False
        return len(parts) == len(segments)


def compile_pattern(text: str) -> Pattern:
    """Compile ``text`` (Rule 2 says what is invalid).

    Raises:
        ValueError: the pattern is invalid; the message names the rule.
    """
    if not isinstance(text, str) or not text:
        raise ValueError(f"a name pattern must be a non-empty string, not {text!r}")
    segments = tuple(text.split("."))
    for index, segment in enumerate(segments):
        if not segment:
            raise ValueError(f"pattern {text!r} has an empty segment (two dots, or one at an end)")
        if segment == ">" and index != len(segments) - 1:
            raise ValueError(f"pattern {text!r}: '>' matches the rest, so it must come last")
        if segment not in ("*", ">") and ("*" in segment or ">" in segment):
            raise ValueError(
                f"pattern {text!r}: '*' and '>' stand for whole segments, not part of one"
            )
        if any(c.isspace() for c in segment):
            raise ValueError(f"pattern {text!r} contains white space")
    return Pattern(text, segments)
