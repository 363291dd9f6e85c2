"""What a model holds, under canonical native Wan names.

An inventory comes from a checkpoint (single, sharded or a folder, in any key
convention) or from a layout (a shipped name such as ``wan2.2-t2v-a14b`` or a
layout YAML file). Selection, manifests and splicing all work on inventories,
so the same base in any convention yields the same slot.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from functools import cache
from math import prod
from pathlib import Path

from slotsmith.digest import digest_json
from slotsmith.errors import SlotsmithError
from slotsmith.io.checkpoint import Checkpoint, open_checkpoint
from slotsmith.io.files import load_yaml, safe_repr
from slotsmith.io.header import DTYPE_SIZES, MAX_DIMS, MAX_NUMEL, bounded_numel
from slotsmith.layout import KNOWN_MODELS, wan_tensor_shapes
from slotsmith.manifest import METADATA_KEY
from slotsmith.names import block_of, detect_convention, to_canonical

LAYOUT_CAP = 8_000_000
"""Largest layout YAML we parse, in bytes."""


@dataclass(frozen=True)
class TensorSpec:
    """Name, shape and dtype of one tensor."""

    name: str
    shape: tuple[int, ...]
    dtype: str

    @property
    def numel(self) -> int:
        return prod(self.shape)


@dataclass
class Inventory:
    """The tensors of one model.

    Attributes:
        source: The layout name or path it came from.
        tensors: Canonical name -> spec.
        checkpoint: The checkpoint it was read from (None for a layout).
        convention: The file's key convention (None for a layout).
        keys: Canonical name -> the key in the file (checkpoints only).
        experts: Expert name -> timestep range, for layouts that know them.
    """

    source: str
    tensors: dict[str, TensorSpec]
    checkpoint: Checkpoint | None = None
    convention: str | None = None
    keys: dict[str, str] = field(default_factory=dict)
    experts: dict[str, tuple[float, float]] = field(default_factory=dict)

    @property
    def total_params(self) -> int:
        return sum(t.numel for t in self.tensors.values())

    def numels(self) -> dict[str, int]:
        """Canonical name -> number of elements: what selection runs on."""
        return {n: t.numel for n, t in self.tensors.items()}

    def num_blocks(self) -> int:
        blocks = {block_of(n) for n in self.tensors} - {None}
        return max(blocks) + 1 if blocks else 0

    def layout_digest(self) -> str:
        """xxh3-128 of the sorted (name, shape, dtype) list: the layout's identity."""
        return digest_json(sorted([t.name, list(t.shape), t.dtype] for t in self.tensors.values()))

    def matching_models(self) -> list[str]:
        """Names of the known models with exactly this layout (dtype aside)."""
        mine = {n: t.shape for n, t in self.tensors.items()}
        return [name for name, spec in _known_shapes().items() if spec == mine]

    def known_model(self, expert: str | None = None) -> str | None:
        """The known model this layout is (the first match), or None.

        Wan 2.1 T2V 14B and Wan 2.2 T2V A14B share one layout: with an
        ``expert``, a matching model that has experts is preferred.
        """
        models = self.matching_models()
        if expert is not None:
            models = [m for m in models if KNOWN_MODELS[m].experts] or models
        return models[0] if models else None


@cache
def _known_shapes() -> dict[str, dict[str, tuple[int, ...]]]:
    # Built once per process: matching_models runs for every plan, slot and inspect.
    return {name: wan_tensor_shapes(m.config) for name, m in KNOWN_MODELS.items()}


def inventory_from_checkpoint(path: str | os.PathLike) -> Inventory:
    """Inventory a checkpoint from its headers alone.

    Raises:
        SlotsmithError: Malformed files, a slot file, mixed key conventions,
            unknown diffusers keys, or two keys that map to one canonical name.
    """
    return inventory_of(open_checkpoint(path))


