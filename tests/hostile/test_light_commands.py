"""Hostile inputs and faults against the light commands (plan, inspect, verify, splice, extract).

Every input is generated here by a few lines of Python (no committed
binaries). Each case asserts: the documented exit code, one clean ``error:``
line (no traceback), nothing left in the output folder, inputs unchanged, and
that it answers within a couple of seconds.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import struct
import time
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from helpers import (
    HANG_SECONDS,
    make_checkpoint,
    random_bytes,
    read_raw_safetensors,
    rewrite_metadata,
)

from slotsmith.cli import main
from slotsmith.inventory import inventory_from_checkpoint
from slotsmith.io import writer
from slotsmith.slot import write_slot
from slotsmith.splice import splice
from slotsmith.splice_record import SPLICE_KEY

NAME_MAX = os.pathconf("/", "PC_NAME_MAX")


def _slot(path, base_path, names, seed, provenance=None):
    inv = inventory_from_checkpoint(base_path)
    rng = np.random.default_rng(seed)
    data = {n: random_bytes(inv.tensors[n].shape, inv.tensors[n].dtype, rng) for n in names}
    write_slot(path, inv, data, selection=None, provenance=provenance or {})
    return path


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A tiny base, two disjoint slots and the checkpoint spliced from them (read-only for the cases)."""
    root = tmp_path_factory.mktemp("world")
    base = make_checkpoint(root / "base.safetensors").path
    a = _slot(root / "a.slot", base, ["blocks.0.ffn.0.weight"], 1)
    b = _slot(root / "b.slot", base, ["blocks.1.ffn.0.weight"], 2)
    spliced = splice(base, [a], root / "spliced.safetensors")
    return {"root": root, "base": base, "a": a, "b": b, "spliced": spliced}


def _raw_header(path: Path, header: dict, data: bytes = b"") -> Path:
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)
    return path


def _fingerprint(folder: Path) -> dict[str, str]:
    """Every entry under ``folder``: links by target, files by content hash, others by kind."""
    out = {}
    for dirpath, dirs, names in os.walk(folder):
        for name in dirs + names:
            p = Path(dirpath) / name
            if p.is_symlink():
                out[str(p)] = "link:" + os.readlink(p)
            elif p.is_file():
                out[str(p)] = hashlib.sha256(p.read_bytes()).hexdigest()
            else:
                out[str(p)] = "other"
    return out


def _run(args, cwd: Path, code: int = 1, runner=None, one_error: bool = True):
    """Run the CLI in ``cwd``; assert the exit code, one clean error line, nothing changed, and speed."""
    before = _fingerprint(cwd)
    old = os.getcwd()
    os.chdir(cwd)
    try:
        started = time.perf_counter()
        r = (runner or CliRunner()).invoke(main, [str(a) for a in args])
        seconds = time.perf_counter() - started
    finally:
        os.chdir(old)
    assert r.exit_code == code, (r.exit_code, r.output, r.exception)
    assert "Traceback" not in r.output
    assert r.exception is None or isinstance(r.exception, SystemExit), repr(r.exception)
    errors = [line for line in r.output.splitlines() if line.startswith("error:")]
    if code == 1 and one_error:
        assert len(errors) == 1, r.output
    assert _fingerprint(cwd) == before, "the command left something behind or changed an input"
    assert seconds < HANG_SECONDS, f"took {seconds:.1f} s"
    return r


def _link(path: Path, target) -> Path:
    path.symlink_to(target)
    return path


def _fifo(path: Path) -> Path:
    os.mkfifo(path)
    return path


LAUGHS = "a: &a [x, x, x, x, x, x, x, x, x]\n" + "".join(
    f"{chr(98 + i)}: &{chr(98 + i)} [{', '.join(['*' + chr(97 + i)] * 9)}]\n" for i in range(8)
) + "tensors: *i\n"

