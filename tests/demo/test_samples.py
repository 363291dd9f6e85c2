"""The demo's pictures: a VAE that decodes what it encodes, and recognition by nearest mean colour."""

from __future__ import annotations

import numpy as np
import torch

from slotsmith.data.encoders import load_vae
from slotsmith.demo.samples import recognise, reference_colours
from slotsmith.demo.tiny import build_mosaic_vae


def test_mosaic_vae_decodes_each_blocks_mean_colour(tmp_path):
    vae = load_vae(build_mosaic_vae(tmp_path / "vae"))
    pixels = torch.rand(2, 3, 1, 32, 48) * 2 - 1
    with torch.no_grad():
        latents = vae.encode(pixels).latent_dist.mode()
        decoded = vae.decode(latents).sample
    means = torch.nn.functional.avg_pool2d(pixels[:, :, 0], 8)
    assert latents.shape == (2, 16, 1, 4, 6)
    torch.testing.assert_close(latents[:, :3, 0], means, atol=1e-4, rtol=0)
    assert latents[:, 3:].abs().max() == 0
    mosaic = means.repeat_interleave(8, -1).repeat_interleave(8, -2)
    torch.testing.assert_close(decoded[:, :, 0], mosaic, atol=1e-4, rtol=0)


def test_mosaic_vae_handles_videos(tmp_path):
    vae = load_vae(build_mosaic_vae(tmp_path / "vae"))
    with torch.no_grad():
        latents = vae.encode(torch.zeros(1, 3, 9, 16, 16) + 0.5).latent_dist.mode()
        decoded = vae.decode(latents).sample
    assert latents.shape[2] == 3 and decoded.shape[2] == 9
    torch.testing.assert_close(decoded, torch.full_like(decoded, 0.5), atol=1e-4, rtol=0)


def test_recognition_picks_the_character_of_the_nearest_mean_colour(tmp_path):
    from PIL import Image

    folders = {}
    for name, colour in (("dark", (20, 30, 90)), ("light", (235, 225, 190))):
        folders[name] = tmp_path / name
        folders[name].mkdir()
        Image.new("RGB", (8, 8), colour).save(folders[name] / "0.png")
    refs = reference_colours(folders)
    np.testing.assert_allclose(refs["dark"], (20, 30, 90))
    assert recognise(np.full((4, 4, 3), 60, np.uint8), refs) == "dark"
    assert recognise(np.full((4, 4, 3), 200, np.uint8), refs) == "light"
