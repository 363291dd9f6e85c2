"""Sharded sets: index JSON validation and folder resolution."""

import json

import numpy as np
import pytest
from safetensors.numpy import save_file

from slotsmith.errors import SlotsmithError
from slotsmith.io.checkpoint import open_checkpoint


def _shards(folder, index=None):
    save_file({"a": np.zeros(2, np.float32)}, str(folder / "m-1.safetensors"))
    save_file({"b": np.ones(3, np.float32)}, str(folder / "m-2.safetensors"))
    index = index or {"metadata": {"total_size": 20}, "weight_map": {"a": "m-1.safetensors", "b": "m-2.safetensors"}}
    path = folder / "m.safetensors.index.json"
    path.write_text(json.dumps(index))
    return path


def test_sharded_set_by_index_and_by_folder(tmp_path):
    index = _shards(tmp_path)
    for target in (index, tmp_path):
        ckpt = open_checkpoint(target)
        assert ckpt.sharded and sorted(ckpt.tensors) == ["a", "b"]
        assert ckpt.tensors["b"][0].path.name == "m-2.safetensors"
        assert ckpt.index_metadata == {"total_size": 20}


@pytest.mark.parametrize(
    "weight_map,expected",
    [
        ({"a": "../m-1.safetensors", "b": "m-2.safetensors"}, "escapes"),
        ({"a": "/etc/passwd", "b": "m-2.safetensors"}, "escapes"),
        ({"a": "sub/m-1.safetensors", "b": "m-2.safetensors"}, "escapes"),
        ({"a": "m-1.safetensors"}, "unlisted 'b'"),
        ({"a": "m-1.safetensors", "b": "m-2.safetensors", "c": "m-2.safetensors"}, "missing 'c'"),
        ({"a": "m-1.safetensors", "b": "m-3.safetensors"}, "no such file"),
        ({"a": 5, "b": "m-2.safetensors"}, "file names"),
        ({}, "weight_map"),
    ],
)
def test_bad_index_is_refused(tmp_path, weight_map, expected):
    if expected == "unlisted 'b'":
        # b must live in m-1 for the shard to carry an unlisted key
        save_file({"a": np.zeros(2, np.float32), "b": np.ones(3, np.float32)}, str(tmp_path / "m-1.safetensors"))
        (tmp_path / "m.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
        index = tmp_path / "m.safetensors.index.json"
    else:
        index = _shards(tmp_path, {"weight_map": weight_map})
    with pytest.raises(SlotsmithError, match=expected):
        open_checkpoint(index)


def test_index_that_is_not_json(tmp_path):
    index = _shards(tmp_path)
    index.write_bytes(b"\x00garbage")
    with pytest.raises(SlotsmithError, match="invalid JSON|UTF-8"):
        open_checkpoint(index)


def test_folder_with_several_unindexed_files_is_ambiguous(tmp_path):
    _shards(tmp_path)
    (tmp_path / "m.safetensors.index.json").unlink()
    with pytest.raises(SlotsmithError, match="several"):
        open_checkpoint(tmp_path)


def test_empty_folder(tmp_path):
    with pytest.raises(SlotsmithError, match="no .safetensors"):
        open_checkpoint(tmp_path)
