"""``slotsmith cache`` takes musubi-tuner's latent and text-encoder cache files where they check out.

The musubi-tuner files are written here, in its format (names, tensor keys,
metadata), holding what slotsmith's tiny encoders make for each item, so a
match is real: a first run with ``reuse_musubi=False`` encodes the dataset,
the test copies each tensor into musubi-tuner's layout and removes
slotsmith's cache, then the run under test takes them back.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from helpers import schema_validator
from media import write_image, write_video
from safetensors.torch import load_file, save_file

from slotsmith.cli import main
from slotsmith.data.cache import CachedDataset, load_index
from slotsmith.data.cache_builder import run_cache
from slotsmith.errors import SlotsmithError

torch.set_num_threads(1)

TOML = """
[general]
resolution = [32, 32]
caption_extension = ".txt"

[[datasets]]
image_directory = "imgs"
cache_directory = "musubi/imgs"
enable_bucket = true

[[datasets]]
video_directory = "clips"
cache_directory = "musubi/clips"
target_frames = [5]
frame_extraction = "chunk"
"""

MUSUBI_DTYPES = {"imgs": torch.bfloat16, "clips": torch.float32}
"""musubi-tuner caches in the encoders' dtype: bfloat16 for one dataset, float32 for the other."""

DTYPE_NAMES = {torch.bfloat16: "bfloat16", torch.float32: "float32"}


@pytest.fixture(scope="module")
def models(tiny_models):
    return {"vae": str(tiny_models["vae_pth"]), "t5": str(tiny_models["t5_pth"]), "tokenizer": str(tiny_models["tok"])}


def _cache(models, root: Path, **kw):
    return run_cache(root / "dataset.toml", models["vae"], models["t5"], models["tokenizer"], progress=False, **kw)


def _musubi_name(item: dict) -> str:
    """musubi-tuner's latent file name for an index item of this dataset (sizes known from the media written)."""
    source = Path(item["source"])
    if source.parent.name == "imgs":
        size = {"a": "0032x0032", "b": "0064x0032"}[source.stem]  # an image's own size
        return f"{source.stem}_{size}_wan.safetensors"
    start, stop = item["frames"]
    return f"{source.stem}_{start:05d}-{stop - start + 1:03d}_0032x0032_wan.safetensors"  # the bucket's size


def _write_musubi_cache(root: Path, index: dict) -> None:
    """musubi-tuner's files for every item of ``index``, from the tensors slotsmith's cache holds."""
    cache = root / "musubi" / "imgs" / "slotsmith-cache"
    for item in index["items"]:
        source = Path(item["source"])
        folder = root / "musubi" / source.parent.name
        dtype = MUSUBI_DTYPES[source.parent.name]
        latents = load_file(str(cache / item["latents"]))["latents"].to(dtype)
        _c, f, h, w = latents.shape
        meta = {"architecture": "wan", "format_version": "1.0.1"}
        if source.parent.name == "clips":
            meta["frame_count"] = str(item["frames"][1] - item["frames"][0] + 1)
        name = _musubi_name(item)
        meta["width"], meta["height"] = (str(int(v)) for v in name.rsplit("_", 2)[-2].split("x"))
        save_file({f"latents_{f}x{h}x{w}_{DTYPE_NAMES[dtype]}": latents}, str(folder / name), metadata=meta)
        context = load_file(str(cache / item["text"]))["context"].to(dtype)
        save_file({f"varlen_t5_{DTYPE_NAMES[dtype]}": context}, str(folder / f"{source.stem}_wan_te.safetensors"),
                  metadata={"architecture": "wan", "caption1": item["caption"], "format_version": "1.0.1"})


@pytest.fixture
def world(tmp_path, models):
    """Two images (one bucketed to 48x16), a 10-frame clip chunked in two, and musubi-tuner's cache of them."""
    for sub in ("imgs", "clips", "musubi/imgs", "musubi/clips"):
        (tmp_path / sub).mkdir(parents=True)
    write_image(tmp_path / "imgs" / "a.png", 32, 32, seed=1)
    (tmp_path / "imgs" / "a.txt").write_text("a red cat")
    write_image(tmp_path / "imgs" / "b.png", 64, 32, seed=2)
    (tmp_path / "imgs" / "b.txt").write_text("a blue dog")
    write_video(tmp_path / "clips" / "v.mp4", 10, seed=3)
    (tmp_path / "clips" / "v.txt").write_text("a man walks")
    (tmp_path / "dataset.toml").write_text(TOML)
    report = _cache(models, tmp_path, reuse_musubi=False)
    assert (report.latents_encoded, report.texts_encoded) == (4, 3)
    index = load_index(tmp_path / "musubi" / "imgs" / "slotsmith-cache")
    _write_musubi_cache(tmp_path, index)
    shutil.rmtree(tmp_path / "musubi" / "imgs" / "slotsmith-cache")
    return tmp_path


