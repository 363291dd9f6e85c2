"""`slotsmith plan` on layouts and on real files in every key convention."""

import json
import math

import numpy as np
import pytest
from click.testing import CliRunner
from helpers import TINY, make_checkpoint
from safetensors.numpy import save_file

from slotsmith.cli import main
from slotsmith.layout import KNOWN_MODELS, wan_tensor_shapes

_A14B = KNOWN_MODELS["wan2.2-t2v-a14b"].config


def _plan(*args):
    result = CliRunner().invoke(main, ["plan", *args])
    return result


def _plan_json(model, ff, *ffids):
    args = ["-m", str(model), "--ff", str(ff), "--json"]
    for k in ffids:
        args += ["--ffid", str(k)]
    result = _plan(*args)
    assert result.exit_code == 0, result.output
    return json.loads(result.output)


@pytest.fixture(scope="module")
def conventions(tmp_path_factory):
    root = tmp_path_factory.mktemp("conv")
    return {
        "native": make_checkpoint(root / "native.safetensors", seed=1).path,
        "prefixed": make_checkpoint(root / "prefixed.safetensors", convention="prefixed", seed=2).path,
        "diffusers": make_checkpoint(root / "diffusers.safetensors", convention="diffusers", seed=3).path,
        "sharded": make_checkpoint(root / "sharded", convention="diffusers", shards=3, seed=4).path,
    }


@pytest.mark.parametrize("ffid", range(8))
def test_same_selection_in_every_convention(conventions, ffid):
    plans = {name: _plan_json(path, 0.05, ffid) for name, path in conventions.items()}
    reference = plans["native"]
    assert reference["tensors"], "the tiny model must select something"
    for name, doc in plans.items():
        assert doc["tensors"] == reference["tensors"], name
        assert doc["selected_params"] == reference["selected_params"]


def test_json_fields(conventions):
    doc = _plan_json(conventions["native"], 0.05, 3)
    shapes = wan_tensor_shapes(TINY)
    total = sum(math.prod(s) for s in shapes.values())
    assert doc["total_params"] == total
    assert doc["target_params"] == int(total * 0.05)
    assert doc["selected_params"] == sum(math.prod(shapes[n]) for n in doc["tensors"])
    assert doc["num_blocks"] == TINY.num_layers
    assert doc["ffid"] == 3 and doc["algorithm"] == "v2" and doc["ff"] == 0.05
    assert 0 < doc["blocks_covered"] <= doc["num_blocks"]
    assert doc["pool_tensors"] >= len(doc["tensors"])


def test_several_ffids_give_a_list_and_an_overlap_table(conventions):
    docs = _plan_json(conventions["native"], 0.05, 1, 2, 5)
    assert [d["ffid"] for d in docs] == [1, 2, 5]
    result = _plan("-m", str(conventions["native"]), "--ff", "0.05", "--ffid", "1", "--ffid", "2")
    assert result.exit_code == 0
    table = result.output.split("overlap (shared tensors between slots)")[1].splitlines()
    assert table[2].split() == ["1", "-", "0"] and table[3].split() == ["2", "0", "-"]


def test_report_names_the_layout_and_warns():
    result = _plan("-m", "wan2.2-t2v-a14b", "--ff", "0.001", "--ffid", "0")
    assert result.exit_code == 0
    assert "layout of wan2.1-t2v-14b, wan2.2-t2v-a14b" in result.output
    assert "warning: budget overshot: the slot holds 1.85x" in result.output
    tiny_ff = ["-m", "wan2.2-t2v-a14b", "--ff", "0.00001", "--ffid", "0"]
    names = json.loads(_plan(*tiny_ff, "--json").output)["tensors"]
    covered = len({n.split(".")[1] for n in names if n.startswith("blocks.")})
    assert covered < 40
    assert f"warning: only {covered}/40 blocks are covered" in _plan(*tiny_ff).output


@pytest.mark.parametrize(
    "args,message",
    [
        (["-m", "wan2.2-t2v-a14b", "--ff", "0.01", "--ffid", "8"], "out of range"),
        (["-m", "wan2.2-t2v-a14b", "--ff", "1.5", "--ffid", "1"], "out of range"),
        (["-m", "wan2.2-t2v-a14b", "--ff", "0.5", "--ffid", "1"], "largest ff"),
        (["-m", "no-such-model", "--ff", "0.01", "--ffid", "1"], "not a known layout"),
    ],
)
def test_bad_arguments_exit_1(args, message):
    result = _plan(*args)
    assert result.exit_code == 1 and message in result.output and "Traceback" not in result.output


def test_missing_option_is_usage_error():
    assert _plan("-m", "wan2.2-t2v-a14b", "--ff", "0.01").exit_code == 2


