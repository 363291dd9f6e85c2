"""Opening input files."""

from __future__ import annotations

import os
from contextlib import ExitStack
from pathlib import Path

from slotsmith.errors import SlotsmithError


class InputFiles:
    """Read-only file descriptors of input files, opened once, closed together."""

    def __init__(self) -> None:
        self._stack = ExitStack()
        self._fds: dict[Path, int] = {}

    def fd(self, path: Path) -> int:
        """The descriptor of ``path``, opened on first use.

        Raises:
            SlotsmithError: The file cannot be opened.
        """
        if path not in self._fds:
            try:
                fd = os.open(path, os.O_RDONLY)
            except OSError as e:
                raise SlotsmithError(f"{path}: cannot open ({e.strerror})") from None
            self._stack.callback(os.close, fd)
            self._fds[path] = fd
        return self._fds[path]

    def close(self) -> None:
        self._stack.close()

    def __enter__(self) -> InputFiles:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
