"""`slotsmith splice`: byte-exact round trips, every refusal, atomicity."""

import errno
import json
import os
import struct
import subprocess
import sys

import numpy as np
import pytest
import safetensors.numpy
import xxhash
from click.testing import CliRunner
from helpers import (
    TINY,
    blend_reference,
    make_checkpoint,
    random_bytes,
    read_checkpoint_tensors,
    read_raw_safetensors,
)

from slotsmith.cli import main
from slotsmith.inventory import inventory_from_checkpoint
from slotsmith.io import writer
from slotsmith.layout import WanConfig
from slotsmith.slot import write_slot
from slotsmith.slotspec import SlotSpec
from slotsmith.splice import splice

FFN = "blocks.0.ffn.0.weight"  # (128, 64)
Q = "blocks.1.self_attn.q.weight"  # (64, 64)
BIAS = "head.head.bias"  # (64,)


def _new(shape, seed, dtype="F32"):
    return random_bytes(shape, dtype, np.random.default_rng(seed))


def _slot(path, base_path, parts, dtype="F32", expert=None):
    """parts: name -> (rows or None, seed). Returns name -> (rows, bytes)."""
    inv = inventory_from_checkpoint(base_path)
    data, rows = {}, {}
    for name, (r, seed) in parts.items():
        shape = inv.tensors[name].shape
        stored = shape if r is None else (r[1] - r[0], *shape[1:])
        data[name] = _new(stored, seed, dtype)
        if r is not None:
            rows[name] = r
    write_slot(path, inv, data, selection=None, provenance={}, rows=rows, expert=expert)
    return {n: (rows.get(n), d) for n, d in data.items()}


def _expected(base, *slots):
    """Canonical name -> bytes the spliced output must hold, computed from raw parts."""
    out = dict(base.tensors)
    for slot in slots:
        for name, (rows, data) in slot.items():
            if rows is None:
                out[name] = data
            else:
                rb = base.row_bytes(name)
                cur = out[name]
                out[name] = cur[: rows[0] * rb] + data + cur[rows[1] * rb :]
    return out


def _run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def _no_temp_left(folder):
    return not [p for p in folder.rglob("*") if p.name.startswith(".")]


@pytest.mark.parametrize(
    "convention, dtype, shards",
    [("native", "F32", None), ("prefixed", "BF16", None), ("diffusers", "F32", None), ("native", "BF16", 3)],
)
def test_round_trip(tmp_path, convention, dtype, shards):
    name = "base" if shards else "base.safetensors"
    base = make_checkpoint(tmp_path / name, convention=convention, dtype=dtype, shards=shards)
    a = _slot(tmp_path / "a.slot", base.path, {FFN: ((0, 40), 1), Q: (None, 2)}, dtype)
    b = _slot(tmp_path / "b.slot", base.path, {FFN: ((40, 41), 3), BIAS: (None, 4)}, dtype)
    out = tmp_path / ("out" if shards else "out.safetensors")
    r = _run("splice", base.path, tmp_path / "a.slot", tmp_path / "b.slot", "-o", out, "-q")
    assert r.exit_code == 0, r.output

    expected = _expected(base, a, b)
    got = read_checkpoint_tensors(out)
    assert got == {base.key(n): v for n, v in expected.items()}
    assert got[base.key(FFN)] != base.tensors[FFN] and got[base.key(Q)] != base.tensors[Q]

    out_files = sorted(out.glob("*.safetensors")) if shards else [out]
    if shards:
        assert [f.name for f in out_files] == sorted(f.name for f in base.files)
    for src, dst in zip(base.files if shards else [base.path], out_files):
        h_src, _ = read_raw_safetensors(src)
        h_dst, _ = read_raw_safetensors(dst)
        # Same keys per file, same dtypes and metadata, plus the splice record.
        assert set(h_src) - {"__metadata__"} == set(h_dst) - {"__metadata__"}
        assert h_dst["__metadata__"]["format"] == "pt"
        record = json.loads(h_dst["__metadata__"]["slotsmith.splice"])
        assert [s["file"] for s in record["slots"]] == ["a.slot", "b.slot"]
        # The data section keeps the base's offset modulo 4096 (reflink-friendly).
        n_src = struct.unpack("<Q", src.read_bytes()[:8])[0]
        n_dst = struct.unpack("<Q", dst.read_bytes()[:8])[0]
        assert (8 + n_src) % 4096 == (8 + n_dst) % 4096
        if dtype == "F32":
            loaded = safetensors.numpy.load_file(str(dst))
            assert {k: v.tobytes() for k, v in loaded.items()} == {k: got[k] for k in loaded}
    if shards:
        index = json.loads((out / base.index.name).read_text())
        weight_map = json.loads(base.index.read_text())["weight_map"]
        assert index["weight_map"] == weight_map
        assert index["metadata"]["total_size"] == sum(len(v) for v in base.tensors.values())
        assert "slotsmith.splice" in index["metadata"]
    assert _no_temp_left(tmp_path)


