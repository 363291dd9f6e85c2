"""The one exception type that reaches the user as a clean one-line error."""


class SlotsmithError(Exception):
    """A problem with the user's input or a failed check.

    The CLI prints ``error: <message>`` and exits 1, never a traceback, so the
    message must name the file (and the tensor, where there is one) itself.
    """
