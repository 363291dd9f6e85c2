"""Image-to-video end to end on tiny models of each family: cache with image conditioning, train, splice, verify."""

import json

import av
import numpy as np
import pytest
import torch
import yaml
from click.testing import CliRunner
from media import write_image, write_video
from safetensors import safe_open
from safetensors.torch import save_file

from slotsmith.cli import main
from slotsmith.data.cache import CachedDataset, load_index
from slotsmith.data.cache_builder import BadItemsError, run_cache
from slotsmith.demo import tiny
from slotsmith.errors import SlotsmithError
from slotsmith.slot import read_slot
from slotsmith.train import TrainSettings
from slotsmith.training import wan
from slotsmith.training.conditioning import batch_conditioning
from slotsmith.training.flow import flow_loss
from slotsmith.training.run import train

torch.set_num_threads(1)

FAMILIES = {
    # name: (DiT config, VAE kind, --i2v / --clip)
    "wan21-i2v": (tiny.TINY_I2V21_CONFIG, "vae21", "clip"),
    "wan22-i2v": (tiny.TINY_I2V_CONFIG, "vae21", "i2v"),
    "wan22-ti2v": (tiny.TINY_TI2V_CONFIG, "vae22", "i2v"),
}


def _run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


@pytest.fixture(scope="module")
def models(tmp_path_factory, tiny_models):
    root = tmp_path_factory.mktemp("i2v-models")
    return {
        "vae21": tiny_models["vae_dir"],
        "vae22": tiny.build_tiny_vae22(root / "vae22"),
        "clip": tiny.build_tiny_clip_vision(root / "clip"),
        "t5": tiny_models["t5_dir"],
        "tok": tiny_models["tok"],
    }


def _base(folder, cfg, seed=0):
    torch.manual_seed(seed)
    model = wan.build_model(cfg, tiny.TINY_HEAD_DIM)
    path = folder / "dit.safetensors"
    folder.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in wan.native_state_dict(model).items()}, path)
    (folder / "config.json").write_text(json.dumps({"attention_head_dim": tiny.TINY_HEAD_DIM}))
    return path


def _dataset(folder, size, videos=3, frames=9, cache_dir="cache"):
    (folder / "vids").mkdir(parents=True)
    for i in range(videos):
        write_video(folder / "vids" / f"{i}.mp4", frames, size, size, seed=i)
        (folder / "vids" / f"{i}.txt").write_text(f"character1 walks {i}")
    doc = {"cache_dir": cache_dir,
           "datasets": [{"video_directory": "vids", "resolution": [size, size], "target_frames": [5]}]}
    (folder / "data.yaml").write_text(yaml.safe_dump(doc))
    return folder / "data.yaml"


def _encoders(models, vae, extra):
    args = ["--vae", models[vae], "--t5", models["t5"], "--tokenizer", models["tok"]]
    return args + (["--clip", models["clip"]] if extra == "clip" else ["--i2v"])


def _fixed_loss(base, cache_dir):
    model = wan.load_base(base, tiny.TINY_HEAD_DIM).model
    ds = CachedDataset(cache_dir)
    g = torch.Generator().manual_seed(7)
    losses = []
    with torch.no_grad():
        for i in range(len(ds)):
            item = ds[i]
            for t in (0.3, 0.6, 0.9):
                noise = torch.randn(item["latents"].shape, generator=g)[None]
                cond = batch_conditioning([item], ds.conditioning.mode, "cpu")
                losses.append(flow_loss(model, item["latents"][None], item["context"][None], torch.tensor([t]),
                                        noise, torch.float32, cond))
    return torch.cat(losses).mean().item()


