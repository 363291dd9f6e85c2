"""Canonical (native Wan) tensor names and the key conventions files use.

Slots, manifests and selection always speak native Wan names
(``blocks.3.cross_attn.o.weight``). Files come in three conventions:

- ``native``: Wan's own keys, as in the official checkpoints;
- ``prefixed``: native keys under ``model.diffusion_model.`` (ComfyUI
  repackaged files);
- ``diffusers``: ``diffusers.WanTransformer3DModel`` keys.

The rename is a pure 1:1 map, so it runs both ways.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

from slotsmith.errors import SlotsmithError

PREFIX = "model.diffusion_model."
CONVENTIONS = ("native", "prefixed", "diffusers")

# Module paths inside a block (native -> diffusers). Parameter suffixes such as
# ".weight" follow unchanged. Note that native norm3 is diffusers norm2.
_BLOCK_MODULES = {
    "self_attn.q": "attn1.to_q",
    "self_attn.k": "attn1.to_k",
    "self_attn.v": "attn1.to_v",
    "self_attn.o": "attn1.to_out.0",
    "self_attn.norm_q": "attn1.norm_q",
    "self_attn.norm_k": "attn1.norm_k",
    "cross_attn.q": "attn2.to_q",
    "cross_attn.k": "attn2.to_k",
    "cross_attn.v": "attn2.to_v",
    "cross_attn.o": "attn2.to_out.0",
    "cross_attn.norm_q": "attn2.norm_q",
    "cross_attn.norm_k": "attn2.norm_k",
    "cross_attn.k_img": "attn2.add_k_proj",
    "cross_attn.v_img": "attn2.add_v_proj",
    "cross_attn.norm_k_img": "attn2.norm_added_k",
    "norm3": "norm2",
    "ffn.0": "ffn.net.0.proj",
    "ffn.2": "ffn.net.2",
}
_GLOBAL_MODULES = {
    "patch_embedding": "patch_embedding",
    "text_embedding.0": "condition_embedder.text_embedder.linear_1",
    "text_embedding.2": "condition_embedder.text_embedder.linear_2",
    "time_embedding.0": "condition_embedder.time_embedder.linear_1",
    "time_embedding.2": "condition_embedder.time_embedder.linear_2",
    "time_projection.1": "condition_embedder.time_proj",
    "img_emb.proj.0": "condition_embedder.image_embedder.norm1",
    "img_emb.proj.1": "condition_embedder.image_embedder.ff.net.0.proj",
    "img_emb.proj.3": "condition_embedder.image_embedder.ff.net.2",
    "img_emb.proj.4": "condition_embedder.image_embedder.norm2",
    "head.head": "proj_out",
}
# Bare parameters (no module path) that are renamed whole.
_BLOCK_PARAMS = {"modulation": "scale_shift_table"}
_GLOBAL_PARAMS = {
    "head.modulation": "scale_shift_table",
    "img_emb.emb_pos": "condition_embedder.image_embedder.pos_embed",
}

_BLOCK_RE = re.compile(r"^(blocks\.\d+\.)(.+)$")
_BLOCK_NUMBER_RE = re.compile(r"^blocks\.(\d+)\.")


def block_of(name: str) -> int | None:
    """The block number of a ``blocks.<int>.`` name, else None."""
    m = _BLOCK_NUMBER_RE.match(name)
    return int(m.group(1)) if m else None


def _split_block(name: str) -> tuple[str, str]:
    m = _BLOCK_RE.match(name)
    return (m.group(1), m.group(2)) if m else ("", name)


def _rename(local: str, modules: dict[str, str], params: dict[str, str]) -> str | None:
    if local in params:
        return params[local]
    module, dot, param = local.rpartition(".")
    if dot and module in modules:
        return f"{modules[module]}.{param}"
    return None


def _invert(table: dict[str, str]) -> dict[str, str]:
    return {v: k for k, v in table.items()}


_TABLES = {
    "to_diffusers": ((_BLOCK_MODULES, _BLOCK_PARAMS), (_GLOBAL_MODULES, _GLOBAL_PARAMS)),
    "to_native": (
        (_invert(_BLOCK_MODULES), _invert(_BLOCK_PARAMS)),
        (_invert(_GLOBAL_MODULES), _invert(_GLOBAL_PARAMS)),
    ),
}


def _convert(name: str, direction: str) -> str | None:
    block_tables, global_tables = _TABLES[direction]
    prefix, local = _split_block(name)
    renamed = _rename(local, *(block_tables if prefix else global_tables))
    return None if renamed is None else prefix + renamed


def _convert_known(name: str, direction: str, source: str) -> str:
    """`_convert`, raising for a name that is not a known ``source``-convention tensor."""
    renamed = _convert(name, direction)
    if renamed is None:
        raise SlotsmithError(f"{name!r} is not a known {source} Wan DiT tensor name")
    return renamed


def native_to_diffusers(name: str) -> str:
    """Rename a native Wan key to its ``WanTransformer3DModel`` key.

    Raises:
        SlotsmithError: The name is not a known Wan DiT tensor.
    """
    return _convert_known(name, "to_diffusers", "native")


def diffusers_to_native(name: str) -> str:
    """Rename a ``WanTransformer3DModel`` key to its native Wan key.

    Raises:
        SlotsmithError: The name is not a known diffusers Wan tensor.
    """
    return _convert_known(name, "to_native", "diffusers")


def detect_convention(keys: Iterable[str]) -> str:
    """Tell which key convention a file uses.

    Args:
        keys: Every key of the checkpoint.

    Returns:
        One of ``CONVENTIONS``.

    Raises:
        SlotsmithError: Only some keys carry the ComfyUI prefix.
    """
    keys = list(keys)
    prefixed = sum(k.startswith(PREFIX) for k in keys)
    if prefixed:
        if prefixed != len(keys):
            raise SlotsmithError(f"only {prefixed} of {len(keys)} keys carry the {PREFIX!r} prefix")
        return "prefixed"
    if any(_convert(k, "to_native") is not None and _convert(k, "to_diffusers") is None for k in keys):
        return "diffusers"
    return "native"


def to_canonical(key: str, convention: str) -> str:
    """Map a file key to its canonical native name."""
    if convention == "prefixed":
        return key[len(PREFIX) :]
    if convention == "diffusers":
        return diffusers_to_native(key)
    return key


def from_canonical(name: str, convention: str) -> str:
    """Map a canonical native name to the key a file of ``convention`` uses."""
    if convention == "prefixed":
        return PREFIX + name
    if convention == "diffusers":
        return native_to_diffusers(name)
    return name
