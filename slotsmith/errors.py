"""The one exception type that reaches the user as a clean error line, and its wording helpers."""

from __future__ import annotations

from collections.abc import Sequence


class SlotsmithError(Exception):
    """A problem with the user's input or a failed check.

    The CLI prints ``error: <message>`` and exits 1, never a traceback, so the
    message must name the file (and the tensor, where there is one) itself.
    A message of several lines (one problem each, e.g. every bad item of a
    dataset) is printed with ``error: `` before each line, so every line must
    make sense on its own.
    """


def first_and_more(items: Sequence[str], shown: int = 1, sep: str = ", ") -> str:
    """The first ``shown`` items joined by ``sep``, then `` (and N more)`` for the rest.

    The one wording for a list cut short in a message: the first problem of
    many, or the first names of a long list.

    Args:
        items: At least one item.
        shown: How many items to show.
        sep: What joins the shown items.

    Returns:
        E.g. ``"a, b (and 3 more)"``.
    """
    rest = len(items) - shown
    return sep.join(items[:shown]) + (f" (and {rest} more)" if rest > 0 else "")


def printable(text: str) -> str:
    """``text`` with every non-printable character shown as its escape (``\\n``, ``\\x1b``...).

    Everything printed that comes from a file (tensor names, manifest
    strings, paths) goes through this, so a name cannot forge an output line
    or send escape sequences to the terminal.
    """
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)
