"""The one exception type users see.

A ``LensError`` carries a single line that names the problem and the fix; the
CLI prints it without a traceback and exits non-zero. Anything else escaping
the CLI is a bug in lens.
"""

from __future__ import annotations


class LensError(Exception):
    """A user-facing failure: bad input, unreachable model, unwritable output."""

    def __init__(self, message: str) -> None:
        if "\n" in message:
            message = " ".join(message.split())
        super().__init__(message)


def first_line(exc: BaseException) -> str:
    """``Type: first line of the message`` (just ``Type`` when the message is empty).

    Library exceptions often carry pages of context; a user-facing line keeps the
    exception's type (what went wrong) and its first line (where).
    """
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0].strip()}" if lines else type(exc).__name__
