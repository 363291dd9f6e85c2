"""Hostile slots, manifests and splice records: mutated byte-wise and
structurally, they never escape as anything but failed checks with one-line
details and exit 1 (no traceback, hang or huge allocation); and whenever
verify passes, the bytes really are what the manifest or record says.

The foundation's header/index/layout fuzzing is in test_fuzz_readers.py;
this file covers what is built on it. Fixed example budgets keep the whole
file well under a minute.
"""

import copy
import json

import numpy as np
import pytest
import xxhash
from click.testing import CliRunner
from helpers import (
    make_checkpoint,
    mutate_bytes,
    random_bytes,
    read_raw_safetensors,
    rewrite_metadata,
)
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from slotsmith.cli import main
from slotsmith.digest import digest_json
from slotsmith.inventory import inventory_from_checkpoint
from slotsmith.manifest import METADATA_KEY
from slotsmith.select import select_v2
from slotsmith.slot import write_slot
from slotsmith.splice import splice
from slotsmith.splice_record import SPLICE_KEY

FUZZ = settings(
    max_examples=300,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)

@pytest.fixture(scope="module")
def seed(tmp_path_factory):
    """A base, a slot (a row entry and whole tensors, with a selection) and a spliced checkpoint."""
    root = tmp_path_factory.mktemp("seed")
    base = make_checkpoint(root / "base.safetensors", dtype="BF16")
    inv = inventory_from_checkpoint(base.path)
    sel = select_v2(inv.numels(), 0.03, 2)
    rng = np.random.default_rng(0)
    # One selected matrix only in part (rows 4..12), the others whole.
    part = next(n for n in sel.tensors if len(inv.tensors[n].shape) == 2)
    data = {n: random_bytes(inv.tensors[n].shape, "BF16", rng) for n in sel.tensors}
    data[part] = random_bytes((8, *inv.tensors[part].shape[1:]), "BF16", rng)
    selection = {"algorithm": "v2", "ff": 0.03, "ffid": 2, "num_pools": 8}
    slot = root / "s.slot"
    write_slot(slot, inv, data, selection=selection, provenance={"seed": 1}, rows={part: (4, 12)}, expert="low")
    other = root / "o.slot"
    bias = next(n for n in inv.tensors if n not in sel.tensors and n.endswith("bias"))
    write_slot(other, inv, {bias: random_bytes(inv.tensors[bias].shape, "BF16", rng)}, selection=None, provenance={})
    spliced = splice(base.path, [slot, other], root / "out.safetensors")
    work = tmp_path_factory.mktemp("work")
    # The seeds themselves pass every check, so "passes => holds its bytes" is not vacuous.
    assert _verify(slot, spliced, "--base", base.path, note=False)["ok"]
    return {"base": base.path, "slot": slot, "spliced": spliced, "work": work}


def _verify(*args, note=True):
    """Run the CLI; assert it ended as verify must, whatever the input (``note``: tell hypothesis the outcome)."""
    r = CliRunner().invoke(main, ["verify", "--json", *map(str, args)])
    assert r.exception is None or isinstance(r.exception, SystemExit), repr(r.exception)
    # Off a terminal, stderr carries progress lines only (no traceback, no stray message).
    assert r.exit_code in (0, 1) and all(line.startswith("verify: ") for line in r.stderr.splitlines()), r.output
    doc = json.loads(r.stdout)
    assert doc["ok"] == (r.exit_code == 0) == all(c["result"] != "fail" for c in doc["checks"])
    for c in doc["checks"]:
        assert "\n" not in c["detail"] and all("\n" not in p for p in c["problems"])
    if note:
        failed = [c["check"] for c in doc["checks"] if c["result"] == "fail"]
        event(f"failed {failed[0]}" if failed else "passed")
    return doc