# name -> (make(tmp, world) -> args, expected words in the error line)
CASES = {
    "index is a link to itself": (
        lambda t, w: ["inspect", _link(t / "m.safetensors.index.json", t / "m.safetensors.index.json")],
        "symbolic links",
    ),
    "index is a FIFO": (lambda t, w: ["inspect", _fifo(t / "m.safetensors.index.json")], "not a regular file"),
    "index links to /dev/zero": (
        lambda t, w: ["inspect", _link(t / "m.safetensors.index.json", "/dev/zero")],
        "not a regular file",
    ),
    "layout is a FIFO": (lambda t, w: ["plan", "-m", _fifo(t / "l.yaml"), "--ff", "0.1", "--ffid", "0"], "regular"),
    "layout links to /dev/urandom": (
        lambda t, w: ["plan", "-m", _link(t / "l.yaml", "/dev/urandom"), "--ff", "0.1", "--ffid", "0"],
        "regular",
    ),
    "layout billion laughs": (
        lambda t, w: ["plan", "-m", _write(t / "l.yaml", LAUGHS), "--ff", "0.1", "--ffid", "0"],
        "aliases",
    ),
    "layout nested 20000 levels": (
        lambda t, w: ["plan", "-m", _write(t / "l.yaml", "tensors: " + "[" * 20000 + "]" * 20000), "--ff", "0.1",
                      "--ffid", "0"],
        "YAML",
    ),
    "layout nested 20000 levels, block style": (
        lambda t, w: ["plan", "-m", _write(t / "l.yaml", "".join(" " * i + "- \n" for i in range(0, 4000, 2))),
                      "--ff", "0.1", "--ffid", "0"],
        "nested",
    ),
    "layout 4000-digit dimension": (
        lambda t, w: ["plan", "-m", _write(t / "l.yaml", "tensors:\n  a.weight: {shape: [" + "9" * 4000
                      + "], dtype: F32}\n"), "--ff", "0.1", "--ffid", "0"],
        "digits",
    ),
    "layout 20-digit dimensions": (
        lambda t, w: ["plan", "-m", _write(t / "l.yaml", "tensors:\n  a.weight: {shape: [" + ", ".join(["9" * 19] * 9)
                      + "], dtype: F32}\n"), "--ff", "0.1", "--ffid", "0"],
        "elements",
    ),
    "header 4000-digit dimension (plan)": (
        lambda t, w: ["plan", "-m", _huge_dims(t), "--ff", "0.1", "--ffid", "0"], "digits",
    ),
    "header 4000-digit dimension (inspect)": (lambda t, w: ["inspect", _huge_dims(t)], "digits"),
    "header 4000-digit dimension (splice)": (lambda t, w: ["splice", _huge_dims(t), w["a"], "-o", t / "o"], "digits"),
    "header 4000-digit dimension (extract)": (
        lambda t, w: ["extract", w["base"], _huge_dims(t), "-o", t / "o.slot"], "digits",
    ),
    "manifest provenance nested 980 levels (inspect)": (
        lambda t, w: ["inspect", _deep_manifest(t, w, 980)], "nested",
    ),
    "manifest provenance nested 600 levels (inspect --yaml)": (
        lambda t, w: ["inspect", "--yaml", _deep_manifest(t, w, 600)], "nested",
    ),
    "manifest provenance nested 980 levels (splice)": (
        lambda t, w: ["splice", w["base"], _deep_manifest(t, w, 980), "-o", t / "o.safetensors"], "nested",
    ),
    "slot is a link loop (splice)": (
        lambda t, w: ["splice", w["base"], _link(t / "x.slot", t / "x.slot"), "-o", t / "o.safetensors"],
        "symbolic links",
    ),
    "folder whose only file links to itself": (
        lambda t, w: ["inspect", _only_self_link(t)], "symbolic links",
    ),
    "file name over the system limit": (lambda t, w: ["inspect", t / ("a" * (NAME_MAX + 10))], "too long"),
    "splice output name over the system limit": (
        lambda t, w: ["splice", w["base"], w["a"], "-o", t / ("o" * (NAME_MAX + 10))], "too long",
    ),
    "extract output name over the system limit": (
        lambda t, w: ["extract", w["base"], w["spliced"], "-o", t / ("o" * (NAME_MAX + 10))], "too long",
    ),
    "spliced base whose slot bytes no longer check out": (
        lambda t, w: ["splice", _tampered_spliced(t, w), w["b"], "-o", t / "o.safetensors"], "no longer holds",
    ),
    "train --seed 2^64": (lambda t, w: _train(t, w, "--seed", 2**64), "--seed"),
    "train --seed -1": (lambda t, w: _train(t, w, "--seed", -1), "--seed"),
    "train --batch-size 10^12": (lambda t, w: _train(t, w, "--batch-size", 10**12), "--batch-size"),
    "train --steps 10^23": (lambda t, w: _train(t, w, "--steps", 10**23), "--steps"),
    "train --config with a 400-digit number": (
        lambda t, w: _train(t, w, "--config", _write(t / "c.yaml", "seed: " + "9" * 400 + "\n")), "digits",
    ),
    "train --config nested 20000 levels": (
        lambda t, w: _train(t, w, "--config", _write(t / "c.yaml", "seed: " + "[" * 20000 + "]" * 20000)), "YAML",
    ),
    "train --config billion laughs": (lambda t, w: _train(t, w, "--config", _write(t / "c.yaml", LAUGHS)), "aliases"),
    "train --config is a FIFO": (lambda t, w: _train(t, w, "--config", _fifo(t / "c.yaml")), "regular"),
}


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def _huge_dims(t: Path) -> Path:
    return _raw_header(t / "huge.safetensors", {"a": {"dtype": "F32", "shape": [int("9" * 4000)], "data_offsets": [0, 4]}},
                       b"\0" * 4)


