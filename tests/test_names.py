"""Native <-> diffusers names and convention detection."""

import pytest

from slotsmith.errors import SlotsmithError
from slotsmith.layout import KNOWN_MODELS, wan_tensor_shapes
from slotsmith.names import (
    PREFIX,
    detect_convention,
    diffusers_to_native,
    from_canonical,
    native_to_diffusers,
    to_canonical,
)

I2V = list(wan_tensor_shapes(KNOWN_MODELS["wan2.1-i2v-14b"].config))


def test_round_trip_every_tensor_of_the_richest_layout():
    renamed = [native_to_diffusers(n) for n in I2V]
    assert len(set(renamed)) == len(I2V)
    assert [diffusers_to_native(n) for n in renamed] == I2V


@pytest.mark.parametrize(
    "native,diffusers",
    [
        ("blocks.3.norm3.weight", "blocks.3.norm2.weight"),
        ("blocks.0.ffn.0.weight", "blocks.0.ffn.net.0.proj.weight"),
        ("blocks.7.modulation", "blocks.7.scale_shift_table"),
        ("head.modulation", "scale_shift_table"),
        ("head.head.bias", "proj_out.bias"),
        ("text_embedding.0.weight", "condition_embedder.text_embedder.linear_1.weight"),
        ("time_projection.1.bias", "condition_embedder.time_proj.bias"),
        ("blocks.1.cross_attn.k_img.weight", "blocks.1.attn2.add_k_proj.weight"),
        ("blocks.1.self_attn.o.weight", "blocks.1.attn1.to_out.0.weight"),
        ("img_emb.proj.3.weight", "condition_embedder.image_embedder.ff.net.2.weight"),
    ],
)
def test_known_pairs(native, diffusers):
    assert native_to_diffusers(native) == diffusers
    assert diffusers_to_native(diffusers) == native


def test_detect_conventions():
    diff = [native_to_diffusers(n) for n in I2V]
    assert detect_convention(I2V) == "native"
    assert detect_convention([PREFIX + n for n in I2V]) == "prefixed"
    assert detect_convention(diff) == "diffusers"
    for conv, keys in (("native", I2V), ("prefixed", [PREFIX + n for n in I2V]), ("diffusers", diff)):
        assert [to_canonical(k, conv) for k in keys] == I2V
        assert [from_canonical(n, conv) for n in I2V] == keys


def test_partly_prefixed_is_an_error():
    with pytest.raises(SlotsmithError, match="prefix"):
        detect_convention([PREFIX + I2V[0], I2V[1]])


def test_unknown_name_is_an_error():
    with pytest.raises(SlotsmithError, match="not a known"):
        native_to_diffusers("blocks.0.lora_down.weight")