def _tensors(path):
    """key -> (header entry, bytes), by the plain-json parser (None if it cannot parse)."""
    try:
        header, data = read_raw_safetensors(path)
    except (ValueError, UnicodeDecodeError, KeyError, TypeError, IndexError):
        return None
    return {k: (v, data[k]) for k, v in header.items() if k != "__metadata__"}, header.get("__metadata__", {})


def _holds_its_manifest(path) -> bool:
    """Independently: every tensor's bytes hash to the digest its manifest records."""
    parsed = _tensors(path)
    assert parsed is not None, "verify passed a file the plain parser cannot read"
    tensors, meta = parsed
    manifest = json.loads(meta[METADATA_KEY])
    assert {e["name"] for e in manifest["entries"]} == set(tensors)
    return all(xxhash.xxh3_128_hexdigest(tensors[e["name"]][1]) == e["digest"] for e in manifest["entries"])


# --- byte-wise mutation of a whole slot file -----------------------------------------------

byte_mutation = st.one_of(
    st.tuples(st.just("flip"), st.integers(0, 2**31), st.integers(1, 255)),
    st.tuples(st.just("cut"), st.integers(0, 2**31), st.just(0)),
    st.tuples(st.just("insert"), st.integers(0, 2**31), st.integers(0, 255)),
    st.tuples(st.just("delete"), st.integers(0, 2**31), st.integers(1, 16)),
)


@FUZZ
@given(mutations=st.lists(byte_mutation, min_size=1, max_size=3), in_header=st.booleans())
def test_byte_mutated_slot(seed, mutations, in_header):
    original = seed["slot"].read_bytes()
    header_end = 8 + int.from_bytes(original[:8], "little")
    path = seed["work"] / "mutated.slot"
    path.write_bytes(mutate_bytes(original, mutations, header_end if in_header else None))
    doc = _verify(path)
    if doc["ok"]:
        assert _holds_its_manifest(path)
        # Nothing changed but header bytes that carry no meaning (padding, spacing).
        before, after = _tensors(seed["slot"])[0], _tensors(path)[0]
        assert {k: v[1] for k, v in before.items()} == {k: v[1] for k, v in after.items()}


# --- structural mutation of JSON (manifests and splice records) ------------------------------

HEX = st.text("0123456789abcdef", min_size=32, max_size=32)
scalar = st.one_of(
    st.none(),
    st.booleans(),
    st.sampled_from([-1, 0, 1, 2, 63, 64, 128, 2**63, 2**70, -(2**70)]),
    st.integers(-(2**40), 2**40),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from(
        ["", "v2", "F32", "BF16", "low", "high", "blocks.0.ffn.0.weight", "head.head.bias", "slotsmith-slot/1", "\n", "\u202e"]
    ),
    HEX,
    st.text(max_size=6),
)
json_value = st.recursive(
    scalar,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
    max_leaves=8,
)


def mutate(data, doc):
    """One structural edit somewhere in ``doc`` (a deep copy): replace, delete, add, duplicate or swap."""
    doc = copy.deepcopy(doc)
    node = doc
    while True:
        items = node.items() if isinstance(node, dict) else enumerate(node)
        children = [k for k, v in items if isinstance(v, (dict, list)) and v]
        if not children or not data.draw(st.booleans(), label="descend"):
            break
        node = node[data.draw(st.sampled_from(children), label="into")]
    keys = list(node) if isinstance(node, dict) else list(range(len(node)))
    op = data.draw(st.sampled_from(["replace", "delete", "add", "dup", "swap"] if keys else ["add"]), label="op")
    if op == "add":
        if isinstance(node, dict):
            node[data.draw(st.text(max_size=8) | st.sampled_from(keys or ["x"]), label="key")] = data.draw(json_value)
        else:
            node.insert(data.draw(st.integers(0, len(node))), data.draw(json_value))
        return doc
    key = data.draw(st.sampled_from(keys), label="key")
    if op == "replace":
        node[key] = data.draw(json_value, label="value")
    elif op == "delete":
        del node[key]
    elif op == "dup" and isinstance(node, list):
        node.insert(key, copy.deepcopy(node[key]))
    elif op == "swap" and isinstance(node, list) and len(node) > 1:
        other = data.draw(st.sampled_from(keys))
        node[key], node[other] = node[other], node[key]
    return doc


