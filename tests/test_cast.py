"""The cast file: strict loading, `cast pin`, and plan/splice/verify/train with --cast (no torch)."""

import json
import re

import numpy as np
import pytest
import yaml
from click.testing import CliRunner
from helpers import make_checkpoint, random_bytes, read_raw_safetensors

from slotsmith import cast as cast_mod
from slotsmith.cast import (
    STRENGTH_IN_CAST,
    base_sample_digest,
    load_cast,
    pin_cast,
    set_values,
    train_values,
)
from slotsmith.cli import main
from slotsmith.digest import digest_bytes
from slotsmith.errors import SlotsmithError
from slotsmith.inventory import inventory_from_checkpoint
from slotsmith.io.files import InputFiles
from slotsmith.select import Selection, select_v2
from slotsmith.slot import read_slot, write_slot
from slotsmith.slotspec import SlotSpec
from slotsmith.splice import splice
from slotsmith.splice_record import SPLICE_KEY
from slotsmith.train import TrainSettings, load_settings

FF = 0.05

CAST = """\
# The cast of a test project
format: slotsmith-cast/1
base:
  path: base.safetensors   # the tiny base
  expert: null

selection:
  algorithm: v2
  ff: 0.05
characters:
  # alice first
  alice:
    ffid: 1
    slot: slots/alice.slot   # alice's slot
  bob: {ffid: 2, slot: slots/bob.slot, pin: null}
output: out/spliced.safetensors
"""


def _run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def _make_slot(path, base_path, ffid, seed, ff=FF):
    inv = inventory_from_checkpoint(base_path)
    sel = select_v2(inv.numels(), ff, ffid)
    rng = np.random.default_rng(seed)
    data = {n: random_bytes(inv.tensors[n].shape, "F32", rng) for n in sel.tensors}
    return write_slot(path, inv, data, selection=sel.record(), provenance={}, force=True)


@pytest.fixture
def project(tmp_path):
    """A base, two slots (ffids 1 and 2) and an unpinned cast file naming them."""
    make_checkpoint(tmp_path / "base.safetensors")
    (tmp_path / "slots").mkdir()
    (tmp_path / "out").mkdir()
    _make_slot(tmp_path / "slots" / "alice.slot", tmp_path / "base.safetensors", 1, seed=1)
    _make_slot(tmp_path / "slots" / "bob.slot", tmp_path / "base.safetensors", 2, seed=2)
    (tmp_path / "cast.yaml").write_text(CAST)
    return tmp_path


def _digest(path):
    return read_slot(path).manifest.digest


# --- loading -------------------------------------------------------------------------------------


def test_loads_and_resolves_paths_against_the_cast_folder(project):
    c = load_cast(project / "cast.yaml")
    assert c.base.path == project / "base.safetensors"
    assert c.output == project / "out" / "spliced.safetensors"
    assert [(x.name, x.ffid, x.ff, x.slot, x.pin) for x in c.characters] == [
        ("alice", 1, FF, project / "slots" / "alice.slot", None),
        ("bob", 2, FF, project / "slots" / "bob.slot", None),
    ]
    assert c.selection_record(c.characters[0]) == {"algorithm": "v2", "ff": FF, "ffid": 1, "num_pools": 8}


