"""The cache index schema accepts what `slotsmith cache` writes (needs torch: kept apart from test_schemas)."""

import json

import yaml
from helpers import schema_validator
from media import write_image

from slotsmith.data.cache_builder import run_cache


def test_cache_index_validates(tiny_models, tmp_path):
    (tmp_path / "imgs").mkdir()
    for i, caption in enumerate(("a red cat", "a blue dog")):
        write_image(tmp_path / "imgs" / f"{i}.png", 32, 32, seed=i)
        (tmp_path / "imgs" / f"{i}.txt").write_text(caption)
    doc = {"cache_dir": "cache", "datasets": [{"image_directory": "imgs", "resolution": [32, 32], "repeats": 2}]}
    (tmp_path / "data.yaml").write_text(yaml.safe_dump(doc))
    run_cache(tmp_path / "data.yaml", tiny_models["vae_pth"], tiny_models["t5_pth"], tiny_models["tok"], progress=False)
    index = json.loads((tmp_path / "cache" / "index.json").read_text())
    v = schema_validator("cache-index")
    v.validate(index)
    assert not v.is_valid({**index, "items": [{**index["items"][0], "repeats": 0}]})
    assert not v.is_valid({**index, "format": "slotsmith-cache/3"})
    assert not v.is_valid({**index, "image_conditioning": {"mode": "v2v", "channels": 20}})


def test_image_to_video_cache_index_validates(tiny_models, tmp_path):
    from media import write_video

    from slotsmith.demo import tiny

    (tmp_path / "vids").mkdir()
    write_video(tmp_path / "vids" / "0.mp4", 5, 32, 32)
    (tmp_path / "vids" / "0.txt").write_text("a red cat walks")
    doc = {"datasets": [{"video_directory": "vids", "resolution": [32, 32], "target_frames": [5]}]}
    (tmp_path / "data.yaml").write_text(yaml.safe_dump(doc))
    clip = tiny.build_tiny_clip_vision(tmp_path / "clip")
    run_cache(tmp_path / "data.yaml", tiny_models["vae_dir"], tiny_models["t5_dir"], tiny_models["tok"],
              progress=False, clip=clip)
    index = json.loads((tmp_path / "cache" / "index.json").read_text())
    v = schema_validator("cache-index")
    v.validate(index)
    assert index["image_conditioning"]["mode"] == "i2v"
    assert not v.is_valid({**index, "items": [{**index["items"][0], "condition": "latents/x.safetensors"}]})
