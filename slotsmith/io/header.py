"""Strict reader of safetensors headers: no weights are loaded.

The checks follow the official library (8-byte little-endian header length,
100 MB header cap, UTF-8 JSON object, known dtypes, ``data_offsets`` that tile
the data buffer exactly, byte length == numel x dtype size, buffer ending at
end of file, ``__metadata__`` mapping str to str) and add a few of our own
(duplicate keys, unknown fields), so that everything downstream can trust the
offsets it is handed.
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass
from math import prod
from pathlib import Path

from slotsmith.errors import SlotsmithError
from slotsmith.io.files import open_input, os_error, parse_json_object

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

MAX_TENSORS = 200_000
"""Most tensors one file may hold (a Wan 14B checkpoint has about 1,100)."""

MAX_DIMS = 64
"""Most dimensions a tensor may have (torch allows 64)."""

MAX_NUMEL = 2**62
"""Most elements a tensor may have: bounds every size computed from a shape."""

_ENTRY_FIELDS = {"dtype", "shape", "data_offsets"}


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


def bounded_numel(shape, limit: int) -> int | None:
    """The product of ``shape``, or None once it passes ``limit`` (so huge shapes are never multiplied out).

    Args:
        shape: Non-negative integers.
        limit: The largest product accepted.

    Returns:
        The product, or None when it exceeds ``limit``.
    """
    if 0 in shape:
        return 0
    n = 1
    for d in shape:
        n *= d
        if n > limit:
            return None
    return n


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
        shown = repr(dtype[:40]) if isinstance(dtype, str) else f"of type {type(dtype).__name__}"
        raise SlotsmithError(f"{where}: unknown dtype {shown}")
    if not isinstance(shape, list) or not all(is_int(d) and d >= 0 for d in shape):
        raise SlotsmithError(f"{where}: shape must be a list of non-negative integers")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(is_int(o) for o in offsets)):
        raise SlotsmithError(f"{where}: data_offsets must be [begin, end] integers")
    begin, end = offsets
    if not 0 <= begin <= end:
        raise SlotsmithError(f"{where}: data_offsets [{begin}, {end}] are not 0 <= begin <= end")
    if len(shape) > MAX_DIMS:
        raise SlotsmithError(f"{where}: shape has {len(shape)} dimensions (at most {MAX_DIMS})")
    expected = bounded_numel(shape, MAX_NUMEL)
    if expected is None:
        raise SlotsmithError(f"{where}: shape {shape} has more than {MAX_NUMEL} elements")
    expected *= DTYPE_SIZES[dtype]
    if end - begin != expected:
        raise SlotsmithError(
            f"{where}: holds {end - begin} bytes but shape {shape} of {dtype} needs {expected}"
        )
    return TensorInfo(name, dtype, tuple(shape), data_start + begin, data_start + end)


def _read_exactly(fd: int, n: int, pos: int) -> bytes:
    """``n`` bytes at ``pos`` (one ``pread`` may return fewer); fewer only at end of file."""
    chunks, got = [], 0
    while got < n:
        chunk = os.pread(fd, n - got, pos + got)
        if not chunk:
            break
        chunks.append(chunk)
        got += len(chunk)
    return b"".join(chunks)


SNIFF_BYTES = 64
"""Bytes read to recognise a file that is not safetensors."""

_TO_SAFETENSORS = (
    "convert it to safetensors: python -c \"import sys, torch; from safetensors.torch import save_file; "
    "sd = torch.load(sys.argv[1], map_location='cpu', weights_only=True); save_file(sd.get('state_dict', sd), "
    "sys.argv[2])\" IN.pth OUT.safetensors"
)


def sniff_format(head: bytes) -> tuple[str, str] | None:
    """Recognise a file that is not safetensors by its first bytes.

    Args:
        head: The file's first bytes (``SNIFF_BYTES`` are enough).

    Returns:
        ``(kind, what to do)`` for a Git LFS pointer, a PyTorch zip or pickle
        file, an HTML page, a GGUF file; None for anything else.
    """
    text = head.lstrip().lower()
    if head.startswith(b"version https://git-lfs"):
        return "a Git LFS pointer, not the weights", "run `git lfs pull` in its repository (or download the file itself)"
    if head.startswith(b"PK\x03\x04"):
        return "a PyTorch checkpoint (zip), not safetensors", _TO_SAFETENSORS
    if len(head) >= 2 and head[0] == 0x80 and 2 <= head[1] <= 5:
        return "a PyTorch checkpoint (pickle), not safetensors", _TO_SAFETENSORS
    if text.startswith((b"<!doctype html", b"<html", b"<head", b"<?xml")):
        return "an HTML page, not weights", "the download failed (an error or login page was saved): download it again"
    if head.startswith(b"GGUF"):
        return "a GGUF file (quantized for llama.cpp / ComfyUI-GGUF)", "use the original safetensors weights"
    return None


def not_safetensors_error(path: Path, head: bytes) -> SlotsmithError | None:
    """The error for a file whose first bytes show it is another format, or None."""
    found = sniff_format(head)
    return None if found is None else SlotsmithError(f"{path}: is {found[0]}; {found[1]}")


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
    fd = open_input(path, "safetensors file")  # a FIFO or device would block or never end
    try:
        size = os.fstat(fd).st_size
        head = _read_exactly(fd, SNIFF_BYTES, 0)
        # A safetensors header opens with '{' after its 8-byte length; anything else may be a known impostor.
        if head[8:9] != b"{":
            error = not_safetensors_error(path, head)
            if error is not None:
                raise error
        prefix = head[:8]
        if len(prefix) < 8:
            raise SlotsmithError(f"{path}: too short to be a safetensors file ({size} bytes)")
        (header_len,) = struct.unpack("<Q", prefix)
        if header_len > HEADER_CAP:
            raise SlotsmithError(f"{path}: header length {header_len} exceeds the {HEADER_CAP}-byte cap")
        if 8 + header_len > size:
            raise SlotsmithError(f"{path}: header length {header_len} runs past the end of the file ({size} bytes)")
        raw = _read_exactly(fd, header_len, 8)
    except OSError as e:
        raise os_error(path, e) from None
    finally:
        os.close(fd)

    if not raw.startswith(b"{"):
        raise SlotsmithError(f"{path}: header does not start with '{{' (not a safetensors file?)")
    # Counted on the bytes, before parsing: a 100 MB header of 1.6M empty tensors
    # would otherwise take gigabytes and half a minute to refuse or accept.
    if raw.count(b'"data_offsets"') > MAX_TENSORS:
        raise SlotsmithError(f"{path}: header lists more than {MAX_TENSORS} tensors")
    # The entries are checked field by field below without recursing, so the
    # nesting walk is left out: it would cost seconds on a 100 MB header.
    obj = parse_json_object(raw, str(path), max_depth=None)
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


def read_tensor_bytes(header: SafetensorsHeader, name: str) -> bytes:
    """The stored bytes of one tensor of a file whose header `read_header` validated.

    Args:
        header: The file's header.
        name: The tensor's key.

    Returns:
        Its ``info.nbytes`` bytes, as stored (little-endian).

    Raises:
        SlotsmithError: No such tensor, or the file cannot be read or is now
            shorter than its header says.
    """
    info = header.tensors.get(name)
    if info is None:
        raise SlotsmithError(f"{header.path}: has no tensor {name!r}")
    fd = open_input(header.path, "safetensors file")
    try:
        data = _read_exactly(fd, info.nbytes, info.start)
    except OSError as e:
        raise os_error(header.path, e) from None
    finally:
        os.close(fd)
    if len(data) != info.nbytes:
        raise SlotsmithError(f"{header.path}: tensor {name!r} is truncated")
    return data