BAD = [
    # (edit of the text, key path in the message, character named or None)
    (("output: out/spliced.safetensors", "outptu: x"), "outptu", None),
    (("    ffid: 1\n", "    ffid: 1\n    colour: red\n"), "characters.alice.colour", None),
    (("ffid: 2,", "ffid: 1,"), "characters.bob.ffid", "bob"),
    (("    ffid: 1\n", "    ffid: 8\n"), "characters.alice.ffid", "alice"),
    (("    ffid: 1\n", "    ffid: -1\n"), "characters.alice.ffid", "alice"),
    (("    ffid: 1\n", "    ffid: true\n"), "characters.alice.ffid", "alice"),
    (("  ff: 0.05\n", "  ff: 0.05\n  num_pools: 2\n"), "characters.bob.ffid", "bob"),
    (("pin: null}", "pin: abc}"), "characters.bob.pin", "bob"),
    (("pin: null}", "pin: 12345678901234567890123456789012}"), "characters.bob.pin", "bob"),
    (("    ffid: 1\n", "    ffid: 1\n    ff: 1.5\n"), "characters.alice.ff", "alice"),
    (("  ff: 0.05\n", ""), "characters.alice.ff", "alice"),
    (("    slot: slots/alice.slot", "    slot: ''"), "characters.alice.slot", "alice"),
    (("  algorithm: v2", "  algorithm: v9"), "selection.algorithm", None),
    (("  expert: null", "  expert: middle"), "base.expert", None),
    (("  expert: null", "  layout: wan9"), "base.layout", None),
    (("format: slotsmith-cast/1", "format: slotsmith-cast/2"), "format", None),
    (("  path: base.safetensors", "  paht: base.safetensors"), "base.paht", None),
]


@pytest.mark.parametrize(("edit", "key", "who"), BAD)
def test_bad_cast_is_refused_naming_file_key_and_character(project, edit, key, who):
    path = project / "cast.yaml"
    assert edit[0] in CAST
    text = CAST.replace(edit[0], edit[1])
    path.write_text(text)
    with pytest.raises(SlotsmithError) as e:
        load_cast(path)
    msg = str(e.value)
    assert msg.startswith(f"{path}: ") and f" {key}" in msg and "\n" not in msg
    if who:
        assert f"character {who!r}" in msg
    # Every command that reads it refuses it too, and nothing is written.
    for args in (("splice", "--cast"), ("verify", "--cast"), ("plan", "--cast"), ("cast", "pin")):
        r = _run(*args, path)
        assert r.exit_code == 1 and "Traceback" not in r.output and key in r.output
    assert path.read_text() == text
    assert not (project / "out" / "spliced.safetensors").exists()


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        (CAST.replace("  bob:", "  alice:"), "duplicate key"),
        (CAST.replace("  expert: null", "  expert: &e null\n  layout: *e"), "aliases are not allowed"),
        ("- a list\n", "must be a mapping"),
        ("format: [unclosed\n", "not a valid cast file"),
    ],
)
def test_yaml_traps_are_refused(project, text, problem):
    (project / "cast.yaml").write_text(text)
    with pytest.raises(SlotsmithError, match=re.escape(problem)):
        load_cast(project / "cast.yaml")


def test_missing_and_oversized_cast_files(tmp_path):
    with pytest.raises(SlotsmithError, match="no such cast file"):
        load_cast(tmp_path / "nope.yaml")
    big = tmp_path / "big.yaml"
    big.write_text("# " + "x" * cast_mod.CAST_CAP + "\n")
    with pytest.raises(SlotsmithError, match="cap"):
        load_cast(big)


def test_unknown_character_is_refused_listing_the_cast(project):
    with pytest.raises(SlotsmithError, match="no character 'carol' .*alice, bob"):
        load_cast(project / "cast.yaml").character("carol")


# --- cast pin ------------------------------------------------------------------------------------


def _changed_lines(before: str, after: str) -> list[tuple[str, str]]:
    a, b = before.splitlines(), after.splitlines()
    assert len(a) == len(b)
    return [(x, y) for x, y in zip(a, b) if x != y]


def test_pin_writes_digests_and_keeps_everything_else(project):
    path = project / "cast.yaml"
    r = _run("cast", "pin", path)
    assert r.exit_code == 0, r.output
    text = path.read_text()
    alice, bob = _digest(project / "slots" / "alice.slot"), _digest(project / "slots" / "bob.slot")
    doc = yaml.safe_load(text)
    assert doc["characters"]["alice"]["pin"] == alice and doc["characters"]["bob"]["pin"] == bob
    inv = inventory_from_checkpoint(project / "base.safetensors")
    with InputFiles() as files:
        sample = base_sample_digest(inv, files)
    assert doc["base"]["fingerprint"] == {"layout_digest": inv.layout_digest(), "sample_digest": sample}
    # Every original line is still there, in order, comments included; only bob's line changed.
    original = CAST.splitlines()
    kept = [line for line in text.splitlines() if line in original]
    assert kept == [line for line in original if "bob:" not in line]
    assert f'  bob: {{ffid: 2, slot: slots/bob.slot, pin: "{bob}"}}' in text
    assert f'    pin: "{alice}"' in text
    # A second pin changes nothing, byte for byte.
    r = _run("cast", "pin", path)
    assert r.exit_code == 0 and "pinned to its current slot already" in r.output
    assert path.read_text() == text


