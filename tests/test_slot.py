"""Slot files: write_slot / read_slot, fingerprints, tamper detection."""

import json
import struct

import numpy as np
import pytest
import xxhash
from helpers import disk_full, make_checkpoint, random_bytes, read_raw_safetensors, write_raw_safetensors
from safetensors import safe_open

from slotsmith.errors import SlotsmithError
from slotsmith.inventory import inventory_from_checkpoint, load_inventory
from slotsmith.manifest import METADATA_KEY
from slotsmith.slot import read_slot, write_slot

FFN = "blocks.0.ffn.0.weight"  # (128, 64)
Q = "blocks.1.self_attn.q.weight"  # (64, 64)


@pytest.fixture
def base(tmp_path):
    return make_checkpoint(tmp_path / "base.safetensors")


def _new(shape, seed=7, dtype="F32"):
    return random_bytes(shape, dtype, np.random.default_rng(seed))


def test_write_and_read_slot(tmp_path, base):
    inv = inventory_from_checkpoint(base.path)
    rows = _new((16, 64))
    whole = _new((64, 64), seed=8)
    out = tmp_path / "char1.slot"
    m = write_slot(
        out,
        inv,
        {FFN: rows, Q: whole},
        selection={"algorithm": "v2", "ff": 0.01, "ffid": 2, "num_pools": 8},
        provenance={"seed": 3},
        rows={FFN: (8, 24)},
        expert="low",
    )
    slot = read_slot(out)
    assert slot.manifest == m
    slot.verify_hashes()
    assert slot.read_tensor(FFN) == rows and slot.read_tensor(Q) == whole
    # The official library reads it, and the tensors hold exactly the given bytes.
    with safe_open(str(out), "numpy") as f:
        assert sorted(f.keys()) == [FFN, Q]
        assert f.get_tensor(FFN).tobytes() == rows and f.get_tensor(FFN).shape == (16, 64)
        assert json.loads(f.metadata()[METADATA_KEY])["digest"] == m.digest
    # Digests are computed independently here with xxhash.
    e = m.entry_map
    assert e[FFN].digest == xxhash.xxh3_128_hexdigest(rows)
    assert e[FFN].rows == (8, 24) and e[FFN].shape == (128, 64)
    rb = base.row_bytes(FFN)
    assert m.base.tensors[FFN] == xxhash.xxh3_128_hexdigest(base.tensors[FFN][8 * rb : 24 * rb])
    assert m.base.tensors[Q] == xxhash.xxh3_128_hexdigest(base.tensors[Q])
    assert m.base.layout_digest == inv.layout_digest()
    assert m.expert == "low" and m.provenance["seed"] == 3 and "slotsmith" in m.provenance


def test_bf16_slot(tmp_path):
    b = make_checkpoint(tmp_path / "b.safetensors", dtype="BF16")
    inv = inventory_from_checkpoint(b.path)
    data = _new((64, 64), dtype="BF16")
    write_slot(tmp_path / "s.slot", inv, {Q: data}, selection=None, provenance={})
    header, tensors = read_raw_safetensors(tmp_path / "s.slot")
    assert header[Q]["dtype"] == "BF16" and tensors[Q] == data


def test_existing_output_needs_force(tmp_path, base):
    inv = inventory_from_checkpoint(base.path)
    out = tmp_path / "s.slot"
    write_slot(out, inv, {Q: _new((64, 64))}, selection=None, provenance={})
    with pytest.raises(SlotsmithError, match="already exists"):
        write_slot(out, inv, {Q: _new((64, 64), 9)}, selection=None, provenance={})
    write_slot(out, inv, {Q: _new((64, 64), 9)}, selection=None, provenance={}, force=True)
    assert read_slot(out).read_tensor(Q) == _new((64, 64), 9)


@pytest.mark.parametrize(
    "tensors, rows, expected",
    [
        ({"blocks.9.ffn.0.weight": b"x"}, None, "not in the base"),
        ({Q: b"\0" * 10}, None, "bytes given"),
        ({FFN: b"\0" * 256 * 10}, {FFN: (120, 130)}, "out of range"),
        ({FFN: b"\0" * 256 * 10}, {Q: (0, 1)}, "rows given"),
        ({}, None, "at least one"),
    ],
)
def test_write_slot_refusals(tmp_path, base, tensors, rows, expected):
    inv = inventory_from_checkpoint(base.path)
    out = tmp_path / "s.slot"
    with pytest.raises(SlotsmithError, match=expected):
        write_slot(out, inv, tensors, selection=None, provenance={}, rows=rows)
    assert list(tmp_path.iterdir()) == [base.path]


