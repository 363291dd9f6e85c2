"""``slotsmith cache`` end to end on tiny models loaded by path, and ``ensure_cache``."""

from __future__ import annotations

import pytest
import yaml
from click.testing import CliRunner
from media import count_frames, write_image, write_video
from safetensors.torch import load_file

from slotsmith.cli import main
from slotsmith.data.cache import CachedDataset, load_index, source_path
from slotsmith.data.cache_builder import LISTED_PROBLEMS, BadItemsError, ensure_cache, run_cache
from slotsmith.errors import SlotsmithError


@pytest.fixture(scope="module")
def models(tiny_models):
    """The native encoder files, keyed by ``run_cache``'s argument names."""
    return {
        "vae": str(tiny_models["vae_pth"]),
        "t5": str(tiny_models["t5_pth"]),
        "tokenizer": str(tiny_models["tok"]),
    }


@pytest.fixture
def dataset(tmp_path):
    """Two images (one not square, bucketed) and two clips (chunked into 5-frame clips)."""
    (tmp_path / "imgs").mkdir()
    (tmp_path / "clips").mkdir()
    write_image(tmp_path / "imgs" / "a.png", 32, 32, seed=1)
    (tmp_path / "imgs" / "a.txt").write_text("a red cat")
    write_image(tmp_path / "imgs" / "b.jpg", 64, 32, seed=2)
    (tmp_path / "imgs" / "b.txt").write_text("a blue dog")
    write_video(tmp_path / "clips" / "v1.mp4", 10, seed=3)
    (tmp_path / "clips" / "v1.txt").write_text("a man walks")
    write_video(tmp_path / "clips" / "v2.mp4", 7, seed=4)
    (tmp_path / "clips" / "v2.txt").write_text("a woman runs")
    doc = {
        "cache_dir": "cache",
        "datasets": [
            {"image_directory": "imgs", "resolution": [32, 32], "enable_bucket": True, "repeats": 2},
            {"video_directory": "clips", "resolution": [32, 32], "target_frames": 5, "frame_extraction": "chunk"},
        ],
    }
    (tmp_path / "data.yaml").write_text(yaml.safe_dump(doc))
    return tmp_path


def _cli(models, data, *extra):
    args = ["cache", "--data", str(data), "--vae", models["vae"], "--t5", models["t5"]]
    args += ["--tokenizer", models["tokenizer"], "-q", *extra]
    return CliRunner().invoke(main, args)


def _cache(models, data, **kw):
    return run_cache(data, models["vae"], models["t5"], models["tokenizer"], progress=False, **kw)