@pytest.mark.parametrize("family", list(FAMILIES))
def test_family_end_to_end(family, models, tmp_path):
    cfg, vae, extra = FAMILIES[family]
    base = _base(tmp_path / "base", cfg)
    data = _dataset(tmp_path / "data", 64 if vae == "vae22" else 32)
    out = tmp_path / "out" / "char.slot"
    out.parent.mkdir()
    result = _run("train", "-b", base, "--data", data, *_encoders(models, vae, extra), "--ff", 0.1, "--ffid", 1,
                  "--steps", 25, "--lr", 2e-3, "--batch-size", 3, "--seed", 1, "-o", out, "-q")
    assert result.exit_code == 0, result.output
    index = load_index(tmp_path / "data" / "cache")
    conditioning = index["image_conditioning"]
    assert conditioning["mode"] == ("ti2v" if vae == "vae22" else "i2v")
    assert conditioning["clip_dim"] == (tiny.TINY_CLIP_DIM if extra == "clip" else None)
    assert all("condition" in item for item in index["items"])

    spliced = tmp_path / "out" / "spliced.safetensors"
    assert _run("splice", base, out, "-o", spliced, "-q").exit_code == 0
    slot_names = {e.name for e in read_slot(out).manifest.entries}
    with safe_open(str(spliced), "pt") as s, safe_open(str(base), "pt") as b:
        assert set(s.keys()) == set(b.keys())
        for name in b.keys():
            same = torch.equal(s.get_tensor(name), b.get_tensor(name))
            assert same != (name in slot_names), name  # outside the slot bit-identical, inside changed
    verified = _run("verify", out, spliced, "--base", base)
    assert verified.exit_code == 0, verified.output
    assert _fixed_loss(spliced, tmp_path / "data" / "cache") < _fixed_loss(base, tmp_path / "data" / "cache")


def test_i2v_condition_is_the_pipelines(models, tmp_path):
    """The cached condition equals what diffusers' WanImageToVideoPipeline.prepare_latents builds."""
    from diffusers import AutoencoderKLWan, WanImageToVideoPipeline

    data = _dataset(tmp_path, 32, videos=1)
    run_cache(data, models["vae21"], models["t5"], models["tok"], device="cpu", progress=False, i2v=True)
    index = load_index(tmp_path / "cache")
    sample = CachedDataset(tmp_path / "cache")[0]
    vae = AutoencoderKLWan.from_pretrained(str(models["vae21"]))
    pipe = WanImageToVideoPipeline(tokenizer=None, text_encoder=None, vae=vae, scheduler=None, transformer=None)
    from slotsmith.data.config import load_data_config
    from slotsmith.data.media import discover, read_clips

    pixels = read_clips(discover(load_data_config(data))[0][0])[0].pixels
    assert index["items"][0]["frames"] == [0, 4]
    _, condition = pipe.prepare_latents(pixels[:, 0][None], 1, 16, 32, 32, 5, torch.float32, "cpu", None)
    assert condition.shape == (1, 20, 2, 4, 4)
    torch.testing.assert_close(sample["condition"], condition[0], rtol=1e-5, atol=1e-5)


def test_ti2v_forward_keeps_the_first_frame_clean(models):
    """TI2V: frame 0 is the condition with timestep 0 on its tokens; it is left out of the loss."""
    torch.manual_seed(0)
    model = wan.build_model(tiny.TINY_TI2V_CONFIG, tiny.TINY_HEAD_DIM)
    latents, noise = torch.randn(1, 48, 2, 4, 4), torch.randn(1, 48, 2, 4, 4)
    context = torch.randn(1, 512, 32)
    sample = {"condition": latents[0, :, :1].clone()}
    cond = batch_conditioning([sample], "ti2v", "cpu")
    seen = {}

    def grab(module, args, kwargs):
        seen.update(kwargs)

    handle = model.register_forward_pre_hook(grab, with_kwargs=True)
    loss = flow_loss(model, latents, context, torch.tensor([0.7]), noise, torch.float32, cond)
    handle.remove()
    hidden, timestep = seen["hidden_states"], seen["timestep"]
    assert torch.equal(hidden[:, :, 0], latents[:, :, 0])
    assert torch.allclose(hidden[:, :, 1], 0.3 * latents[:, :, 1] + 0.7 * noise[:, :, 1])
    assert timestep.shape == (1, 2 * 2 * 2)
    assert timestep[0, :4].eq(0).all() and torch.allclose(timestep[0, 4:], torch.full((4,), 700.0))
    with torch.no_grad():
        pred = model(hidden_states=hidden, timestep=timestep, encoder_hidden_states=context, return_dict=False)[0]
    expected = ((pred - (noise - latents))[:, :, 1:] ** 2).mean()
    torch.testing.assert_close(loss[0], expected)