def test_sharded_base_by_index_path(tmp_path):
    base = make_checkpoint(tmp_path / "base", shards=2)
    a = _slot(tmp_path / "a.slot", base.path, {Q: (None, 1)})
    out = tmp_path / "out"
    assert _run("splice", base.index, tmp_path / "a.slot", "-o", out).exit_code == 0
    assert read_checkpoint_tensors(out) == _expected(base, a)


def test_default_output_name_in_cwd(tmp_path, monkeypatch):
    base = make_checkpoint(tmp_path / "base.safetensors")
    _slot(tmp_path / "char1.slot", base.path, {Q: (None, 1)})
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    assert _run("splice", base.path, tmp_path / "char1.slot", "-q").exit_code == 0
    assert [p.name for p in work.iterdir()] == ["base+char1.safetensors"]
    r = _run("splice", base.path, tmp_path / "char1.slot", "-q")
    assert r.exit_code == 1 and "already exists" in r.output
    (tmp_path / "char1.slot").rename(tmp_path / "char1-step000010.snapshot")
    assert _run("splice", base.path, tmp_path / "char1-step000010.snapshot", "-q").exit_code == 0
    assert (work / "base+char1-step000010.safetensors").exists()


def test_force_overwrites(tmp_path):
    base = make_checkpoint(tmp_path / "base.safetensors")
    a = _slot(tmp_path / "a.slot", base.path, {Q: (None, 1)})
    out = tmp_path / "out.safetensors"
    out.write_bytes(b"old")
    r = _run("splice", base.path, tmp_path / "a.slot", "-o", out)
    assert r.exit_code == 1 and str(out) in r.output and "--force" in r.output
    assert out.read_bytes() == b"old"
    assert _run("splice", base.path, tmp_path / "a.slot", "-o", out, "--force").exit_code == 0
    assert read_checkpoint_tensors(out) == _expected(base, a)


def _flip(path, offset_in_data):
    blob = bytearray(path.read_bytes())
    (n,) = struct.unpack("<Q", blob[:8])
    blob[8 + n + offset_in_data] ^= 0x40
    path.write_bytes(bytes(blob))


