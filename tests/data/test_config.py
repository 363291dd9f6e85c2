"""Dataset YAML validation, media discovery, buckets, frame extraction, reading."""

from __future__ import annotations

import math

import pytest
import yaml
from media import write_audio_only, write_image, write_video

from slotsmith.data.config import check_align, load_data_config
from slotsmith.data.media import (
    bucket_size,
    clip_ranges,
    discover,
    read_clips,
    resample_indices,
)
from slotsmith.errors import SlotsmithError


def _yaml(tmp_path, doc: dict):
    path = tmp_path / "data.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


@pytest.fixture
def folders(tmp_path):
    (tmp_path / "imgs").mkdir()
    (tmp_path / "clips").mkdir()
    return tmp_path


def test_valid_config_resolves_paths_and_general_defaults(folders):
    path = _yaml(
        folders,
        {
            "cache_dir": "out/cache",
            "general": {"resolution": [64, 32], "repeats": 3},
            "datasets": [
                {"image_directory": "imgs"},
                {"video_directory": "clips", "target_frames": [5, 9], "frame_extraction": "chunk", "repeats": 1},
            ],
        },
    )
    config = load_data_config(path)
    assert config.cache_dir == (folders / "out" / "cache").resolve()
    images, videos = config.datasets
    assert images.kind == "image" and images.path == (folders / "imgs").resolve()
    assert images.resolution == (64, 32) and images.repeats == 3
    assert videos.target_frames == (5, 9) and videos.repeats == 1 and videos.frame_extraction == "chunk"
    assert images.musubi_cache is None and videos.musubi_cache is None  # only a musubi-tuner TOML has one


@pytest.mark.parametrize(
    ("dataset", "general", "key", "words"),
    [
        ({"image_directory": "imgs", "resolution": [60, 32]}, {}, "datasets[0].resolution", "multiples of 16"),
        ({"image_directory": "imgs", "resolution": "512"}, {}, "datasets[0].resolution", "[width, height]"),
        ({"image_directory": "imgs"}, {"resolution": [0, 32]}, "general.resolution", "multiples of 16"),
        ({"image_directory": "imgs"}, {}, "datasets[0].resolution", "missing"),
        ({"video_directory": "clips", "resolution": [32, 32], "target_frames": 6}, {}, "datasets[0].target_frames", "4N+1"),
        ({"video_directory": "clips", "resolution": [32, 32], "frame_extraction": "random"}, {}, "datasets[0].frame_extraction", "head"),
        ({"image_directory": "imgs", "resolution": [32, 32], "repeats": 0}, {}, "datasets[0].repeats", "positive"),
        ({"image_directory": "imgs", "resolution": [32, 32], "batch_size": 1.5}, {}, "datasets[0].batch_size", "positive"),
        ({"image_directory": "imgs", "resolution": [32, 32], "bucket_no_upscale": True}, {}, "datasets[0].bucket_no_upscale", "enable_bucket"),
        ({"image_directory": "imgs", "resolution": [32, 32], "resolutoin": 1}, {}, "datasets[0].resolutoin", "unknown key"),
        ({"image_directory": "nope", "resolution": [32, 32]}, {}, "datasets[0].image_directory", "not a folder"),
        ({"image_directory": "imgs", "video_directory": "clips"}, {}, "datasets[0]", "exactly one"),
        ({"video_directory": "clips", "resolution": [32, 32], "source_fps": -1}, {}, "datasets[0].source_fps", "positive"),
        ({"image_directory": "imgs", "resolution": [32, 32]}, {"repeat": 2}, "general.repeat", "unknown key"),
    ],
)
def test_config_errors_name_the_file_and_key(folders, dataset, general, key, words):
    path = _yaml(folders, {"general": general, "datasets": [dataset]})
    with pytest.raises(SlotsmithError) as e:
        load_data_config(path)
    assert str(e.value).startswith(f"{path}: {key}:")
    assert words in str(e.value)


def test_config_must_have_datasets_and_be_yaml(tmp_path):
    path = tmp_path / "data.yaml"
    path.write_text("cache_dir: c\n")
    with pytest.raises(SlotsmithError, match=r"datasets: must be a non-empty list"):
        load_data_config(path)
    path.write_text("datasets: [\n")
    with pytest.raises(SlotsmithError, match="not valid YAML"):
        load_data_config(path)
    with pytest.raises(SlotsmithError, match="no such file"):
        load_data_config(tmp_path / "absent.yaml")