def test_t2v_cache_on_i2v_base_and_the_reverse_are_refused(models, tmp_path):
    t2v = _dataset(tmp_path / "t2v", 32, videos=1)
    run_cache(t2v, models["vae21"], models["t5"], models["tok"], device="cpu", progress=False)
    i2v = _dataset(tmp_path / "i2v", 32, videos=1)
    run_cache(i2v, models["vae21"], models["t5"], models["tok"], device="cpu", progress=False, i2v=True)
    i2v_base = _base(tmp_path / "b1", tiny.TINY_I2V_CONFIG)
    t2v_base = _base(tmp_path / "b2", tiny.TINY_CONFIG)
    clip_base = _base(tmp_path / "b3", tiny.TINY_I2V21_CONFIG)

    def settings(base, cache):
        return TrainSettings(base=str(base), cache=str(cache), out=str(tmp_path / "x.slot"), ff=0.1, ffid=1, steps=1)

    with pytest.raises(SlotsmithError, match="a text-to-video cache .* image-to-video base .* --i2v"):
        train(settings(i2v_base, tmp_path / "t2v" / "cache"))
    with pytest.raises(SlotsmithError, match="an image-to-video cache .* text-to-video base"):
        train(settings(t2v_base, tmp_path / "i2v" / "cache"))
    with pytest.raises(SlotsmithError, match=r"holds no CLIP features, .*\(Wan 2\.1 I2V\).*--clip"):
        train(settings(clip_base, tmp_path / "i2v" / "cache"))
    assert not (tmp_path / "x.slot").exists()


def test_recaching_with_i2v_encodes_only_the_conditioning(models, tmp_path):
    data = _dataset(tmp_path, 32, videos=2)
    run_cache(data, models["vae21"], models["t5"], models["tok"], device="cpu", progress=False)
    latents = {p.name: p.read_bytes() for p in (tmp_path / "cache" / "latents").iterdir()}
    result = _run("cache", "--data", data, "--vae", models["vae21"], "--t5", models["t5"], "--tokenizer",
                  models["tok"], "--clip", models["clip"], "-q")
    assert result.exit_code == 0, result.output
    assert "latents 0 encoded, 2 reused" in result.output
    assert {p.name: p.read_bytes() for p in (tmp_path / "cache" / "latents").iterdir()} == latents
    index = load_index(tmp_path / "cache")
    assert index["image_conditioning"] == {"mode": "i2v", "channels": 20, "clip_dim": tiny.TINY_CLIP_DIM}
    assert len(list((tmp_path / "cache" / "condition").iterdir())) == 2
    assert len(list((tmp_path / "cache" / "clip").iterdir())) == 2


def test_i2v_options_go_with_data():
    with pytest.raises(SlotsmithError, match="--i2v and --clip go with --data"):
        TrainSettings(base="b", cache="c", out="o.slot", ff=0.1, ffid=1, steps=1, i2v=True).validate()


def _write_fade_in(path):
    """A 9-frame clip whose first frame is flat black (a fade-in), the others striped."""
    with av.open(str(path), "w") as container:
        stream = container.add_stream("mpeg4", rate=16)
        stream.width, stream.height, stream.pix_fmt = 32, 32, "yuv420p"
        for i in range(9):
            frame = np.zeros((32, 32, 3), dtype=np.uint8)
            if i:
                frame[::2] = 30 * i
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode())