def reseal(doc):
    """Recompute a manifest's digest over what it now says (a forger's move)."""
    if isinstance(doc, dict) and "digest" in doc:
        body = {k: v for k, v in doc.items() if k != "digest"}
        try:
            return {**body, "digest": digest_json(body)}
        except (ValueError, TypeError):
            return doc
    return doc


TEXT_EDITS = ['"', "{", "}", ",", ":", "\\ud800", "\\u0000", "NaN", "1e999", '"format":"x",', "\xff", "9" * 5000]


@FUZZ
@given(data=st.data(), resealed=st.booleans(), with_base=st.booleans(), text_edit=st.booleans())
def test_mutated_manifest(seed, data, resealed, with_base, text_edit):
    manifest = json.loads(read_raw_safetensors(seed["slot"])[0]["__metadata__"][METADATA_KEY])
    doc = mutate(data, manifest)
    raw = json.dumps(reseal(doc) if resealed else doc)
    if text_edit:  # a token spliced into the text: duplicate keys, bad escapes, broken JSON
        pos = data.draw(st.integers(0, len(raw)), label="pos")
        raw = raw[:pos] + data.draw(st.sampled_from(TEXT_EDITS), label="token") + raw[pos:]
    path = seed["work"] / "manifest.slot"
    rewrite_metadata(seed["slot"], path, METADATA_KEY, raw)
    doc = _verify(path, *(["--base", seed["base"]] if with_base else []))
    if doc["ok"]:
        assert _holds_its_manifest(path)


@FUZZ
@given(data=st.data(), resealed=st.booleans(), with_base=st.booleans(), in_manifest=st.booleans())
def test_mutated_splice_record(seed, data, resealed, with_base, in_manifest):
    record = json.loads(read_raw_safetensors(seed["spliced"])[0]["__metadata__"][SPLICE_KEY])
    if in_manifest and record["slots"]:  # edit inside one recorded slot's manifest
        i = data.draw(st.integers(0, len(record["slots"]) - 1), label="slot")
        m = mutate(data, record["slots"][i]["manifest"])
        record["slots"][i]["manifest"] = reseal(m) if resealed else m
    else:
        record = mutate(data, record)
    path = seed["work"] / "spliced.safetensors"
    rewrite_metadata(seed["spliced"], path, SPLICE_KEY, json.dumps(record))
    doc = _verify(path, *(["--base", seed["base"]] if with_base else []))
    if doc["ok"]:
        # Independently: every recorded region of the output holds the recorded bytes.
        tensors, meta = _tensors(path)
        for s in json.loads(meta[SPLICE_KEY])["slots"]:
            for e in s["manifest"]["entries"]:
                blob = tensors[e["name"]][1]
                if e["rows"] is not None:
                    row = len(blob) // e["shape"][0]
                    blob = blob[e["rows"][0] * row : e["rows"][1] * row]
                assert xxhash.xxh3_128_hexdigest(blob) == e["digest"]


@settings(FUZZ, max_examples=100)
@given(data=st.data())
def test_mutated_set_of_slots(seed, data):
    """Two mutated-and-resealed copies of one slot side by side: set checks never crash."""
    manifest = json.loads(read_raw_safetensors(seed["slot"])[0]["__metadata__"][METADATA_KEY])
    paths = []
    for i in range(2):
        path = seed["work"] / f"set{i}.slot"
        rewrite_metadata(seed["slot"], path, METADATA_KEY, json.dumps(reseal(mutate(data, manifest))))
        paths.append(path)
    doc = _verify(*paths)
    assert not doc["ok"] or len(doc["groups"]) == 2  # in one group, copies always overlap
