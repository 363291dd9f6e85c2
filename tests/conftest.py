"""Fixtures shared by several test files."""

from __future__ import annotations

import pytest

from slotsmith.demo import tiny


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory):
    """A tiny Wan 2.1 VAE and UMT5 encoder on disk, in the forms users have them.

    Returns:
        ``vae_dir`` (diffusers folder), ``vae_pth`` / ``vae_st`` (native Wan VAE
        files), ``t5_dir`` (transformers folder), ``t5_pth`` (Wan's native
        encoder ``.pth``) and ``tok`` (tokenizer folder), all Paths. Tests must
        not change them.
    """
    root = tmp_path_factory.mktemp("models")
    vae_dir = tiny.build_tiny_vae(root / "vae")
    t5_dir = tiny.build_tiny_text_encoder(root / "t5", root / "tok")
    return {
        "vae_dir": vae_dir,
        "vae_pth": tiny.save_native_vae(vae_dir, root / "Wan2.1_VAE.pth"),
        "vae_st": tiny.save_native_vae(vae_dir, root / "Wan2.1_VAE.safetensors"),
        "t5_dir": t5_dir,
        "t5_pth": tiny.save_native_text_encoder(t5_dir, root / "umt5-enc.pth"),
        "tok": root / "tok",
    }