def test_layout_inventory_cannot_fingerprint(tmp_path):
    inv = load_inventory("wan2.1-t2v-1.3b")
    with pytest.raises(SlotsmithError, match="base checkpoint is needed"):
        write_slot(tmp_path / "s.slot", inv, {"head.head.bias": b"\0" * 128}, selection=None, provenance={})
    assert not any(tmp_path.iterdir())


def _rewrite(path, mutate):
    header, tensors = read_raw_safetensors(path)
    meta = header.pop("__metadata__")
    entries = {k: (v["dtype"], tuple(v["shape"]), tensors[k]) for k, v in header.items()}
    meta, entries = mutate(meta, entries)
    write_raw_safetensors(path, entries, meta)


@pytest.fixture
def slot_path(tmp_path, base):
    inv = inventory_from_checkpoint(base.path)
    out = tmp_path / "s.slot"
    write_slot(out, inv, {Q: _new((64, 64)), FFN: _new((4, 64))}, selection=None, provenance={}, rows={FFN: (0, 4)})
    return out


def test_read_slot_refuses_a_plain_checkpoint(base):
    with pytest.raises(SlotsmithError, match="not a slot"):
        read_slot(base.path)


def _tamper_manifest(meta, entries):
    doc = json.loads(meta[METADATA_KEY])
    doc["expert"] = "high"
    return {METADATA_KEY: json.dumps(doc)}, entries


def _extra_tensor(meta, entries):
    return meta, {**entries, "head.head.bias": ("F32", (64,), b"\0" * 256)}


def _missing_tensor(meta, entries):
    return meta, {k: v for k, v in entries.items() if k != Q}


def _reshaped(meta, entries):
    dtype, _, data = entries[Q]
    return meta, {**entries, Q: (dtype, (32, 128), data)}


@pytest.mark.parametrize(
    "mutate, expected",
    [
        (_tamper_manifest, "digest mismatch"),
        (_extra_tensor, "'head.head.bias' that the manifest does not list"),
        (_missing_tensor, f"{Q!r} that the file lacks"),
        (_reshaped, "but the manifest says"),
    ],
)
def test_read_slot_refuses_mismatches(slot_path, mutate, expected):
    _rewrite(slot_path, mutate)
    with pytest.raises(SlotsmithError, match=expected) as e:
        read_slot(slot_path)
    assert str(slot_path) in str(e.value)


def test_flipped_weight_byte_is_caught(slot_path):
    header_len = struct.unpack("<Q", slot_path.read_bytes()[:8])[0]
    blob = bytearray(slot_path.read_bytes())
    blob[8 + header_len + 5] ^= 0xFF  # first tensor in data order
    slot_path.write_bytes(bytes(blob))
    slot = read_slot(slot_path)  # structure still fine
    problems = slot.hash_problems()
    assert len(problems) == 1 and str(slot_path) in problems[0]
    with pytest.raises(SlotsmithError, match="do not match the manifest digest"):
        slot.verify_hashes()



def _sparse_checkpoint(path, model: str):
    """A checkpoint with a known model's full layout in BF16: real header, sparse zero data (no disk used)."""
    from slotsmith.layout import KNOWN_MODELS, wan_tensor_shapes

    header, offset = {}, 0
    for name, shape in wan_tensor_shapes(KNOWN_MODELS[model].config).items():
        size = 2 * int(np.prod(shape))
        header[name] = {"dtype": "BF16", "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        f.truncate(8 + len(raw) + offset)
    return path


def test_expert_slot_of_the_shared_14b_layout_records_wan22(tmp_path):
    """Wan 2.1 T2V 14B and Wan 2.2 T2V A14B share one layout; an expert slot is a Wan 2.2 one."""
    inv = inventory_from_checkpoint(_sparse_checkpoint(tmp_path / "dit.safetensors", "wan2.2-t2v-a14b"))
    assert inv.matching_models() == ["wan2.1-t2v-14b", "wan2.2-t2v-a14b"]
    bias = {"head.head.bias": bytes(2 * 64)}
    high = write_slot(tmp_path / "high.slot", inv, bias, selection=None, provenance={}, expert="high")
    plain = write_slot(tmp_path / "plain.slot", inv, bias, selection=None, provenance={})
    assert high.base.layout == "wan2.2-t2v-a14b"
    assert plain.base.layout == "wan2.1-t2v-14b"


def test_full_disk_is_a_clear_error_and_leaves_nothing(tmp_path, base, monkeypatch):
    inv = inventory_from_checkpoint(base.path)
    disk_full(monkeypatch)
    out = tmp_path / "a.slot"
    written = r"a\.slot: writing failed \(No space left on device\); nothing was written"
    with pytest.raises(SlotsmithError, match=written):
        write_slot(out, inv, {Q: _new((64, 64))}, selection=None, provenance={})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["base.safetensors"]
