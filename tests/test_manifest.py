"""Slot manifests: canonical JSON, digest sealing, strict validation, YAML view."""

import copy
import json

import pytest
import xxhash
import yaml

from slotsmith.errors import SlotsmithError
from slotsmith.manifest import FORMAT, BaseFingerprint, Entry, build_manifest, manifest_from_json

H = "0123456789abcdef0123456789abcdef"
H2 = "fedcba9876543210fedcba9876543210"


def _manifest():
    entries = [
        Entry("blocks.1.ffn.0.weight", (128, 64), "BF16", (4, 20), H),
        Entry("blocks.0.self_attn.q.weight", (64, 64), "BF16", None, H2),
    ]
    base = BaseFingerprint(None, H, {"blocks.1.ffn.0.weight": H2, "blocks.0.self_attn.q.weight": H})
    return build_manifest(
        selection={"algorithm": "v2", "ff": 0.01, "ffid": 2, "num_pools": 8},
        base=base,
        entries=entries,
        provenance={"seed": 1, "steps": 100},
        expert="low",
    )


def test_digest_is_xxh3_of_the_canonical_body():
    m = _manifest()
    body = {k: v for k, v in m.to_json().items() if k != "digest"}
    canonical = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    assert m.digest == xxhash.xxh3_128_hexdigest(canonical.encode())
    assert m.format == FORMAT
    assert [e.name for e in m.entries] == sorted(e.name for e in m.entries)


def test_round_trip_through_json_and_yaml():
    m = _manifest()
    again = manifest_from_json(json.loads(m.to_canonical_json()), "x.slot")
    assert again == m
    assert yaml.safe_load(m.to_yaml()) == m.to_json()


def test_entry_geometry():
    e = Entry("t", (128, 64), "BF16", (4, 20), H)
    assert e.stored_shape == (16, 64)
    assert e.byte_range() == (4 * 128, 20 * 128)
    assert e.nbytes == 16 * 64 * 2
    assert e.span == (4, 20)
    assert Entry("t", (7,), "F32", None, H).span == (0, 7)


def _mutations():
    def set_(path, value):
        def f(doc):
            target = doc
            for k in path[:-1]:
                target = target[k]
            target[path[-1]] = value

        return f

    def drop(key):
        return lambda doc: doc.pop(key)

    return {
        "digest": (set_(["provenance", "seed"], 2), "digest mismatch"),
        "missing": (drop("expert"), "lacks field"),
        "unknown": (set_(["extra"], 1), "unknown field"),
        "format": (set_(["format"], "slotsmith-slot/99"), "format"),
        "shape type": (set_(["entries", 0, "shape"], "64x64"), "shape must be"),
        "dtype": (set_(["entries", 0, "dtype"], "F128"), "unknown dtype"),
        "rows range": (set_(["entries", 1, "rows"], [10, 200]), "out of range"),
        "rows empty": (set_(["entries", 1, "rows"], [5, 5]), "out of range"),
        "rows type": (set_(["entries", 1, "rows"], [1.5, 3]), "rows must be"),
        "bad hex": (set_(["entries", 0, "digest"], "zz"), "digest must be"),
        "selection type": (set_(["selection"], [1]), "selection must be"),
        "entries empty": (set_(["entries"], []), "entries must be"),
        "fingerprint": (set_(["base", "tensors"], {}), "base.tensors must list exactly"),
        "expert type": (set_(["expert"], 3), "expert must be"),
    }


@pytest.mark.parametrize("case", list(_mutations()))
def test_strict_validation_names_file_and_problem(case):
    mutate, expected = _mutations()[case]
    doc = copy.deepcopy(_manifest().to_json())
    mutate(doc)
    with pytest.raises(SlotsmithError) as e:
        manifest_from_json(doc, "char1.slot")
    msg = str(e.value)
    assert msg.startswith("char1.slot: manifest") and expected in msg and "\n" not in msg


def test_duplicate_entries_refused():
    doc = _manifest().to_json()
    doc["entries"].append(dict(doc["entries"][0]))
    with pytest.raises(SlotsmithError, match="twice"):
        manifest_from_json(doc, "x.slot")


def test_non_json_provenance_refused():
    with pytest.raises(SlotsmithError, match="JSON"):
        build_manifest(
            selection=None,
            base=BaseFingerprint(None, H, {"t": H}),
            entries=[Entry("t", (2,), "F32", None, H)],
            provenance={"when": object()},
            expert=None,
        )