def test_i2v_items_without_a_usable_first_frame_are_bad(models, tmp_path):
    """A still image (nothing after the first frame) and a clip with a blank first frame are bad items, named."""
    data = _dataset(tmp_path, 32, videos=1)
    blank = tmp_path / "vids" / "blank.mp4"
    _write_fade_in(blank)
    (tmp_path / "vids" / "blank.txt").write_text("fade in")
    (tmp_path / "imgs").mkdir()
    write_image(tmp_path / "imgs" / "photo.png", 32, 32)
    (tmp_path / "imgs" / "photo.txt").write_text("a photo")
    doc = yaml.safe_load(data.read_text())
    doc["datasets"].append({"image_directory": "imgs", "resolution": [32, 32]})
    data.write_text(yaml.safe_dump(doc))
    with pytest.raises(BadItemsError) as info:
        run_cache(data, models["vae21"], models["t5"], models["tok"], device="cpu", progress=False, i2v=True)
    message = str(info.value)
    assert f"{blank}: the first frame is blank" in message
    assert f"{tmp_path / 'imgs' / 'photo.png'}: image-to-video needs video clips" in message
    assert "2 bad item(s)" in message  # the good clip is not among them
    assert not (tmp_path / "cache" / "index.json").exists()
    # Without --i2v the same items are good text-to-video items.
    assert run_cache(data, models["vae21"], models["t5"], models["tok"], device="cpu", progress=False).items == 3


def test_clip_encoder_missing_or_wrong_is_refused_before_training(models, tmp_path):
    base = _base(tmp_path / "base", tiny.TINY_I2V21_CONFIG)
    data = _dataset(tmp_path / "data", 32, videos=1)
    common = ["train", "-b", base, "--data", data, "--vae", models["vae21"], "--t5", models["t5"],
              "--tokenizer", models["tok"], "--ff", 0.1, "--ffid", 1, "--steps", 1, "-o", tmp_path / "x.slot", "-q"]
    no_i2v = _run(*common)
    assert no_i2v.exit_code == 1 and "image-to-video base (36 input channels)" in no_i2v.output
    assert "needs --i2v and --clip" in no_i2v.output
    missing = _run(*common, "--i2v")
    assert missing.exit_code == 1
    assert "Wan 2.1 I2V" in missing.output and "needs --clip" in missing.output and "hidden size 24" in missing.output
    wrong = _run(*common, "--clip", models["t5"])
    assert wrong.exit_code == 1 and "is not a CLIP vision encoder" in wrong.output
    assert "CLIPVisionModel" in wrong.output
    other = tiny.build_tiny_clip_vision(tmp_path / "clip16", hidden_size=16)
    mismatched = _run(*common, "--clip", other)
    assert mismatched.exit_code == 1 and "hidden size 16" in mismatched.output and "takes 24-dim" in mismatched.output
    assert not (tmp_path / "data" / "cache").exists()  # refused before anything was encoded


def test_samples_during_training_are_refused_on_an_image_to_video_base(models, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("character1 walks\n", encoding="utf-8")
    data = _dataset(tmp_path, 32, videos=1)
    settings = TrainSettings(
        base=str(_base(tmp_path / "b", tiny.TINY_I2V_CONFIG)), data=str(data), out=str(tmp_path / "x.slot"), ff=0.1,
        ffid=1, steps=1, i2v=True, vae=str(models["vae21"]), t5=str(models["t5"]), tokenizer=str(models["tok"]),
        sample_prompts=str(prompts),
    )
    with pytest.raises(SlotsmithError, match="an image-to-video base .*; --sample-prompts draws text-to-video"):
        train(settings)
    assert not (tmp_path / "x.slot").exists() and not (tmp_path / "cache").exists()