def _cache_dir(root: Path) -> Path:
    return root / "musubi" / "imgs" / "slotsmith-cache"


def _musubi_tensor(path: Path) -> torch.Tensor:
    (tensor,) = load_file(str(path)).values()
    return tensor


def test_everything_is_taken_from_musubi_and_is_its_tensors_exactly(models, world):
    result = CliRunner().invoke(main, ["cache", "--data", str(world / "dataset.toml"), "--vae", models["vae"],
                                       "--t5", models["t5"], "--tokenizer", models["tokenizer"], "-q"])
    assert result.exit_code == 0, result.output
    assert ("4 items" in result.output and "latents 0 encoded, 0 reused, 4 from musubi-tuner's cache" in result.output
            and "texts 0 encoded, 0 reused, 3 from musubi-tuner's cache" in result.output), result.output
    index = load_index(_cache_dir(world))
    validator = schema_validator("cache-index")
    validator.validate(index)
    assert not validator.is_valid({**index, "musubi": {**index["musubi"], "latents": -1}})
    assert index["musubi"] == {"latents": 4, "texts": 4, "folders": ["musubi/clips", "musubi/imgs"]}
    for item in index["items"]:
        musubi = item["musubi"]
        assert musubi["latents"] == f"musubi/{Path(item['source']).parent.name}/{_musubi_name(item)}"
        pairs = ((item["latents"], musubi["latents"], "latents"), (item["text"], musubi["text"], "context"))
        for ours, theirs, name in pairs:
            stored = load_file(str(_cache_dir(world) / ours))[name]
            expected = _musubi_tensor(world / theirs)
            assert stored.dtype == torch.float32
            # float32 files byte for byte; bfloat16 ones widened, which is exact.
            assert torch.equal(stored, expected.float())
            if expected.dtype == torch.float32:
                assert stored.numpy().tobytes() == expected.numpy().tobytes()
    assert len(CachedDataset(_cache_dir(world))) == 4

    again = _cache(models, world)
    assert (again.latents_encoded, again.latents_reused, again.latents_from_musubi) == (0, 4, 0)
    assert (again.texts_encoded, again.texts_reused, again.texts_from_musubi) == (0, 3, 0)


