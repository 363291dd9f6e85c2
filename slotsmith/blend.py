"""``base + s * (slot - base)`` on raw tensor bytes, bit for bit as torch computes it, without torch.

``sample`` applies a slot at strength ``s`` in torch: the base's and the
slot's values are upcast to float32 (exactly), ``d = slot - base``, then
``p = s * d`` (``s`` rounded to float32 first, as torch does with a Python
scalar), then ``base + p``, each rounded to float32, and the sum reaches
the model cast to its dtype (round to nearest, ties to even). ``splice``
writes a strength splice through this module, so a strength splice holds
what ``sample`` computes, and the light core stays free of torch and numpy.

Each float32 operation is done in Python's double and rounded to float32
by an ``array('f')``: for +, - and x of two float32 values the double
result rounded once to float32 is the correctly rounded float32 result, so
this is IEEE float32 arithmetic.
"""

from __future__ import annotations

import math
import operator
import os
import struct
import sys
from array import array
from collections.abc import Callable
from itertools import repeat

import xxhash

from slotsmith.errors import SlotsmithError
from slotsmith.io.header import DTYPE_SIZES
from slotsmith.io.writer import write_all

BLENDABLE = ("F32", "BF16", "F16")
"""The dtypes a strength other than 1 can be applied to."""

CHUNK = 1 << 20
"""Elements blended at a time: bounds memory to some tens of MB."""

_LITTLE = sys.byteorder == "little"


def _to_f32(raw: bytes, dtype: str) -> array:
    """Little-endian tensor bytes as float32 values (exact: every bf16/fp16 value is a float32)."""
    if dtype == "BF16":
        wide = bytearray(2 * len(raw))  # a bf16 is the high half of a float32: zero low halves
        wide[2::4], wide[3::4] = raw[0::2], raw[1::2]
        out = array("f", bytes(wide))
    elif dtype == "F16":  # array has no half type; struct reads it
        return array("f", struct.unpack(f"<{len(raw) // 2}e", raw))
    else:
        out = array("f", raw)
    if not _LITTLE:
        out.byteswap()
    return out


def _lanes(word: int, n: int) -> int:
    """``word`` repeated in each of ``n`` 32-bit lanes of one integer."""
    return int.from_bytes(word.to_bytes(4, "little") * n, "little")


def _f32_to_bf16(le: bytes) -> bytes:
    """Little-endian float32 bytes rounded to bfloat16 bytes (ties to even), as torch casts.

    The rounding ``(bits + 0x7FFF + lsb) >> 16`` is done on every 32-bit lane
    of one big integer at once: no lane carries into the next unless it is a
    NaN, so a chunk with a NaN is rounded one value at a time instead.
    """
    n = len(le) // 4
    x = int.from_bytes(le, "little")
    magnitude = x & _lanes(0x7FFFFFFF, n)
    if (magnitude + _lanes(0x007FFFFF, n)) & _lanes(0x80000000, n):  # bit 31 of a lane: above infinity, a NaN
        return array("H", map(_bf16_bits, array("I", le))).tobytes()
    rounded = (x + _lanes(0x7FFF, n) + ((x >> 16) & _lanes(1, n))).to_bytes(4 * n, "little")
    out = bytearray(2 * n)
    out[0::2], out[1::2] = rounded[2::4], rounded[3::4]
    return bytes(out)


def _bf16_bits(bits: int) -> int:
    """A float32's bits rounded to bfloat16's (round to nearest, ties to even; a NaN as 0xFFFF, as torch's CPU cast)."""
    if bits & 0x7FFFFFFF > 0x7F800000:
        return 0xFFFF
    return (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16


def _f16_value(x: float) -> float:
    """``x`` if float16 can hold it rounded, else the infinity a cast overflows to."""
    try:
        struct.pack("<e", x)
    except OverflowError:
        return math.copysign(math.inf, x)
    return x


def _from_f32(values: array, dtype: str) -> bytes:
    """Float32 values as little-endian ``dtype`` bytes, rounded to nearest, ties to even."""
    if dtype == "F16":  # struct rounds to nearest, ties to even
        fmt = f"<{len(values)}e"
        try:
            return struct.pack(fmt, *values)
        except OverflowError:  # a value beyond float16's range (a strength near 2 on extreme weights)
            return struct.pack(fmt, *map(_f16_value, values))
    if not _LITTLE:
        values.byteswap()
    return values.tobytes() if dtype == "F32" else _f32_to_bf16(values.tobytes())


def blend_bytes(base: bytes, slot: bytes, dtype: str, strength: float) -> bytes:
    """``base + strength * (slot - base)``, elementwise, as ``sample``'s overlay computes it.

    Args:
        base: The base's bytes of a region (little-endian, as safetensors stores them).
        slot: The slot's bytes of the same region.
        dtype: Their safetensors dtype, one of ``BLENDABLE``.
        strength: How much of the slot's change to apply.

    Returns:
        The blended bytes, in ``dtype``.

    Raises:
        SlotsmithError: ``dtype`` is not blendable, or the lengths differ.
    """
    if dtype not in BLENDABLE:
        raise SlotsmithError(f"a strength needs float tensors ({', '.join(BLENDABLE)}), not {dtype}")
    if len(base) != len(slot) or len(base) % DTYPE_SIZES[dtype]:
        raise SlotsmithError(f"blend: {len(base)} base bytes against {len(slot)} slot bytes of {dtype}")
    a, b = _to_f32(base, dtype), _to_f32(slot, dtype)
    s = array("f", [strength])[0]  # torch rounds a Python scalar to the tensor's float32 first
    d = array("f", map(operator.sub, b, a))
    p = array("f", map(operator.mul, d, repeat(s)))
    return _from_f32(array("f", map(operator.add, a, p)), dtype)


def blend_ranges(
    base: tuple[int, int, int],
    slot: tuple[int, int, int],
    dtype: str,
    strength: float,
    out: int | None,
    progress: Callable[[int], None] | None = None,
) -> str:
    """Blend one region from two open files into ``out`` (appended), chunk by chunk.

    Args:
        base: ``(fd, start, end)`` of the base's bytes of the region.
        slot: ``(fd, start, end)`` of the slot's bytes, as long.
        dtype: The region's dtype (see ``BLENDABLE``).
        strength: How much of the slot's change to apply.
        out: A file open for writing, the blended bytes going at its current
            end; None: only their digest is wanted.
        progress: Called with each count of region bytes blended.

    Returns:
        The xxh3-128 (hex) of the blended bytes.

    Raises:
        SlotsmithError: Unblendable dtype, or a short read (a file changed).
        OSError: Reading or writing failed.
    """
    (bfd, bstart, bend), (sfd, sstart, _) = base, slot
    step = CHUNK * DTYPE_SIZES.get(dtype, 4)
    h = xxhash.xxh3_128()
    at = os.lseek(out, 0, os.SEEK_END) if out is not None else 0
    for pos in range(0, bend - bstart, step):
        n = min(step, bend - bstart - pos)
        x, y = os.pread(bfd, n, bstart + pos), os.pread(sfd, n, sstart + pos)
        if len(x) != n or len(y) != n:
            raise SlotsmithError("blend: a file got shorter while it was read")
        data = blend_bytes(x, y, dtype, strength)
        h.update(data)
        if out is not None:
            write_all(out, data, at)
            at += len(data)
        if progress is not None:
            progress(n)
    return h.hexdigest()
