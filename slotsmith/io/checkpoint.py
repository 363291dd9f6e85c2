"""A checkpoint as a set of safetensors files: one file, or shards with an index.

A sharded set is named by its ``*.safetensors.index.json`` (the Hugging Face
layout: ``{"metadata": {...}, "weight_map": {key: shard file}}``) or by the
folder that holds it. Every shard is validated, and the index must describe
the shards exactly.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from slotsmith.errors import SlotsmithError
from slotsmith.io.files import is_folder, parse_json_object, read_input
from slotsmith.io.header import (
    HEADER_CAP,
    SNIFF_BYTES,
    SafetensorsHeader,
    TensorInfo,
    not_safetensors_error,
    read_header,
)

INDEX_CAP = HEADER_CAP
"""Largest index JSON we read, in bytes (as large as a header may be)."""

INDEX_SUFFIX = ".safetensors.index.json"
"""How the index JSON of a sharded set is named."""


@dataclass
class Checkpoint:
    """One checkpoint, single-file or sharded.

    Attributes:
        path: What the user named (file, index JSON or folder).
        files: Headers of the safetensors files, in shard order.
        index_path: The index JSON of a sharded set, else None.
        index: The index JSON object, as validated (sharded sets only).
        tensors: File key -> (header of the file holding it, tensor info).
    """

    path: Path
    files: list[SafetensorsHeader]
    index_path: Path | None = None
    index: dict = field(default_factory=dict)
    tensors: dict[str, tuple[SafetensorsHeader, TensorInfo]] = field(default_factory=dict)

    @property
    def sharded(self) -> bool:
        return self.index_path is not None

    @property
    def index_metadata(self) -> dict:
        """The index's ``metadata`` object (sharded sets only)."""
        return self.index.get("metadata", {})

    @property
    def metadata(self) -> dict[str, str]:
        """The ``__metadata__`` of the first file (shards normally repeat it)."""
        return self.files[0].metadata if self.files else {}

    @property
    def nbytes(self) -> int:
        return sum(info.nbytes for _, info in self.tensors.values())

    @property
    def paths(self) -> list[Path]:
        """Every path the checkpoint is made of: its files, and its index and folder if sharded."""
        paths = [h.path for h in self.files]
        if self.index_path is not None:
            paths += [self.index_path, self.index_path.parent]
        return paths


def _safe_shard_path(index_path: Path, name: object) -> Path:
    if not isinstance(name, str) or not name:
        raise SlotsmithError(f"{index_path}: weight_map values must be non-empty file names")
    rel = PurePosixPath(name)
    if rel.is_absolute() or ".." in rel.parts or "\\" in name or len(rel.parts) != 1:
        raise SlotsmithError(f"{index_path}: shard path {name!r} escapes the index's folder")
    return index_path.parent / name


def _open_index(index_path: Path) -> Checkpoint:
    raw = read_input(index_path, INDEX_CAP, "index")
    if not raw.lstrip().startswith(b"{"):  # an LFS pointer or a failed download's page, say so
        error = not_safetensors_error(index_path, raw[:SNIFF_BYTES])
        if error is not None:
            raise error
    obj = parse_json_object(raw, str(index_path))
    weight_map = obj.get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
        raise SlotsmithError(f"{index_path}: needs a non-empty 'weight_map' object")
    if not isinstance(obj.get("metadata", {}), dict):
        raise SlotsmithError(f"{index_path}: 'metadata' must be an object")

    by_shard: dict[str, set[str]] = {}
    for key, shard in weight_map.items():
        _safe_shard_path(index_path, shard)
        by_shard.setdefault(shard, set()).add(key)

    ckpt = Checkpoint(index_path, [], index_path, obj)
    for shard in sorted(by_shard):
        header = read_header(_safe_shard_path(index_path, shard))
        keys = set(header.tensors)
        if keys != by_shard[shard]:
            missing = sorted(by_shard[shard] - keys)
            extra = sorted(keys - by_shard[shard])
            detail = f"missing {missing[0]!r}" if missing else f"unlisted {extra[0]!r}"
            raise SlotsmithError(f"{header.path}: does not match {index_path.name} ({detail})")
        ckpt.files.append(header)
        for key, info in header.tensors.items():
            ckpt.tensors[key] = (header, info)
    return ckpt


def _resolve_folder(folder: Path) -> Path:
    indexes = sorted(folder.glob(f"*{INDEX_SUFFIX}"))
    if len(indexes) == 1:
        return indexes[0]
    if len(indexes) > 1:
        raise SlotsmithError(f"{folder}: holds several index files; name one of them")
    files = sorted(folder.glob("*.safetensors"))
    if len(files) == 1:
        return files[0]
    if not files:
        raise SlotsmithError(f"{folder}: holds no .safetensors file")
    raise SlotsmithError(f"{folder}: holds several .safetensors files and no index; name one of them")


def open_checkpoint(path: str | os.PathLike) -> Checkpoint:
    """Open a checkpoint: a safetensors file, an index JSON, or a folder.

    Args:
        path: The file, the ``*.index.json`` of a sharded set, or a folder
            holding exactly one of either.

    Returns:
        The validated checkpoint; nothing but headers has been read.

    Raises:
        SlotsmithError: Missing or malformed files, or an index that does not
            describe its shards exactly.
    """
    path = Path(path)
    if is_folder(path):
        path = _resolve_folder(path)
    if path.name.endswith(".json"):
        return _open_index(path)
    header = read_header(path)
    return Checkpoint(path, [header], tensors={k: (header, i) for k, i in header.tensors.items()})
