"""One-line error messages: what every "error: ..." line and every re-raised library error is built from."""

from __future__ import annotations


def first_line(e: BaseException) -> str:
    """The first line of an error's message (its class name when it has none)."""
    lines = str(e).strip().splitlines()
    return lines[0] if lines else type(e).__name__
