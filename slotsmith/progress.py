"""Progress that works on a terminal and in a log file alike.

On a terminal, a tqdm bar as usual. Off a terminal (nohup, SLURM, ``docker
logs``, CI), where a bar would be silent or garble the file, plain lines:
a first one when the work starts, then one every ``interval`` seconds from a
background thread, so a log never goes quiet for longer than that even when
one step takes minutes, and a last one when it ends. ``quiet`` silences both.

`phase` does the same for work without a count (loading a base, an encoder,
hashing): a line once it has run for a second, again every ``interval``
seconds, and its time at the end.

Light core: no torch here (tqdm only).
"""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TextIO

LINE_INTERVAL = 20.0
"""Seconds between progress lines off a terminal: well inside the ~30 s a log may stay silent."""

PHASE_DELAY = 1.0
"""A phase shorter than this prints nothing."""


def display_mode(show: bool, stream: TextIO | None = None) -> str:
    """How progress is shown: ``"off"`` (not ``show``), ``"bar"`` (a terminal) or ``"lines"``.

    Args:
        show: False when the user asked for quiet.
        stream: Where progress goes (default stderr).
    """
    if not show:
        return "off"
    stream = stream or sys.stderr
    try:
        tty = stream.isatty()
    except (AttributeError, ValueError):  # closed or not a real stream
        tty = False
    return "bar" if tty else "lines"


def format_seconds(seconds: float) -> str:
    """``42s``, ``3m05s``, ``2h07m``: short enough for a progress line."""
    seconds = max(0, int(round(seconds)))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


def _amount(n: float, unit: str) -> str:
    if unit == "B":
        return f"{n / 1e6:.1f} MB" if n < 1e8 else f"{n / 1e6:,.0f} MB" if n < 1e10 else f"{n / 1e9:,.1f} GB"
    return f"{n:g}"


class Progress:
    """Progress of one counted piece of work (steps, files, bytes).

    Use as a context manager, or call `close`. ``update`` adds to the count
    and may set the shown values (``loss=..., lr=...``).

    Args:
        desc: What is being done (``train``, ``caching``, ``splice``).
        total: The count at the end, or None when unknown.
        show: False for quiet.
        unit: ``it``, ``file``... or ``B`` (bytes: shown in MB and MB/s).
        initial: Where the count starts (a resumed run's step).
        stream: Where it goes (default stderr).
        interval: Seconds between lines off a terminal.
    """

    def __init__(
        self,
        desc: str,
        total: int | None = None,
        *,
        show: bool = True,
        unit: str = "it",
        initial: int = 0,
        stream: TextIO | None = None,
        interval: float = LINE_INTERVAL,
    ):
        self.desc, self.total, self.unit, self.n = desc, total, unit, initial
        self._initial, self._stream, self._interval = initial, stream or sys.stderr, interval
        self._info: dict[str, str] = {}
        self._start = time.monotonic()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._bar = self._thread = None
        self.mode = display_mode(show, self._stream)
        if self.mode == "bar":
            from tqdm import tqdm

            scale = {"unit_scale": True, "unit_divisor": 1024} if unit == "B" else {}
            self._bar = tqdm(
                total=total, initial=initial, desc=desc, unit=unit, file=self._stream, dynamic_ncols=True, **scale
            )
        elif self.mode == "lines":
            self._emit()
            self._thread = threading.Thread(target=self._heartbeat, name=f"progress-{desc}", daemon=True)
            self._thread.start()

    def update(self, n: int = 1, **info) -> None:
        """Add ``n`` to the count; ``info`` values (already formatted or numbers) are shown beside it."""
        with self._lock:
            self.n += n
            self._info.update({k: str(v) for k, v in info.items()})
        if self._bar is not None:
            if info:
                self._bar.set_postfix(self._info, refresh=False)
            self._bar.update(n)

    def line(self) -> str:
        """The progress line as it stands (what is printed off a terminal)."""
        with self._lock:
            n, info = self.n, dict(self._info)
        elapsed = time.monotonic() - self._start
        done = n - self._initial
        parts = [f"{self.desc}:"]
        if self.total:
            parts.append(f"{_amount(n, self.unit)}/{_amount(self.total, self.unit)}"
                         f"{'' if self.unit == 'B' else ' ' + self.unit} ({100 * n / self.total:.0f}%)")
        else:
            parts.append(f"{_amount(n, self.unit)}{'' if self.unit == 'B' else ' ' + self.unit}")
        parts += [f"{k} {v}" for k, v in info.items()]
        if done > 0 and elapsed > 0:
            rate = done / elapsed
            parts.append(f"{rate / 1e6:,.1f} MB/s" if self.unit == "B" else f"{rate:.3g} {self.unit}/s")
            if self.total and n < self.total:
                parts.append(f"ETA {format_seconds((self.total - n) / rate)}")
        parts.append(f"elapsed {format_seconds(elapsed)}")
        return " ".join(parts)

    def _emit(self) -> None:
        print(self.line(), file=self._stream, flush=True)

    def _heartbeat(self) -> None:
        while not self._stop.wait(self._interval):
            self._emit()

    def close(self) -> None:
        """End the display: the bar closes, or a last line is printed."""
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            self._thread = None
            self._emit()

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None and self._thread is not None:
            # Failing: the error says what happened, a last progress line would only bury it.
            self._stop.set()
            self._thread.join()
            self._thread = None
        self.close()


@contextmanager
def phase(
    desc: str,
    show: bool = True,
    *,
    stream: TextIO | None = None,
    delay: float = PHASE_DELAY,
    interval: float = LINE_INTERVAL,
) -> Iterator[None]:
    """Say what a long uncounted step is doing: ``desc...`` after ``delay`` s, every ``interval`` s, then its time.

    Nothing is printed for a phase shorter than ``delay``, nor with ``show`` False.

    Args:
        desc: What is being done (``loading the base``).
        show: False for quiet.
        stream: Where it goes (default stderr).
        delay: Seconds before the first line.
        interval: Seconds between the lines after it.
    """
    if not show:
        yield
        return
    stream = stream or sys.stderr
    start = time.monotonic()
    stop = threading.Event()
    said = threading.Event()

    def watch() -> None:
        wait = delay
        while not stop.wait(wait):
            elapsed = time.monotonic() - start
            print(f"{desc}..." if not said.is_set() else f"{desc}... ({format_seconds(elapsed)})",
                  file=stream, flush=True)
            said.set()
            wait = interval

    thread = threading.Thread(target=watch, name=f"phase-{desc}", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()
        if said.is_set():
            print(f"{desc}: done in {format_seconds(time.monotonic() - start)}", file=stream, flush=True)
