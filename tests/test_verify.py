"""`slotsmith verify`: every check passing and failing, on real files made here."""

import json
import time

import numpy as np
import pytest
import xxhash
from click.testing import CliRunner
from helpers import (
    HANG_SECONDS,
    make_checkpoint,
    random_bytes,
    read_raw_safetensors,
    rewrite_metadata,
    write_raw_safetensors,
)

from slotsmith.cli import main
from slotsmith.digest import digest_json
from slotsmith.errors import SlotsmithError
from slotsmith.inventory import inventory_from_checkpoint
from slotsmith.io.header import read_header
from slotsmith.manifest import METADATA_KEY, manifest_from_json
from slotsmith.select import select_v2
from slotsmith.slot import write_slot
from slotsmith.slotspec import SlotSpec
from slotsmith.splice import splice
from slotsmith.splice_record import SPLICE_KEY

FFN = "blocks.0.ffn.0.weight"  # (128, 64)
Q = "blocks.1.self_attn.q.weight"  # (64, 64)
BIAS = "head.head.bias"  # (64,)
FF = 0.05


def _run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def _json(*args):
    r = _run(*args, "--json")
    assert "Traceback" not in r.output
    return r.exit_code, json.loads(r.stdout)


def _rows(doc, result=None):
    return [c for c in doc["checks"] if result is None or c["result"] == result]


def _failed(doc):
    return {(c["file"], c["check"]) for c in _rows(doc, "fail")}


def _numels(base):
    return {n: int(np.prod(s)) for n, s in base.shapes.items()}


def _slot(path, base_path, names, seed, *, rows=None, selection=None, expert=None, provenance=None):
    """A slot of random values for ``names`` (rows: name -> (start, stop))."""
    inv = inventory_from_checkpoint(base_path)
    rng = np.random.default_rng(seed)
    rows = rows or {}
    data = {}
    for n in names:
        shape = inv.tensors[n].shape
        r = rows.get(n)
        data[n] = random_bytes(shape if r is None else (r[1] - r[0], *shape[1:]), inv.tensors[n].dtype, rng)
    write_slot(path, inv, data, selection=selection, provenance=provenance or {}, rows=rows, expert=expert)
    return path


def _selected_slot(path, base, ffid, seed=None, ff=FF):
    """A slot as the trainer makes it: exactly the tensors ``--ff --ffid`` select."""
    sel = select_v2(_numels(base), ff, ffid)
    selection = {"algorithm": "v2", "ff": ff, "ffid": ffid, "num_pools": 8}
    return _slot(path, base.path, sel.tensors, ffid if seed is None else seed, selection=selection)


