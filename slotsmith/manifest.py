"""The slot manifest: what a slot holds, what base it fits, and how it was made.

A manifest lives as canonical JSON under ``METADATA_KEY`` in the slot file's
``__metadata__``. Its ``digest`` is the xxh3-128 of the canonical JSON of every
other field, so any edit to the manifest is caught; every entry's own
``digest`` covers the tensor bytes, so any edit to the weights is caught too.

The base fingerprint holds the base's layout digest and the xxh3-128 of the
*base's* bytes of every region the slot replaces, which tells apart bases of
one layout (the Wan 2.2 high- and low-noise experts).
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from math import prod

import yaml

from slotsmith.digest import canonical_json, digest_json
from slotsmith.errors import SlotsmithError
from slotsmith.io.files import parse_json_object, safe_repr
from slotsmith.io.header import (
    DTYPE_SIZES,
    MAX_DIMS,
    MAX_NUMEL,
    SafetensorsHeader,
    bounded_numel,
    is_int,
)

FORMAT = "slotsmith-slot/1"
"""Manifest format version written into every slot."""

METADATA_KEY = "slotsmith.manifest"
"""The ``__metadata__`` key that holds a slot's manifest."""

_HEX128 = re.compile(r"^[0-9a-f]{32}$")
_FIELDS = {"format", "selection", "base", "entries", "provenance", "expert", "digest"}
_BASE_FIELDS = {"layout", "layout_digest", "tensors"}
_ENTRY_FIELDS = {"name", "shape", "dtype", "rows", "digest"}


@dataclass(frozen=True)
class Entry:
    """One tensor (or row range of one) that a slot replaces.

    Attributes:
        name: Canonical native name.
        shape: Shape of the *whole* tensor in the base.
        dtype: Safetensors dtype (the base's).
        rows: ``(start, stop)`` of the first dimension, or None for the whole
            tensor.
        digest: xxh3-128 of the slot's bytes for this entry.
    """

    name: str
    shape: tuple[int, ...]
    dtype: str
    rows: tuple[int, int] | None
    digest: str

    @property
    def row_bytes(self) -> int:
        """Bytes of one row (one slice along the first dimension)."""
        return prod(self.shape[1:]) * DTYPE_SIZES[self.dtype]

    @property
    def span(self) -> tuple[int, int]:
        """The covered rows, ``(0, shape[0])`` for a whole tensor (0-d: ``(0, 1)``)."""
        if self.rows is not None:
            return self.rows
        return (0, self.shape[0] if self.shape else 1)

    @property
    def stored_shape(self) -> tuple[int, ...]:
        """Shape of the tensor as stored in the slot file."""
        if self.rows is None:
            return self.shape
        return (self.rows[1] - self.rows[0], *self.shape[1:])

    @property
    def nbytes(self) -> int:
        return prod(self.stored_shape) * DTYPE_SIZES[self.dtype]

    def byte_range(self) -> tuple[int, int]:
        """Offsets of the covered bytes relative to the start of the whole tensor."""
        if self.rows is None:
            return (0, prod(self.shape) * DTYPE_SIZES[self.dtype])
        return (self.rows[0] * self.row_bytes, self.rows[1] * self.row_bytes)

    def describe(self) -> str:
        """``name`` or ``name rows [a, b)`` for messages."""
        return self.name if self.rows is None else f"{self.name} rows [{self.rows[0]}, {self.rows[1]})"

    def to_json(self) -> dict:
        return {
            "name": self.name,
            "shape": list(self.shape),
            "dtype": self.dtype,
            "rows": None if self.rows is None else list(self.rows),
            "digest": self.digest,
        }


@dataclass(frozen=True)
class BaseFingerprint:
    """What identifies the base a slot was made on.

    Attributes:
        layout: Name of the known model layout it matches, or None.
        layout_digest: ``Inventory.layout_digest()`` of the base.
        tensors: Canonical name -> xxh3-128 of the base's bytes of the region
            the slot replaces (rows only, for a row entry).
    """

    layout: str | None
    layout_digest: str
    tensors: dict[str, str]

    def to_json(self) -> dict:
        return {"layout": self.layout, "layout_digest": self.layout_digest, "tensors": dict(self.tensors)}