def test_pin_after_retraining_changes_only_that_pin(project):
    path = project / "cast.yaml"
    pin_cast(path)
    before = path.read_text()
    old = _digest(project / "slots" / "alice.slot")
    _make_slot(project / "slots" / "alice.slot", project / "base.safetensors", 1, seed=99)
    new = _digest(project / "slots" / "alice.slot")
    changes = pin_cast(path, dry_run=True)
    assert [(c.key, c.old, c.new) for c in changes] == [("characters.alice.pin", old, new)]
    assert path.read_text() == before  # dry run
    pin_cast(path)
    assert _changed_lines(before, path.read_text()) == [(f'    pin: "{old}"', f'    pin: "{new}"')]


def test_set_values_quotes_digit_only_digests_and_inserts_keys():
    text = "a:\n  b: 1   # keep\n  c:\n    d: x\ne: {f: 1}\n"
    digits = "12345678901234567890123456789012"
    out = set_values(text, {("a", "b"): digits, ("a", "z"): "v", ("e", "g"): digits, ("a", "c", "y"): "w"})
    assert yaml.safe_load(out) == {"a": {"b": digits, "c": {"d": "x", "y": "w"}, "z": "v"}, "e": {"f": 1, "g": digits}}
    assert "# keep" in out


def test_pin_refuses_a_slot_the_cast_does_not_describe(project):
    path = project / "cast.yaml"
    path.write_text(CAST.replace("    ffid: 1\n", "    ffid: 3\n"))
    before = path.read_text()
    r = _run("cast", "pin", path)
    assert r.exit_code == 1 and "characters.alice" in r.output and "ffid 1" in r.output and "ffid 3" in r.output
    assert path.read_text() == before


def test_pin_refuses_a_missing_slot_naming_key_and_character(project):
    (project / "slots" / "bob.slot").unlink()
    r = _run("cast", "pin", project / "cast.yaml")
    assert r.exit_code == 1
    assert "characters.bob.slot" in r.output and "character 'bob'" in r.output and "missing" in r.output
    assert (project / "cast.yaml").read_text() == CAST


def test_pin_refuses_another_base_of_the_same_layout(project):
    path = project / "cast.yaml"
    pin_cast(path)
    pinned = path.read_text()
    make_checkpoint(project / "other.safetensors", seed=7)
    with pytest.raises(SlotsmithError, match="sample_digest: the cast records"):
        pin_cast(path, base=project / "other.safetensors")
    assert path.read_text() == pinned


def test_pin_without_the_base_takes_the_layout_from_the_slots(project):
    (project / "base.safetensors").rename(project / "elsewhere.safetensors")
    pin_cast(project / "cast.yaml")
    c = load_cast(project / "cast.yaml")
    assert c.base.layout_digest == inventory_from_checkpoint(project / "elsewhere.safetensors").layout_digest()
    assert c.base.sample_digest is None


def test_sample_digest_tells_bases_apart_and_ignores_key_convention(tmp_path):
    a = make_checkpoint(tmp_path / "a.safetensors", seed=0)
    b = make_checkpoint(tmp_path / "b.safetensors", seed=1)
    c = make_checkpoint(tmp_path / "c", seed=0, convention="diffusers", shards=2)

    def sample(p):
        with InputFiles() as files:
            return base_sample_digest(inventory_from_checkpoint(p), files)

    assert sample(a.path) != sample(b.path)
    assert sample(a.path) == sample(c.path)
    # Independently: the digest of each tensor's first bytes, concatenated in name order.
    expected = "".join(digest_bytes(a.tensors[n][: cast_mod.SAMPLE_BYTES]) for n in sorted(a.tensors))
    assert sample(a.path) == digest_bytes(expected.encode())


