"""`slotsmith extract`: the changed tensors of a fine-tuned checkpoint, as a slot."""

import numpy as np
import pytest
from click.testing import CliRunner
from helpers import make_checkpoint, random_bytes, read_checkpoint_tensors, write_raw_safetensors

from slotsmith.cli import main
from slotsmith.layout import WanConfig
from slotsmith.select import select, select_v2
from slotsmith.slot import read_slot

CHANGED = ["blocks.0.ffn.0.weight", "head.head.bias"]


def _run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def _tuned(path, base, changed, convention="native"):
    """Write base with ``changed`` tensors replaced by new random values."""
    from slotsmith.names import from_canonical

    rng = np.random.default_rng(99)
    tensors = dict(base.tensors)
    for n in changed:
        tensors[n] = random_bytes(base.shapes[n], base.dtype, rng)
    write_raw_safetensors(
        path, {from_canonical(n, convention): (base.dtype, base.shapes[n], d) for n, d in tensors.items()}
    )
    return tensors


@pytest.mark.parametrize("convention", ["native", "diffusers"])
def test_extract_then_splice_gives_the_tuned_weights(tmp_path, convention):
    base = make_checkpoint(tmp_path / "base.safetensors", dtype="BF16")
    tuned = _tuned(tmp_path / "tuned.safetensors", base, CHANGED, convention)
    r = _run("extract", base.path, tmp_path / "tuned.safetensors", "-o", tmp_path / "x.slot", "-q")
    assert r.exit_code == 0, r.output
    slot = read_slot(tmp_path / "x.slot")
    slot.verify_hashes()
    assert sorted(e.name for e in slot.manifest.entries) == CHANGED
    assert slot.manifest.selection is None
    assert slot.manifest.provenance["extracted_from"] == {"base": "base.safetensors", "tuned": "tuned.safetensors"}
    assert _run("splice", base.path, tmp_path / "x.slot", "-o", tmp_path / "out.safetensors").exit_code == 0
    assert read_checkpoint_tensors(tmp_path / "out.safetensors") == tuned


def test_extract_from_sharded_checkpoints(tmp_path):
    base = make_checkpoint(tmp_path / "base", shards=2)
    tuned_dir = tmp_path / "tuned"
    tuned_dir.mkdir()
    _tuned(tuned_dir / "model.safetensors", base, CHANGED[:1])
    assert _run("extract", base.index, tuned_dir, "-o", tmp_path / "x.slot").exit_code == 0
    assert [e.name for e in read_slot(tmp_path / "x.slot").manifest.entries] == CHANGED[:1]


def test_ff_ffid_selection_recorded_and_strays_refused(tmp_path):
    base = make_checkpoint(tmp_path / "base.safetensors")
    sel = select_v2({n: int(np.prod(s)) for n, s in base.shapes.items()}, 0.1, 3)
    inside = list(sel.tensors[:2])
    _tuned(tmp_path / "ok.safetensors", base, inside)
    r = _run("extract", base.path, tmp_path / "ok.safetensors", "-o", tmp_path / "x.slot", "--ff", 0.1, "--ffid", 3)
    assert r.exit_code == 0, r.output
    m = read_slot(tmp_path / "x.slot").manifest
    assert sorted(e.name for e in m.entries) == sorted(inside)
    assert m.selection == {"algorithm": "v2", "ff": 0.1, "ffid": 3, "num_pools": 8}

    stray = next(n for n in base.shapes if n not in sel.tensors)
    _tuned(tmp_path / "bad.safetensors", base, inside + [stray])
    out = tmp_path / "y.slot"
    r = _run("extract", base.path, tmp_path / "bad.safetensors", "-o", out, "--ff", 0.1, "--ffid", 3)
    assert r.exit_code == 1 and stray in r.output and "outside --ff 0.1 --ffid 3" in r.output
    assert not out.exists()


@pytest.mark.parametrize("case", ["identical", "other layout", "half ff", "exists"])
def test_extract_refusals(tmp_path, case):
    base = make_checkpoint(tmp_path / "base.safetensors")
    tuned = tmp_path / "tuned.safetensors"
    out = tmp_path / "x.slot"
    extra = []
    if case == "identical":
        make_checkpoint(tuned)  # same seed: same bytes
        needle = "no tensor differs"
    elif case == "other layout":
        make_checkpoint(tuned, cfg=WanConfig(64, 256, 2, text_dim=32, freq_dim=16))
        needle = "blocks.0.ffn.0.weight"
    elif case == "half ff":
        _tuned(tuned, base, CHANGED)
        extra = ["--ff", "0.1"]
        needle = "both --ff and --ffid"
    else:
        _tuned(tuned, base, CHANGED)
        out.write_bytes(b"keep")
        needle = "already exists"
    r = _run("extract", base.path, tuned, "-o", out, *extra)
    # Progress lines of the comparison may come first (stderr is not a terminal here): the error ends the output.
    last = r.output.rstrip().splitlines()[-1]
    assert r.exit_code == 1 and needle in last and last.startswith("error: ")
    assert all(line.startswith(("compare: ", "error: ")) for line in r.output.splitlines())
    assert (not out.exists()) if case != "exists" else out.read_bytes() == b"keep"