@dataclass(frozen=True)
class Manifest:
    """A slot's manifest.

    Attributes:
        selection: How the slot's tensors were chosen (``algorithm``, ``ff``,
            ``ffid``, ``num_pools``...), or None (e.g. an extracted slot
            without ``--ff``).
        base: The base fingerprint.
        entries: The replaced tensors, sorted by name.
        provenance: Free-form JSON facts (slotsmith version, settings, seed...).
        expert: The Wan 2.2 expert it was made for (``"high"``/``"low"``), or None.
        format: Format version.
        digest: xxh3-128 over every other field (see ``compute_digest``).
    """

    selection: dict | None
    base: BaseFingerprint
    entries: tuple[Entry, ...]
    provenance: dict = field(default_factory=dict)
    expert: str | None = None
    format: str = FORMAT
    digest: str = ""

    def body(self) -> dict:
        """Every field except ``digest``: what the digest covers."""
        return {
            "format": self.format,
            "selection": self.selection,
            "base": self.base.to_json(),
            "entries": [e.to_json() for e in self.entries],
            "provenance": self.provenance,
            "expert": self.expert,
        }

    def compute_digest(self) -> str:
        """xxh3-128 of the canonical JSON of ``body()``: what ``digest`` must be."""
        return digest_json(self.body())

    def to_json(self) -> dict:
        return {**self.body(), "digest": self.digest}

    def to_canonical_json(self) -> str:
        return canonical_json(self.to_json())

    def to_yaml(self) -> str:
        """A readable YAML view (for review and for committing to git)."""
        doc = self.to_json()
        return yaml.safe_dump(doc, sort_keys=False, default_flow_style=None, width=120)

    @property
    def entry_map(self) -> dict[str, Entry]:
        return {e.name: e for e in self.entries}

    @property
    def params(self) -> int:
        return sum(prod(e.stored_shape) for e in self.entries)

    @property
    def nbytes(self) -> int:
        return sum(e.nbytes for e in self.entries)


def build_manifest(
    *,
    selection: dict | None,
    base: BaseFingerprint,
    entries: list[Entry],
    provenance: dict,
    expert: str | None,
) -> Manifest:
    """Assemble a manifest (entries sorted by name) and seal it with its digest.

    Raises:
        SlotsmithError: A field is not JSON-able or an entry is invalid.
    """
    m = Manifest(selection, base, tuple(sorted(entries, key=lambda e: e.name)), provenance, expert)
    try:
        canonical_json(m.body())
    except (TypeError, ValueError) as e:
        raise SlotsmithError(f"manifest field is not JSON-serialisable ({e})") from None
    # Round-trip through the strict parser so that a writer can never emit a
    # manifest that readers would refuse.
    sealed = Manifest(m.selection, m.base, m.entries, m.provenance, m.expert, m.format, m.compute_digest())
    return manifest_from_json(sealed.to_json(), "new manifest")


def _want(cond: bool, what: str, problem: str) -> None:
    if not cond:
        raise SlotsmithError(f"{what}: manifest {problem}")


def _entry_from_json(obj: object, what: str, i: int) -> Entry:
    _want(isinstance(obj, dict), what, f"entry {i} must be an object")
    _want(set(obj) == _ENTRY_FIELDS, what, f"entry {i} must have exactly the fields {sorted(_ENTRY_FIELDS)}")
    name, shape, dtype, rows, dig = (obj[k] for k in ("name", "shape", "dtype", "rows", "digest"))
    _want(isinstance(name, str) and name != "", what, f"entry {i}: name must be a non-empty string")
    where = f"tensor {name!r}"
    _want(
        isinstance(shape, list) and all(is_int(d) and d >= 0 for d in shape),
        what,
        f"{where}: shape must be a list of non-negative integers",
    )
    _want(
        len(shape) <= MAX_DIMS and bounded_numel(shape, MAX_NUMEL) is not None,
        what,
        f"{where}: shape has more than {MAX_DIMS} dimensions or {MAX_NUMEL} elements",
    )
    _want(isinstance(dtype, str) and dtype in DTYPE_SIZES, what, f"{where}: unknown dtype {safe_repr(dtype)}")
    _want(isinstance(dig, str) and bool(_HEX128.match(dig)), what, f"{where}: digest must be 32 lowercase hex digits")
    if rows is not None:
        _want(
            isinstance(rows, list) and len(rows) == 2 and all(is_int(r) for r in rows),
            what,
            f"{where}: rows must be [start, stop] integers or null",
        )
        _want(len(shape) >= 1, what, f"{where}: a 0-d tensor cannot have a row range")
        start, stop = rows
        _want(
            0 <= start < stop <= shape[0],
            what,
            f"{where}: rows [{start}, {stop}) out of range for {shape[0]} rows",
        )
        rows = (start, stop)
    return Entry(name, tuple(shape), dtype, rows, dig)