def inventory_of(ckpt: Checkpoint) -> Inventory:
    """Inventory a checkpoint already opened (its headers are not read again).

    Raises:
        SlotsmithError: A slot file, mixed key conventions, unknown diffusers
            keys, or two keys that map to one canonical name.
    """
    if any(METADATA_KEY in h.metadata for h in ckpt.files):
        raise SlotsmithError(f"{ckpt.path}: is a slot, not a base checkpoint")
    try:
        convention = detect_convention(ckpt.tensors)
    except SlotsmithError as e:
        raise SlotsmithError(f"{ckpt.path}: {e}") from None
    tensors: dict[str, TensorSpec] = {}
    keys: dict[str, str] = {}
    for key, (_, info) in ckpt.tensors.items():
        try:
            name = to_canonical(key, convention)
        except SlotsmithError as e:
            raise SlotsmithError(f"{ckpt.path}: {e}") from None
        if name in tensors:
            raise SlotsmithError(f"{ckpt.path}: keys {keys[name]!r} and {key!r} are the same tensor {name!r}")
        tensors[name] = TensorSpec(name, info.shape, info.dtype)
        keys[name] = key
    return Inventory(str(ckpt.path), tensors, ckpt, convention, keys)


def _layout_error(path: Path, problem: str) -> SlotsmithError:
    return SlotsmithError(f"{path}: {problem}")


def inventory_from_layout_file(path: str | os.PathLike) -> Inventory:
    """Inventory a layout YAML (``tensors: {name: {shape: [...], dtype: ...}}``).

    Raises:
        SlotsmithError: The file is missing, too large, not YAML, or has a
            field of the wrong type.
    """
    path = Path(path)
    doc = load_yaml(path, LAYOUT_CAP, "layout file")
    if not isinstance(doc, dict) or not isinstance(doc.get("tensors"), dict) or not doc["tensors"]:
        raise _layout_error(path, "a layout needs a non-empty 'tensors' mapping")
    tensors: dict[str, TensorSpec] = {}
    for name, spec in doc["tensors"].items():
        if not isinstance(name, str) or not isinstance(spec, dict):
            raise _layout_error(path, f"tensor {safe_repr(name)}: needs a mapping with shape and dtype")
        shape, dtype = spec.get("shape"), spec.get("dtype")
        if not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape):
            raise _layout_error(path, f"tensor {name!r}: shape must be a list of non-negative integers")
        if len(shape) > MAX_DIMS or bounded_numel(shape, MAX_NUMEL) is None:
            raise _layout_error(path, f"tensor {name!r}: shape has more than {MAX_DIMS} dimensions or {MAX_NUMEL} elements")
        if not isinstance(dtype, str) or dtype not in DTYPE_SIZES:
            raise _layout_error(path, f"tensor {name!r}: unknown dtype {safe_repr(dtype)}")
        tensors[name] = TensorSpec(name, tuple(shape), dtype)
    experts = doc.get("experts") or {}
    if not isinstance(experts, dict) or not all(
        isinstance(r, list) and len(r) == 2 and all(isinstance(x, (int, float)) for x in r)
        for r in experts.values()
    ):
        raise _layout_error(path, "'experts' must map names to [low, high] timestep ranges")
    source = doc.get("name") if isinstance(doc.get("name"), str) else str(path)
    return Inventory(source, tensors, experts={k: (float(a), float(b)) for k, (a, b) in experts.items()})


def inventory_from_known_model(name: str) -> Inventory:
    """Inventory a shipped layout, built from the layout generator's function.

    The shipped YAML files are what ``scripts/gen_layouts.py`` writes from the
    same function (a test checks they are equal), so this is the file's
    content without parsing 70 KB of YAML in pure Python (~1 s).

    Args:
        name: A key of ``KNOWN_MODELS``.

    Returns:
        The layout's inventory, named after the model.
    """
    model = KNOWN_MODELS[name]
    tensors = {n: TensorSpec(n, shape, model.dtype) for n, shape in wan_tensor_shapes(model.config).items()}
    return Inventory(model.name, tensors, experts=dict(model.experts or {}))


def load_inventory(model: str) -> Inventory:
    """Resolve a MODEL argument: a shipped layout name, a layout YAML, or a checkpoint.

    Raises:
        SlotsmithError: Nothing of that name exists, or the file is malformed.
    """
    if model in KNOWN_MODELS:
        return inventory_from_known_model(model)
    path = Path(model)
    if path.suffix in (".yaml", ".yml"):
        return inventory_from_layout_file(path)
    if not path.exists():
        known = ", ".join(KNOWN_MODELS)
        raise SlotsmithError(f"{model}: no such file, and not a known layout ({known})")
    return inventory_from_checkpoint(path)
