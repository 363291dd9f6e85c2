"""Hostile input: mutated headers, index JSON and layout YAML never escape as
anything but a clean SlotsmithError (no traceback, hang, or huge allocation)."""

import json
import os
import struct

import numpy as np
from helpers import mutate_bytes
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.numpy import save_file

from slotsmith.errors import SlotsmithError
from slotsmith.inventory import inventory_from_layout_file
from slotsmith.io.checkpoint import open_checkpoint
from slotsmith.io.header import read_header

FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


def _valid_file(tmp_path) -> bytes:
    path = tmp_path / "seed.safetensors"
    save_file(
        {"blocks.0.ffn.0.weight": np.arange(12, dtype=np.float32).reshape(3, 4), "head.modulation": np.ones((1, 2, 4), np.float16)},
        str(path),
        metadata={"k": "v"},
    )
    return path.read_bytes()


def _check_header(path):
    try:
        header = read_header(path)
    except SlotsmithError as e:
        assert str(path) in str(e) and "\n" not in str(e)
        return
    size = os.path.getsize(path)
    for info in header.tensors.values():  # a header we accept is safe to read from
        assert header.data_start <= info.start <= info.end <= size


mutation = st.one_of(
    st.tuples(st.just("flip"), st.integers(0, 400), st.integers(1, 255)),
    st.tuples(st.just("cut"), st.integers(0, 400), st.just(0)),
    st.tuples(st.just("insert"), st.integers(0, 400), st.integers(0, 255)),
)


@FUZZ
@given(mutations=st.lists(mutation, min_size=1, max_size=4))
def test_mutated_header_bytes(tmp_path, mutations):
    path = tmp_path / "fuzzed.safetensors"
    path.write_bytes(mutate_bytes(_valid_file(tmp_path), mutations))
    _check_header(path)


json_value = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)


@FUZZ
@given(entry=json_value, name=st.text(min_size=1, max_size=10), data_len=st.integers(0, 64))
def test_structured_header_entries(tmp_path, entry, name, data_len):
    body = json.dumps({name: entry}).encode()
    path = tmp_path / "structured.safetensors"
    path.write_bytes(struct.pack("<Q", len(body)) + body + b"\0" * data_len)
    _check_header(path)


@FUZZ
@given(index=json_value)
def test_structured_index_json(tmp_path, index):
    save_file({"a": np.zeros(2, np.float32)}, str(tmp_path / "m-1.safetensors"))
    path = tmp_path / "m.safetensors.index.json"
    path.write_text(json.dumps(index))
    try:
        ckpt = open_checkpoint(path)
    except SlotsmithError as e:
        assert "\n" not in str(e)
    else:
        assert all(h.path.parent == tmp_path for h in ckpt.files)


@FUZZ
@given(doc=json_value)
def test_structured_layout_and_training_yaml(tmp_path, doc):
    from slotsmith.train import load_settings

    path = tmp_path / "layout.yaml"
    path.write_text(json.dumps(doc))  # JSON is YAML
    # A settings problem (``--base is required``) names the option, not the file.
    for read, names_file in ((lambda: inventory_from_layout_file(path), True),
                             (lambda: load_settings({}, set(), str(path)), False)):
        try:
            read()
        except SlotsmithError as e:
            assert (str(path) in str(e) or not names_file) and "\n" not in str(e)


def test_yaml_with_python_tags_is_refused(tmp_path):
    path = tmp_path / "evil.yaml"
    path.write_text("tensors: !!python/object/apply:os.system ['echo pwned']\n")
    try:
        inventory_from_layout_file(path)
    except SlotsmithError as e:
        assert "not valid YAML" in str(e)
    else:
        raise AssertionError("a python tag was accepted")


# The reader rule (slotsmith.io.files) on its own: any JSON value, any YAML made of
# the tokens that build bombs and deep nests.

_YAML_TOKENS = st.sampled_from(
    ["[", "]", "{", "}", ", ", ": ", "- ", "\n", "  ", "&a ", "&b ", "*a", "*b", "x", "1", "9" * 30, "<<: *a",
     "!!int ", "!!python/name:os.system ", '"', "'", "#", "?", "|", ">", "---", "...", "%YAML 1.1"]
)


def _deep(depth: int) -> object:
    obj: object = []
    for _ in range(depth):
        obj = [obj]
    return obj


@FUZZ
@given(value=json_value, depth=st.integers(0, 200), big=st.integers(-(10**40), 10**40))
def test_json_reader_bounds_depth_and_integers(value, depth, big):
    from slotsmith.io.files import MAX_DEPTH, MAX_INT_DIGITS, parse_json

    doc = {"v": value, "deep": _deep(depth), "big": big}
    text = json.dumps(doc)
    try:
        parsed = parse_json(text.encode(), "x.json")
    except SlotsmithError as e:
        assert str(e).startswith("x.json: ") and "\n" not in str(e)
        assert depth + 2 > MAX_DEPTH or len(str(abs(big))) > MAX_INT_DIGITS or "duplicate" in str(e) or (
            "surrogate" in str(e) or "digits" in str(e) or "nested" in str(e)
        )
        return
    assert parsed["big"] == big and depth + 2 <= MAX_DEPTH


@FUZZ
@given(tokens=st.lists(_YAML_TOKENS, max_size=60))
def test_yaml_reader_returns_or_refuses_cleanly(tokens):
    from slotsmith.io.files import parse_yaml

    try:
        parse_yaml("".join(tokens), "x.yaml")
    except SlotsmithError as e:
        assert str(e).startswith("x.yaml: ") and "\n" not in str(e)
