"""`slotsmith inspect`: slot manifests, splice records, checkpoint summaries."""

import json
from math import prod

import numpy as np
import yaml
from click.testing import CliRunner
from helpers import make_checkpoint, random_bytes

from slotsmith.cli import main
from slotsmith.inventory import inventory_from_checkpoint
from slotsmith.slot import read_slot, write_slot
from slotsmith.splice import splice

Q = "blocks.1.self_attn.q.weight"


def _run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def _slot(tmp_path, base):
    inv = inventory_from_checkpoint(base.path)
    data = random_bytes((64, 64), base.dtype, np.random.default_rng(1))
    write_slot(tmp_path / "a.slot", inv, {Q: data}, selection={"algorithm": "v2", "ff": 0.01}, provenance={"steps": 5, "settings": {"lr": 0.001}})
    return tmp_path / "a.slot"


def test_inspect_slot(tmp_path):
    base = make_checkpoint(tmp_path / "base.safetensors")
    path = _slot(tmp_path, base)
    manifest = read_slot(path).manifest
    r = _run("inspect", path, "--json")
    assert r.exit_code == 0
    doc = json.loads(r.output)
    assert doc["kind"] == "slot" and doc["manifest"] == manifest.to_json()
    r = _run("inspect", path, "--yaml")
    assert yaml.safe_load(r.output) == doc
    r = _run("inspect", path)
    assert manifest.digest in r.output and Q in r.output
    lines = r.output.splitlines()
    assert "  steps: 5" in lines and "  settings:" in lines and "    lr: 0.001" in lines


def test_inspect_plain_checkpoint(tmp_path):
    base = make_checkpoint(tmp_path / "base.safetensors", convention="diffusers", dtype="BF16")
    doc = json.loads(_run("inspect", base.path, "--json").output)
    s = doc["summary"]
    assert doc["kind"] == "checkpoint" and doc["splice"] is None
    assert s["tensors"] == len(base.shapes)
    assert s["params"] == sum(prod(v) for v in base.shapes.values())
    assert s["bytes"] == sum(len(v) for v in base.tensors.values())
    assert s["dtypes"] == {"BF16": len(base.shapes)}
    assert s["blocks"] == 2 and s["convention"] == "diffusers" and s["layout"] == []
    text = _run("inspect", base.path).output
    assert "diffusers" in text and "blocks     2" in text


def test_inspect_spliced_sharded(tmp_path):
    base = make_checkpoint(tmp_path / "base", shards=2)
    slot = _slot(tmp_path, base)
    out = splice(base.path, [slot], tmp_path / "out")
    doc = json.loads(_run("inspect", out, "--json").output)
    assert len(doc["summary"]["files"]) == 2
    assert [s["file"] for s in doc["splice"]["slots"]] == ["a.slot"]
    assert doc["splice"]["slots"][0]["manifest"]["digest"] == read_slot(slot).manifest.digest
    assert "spliced    from base with 1 slot(s)" in _run("inspect", out).output


def test_inspect_refusals(tmp_path):
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file at all")
    r = _run("inspect", tmp_path / "junk.safetensors")
    assert r.exit_code == 1 and r.output.startswith("error: ") and "junk.safetensors" in r.output
    assert _run("inspect", tmp_path / "missing.slot").exit_code == 1
    base = make_checkpoint(tmp_path / "base.safetensors")
    assert _run("inspect", base.path, "--json", "--yaml").exit_code == 2