# --- plan --cast ---------------------------------------------------------------------------------


def test_plan_cast_table_and_json(project):
    pin_cast(project / "cast.yaml")
    r = _run("plan", "--cast", project / "cast.yaml", "--json")
    assert r.exit_code == 0, r.output
    doc = json.loads(r.output)
    numels = {n: t.numel for n, t in inventory_from_checkpoint(project / "base.safetensors").tensors.items()}
    assert doc["free_ffids"] == [0, 3, 4, 5, 6, 7] and doc["overlaps"] == []
    for row, ffid in zip(doc["characters"], (1, 2)):
        sel = select_v2(numels, FF, ffid)
        assert (row["ffid"], row["params"], row["tensors"]) == (ffid, sel.selected_params, len(sel.tensors))
    text = _run("plan", "--cast", project / "cast.yaml").output
    assert "free ffids: 0, 3, 4, 5, 6, 7" in text and "overlaps: none" in text
    assert re.search(r"alice\s+1\s+0.05", text)


def test_plan_cast_reports_overlaps(project, monkeypatch):
    def overlapping(shapes, ff, ffid, algorithm, num_pools):
        names = tuple(sorted(shapes))[:2]
        return Selection(algorithm, ff, ffid, num_pools, 10, 1, names, 2, names, 2)

    monkeypatch.setattr(cast_mod, "select", overlapping)
    doc = json.loads(_run("plan", "--cast", project / "cast.yaml", "--json").output)
    names = sorted(inventory_from_checkpoint(project / "base.safetensors").tensors)[:2]
    assert doc["overlaps"] == [{"characters": ["alice", "bob"], "tensors": names}]
    assert "OVERLAP: alice and bob" in _run("plan", "--cast", project / "cast.yaml").output


def test_plan_cast_needs_a_layout_or_the_base(project):
    (project / "base.safetensors").unlink()
    r = _run("plan", "--cast", project / "cast.yaml")
    assert r.exit_code == 1 and "base.layout" in r.output


def test_plan_cast_with_a_shipped_layout_needs_no_file(tmp_path):
    text = CAST.replace("  expert: null", "  layout: wan2.1-t2v-1.3b").replace("ff: 0.05", "ff: 0.01")
    (tmp_path / "cast.yaml").write_text(text)
    doc = json.loads(_run("plan", "--cast", tmp_path / "cast.yaml", "--json").output)
    assert doc["model"] == "wan2.1-t2v-1.3b" and len(doc["characters"]) == 2


def test_plan_refuses_cast_with_model_options(project):
    r = _run("plan", "--cast", project / "cast.yaml", "--ff", "0.1")
    assert r.exit_code == 2 and "--cast" in r.output


# --- splice --cast -------------------------------------------------------------------------------


def test_splice_cast_builds_the_pinned_output(project):
    pin_cast(project / "cast.yaml")
    r = _run("splice", "--cast", project / "cast.yaml", "-q")
    assert r.exit_code == 0, r.output
    out = project / "out" / "spliced.safetensors"
    record = json.loads(read_raw_safetensors(out)[0]["__metadata__"][SPLICE_KEY])
    pins = [_digest(project / "slots" / f"{n}.slot") for n in ("alice", "bob")]
    assert [s["manifest"]["digest"] for s in record["slots"]] == pins


def test_splice_cast_refuses_unpinned_and_retrained_slots(project):
    r = _run("splice", "--cast", project / "cast.yaml")
    assert r.exit_code == 1 and "characters.alice.pin" in r.output and "not pinned" in r.output
    pin_cast(project / "cast.yaml")
    old = _digest(project / "slots" / "bob.slot")
    _make_slot(project / "slots" / "bob.slot", project / "base.safetensors", 2, seed=50)
    new = _digest(project / "slots" / "bob.slot")
    r = _run("splice", "--cast", project / "cast.yaml")
    assert r.exit_code == 1 and "characters.bob.pin" in r.output and old in r.output and new in r.output
    assert not (project / "out" / "spliced.safetensors").exists()