def test_discover_pairs_captions_and_reports_missing_ones(folders):
    write_image(folders / "imgs" / "a.png")
    (folders / "imgs" / "a.txt").write_text("  a red cat \n")
    write_image(folders / "imgs" / "b.jpg")
    write_image(folders / "imgs" / "c.png")
    (folders / "imgs" / "c.txt").write_text("   \n")
    (folders / "imgs" / "notes.md").write_text("ignored")
    config = load_data_config(_yaml(folders, {"datasets": [{"image_directory": "imgs", "resolution": [32, 32]}]}))
    sources, bad = discover(config)
    assert [(s.path.name, s.caption) for s in sources] == [("a.png", "a red cat")]
    assert sorted(b.path.name for b in bad) == ["b.jpg", "c.png"]
    assert all("missing caption" in b.problem for b in bad)


def test_discover_reads_jsonl_and_reports_each_bad_line(folders):
    write_image(folders / "imgs" / "a.png")
    write_video(folders / "clips" / "v.mp4", 5)
    lines = [
        '{"path": "imgs/a.png", "caption": "a cat"}',
        '{"path": "clips/v.mp4", "caption": "a dog runs"}',
        '{"path": "imgs/missing.png", "caption": "x"}',
        '{"path": "imgs/a.png"}',
        "not json",
        "",
    ]
    (folders / "list.jsonl").write_text("\n".join(lines))
    config = load_data_config(
        _yaml(folders, {"datasets": [{"jsonl_file": "list.jsonl", "resolution": [32, 32], "target_frames": 5}]})
    )
    sources, bad = discover(config)
    assert [(s.path.name, s.is_video) for s in sources] == [("a.png", False), ("v.mp4", True)]
    problems = [str(b) for b in bad]
    assert len(problems) == 3
    assert any("missing.png" in p and "no such file" in p for p in problems)
    assert any("a.png" in p and "missing caption" in p for p in problems)
    assert any("list.jsonl:5" in p and "not valid JSON" in p for p in problems)


def test_jsonl_line_that_is_not_utf8_is_one_bad_item(folders):
    write_image(folders / "imgs" / "a.png")
    good = b'{"path": "imgs/a.png", "caption": "a cat"}'
    latin1 = '{"path": "imgs/a.png", "caption": "caf\xe9"}'.encode("latin-1")
    (folders / "list.jsonl").write_bytes(good + b"\n" + latin1)
    config = load_data_config(_yaml(folders, {"datasets": [{"jsonl_file": "list.jsonl", "resolution": [32, 32]}]}))
    sources, bad = discover(config)
    assert [s.caption for s in sources] == ["a cat"]
    assert [str(b) for b in bad] == [f"{folders / 'list.jsonl'}:2: not valid UTF-8"]


def _spec(folders, **kw):
    doc = {"datasets": [{"image_directory": "imgs", "resolution": [64, 64], **kw}]}
    return load_data_config(_yaml(folders, doc)).datasets[0]


def test_without_buckets_every_file_gets_the_resolution(folders):
    spec = _spec(folders, resolution=[48, 32])
    assert bucket_size(1000, 100, spec) == (48, 32)
    assert bucket_size(10, 10, spec) == (48, 32)


@pytest.mark.parametrize(("w", "h"), [(640, 360), (360, 640), (500, 500), (1000, 250), (300, 1200)])
def test_buckets_keep_the_area_and_follow_the_aspect_ratio(folders, w, h):
    spec = _spec(folders, enable_bucket=True)
    bw, bh = bucket_size(w, h, spec)
    assert bw % 16 == 0 and bh % 16 == 0
    assert bw * bh <= 64 * 64
    # The chosen bucket is at least as close in aspect ratio as the square one
    # and as the two 16-pixel neighbours of itself.
    err = abs(math.log(bw / bh) - math.log(w / h))
    assert err <= abs(math.log(w / h)) + 1e-9
    for nw in (bw - 16, bw + 16):
        nh = (64 * 64) // nw // 16 * 16 if nw > 0 else 0
        if nw > 0 and nh > 0:
            assert err <= abs(math.log(nw / nh) - math.log(w / h)) + 1e-9


def test_bucket_no_upscale_keeps_small_files_small(folders):
    spec = _spec(folders, enable_bucket=True, bucket_no_upscale=True)
    assert bucket_size(40, 20, spec) == (32, 16)
    assert bucket_size(640, 640, spec) == (64, 64)
    with pytest.raises(SlotsmithError, match="smaller than 16"):
        bucket_size(40, 10, spec)