def _refused(tmp_path, args, *needles):
    out = tmp_path / "out.safetensors"
    before = {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*")}
    r = _run("splice", *args, "-o", out)
    assert r.exit_code == 1, r.output
    # Progress lines may come first (stderr is not a terminal here); the error is one line, at the end.
    errors = [line for line in r.output.splitlines() if not line.startswith("splice: ")]
    assert len(errors) == 1 and "Traceback" not in r.output
    line = errors[0]
    assert line.startswith("error: ") and r.output.rstrip().endswith(line)
    for needle in needles:
        assert needle in line, line
    assert not out.exists() and _no_temp_left(tmp_path)
    assert {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*")} == before  # inputs untouched
    return line


def test_refuses_tampered_slot_bytes(tmp_path):
    base = make_checkpoint(tmp_path / "base.safetensors")
    _slot(tmp_path / "a.slot", base.path, {Q: (None, 1)})
    _flip(tmp_path / "a.slot", 100)
    _refused(tmp_path, [base.path, tmp_path / "a.slot"], "a.slot", Q, "digest")


def test_refuses_tampered_manifest(tmp_path):
    base = make_checkpoint(tmp_path / "base.safetensors")
    _slot(tmp_path / "a.slot", base.path, {Q: (None, 1)})
    blob = (tmp_path / "a.slot").read_bytes()
    # A same-length edit of the recorded digest (the first one in canonical order).
    at = blob.index(b'\\"digest\\":\\"') + len(b'\\"digest\\":\\"')
    tampered = blob[:at] + (b"0" if blob[at : at + 1] != b"0" else b"1") + blob[at + 1 :]
    (tmp_path / "a.slot").write_bytes(tampered)
    _refused(tmp_path, [base.path, tmp_path / "a.slot"], "a.slot", "manifest digest mismatch")


def test_refuses_non_slot(tmp_path):
    base = make_checkpoint(tmp_path / "base.safetensors")
    other = make_checkpoint(tmp_path / "other.safetensors", seed=1)
    _refused(tmp_path, [base.path, other.path], "other.safetensors", "not a slot")


def test_refuses_a_slot_as_base(tmp_path):
    base = make_checkpoint(tmp_path / "base.safetensors")
    _slot(tmp_path / "a.slot", base.path, {Q: (None, 1)})
    _slot(tmp_path / "b.slot", base.path, {BIAS: (None, 2)})
    line = _refused(tmp_path, [tmp_path / "a.slot", tmp_path / "b.slot"])
    assert line == f"error: {tmp_path / 'a.slot'}: is a slot, not a base checkpoint"


def test_other_layout_of_a_known_model_names_the_first_differing_tensor(tmp_path):
    from slotsmith.checks import fingerprint_problems
    from slotsmith.inventory import load_inventory
    from slotsmith.manifest import BaseFingerprint, Entry, build_manifest
    from slotsmith.slot import Slot

    # Made on Wan 2.1 1.3B (F32), checked against a 14B layout: head.head.bias fits both.
    entry = Entry(BIAS, (64,), "F32", None, "0" * 32)
    m = build_manifest(
        selection=None, base=BaseFingerprint("wan2.1-t2v-1.3b", "1" * 32, {BIAS: "2" * 32}),
        entries=[entry], provenance={}, expert=None,
    )
    big = load_inventory("wan2.1-t2v-14b")
    (problem,) = fingerprint_problems(Slot(tmp_path / "a.slot", None, m), big, None)
    assert problem.endswith(
        ": first difference: tensor 'blocks.0.cross_attn.k.bias' is BF16[5120] in the base, "
        "F32[1536] in wan2.1-t2v-1.3b"
    )


def test_refuses_truncated_slot(tmp_path):
    base = make_checkpoint(tmp_path / "base.safetensors")
    _slot(tmp_path / "a.slot", base.path, {Q: (None, 1)})
    blob = (tmp_path / "a.slot").read_bytes()
    (tmp_path / "a.slot").write_bytes(blob[:-10])
    _refused(tmp_path, [base.path, tmp_path / "a.slot"], "a.slot", "truncated")


def test_refuses_wrong_base_of_same_layout(tmp_path):
    # Like the Wan 2.2 high- and low-noise experts: one layout, different bytes.
    high = make_checkpoint(tmp_path / "high.safetensors", seed=1)
    low = make_checkpoint(tmp_path / "low.safetensors", seed=2)
    _slot(tmp_path / "a.slot", high.path, {FFN: ((0, 8), 1)}, expert="high")
    assert inventory_from_checkpoint(high.path).layout_digest() == inventory_from_checkpoint(low.path).layout_digest()
    _refused(tmp_path, [low.path, tmp_path / "a.slot"], "low.safetensors", FFN, "a.slot", "wrong base", "high")


def test_refuses_base_differing_only_in_replaced_rows(tmp_path):
    base = make_checkpoint(tmp_path / "base.safetensors")
    _slot(tmp_path / "a.slot", base.path, {FFN: ((0, 8), 1)})
    offset = read_raw_safetensors(base.path)[0][FFN]["data_offsets"][0]
    _flip(base.path, offset + 3)  # inside rows [0, 8)
    _refused(tmp_path, [base.path, tmp_path / "a.slot"], "wrong base", FFN)


def test_refuses_other_layout(tmp_path):
    small = make_checkpoint(tmp_path / "small.safetensors")
    big = make_checkpoint(tmp_path / "big.safetensors", cfg=WanConfig(64, 256, 2, text_dim=32, freq_dim=16))
    _slot(tmp_path / "a.slot", small.path, {Q: (None, 1)})
    _slot(tmp_path / "b.slot", small.path, {FFN: (None, 1)})
    _refused(tmp_path, [big.path, tmp_path / "a.slot"], "a.slot", "layout")
    _refused(tmp_path, [big.path, tmp_path / "b.slot"], "b.slot", FFN, "F32[128, 64]", "F32[256, 64]")


def test_refuses_dtype_mismatch(tmp_path):
    f32 = make_checkpoint(tmp_path / "f32.safetensors")
    bf16 = make_checkpoint(tmp_path / "bf16.safetensors", dtype="BF16")
    _slot(tmp_path / "a.slot", f32.path, {Q: (None, 1)})
    _refused(tmp_path, [bf16.path, tmp_path / "a.slot"], "a.slot", Q, "F32", "BF16")


def test_refuses_overlapping_rows_naming_both(tmp_path):
    base = make_checkpoint(tmp_path / "base.safetensors")
    _slot(tmp_path / "a.slot", base.path, {FFN: ((0, 40), 1)})
    _slot(tmp_path / "b.slot", base.path, {FFN: ((30, 50), 2)})
    line = _refused(tmp_path, [base.path, tmp_path / "a.slot", tmp_path / "b.slot"])
    assert f"{tmp_path / 'a.slot'} and {tmp_path / 'b.slot'} overlap: both hold rows [30, 40) of tensor {FFN!r}" in line
    assert line.count(FFN) == 1


def test_refuses_whole_tensor_overlap_and_same_slot_twice(tmp_path):
    base = make_checkpoint(tmp_path / "base.safetensors")
    _slot(tmp_path / "a.slot", base.path, {Q: (None, 1), BIAS: (None, 5)})
    _slot(tmp_path / "b.slot", base.path, {FFN: ((3, 4), 2), Q: ((10, 11), 3)})
    a, b, c = (tmp_path / f"{x}.slot" for x in "abc")
    _refused(tmp_path, [base.path, a, b], f"overlap: both hold rows [10, 11) of tensor {Q!r}")
    _slot(c, base.path, {Q: (None, 4)})
    line = _refused(tmp_path, [base.path, a, c], f"overlap: both hold tensor {Q!r}")
    assert line.count(Q) == 1
    _refused(tmp_path, [base.path, a, a], "same slot given twice")


def test_refuses_output_that_is_an_input(tmp_path):
    base = make_checkpoint(tmp_path / "base.safetensors")
    _slot(tmp_path / "a.slot", base.path, {Q: (None, 1)})
    before = base.path.read_bytes()
    r = _run("splice", base.path, tmp_path / "a.slot", "-o", base.path, "--force")
    assert r.exit_code == 1 and "is an input" in r.output
    assert base.path.read_bytes() == before


def test_usage_errors_exit_2(tmp_path):
    assert _run("splice").exit_code == 2
    assert _run("splice", tmp_path / "base.safetensors").exit_code == 2


def test_failure_mid_write_leaves_nothing(tmp_path, monkeypatch):
    base = make_checkpoint(tmp_path / "base.safetensors")
    _slot(tmp_path / "a.slot", base.path, {FFN: ((0, 4), 1), BIAS: (None, 2)})
    real = writer._copy_range
    calls = []

    def failing(src, dst, pos, progress):
        calls.append(pos)
        if len(calls) == 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(src, dst, pos, progress)

    monkeypatch.setattr(writer, "_copy_range", failing)
    _refused(tmp_path, [base.path, tmp_path / "a.slot"], "out.safetensors", "No space left")
    assert len(calls) == 2


@pytest.mark.parametrize("shards", [None, 2])
def test_ctrl_c_mid_write_leaves_nothing(tmp_path, monkeypatch, shards):
    base = make_checkpoint(tmp_path / ("base" if shards else "base.safetensors"), shards=shards)
    _slot(tmp_path / "a.slot", base.path, {Q: (None, 1)})
    calls = []

    def interrupted(src, dst, pos, progress):
        calls.append(pos)
        if len(calls) == 3:
            raise KeyboardInterrupt
        progress(0)

    monkeypatch.setattr(writer, "_copy_range", interrupted)
    out = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        splice(base.path, [tmp_path / "a.slot"], out)
    assert not out.exists() and _no_temp_left(tmp_path)


def test_buffered_fallback_when_kernel_copy_is_unavailable(tmp_path, monkeypatch):
    base = make_checkpoint(tmp_path / "base.safetensors")
    a = _slot(tmp_path / "a.slot", base.path, {FFN: ((5, 9), 1)})

    def unsupported(*args):
        raise OSError(errno.EXDEV, "cross-device")

    monkeypatch.setattr(os, "copy_file_range", unsupported)
    out = splice(base.path, [tmp_path / "a.slot"], tmp_path / "out.safetensors")
    assert read_checkpoint_tensors(out) == _expected(base, a)


def test_splicing_onto_a_spliced_checkpoint(tmp_path):
    base = make_checkpoint(tmp_path / "base.safetensors")
    a = _slot(tmp_path / "a.slot", base.path, {FFN: ((0, 10), 1)})
    b = _slot(tmp_path / "b.slot", base.path, {Q: (None, 2)})
    _slot(tmp_path / "c.slot", base.path, {FFN: ((5, 6), 3)})
    first = splice(base.path, [tmp_path / "a.slot"], tmp_path / "first.safetensors")
    second = splice(first, [tmp_path / "b.slot"], tmp_path / "second.safetensors")
    assert read_checkpoint_tensors(second) == _expected(base, a, b)
    record = json.loads(read_raw_safetensors(second)[0]["__metadata__"]["slotsmith.splice"])
    assert [s["file"] for s in record["slots"]] == ["a.slot", "b.slot"]
    assert record["base"]["source"] == "base.safetensors"
    # c overlaps a, which is already inside `first`.
    r = _run("splice", first, tmp_path / "c.slot", "-o", tmp_path / "third.safetensors")
    assert r.exit_code == 1 and "a.slot" in r.output and "c.slot" in r.output and FFN in r.output


def test_splice_modules_do_not_import_torch():
    code = (
        "import sys, slotsmith.splice, slotsmith.inspection, slotsmith.checks, slotsmith.manifest, "
        "slotsmith.slot, slotsmith.io.writer; print('torch' in sys.modules)"
    )
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).stdout.strip() == "False"


def test_tiny_base_round_trips_through_the_official_loader(tmp_path):
    base = make_checkpoint(tmp_path / "base.safetensors", cfg=TINY)
    _slot(tmp_path / "a.slot", base.path, {BIAS: (None, 1)})
    out = splice(base.path, [tmp_path / "a.slot"], tmp_path / "out.safetensors")
    with safetensors.safe_open(str(out), "numpy") as f:
        assert f.metadata()["format"] == "pt"
        assert len(list(f.keys())) == len(base.tensors)


def test_kernel_copies_are_block_aligned_for_reflinks(tmp_path, monkeypatch):
    base = make_checkpoint(tmp_path / "base.safetensors")
    a = _slot(tmp_path / "a.slot", base.path, {FFN: ((3, 9), 1)})
    real, calls = os.copy_file_range, []

    def recording(src, dst, count, offset_src, offset_dst):
        calls.append((count, offset_src, offset_dst))
        return real(src, dst, count, offset_src, offset_dst)

    monkeypatch.setattr(os, "copy_file_range", recording)
    out = splice(base.path, [tmp_path / "a.slot"], tmp_path / "out.safetensors")
    assert read_checkpoint_tensors(out) == _expected(base, a)
    base_calls = [c for c in calls if c[0] > 4096]
    assert base_calls, calls
    for count, src, dst in base_calls:
        assert src % 4096 == 0 and dst % 4096 == 0


def test_overlapping_v3_slots_of_different_pool_counts_say_so(tmp_path):
    from slotsmith.select import select

    base = make_checkpoint(tmp_path / "base.safetensors")
    inv = inventory_from_checkpoint(base.path)
    shapes = {n: t.shape for n, t in inv.tensors.items()}
    for label, pools, ffid in (("a", 8, 0), ("b", 16, 1)):  # share 1 of 16 lies in share 0 of 8
        sel = select(shapes, 1 / pools, ffid, "v3", pools)
        data = {n: _new((b - a, *shapes[n][1:]), 7) for n, (a, b) in sel.rows.items()}
        write_slot(tmp_path / f"{label}.slot", inv, data, selection=sel.record(), provenance={}, rows=sel.rows)
    _refused(tmp_path, [base.path, tmp_path / "a.slot", tmp_path / "b.slot"],
             "overlap: both hold rows", "their pool counts differ, 8 and 16")


# --- strengths: FILE:S -----------------------------------------------------------------------------


def _blended(base, slot, strength):
    """``_expected`` of one slot applied at ``strength``: its regions blended with numpy."""
    out = dict(base.tensors)
    for name, (rows, data) in slot.items():
        lo, hi = (0, len(data)) if rows is None else (rows[0] * base.row_bytes(name), rows[1] * base.row_bytes(name))
        cur = out[name]
        out[name] = cur[:lo] + blend_reference(cur[lo:hi], data, base.dtype, strength) + cur[hi:]
    return out


@pytest.mark.parametrize("dtype, shards", [("F32", None), ("BF16", None), ("F16", 2)])
def test_strength_blends_the_slots_regions_and_records_them(tmp_path, dtype, shards):
    base = make_checkpoint(tmp_path / ("base" if shards else "base.safetensors"), dtype=dtype, shards=shards)
    a = _slot(tmp_path / "a.slot", base.path, {FFN: ((0, 40), 1), Q: (None, 2)}, dtype)
    b = _slot(tmp_path / "b.slot", base.path, {BIAS: (None, 4)}, dtype)
    out = tmp_path / ("out" if shards else "out.safetensors")
    r = _run("splice", base.path, f"{tmp_path / 'a.slot'}:0.7", tmp_path / "b.slot", "-o", out, "-q")
    assert r.exit_code == 0, r.output
    expected = {**_blended(base, a, 0.7), BIAS: b[BIAS][1]}
    got = read_checkpoint_tensors(out)
    assert got == {base.key(n): v for n, v in expected.items()}
    assert got[base.key(Q)] not in (base.tensors[Q], a[Q][1])
    header, _ = read_raw_safetensors(next(out.glob("*.safetensors")) if shards else out)
    record = json.loads(header["__metadata__"]["slotsmith.splice"])
    assert record["format"] == "slotsmith-splice/2"
    first, second = record["slots"]
    assert first["strength"] == 0.7 and "strength" not in second and "blended" not in second
    row_bytes = base.row_bytes(FFN)
    regions = {FFN: expected[FFN][: 40 * row_bytes], Q: expected[Q]}
    assert first["blended"] == {n: xxhash.xxh3_128_hexdigest(v) for n, v in regions.items()}
    assert "  slot a.slot at strength 0.7\n  " in _run("inspect", out).output
    assert _no_temp_left(tmp_path)


def test_strength_one_is_the_plain_splice_byte_for_byte(tmp_path):
    base = make_checkpoint(tmp_path / "base.safetensors", dtype="BF16")
    _slot(tmp_path / "a.slot", base.path, {FFN: ((0, 40), 1)}, "BF16")
    plain = splice(base.path, [tmp_path / "a.slot"], tmp_path / "plain.safetensors")
    assert _run("splice", base.path, f"{tmp_path / 'a.slot'}:1", "-o", tmp_path / "one.safetensors").exit_code == 0
    assert (tmp_path / "one.safetensors").read_bytes() == plain.read_bytes()
    record = json.loads(read_raw_safetensors(plain)[0]["__metadata__"]["slotsmith.splice"])
    assert record["format"] == "slotsmith-splice/1" and set(record["slots"][0]) == {"file", "manifest"}


def test_strength_names_the_default_output_and_bad_strengths_are_refused(tmp_path, monkeypatch):
    base = make_checkpoint(tmp_path / "base.safetensors")
    _slot(tmp_path / "a.slot", base.path, {Q: (None, 1)})
    _slot(tmp_path / "b.slot", base.path, {BIAS: (None, 2)})
    monkeypatch.chdir(tmp_path)
    for bad, message in (("2.5", "strength 2.5 is outside [0, 2]"), ("lots", "strength 'lots' is not a number")):
        r = _run("splice", base.path, f"a.slot:{bad}")
        assert r.exit_code == 1 and message in r.output and "Traceback" not in r.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.slot", "b.slot", "base.safetensors"]
    assert _run("splice", base.path, "a.slot:0.5", "b.slot", "-q").exit_code == 0
    assert (tmp_path / "base+a@0.5+b.safetensors").is_file()


def test_splicing_onto_a_strength_splice_keeps_its_blend(tmp_path):
    base = make_checkpoint(tmp_path / "base.safetensors")
    a = _slot(tmp_path / "a.slot", base.path, {FFN: ((0, 10), 1)})
    b = _slot(tmp_path / "b.slot", base.path, {Q: (None, 2)})
    first = splice(base.path, [SlotSpec(tmp_path / "a.slot", 1.5)], tmp_path / "first.safetensors")
    second = splice(first, [SlotSpec(tmp_path / "b.slot", 0.25)], tmp_path / "second.safetensors")
    expected = {**_blended(base, a, 1.5), Q: _blended(base, b, 0.25)[Q]}
    assert read_checkpoint_tensors(second) == expected
    record = json.loads(read_raw_safetensors(second)[0]["__metadata__"]["slotsmith.splice"])
    assert [(s["file"], s["strength"]) for s in record["slots"]] == [("a.slot", 1.5), ("b.slot", 0.25)]
    # The spliced base is checked as verify checks it: a changed blended region is refused.
    data = bytearray(first.read_bytes())
    header, _ = read_raw_safetensors(first)
    start = 8 + int.from_bytes(data[:8], "little") + header[FFN]["data_offsets"][0]
    data[start] ^= 0x40
    (tmp_path / "bad.safetensors").write_bytes(bytes(data))
    r = _run("splice", tmp_path / "bad.safetensors", tmp_path / "b.slot", "-o", tmp_path / "x.safetensors")
    assert r.exit_code == 1 and "no longer holds the blend at strength 1.5 of slot 'a.slot'" in r.output