def test_splice_cast_refuses_a_base_that_is_not_the_casts(project):
    pin_cast(project / "cast.yaml")
    make_checkpoint(project / "base.safetensors", seed=3)  # same layout, other bytes
    r = _run("splice", "--cast", project / "cast.yaml")
    assert r.exit_code == 1 and "sample_digest" in r.output
    assert not (project / "out" / "spliced.safetensors").exists()


def test_splice_cast_refuses_base_or_slot_arguments(project):
    r = _run("splice", "--cast", project / "cast.yaml", project / "base.safetensors")
    assert r.exit_code == 2 and "--cast" in r.output


# --- verify --cast -------------------------------------------------------------------------------


def _verify(project, *extra):
    r = _run("verify", "--cast", project / "cast.yaml", "--json", *extra)
    assert "Traceback" not in r.output
    return r.exit_code, json.loads(r.stdout)


def _fails(doc):
    return {(c["file"], c["check"]) for c in doc["checks"] if c["result"] == "fail"}


def test_verify_cast_passes_on_a_pinned_built_cast(project):
    pin_cast(project / "cast.yaml")
    _run("splice", "--cast", project / "cast.yaml", "--seal")
    code, doc = _verify(project, "--base", project / "base.safetensors")
    assert code == 0 and doc["ok"], _fails(doc)
    ran = {(c["file"], c["check"]) for c in doc["checks"] if c["result"] == "pass"}
    cast_file = str(project / "cast.yaml")
    assert {(cast_file, "allocations"), (cast_file, "fingerprint"), (cast_file, "output")} <= ran
    for n in ("alice", "bob"):
        assert {(str(project / "slots" / f"{n}.slot"), c) for c in ("pin", "cast", "hashes")} <= ran


def test_verify_cast_catches_a_retrained_slot_and_an_out_of_date_output(project):
    pin_cast(project / "cast.yaml")
    _run("splice", "--cast", project / "cast.yaml")
    old = _digest(project / "slots" / "alice.slot")
    _make_slot(project / "slots" / "alice.slot", project / "base.safetensors", 1, seed=77)
    new = _digest(project / "slots" / "alice.slot")
    code, doc = _verify(project)
    alice, out = str(project / "slots" / "alice.slot"), str(project / "out" / "spliced.safetensors")
    assert code == 1
    assert {(alice, "pin"), (out, "up to date")} <= _fails(doc)
    stale = next(c for c in doc["checks"] if c["check"] == "up to date")
    assert "out of date" in stale["detail"] and old in stale["detail"] and new in stale["detail"]
    # Re-pinned, the slots pass but the output still holds the old alice.
    pin_cast(project / "cast.yaml")
    code, doc = _verify(project)
    assert code == 1 and (str(project / "cast.yaml"), "output") in _fails(doc)


def test_verify_cast_reports_a_missing_slot(project):
    pin_cast(project / "cast.yaml")
    (project / "slots" / "bob.slot").unlink()
    code, doc = _verify(project)
    assert code == 1 and (str(project / "slots" / "bob.slot"), "present") in _fails(doc)
    detail = next(c["detail"] for c in doc["checks"] if c["check"] == "present")
    assert "characters.bob.slot" in detail and "character 'bob'" in detail


def test_verify_cast_catches_a_slot_of_another_selection(project):
    # bob's slot file really holds ffid 3: the cast's ffid 2 is not what it records.
    _make_slot(project / "slots" / "bob.slot", project / "base.safetensors", 3, seed=2)
    code, doc = _verify(project)
    assert (str(project / "slots" / "bob.slot"), "cast") in _fails(doc)


