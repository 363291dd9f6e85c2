"""The JSON Schemas in manifests/schema/ accept what slotsmith writes and refuse what it refuses (no torch)."""

import json

import jsonschema
import numpy as np
import pytest
import yaml
from helpers import (
    SCHEMAS,
    make_checkpoint,
    random_bytes,
    read_raw_safetensors,
    schema_validator,
    schemas,
)

from slotsmith.cast import load_cast, new_cast_text, pin_cast, write_new_cast
from slotsmith.inventory import inventory_from_checkpoint
from slotsmith.io.header import DTYPE_SIZES
from slotsmith.layout import KNOWN_MODELS
from slotsmith.manifest import METADATA_KEY
from slotsmith.select import ALGORITHMS, select_v2
from slotsmith.slot import write_slot
from slotsmith.slotspec import SlotSpec
from slotsmith.splice import splice
from slotsmith.splice_record import SPLICE_KEY

FF = 0.05


def test_every_schema_is_valid_and_named():
    assert set(schemas()) == {"slot-manifest", "splice-record", "cache-index", "cast"}
    for name, schema in schemas().items():
        jsonschema.validators.validator_for(schema).check_schema(schema)
        assert schema["$id"] == f"urn:slotsmith:schema:{name}"


def test_schema_enums_follow_the_code():
    manifest, cast = schemas()["slot-manifest"], schemas()["cast"]
    assert set(manifest["properties"]["entries"]["items"]["properties"]["dtype"]["enum"]) == set(DTYPE_SIZES)
    assert set(cast["properties"]["selection"]["properties"]["algorithm"]["enum"]) == set(ALGORITHMS)
    assert set(cast["properties"]["base"]["properties"]["layout"]["enum"]) == {*KNOWN_MODELS, None}


@pytest.fixture
def made(tmp_path):
    """A base, two slots (one a row slot, one extracted-like), plain and sealed splices, a sharded one."""
    base = make_checkpoint(tmp_path / "base.safetensors")
    inv = inventory_from_checkpoint(base.path)
    rng = np.random.default_rng(0)
    slots = []
    for ffid in (1, 2):
        sel = select_v2(inv.numels(), FF, ffid)
        data = {n: random_bytes(inv.tensors[n].shape, "F32", rng) for n in sel.tensors}
        p = tmp_path / f"s{ffid}.slot"
        write_slot(p, inv, data, selection=sel.record(), provenance={"seed": ffid}, expert=None)
        slots.append(p)
    name = "blocks.0.self_attn.q.weight"
    rows = tmp_path / "rows.slot"
    write_slot(rows, inv, {name: random_bytes((3, 64), "F32", rng)}, selection=None,
               provenance={"extracted_from": {"base": "b", "tuned": "t"}}, rows={name: (0, 3)})
    plain = splice(base.path, slots, tmp_path / "plain.safetensors")
    sealed = splice(base.path, [*slots, rows], tmp_path / "sealed.safetensors", seal=True)
    sharded_base = make_checkpoint(tmp_path / "sharded", shards=2)
    sharded = splice(sharded_base.path, slots[:1], tmp_path / "sharded-out", seal=True)
    blended = splice(base.path, [SlotSpec(slots[0], 0.5), rows], tmp_path / "blended.safetensors")
    return {"slots": [*slots, rows], "spliced": [plain, sealed, blended], "sharded": sharded, "base": base}


def _meta(path, key):
    return json.loads(read_raw_safetensors(path)[0]["__metadata__"][key])


def test_slot_manifests_validate(made):
    v = schema_validator("slot-manifest")
    for p in made["slots"]:
        v.validate(_meta(p, METADATA_KEY))


def test_splice_records_validate(made):
    v = schema_validator("splice-record")
    records = [_meta(p, SPLICE_KEY) for p in made["spliced"]]
    index = json.loads(next(made["sharded"].glob("*.index.json")).read_text())
    records.append(json.loads(index["metadata"][SPLICE_KEY]))
    assert "seal" in records[1] and "seal" not in records[0]
    assert records[2]["format"] == "slotsmith-splice/2" and records[2]["slots"][0]["strength"] == 0.5
    for r in records:
        v.validate(r)


def test_schemas_refuse_what_slotsmith_refuses(made):
    manifest = _meta(made["slots"][0], METADATA_KEY)
    record = _meta(made["spliced"][1], SPLICE_KEY)
    bad_manifests = [
        {**manifest, "colour": "red"},
        {**manifest, "digest": "XYZ"},
        {**manifest, "entries": []},
        {**manifest, "entries": [{**manifest["entries"][0], "dtype": "F12"}]},
        {k: v for k, v in manifest.items() if k != "expert"},
    ]
    for doc in bad_manifests:
        assert not schema_validator("slot-manifest").is_valid(doc)
    bad_records = [
        {**record, "format": "slotsmith-splice/9"},
        {**record, "seal": {"x": "nothex"}},
        {**record, "slots": [{"file": "a.slot", "manifest": bad_manifests[0]}]},
        {**record, "extra": 1},
    ]
    blended = _meta(made["spliced"][2], SPLICE_KEY)
    first, second = blended["slots"]
    bad_records += [
        {**blended, "format": "slotsmith-splice/1"},
        {**blended, "slots": [{**first, "strength": 2.5}, second]},
        {**blended, "slots": [{k: v for k, v in first.items() if k != "blended"}, second]},
    ]
    for doc in bad_records:
        assert not schema_validator("splice-record").is_valid(doc)


def test_cast_files_validate(tmp_path, made):
    v = schema_validator("cast")
    example = SCHEMAS.parent / "cast.example.yaml"
    load_cast(example)
    v.validate(yaml.safe_load(example.read_text()))
    text = new_cast_text(
        base="base.safetensors", layout=None, expert=None, ff=FF,
        characters={"a": (1, "s1.slot"), "b": (2, "s2.slot")}, output="out.safetensors", comment="made here",
    )
    path = write_new_cast(made["base"].path.parent / "cast.yaml", text)
    v.validate(yaml.safe_load(path.read_text()))
    pin_cast(path)
    doc = yaml.safe_load(path.read_text())
    assert doc["characters"]["a"]["pin"] is not None
    v.validate(doc)
    for bad in ({**doc, "extra": 1}, {**doc, "characters": {"a": {"ffid": 1}}},
                {**doc, "characters": {"a b": {"ffid": 1, "slot": "x"}}}):
        assert not v.is_valid(bad)