def manifest_from_json(obj: object, what: str) -> Manifest:
    """Validate a decoded manifest strictly and build it.

    Args:
        obj: The decoded JSON.
        what: Names the source (the file) in error messages.

    Returns:
        The manifest, its digest verified.

    Raises:
        SlotsmithError: One line naming ``what`` and the first problem: a
            missing or unknown field, a wrong type, duplicate entries, rows out
            of range, a fingerprint that does not cover the entries, or a
            digest mismatch.
    """
    _want(isinstance(obj, dict), what, "must be a JSON object")
    missing, unknown = _FIELDS - set(obj), set(obj) - _FIELDS
    _want(not missing, what, f"lacks field(s) {sorted(missing)}")
    _want(not unknown, what, f"has unknown field(s) {sorted(unknown)}")
    _want(obj["format"] == FORMAT, what, f"format {safe_repr(obj['format'])} is not {FORMAT!r}")
    _want(obj["selection"] is None or isinstance(obj["selection"], dict), what, "selection must be an object or null")
    _want(isinstance(obj["provenance"], dict), what, "provenance must be an object")
    _want(obj["expert"] is None or isinstance(obj["expert"], str), what, "expert must be a string or null")
    _want(isinstance(obj["digest"], str) and bool(_HEX128.match(obj["digest"])), what, "digest must be 32 hex digits")

    base = obj["base"]
    _want(isinstance(base, dict) and set(base) == _BASE_FIELDS, what, f"base must have exactly {sorted(_BASE_FIELDS)}")
    _want(base["layout"] is None or isinstance(base["layout"], str), what, "base.layout must be a string or null")
    _want(
        isinstance(base["layout_digest"], str) and bool(_HEX128.match(base["layout_digest"])),
        what,
        "base.layout_digest must be 32 hex digits",
    )
    tensors = base["tensors"]
    _want(
        isinstance(tensors, dict)
        and all(isinstance(k, str) and isinstance(v, str) and _HEX128.match(v) for k, v in tensors.items()),
        what,
        "base.tensors must map names to 32-hex-digit digests",
    )

    raw_entries = obj["entries"]
    _want(isinstance(raw_entries, list) and raw_entries, what, "entries must be a non-empty list")
    entries = [_entry_from_json(e, what, i) for i, e in enumerate(raw_entries)]
    names = [e.name for e in entries]
    dupes = sorted(n for n, k in Counter(names).items() if k > 1)  # linear: entries may number millions
    _want(not dupes, what, f"lists tensor {dupes[0]!r} twice" if dupes else "")
    _want(names == sorted(names), what, "entries must be sorted by name")
    _want(
        set(tensors) == set(names),
        what,
        "base.tensors must list exactly the entries' tensors "
        f"(differs at {sorted(set(tensors) ^ set(names))[:1]})",
    )

    m = Manifest(
        obj["selection"],
        BaseFingerprint(base["layout"], base["layout_digest"], dict(tensors)),
        tuple(entries),
        obj["provenance"],
        obj["expert"],
        obj["format"],
        obj["digest"],
    )
    actual = m.compute_digest()
    _want(actual == m.digest, what, f"digest mismatch (recorded {m.digest}, computed {actual}): the manifest was altered")
    return m


def manifest_from_header(header: SafetensorsHeader) -> Manifest:
    """Read, validate and check a slot file's manifest against its tensors.

    Args:
        header: The slot file's validated safetensors header.

    Returns:
        The manifest.

    Raises:
        SlotsmithError: No manifest, an invalid one, or a mismatch between the
            manifest and the file's tensors (missing or extra names, wrong
            dtype or stored shape).
    """
    what = str(header.path)
    raw = header.metadata.get(METADATA_KEY)
    if raw is None:
        raise SlotsmithError(f"{what}: not a slot (no {METADATA_KEY!r} in __metadata__)")
    m = manifest_from_json(parse_json_object(raw.encode("utf-8"), f"{what}: manifest"), what)
    entries = m.entry_map
    lacking = sorted(set(entries) - set(header.tensors))
    extra = sorted(set(header.tensors) - set(entries))
    if lacking:
        raise SlotsmithError(f"{what}: manifest lists tensor {lacking[0]!r} that the file lacks")
    if extra:
        raise SlotsmithError(f"{what}: file holds tensor {extra[0]!r} that the manifest does not list")
    for name, e in entries.items():
        info = header.tensors[name]
        if info.dtype != e.dtype or info.shape != e.stored_shape:
            raise SlotsmithError(
                f"{what}: tensor {name!r} is {info.dtype}{list(info.shape)} in the file "
                f"but the manifest says {e.dtype}{list(e.stored_shape)}"
            )
    return m


def manifest_metadata(m: Manifest) -> Mapping[str, str]:
    """The ``__metadata__`` entries that carry a manifest."""
    return {METADATA_KEY: m.to_canonical_json()}
