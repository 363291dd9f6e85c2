"""``FILE[:STRENGTH]``: a slot named on the command line, with how strongly to apply it.

A strength ``s`` applies ``base + s * (slot - base)`` to the slot's tensors:
1.0 (the default) is exactly the slot's bytes, 0.0 the base's, 0.5 half way,
up to 2.0 (twice the slot's change). ``sample`` and ``splice`` read slots
this way.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from slotsmith.errors import SlotsmithError

MAX_STRENGTH = 2.0
"""Largest strength accepted: beyond twice a slot's change, results say nothing about the slot."""


@dataclass(frozen=True)
class SlotSpec:
    """A slot file and its strength.

    Attributes:
        path: The ``.slot`` (or ``.snapshot``) file.
        strength: How much of the slot's change to apply, in [0, 2].
    """

    path: Path
    strength: float = 1.0

    @property
    def label(self) -> str:
        """``char1.slot`` or ``char1.slot:0.7``: how the user wrote it, for names and labels."""
        return self.path.name if self.strength == 1.0 else f"{self.path.name}:{self.strength:g}"


def parse_slot_spec(text: str) -> SlotSpec:
    """Read ``FILE`` or ``FILE:STRENGTH``.

    The part after the last ``:`` is a strength unless it holds a path
    separator or ends in ``.slot``/``.snapshot`` (so ``C:\\x.slot`` and
    ``dir:1/x.slot`` stay paths).

    Args:
        text: As given on the command line.

    Returns:
        The slot and its strength (1.0 when none is given).

    Raises:
        SlotsmithError: A strength that is not a number, or outside [0, 2].
    """
    head, sep, tail = text.rpartition(":")
    if not sep or not head or "/" in tail or "\\" in tail or tail.endswith((".slot", ".snapshot")):
        return SlotSpec(Path(text))
    try:
        strength = float(tail)
    except ValueError:
        raise SlotsmithError(f"{text}: strength {tail!r} is not a number (write FILE or FILE:STRENGTH, e.g. x.slot:0.7)") from None
    if not math.isfinite(strength) or not 0 <= strength <= MAX_STRENGTH:
        raise SlotsmithError(f"{text}: strength {tail} is outside [0, {MAX_STRENGTH:g}]")
    return SlotSpec(Path(head), strength)
