"""Dataset YAML -> cache -> train -> slot -> splice -> verify, on tiny models, through the CLI."""

import json

import pytest
import torch
import yaml
from click.testing import CliRunner
from media import write_image
from safetensors import safe_open
from safetensors.torch import save_file

from slotsmith.cli import main
from slotsmith.demo import tiny
from slotsmith.training import wan

torch.set_num_threads(1)


def _run(*args):
    result = CliRunner().invoke(main, [str(a) for a in args])
    return result


@pytest.fixture(scope="module")
def world(tmp_path_factory, tiny_models):
    root = tmp_path_factory.mktemp("e2e")
    torch.manual_seed(0)
    base = root / "base" / "dit.safetensors"
    base.parent.mkdir()
    model = wan.build_model(tiny.TINY_CONFIG, tiny.TINY_HEAD_DIM)
    save_file({k: v.contiguous() for k, v in wan.native_state_dict(model).items()}, base)
    (base.parent / "config.json").write_text(json.dumps({"attention_head_dim": tiny.TINY_HEAD_DIM}))
    data = root / "data"
    (data / "imgs").mkdir(parents=True)
    for i in range(3):
        write_image(data / "imgs" / f"{i}.png", 32, 32, seed=i)
        (data / "imgs" / f"{i}.txt").write_text(f"character1 picture {i}")
    (data / "data.yaml").write_text(yaml.safe_dump({"datasets": [{"image_directory": "imgs", "resolution": [32, 32]}]}))
    encoders = [
        "--vae", tiny_models["vae_pth"],
        "--t5", tiny_models["t5_pth"],
        "--tokenizer", tiny_models["tok"],
    ]
    return {"root": root, "base": base, "data": data / "data.yaml", "encoders": encoders}


def test_train_without_cache_or_encoders_says_what_is_missing(world, tmp_path):
    result = _run("train", "-b", world["base"], "--data", world["data"], "--ff", 0.05, "--ffid", 1,
                  "--steps", 1, "-o", tmp_path / "x.slot", "-q")
    assert result.exit_code == 1
    assert "not cached" in result.output and "--vae, --t5 and --tokenizer" in result.output
    assert not (tmp_path / "x.slot").exists()


def test_yaml_to_verified_splice(world, tmp_path):
    out = tmp_path / "char1.slot"
    result = _run("train", "-b", world["base"], "--data", world["data"], *world["encoders"],
                  "--ff", 0.05, "--ffid", 1, "--steps", 3, "--lr", 1e-3, "-o", out, "-q")
    assert result.exit_code == 0, result.output
    # A second run finds the cache complete and needs no encoders.
    again = _run("train", "-b", world["base"], "--data", world["data"], "--ff", 0.05, "--ffid", 2,
                 "--steps", 2, "--lr", 1e-3, "-o", tmp_path / "char2.slot", "-q")
    assert again.exit_code == 0, again.output

    spliced = tmp_path / "spliced.safetensors"
    result = _run("splice", world["base"], out, tmp_path / "char2.slot", "-o", spliced, "-q")
    assert result.exit_code == 0, result.output
    with safe_open(str(spliced), "pt") as f, safe_open(str(world["base"]), "pt") as b, safe_open(str(out), "pt") as s:
        slot_names = set(s.keys())
        assert slot_names
        for name in slot_names:
            assert torch.equal(f.get_tensor(name), s.get_tensor(name))
            assert not torch.equal(f.get_tensor(name), b.get_tensor(name))

    result = _run("verify", out, tmp_path / "char2.slot", spliced, "--base", world["base"])
    assert result.exit_code == 0, result.output
