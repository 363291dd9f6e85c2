"""The splice record: what a spliced checkpoint says about its making.

A splice writes it as canonical JSON under ``SPLICE_KEY`` in every output
file's ``__metadata__`` (and, for a sharded output, in the index's
``metadata``). ``read_splice_record`` is the one reader that ``splice``,
``verify`` and ``inspect`` use, so a hand-edited file reads the same in each.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

from slotsmith.digest import canonical_json
from slotsmith.errors import SlotsmithError
from slotsmith.io.checkpoint import Checkpoint
from slotsmith.io.files import parse_json_object
from slotsmith.manifest import Manifest, manifest_from_json
from slotsmith.slotspec import MAX_STRENGTH

SPLICE_KEY = "slotsmith.splice"
"""The ``__metadata__`` key (and index ``metadata`` key) of a splice record."""

SPLICE_FORMAT = "slotsmith-splice/1"
"""A record of slots spliced as they are (strength 1): every splice without a strength writes this."""

SPLICE_FORMAT_BLENDED = "slotsmith-splice/2"
"""A record with a slot spliced at another strength (``FILE:S``); format 1 records still read."""

_HEX128 = re.compile(r"^[0-9a-f]{32}$")


@dataclass(frozen=True)
class Blend:
    """How a slot spliced at a strength other than 1 was applied.

    Attributes:
        strength: ``s`` in ``base + s * (slot - base)``.
        digests: Canonical name -> xxh3-128 of the blended bytes the output
            holds in that slot entry's region (the whole tensor or its rows).
    """

    strength: float
    digests: dict[str, str]


@dataclass(frozen=True)
class SpliceRecord:
    """What a spliced checkpoint records about its making.

    Attributes:
        base_layout_digest: Layout digest of the base (and so of the output).
        base_source: File name of the base.
        slots: ``(slot file name, manifest)`` per slot, in splice order.
        seal: Canonical name -> xxh3-128 of every output tensor's bytes
            (``splice --seal``), or None.
        blends: Manifest digest -> ``Blend``, for each slot spliced at a
            strength other than 1 (the others hold their slot's own bytes).
    """

    base_layout_digest: str
    base_source: str
    slots: tuple[tuple[str, Manifest], ...]
    seal: dict[str, str] | None = None
    blends: dict[str, Blend] = field(default_factory=dict)

    def expected_digest(self, m: Manifest, name: str) -> str:
        """The digest the output's region of slot ``m``'s entry ``name`` must have: blended, or the slot's own."""
        blend = self.blends.get(m.digest)
        return blend.digests[name] if blend is not None else m.entry_map[name].digest

    def strength(self, m: Manifest) -> float:
        """The strength slot ``m`` was spliced at (1 when it holds its own bytes)."""
        blend = self.blends.get(m.digest)
        return 1.0 if blend is None else blend.strength

    def to_json(self) -> dict:
        slots = []
        for f, m in self.slots:
            slot = {"file": f, "manifest": m.to_json()}
            if m.digest in self.blends:
                blend = self.blends[m.digest]
                slot.update(strength=blend.strength, blended=dict(blend.digests))
            slots.append(slot)
        doc = {
            # Without a strength the record is format 1, byte for byte as before strengths existed.
            "format": SPLICE_FORMAT_BLENDED if self.blends else SPLICE_FORMAT,
            "base": {"layout_digest": self.base_layout_digest, "source": self.base_source},
            "slots": slots,
        }
        if self.seal is not None:
            doc["seal"] = dict(self.seal)
        return doc

    def to_canonical_json(self) -> str:
        return canonical_json(self.to_json())


def parse_splice_record(raw: str, what: str) -> SpliceRecord:
    """Validate a splice record (the ``slotsmith.splice`` metadata value).

    Raises:
        SlotsmithError: Malformed record, or a slot manifest in it that fails
            validation (digest included).
    """
    if not isinstance(raw, str):  # an index JSON's metadata may hold any JSON value
        raise SlotsmithError(f"{what}: malformed splice record (must be a JSON string)")
    obj = parse_json_object(raw.encode("utf-8"), f"{what}: splice record")
    base = obj.get("base")
    slots = obj.get("slots")
    seal = obj.get("seal")
    blended = obj.get("format") == SPLICE_FORMAT_BLENDED
    if (
        obj.get("format") not in (SPLICE_FORMAT, SPLICE_FORMAT_BLENDED)
        or set(obj) - {"seal"} != {"format", "base", "slots"}
        or (
            "seal" in obj
            and not (
                isinstance(seal, dict)
                and all(isinstance(k, str) and isinstance(v, str) and _HEX128.match(v) for k, v in seal.items())
            )
        )
        or not isinstance(base, dict)
        or not isinstance(base.get("layout_digest"), str)
        or not isinstance(base.get("source"), str)
        or not isinstance(slots, list)
        or not all(isinstance(s, dict) and isinstance(s.get("file"), str) and "manifest" in s for s in slots)
        or not all(set(s) - {"file", "manifest"} in (set(), {"strength", "blended"} if blended else set()) for s in slots)
    ):
        raise SlotsmithError(
            f"{what}: malformed splice record (expected format {SPLICE_FORMAT!r} or {SPLICE_FORMAT_BLENDED!r})"
        )
    parsed = tuple(
        (s["file"], manifest_from_json(s["manifest"], f"{what}: splice record slot {s['file']!r}")) for s in slots
    )
    blends = {}
    for s, (file, m) in zip(slots, parsed):
        if "strength" in s:
            blends[m.digest] = _parse_blend(s["strength"], s["blended"], m, f"{what}: splice record slot {file!r}")
    return SpliceRecord(base["layout_digest"], base["source"], parsed, seal, blends)


def _parse_blend(strength: object, digests: object, m: Manifest, what: str) -> Blend:
    """A slot's ``strength`` and ``blended`` digests: a number in [0, 2] and one digest per entry.

    Raises:
        SlotsmithError: Either is malformed.
    """
    number = isinstance(strength, int | float) and not isinstance(strength, bool)
    if not (number and math.isfinite(strength) and 0 <= strength <= MAX_STRENGTH):
        raise SlotsmithError(f"{what}: strength {strength!r} is not a number in [0, {MAX_STRENGTH:g}]")
    names = {e.name for e in m.entries}
    if not (
        isinstance(digests, dict)
        and set(digests) == names
        and all(isinstance(v, str) and _HEX128.match(v) for v in digests.values())
    ):
        raise SlotsmithError(f"{what}: 'blended' must give an xxh3-128 digest for each of the slot's tensors")
    return Blend(float(strength), dict(digests))


def has_splice_record(ckpt: Checkpoint) -> bool:
    """Whether any part of ``ckpt`` (its index or a file) carries a splice record."""
    metas = [ckpt.index_metadata, *(h.metadata for h in ckpt.files)] if ckpt.sharded else [ckpt.metadata]
    return any(SPLICE_KEY in m for m in metas)


def read_splice_record(ckpt: Checkpoint) -> tuple[SpliceRecord | None, list[str]]:
    """The one reader of a checkpoint's splice record.

    A single file's record is in its ``__metadata__``; a sharded set's is in
    its index's ``metadata``, and every shard repeats it.

    Args:
        ckpt: The checkpoint.

    Returns:
        ``(record, problems)``: the record (None when the checkpoint has
        none), and one line per shard whose copy differs from the index's.

    Raises:
        SlotsmithError: A malformed record, or shards that carry a record
            while the index does not.
    """
    raw = ckpt.index_metadata.get(SPLICE_KEY) if ckpt.sharded else ckpt.metadata.get(SPLICE_KEY)
    if raw is None:
        if has_splice_record(ckpt):
            raise SlotsmithError(f"{ckpt.path}: no splice record in its index metadata")
        return None, []
    record = parse_splice_record(raw, str(ckpt.path))
    differ = [
        f"{h.path}: its splice record differs from the one in {ckpt.path.name}"
        for h in ckpt.files
        if ckpt.sharded and h.metadata.get(SPLICE_KEY) != raw
    ]
    return record, differ