def test_no_reuse_musubi_encodes_everything_even_after_a_run_that_took_them(models, world):
    assert _cache(models, world).latents_from_musubi == 4
    args = ["cache", "--data", str(world / "dataset.toml"), "--vae", models["vae"], "--t5", models["t5"],
            "--tokenizer", models["tokenizer"], "-q", "--no-reuse-musubi"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    assert "latents 4 encoded, 0 reused; texts 3 encoded, 0 reused; 0 bad" in result.output
    index = load_index(_cache_dir(world))
    assert "musubi" not in index and not any("musubi" in item for item in index["items"])


@pytest.mark.parametrize("what", ["latents", "text"])
def test_a_musubi_cache_made_otherwise_is_refused_naming_the_file_and_the_flag(models, world, what):
    # a.png is the images' first item: the one compared with slotsmith's own encoding.
    path = world / "musubi" / "imgs" / ("a_0032x0032_wan.safetensors" if what == "latents" else "a_wan_te.safetensors")
    (name, tensor), = load_file(str(path)).items()
    save_file({name: tensor * 1.5}, str(path), metadata={"architecture": "wan", "format_version": "1.0.1",
              **({"width": "32", "height": "32"} if what == "latents" else {"caption1": "a red cat"})})
    with pytest.raises(SlotsmithError) as e:
        _cache(models, world)
    message = str(e.value)
    assert message.startswith(f"{path}: musubi-tuner's ") and "relative difference 0.50" in message
    assert "--no-reuse-musubi" in message and "\n" not in message
    assert not (_cache_dir(world) / "index.json").exists()
    assert _cache(models, world, reuse_musubi=False).latents_encoded == 4


def _respell(path: Path, **meta) -> None:
    tensors = load_file(str(path))
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        metadata = f.metadata()
    save_file(tensors, str(path), metadata={**metadata, **meta})


def _spoil_b_shape(root):
    path = root / "musubi" / "imgs" / "b_0064x0032_wan.safetensors"
    save_file({"latents_1x2x4_bfloat16": torch.zeros(16, 1, 2, 4, dtype=torch.bfloat16)}, str(path),
              metadata={"architecture": "wan", "format_version": "1.0.1", "width": "64", "height": "32"})
    return "latents of shape [16, 1, 2, 4], slotsmith's VAE makes [16, 1, 2, 6]"


def _spoil_b_architecture(root):
    _respell(root / "musubi" / "imgs" / "b_0064x0032_wan.safetensors", architecture="hunyuan_video")
    return "architecture 'hunyuan_video'"


def _spoil_b_values(root):
    path = root / "musubi" / "imgs" / "b_0064x0032_wan.safetensors"
    (name, tensor), = load_file(str(path)).items()
    tensor[0, 0, 0, 0] = float("inf")
    save_file({name: tensor}, str(path), metadata={"architecture": "wan", "format_version": "1.0.1",
                                                   "width": "64", "height": "32"})
    return "holds NaN or inf"


def _spoil_b_age(root):
    later = (root / "musubi" / "imgs" / "b_0064x0032_wan.safetensors").stat().st_mtime + 60
    os.utime(root / "imgs" / "b.png", (later, later))
    return "older than b.png"


def _spoil_b_extras(root):
    path = root / "musubi" / "imgs" / "b_0064x0032_wan.safetensors"
    tensors = load_file(str(path))
    tensors["latents_control_1x2x6_bfloat16"] = torch.zeros(16, 1, 2, 6, dtype=torch.bfloat16)
    save_file(tensors, str(path), metadata={"architecture": "wan", "format_version": "1.0.1",
                                            "width": "64", "height": "32"})
    return "control or one-frame training, not done here"


def _spoil_b_caption(root):
    (root / "imgs" / "b.txt").write_text("a green dog")
    return "b_wan_te.safetensors: made for another caption ('a blue dog'"


def _spoil_b_name(root):
    write_image(root / "imgs" / "b.jpg", 64, 32, seed=2)
    (root / "imgs" / "b.txt").write_text("a blue dog")
    return "shares its musubi-tuner cache files"


@pytest.mark.parametrize("spoil", [_spoil_b_shape, _spoil_b_architecture, _spoil_b_values, _spoil_b_age,
                                   _spoil_b_extras, _spoil_b_caption, _spoil_b_name])
def test_a_file_that_does_not_check_out_is_encoded_and_said_why(models, world, spoil):
    why = spoil(world)
    report = _cache(models, world)
    assert any(why in note for note in report.musubi_notes), report.musubi_notes
    index = load_index(_cache_dir(world))
    b_items = [i for i in index["items"] if Path(i["source"]).stem == "b"]
    taken = "latents" if spoil is not _spoil_b_caption else "text"
    assert b_items and all(taken not in i.get("musubi", {}) for i in b_items)
    others = [i for i in index["items"] if Path(i["source"]).stem != "b"]
    assert all("latents" in i["musubi"] and "text" in i["musubi"] for i in others)
    assert report.latents_from_musubi == len(others) + (spoil is _spoil_b_caption)


def test_clips_resampled_from_source_fps_are_never_taken(models, world):
    toml = (world / "dataset.toml").read_text().replace('"chunk"', '"chunk"\nsource_fps = 16.0')
    (world / "dataset.toml").write_text(toml)
    report = _cache(models, world)
    assert (report.latents_from_musubi, report.latents_encoded) == (2, 2)  # the images only
    assert report.texts_from_musubi == 3  # captions do not depend on frames
    assert any("source_fps is set" in note for note in report.musubi_notes)


def test_image_to_video_takes_the_latents_and_encodes_its_own_conditioning(models, world):
    # Image-to-video trains on clips whose first frame has content: the first 5 frames of the video only.
    clips = TOML[TOML.index("[[datasets]]\nvideo_directory"):].replace('"chunk"', '"head"')
    (world / "dataset.toml").write_text('[general]\nresolution = [32, 32]\n' + clips)
    path = world / "musubi" / "clips" / "v_00000-005_0032x0032_wan.safetensors"
    tensors = load_file(str(path))
    # musubi-tuner's --i2v extras: never read (slotsmith makes its own conditioning).
    tensors["clip_float32"] = torch.full((257, 8), 7.0)
    tensors["latents_image_2x4x4_float32"] = torch.full((20, 2, 4, 4), 7.0)
    save_file(tensors, str(path), metadata={"architecture": "wan", "format_version": "1.0.1", "width": "32",
                                            "height": "32", "frame_count": "5"})
    report = _cache(models, world, i2v=True)
    assert (report.latents_from_musubi, report.latents_encoded) == (1, 0)
    cache = world / "musubi" / "clips" / "slotsmith-cache"
    index = load_index(cache)
    assert index["image_conditioning"]["mode"] == "i2v"
    (item,) = index["items"]
    assert torch.equal(load_file(str(cache / item["latents"]))["latents"], tensors["latents_2x4x4_float32"])
    condition = load_file(str(cache / item["condition"]))["condition"]
    assert condition.shape == (20, 2, 4, 4) and not (condition == 7.0).any()


def test_a_yaml_dataset_never_looks_for_musubi_files(models, world):
    (world / "data.yaml").write_text(json.dumps({"cache_dir": "yaml-cache", "datasets": [
        {"image_directory": "imgs", "resolution": [32, 32], "enable_bucket": True}]}))
    # musubi-tuner's default cache folder is the media folder: files there are left alone for a YAML.
    for f in (world / "musubi" / "imgs").glob("*.safetensors"):
        shutil.copy(f, world / "imgs")
    report = run_cache(world / "data.yaml", models["vae"], models["t5"], models["tokenizer"], progress=False)
    assert (report.latents_encoded, report.latents_from_musubi, report.musubi) == (2, 0, False)
    assert "from musubi-tuner" not in report.summary()


def _tiny_base(world: Path) -> Path:
    from slotsmith.demo import tiny
    from slotsmith.training import wan

    torch.manual_seed(0)
    base = world / "base" / "dit.safetensors"
    base.parent.mkdir()
    model = wan.build_model(tiny.TINY_CONFIG, tiny.TINY_HEAD_DIM)
    save_file({k: v.contiguous() for k, v in wan.native_state_dict(model).items()}, str(base))
    (base.parent / "config.json").write_text(json.dumps({"attention_head_dim": tiny.TINY_HEAD_DIM}))
    return base


def _train(world: Path, *extra: str):
    return CliRunner().invoke(main, ["train", "-b", str(_tiny_base(world)), "--data", str(world / "dataset.toml"),
                                     "--ff", "0.05", "--ffid", "1", "--steps", "2", "--lr", "1e-3",
                                     "-o", str(world / "char1.slot"), "-q", *extra])


def test_train_runs_on_what_was_taken_from_musubi(models, world):
    assert _cache(models, world).latents_from_musubi == 4
    result = _train(world)  # no encoders: the dataset's cache must be complete as it is
    assert result.exit_code == 0, result.output
    assert (world / "char1.slot").is_file()


def test_train_no_reuse_musubi_encodes_everything_itself(models, world):
    result = _train(world, "--vae", models["vae"], "--t5", models["t5"], "--tokenizer", models["tokenizer"],
                    "--no-reuse-musubi")
    assert result.exit_code == 0, result.output
    index = json.loads((_cache_dir(world) / "index.json").read_text())
    assert "musubi" not in index and not any("musubi" in item for item in index["items"])


def test_the_cache_command_says_which_files_it_did_not_take(models, world):
    why = _spoil_b_shape(world)
    result = CliRunner().invoke(main, ["cache", "--data", str(world / "dataset.toml"), "--vae", models["vae"],
                                       "--t5", models["t5"], "--tokenizer", models["tokenizer"], "-q"])
    assert result.exit_code == 0, result.output
    path = world / "musubi" / "imgs" / "b_0064x0032_wan.safetensors"
    line = f"encoded, not taken from musubi-tuner's cache: {path}: {why} for this item"
    assert line in result.output.splitlines()
    assert "latents 1 encoded, 0 reused, 3 from musubi-tuner's cache" in result.output
