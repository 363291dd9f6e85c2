"""The strict safetensors header reader, against valid and malformed files."""

import json
import os
import struct

import numpy as np
import pytest
from click.testing import CliRunner
from safetensors.numpy import save_file

from slotsmith.cli import main
from slotsmith.errors import SlotsmithError
from slotsmith.io.header import HEADER_CAP, read_header


def _raw(header, data: bytes = b"", *, header_bytes: bytes | None = None) -> bytes:
    body = header_bytes if header_bytes is not None else json.dumps(header).encode()
    return struct.pack("<Q", len(body)) + body + data


def _entry(dtype="F32", shape=(2,), offsets=(0, 8)):
    return {"dtype": dtype, "shape": list(shape), "data_offsets": list(offsets)}


GOOD = {"a": _entry(offsets=(0, 8)), "b": _entry(shape=(1,), offsets=(8, 12))}

MALFORMED = {
    "too short": (b"\x01\x02", "too short"),
    "header over cap": (struct.pack("<Q", HEADER_CAP + 1) + b"{}", "cap"),
    "header past end": (struct.pack("<Q", 1000) + b"{}", "past the end"),
    "not json object start": (_raw(None, header_bytes=b"[1, 2]"), "does not start"),
    "invalid utf8": (_raw(None, header_bytes=b'{"\xff": 1}'), "UTF-8"),
    "invalid json": (_raw(None, header_bytes=b'{"a": '), "invalid JSON"),
    "duplicate key": (
        _raw(None, b"\0" * 8, header_bytes=b'{"a": %s, "a": %s}' % ((json.dumps(_entry()).encode(),) * 2)),
        "duplicate",
    ),
    "unknown dtype": (_raw({"a": _entry(dtype="F128")}, b"\0" * 8), "unknown dtype"),
    "negative shape": (_raw({"a": _entry(shape=(-2,))}, b"\0" * 8), "non-negative"),
    "bool in shape": (_raw({"a": _entry(shape=(True,), offsets=(0, 4))}, b"\0" * 4), "non-negative"),
    "offsets wrong type": (_raw({"a": {"dtype": "F32", "shape": [2], "data_offsets": "0-8"}}, b"\0" * 8), "data_offsets"),
    "offsets reversed": (_raw({"a": _entry(offsets=(8, 0))}, b"\0" * 8), "0 <= begin <= end"),
    "length vs shape": (_raw({"a": _entry(shape=(3,))}, b"\0" * 8), "needs 12"),
    "gap": (_raw({"a": _entry(offsets=(4, 12))}, b"\0" * 12), "gap"),
    "overlap": (_raw({"a": _entry(offsets=(0, 8)), "b": _entry(offsets=(4, 12))}, b"\0" * 12), "overlaps"),
    "truncated": (_raw(GOOD, b"\0" * 10), "truncated"),
    "trailing data": (_raw(GOOD, b"\0" * 20), "trailing"),
    "metadata not str": (_raw({"__metadata__": {"k": 1}, **GOOD}, b"\0" * 12), "__metadata__"),
    "extra field": (_raw({"a": {**_entry(), "x": 1}}, b"\0" * 8), "exactly the fields"),
    "huge shape": (_raw({"a": _entry(shape=(2**62, 2**62))}, b"\0" * 8), "elements"),
}


def test_reads_a_file_written_by_the_official_library(tmp_path):
    path = tmp_path / "ok.safetensors"
    tensors = {"x": np.arange(6, dtype=np.float32).reshape(2, 3), "y": np.ones(4, dtype=np.int64)}
    save_file(tensors, str(path), metadata={"format": "pt"})
    header = read_header(path)
    assert header.metadata == {"format": "pt"}
    data = path.read_bytes()
    for name, array in tensors.items():
        info = header.tensors[name]
        assert info.shape == array.shape
        assert data[info.start : info.end] == array.tobytes()