def test_cache_command_caches_images_and_clips_with_vae_shapes(models, dataset):
    result = _cli(models, dataset / "data.yaml")
    assert result.exit_code == 0, result.output
    index = load_index(dataset / "cache")
    assert index["latent_channels"] == 16 and index["text_dim"] == 32
    by_source = {}
    for item in index["items"]:
        by_source.setdefault(item["source"].rsplit("/", 1)[-1], []).append(item)
    # v1 has 10 frames -> two 5-frame chunks; v2 has 7 -> one.
    assert count_frames(dataset / "clips" / "v1.mp4") == 10
    assert {k: len(v) for k, v in by_source.items()} == {"a.png": 1, "b.jpg": 1, "v1.mp4": 2, "v2.mp4": 1}
    shapes = {k: [tuple(load_file(str(dataset / "cache" / i["latents"]))["latents"].shape) for i in v]
              for k, v in by_source.items()}
    assert shapes["a.png"] == [(16, 1, 4, 4)]
    assert shapes["b.jpg"] == [(16, 1, 2, 6)]  # 2:1 image -> 48x16 bucket (3:1 beats 1:1 and 4:1) -> /8
    assert shapes["v1.mp4"] == [(16, (5 - 1) // 4 + 1, 4, 4)] * 2
    assert by_source["a.png"][0]["repeats"] == 2 and by_source["v1.mp4"][0]["repeats"] == 1
    assert by_source["a.png"][0]["caption"] == "a red cat"
    context = load_file(str(dataset / "cache" / by_source["a.png"][0]["text"]))["context"]
    assert context.shape == (4, 32)  # "a red cat" + </s>
    assert "5 items" in result.output and "latents 5 encoded" in result.output
    data = CachedDataset(dataset / "cache")
    assert len(data) == 7  # images twice
    assert data[0]["context"].shape == (512, 32)


def test_rerun_caches_nothing_and_caption_edit_reencodes_only_its_text(models, dataset):
    first = _cache(models, dataset / "data.yaml")
    assert (first.latents_encoded, first.texts_encoded) == (5, 4)
    files = {p: p.stat().st_mtime_ns for p in (dataset / "cache").rglob("*.safetensors")}
    again = _cache(models, dataset / "data.yaml")
    assert (again.latents_encoded, again.texts_encoded, again.latents_reused, again.texts_reused) == (0, 0, 5, 4)
    assert {p: p.stat().st_mtime_ns for p in (dataset / "cache").rglob("*.safetensors")} == files

    (dataset / "clips" / "v1.txt").write_text("a man walks slowly")
    edited = _cache(models, dataset / "data.yaml")
    assert (edited.latents_encoded, edited.texts_encoded) == (0, 1)
    items = [i for i in load_index(dataset / "cache")["items"] if i["source"].endswith("v1.mp4")]
    assert [i["caption"] for i in items] == ["a man walks slowly"] * 2
    assert load_file(str(dataset / "cache" / items[0]["text"]))["context"].shape == (5, 32)


def test_changed_media_or_settings_reencode_only_what_they_affect(models, dataset):
    _cache(models, dataset / "data.yaml")
    write_image(dataset / "imgs" / "a.png", 32, 32, seed=99)
    assert (_cache(models, dataset / "data.yaml").latents_encoded) == 1
    doc = yaml.safe_load((dataset / "data.yaml").read_text())
    doc["datasets"][1]["frame_extraction"] = "head"
    (dataset / "data.yaml").write_text(yaml.safe_dump(doc))
    report = _cache(models, dataset / "data.yaml")
    # Head of each video: new keys for the videos (settings changed), images untouched.
    assert (report.latents_encoded, report.latents_reused, report.items) == (2, 2, 4)


@pytest.fixture
def bad_dataset(dataset):
    write_image(dataset / "imgs" / "nocap.png")
    write_image(dataset / "imgs" / "trunc.png", 64, 64)
    raw = (dataset / "imgs" / "trunc.png").read_bytes()
    (dataset / "imgs" / "trunc.png").write_bytes(raw[: len(raw) // 2])
    (dataset / "imgs" / "trunc.txt").write_text("a cat")
    (dataset / "clips" / "junk.mp4").write_bytes(b"not a video at all" * 50)
    (dataset / "clips" / "junk.txt").write_text("a dog")
    write_video(dataset / "clips" / "short.mp4", 3)
    (dataset / "clips" / "short.txt").write_text("a dog")
    return dataset


def test_each_bad_item_is_reported_by_file_and_the_run_fails(models, bad_dataset):
    result = _cli(models, bad_dataset / "data.yaml")
    assert result.exit_code == 1
    lines = [line for line in result.output.splitlines() if line.startswith("error: ")]
    assert any("nocap.png" in line and "missing caption" in line for line in lines)
    assert any("trunc.png" in line and "unreadable image" in line for line in lines)
    assert any("junk.mp4" in line and "unreadable video" in line for line in lines)
    assert any("short.mp4" in line and "too short" in line for line in lines)
    assert lines == result.output.splitlines()  # every line stands alone as an error line
    assert lines[-1] == "error: 4 bad item(s); fix them or pass --skip-bad to leave them out"
    assert "Traceback" not in result.output
    assert not (bad_dataset / "cache" / "index.json").exists()


def test_missing_caption_fails_before_any_encoding(models, bad_dataset):
    result = _cli(models, bad_dataset / "data.yaml")
    assert result.exit_code == 1
    # Only the caption check runs before the encoders load: nothing was written.
    assert not (bad_dataset / "cache").exists()


def test_skip_bad_leaves_bad_items_out_and_lists_them(models, bad_dataset):
    result = _cli(models, bad_dataset / "data.yaml", "--skip-bad")
    assert result.exit_code == 0, result.output
    skipped = [line for line in result.output.splitlines() if line.startswith("skipped: ")]
    assert len(skipped) == 4
    sources = {i["source"].rsplit("/", 1)[-1] for i in load_index(bad_dataset / "cache")["items"]}
    assert sources == {"a.png", "b.jpg", "v1.mp4", "v2.mp4"}


def test_wrong_resolution_spec_is_reported_with_the_key(models, dataset):
    doc = yaml.safe_load((dataset / "data.yaml").read_text())
    doc["datasets"][0]["resolution"] = [30, 32]
    (dataset / "data.yaml").write_text(yaml.safe_dump(doc))
    result = _cli(models, dataset / "data.yaml")
    assert result.exit_code == 1
    assert "data.yaml: datasets[0].resolution: 30x32" in result.output


def test_ensure_cache_without_encoders_says_what_is_missing(models, dataset):
    data = dataset / "data.yaml"
    with pytest.raises(SlotsmithError, match="a.png: not cached"):
        ensure_cache(data)
    with pytest.raises(SlotsmithError, match="missing --t5, --tokenizer"):
        ensure_cache(data, vae=models["vae"])
    assert ensure_cache(data, progress=False, **models) == (dataset / "cache", [])
    assert ensure_cache(data) == (dataset / "cache", [])
    (dataset / "imgs" / "b.txt").write_text("a green dog")
    write_image(dataset / "imgs" / "c.png")
    (dataset / "imgs" / "c.txt").write_text("new")
    with pytest.raises(SlotsmithError) as e:
        ensure_cache(data)
    message = str(e.value)
    assert "b.jpg: caption changed" in message and "c.png: not cached" in message
    assert "--vae, --t5 and --tokenizer" in message
    ensure_cache(data, progress=False, **models)
    assert ensure_cache(data) == (dataset / "cache", [])


@pytest.mark.parametrize(
    "device, message",
    [
        ("banana", "--device 'banana' is not a torch device (e.g. cpu, cuda, cuda:1)"),
        ("cuda:x", "--device 'cuda:x' is not a torch device (e.g. cpu, cuda, cuda:1)"),
        ("cuda", "--device cuda: this machine or torch build has no cuda device; use --device cpu"),
    ],
)
def test_bad_device_is_refused_before_any_work(models, dataset, monkeypatch, device, message):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # as on a CPU-only torch
    result = _cli(models, dataset / "data.yaml", "--device", device)
    assert result.exit_code == 1
    assert result.output == f"error: {message}\n"
    assert not (dataset / "cache").exists()


def test_skip_bad_without_encoders_leaves_out_what_cache_skip_bad_left_out(models, bad_dataset):
    data = bad_dataset / "data.yaml"
    _cache(models, data, skip_bad=True)
    with pytest.raises(BadItemsError, match="nocap.png: missing caption"):
        ensure_cache(data)
    cache_dir, bad = ensure_cache(data, skip_bad=True)
    assert cache_dir == bad_dataset / "cache"
    assert sorted(b.path.name for b in bad) == ["junk.mp4", "nocap.png", "short.mp4", "trunc.png"]
    # A new good file is still missing from the cache, bad ones or not.
    write_image(bad_dataset / "imgs" / "new.png")
    (bad_dataset / "imgs" / "new.txt").write_text("new")
    with pytest.raises(SlotsmithError, match="new.png: not cached") as e:
        ensure_cache(data, skip_bad=True)
    assert "trunc.png" not in str(e.value)
    # Without skip_bad, what the cache left out is bad (read as `cache` reads it), and the error says so.
    for name in ("nocap.png", "new.png", "new.txt"):
        (bad_dataset / "imgs" / name).unlink()
    with pytest.raises(BadItemsError) as e:
        ensure_cache(data)
    assert sorted(b.path.name for b in e.value.bad) == ["junk.mp4", "short.mp4", "trunc.png"]


def test_bad_items_error_is_lines_that_stand_alone(bad_dataset):
    with pytest.raises(BadItemsError) as e:
        ensure_cache(bad_dataset / "data.yaml")
    *items, last = str(e.value).splitlines()
    assert items[0] == f"{bad_dataset / 'imgs' / 'nocap.png'}: missing caption (nocap.txt absent or empty)"
    assert all(line.startswith(f"{bad_dataset}/") for line in items)
    assert last == f"{len(items)} bad item(s); fix them or pass --skip-bad to leave them out"


def test_ensure_cache_reports_every_bad_item_at_once_as_cache_does(models, bad_dataset):
    """Unreadable media as well as missing captions, cached before or not: one run shows them all."""
    data = bad_dataset / "data.yaml"
    with pytest.raises(BadItemsError) as by_cache:
        _cache(models, data)
    assert len(by_cache.value.bad) == 4
    for cached in (False, True):
        if cached:
            _cache(models, data, skip_bad=True)  # the good items cached, the bad ones left out
        with pytest.raises(BadItemsError) as e:
            ensure_cache(data)
        assert str(e.value) == str(by_cache.value)


def test_stale_cache_error_lists_the_first_problems_then_the_count(dataset):
    for i in range(12):
        write_image(dataset / "imgs" / f"n{i:02d}.png")
        (dataset / "imgs" / f"n{i:02d}.txt").write_text("new")
    with pytest.raises(SlotsmithError) as e:
        ensure_cache(dataset / "data.yaml")
    *problems, last = str(e.value).splitlines()
    assert len(problems) == LISTED_PROBLEMS
    assert all(line.startswith(str(dataset)) and line.endswith(": not cached") for line in problems)
    assert last.startswith(f"the cache {dataset / 'cache'} does not match {dataset / 'data.yaml'}: ")
    assert f"{4 + 12} problem(s), the first {LISTED_PROBLEMS} listed above" in last


def test_a_file_listed_by_two_datasets_is_complete_once_cached(models, tmp_path):
    (tmp_path / "imgs").mkdir()
    write_image(tmp_path / "imgs" / "a.png", 32, 32, seed=1)
    (tmp_path / "imgs" / "a.txt").write_text("a red cat")
    (tmp_path / "list.jsonl").write_text('{"path": "imgs/a.png", "caption": "a blue dog"}\n')
    doc = {"datasets": [{"image_directory": "imgs", "resolution": [32, 32]},
                        {"jsonl_file": "list.jsonl", "resolution": [32, 32]}]}
    (tmp_path / "data.yaml").write_text(yaml.safe_dump(doc))
    ensure_cache(tmp_path / "data.yaml", progress=False, **models)
    assert ensure_cache(tmp_path / "data.yaml") == (tmp_path / "cache", [])


def test_a_moved_dataset_folder_still_matches_its_cache(models, dataset, tmp_path_factory):
    _cache(models, dataset / "data.yaml")
    index = load_index(dataset / "cache")
    assert not any(item["source"].startswith("/") for item in index["items"])
    moved = tmp_path_factory.mktemp("elsewhere") / "moved"
    dataset.rename(moved)
    assert ensure_cache(moved / "data.yaml") == (moved / "cache", [])
    index = load_index(moved / "cache")
    assert {source_path(moved / "cache", index, item) for item in index["items"]} == {
        moved / "imgs" / "a.png", moved / "imgs" / "b.jpg", moved / "clips" / "v1.mp4", moved / "clips" / "v2.mp4"
    }
