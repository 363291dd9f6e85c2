"""The splice record: what a spliced checkpoint says about its making.

A splice writes it as canonical JSON under ``SPLICE_KEY`` in every output
file's ``__metadata__`` (and, for a sharded output, in the index's
``metadata``). ``read_splice_record`` is the one reader that ``splice``,
``verify`` and ``inspect`` use, so a hand-edited file reads the same in each.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from slotsmith.digest import canonical_json
from slotsmith.errors import SlotsmithError
from slotsmith.io.checkpoint import Checkpoint
from slotsmith.io.files import parse_json_object
from slotsmith.manifest import Manifest, manifest_from_json

SPLICE_KEY = "slotsmith.splice"
"""The ``__metadata__`` key (and index ``metadata`` key) of a splice record."""

SPLICE_FORMAT = "slotsmith-splice/1"

_HEX128 = re.compile(r"^[0-9a-f]{32}$")


@dataclass(frozen=True)
class SpliceRecord:
    """What a spliced checkpoint records about its making.

    Attributes:
        base_layout_digest: Layout digest of the base (and so of the output).
        base_source: File name of the base.
        slots: ``(slot file name, manifest)`` per slot, in splice order.
        seal: Canonical name -> xxh3-128 of every output tensor's bytes
            (``splice --seal``), or None.
    """

    base_layout_digest: str
    base_source: str
    slots: tuple[tuple[str, Manifest], ...]
    seal: dict[str, str] | None = None

    def to_json(self) -> dict:
        doc = {
            "format": SPLICE_FORMAT,
            "base": {"layout_digest": self.base_layout_digest, "source": self.base_source},
            "slots": [{"file": f, "manifest": m.to_json()} for f, m in self.slots],
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
    if (
        obj.get("format") != SPLICE_FORMAT
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
    ):
        raise SlotsmithError(f"{what}: malformed splice record (expected format {SPLICE_FORMAT!r})")
    parsed = tuple(
        (s["file"], manifest_from_json(s["manifest"], f"{what}: splice record slot {s['file']!r}")) for s in slots
    )
    return SpliceRecord(base["layout_digest"], base["source"], parsed, seal)


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
