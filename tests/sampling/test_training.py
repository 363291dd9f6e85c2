"""Samples during training: written at the start, every N steps and the end; training unchanged by them."""

from __future__ import annotations

import pytest
import torch

from slotsmith.data import cache
from slotsmith.errors import SlotsmithError
from slotsmith.sampling.generate import read_metadata
from slotsmith.sampling.training import samples_dir
from slotsmith.train import TrainSettings
from slotsmith.training import run as train_run
from slotsmith.training.run import train


@pytest.fixture(scope="module")
def world(tmp_path_factory, tiny_models, tiny_base):
    root = tmp_path_factory.mktemp("train-samples")
    torch.manual_seed(0)
    base = tiny_base
    items = []
    for i in range(4):
        lat = cache.write_latents(root / "cache", f"{i:032x}", torch.randn(16, 1, 4, 4))
        txt = cache.write_text(root / "cache", f"{i:032x}", torch.randn(3 + i, 32))
        items.append({"latents": lat, "text": txt})
    cache.write_index(root / "cache", items, 16, 32)
    prompts = root / "prompts.txt"
    prompts.write_text("a red cat sits --w 32 --h 32 --s 2 --d 1\na dog --w 32 --h 32 --s 2 --g 1\n", encoding="utf-8")
    return {"base": base, "cache": root / "cache", "prompts": prompts, **tiny_models}


def _settings(world, out, **kw):
    return TrainSettings(base=str(world["base"]), cache=str(world["cache"]), out=str(out), ff=0.05, ffid=1, steps=5,
                         lr=1e-3, batch_size=2, quiet=True, **kw)


def _sampling(world):
    return {"sample_prompts": str(world["prompts"]), "vae": str(world["vae_dir"]), "t5": str(world["t5_dir"]),
            "tokenizer": str(world["tok"])}


@pytest.mark.slow  # trains or samples several models
def test_sampling_does_not_change_the_trained_slot_and_writes_each_due_step(world, tmp_path):
    plain, sampled = tmp_path / "a" / "x.slot", tmp_path / "b" / "x.slot"
    plain.parent.mkdir(), sampled.parent.mkdir()
    train(_settings(world, plain))
    train(_settings(world, sampled, sample_every=2, **_sampling(world)))
    from safetensors.torch import load_file

    from slotsmith.slot import read_slot

    digests = [[(e.name, e.digest) for e in read_slot(p).manifest.entries] for p in (plain, sampled)]
    assert digests[0] == digests[1]

    one, two = load_file(plain), load_file(sampled)
    assert one.keys() == two.keys() and all(torch.equal(one[k], two[k]) for k in one)
    folder = samples_dir(sampled)
    assert sorted(p.name for p in folder.iterdir()) == ["step000000", "step000002", "step000004", "step000005"]
    for step in folder.iterdir():
        files = sorted(step.glob("*.png"))
        assert len(files) == 2
        meta = read_metadata(files[0])
        assert meta["step"] == int(step.name[4:]) and meta["training"]["slot"] == "x.slot"
        assert meta["prompt"] == "a red cat sits" and meta["seed"] == 1
    assert not samples_dir(plain).exists()


def test_bad_prompt_file_fails_before_the_base_loads(world, tmp_path, monkeypatch):
    bad = tmp_path / "bad.txt"
    bad.write_text("a cat --f 2\n", encoding="utf-8")

    def no_load(*args, **kwargs):
        raise AssertionError("the base loaded before the prompt file was checked")

    monkeypatch.setattr(train_run, "load_for_training", no_load)
    with pytest.raises(SlotsmithError, match=f"{bad}:1: frames must be 1 or 4N"):
        train(_settings(world, tmp_path / "x.slot", **{**_sampling(world), "sample_prompts": str(bad)}))


@pytest.mark.parametrize(
    "kw, message",
    [
        ({"sample_prompts": "p.txt"}, "--sample-prompts needs --vae, --t5 and --tokenizer"),
        ({"sample_every": 3}, "--sample-every goes with --sample-prompts"),
        ({"sample_every": -1, "sample_prompts": "p", "vae": "v", "t5": "t", "tokenizer": "k"},
         "--sample-every -1 is out of range"),
    ],
)
def test_sampling_options_are_checked(world, tmp_path, kw, message):
    with pytest.raises(SlotsmithError, match=message):
        _settings(world, tmp_path / "x.slot", **kw).validate()