def test_verify_cast_with_another_base(project):
    pin_cast(project / "cast.yaml")
    make_checkpoint(project / "other.safetensors", seed=9)
    code, doc = _verify(project, "--base", project / "other.safetensors")
    assert code == 1 and (str(project / "cast.yaml"), "fingerprint") in _fails(doc)


# --- train --cast (the light half: the values it fixes) ------------------------------------------


def test_train_values_come_from_the_cast(project):
    pin_cast(project / "cast.yaml")
    assert train_values(project / "cast.yaml", "bob") == {
        "base": str(project / "base.safetensors"),
        "out": str(project / "slots" / "bob.slot"),
        "ff": FF,
        "ffid": 2,
        "expert": None,
    }


def test_train_values_refuse_a_base_that_is_not_the_casts(project):
    pin_cast(project / "cast.yaml")
    make_checkpoint(project / "base.safetensors", seed=5)
    with pytest.raises(SlotsmithError, match="sample_digest"):
        train_values(project / "cast.yaml", "alice")


def _cli_values(**given):
    values = {f: getattr(TrainSettings(), f) for f in TrainSettings.__dataclass_fields__}
    return {**values, **given}


def test_fixed_settings_fill_in_and_refuse_contradictions(tmp_path):
    fixed = ("the cast c.yaml (character 'a')", {"base": str(tmp_path / "b.st"), "out": str(tmp_path / "a.slot"),
                                                  "ff": 0.01, "ffid": 3, "expert": None})
    s = load_settings(_cli_values(cache="c", steps=1), {"cache", "steps"}, None, fixed=fixed)
    assert (s.base, s.out, s.ff, s.ffid, s.expert) == (str(tmp_path / "b.st"), str(tmp_path / "a.slot"), 0.01, 3, None)
    # Repeating a fixed value is fine; contradicting it is not, on the command line or in a config.
    load_settings(_cli_values(cache="c", steps=1, ffid=3), {"cache", "steps", "ffid"}, None, fixed=fixed)
    with pytest.raises(SlotsmithError, match=r"--ffid 4 contradicts the cast c.yaml \(character 'a'\), which says 3"):
        load_settings(_cli_values(cache="c", steps=1, ffid=4), {"cache", "steps", "ffid"}, None, fixed=fixed)
    config = tmp_path / "train.yaml"
    config.write_text("ff: 0.02\ncache: c\nsteps: 1\n")
    with pytest.raises(SlotsmithError, match="--ff 0.02 contradicts"):
        load_settings(_cli_values(), set(), str(config), fixed=fixed)
    with pytest.raises(SlotsmithError, match="--expert high contradicts .* which says none"):
        load_settings(_cli_values(cache="c", steps=1, expert="high"), {"cache", "steps", "expert"}, None, fixed=fixed)


# --- strengths: a cast pins exact slots ------------------------------------------------------------


def test_a_strength_is_refused_in_the_cast_file_and_with_splice_cast(project):
    path = project / "cast.yaml"
    path.write_text(CAST.replace("slot: slots/alice.slot", "slot: slots/alice.slot:0.7"))
    with pytest.raises(SlotsmithError) as e:
        load_cast(path)
    assert str(e.value) == f"{path}: characters.alice.slot: character 'alice': {STRENGTH_IN_CAST}"
    path.write_text(CAST)
    r = _run("splice", "--cast", path, project / "slots" / "alice.slot:0.7")
    assert r.exit_code == 1 and STRENGTH_IN_CAST in r.output


def test_verify_cast_fails_an_output_holding_a_slot_at_a_strength(project):
    pin_cast(project / "cast.yaml")
    slots = project / "slots"
    splice(project / "base.safetensors", [SlotSpec(slots / "alice.slot", 0.7), slots / "bob.slot"],
           project / "out" / "spliced.safetensors")
    code, doc = _verify(project)
    output = next(c for c in doc["checks"] if c["check"] == "output")
    assert code == 1 and output["result"] == "fail"
    assert "holds slot 'alice.slot' at strength 0.7, but a cast pins exact slots (strength 1)" in output["detail"]
