"""Fixtures shared by several test files, and the light test mode.

The tests mirror the package: those of the torch side live in ``training/``,
``data/`` and ``demo/``; the rest test the light core. Where torch is not
installed (the light install that CI verify jobs use) only the light tests
are collected; ``SLOTSMITH_LIGHT_TESTS=1`` asserts that torch really is
absent, so a light run proves what it claims.
"""

from __future__ import annotations

import importlib.util
import os

import pytest

TORCH_SIDE = ["training", "data", "demo", "sampling"]
_HAS_TORCH = importlib.util.find_spec("torch") is not None

if os.environ.get("SLOTSMITH_LIGHT_TESTS") == "1" and _HAS_TORCH:
    raise pytest.UsageError("SLOTSMITH_LIGHT_TESTS=1 but torch is installed: run the light tests in a light install")

collect_ignore = [] if _HAS_TORCH else TORCH_SIDE


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory):
    """A tiny Wan 2.1 VAE and UMT5 encoder on disk, in the forms users have them.

    Returns:
        ``vae_dir`` (diffusers folder), ``vae_pth`` / ``vae_st`` (native Wan VAE
        files), ``t5_dir`` (transformers folder), ``t5_pth`` (Wan's native
        encoder ``.pth``) and ``tok`` (tokenizer folder), all Paths. Tests must
        not change them.
    """
    from slotsmith.demo import tiny

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