def test_clip_ranges_head_chunk_uniform(folders):
    (folders / "clips").mkdir(exist_ok=True)

    def spec(**kw):
        doc = {"datasets": [{"video_directory": "clips", "resolution": [32, 32], **kw}]}
        return load_data_config(_yaml(folders, doc)).datasets[0]

    assert clip_ranges(20, spec(target_frames=5)) == [(0, 5)]
    assert clip_ranges(20, spec(target_frames=[5, 9], frame_extraction="chunk")) == [
        (0, 5), (5, 10), (10, 15), (15, 20), (0, 9), (9, 18)
    ]
    assert clip_ranges(20, spec(target_frames=5, frame_extraction="uniform", frame_sample=3)) == [
        (0, 5), (8, 13), (15, 20)
    ]
    assert clip_ranges(4, spec(target_frames=5)) == []
    assert clip_ranges(7, spec(target_frames=[5, 9])) == [(0, 5)]


def test_resample_indices_drop_frames_to_16_fps():
    assert resample_indices(5, None) == [0, 1, 2, 3, 4]
    assert resample_indices(9, 32) == [0, 2, 4, 6, 8]
    out = resample_indices(31, 30)  # one second at 30 fps -> 16 frames plus the last
    assert len(out) == 17 and out[0] == 0 and out[-1] == 30
    assert all(b > a for a, b in zip(out, out[1:]))


def test_read_image_and_video_give_pixels_in_range(folders):
    write_image(folders / "imgs" / "a.png", 80, 40)
    (folders / "imgs" / "a.txt").write_text("a cat")
    write_video(folders / "clips" / "v.mp4", 12, 48, 32)
    (folders / "clips" / "v.txt").write_text("a dog")
    doc = {
        "datasets": [
            {"image_directory": "imgs", "resolution": [32, 32], "enable_bucket": True},
            {"video_directory": "clips", "resolution": [32, 32], "target_frames": 5, "frame_extraction": "chunk"},
        ]
    }
    sources, bad = discover(load_data_config(_yaml(folders, doc)))
    assert not bad
    (image,) = read_clips(sources[0])
    assert tuple(image.pixels.shape) == (3, 1, 16, 48)  # 2:1 file -> the 3:1 or 48x16 bucket of area <= 32*32
    assert image.pixels.min() >= -1 and image.pixels.max() <= 1
    clips = read_clips(sources[1])
    assert [c.frames for c in clips] == [[0, 1, 2, 3, 4], [5, 6, 7, 8, 9]]
    assert all(tuple(c.pixels.shape) == (3, 5, 32, 32) for c in clips)
    # Frames differ in shade: a clip's frames must not all be the same one.
    assert (clips[0].pixels[:, 0] - clips[0].pixels[:, 1]).abs().mean() > 0.05


