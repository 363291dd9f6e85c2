"""A tiny Wan DiT on disk, shared by the sampling tests."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from slotsmith.demo import tiny
from slotsmith.training import wan


@pytest.fixture(scope="session")
def tiny_base(tmp_path_factory):
    """A random tiny DiT (seed 0) with a config.json for its head size. Tests must not change it."""
    folder = tmp_path_factory.mktemp("tiny-base")
    torch.manual_seed(0)
    model = wan.build_model(tiny.TINY_CONFIG, tiny.TINY_HEAD_DIM)
    save_file({k: v.contiguous() for k, v in wan.native_state_dict(model).items()}, folder / "dit.safetensors")
    (folder / "config.json").write_text(json.dumps({"attention_head_dim": tiny.TINY_HEAD_DIM}))
    return folder / "dit.safetensors"
