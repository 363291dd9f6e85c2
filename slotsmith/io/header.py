"""Strict reader of safetensors headers: no weights are loaded.

The checks follow the official library (8-byte little-endian header length,
100 MB header cap, UTF-8 JSON object, known dtypes, ``data_offsets`` that tile
the data buffer exactly, byte length == numel x dtype size, buffer ending at
end of file, ``__metadata__`` mapping str to str) and add a few of our own
(duplicate keys, unknown fields), so that everything downstream can trust the
offsets it is handed.
"""

from __future__ import annotations

import json
import os
import re
import stat
import struct
from dataclasses import dataclass
from math import prod
from pathlib import Path

from slotsmith.errors import SlotsmithError

HEADER_CAP = 100_000_000
"""Largest header the official library accepts, in bytes."""

DTYPE_SIZES = {
    "BOOL": 1,
    "U8": 1,
    "I8": 1,
    "F8_E5M2": 1,
    "F8_E4M3": 1,
    "F8_E8M0": 1,
    "I16": 2,
    "U16": 2,
    "F16": 2,
    "BF16": 2,
    "I32": 4,
    "U32": 4,
    "F32": 4,
    "I64": 8,
    "U64": 8,
    "F64": 8,
}

_ENTRY_FIELDS = {"dtype", "shape", "data_offsets"}

