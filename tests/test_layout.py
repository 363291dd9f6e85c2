"""Shipped layouts: generated, not typed; the A14B figures the issue states."""

import pytest

from slotsmith.inventory import inventory_from_layout_file, load_inventory
from slotsmith.layout import KNOWN_MODELS, config_from_shapes, layout_yaml, layouts_dir, wan_tensor_shapes


@pytest.mark.parametrize("name", sorted(KNOWN_MODELS))
def test_committed_layout_equals_generator(name):
    committed = (layouts_dir() / f"{name}.yaml").read_text(encoding="utf-8")
    assert committed == layout_yaml(KNOWN_MODELS[name]), "run scripts/gen_layouts.py"


def test_a14b_counts():
    inv = load_inventory("wan2.2-t2v-a14b")
    assert len(inv.tensors) == 1095
    assert inv.total_params == 14_288_491_584
    assert inv.num_blocks() == 40
    for b in range(40):
        assert sum(t.numel for n, t in inv.tensors.items() if n.startswith(f"blocks.{b}.")) == 351_394_304


def test_a14b_experts_share_the_14b_layout():
    assert load_inventory("wan2.2-t2v-a14b").matching_models() == ["wan2.1-t2v-14b", "wan2.2-t2v-a14b"]
    assert load_inventory("wan2.2-ti2v-5b").matching_models() == ["wan2.2-ti2v-5b"]


@pytest.mark.parametrize("name", sorted(KNOWN_MODELS))
def test_config_read_back_from_shapes(name):
    cfg = KNOWN_MODELS[name].config
    assert config_from_shapes(wan_tensor_shapes(cfg)) == cfg


def test_i2v_has_image_branch():
    shapes = wan_tensor_shapes(KNOWN_MODELS["wan2.1-i2v-14b"].config)
    assert shapes["blocks.0.cross_attn.k_img.weight"] == (5120, 5120)
    assert shapes["img_emb.proj.1.weight"] == (1280, 1280)
    assert shapes["patch_embedding.weight"] == (5120, 36, 1, 2, 2)
    assert "img_emb.proj.0.weight" not in wan_tensor_shapes(KNOWN_MODELS["wan2.2-i2v-a14b"].config)


@pytest.mark.parametrize("name", list(KNOWN_MODELS))
def test_a_shipped_layout_name_gives_the_shipped_file_exactly(name):
    """Shipped names are built from the generator's function, not parsed: the result must be the file's."""
    built = load_inventory(name)
    parsed = inventory_from_layout_file(layouts_dir() / f"{name}.yaml")
    assert built.source == parsed.source == name
    assert list(built.tensors.items()) == list(parsed.tensors.items())
    assert built.experts == parsed.experts
    assert built.layout_digest() == parsed.layout_digest()