def test_expert_must_be_high_or_low(tmp_path):
    base = make_checkpoint(tmp_path / "base.safetensors")
    _tuned(tmp_path / "tuned.safetensors", base, CHANGED)
    out = tmp_path / "x.slot"
    r = _run("extract", base.path, tmp_path / "tuned.safetensors", "-o", out, "--expert", "middle")
    assert r.exit_code == 2 and "'middle' is not one of 'high', 'low'" in r.output
    assert not out.exists()
    r = _run("extract", base.path, tmp_path / "tuned.safetensors", "-o", out, "--expert", "low", "-q")
    assert r.exit_code == 0, r.output
    assert read_slot(out).manifest.expert == "low"


@pytest.mark.parametrize("which", ["base", "tuned"])
def test_output_that_is_an_input_is_refused_even_with_force(tmp_path, which):
    base = make_checkpoint(tmp_path / "base.safetensors", seed=1)
    tuned = make_checkpoint(tmp_path / "tuned.safetensors", seed=2)
    target = tmp_path / f"{which}.safetensors"
    before = target.read_bytes()
    result = CliRunner().invoke(main, ["extract", str(base.path), str(tuned.path), "-o", str(target), "--force"])
    assert result.exit_code == 1 and "is an input" in result.output
    assert target.read_bytes() == before


def _tuned_rows(path, base, rows):
    """Write base with rows ``rows[name] = (a, b)`` of some tensors replaced by other values."""
    tensors = dict(base.tensors)
    for name, (a, b) in rows.items():
        rb, data = base.row_bytes(name), bytearray(tensors[name])
        data[a * rb : b * rb] = bytes(x ^ 0x5A for x in data[a * rb : b * rb])  # every byte changes
        tensors[name] = bytes(data)
    write_raw_safetensors(path, {n: (base.dtype, base.shapes[n], d) for n, d in tensors.items()})
    return tensors


def test_changed_rows_are_detected_and_splice_back(tmp_path):
    base = make_checkpoint(tmp_path / "base.safetensors")
    name = "blocks.1.ffn.0.weight"
    tuned = _tuned_rows(tmp_path / "tuned.safetensors", base, {name: (5, 9), "head.head.bias": (0, 64)})
    assert _run("extract", base.path, tmp_path / "tuned.safetensors", "-o", tmp_path / "x.slot", "-q").exit_code == 0
    entries = {e.name: e.rows for e in read_slot(tmp_path / "x.slot").manifest.entries}
    assert entries == {name: (5, 9), "head.head.bias": None}  # all of a tensor's rows: a whole entry
    assert _run("splice", base.path, tmp_path / "x.slot", "-o", tmp_path / "out.safetensors").exit_code == 0
    assert read_checkpoint_tensors(tmp_path / "out.safetensors") == tuned


def test_v3_selection_checks_rows_and_v2_records_whole_tensors(tmp_path):
    base = make_checkpoint(tmp_path / "base.safetensors")
    sel = select(base.shapes, 0.05, 6, "v3", 16)
    inside = {n: (a, a + 1) for n, (a, _) in list(sel.rows.items())[:3]}
    _tuned_rows(tmp_path / "ok.safetensors", base, inside)
    v3 = ["--algorithm", "v3", "--pools", 16, "--ff", 0.05, "--ffid", 6]
    r = _run("extract", base.path, tmp_path / "ok.safetensors", "-o", tmp_path / "x.slot", *v3)
    assert r.exit_code == 0, r.output
    m = read_slot(tmp_path / "x.slot").manifest
    assert {e.name: e.rows for e in m.entries} == inside
    assert m.selection == {"algorithm": "v3", "ff": 0.05, "ffid": 6, "num_pools": 16}
    assert _run("verify", "-q", "--base", base.path, tmp_path / "x.slot").exit_code == 0

    name, (a, b) = next(iter(sel.rows.items()))
    _tuned_rows(tmp_path / "bad.safetensors", base, {name: (b, b + 1)})  # the row just past the slot's
    out = tmp_path / "y.slot"
    r = _run("extract", base.path, tmp_path / "bad.safetensors", "-o", out, *v3)
    assert r.exit_code == 1 and f"{name} rows [{b}, {b + 1}) (selection: [{a}, {b}))" in r.output
    assert not out.exists()

    v2 = select(base.shapes, 0.1, 3)
    partial = {v2.tensors[0]: (0, 1)}
    _tuned_rows(tmp_path / "v2.safetensors", base, partial)
    r = _run("extract", base.path, tmp_path / "v2.safetensors", "-o", tmp_path / "z.slot", "--ff", 0.1, "--ffid", 3)
    assert r.exit_code == 0, r.output
    assert [e.rows for e in read_slot(tmp_path / "z.slot").manifest.entries] == [None]