def test_a_slot_is_not_a_model(tmp_path):
    from slotsmith.inventory import inventory_from_checkpoint
    from slotsmith.slot import write_slot

    base = make_checkpoint(tmp_path / "base.safetensors")
    inv = inventory_from_checkpoint(base.path)
    slot = tmp_path / "a.slot"
    write_slot(slot, inv, {"head.head.bias": base.tensors["head.head.bias"]}, selection=None, provenance={})
    result = _plan("-m", str(slot), "--ff", "0.01", "--ffid", "1")
    assert result.exit_code == 1
    assert result.output == f"error: {slot}: is a slot, not a base checkpoint\n"


def test_a_file_that_is_not_a_wan_dit_is_planned_with_a_warning(tmp_path):
    path = tmp_path / "vae.safetensors"
    save_file({"encoder.conv_in.weight": np.zeros((8, 3, 3, 3), np.float32),
               "decoder.conv_out.bias": np.zeros(3, np.float32)}, str(path))
    result = _plan("-m", str(path), "--ff", "0.001", "--ffid", "0")
    assert result.exit_code == 0
    assert f"warning: {path} is not a Wan DiT" in result.output
    wan = _plan("-m", "wan2.1-t2v-1.3b", "--ff", "0.01", "--ffid", "0")
    assert "is not a Wan DiT" not in wan.output


def _plan_v3(model, ff, pools, *ffids):
    args = ["-m", str(model), "--ff", str(ff), "--json", "--algorithm", "v3", "--pools", str(pools)]
    for k in ffids:
        args += ["--ffid", str(k)]
    result = _plan(*args)
    assert result.exit_code == 0, result.output
    return json.loads(result.output)


@pytest.mark.parametrize("ffid", [0, 5])
def test_v3_same_rows_in_every_convention(conventions, ffid):
    plans = {name: _plan_v3(path, 0.1, 8, ffid) for name, path in conventions.items()}
    assert plans["native"]["entries"]
    for name, doc in plans.items():
        assert doc["entries"] == plans["native"]["entries"], name


def test_v3_json_entries_shares_and_left_out():
    doc = _plan_v3("wan2.2-t2v-a14b", 0.01, 8, 3)
    shapes = wan_tensor_shapes(_A14B)
    assert doc["algorithm"] == "v3" and doc["num_pools"] == 8
    assert [e["name"] for e in doc["entries"]] == doc["tensors"]
    for e in doc["entries"]:
        rows = shapes[e["name"]][0]
        assert 3 * rows // 8 == e["rows"][0] < e["rows"][1] <= 4 * rows // 8
    assert set(doc["left_out"]) == {n for n, s in shapes.items() if s[0] < 8}
    assert doc["sliceable_params"] == sum(math.prod(s) for s in shapes.values() if s[0] >= 8)
    assert 0.999 < doc["sliceable_fraction"] < 1
    assert doc["blocks_covered"] == doc["num_blocks"] == 40
    assert all(abs(b["share"] - 0.01) < 0.0005 for b in doc["per_block"])
    assert doc["warnings"] == []


def test_v3_text_report_rows_left_out_and_overlap():
    result = _plan("-m", "wan2.2-t2v-a14b", "--algorithm", "v3", "--pools", "16", "--ff", "0.01",
                   "--ffid", "0", "--ffid", "15")
    assert result.exit_code == 0, result.output
    assert "selection v3, 16 pools" in result.output
    assert "ffn.0.weight[0:138]" in result.output or "ffn.0.weight[0:139]" in result.output  # 0.01 * 13824
    assert "left out                  41 tensors" in result.output
    table = result.output.split("overlap (shared tensors between slots)")[1].splitlines()
    assert table[2].split() == ["0", "-", "0"] and table[3].split() == ["15", "0", "-"]


@pytest.mark.parametrize(
    "args,message",
    [
        (["--pools", "8", "--ff", "0.2", "--ffid", "1"], "the largest ff for --pools 8 is 0.125"),
        (["--pools", "16", "--ff", "0.01", "--ffid", "16"], "--ffid 16 is out of range: pools are numbered 0..15"),
    ],
)
def test_v3_bad_arguments_exit_1(args, message):
    result = _plan("-m", "wan2.2-t2v-a14b", "--algorithm", "v3", *args)
    assert result.exit_code == 1 and message in result.output


def test_v3_pools_out_of_range_and_v2_pools():
    assert _plan("-m", "wan2.2-t2v-a14b", "--algorithm", "v3", "--pools", "257", "--ff", "0.001",
                 "--ffid", "0").exit_code == 2
    result = _plan("-m", "wan2.2-t2v-a14b", "--pools", "16", "--ff", "0.001", "--ffid", "0")
    assert result.exit_code == 1 and "v2 always has 8 pools" in result.output