def test_padded_header_is_valid(tmp_path):
    body = json.dumps(GOOD).encode() + b" " * 13
    path = tmp_path / "padded.safetensors"
    path.write_bytes(struct.pack("<Q", len(body)) + body + b"\0" * 12)
    assert read_header(path).data_start == 8 + len(body)


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_malformed_header_is_a_clean_error(tmp_path, case):
    raw, expected = MALFORMED[case]
    path = tmp_path / "bad.safetensors"
    path.write_bytes(raw)
    with pytest.raises(SlotsmithError, match=expected) as info:
        read_header(path)
    assert str(path) in str(info.value)


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_malformed_header_exits_1_with_one_line(tmp_path, case):
    path = tmp_path / "bad.safetensors"
    path.write_bytes(MALFORMED[case][0])
    result = CliRunner().invoke(main, ["plan", "-m", str(path), "--ff", "0.1", "--ffid", "0"])
    assert result.exit_code == 1
    assert result.output.startswith("error: ") and result.output.count("\n") == 1
    assert str(path) in result.output


def test_missing_file(tmp_path):
    result = CliRunner().invoke(main, ["plan", "-m", str(tmp_path / "nope.safetensors"), "--ff", "0.1", "--ffid", "0"])
    assert result.exit_code == 1 and "no such file" in result.output


def test_fifo_is_refused_without_blocking(tmp_path):
    fifo = tmp_path / "pipe.safetensors"
    os.mkfifo(fifo)
    with pytest.raises(SlotsmithError, match="not a regular file"):
        read_header(fifo)


def _torch_file(path, zipped: bool) -> bytes:
    import io

    torch = pytest.importorskip("torch")
    buffer = io.BytesIO()
    torch.save({"w": torch.zeros(2)}, buffer, _use_new_zipfile_serialization=zipped)
    return buffer.getvalue()


IMPOSTORS = {
    "lfs pointer": (
        lambda p: b"version https://git-lfs.github.com/spec/v1\noid sha256:" + b"ab" * 32 + b"\nsize 28576890880\n",
        "is a Git LFS pointer, not the weights; run `git lfs pull`",
    ),
    "torch zip": (lambda p: _torch_file(p, True), "is a PyTorch checkpoint (zip), not safetensors; convert it"),
    "torch pickle": (lambda p: _torch_file(p, False), "is a PyTorch checkpoint (pickle), not safetensors; convert it"),
    "html page": (
        lambda p: b"\n<!DOCTYPE html><html><head><title>Sign in</title></head></html>",
        "is an HTML page, not weights; the download failed",
    ),
    "gguf": (lambda p: b"GGUF\x03\x00\x00\x00" + b"\x00" * 40, "is a GGUF file"),
}


@pytest.mark.parametrize("kind", IMPOSTORS)
def test_files_that_are_not_safetensors_are_named_for_what_they_are(tmp_path, kind):
    make, words = IMPOSTORS[kind]
    path = tmp_path / "dit.safetensors"
    path.write_bytes(make(path))
    with pytest.raises(SlotsmithError) as e:
        read_header(path)
    assert str(e.value).startswith(f"{path}: {words}")
    r = CliRunner().invoke(main, ["inspect", str(path)])
    assert r.exit_code == 1 and r.output.startswith(f"error: {path}: {words}")


def test_the_pytorch_advice_is_a_command_that_converts(tmp_path):
    """The suggested one-liner, run as printed, gives a file the reader accepts."""
    import shlex
    import subprocess
    import sys

    pth = tmp_path / "vae.pth"
    pth.write_bytes(_torch_file(pth, True))
    with pytest.raises(SlotsmithError) as e:
        read_header(pth)
    command = str(e.value).split("convert it to safetensors: ", 1)[1]
    argv = shlex.split(command.replace("IN.pth", str(pth)).replace("OUT.safetensors", str(tmp_path / "vae.safetensors")))
    assert argv[0] == "python"
    subprocess.run([sys.executable, *argv[1:]], check=True, timeout=120)
    assert set(read_header(tmp_path / "vae.safetensors").tensors) == {"w"}


def test_a_sharded_index_that_is_an_lfs_pointer_says_so(tmp_path):
    from slotsmith.io.checkpoint import open_checkpoint

    index = tmp_path / "diffusion_pytorch_model.safetensors.index.json"
    index.write_bytes(IMPOSTORS["lfs pointer"][0](index))
    with pytest.raises(SlotsmithError, match="is a Git LFS pointer, not the weights; run `git lfs pull`"):
        open_checkpoint(index)
