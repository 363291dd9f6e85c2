"""xxh3-128 digests of bytes, file ranges and JSON-able objects."""

from __future__ import annotations

import json
import os

import xxhash

BLOCK = 16 * 1024 * 1024
"""Read size for hashing file ranges: large enough to run at disk speed."""


def digest_bytes(data: bytes | memoryview) -> str:
    """The xxh3-128 of ``data`` as 32 hex digits."""
    return xxhash.xxh3_128_hexdigest(data)


def canonical_json(obj: object) -> str:
    """JSON with sorted keys and no spaces: one text for one value."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def digest_json(obj: object) -> str:
    """The xxh3-128 of ``obj``'s canonical JSON."""
    return digest_bytes(canonical_json(obj).encode("utf-8"))


def digest_file_range(fd: int, start: int, end: int) -> str:
    """Hash bytes ``[start, end)`` of an open file, streaming in large blocks.

    Args:
        fd: A file descriptor open for reading.
        start: First byte.
        end: One past the last byte.

    Returns:
        The xxh3-128 as 32 hex digits.

    Raises:
        OSError: The file ends before ``end``.
    """
    h = xxhash.xxh3_128()
    update_from_file(h, fd, start, end)
    return h.hexdigest()


def update_from_file(h: xxhash.xxh3_128, fd: int, start: int, end: int) -> None:
    """Feed bytes ``[start, end)`` of an open file to a running hash, in large blocks.

    Raises:
        OSError: The file ends before ``end``.
    """
    buf = bytearray(min(BLOCK, max(end - start, 1)))
    view = memoryview(buf)
    pos = start
    while pos < end:
        n = os.preadv(fd, [view[: min(len(buf), end - pos)]], pos)
        if n == 0:
            raise OSError(f"file ends at byte {pos}, before byte {end}")
        h.update(view[:n])
        pos += n