def _deep_manifest(t: Path, w, depth: int) -> Path:
    src = w["a"]
    meta = read_raw_safetensors(src)[0]["__metadata__"]
    m = json.loads(meta["slotsmith.manifest"])
    m["provenance"] = {"x": "DEEP"}
    text = json.dumps(m).replace('"DEEP"', "[" * depth + "]" * depth)  # built as text: json would recurse
    out = t / "deep.slot"
    rewrite_metadata(src, out, "slotsmith.manifest", text)
    return out


def _only_self_link(t: Path) -> Path:
    folder = t / "ckpt"
    folder.mkdir()
    _link(folder / "m.safetensors", folder / "m.safetensors")
    return folder


def _tampered_spliced(t: Path, w) -> Path:
    out = t / "spliced.safetensors"
    data = bytearray(w["spliced"].read_bytes())
    header = read_raw_safetensors(w["spliced"])[0]
    start = 8 + struct.unpack("<Q", data[:8])[0] + header["blocks.0.ffn.0.weight"]["data_offsets"][0]
    data[start] ^= 0xFF
    out.write_bytes(bytes(data))
    return out


def _train(t: Path, w, *extra):
    return ["train", "-b", w["base"], "--cache", t, "--ff", "0.1", "--ffid", "0", "--steps", "1", "-o",
            t / "o.slot", *extra]


@pytest.mark.parametrize("case", list(CASES))
def test_hostile_input_gives_one_clean_line(tmp_path, world, case):
    make, words = CASES[case]
    args = make(tmp_path, world)
    if args[0] == "train":
        pytest.importorskip("torch")
    r = _run(args, tmp_path)
    line = next(line for line in r.output.splitlines() if line.startswith("error:"))
    assert words in line, line


def test_verify_never_reads_a_link_out_of_its_tree(tmp_path, world):
    folder = tmp_path / "repo"
    folder.mkdir()
    _link(folder / "leak.slot", "/etc/passwd")
    r = _run(["verify", folder], tmp_path, one_error=False)
    assert "a link out of" in r.output and "header length" not in r.output and "root:" not in r.output


def test_verify_reports_a_link_loop_in_its_tree(tmp_path):
    folder = tmp_path / "repo"
    folder.mkdir()
    _link(folder / "loop.slot", folder / "loop.slot")
    r = _run(["verify", folder], tmp_path, one_error=False)
    assert "looping link" in r.output


def test_inspect_escapes_what_it_prints(tmp_path, world):
    inv = inventory_from_checkpoint(world["base"])
    name = "blocks.0.ffn.0.weight"
    slot = tmp_path / "s.slot"
    data = random_bytes(inv.tensors[name].shape, "F32", np.random.default_rng(3))
    write_slot(slot, inv, {name: data}, selection={"note": "x\nerror: FAKE LINE \x1b[31mred"}, provenance={})
    r = _run(["inspect", slot], tmp_path, code=0)
    assert "\x1b" not in r.output
    assert not any(line.startswith("error: FAKE") for line in r.output.splitlines())
    assert "\\n" in r.output and "\\x1b" in r.output


def _flipped(src: Path, out: Path) -> Path:
    data = bytearray(src.read_bytes())
    data[-1] ^= 0x01
    out.write_bytes(bytes(data))
    return out


def test_inspect_warns_about_flipped_slot_bytes_and_strict_fails(tmp_path, world):
    bad = _flipped(world["a"], tmp_path / "bad.slot")
    r = _run(["inspect", bad], tmp_path, code=0)
    assert "warning:" in r.output and "do not match the manifest" in r.output and "slotsmith verify" in r.output
    _run(["inspect", "--strict", bad], tmp_path, code=1, one_error=False)
    assert "warning:" not in _run(["inspect", "--strict", world["a"]], tmp_path, code=0).output


def test_inspect_warns_about_a_record_listing_a_slot_twice(tmp_path, world):
    record = json.loads(read_raw_safetensors(world["spliced"])[0]["__metadata__"][SPLICE_KEY])
    record["slots"].append(record["slots"][0])
    out = tmp_path / "twice.safetensors"
    rewrite_metadata(world["spliced"], out, SPLICE_KEY, json.dumps(record))
    r = _run(["inspect", "--strict", out], tmp_path, code=1, one_error=False)
    assert "the same slot given twice" in r.output


def test_inspect_warns_about_a_zeroed_layout_digest(tmp_path, world):
    record = json.loads(read_raw_safetensors(world["spliced"])[0]["__metadata__"][SPLICE_KEY])
    record["base"]["layout_digest"] = "0" * 32
    out = tmp_path / "zeroed.safetensors"
    rewrite_metadata(world["spliced"], out, SPLICE_KEY, json.dumps(record))
    r = _run(["inspect", "--strict", out], tmp_path, code=1, one_error=False)
    assert "warning:" in r.output and "layout" in r.output


