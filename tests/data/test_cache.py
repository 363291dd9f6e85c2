"""The cache folder format: writers, index validation, the dataset."""

import json

import pytest
import torch
from helpers import disk_full

from slotsmith.data import cache
from slotsmith.errors import SlotsmithError


def _make(tmp_path, n=2, channels=4, text_dim=8, tokens=(3, 5)):
    items = []
    for i in range(n):
        lat = cache.write_latents(tmp_path, f"{i:032x}", torch.randn(channels, 2, 4, 4))
        txt = cache.write_text(tmp_path, f"{i + 100:032x}", torch.randn(tokens[i % len(tokens)], text_dim))
        items.append({"latents": lat, "text": txt, "caption": f"c{i}", "source": f"v{i}.mp4"})
    cache.write_index(tmp_path, items, channels, text_dim)
    return items


def test_round_trip_pads_context_and_keeps_values(tmp_path):
    latents = torch.randn(4, 2, 4, 4)
    context = torch.randn(7, 8)
    lat = cache.write_latents(tmp_path, "ab" * 16, latents)
    txt = cache.write_text(tmp_path, "cd" * 16, context)
    assert lat == f"latents/{'ab' * 16}.safetensors" and txt == f"text/{'cd' * 16}.safetensors"
    cache.write_index(tmp_path, [{"latents": lat, "text": txt}], 4, 8)
    ds = cache.CachedDataset(tmp_path)
    sample = ds[0]
    assert torch.equal(sample["latents"], latents)
    assert sample["context"].shape == (cache.TEXT_LEN, 8)
    assert torch.equal(sample["context"][:7], context)
    assert not sample["context"][7:].any()
    assert ds.latent_channels == 4 and ds.text_dim == 8


def test_repeats_expand_the_dataset(tmp_path):
    items = _make(tmp_path)
    items[1]["repeats"] = 3
    cache.write_index(tmp_path, items, 4, 8)
    assert len(cache.CachedDataset(tmp_path)) == 4
    assert json.loads((tmp_path / "index.json").read_text())["format"] == cache.CACHE_FORMAT


def test_no_temp_files_left(tmp_path):
    _make(tmp_path)
    assert not [p for p in tmp_path.rglob("*") if p.name.startswith(".")]


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda d: d.update(format="other/1"), "format"),
        (lambda d: d.update(latent_channels=0), "latent_channels"),
        (lambda d: d.update(items=[]), "no items"),
        (lambda d: d["items"][0].update(latents="latents/missing.safetensors"), "missing cache file"),
        (lambda d: d["items"][0].update(latents="../x.safetensors"), "bad path"),
        (lambda d: d["items"][0].update(repeats=0), "repeats"),
        (lambda d: d.update(latent_channels=5), "expected F32"),
        (lambda d: d.update(text_dim=9), "expected F32"),
        (lambda d: d["items"][0].update(text=d["items"][0]["latents"]), "has no tensor"),
    ],
)
def test_load_index_refuses_bad_caches(tmp_path, edit, message):
    _make(tmp_path)
    doc = json.loads((tmp_path / "index.json").read_text())
    edit(doc)
    (tmp_path / "index.json").write_text(json.dumps(doc))
    with pytest.raises(SlotsmithError, match=message):
        cache.load_index(tmp_path)


def test_missing_index_and_invalid_json(tmp_path):
    with pytest.raises(SlotsmithError) as e:
        cache.load_index(tmp_path / "nosuch")
    assert str(e.value) == f"{tmp_path / 'nosuch'}: no such cache folder"
    with pytest.raises(SlotsmithError, match="no cache index"):
        cache.load_index(tmp_path)
    (tmp_path / "index.json").write_text("{nope")
    with pytest.raises(SlotsmithError, match="index.json"):
        cache.load_index(tmp_path)


def test_writers_refuse_bad_input(tmp_path):
    with pytest.raises(SlotsmithError, match="hex"):
        cache.write_latents(tmp_path, "../evil", torch.zeros(4, 1, 2, 2))
    with pytest.raises(SlotsmithError, match="4 dimensions"):
        cache.write_latents(tmp_path, "ab", torch.zeros(4, 2, 2))
    with pytest.raises(SlotsmithError, match="tokens"):
        cache.write_text(tmp_path, "ab", torch.zeros(cache.TEXT_LEN + 1, 8))