def _data_ranges(path):
    """key -> (start, end) absolute file offsets, from the plain-json parser."""
    blob = path.read_bytes()
    n = int.from_bytes(blob[:8], "little")
    header = json.loads(blob[8 : 8 + n])
    return {
        k: (8 + n + v["data_offsets"][0], 8 + n + v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"
    }


def _flip(path, offset):
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x40
    path.write_bytes(bytes(data))


def _reseal(manifest: dict) -> dict:
    """A manifest dict with its digest recomputed over the other fields (a forger's move)."""
    body = {k: v for k, v in manifest.items() if k != "digest"}
    return {**body, "digest": digest_json(body)}


def _manifest(path):
    return json.loads(read_raw_safetensors(path)[0]["__metadata__"][METADATA_KEY])


@pytest.fixture
def base(tmp_path):
    return make_checkpoint(tmp_path / "base.safetensors")


@pytest.fixture
def good_set(tmp_path, base):
    """Two disjoint trained slots and the checkpoint spliced from them."""
    a = _selected_slot(tmp_path / "a.slot", base, 0)
    b = _selected_slot(tmp_path / "b.slot", base, 1)
    out = splice(base.path, [a, b], tmp_path / "out.safetensors")
    return a, b, out


def test_good_set_passes_every_check(tmp_path, base, good_set, monkeypatch):
    a, b, out = good_set
    code, doc = _json("verify", a, b, out, "--base", base.path)
    assert code == 0 and doc["ok"] and not _rows(doc, "fail") and not _rows(doc, "skip")
    ran = {(c["file"], c["check"]) for c in doc["checks"]}
    for slot in (a, b):
        assert {(str(slot), c) for c in ("structure", "hashes", "selection", "base")} <= ran
    assert {(str(out), c) for c in ("structure", "record", "slot bytes", "selection", "base")} <= ran
    assert ("group 1", "disjoint") in ran
    # The table: one row per check, on stdout, and the exit code.
    r = _run("verify", a, b, out, "--base", base.path)
    assert r.exit_code == 0 and r.stdout.splitlines()[0].split() == ["FILE", "CHECK", "RESULT", "DETAIL"]
    assert len([ln for ln in r.stdout.splitlines() if " pass " in ln]) == len(doc["checks"])

    # Without PATH: the current folder; the plain base is not a target.
    monkeypatch.chdir(tmp_path)
    code, doc = _json("verify")
    assert code == 0
    assert {c["file"] for c in doc["checks"]} == {"a.slot", "b.slot", "out.safetensors", "group 1"}


def test_discovery_skips_hidden_folders_and_plain_checkpoints(tmp_path, base, monkeypatch):
    (tmp_path / "deep" / "er").mkdir(parents=True)
    _selected_slot(tmp_path / "deep" / "er" / "c.slot", base, 2)
    for hidden in (".venv", ".git"):
        (tmp_path / hidden).mkdir()
        (tmp_path / hidden / "junk.slot").write_bytes(b"not a slot")
    make_checkpoint(tmp_path / "deep" / "other.safetensors", seed=3)
    sharded = make_checkpoint(tmp_path / "shardbase", shards=2)
    splice(sharded.path, [tmp_path / "deep" / "er" / "c.slot"], tmp_path / "spliced_set")
    monkeypatch.chdir(tmp_path)
    code, doc = _json("verify")
    assert code == 0, _rows(doc, "fail")
    files = {c["file"] for c in doc["checks"]}
    # The sharded spliced set is verified once, by its index; its shards are not targets.
    assert files == {"deep/er/c.slot", "spliced_set/diffusion_pytorch_model.safetensors.index.json"}

    # A damaged .safetensors is reported, never skipped: it might be a spliced checkpoint.
    (tmp_path / "deep" / "broken.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{")
    code, doc = _json("verify")
    assert code == 1 and _failed(doc) == {("deep/broken.safetensors", "structure")}


def test_nothing_to_verify_and_usage_errors(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    r = _run("verify")
    assert r.exit_code == 1 and "nothing to verify" in r.output and "Traceback" not in r.output
    assert _run("verify", "--no-such-option").exit_code == 2
    assert _run("verify", tmp_path / "missing.slot").exit_code == 2


def test_plain_checkpoint_named_explicitly_fails(base):
    code, doc = _json("verify", base.path)
    assert code == 1 and "neither a slot nor a spliced checkpoint" in _rows(doc, "fail")[0]["detail"]


@pytest.mark.parametrize("where", ["first", "middle", "last"])
def test_corrupt_byte_anywhere_in_slot_data_names_that_tensor(tmp_path, base, where):
    slot = _slot(tmp_path / "s.slot", base.path, [FFN, Q, BIAS], 5)
    ranges = _data_ranges(slot)
    for name, (start, end) in ranges.items():
        copy = tmp_path / f"{name}.slot"
        copy.write_bytes(slot.read_bytes())
        _flip(copy, {"first": start, "middle": (start + end) // 2, "last": end - 1}[where])
        code, doc = _json("verify", copy)
        assert code == 1 and _failed(doc) == {(str(copy), "hashes")}
        (row,) = _rows(doc, "fail")
        named = [n for n in ranges if repr(n) in " ".join(row["problems"])]
        assert named == [name] and len(row["problems"]) == 1


def test_slot_structure_and_manifest_digest_failures(tmp_path, base):
    slot = _slot(tmp_path / "s.slot", base.path, [FFN, Q], 5)
    m = _manifest(slot)
    m["provenance"]["steps"] = 999  # edited without resealing
    rewrite_metadata(slot, slot, METADATA_KEY, json.dumps(m))
    code, doc = _json("verify", slot)
    assert code == 1 and "digest mismatch" in _rows(doc, "fail")[0]["detail"]

    cut = tmp_path / "cut.slot"
    cut.write_bytes(_slot(tmp_path / "t.slot", base.path, [FFN], 6).read_bytes()[:-1])
    code, doc = _json("verify", cut)
    assert code == 1 and _failed(doc) == {(str(cut), "structure")}


def test_selection_reproducible(tmp_path, base):
    ok = _selected_slot(tmp_path / "ok.slot", base, 3)
    code, doc = _json("verify", ok, "--base", base.path)
    assert code == 0

    sel = select_v2(_numels(base), FF, 3)
    selection = {"algorithm": "v2", "ff": FF, "ffid": 3, "num_pools": 8}
    missing = _slot(tmp_path / "missing.slot", base.path, sel.tensors[:-1], 1, selection=selection)
    stray = next(n for n in base.shapes if n not in sel.pool)
    extra = _slot(tmp_path / "extra.slot", base.path, [*sel.tensors, stray], 1, selection=selection)
    other = {**selection, "ffid": 4}  # a manifest that lies about its pool
    liar = _slot(tmp_path / "liar.slot", base.path, sel.tensors, 1, selection=other)
    code, doc = _json("verify", missing, extra, liar, "--base", base.path)
    assert code == 1
    fails = {c["file"]: c["detail"] for c in _rows(doc, "fail") if c["check"] == "selection"}
    assert set(fails) == {str(missing), str(extra), str(liar)}
    assert repr(sel.tensors[-1]) in fails[str(missing)] and "missing" in fails[str(missing)]
    assert repr(stray) in fails[str(extra)]


def test_extracted_slot_must_lie_within_its_selection(tmp_path, base):
    sel = select_v2(_numels(base), FF, 2)
    selection = {"algorithm": "v2", "ff": FF, "ffid": 2, "num_pools": 8}
    prov = {"extracted_from": {"base": "base.safetensors", "tuned": "t.safetensors"}}
    within = _slot(tmp_path / "in.slot", base.path, sel.tensors[:1], 1, selection=selection, provenance=prov)
    stray = next(n for n in base.shapes if n not in sel.pool)
    outside = _slot(tmp_path / "out.slot", base.path, [sel.tensors[0], stray], 1, selection=selection, provenance=prov)
    bare = _slot(tmp_path / "bare.slot", base.path, [stray], 1, provenance=prov)
    code, doc = _json("verify", within, outside, bare, "--base", base.path)
    results = {(c["file"], c["check"]): c for c in doc["checks"]}
    assert results[(str(within), "selection")]["result"] == "pass"
    assert results[(str(outside), "selection")]["result"] == "fail"
    assert repr(stray) in results[(str(outside), "selection")]["detail"]
    assert results[(str(bare), "selection")]["result"] == "skip"  # nothing to recompute
    assert code == 1


def test_selection_on_a_known_layout_needs_no_base(tmp_path):
    """A slot claiming a shipped layout is recomputed on it: no 1.3B base needed."""
    from slotsmith.inventory import load_inventory
    from slotsmith.manifest import (
        BaseFingerprint,
        Entry,
        build_manifest,
        manifest_metadata,
    )

    layout = load_inventory("wan2.1-t2v-1.3b")
    sel = select_v2(layout.numels(), 1e-9, 5)  # the pool's first, smallest tensor
    assert len(sel.tensors) == 1
    wrong = next(n for n in sel.pool[1:] if layout.tensors[n].numel < 100_000)

    def write(path, name):
        spec = layout.tensors[name]
        data = random_bytes(spec.shape, "F32", np.random.default_rng(0))
        m = build_manifest(
            selection={"algorithm": "v2", "ff": 1e-9, "ffid": 5, "num_pools": 8},
            base=BaseFingerprint("wan2.1-t2v-1.3b", "0" * 32, {name: "1" * 32}),
            entries=[Entry(name, spec.shape, "F32", None, xxhash.xxh3_128_hexdigest(data))],
            provenance={},
            expert=None,
        )
        write_raw_safetensors(path, {name: ("F32", spec.shape, data)}, dict(manifest_metadata(m)))
        return path

    right = write(tmp_path / "right.slot", sel.tensors[0])
    bad = write(tmp_path / "wrong.slot", wrong)
    code, doc = _json("verify", right, bad)
    sel_rows = {c["file"]: c["result"] for c in doc["checks"] if c["check"] == "selection"}
    assert sel_rows == {str(right): "pass", str(bad): "fail"} and code == 1
    # An unknown layout and no --base: skipped, not failed.
    unknown = _selected_slot(tmp_path / "tiny.slot", make_checkpoint(tmp_path / "b.safetensors"), 1)
    code, doc = _json("verify", unknown)
    assert code == 0 and [c["result"] for c in doc["checks"] if c["check"] == "selection"] == ["skip"]


def test_selection_skip_says_when_the_base_given_has_another_layout(tmp_path, base):
    from slotsmith.layout import WanConfig

    slot = _selected_slot(tmp_path / "a.slot", base, 1)
    other = make_checkpoint(tmp_path / "other.safetensors", WanConfig(64, 256, 2, text_dim=32, freq_dim=16))
    other_digest = inventory_from_checkpoint(other.path).layout_digest()
    code, doc = _json("verify", slot, "--base", other.path)
    (row,) = [c for c in doc["checks"] if c["check"] == "selection"]
    assert row["result"] == "skip"
    assert row["detail"].endswith(
        f"is not a known model; the --base {other.path} has another layout ({other_digest})"
    )
    assert "give --base" not in row["detail"]


def test_overlap_fails_and_row_disjoint_slots_pass(tmp_path, base):
    a = _slot(tmp_path / "a.slot", base.path, [FFN], 1, rows={FFN: (0, 64)})
    b = _slot(tmp_path / "b.slot", base.path, [FFN, BIAS], 2, rows={FFN: (64, 128)})
    code, doc = _json("verify", a, b)
    assert code == 0 and ("group 1", "disjoint") in {(c["file"], c["check"]) for c in _rows(doc, "pass")}

    c = _slot(tmp_path / "c.slot", base.path, [FFN], 3, rows={FFN: (60, 70)})
    code, doc = _json("verify", a, b, c)
    assert code == 1 and _failed(doc) == {("group 1", "disjoint")}
    details = " ".join(_rows(doc, "fail")[0]["problems"])
    assert str(a) in details and str(b) in details and str(c) in details
    assert f"{a} and {c} overlap: both hold rows [60, 64) of tensor {FFN!r}" in details


def test_slots_of_different_bases_are_groups_unless_base_given(tmp_path, base):
    other = make_checkpoint(tmp_path / "other.safetensors", seed=1)  # same layout, other bytes
    low = _slot(tmp_path / "low.slot", base.path, [Q], 1, expert="low")
    high = _slot(tmp_path / "high.slot", other.path, [Q], 2, expert="high")
    code, doc = _json("verify", low, high)
    assert code == 0 and len(doc["groups"]) == 2
    assert sorted(g["expert"] for g in doc["groups"]) == ["high", "low"]
    assert "slots by the base they claim" in _run("verify", low, high).stdout

    # With --base they must all fit it: the high slot is refused and they overlap.
    code, doc = _json("verify", low, high, "--base", base.path)
    assert code == 1 and _failed(doc) == {(str(high), "base"), ("group 1", "disjoint")}
    assert "wrong base" in next(c["detail"] for c in _rows(doc, "fail") if c["check"] == "base")

    # Claiming one base (both "low") while made on different ones: they disagree.
    liar = _slot(tmp_path / "liar.slot", other.path, [Q], 3, expert="low")
    code, doc = _json("verify", low, liar)
    assert code == 1 and ("group 1", "same base") in _failed(doc)
    assert repr(Q) in next(c["detail"] for c in _rows(doc, "fail") if c["check"] == "same base")


def test_base_fingerprint(tmp_path, base):
    slot = _slot(tmp_path / "s.slot", base.path, [FFN, Q], 1, rows={FFN: (3, 9)})
    assert _json("verify", slot, "--base", base.path)[0] == 0
    # Same layout, the replaced rows differ: a different base.
    tensors = dict(base.tensors)
    rb = base.row_bytes(FFN)
    tensors[FFN] = tensors[FFN][: 5 * rb] + bytes(rb) + tensors[FFN][6 * rb :]
    near = tmp_path / "near.safetensors"
    write_raw_safetensors(near, {n: ("F32", base.shapes[n], d) for n, d in tensors.items()})
    code, doc = _json("verify", slot, "--base", near)
    assert code == 1 and _failed(doc) == {(str(slot), "base")}
    assert f"{FFN} rows [3, 9)" in _rows(doc, "fail")[0]["detail"]
    # Another layout altogether.
    from slotsmith.layout import WanConfig

    cfg = WanConfig(dim=32, ffn_dim=64, num_layers=2, text_dim=32, freq_dim=16)
    small = make_checkpoint(tmp_path / "small.safetensors", cfg)
    code, doc = _json("verify", slot, "--base", small.path)
    assert code == 1 and (str(slot), "base") in _failed(doc)


def test_flipped_byte_in_spliced_slot_tensor_names_it(tmp_path, base, good_set):
    a, b, out = good_set
    slotted = {e for s in (a, b) for e in _data_ranges(s)}
    ranges = _data_ranges(out)
    for name in sorted(slotted):
        copy = tmp_path / "copy.safetensors"
        copy.write_bytes(out.read_bytes())
        start, end = ranges[name]
        _flip(copy, (start + end) // 2)
        code, doc = _json("verify", copy)
        assert code == 1 and _failed(doc) == {(str(copy), "slot bytes")}
        (row,) = _rows(doc, "fail")
        assert row["problems"] == [p for p in row["problems"] if repr(name) in p] and len(row["problems"]) == 1


def test_spliced_bytes_outside_slots_checked_against_base(tmp_path, base, good_set):
    a, b, out = good_set
    slotted = {e for s in (a, b) for e in _data_ranges(s)}
    name = next(n for n in sorted(base.shapes) if n not in slotted)
    start, end = _data_ranges(out)[name]
    _flip(out, start)
    code, doc = _json("verify", out)
    assert code == 0  # without the base nothing says what those bytes should be
    code, doc = _json("verify", out, "--base", base.path)
    assert code == 1 and _failed(doc) == {(str(out), "base")}
    assert repr(name) in _rows(doc, "fail")[0]["detail"]


def test_spliced_row_slots_and_sharded_sets(tmp_path):
    base = make_checkpoint(tmp_path / "base", shards=3, dtype="BF16")
    a = _slot(tmp_path / "a.slot", base.path, [FFN], 1, rows={FFN: (0, 10)})
    b = _slot(tmp_path / "b.slot", base.path, [FFN, Q], 2, rows={FFN: (10, 128)})
    out = splice(base.path, [a, b], tmp_path / "out")
    code, doc = _json("verify", out, "--base", base.path)
    assert code == 0, _rows(doc, "fail")
    index = next(out.glob("*.index.json"))
    assert {c["file"] for c in doc["checks"]} == {str(index)}

    # Each shard repeats the record: one that differs is caught.
    shard = sorted(out.glob("*.safetensors"))[1]
    record = json.loads(read_raw_safetensors(shard)[0]["__metadata__"][SPLICE_KEY])
    record["slots"] = record["slots"][:1]
    rewrite_metadata(shard, shard, SPLICE_KEY, json.dumps(record))
    code, doc = _json("verify", out)
    assert code == 1 and _failed(doc) == {(str(index), "record")}
    assert shard.name in _rows(doc, "fail")[0]["detail"]


def test_tampered_splice_records(tmp_path, base, good_set):
    a, b, out = good_set
    record = json.loads(read_raw_safetensors(out)[0]["__metadata__"][SPLICE_KEY])

    def verify_with(rec):
        copy = tmp_path / "t.safetensors"
        copy.write_bytes(out.read_bytes())
        rewrite_metadata(copy, copy, SPLICE_KEY, rec if isinstance(rec, str) else json.dumps(rec))
        code, doc = _json("verify", copy)
        assert code == 1 and "Traceback" not in json.dumps(doc)
        return _failed(doc), _rows(doc, "fail")[0]["detail"]

    # A slot manifest edited inside the record without resealing.
    r = json.loads(json.dumps(record))
    r["slots"][0]["manifest"]["expert"] = "high"
    assert verify_with(r)[0] == {(str(tmp_path / "t.safetensors"), "structure")}
    # Resealed, but the slot now claims bytes the checkpoint does not hold.
    r = json.loads(json.dumps(record))
    r["slots"][0]["manifest"]["entries"][0]["digest"] = "0" * 32
    r["slots"][0]["manifest"] = _reseal(r["slots"][0]["manifest"])
    failed, _ = verify_with(r)
    assert (str(tmp_path / "t.safetensors"), "slot bytes") in failed
    # The same slot recorded twice: not disjoint.
    r = json.loads(json.dumps(record))
    r["slots"].append(r["slots"][0])
    assert (str(tmp_path / "t.safetensors"), "record") in verify_with(r)[0]
    # A recorded slot made on another layout.
    r = json.loads(json.dumps(record))
    r["slots"][1]["manifest"]["base"]["layout_digest"] = "f" * 32
    r["slots"][1]["manifest"] = _reseal(r["slots"][1]["manifest"])
    assert (str(tmp_path / "t.safetensors"), "record") in verify_with(r)[0]
    # Wrong types, duplicate keys, not JSON.
    for bad in (
        {**record, "slots": "nope"},
        {**record, "base": {"layout_digest": 5, "source": "x"}},
        json.dumps(record)[:-1] + ', "format": "slotsmith-splice/1"}',
        "{not json",
    ):
        failed, detail = verify_with(bad)
        assert failed == {(str(tmp_path / "t.safetensors"), "structure")} and "splice record" in detail


def _first_entry(m, **fields):
    """The manifest, resealed, with fields of its first entry replaced."""
    return _reseal({**m, "entries": [{**m["entries"][0], **fields}, *m["entries"][1:]]})


HOSTILE_MANIFESTS = {
    "wrong type": lambda m: {**m, "entries": {"a": 1}},
    "shape of strings": lambda m: _reseal({**m, "entries": [{**m["entries"][0], "shape": ["64"]}]}),
    "digest mismatch": lambda m: {**m, "digest": "0" * 32},
    "names a tensor the file lacks": lambda m: _reseal(
        {
            **m,
            "entries": [*m["entries"], {**m["entries"][-1], "name": "zz.weight"}],
            "base": {**m["base"], "tensors": {**m["base"]["tensors"], "zz.weight": "0" * 32}},
        }
    ),
    "file holds a tensor the manifest lacks": lambda m: _reseal(
        {
            **m,
            "entries": m["entries"][:1],
            "base": {**m["base"], "tensors": {m["entries"][0]["name"]: m["base"]["tensors"][m["entries"][0]["name"]]}},
        }
    ),
    "rows outside the tensor": lambda m: _first_entry(m, rows=[120, 200]),
    "negative rows": lambda m: _first_entry(m, rows=[-1, 3]),
    "huge shape": lambda m: _first_entry(m, shape=[2**70, 2**70]),
    "bool as int": lambda m: _first_entry(m, rows=[False, True]),
    "selection a list": lambda m: _reseal({**m, "selection": [1, 2]}),
}


@pytest.mark.parametrize("case", sorted(HOSTILE_MANIFESTS))
def test_hostile_manifests_fail_in_one_line(tmp_path, base, case):
    slot = _slot(tmp_path / "s.slot", base.path, [FFN, Q], 1)
    rewrite_metadata(slot, slot, METADATA_KEY, json.dumps(HOSTILE_MANIFESTS[case](_manifest(slot))))
    code, doc = _json("verify", slot)
    assert code == 1 and _failed(doc) == {(str(slot), "structure")}
    (row,) = _rows(doc, "fail")
    assert str(slot) in row["detail"] and "\n" not in row["detail"]
    r = _run("inspect", slot)  # the same reader behind another command
    assert r.exit_code == 1 and r.output.count("\n") == 1 and r.output.startswith("error: ")


def _with_provenance_text(m, text):
    return json.dumps({**m, "provenance": {"note": "@@"}}).replace('"@@"', text)


@pytest.mark.parametrize(
    "edit",
    [
        lambda m: json.dumps(m)[:-1] + ', "format": "slotsmith-slot/1"}',  # duplicate keys
        lambda m: _with_provenance_text(m, '"\\ud800"'),  # lone surrogate: decodes, but cannot be hashed
        lambda m: _with_provenance_text(m, "1" * 5000),  # an integer beyond Python's digit limit
        lambda m: _with_provenance_text(m, "[" * 100_000 + "]" * 100_000),  # nesting beyond the recursion limit
        lambda m: "[1, 2]",
        lambda m: json.dumps(m)[:-3],
    ],
    ids=["duplicate key", "lone surrogate", "huge integer", "deep nesting", "not an object", "truncated"],
)
def test_hostile_manifest_text(tmp_path, base, edit):
    slot = _slot(tmp_path / "s.slot", base.path, [FFN], 1)
    rewrite_metadata(slot, slot, METADATA_KEY, edit(_manifest(slot)))
    code, doc = _json("verify", slot)
    assert code == 1 and _failed(doc) == {(str(slot), "structure")}
    assert "manifest" in _rows(doc, "fail")[0]["detail"]


def _raw_file(path, header: dict, data_len: int):
    body = json.dumps(header).encode()  # json escapes a lone surrogate as the text \udXXX
    path.write_bytes(len(body).to_bytes(8, "little") + body + bytes(data_len))
    return path


def test_hostile_slot_headers(tmp_path):
    unhashable = _raw_file(tmp_path / "h.slot", {"t": {"dtype": [], "shape": [1], "data_offsets": [0, 4]}}, 4)
    code, doc = _json("verify", unhashable)
    assert code == 1 and _failed(doc) == {(str(unhashable), "structure")} and "dtype" in doc["checks"][0]["detail"]
    # A tensor name with a lone surrogate decodes, but no digest or writer could encode it again.
    entry = {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}
    surrogate = _raw_file(tmp_path / "s.safetensors", {"t\udc00": entry}, 4)
    with pytest.raises(SlotsmithError, match="surrogate"):
        read_header(surrogate)


def test_layout_yaml_with_unhashable_dtype(tmp_path):
    from slotsmith.inventory import inventory_from_layout_file

    path = tmp_path / "l.yaml"
    path.write_text("tensors:\n  a: {shape: [1], dtype: [F32]}\n")
    with pytest.raises(SlotsmithError, match="unknown dtype"):
        inventory_from_layout_file(path)


def test_selection_fields_of_hostile_types_fail_cleanly(tmp_path, base):
    slot = _selected_slot(tmp_path / "s.slot", base, 1)
    for sel in (
        {"algorithm": "v2", "ff": "0.05", "ffid": 1},
        {"algorithm": "v2", "ff": 0.05, "ffid": True},
        {"algorithm": "v2", "ff": 0.05, "ffid": 1, "num_pools": 10**12},  # would allocate 10^12 pools
        {"algorithm": "v9", "ff": 0.05, "ffid": 1},
        {"algorithm": ["v2"], "ff": 0.05, "ffid": 1},
        {"algorithm": "v2", "ff": float("nan"), "ffid": 1},
        {"algorithm": "v2", "ff": 0.05, "ffid": 99},
    ):
        copy = tmp_path / "c.slot"
        copy.write_bytes(slot.read_bytes())
        rewrite_metadata(copy, copy, METADATA_KEY, json.dumps(_reseal({**_manifest(copy), "selection": sel})))
        t0 = time.perf_counter()
        code, doc = _json("verify", copy, "--base", base.path)
        assert time.perf_counter() - t0 < HANG_SECONDS
        assert code == 1 and _failed(doc) == {(str(copy), "selection")}, sel


def test_index_metadata_splice_record_of_wrong_type(tmp_path, base):
    sharded = make_checkpoint(tmp_path / "sh", shards=2)
    out = splice(sharded.path, [_slot(tmp_path / "a.slot", sharded.path, [Q], 1)], tmp_path / "out")
    index = next(out.glob("*.index.json"))
    doc = json.loads(index.read_text())
    doc["metadata"][SPLICE_KEY] = {"format": "slotsmith-splice/1"}
    index.write_text(json.dumps(doc))
    code, rep = _json("verify", out)
    assert code == 1 and "must be a JSON string" in _rows(rep, "fail")[0]["detail"]
    r = _run("inspect", out)
    assert r.exit_code == 1 and r.output.startswith("error: ") and "Traceback" not in r.output


def test_manifest_with_very_many_entries_is_refused_fast():
    """Duplicate detection must be linear: a 100 MB header can list a million entries."""
    n = 100_000
    entries = [{"name": f"t{i:07d}", "shape": [1], "dtype": "F32", "rows": None, "digest": "0" * 32} for i in range(n)]
    entries.append(dict(entries[-1]))
    obj = {
        "format": "slotsmith-slot/1",
        "selection": None,
        "provenance": {},
        "expert": None,
        "digest": "0" * 32,
        "base": {"layout": None, "layout_digest": "0" * 32, "tensors": {e["name"]: "0" * 32 for e in entries}},
        "entries": entries,
    }
    t0 = time.perf_counter()
    with pytest.raises(SlotsmithError, match="twice"):
        manifest_from_json(obj, "big")
    assert time.perf_counter() - t0 < HANG_SECONDS


def test_quiet_prints_only_failures(tmp_path, base):
    good = _slot(tmp_path / "good.slot", base.path, [Q], 1)
    bad = _slot(tmp_path / "bad.slot", base.path, [FFN], 2)
    _flip(bad, _data_ranges(bad)[FFN][0])
    r = _run("verify", good, bad, "-q")
    assert r.exit_code == 1
    lines = [ln for ln in r.stdout.splitlines() if ln.strip()]
    assert lines[0].split()[:4] == ["FILE", "CHECK", "RESULT", "DETAIL"]
    assert [ln.split()[:3] for ln in lines[1:-1]] == [[str(bad), "hashes", "FAIL"]]
    assert lines[-1].startswith("FAILED:")


def test_fifos_are_refused_not_waited_on(tmp_path, base, monkeypatch):
    import os

    os.mkfifo(tmp_path / "pipe.slot")
    os.mkfifo(tmp_path / "pipe.safetensors.index.json")
    _slot(tmp_path / "ok.slot", base.path, [Q], 1)
    monkeypatch.chdir(tmp_path)
    code, doc = _json("verify")  # found by the walk: skipped, not opened
    assert code == 0 and {c["file"] for c in doc["checks"]} == {"ok.slot"}
    code, doc = _json("verify", "pipe.slot")  # named: refused
    assert code == 1 and "not a regular file" in doc["checks"][0]["detail"]
    r = _run("verify", "ok.slot", "--base", "pipe.slot")
    assert r.exit_code == 1 and "not a regular file" in r.output


# --- sealed splices and out-of-date records ------------------------------------------------------


def _uncovered_offset(out, slots):
    """A data offset of ``out`` in a tensor no slot covers."""
    covered = {e.name for s in slots for e in manifest_from_json(_manifest(s), str(s)).entries}
    key = next(k for k in sorted(_data_ranges(out)) if k not in covered)
    return _data_ranges(out)[key][0]


@pytest.mark.parametrize("sealed", [True, False])
def test_seal_detects_a_byte_changed_outside_the_slots_without_the_base(tmp_path, base, sealed):
    a = _selected_slot(tmp_path / "a.slot", base, 0)
    out = splice(base.path, [a], tmp_path / "out.safetensors", seal=sealed)
    code, doc = _json("verify", out)
    assert code == 0
    seal_row = next(c for c in doc["checks"] if c["check"] == "seal")
    assert seal_row["result"] == ("pass" if sealed else "skip")
    _flip(out, _uncovered_offset(out, [a]))
    code, doc = _json("verify", out)
    if sealed:
        assert code == 1 and _failed(doc) == {(str(out), "seal")}
        assert "bytes changed since the splice" in _rows(doc, "fail")[0]["detail"]
    else:  # the limit a seal lifts: only --base sees it
        assert code == 0
        code, doc = _json("verify", out, "--base", base.path)
        assert code == 1 and (str(out), "base") in _failed(doc)


def test_seal_digests_are_the_tensors_bytes(tmp_path, base):
    a = _selected_slot(tmp_path / "a.slot", base, 0)
    out = splice(base.path, [a], tmp_path / "out.safetensors", seal=True)
    header, tensors = read_raw_safetensors(out)
    seal = json.loads(header["__metadata__"][SPLICE_KEY])["seal"]
    assert seal == {k: xxhash.xxh3_128_hexdigest(v) for k, v in tensors.items()}  # native keys: canonical names


def test_sealed_sharded_splice_verifies_and_repeats_the_record(tmp_path):
    b = make_checkpoint(tmp_path / "base", shards=3, convention="diffusers")
    a = _selected_slot(tmp_path / "a.slot", b, 0)
    out = splice(b.path, [a], tmp_path / "out", seal=True)
    code, doc = _json("verify", out)
    assert code == 0 and any(c["check"] == "seal" and c["result"] == "pass" for c in doc["checks"])
    index = json.loads(next(out.glob("*.index.json")).read_text())
    records = {read_raw_safetensors(f)[0]["__metadata__"][SPLICE_KEY] for f in out.glob("*.safetensors")}
    assert records == {index["metadata"][SPLICE_KEY]}


def test_resplice_drops_the_old_seal(tmp_path, base):
    a = _selected_slot(tmp_path / "a.slot", base, 0)
    b = _selected_slot(tmp_path / "b.slot", base, 1)
    first = splice(base.path, [a], tmp_path / "first.safetensors", seal=True)
    second = splice(first, [b], tmp_path / "second.safetensors")
    record = json.loads(read_raw_safetensors(second)[0]["__metadata__"][SPLICE_KEY])
    assert "seal" not in record and len(record["slots"]) == 2
    assert _json("verify", second)[0] == 0


def test_verify_flags_a_splice_of_an_older_slot(tmp_path, base):
    a = _selected_slot(tmp_path / "a.slot", base, 0)
    out = splice(base.path, [a], tmp_path / "out.safetensors")
    old = manifest_from_json(_manifest(a), str(a)).digest
    a.unlink()
    _selected_slot(tmp_path / "a.slot", base, 0, seed=123)  # retrained under the same name
    new = manifest_from_json(_manifest(a), str(a)).digest
    code, doc = _json("verify", a, out)
    assert code == 1 and _failed(doc) == {(str(out), "up to date")}
    detail = _rows(doc, "fail")[0]["detail"]
    assert "out of date" in detail and old in detail and new in detail and str(a) in detail
    # Alone, the spliced file is self-consistent: nothing to compare it with.
    assert _json("verify", out)[0] == 0


def test_verify_passes_a_splice_of_the_current_slots(tmp_path, good_set):
    code, doc = _json("verify", *good_set)
    row = next(c for c in doc["checks"] if c["check"] == "up to date")
    assert code == 0 and row["result"] == "pass" and "2 slot(s)" in row["detail"]


def test_malformed_seal_is_refused(tmp_path, base):
    a = _selected_slot(tmp_path / "a.slot", base, 0)
    out = splice(base.path, [a], tmp_path / "out.safetensors", seal=True)
    record = json.loads(read_raw_safetensors(out)[0]["__metadata__"][SPLICE_KEY])
    record["seal"] = {"x": "not hex"}
    rewrite_metadata(out, out, SPLICE_KEY, json.dumps(record))
    code, doc = _json("verify", out)
    assert code == 1 and "malformed splice record" in _rows(doc, "fail")[0]["detail"]


def test_v3_selection_is_checked_row_by_row(tmp_path):
    from slotsmith.checks import selection_problems
    from slotsmith.inventory import inventory_from_checkpoint
    from slotsmith.select import select

    base = make_checkpoint(tmp_path / "base.safetensors")
    inv = inventory_from_checkpoint(base.path)
    sel = select({n: t.shape for n, t in inv.tensors.items()}, 0.05, 3, "v3", 16)
    rng = np.random.default_rng(0)
    name, (a, b) = next(iter(sel.rows.items()))

    def manifest(rows, provenance):
        data = {n: random_bytes((r[1] - r[0], *inv.tensors[n].shape[1:]), "F32", rng) for n, r in rows.items()}
        path = tmp_path / f"{len(list(tmp_path.glob('*.slot')))}.slot"
        return write_slot(path, inv, data, selection=sel.record(), provenance=provenance, rows=rows)

    assert selection_problems("s", manifest(sel.rows, {}), inv) == []
    shifted = {**sel.rows, name: (a + 1, b + 1)}
    assert selection_problems("s", manifest(shifted, {}), inv) == [
        f"s: tensor '{name} rows [{a + 1}, {b + 1})' is not rows [{a}, {b}) of the selection "
        f"v3 --pools 16 --ff 0.05 --ffid 3 on {inv.source}"
    ]
    extracted = {"extracted_from": {"base": "b", "tuned": "t"}}
    assert selection_problems("s", manifest({name: (a, a + 1)}, extracted), inv) == []  # within: fine
    assert len(selection_problems("s", manifest({name: (b, b + 1)}, extracted), inv)) == 1


# --- strength splices -------------------------------------------------------------------------------


@pytest.fixture
def blended(tmp_path):
    """A BF16 base, a row slot spliced at 0.7 beside a whole-tensor slot at 1."""
    base = make_checkpoint(tmp_path / "base.safetensors", dtype="BF16")
    a = _slot(tmp_path / "a.slot", base.path, [FFN, Q], 1, rows={FFN: (0, 40)})
    b = _slot(tmp_path / "b.slot", base.path, [BIAS], 2)
    out = splice(base.path, [SlotSpec(a, 0.7), b], tmp_path / "out.safetensors")
    return {"base": base.path, "a": a, "b": b, "out": out, "dir": tmp_path}


def _check(doc, file, check):
    return next(c for c in doc["checks"] if c["file"] == str(file) and c["check"] == check)


def test_strength_splice_passes_with_and_without_the_base(blended):
    code, doc = _json("verify", blended["out"])
    assert code == 0 and _check(doc, blended["out"], "slot bytes")["result"] == "pass"
    skipped = _check(doc, blended["out"], "strength")
    assert skipped["result"] == "skip" and "a.slot at 0.7: give --base" in skipped["detail"]
    code, doc = _json("verify", blended["out"], blended["a"], blended["b"], "--base", blended["base"])
    assert code == 0, _failed(doc)
    assert _check(doc, blended["out"], "strength")["result"] == "pass"
    code, doc = _json("verify", blended["out"], blended["b"], "--base", blended["base"])
    assert code == 0 and "slot 'a.slot' (that version) is not among" in _check(doc, blended["out"], "strength")["detail"]


def test_a_changed_blend_fails_slot_bytes_and_strength(blended):
    out = blended["out"]
    header, _ = read_raw_safetensors(out)
    data = bytearray(out.read_bytes())
    data[8 + int.from_bytes(data[:8], "little") + header[Q]["data_offsets"][0]] ^= 0x40
    out.write_bytes(bytes(data))
    code, doc = _json("verify", out, blended["a"], "--base", blended["base"])
    assert code == 1 and {(str(out), "slot bytes"), (str(out), "strength")} <= _failed(doc)
    detail = _check(doc, out, "slot bytes")["detail"]
    assert f"tensor {Q!r} no longer holds the blend at strength 0.7 of slot 'a.slot'" in detail
    assert f"{Q!r} is not {blended['base']} + 0.7 x (slot - base)" in _check(doc, out, "strength")["detail"]


def test_a_record_claiming_another_strength_fails_the_strength_check(blended):
    out = blended["out"]
    record = json.loads(read_raw_safetensors(out)[0]["__metadata__"][SPLICE_KEY])
    record["slots"][0]["strength"] = 0.5  # the digests still match the bytes: only recomputing tells
    rewrite_metadata(out, out, SPLICE_KEY, json.dumps(record))
    code, doc = _json("verify", out, blended["a"], "--base", blended["base"])
    assert code == 1 and _failed(doc) == {(str(out), "strength")}


@pytest.mark.parametrize(
    "edit, problem",
    [
        (lambda r: r.update(format="slotsmith-splice/1"), "malformed splice record"),
        (lambda r: r["slots"][0].update(strength=2.5), "strength 2.5 is not a number in [0, 2]"),
        (lambda r: r["slots"][0].update(strength="0.7"), "strength '0.7' is not a number"),
        (lambda r: r["slots"][0]["blended"].popitem(), "'blended' must give an xxh3-128 digest"),
        (lambda r: r["slots"][0].pop("blended"), "malformed splice record"),
    ],
)
def test_malformed_strength_records_are_refused(blended, edit, problem):
    out = blended["out"]
    record = json.loads(read_raw_safetensors(out)[0]["__metadata__"][SPLICE_KEY])
    edit(record)
    rewrite_metadata(out, out, SPLICE_KEY, json.dumps(record))
    code, doc = _json("verify", out)
    assert code == 1 and problem in _check(doc, out, "structure")["detail"]
