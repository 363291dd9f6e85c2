"""The one exception type that reaches the user as a clean error line."""


class SlotsmithError(Exception):
    """A problem with the user's input or a failed check.

    The CLI prints ``error: <message>`` and exits 1, never a traceback, so the
    message must name the file (and the tensor, where there is one) itself.
    A message of several lines (one problem each, e.g. every bad item of a
    dataset) is printed with ``error: `` before each line, so every line must
    make sense on its own.
    """