def test_full_disk_is_a_clear_error_naming_the_file(tmp_path, monkeypatch):
    disk_full(monkeypatch)
    with pytest.raises(SlotsmithError, match=r"latents/ab\.safetensors: writing failed \(No space left on device\)"):
        cache.write_latents(tmp_path, "ab", torch.zeros(4, 1, 2, 2))
    with pytest.raises(SlotsmithError, match=r"index\.json: writing failed"):
        cache.write_index(tmp_path, [{"latents": "latents/ab.safetensors", "text": "text/ab.safetensors"}], 4, 8)
    assert not [p for p in tmp_path.rglob("*") if p.is_file()]


def test_cache_folder_that_cannot_be_made_is_a_clear_error(tmp_path):
    (tmp_path / "file").write_text("not a folder")
    with pytest.raises(SlotsmithError, match=r"file/latents/ab\.safetensors: writing failed \(Not a directory\)"):
        cache.write_latents(tmp_path / "file", "ab", torch.zeros(4, 1, 2, 2))


def _make_i2v(tmp_path, mode="i2v", clip_dim=6):
    """A two-item image-to-video cache: latents [4, 2, 4, 4], conditions and CLIP features that fit them."""
    channels = 4 + 4 if mode == "i2v" else 4
    frames = 2 if mode == "i2v" else 1
    items = _make(tmp_path)
    for i, item in enumerate(items):
        item["condition"] = cache.write_condition(tmp_path, f"{i + 200:032x}", torch.randn(channels, frames, 4, 4))
        if clip_dim:
            item["clip"] = cache.write_clip_embeds(tmp_path, f"{i + 300:032x}", torch.randn(5, clip_dim))
    conditioning = cache.ImageConditioning(mode, channels, clip_dim)
    cache.write_index(tmp_path, items, 4, 8, conditioning=conditioning)
    return items, conditioning


@pytest.mark.parametrize("mode, clip_dim", [("i2v", 6), ("i2v", None), ("ti2v", None)])
def test_image_conditioning_round_trip(tmp_path, mode, clip_dim):
    items, conditioning = _make_i2v(tmp_path, mode, clip_dim)
    doc = json.loads((tmp_path / "index.json").read_text())
    assert doc["format"] == "slotsmith-cache/2"
    assert doc["image_conditioning"] == {"mode": mode, "channels": conditioning.channels, "clip_dim": clip_dim}
    ds = cache.CachedDataset(tmp_path)
    assert ds.conditioning == conditioning
    sample = ds[1]
    assert sample["condition"].shape == (conditioning.channels, 2 if mode == "i2v" else 1, 4, 4)
    assert ("image_embeds" in sample) == bool(clip_dim)


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda d: d.update(image_conditioning={"mode": "v2v", "channels": 8}), "needs a mode"),
        (lambda d: d.update(image_conditioning={"mode": "i2v", "channels": 0}), "positive integers"),
        (lambda d: d["image_conditioning"].update(channels=9), "expected F32"),
        (lambda d: d["image_conditioning"].update(clip_dim=7), "expected F32"),
        (lambda d: d["items"][0].pop("clip"), "bad path None"),
        (lambda d: d["items"][1].pop("condition"), "bad path None"),
        (lambda d: d["items"][0].update(condition="condition/missing.safetensors"), "missing cache file"),
        (lambda d: d["image_conditioning"].update(mode="ti2v"), "does not fit the latents"),
        (lambda d: d.update(format="slotsmith-cache/3"), "is not one of"),
    ],
)
def test_load_index_refuses_bad_image_conditioning(tmp_path, edit, message):
    _make_i2v(tmp_path)
    doc = json.loads((tmp_path / "index.json").read_text())
    edit(doc)
    (tmp_path / "index.json").write_text(json.dumps(doc))
    with pytest.raises(SlotsmithError, match=message):
        cache.load_index(tmp_path)


def test_format_1_reads_as_text_to_video(tmp_path):
    _make(tmp_path)
    doc = json.loads((tmp_path / "index.json").read_text())
    doc["format"] = "slotsmith-cache/1"
    del doc["image_conditioning"]
    (tmp_path / "index.json").write_text(json.dumps(doc))
    ds = cache.CachedDataset(tmp_path)
    assert ds.conditioning is None and set(ds[0]) == {"latents", "context"}
