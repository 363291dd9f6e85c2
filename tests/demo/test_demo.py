"""``slotsmith demo`` end to end with few steps: artifacts, splice bytes, verify, report."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import yaml
from click.testing import CliRunner
from safetensors import safe_open

from slotsmith.cli import main
from slotsmith.slot import read_slot

STEPS = 30


def _tensors(path) -> dict[str, bytes]:
    """Every tensor of a safetensors file as raw bytes, read with the official library."""
    with safe_open(str(path), framework="numpy") as f:
        return {key: f.get_tensor(key).tobytes() for key in f.keys()}


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo") / "demo-out"
    # Whole-tensor (v2) slots, so the byte checks below compare tensors; the v3 default has its own tests.
    args = ["demo", "--out", str(out), "--steps", str(STEPS), "--algorithm", "v2", "--json", "-q"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    return out, result.output


@pytest.mark.slow  # they share one demo run (~15 s)
def test_demo_writes_every_artifact(demo):
    out, _ = demo
    for rel in ("base.safetensors", "char1.slot", "char2.slot", "spliced.safetensors", "report.json", "cast.yaml",
                "samples.png",
                "models/vae/config.json", "models/umt5/config.json", "models/tokenizer/tokenizer.json",
                "data/char1/data.yaml", "data/char2/data.yaml", "data/char1/cache/index.json",
                "data/char2/cache/index.json"):
        assert (out / rel).is_file(), rel
    for char in ("char1", "char2"):
        captions = [p.read_text() for p in sorted((out / "data" / char / "images").glob("*.txt"))]
        assert captions and all(c.startswith(f"character{char[-1]} ") for c in captions)
        assert len(list((out / "data" / char / "images").glob("*.png"))) == len(captions)
    # The images of the two characters differ.
    one = (out / "data" / "char1" / "images" / "00.png").read_bytes()
    two = (out / "data" / "char2" / "images" / "00.png").read_bytes()
    assert one != two


@pytest.mark.slow
def test_slots_are_disjoint_and_only_they_differ_in_the_splice(demo):
    out, _ = demo
    base = _tensors(out / "base.safetensors")
    spliced = _tensors(out / "spliced.safetensors")
    slots = {char: _tensors(out / f"{char}.slot") for char in ("char1", "char2")}
    assert slots["char1"] and slots["char2"]
    assert not set(slots["char1"]) & set(slots["char2"])
    assert set(spliced) == set(base)
    from_slots = {**slots["char1"], **slots["char2"]}
    for key, data in spliced.items():
        if key in from_slots:
            assert data == from_slots[key], key
            assert data != base[key], f"{key}: trained tensor equals the base"
        else:
            assert data == base[key], f"{key}: changed outside the slots"


@pytest.mark.slow
def test_slots_record_their_ffids(demo):
    out, _ = demo
    for ffid, char in ((1, "char1"), (2, "char2")):
        with safe_open(str(out / f"{char}.slot"), framework="numpy") as f:
            manifest = json.loads(f.metadata()["slotsmith.manifest"])
        assert manifest["selection"]["ffid"] == ffid


@pytest.mark.slow
def test_verify_passes_on_the_demo_outputs(demo):
    out, _ = demo
    cmd = [sys.executable, "-m", "slotsmith", "verify", "--base", str(out / "base.safetensors"),
           str(out / "char1.slot"), str(out / "char2.slot"), str(out / "spliced.safetensors")]
    done = subprocess.run(cmd, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr


@pytest.mark.slow
def test_the_demo_cast_plans_splices_and_verifies(demo, tmp_path):
    out, _ = demo
    cast = out / "cast.yaml"
    doc = yaml.safe_load(cast.read_text())
    for char in ("char1", "char2"):
        with safe_open(str(out / f"{char}.slot"), framework="numpy") as f:
            assert doc["characters"][char]["pin"] == json.loads(f.metadata()["slotsmith.manifest"])["digest"]
    runner = CliRunner()
    plan = runner.invoke(main, ["plan", "--cast", str(cast), "--json"])
    assert plan.exit_code == 0, plan.output
    assert [c["ffid"] for c in json.loads(plan.output)["characters"]] == [1, 2]
    verify = runner.invoke(main, ["verify", "--cast", str(cast), "--json"])
    assert verify.exit_code == 0, verify.output
    checks = {(c["check"], c["result"]) for c in json.loads(verify.stdout)["checks"]}  # progress goes to stderr
    assert {("seal", "pass"), ("output", "pass"), ("pin", "pass")} <= checks
    again = runner.invoke(main, ["splice", "--cast", str(cast), "-o", str(tmp_path / "again.safetensors"), "-q"])
    assert again.exit_code == 0, again.output
    assert _tensors(tmp_path / "again.safetensors") == _tensors(out / "spliced.safetensors")


@pytest.mark.slow
def test_report_each_slot_lowers_its_own_loss(demo):
    out, stdout = demo
    report = json.loads((out / "report.json").read_text())
    assert json.loads(stdout) == report
    assert set(report["loss"]) == {"char1", "char2"} == set(report["retention"])
    for char, row in report["loss"].items():
        assert set(row) == {"base", "char1", "char2", "both"}
        assert row[char] < row["base"], (char, row)
        expected = (row["base"] - row["both"]) / (row["base"] - row[char])
        assert report["retention"][char] == pytest.approx(expected)


def test_demo_refuses_a_foreign_folder(tmp_path):
    (tmp_path / "mine.txt").write_text("keep me")
    result = CliRunner().invoke(main, ["demo", "--out", str(tmp_path), "--steps", "1", "-q"])
    assert result.exit_code == 1
    assert "not made by `slotsmith demo`" in result.output
    assert [p.name for p in tmp_path.iterdir()] == ["mine.txt"]


def test_cli_defaults_match_the_demo_settings():
    from slotsmith.demo.run import DemoSettings

    params = {p.name: p.default for p in main.commands["demo"].params}
    defaults = DemoSettings(out=None)
    assert (params["steps"], params["seed"]) == (defaults.steps, defaults.seed)
    assert (params["algorithm"], params["pools"]) == (defaults.algorithm, defaults.pools)


@pytest.mark.slow
def test_report_scores_the_samples_of_every_model(demo):
    out, printed = demo
    samples = json.loads(printed)["samples"]
    assert samples["sheet"] == "samples.png"
    assert set(samples["accuracy"]) == {"base", "char1", "char2", "spliced"}
    for row in samples["accuracy"].values():
        assert set(row) == {"char1", "char2"} and all(0 <= v <= 1 for v in row.values())
    from PIL import Image

    width, height = Image.open(out / "samples.png").size
    assert width > 4 * 64 and height > 12 * 64  # 4 model columns, 3 prompts x 4 seeds


@pytest.mark.slow  # the whole demo at its defaults: about a minute
def test_default_demo_splice_draws_each_character_on_its_own_prompt(tmp_path):
    result = CliRunner().invoke(main, ["demo", "--out", str(tmp_path / "demo-out"), "--json", "-q"])
    assert result.exit_code == 0, result.output
    accuracy = json.loads(result.output)["samples"]["accuracy"]
    assert accuracy["spliced"]["char1"] >= 0.75 and accuracy["spliced"]["char2"] >= 0.75, accuracy
    assert not (accuracy["base"]["char1"] >= 0.75 and accuracy["base"]["char2"] >= 0.75), accuracy


def test_slot_ff_is_capped_at_one_pool_for_v3():
    from slotsmith.demo.run import DemoSettings

    assert DemoSettings(out=None).slot_ff == 0.1
    assert DemoSettings(out=None, algorithm="v3").slot_ff == 0.1
    assert DemoSettings(out=None, algorithm="v3", pools=16).slot_ff == 1 / 16
    assert DemoSettings(out=None, algorithm="v3", pools=16, ff=0.01).slot_ff == 0.01


@pytest.mark.slow
def test_v3_demo_trains_sliced_slots(tmp_path):
    out = tmp_path / "demo-v3"
    args = ["demo", "--out", str(out), "--steps", str(STEPS), "--algorithm", "v3", "--pools", "16", "--json", "-q"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert report["settings"]["algorithm"] == "v3" and report["settings"]["ff"] == 1 / 16
    for ffid, char in enumerate(("char1", "char2"), start=1):
        m = read_slot(out / f"{char}.slot").manifest
        assert m.selection == {"algorithm": "v3", "ff": 1 / 16, "ffid": ffid, "num_pools": 16}
        assert all(e.rows is not None for e in m.entries)


@pytest.mark.slow
@pytest.mark.parametrize("task, in_dim, latent_channels, mode", [("i2v", 36, 16, "i2v"), ("ti2v", 48, 48, "ti2v")])
def test_image_to_video_demos_tell_the_same_story(tmp_path, monkeypatch, task, in_dim, latent_channels, mode):
    from slotsmith.demo import run

    # Fewer clips: encoding clips is what takes time here, and the story's steps are what is checked.
    monkeypatch.setattr(run, "IMAGES_PER_CHARACTER", 3)
    monkeypatch.setattr(run, "GENERIC_IMAGES", 6)
    out = tmp_path / "demo-out"
    result = CliRunner().invoke(main, ["demo", "--task", task, "--out", str(out), "--steps", "10", "--json", "-q"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert report["settings"]["task"] == task
    assert set(report["loss"]) == {"char1", "char2"} and set(report["retention"]) == {"char1", "char2"}
    with safe_open(str(out / "base.safetensors"), framework="numpy") as f:
        assert f.get_slice("patch_embedding.weight").get_shape()[1] == in_dim
    for char in ("char1", "char2"):
        index = json.loads((out / "data" / char / "cache" / "index.json").read_text())
        assert index["latent_channels"] == latent_channels and index["image_conditioning"]["mode"] == mode
        assert len(list((out / "data" / char / "videos").glob("*.mkv"))) == 3
        assert len(index["items"]) == 3 + 6