def test_unreadable_and_short_media_raise_clear_errors(folders):
    write_image(folders / "imgs" / "t.png", 64, 64)
    data = (folders / "imgs" / "t.png").read_bytes()
    (folders / "imgs" / "t.png").write_bytes(data[: len(data) // 2])
    (folders / "imgs" / "t.txt").write_text("x")
    write_video(folders / "clips" / "short.mp4", 3)
    (folders / "clips" / "short.txt").write_text("x")
    (folders / "clips" / "junk.mp4").write_bytes(b"\x00" * 500)
    (folders / "clips" / "junk.txt").write_text("x")
    write_audio_only(folders / "clips" / "sound.mkv")
    (folders / "clips" / "sound.txt").write_text("x")
    doc = {
        "datasets": [
            {"image_directory": "imgs", "resolution": [32, 32]},
            {"video_directory": "clips", "resolution": [32, 32], "target_frames": 5},
        ]
    }
    sources, _ = discover(load_data_config(_yaml(folders, doc)))
    errors = {}
    for s in sources:
        with pytest.raises(SlotsmithError) as e:
            read_clips(s)
        errors[s.path.name] = str(e.value)
    assert "unreadable image" in errors["t.png"]
    assert "unreadable video" in errors["junk.mp4"]
    assert "too short: 3 frames" in errors["short.mp4"]
    assert errors["sound.mkv"] == "unreadable video: no video stream"


def test_check_align_rechecks_sizes_without_reading_the_yaml_again(folders):
    path = _yaml(folders, {"datasets": [{"image_directory": "imgs", "resolution": [48, 32]}]})
    config = load_data_config(path)
    path.unlink()  # the check works from the loaded config alone
    check_align(config, 16)
    with pytest.raises(SlotsmithError, match=r"datasets\[0\].resolution: 48x32: .*multiples of 32"):
        check_align(config, 32)


def test_clip_ranges_slide_and_full_as_musubi_draws_them(folders):
    """musubi-tuner's own diagrams: a 40-frame video; full on videos of 20, 25 and 35 frames."""
    (folders / "clips").mkdir(exist_ok=True)

    def spec(**kw):
        doc = {"datasets": [{"video_directory": "clips", "resolution": [32, 32], **kw}]}
        return load_data_config(_yaml(folders, doc)).datasets[0]

    slide = spec(target_frames=[1, 13, 25], frame_extraction="slide", frame_stride=10)
    assert clip_ranges(40, slide) == [
        (0, 1), (10, 11), (20, 21), (30, 31), (0, 13), (10, 23), (20, 33), (0, 25), (10, 35)
    ]
    full = spec(frame_extraction="full", max_frames=31)
    assert [clip_ranges(n, full) for n in (20, 25, 35)] == [[(0, 17)], [(0, 25)], [(0, 29)]]
    # The new settings enter cache keys only where they act: older caches of head/chunk/uniform stay valid.
    assert "frame_stride" in slide.settings() and "max_frames" not in slide.settings()
    assert not {"frame_stride", "max_frames"} & set(spec(target_frames=5).settings())


MUSUBI_TOML = """
# general configurations
[general]
resolution = [32, 32]
caption_extension = ".txt"
batch_size = 2
enable_bucket = true
bucket_no_upscale = false

[[datasets]]
image_directory = "imgs"
cache_directory = "cache/imgs"
num_repeats = 2

[[datasets]]
video_jsonl_file = "list.jsonl"
target_frames = [1, 5]
frame_extraction = "slide"
frame_stride = 4
cache_directory = "cache/clips"

[[datasets]]
video_directory = "clips"
frame_extraction = "full"
max_frames = 45
"""


def test_a_musubi_dataset_toml_maps_every_key(folders):
    (folders / "list.jsonl").write_text('{"video_path": "clips/v.mp4", "caption": "a man walks"}\n')
    path = folders / "dataset.toml"
    path.write_text(MUSUBI_TOML)
    config = load_data_config(path)
    assert config.cache_dir == (folders / "cache" / "imgs" / "slotsmith-cache").resolve()
    images, listed, full = config.datasets
    assert (images.kind, images.repeats, images.batch_size, images.enable_bucket) == ("image", 2, 2, True)
    assert (listed.kind, listed.frame_extraction, listed.frame_stride, listed.target_frames) == (
        "jsonl", "slide", 4, (1, 5)
    )
    assert (full.frame_extraction, full.max_frames, full.resolution) == ("full", 45, (32, 32))
    # musubi-tuner's own cache files: its cache_directory, by default the media folder.
    assert [d.musubi_cache for d in config.datasets] == [
        (folders / "cache" / "imgs").resolve(), (folders / "cache" / "clips").resolve(), (folders / "clips").resolve()
    ]


def test_a_musubi_toml_without_a_resolution_gets_musubis_default(folders):
    path = folders / "dataset.toml"
    path.write_text('[[datasets]]\nimage_directory = "imgs"\n')
    assert load_data_config(path).datasets[0].resolution == (960, 544)


def test_unsupported_musubi_keys_are_refused_all_at_once_with_what_to_do(folders):
    path = folders / "dataset.toml"
    path.write_text(
        '[general]\nresolution = [32, 32]\nflip = true\n[[datasets]]\nimage_directory = "imgs"\n'
        'control_directory = "ctrl"\nfp_latent_window_size = 9\n[extra]\na = 1\n'
    )
    with pytest.raises(SlotsmithError) as e:
        load_data_config(path)
    assert str(e.value).splitlines() == [
        f"{path.resolve()}: extra: unknown table (expected general and datasets): remove it",
        f"{path.resolve()}: general.flip: not a musubi-tuner dataset key slotsmith knows: remove it",
        f"{path.resolve()}: datasets[0].control_directory: control images (FramePack one-frame or ControlNet "
        "training) are not supported: remove it",
        f"{path.resolve()}: datasets[0].fp_latent_window_size: a FramePack setting; Wan does not use it: remove it",
    ]
    path.write_text("[general\n")
    with pytest.raises(SlotsmithError, match="not valid TOML"):
        load_data_config(path)
    path.write_text('[[datasets]]\nimage_directory = "imgs"\ncache_directory = 3\n')
    with pytest.raises(SlotsmithError, match=r"datasets\[0\]\.cache_directory: must be a path"):
        load_data_config(path)