def test_base_changed_during_a_splice_fails_it_with_no_output(tmp_path, world, monkeypatch):
    base = tmp_path / "base.safetensors"
    base.write_bytes(world["base"].read_bytes())
    real = writer.write_tensors

    def overwrite_base_while_copying(fd, *args, **kwargs):
        size = real(fd, *args, **kwargs)
        with open(base, "r+b") as f:  # in place: same inode, same size
            f.seek(-4, os.SEEK_END)
            f.write(b"\x01\x02\x03\x04")
        return size

    monkeypatch.setattr("slotsmith.splice.write_tensors", overwrite_base_while_copying)
    r = CliRunner().invoke(main, ["splice", str(base), str(world["a"]), "-o", str(tmp_path / "o.safetensors")])
    assert r.exit_code == 1 and "changed while it was read" in r.output, r.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["base.safetensors"]


@pytest.mark.parametrize("sharded", [False, True])
def test_sigterm_during_a_splice_exits_143_and_leaves_nothing(tmp_path, monkeypatch, sharded):
    base = make_checkpoint(tmp_path / "base", shards=2) if sharded else make_checkpoint(tmp_path / "base.safetensors")
    slot = _slot(tmp_path / "s.slot", base.index if sharded else base.path, ["blocks.0.ffn.0.weight"], 4)
    before = _fingerprint(tmp_path)
    real = writer._copy_range
    calls = []

    def killed_midway(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            os.kill(os.getpid(), signal.SIGTERM)  # what a job scheduler or `docker stop` sends
        return real(*args, **kwargs)

    monkeypatch.setattr(writer, "_copy_range", killed_midway)
    r = CliRunner().invoke(main, ["splice", str(base.index if sharded else base.path), str(slot), "-o",
                                  str(tmp_path / "out")])
    assert r.exit_code == 143 and "terminated" in r.output, r.output
    assert _fingerprint(tmp_path) == before
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL


def _dead_pid() -> int:
    import subprocess
    import sys

    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_next_run_removes_what_a_killed_run_left_and_says_so(tmp_path, world):
    out = tmp_path / "o.safetensors"
    stale = tmp_path / f".{out.name}.slotsmith-{writer._HOST}-{_dead_pid()}-abc123.tmp"
    stale.mkdir()
    (stale / "part.safetensors").write_bytes(b"half")
    other_host = tmp_path / f".{out.name}.slotsmith-elsewhere-{_dead_pid()}-abc123.tmp"
    other_host.write_bytes(b"not ours to judge")
    mine = tmp_path / f".{out.name}.slotsmith-{writer._HOST}-{os.getpid()}-abc123.tmp"
    mine.write_bytes(b"a live run's")
    r = CliRunner().invoke(main, ["splice", str(world["base"]), str(world["a"]), "-o", str(out)])
    assert r.exit_code == 0, r.output
    assert f"note: removed {stale}" in r.output and "killed run" in r.output
    assert not stale.exists() and other_host.exists() and mine.exists() and out.is_file()


def test_unnamed_output_is_linked_in_only_at_the_end(tmp_path, monkeypatch):
    """The O_TMPFILE path, where this system cannot link /proc fds (some sandboxes and
    overlay mounts): os.link of a /proc fd is emulated by copying the fd's bytes."""
    real_link = os.link

    def link(src, dst, *, follow_symlinks=True):
        if str(src).startswith("/proc/self/fd/"):
            fd = int(str(src).rsplit("/", 1)[1])
            flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL
            out = os.open(dst, flags, 0o600)
            try:
                os.write(out, os.pread(fd, os.fstat(fd).st_size, 0))
            finally:
                os.close(out)
            return None
        return real_link(src, dst, follow_symlinks=follow_symlinks)

    monkeypatch.setattr(writer, "_linkable", lambda folder: True)
    monkeypatch.setattr(writer.os, "link", link)
    out = tmp_path / "f.bin"
    with writer.atomic_file(out) as fd:
        os.write(fd, b"abc")
        assert not list(tmp_path.iterdir())  # nothing named exists while writing
    assert out.read_bytes() == b"abc"
    with pytest.raises(Exception, match="already exists"), writer.atomic_file(out) as fd:
        os.write(fd, b"new")
    with writer.atomic_file(out, force=True) as fd:
        os.write(fd, b"new")
    assert out.read_bytes() == b"new" and sorted(p.name for p in tmp_path.iterdir()) == ["f.bin"]
    with pytest.raises(KeyboardInterrupt), writer.atomic_file(tmp_path / "g.bin") as fd:
        os.write(fd, b"x")
        raise KeyboardInterrupt
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f.bin"]