_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor's bytes lie in its file.

    Attributes:
        name: The key as stored in the file.
        dtype: Safetensors dtype string, e.g. ``"BF16"``.
        shape: Tensor shape.
        start: Absolute file offset of the first byte.
        end: Absolute file offset one past the last byte.
    """

    name: str
    dtype: str
    shape: tuple[int, ...]
    start: int
    end: int

    @property
    def numel(self) -> int:
        return prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.end - self.start


@dataclass(frozen=True)
class SafetensorsHeader:
    """The parsed, validated header of one safetensors file.

    Attributes:
        path: The file.
        header_len: Length of the JSON header in bytes (the 8-byte prefix not
            included).
        data_start: Absolute offset of the data buffer (``8 + header_len``).
        metadata: The ``__metadata__`` mapping (empty when absent).
        tensors: Tensor infos in file-key order as written in the header.
    """

    path: Path
    header_len: int
    data_start: int
    metadata: dict[str, str]
    tensors: dict[str, TensorInfo]


def _reject_duplicates(pairs: list[tuple[str, object]]) -> dict:
    seen: dict = {}
    for key, value in pairs:
        if key in seen:
            raise ValueError(f"duplicate key {key!r}")
        seen[key] = value
    return seen


def parse_json_object(raw: bytes, what: str) -> dict:
    """Decode UTF-8 JSON that must be an object, refusing duplicate keys.

    Args:
        raw: The bytes to decode.
        what: Names the source in error messages (usually the file path).

    Returns:
        The decoded object.

    Raises:
        SlotsmithError: Invalid UTF-8, invalid JSON, duplicate keys, or not an
            object.
    """
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise SlotsmithError(f"{what}: not valid UTF-8 ({e.reason} at byte {e.start})") from None
    try:
        obj = json.loads(text, object_pairs_hook=_reject_duplicates)
    except (ValueError, RecursionError) as e:
        raise SlotsmithError(f"{what}: invalid JSON ({e})") from None
    if _SURROGATE_ESCAPE.search(text):
        # A lone surrogate escape (\ud800) decodes to a str that cannot be encoded
        # back to UTF-8, which would crash digests and writers later: refuse it here.
        try:
            json.dumps(obj, ensure_ascii=False).encode("utf-8")
        except UnicodeEncodeError:
            raise SlotsmithError(f"{what}: invalid JSON (lone UTF-16 surrogate escape)") from None
    if not isinstance(obj, dict):
        raise SlotsmithError(f"{what}: JSON must be an object, got {type(obj).__name__}")
    return obj


def is_int(value: object) -> bool:
    """Whether a decoded JSON value is an integer (``true``/``false`` are not)."""
    return isinstance(value, int) and not isinstance(value, bool)


def _parse_entry(path: Path, name: str, entry: object, data_start: int) -> TensorInfo:
    where = f"{path}: tensor {name!r}"
    if not isinstance(entry, dict):
        raise SlotsmithError(f"{where}: header entry must be an object")
    if set(entry) != _ENTRY_FIELDS:
        raise SlotsmithError(f"{where}: header entry must have exactly the fields dtype, shape, data_offsets")
    dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
    if not isinstance(dtype, str) or dtype not in DTYPE_SIZES:  # a list would not even hash
        raise SlotsmithError(f"{where}: unknown dtype {dtype!r}")
    if not isinstance(shape, list) or not all(is_int(d) and d >= 0 for d in shape):
        raise SlotsmithError(f"{where}: shape must be a list of non-negative integers")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(is_int(o) for o in offsets)):
        raise SlotsmithError(f"{where}: data_offsets must be [begin, end] integers")
    begin, end = offsets
    if not 0 <= begin <= end:
        raise SlotsmithError(f"{where}: data_offsets [{begin}, {end}] are not 0 <= begin <= end")
    expected = prod(shape) * DTYPE_SIZES[dtype]
    if end - begin != expected:
        raise SlotsmithError(
            f"{where}: holds {end - begin} bytes but shape {shape} of {dtype} needs {expected}"
        )
    return TensorInfo(name, dtype, tuple(shape), data_start + begin, data_start + end)


def read_header(path: str | os.PathLike) -> SafetensorsHeader:
    """Read and validate the header of a safetensors file.

    Only the header is read, so this takes milliseconds for any file size.

    Args:
        path: The ``.safetensors`` (or ``.slot``) file.

    Returns:
        The validated header.

    Raises:
        SlotsmithError: The file is missing, unreadable or malformed in any
            way; the message names the file and, where it applies, the tensor.
    """
    path = Path(path)
    try:
        mode = os.stat(path).st_mode
        if stat.S_ISDIR(mode):
            raise SlotsmithError(f"{path}: is a directory, not a safetensors file")
        if not stat.S_ISREG(mode):
            # A FIFO or device would block or never end; only regular files are checkpoints.
            raise SlotsmithError(f"{path}: not a regular file")
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            prefix = f.read(8)
            if len(prefix) < 8:
                raise SlotsmithError(f"{path}: too short to be a safetensors file ({size} bytes)")
            (header_len,) = struct.unpack("<Q", prefix)
            if header_len > HEADER_CAP:
                raise SlotsmithError(f"{path}: header length {header_len} exceeds the {HEADER_CAP}-byte cap")
            if 8 + header_len > size:
                raise SlotsmithError(
                    f"{path}: header length {header_len} runs past the end of the file ({size} bytes)"
                )
            raw = f.read(header_len)
    except FileNotFoundError:
        raise SlotsmithError(f"{path}: no such file") from None
    except PermissionError:
        raise SlotsmithError(f"{path}: permission denied") from None

    if not raw.startswith(b"{"):
        raise SlotsmithError(f"{path}: header does not start with '{{' (not a safetensors file?)")
    obj = parse_json_object(raw, str(path))
    data_start = 8 + header_len

    metadata = obj.pop("__metadata__", {})
    if not isinstance(metadata, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()
    ):
        raise SlotsmithError(f"{path}: __metadata__ must map strings to strings")

    tensors = {name: _parse_entry(path, name, entry, data_start) for name, entry in obj.items()}

    # The data buffer must be tiled exactly: no gap, no overlap, no tail.
    cursor = data_start
    for info in sorted(tensors.values(), key=lambda t: (t.start, t.end)):
        if info.start != cursor:
            problem = "overlaps the previous tensor" if info.start < cursor else "leaves a gap before it"
            raise SlotsmithError(f"{path}: tensor {info.name!r}: data {problem}")
        cursor = info.end
    if cursor != size:
        raise SlotsmithError(
            f"{path}: data buffer ends at byte {cursor} but the file has {size} bytes (truncated or trailing data)"
        )
    return SafetensorsHeader(path, header_len, data_start, metadata, tensors)
