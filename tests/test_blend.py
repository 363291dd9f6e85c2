"""``slotsmith.blend``: base + s * (slot - base) in float32, rounded to the dtype, against numpy (no torch)."""

import numpy as np
import pytest
from helpers import as_float32, blend_reference, from_float32

from slotsmith.blend import blend_bytes
from slotsmith.errors import SlotsmithError


def _values(rng, n):
    """Wide-ranging float32 values, signed zeros and sub-normals among them."""
    x = (rng.standard_normal(n) * np.exp(rng.standard_normal(n) * 4)).astype(np.float32)
    x[:4] = [0.0, -0.0, 1e-40, -3e-39]
    return x


@pytest.mark.parametrize("dtype", ["F32", "BF16", "F16"])
@pytest.mark.parametrize("strength", [0.0, 0.35, 0.7, 1.0, 1.5, 2.0])
def test_matches_float32_arithmetic_rounded_to_the_dtype(dtype, strength):
    rng = np.random.default_rng(1)
    scale = 1e-3 if dtype == "F16" else 1.0  # keep float16 mostly in range; its overflow has its own test
    base, slot = (from_float32(_values(rng, 5000) * scale, dtype) for _ in range(2))
    got = blend_bytes(base, slot, dtype, strength)
    assert got == blend_reference(base, slot, dtype, strength)
    if strength == 0.0:  # the base's values (-0.0 + 0 * x is +0.0, as in torch)
        assert np.array_equal(as_float32(got, dtype), as_float32(base, dtype))


def test_bfloat16_ties_round_to_even():
    """0 + s * (2 - 0) is exactly 2s: 1 + 2^-8 and 1 + 3 * 2^-8 lie half way between bfloat16 neighbours."""
    base, slot = from_float32(np.zeros(1, np.float32), "BF16"), from_float32(np.full(1, 2.0, np.float32), "BF16")
    assert as_float32(blend_bytes(base, slot, "BF16", (1 + 2**-8) / 2), "BF16")[0] == 1.0  # down, to even
    assert as_float32(blend_bytes(base, slot, "BF16", (1 + 3 * 2**-8) / 2), "BF16")[0] == 1 + 2**-6  # up, to even


def test_float16_overflows_to_infinity():
    base = np.array([60000, -60000, 1], np.float16).tobytes()
    slot = np.array([65504, -65504, 2], np.float16).tobytes()
    got = np.frombuffer(blend_bytes(base, slot, "F16", 2.0), "<f2")
    assert got[0] == np.inf and got[1] == -np.inf and got[2] == 3


def test_other_dtypes_are_refused():
    with pytest.raises(SlotsmithError, match="a strength needs float tensors .* not I32"):
        blend_bytes(b"\0" * 8, b"\0" * 8, "I32", 0.5)
