"""Slot files: write them from a base and new bytes, read and check them.

A ``.slot`` is an ordinary safetensors file holding only the slot's tensors
(or row ranges of them) under canonical native names, in the base's dtype,
with its manifest (``slotsmith.manifest``) in ``__metadata__``.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from slotsmith import __version__
from slotsmith.digest import digest_bytes, digest_file_range
from slotsmith.errors import SlotsmithError, first_and_more
from slotsmith.inventory import Inventory
from slotsmith.io.files import InputFiles
from slotsmith.io.header import SafetensorsHeader, TensorInfo, read_header, read_tensor_bytes
from slotsmith.io.writer import (
    FileRange,
    TensorOut,
    part_nbytes,
    refuse_input_as_output,
    write_safetensors,
)
from slotsmith.manifest import (
    BaseFingerprint,
    Entry,
    Manifest,
    build_manifest,
    manifest_from_header,
    manifest_metadata,
)

SLOT_SUFFIX = ".slot"
SNAPSHOT_SUFFIX = ".snapshot"
"""``--save-every`` snapshots: valid slot files, but earlier versions of the run's
own slot, not slots to ship, so folder walks that pick ``.slot`` files (``verify``,
the taken-ffid check) leave them alone."""


def base_region(base: Inventory, files: InputFiles, entry: Entry) -> FileRange:
    """The base's bytes of the region ``entry`` covers, as an open file range.

    Raises:
        SlotsmithError: The inventory has no checkpoint behind it, or lacks the tensor.
    """
    if base.checkpoint is None:
        raise SlotsmithError(f"{base.source}: a base checkpoint is needed, not a layout")
    key = base.keys.get(entry.name)
    if key is None:
        raise SlotsmithError(f"{base.source}: base has no tensor {entry.name!r}")
    header, info = base.checkpoint.tensors[key]
    lo, hi = entry.byte_range()
    return FileRange(files.fd(header.path), info.start + lo, info.start + hi)


def _digest(part: bytes | memoryview | FileRange) -> str:
    if isinstance(part, FileRange):
        return digest_file_range(part.fd, part.start, part.end)
    return digest_bytes(part)


def write_slot(
    out_path: str | os.PathLike,
    base: Inventory,
    tensors: Mapping[str, bytes | memoryview | FileRange],
    *,
    selection: dict | None,
    provenance: dict,
    rows: Mapping[str, tuple[int, int]] | None = None,
    expert: str | None = None,
    force: bool = False,
) -> Manifest:
    """Write a slot file atomically.

    Args:
        out_path: The ``.slot`` file to create.
        base: Inventory of the base checkpoint (from ``inventory_from_checkpoint``);
            its bytes of every replaced region are hashed into the fingerprint.
        tensors: Canonical name -> raw little-endian bytes in the base's dtype
            (for a row range, only those rows' bytes). A ``FileRange`` of an
            open file is accepted too and copied without loading it.
        selection: How the tensors were chosen, e.g. ``{"algorithm": "v2",
            "ff": 0.01, "ffid": 2, "num_pools": 8}``, or None.
        provenance: JSON-able facts (settings, dataset digest, seed, steps);
            the slotsmith version is added.
        rows: Canonical name -> ``(start, stop)`` for entries that cover only
            rows of the tensor's first dimension.
        expert: The Wan 2.2 expert the slot is for (``"high"``/``"low"``).
        force: Replace an existing file.

    Returns:
        The manifest written.

    Raises:
        SlotsmithError: Unknown tensor, wrong byte count, bad rows, no
            checkpoint behind ``base``, existing output, a non-JSON field, or
            writing failed.
    """
    out = Path(out_path)
    rows = dict(rows or {})
    if base.checkpoint is not None:
        refuse_input_as_output(out, base.checkpoint.paths)
    if not tensors:
        raise SlotsmithError(f"{out}: a slot needs at least one tensor")
    stray = sorted(set(rows) - set(tensors))
    if stray:
        raise SlotsmithError(f"{out}: rows given for {stray[0]!r}, which is not among the slot's tensors")
    if expert is not None and base.experts and expert not in base.experts:
        raise SlotsmithError(f"{out}: unknown expert {expert!r} (known: {', '.join(base.experts)})")
    entries: list[Entry] = []
    outs: list[TensorOut] = []
    fingerprint: dict[str, str] = {}
    with InputFiles() as files:
        for name in sorted(tensors):
            spec = base.tensors.get(name)
            if spec is None:
                raise SlotsmithError(f"{out}: tensor {name!r} is not in the base {base.source}")
            r = rows.get(name)
            if r is not None:
                if not spec.shape or not (isinstance(r, tuple | list) and len(r) == 2):
                    raise SlotsmithError(f"{out}: tensor {name!r}: rows must be (start, stop) of a tensor with rows")
                r = (int(r[0]), int(r[1]))
                if not 0 <= r[0] < r[1] <= spec.shape[0]:
                    raise SlotsmithError(f"{out}: tensor {name!r}: rows {r} out of range for {spec.shape[0]} rows")
            data = tensors[name]
            probe = Entry(name, spec.shape, spec.dtype, r, "0" * 32)
            if part_nbytes(data) != probe.nbytes:
                raise SlotsmithError(
                    f"{out}: tensor {name!r}: {part_nbytes(data)} bytes given, "
                    f"{spec.dtype}{list(probe.stored_shape)} needs {probe.nbytes}"
                )
            entry = Entry(name, spec.shape, spec.dtype, r, _digest(data))
            fingerprint[name] = _digest(base_region(base, files, entry))
            entries.append(entry)
            part = data if isinstance(data, FileRange) else memoryview(data).cast("B")
            outs.append(TensorOut(name, spec.dtype, entry.stored_shape, (part,)))
        manifest = build_manifest(
            selection=selection,
            base=BaseFingerprint(base.known_model(expert), base.layout_digest(), fingerprint),
            entries=entries,
            provenance={"slotsmith": __version__, **provenance},
            expert=expert,
        )
        write_safetensors(out, outs, dict(manifest_metadata(manifest)), force=force)
    return manifest


@dataclass(frozen=True)
class Slot:
    """A slot file whose structure and manifest digest have been checked.

    Attributes:
        path: The file.
        header: Its safetensors header.
        manifest: Its manifest (digest verified, names/shapes/dtypes match the file).
    """

    path: Path
    header: SafetensorsHeader
    manifest: Manifest

    def info(self, name: str) -> TensorInfo:
        """Where the slot's bytes of ``name`` lie in the file."""
        return self.header.tensors[name]

    def read_tensor(self, name: str) -> bytes:
        """The slot's raw bytes of ``name`` (the stored rows only, for a row entry).

        Raises:
            SlotsmithError: No such tensor, or the file cannot be read.
        """
        if name not in self.header.tensors:
            raise SlotsmithError(f"{self.path}: slot has no tensor {name!r}")
        return read_tensor_bytes(self.header, name)

    def hash_problems(self, files: InputFiles | None = None) -> list[str]:
        """Check every tensor's bytes against its manifest digest.

        Args:
            files: Where to open the slot file (so a caller can later check
                that the file did not change); None: opened and closed here.

        Returns:
            One line per tensor whose bytes do not match (empty if all match).
        """
        problems = []
        with InputFiles() as own:
            fd = (files or own).fd(self.path)
            for e in self.manifest.entries:
                info = self.info(e.name)
                actual = digest_file_range(fd, info.start, info.end)
                if actual != e.digest:
                    problems.append(
                        f"{self.path}: tensor {e.name!r}: bytes do not match the manifest digest "
                        f"(recorded {e.digest}, computed {actual})"
                    )
        return problems

    def verify_hashes(self) -> None:
        """Raise on the first tensor whose bytes do not match the manifest.

        Raises:
            SlotsmithError: Names the file and the tensor.
        """
        problems = self.hash_problems()
        if problems:
            raise SlotsmithError(first_and_more(problems))


def read_slot(path: str | os.PathLike) -> Slot:
    """Open a slot file and check its structure and manifest digest.

    Tensor bytes are not hashed here (see ``Slot.verify_hashes``), so this
    takes milliseconds for any slot size.

    Raises:
        SlotsmithError: Not a safetensors file, no manifest, invalid manifest,
            digest mismatch, or tensors that disagree with the manifest.
    """
    return slot_from_header(read_header(path))


def slot_from_header(header: SafetensorsHeader) -> Slot:
    """``read_slot`` for a file whose header has been read already.

    Raises:
        SlotsmithError: No manifest, invalid manifest, digest mismatch, or
            tensors that disagree with the manifest.
    """
    return Slot(header.path, header, manifest_from_header(header))

