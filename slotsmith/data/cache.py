"""The training cache: VAE latents and text embeddings on disk.

``slotsmith cache`` writes it, ``slotsmith train`` reads it. Layout::

    CACHE/index.json                  {"format": "slotsmith-cache/2",
                                       "latent_channels": C, "text_dim": D,
                                       "sources_from": "..",
                                       "image_conditioning": null or {"mode": "i2v"|"ti2v",
                                                  "channels": K, "clip_dim": E or null},
                                       "items": [{"latents": "latents/<hex>.safetensors",
                                                  "text": "text/<hex>.safetensors",
                                                  "condition": "condition/<hex>.safetensors",
                                                  "clip": "clip/<hex>.safetensors",
                                                  "source": "...", "caption": "...",
                                                  "repeats": 1,
                                                  "musubi": {"latents": "...", "text": "..."}}, ...],
                                       "musubi": {"latents": n, "texts": n, "folders": [...]}}
    CACHE/latents/<hex>.safetensors   tensor "latents": float32 [C, F, H, W] (normalised)
    CACHE/text/<hex>.safetensors      tensor "context": float32 [L, D], L <= 512 real tokens
    CACHE/condition/<hex>.safetensors tensor "condition": float32, image-to-video caches only:
                                      mode i2v: [4 + C, F, H, W], the 4-channel first-frame
                                      mask then the VAE latents of the first frame followed by
                                      black frames (the 20 extra input channels of Wan 2.1 I2V
                                      and Wan 2.2 I2V A14B); mode ti2v: [C, 1, H, W], the
                                      first frame's latents (Wan 2.2 TI2V 5B keeps them clean)
    CACHE/clip/<hex>.safetensors      tensor "image_embeds": float32 [N, E], the first frame's
                                      CLIP features (penultimate hidden states; Wan 2.1 I2V)

A ``slotsmith-cache/1`` index (no ``image_conditioning``) still reads: as a
text-to-video cache.

``musubi`` (optional, informational) says which items' latents and texts were
taken from musubi-tuner's cache files (paths relative to ``sources_from``, as
``source``), and how many; their files here are the same float32 tensors as
any other (see `slotsmith.data.musubi`).

Each item's ``source`` is relative to the folder ``sources_from`` names
(relative to the cache folder: the dataset YAML's folder), so a dataset folder
moved or copied with its cache still trains; absolute sources (older caches)
stay as they are.

``<hex>`` is a content address chosen by the writer (xxh3-128 of the source
bytes and every setting that affects the item), so re-runs skip unchanged
items. The trainer pads each context to 512 tokens with zeros, as Wan does.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save

from slotsmith.data.config import MAX_REPEATS
from slotsmith.errors import SlotsmithError
from slotsmith.io.files import parse_json_object, read_input
from slotsmith.io.header import is_int, read_header
from slotsmith.io.writer import atomic_file, write_all, write_error

CACHE_FORMAT = "slotsmith-cache/2"
READABLE_FORMATS = ("slotsmith-cache/1", CACHE_FORMAT)
"""Version 1 predates image conditioning: its caches read as text-to-video caches."""
I2V_MASK_CHANNELS = 4
"""The first-frame mask's channels in front of an ``i2v`` condition (Wan's 4x temporal compression)."""
CONDITIONING_MODES = ("i2v", "ti2v")
TEXT_LEN = 512
"""Wan's UMT5 context length: contexts are zero-padded to this many tokens."""

INDEX_NAME = "index.json"
INDEX_CAP = 100_000_000
"""Largest cache index read, in bytes."""
_KEY_CHARS = set("0123456789abcdefABCDEF-_")


def _atomic_write(target: Path, payload: bytes) -> None:
    """Write ``payload`` atomically; items are content-addressed, so replacing is safe.

    Raises:
        SlotsmithError: Writing failed (a full disk, a folder that cannot be
            made); nothing was written.
    """
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise write_error(target, e) from None
    with atomic_file(target, force=True) as fd:
        write_all(fd, payload)


def _write_tensor(cache_dir, sub: str, key: str, name: str, tensor: torch.Tensor, ndim: int) -> str:
    if not key or not set(key) <= _KEY_CHARS:
        raise SlotsmithError(f"cache key {key!r} must be a non-empty hex string")
    if tensor.ndim != ndim:
        raise SlotsmithError(f"cache {name} must have {ndim} dimensions, got shape {tuple(tensor.shape)}")
    rel = f"{sub}/{key}.safetensors"
    data = {name: tensor.detach().to(torch.float32).contiguous().cpu()}
    _atomic_write(Path(cache_dir) / rel, save(data))
    return rel


def write_latents(cache_dir, key: str, latents: torch.Tensor) -> str:
    """Store one item's normalised VAE latents.

    Args:
        cache_dir: The cache folder.
        key: Content address (hex) of the item.
        latents: ``[C, F, H, W]``; stored as float32.

    Returns:
        The path relative to ``cache_dir``, for the index.

    Raises:
        SlotsmithError: Bad key or shape, or writing failed.
    """
    return _write_tensor(cache_dir, "latents", key, "latents", latents, 4)


def write_text(cache_dir, key: str, context: torch.Tensor) -> str:
    """Store one caption's text embedding (real tokens only, unpadded).

    Args:
        cache_dir: The cache folder.
        key: Content address (hex) of the caption and encoder settings.
        context: ``[L, text_dim]`` with ``L <= 512``; stored as float32.

    Returns:
        The path relative to ``cache_dir``, for the index.

    Raises:
        SlotsmithError: Bad key, shape or length, or writing failed.
    """
    if context.ndim == 2 and not 0 < context.shape[0] <= TEXT_LEN:
        raise SlotsmithError(f"cache context must have 1..{TEXT_LEN} tokens, got {context.shape[0]}")
    return _write_tensor(cache_dir, "text", key, "context", context, 2)


def write_index(
    cache_dir, items: list[dict], latent_channels: int, text_dim: int, sources_from: str | None = None,
    conditioning: ImageConditioning | None = None, musubi: dict | None = None,
) -> None:
    """Write ``index.json`` atomically (after every item file exists).

    Args:
        cache_dir: The cache folder.
        items: Dicts with ``latents``, ``text`` (relative paths), with an
            image conditioning ``condition`` (and ``clip`` when it has a
            ``clip_dim``), and optionally ``source``, ``caption``,
            ``repeats`` (default 1).
        latent_channels: C of every latent.
        text_dim: Embedding size of every context.
        sources_from: The folder the items' relative ``source`` paths start
            from, relative to ``cache_dir`` (the dataset YAML's folder).
        conditioning: The image conditioning every item has; None for a
            text-to-video cache.
        musubi: How many items' latents and texts came from musubi-tuner's
            cache, and its folders (``{"latents": n, "texts": n, "folders":
            [...]}``); None when none did.

    Raises:
        SlotsmithError: Writing failed.
    """
    doc = {
        "format": CACHE_FORMAT,
        "latent_channels": int(latent_channels),
        "text_dim": int(text_dim),
        **({"sources_from": sources_from} if sources_from is not None else {}),
        "image_conditioning": conditioning.to_json() if conditioning else None,
        **({"musubi": musubi} if musubi else {}),
        "items": [{"repeats": 1, **item} for item in items],
    }
    payload = json.dumps(doc, indent=1, ensure_ascii=False).encode()
    _atomic_write(Path(cache_dir) / INDEX_NAME, payload)


def source_path(cache_dir, index: dict, item: dict) -> Path:
    """Where an item's source file is now: its ``source`` joined to the index's ``sources_from``.

    Args:
        cache_dir: The cache folder.
        index: Its index document.
        item: One of its items.

    Returns:
        The source's path (lexically normalised; an absolute source as it is).
    """
    root = Path(cache_dir) / str(index.get("sources_from", "."))
    return Path(os.path.normpath(root / str(item.get("source", ""))))


def _check_tensor(cache_dir: Path, rel, name: str, ndim: int, dim_index: int, dim_value: int, where: str) -> list:
    if not isinstance(rel, str) or Path(rel).is_absolute() or ".." in Path(rel).parts:
        raise SlotsmithError(f"{cache_dir / INDEX_NAME}: {where}: bad path {rel!r}")
    path = cache_dir / rel
    if not path.is_file():
        raise SlotsmithError(f"{path}: missing cache file ({where})")
    info = read_header(path).tensors.get(name)
    if info is None:
        raise SlotsmithError(f"{path}: has no tensor {name!r}")
    if info.dtype != "F32" or len(info.shape) != ndim or info.shape[dim_index] != dim_value:
        raise SlotsmithError(
            f"{path}: tensor {name!r} is {info.dtype} {list(info.shape)}, expected F32 with "
            f"{ndim} dims and size {dim_value} in dim {dim_index}"
        )
    return list(info.shape)


def load_index(cache_dir) -> dict:
    """Read and validate a cache folder's index (and every file it names).

    Args:
        cache_dir: The cache folder.

    Returns:
        The index document, items with ``repeats`` filled in.

    Raises:
        SlotsmithError: No such folder, missing or malformed index, missing
            or mis-shaped files.
    """
    cache_dir = Path(cache_dir)
    if not cache_dir.is_dir():
        raise SlotsmithError(f"{cache_dir}: no such cache folder")
    path = cache_dir / INDEX_NAME
    if not os.path.lexists(path):  # anything else there (a FIFO, a link loop) is refused by read_input
        raise SlotsmithError(f"{path}: no cache index (run `slotsmith cache` first)")
    doc = parse_json_object(read_input(path, INDEX_CAP, "cache index"), str(path))
    if doc.get("format") not in READABLE_FORMATS:
        raise SlotsmithError(f"{path}: format {doc.get('format')!r} is not one of {', '.join(READABLE_FORMATS)}")
    conditioning = ImageConditioning.from_json(doc.get("image_conditioning"), path)
    channels, text_dim, items = doc.get("latent_channels"), doc.get("text_dim"), doc.get("items")
    for field, value in (("latent_channels", channels), ("text_dim", text_dim)):
        if not is_int(value) or value <= 0:
            raise SlotsmithError(f"{path}: {field} must be a positive integer")
    if not isinstance(items, list) or not items:
        raise SlotsmithError(f"{path}: the cache holds no items")
    for i, item in enumerate(items):
        where = f"item {i}"
        if not isinstance(item, dict):
            raise SlotsmithError(f"{path}: {where} is not an object")
        repeats = item.setdefault("repeats", 1)
        if not is_int(repeats) or not 1 <= repeats <= MAX_REPEATS:
            raise SlotsmithError(f"{path}: {where}: repeats must be an integer in 1..{MAX_REPEATS}")
        _check_tensor(cache_dir, item.get("latents"), "latents", 4, 0, channels, where)
        _check_tensor(cache_dir, item.get("text"), "context", 2, 1, text_dim, where)
        if conditioning is not None:
            _check_conditioning(cache_dir, item, conditioning, where)
    return doc


def _load_one(path: Path, name: str) -> torch.Tensor:
    """One cached tensor, refused when it holds NaN or inf (it would poison every step it is in)."""
    with safe_open(str(path), framework="pt") as f:
        tensor = f.get_tensor(name)
    if not torch.isfinite(tensor).all():
        raise SlotsmithError(
            f"{path}: {name} hold non-finite values (NaN or inf); encode this item again or leave it out"
        )
    return tensor


class CachedDataset(torch.utils.data.Dataset):
    """The cache as a dataset; each item listed ``repeats`` times.

    Each sample is ``{"latents": [C, F, H, W], "context": [512, text_dim]}``,
    float32, the context zero-padded past its real tokens.
    """

    def __init__(self, cache_dir, index: dict | None = None):
        """Open a cache folder.

        Args:
            cache_dir: The cache folder.
            index: What ``load_index(cache_dir)`` returned, when the caller
                has it already (its files are then not checked again).

        Raises:
            SlotsmithError: See ``load_index``.
        """
        self.cache_dir = Path(cache_dir)
        self.index = load_index(self.cache_dir) if index is None else index
        self.latent_channels = self.index["latent_channels"]
        self.text_dim = self.index["text_dim"]
        self.conditioning = ImageConditioning.from_json(self.index.get("image_conditioning"), self.cache_dir)
        self._entries = [item for item in self.index["items"] for _ in range(item["repeats"])]

    def __len__(self) -> int:
        return len(self._entries)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        item = self._entries[i]
        latents = _load_one(self.cache_dir / item["latents"], "latents")
        context = _load_one(self.cache_dir / item["text"], "context")
        padded = context.new_zeros(TEXT_LEN, context.shape[1])
        padded[: context.shape[0]] = context
        sample = {"latents": latents, "context": padded}
        if self.conditioning is not None:
            sample["condition"] = _load_one(self.cache_dir / item["condition"], "condition")
            if self.conditioning.clip_dim:
                sample["image_embeds"] = _load_one(self.cache_dir / item["clip"], "image_embeds")
        return sample


# ---------------------------------------------------------------- image conditioning


@dataclass(frozen=True)
class ImageConditioning:
    """What an image-to-video cache holds beside each item's latents.

    Attributes:
        mode: ``i2v``: a ``[4 + C, F, H, W]`` condition (first-frame mask and
            latents) concatenated to the noisy latents along channels (Wan 2.1
            I2V 14B, Wan 2.2 I2V A14B). ``ti2v``: the first frame's ``[C, 1,
            H, W]`` latents, kept clean in the first latent frame (Wan 2.2
            TI2V 5B).
        channels: Channels of every condition tensor.
        clip_dim: Size of the CLIP image features each item has (Wan 2.1
            I2V), or None when there are none.
    """

    mode: str
    channels: int
    clip_dim: int | None = None

    def to_json(self) -> dict:
        """The index's ``image_conditioning`` object."""
        return {"mode": self.mode, "channels": self.channels, "clip_dim": self.clip_dim}

    @classmethod
    def from_json(cls, doc, path) -> ImageConditioning | None:
        """Read an index's ``image_conditioning`` (None or absent: a text-to-video cache).

        Raises:
            SlotsmithError: A malformed object; the message names ``path``.
        """
        if doc is None:
            return None
        if not isinstance(doc, dict) or doc.get("mode") not in CONDITIONING_MODES:
            raise SlotsmithError(f"{path}: image_conditioning needs a mode, one of {', '.join(CONDITIONING_MODES)}")
        channels, clip_dim = doc.get("channels"), doc.get("clip_dim")
        if not is_int(channels) or channels <= 0 or not (clip_dim is None or is_int(clip_dim) and clip_dim > 0):
            raise SlotsmithError(f"{path}: image_conditioning: channels and clip_dim must be positive integers")
        return cls(doc["mode"], channels, clip_dim)

    def describe(self) -> str:
        """A few words for messages."""
        what = "concatenated first-frame conditioning" if self.mode == "i2v" else "first-frame (TI2V) conditioning"
        return what + (" with CLIP image features" if self.clip_dim else "")


def write_condition(cache_dir, key: str, condition: torch.Tensor) -> str:
    """Store one item's image condition (see `ImageConditioning` for its shape).

    Args:
        cache_dir: The cache folder.
        key: Content address (hex) of the condition.
        condition: ``[K, F, H, W]``; stored as float32.

    Returns:
        The path relative to ``cache_dir``, for the index.

    Raises:
        SlotsmithError: Bad key or shape, or writing failed.
    """
    return _write_tensor(cache_dir, "condition", key, "condition", condition, 4)


def write_clip_embeds(cache_dir, key: str, embeds: torch.Tensor) -> str:
    """Store one item's CLIP image features.

    Args:
        cache_dir: The cache folder.
        key: Content address (hex) of the features.
        embeds: ``[N, E]``; stored as float32.

    Returns:
        The path relative to ``cache_dir``, for the index.

    Raises:
        SlotsmithError: Bad key or shape, or writing failed.
    """
    return _write_tensor(cache_dir, "clip", key, "image_embeds", embeds, 2)


def _check_conditioning(cache_dir: Path, item: dict, conditioning: ImageConditioning, where: str) -> None:
    """An item's condition (and CLIP features) exist and fit its latents."""
    latents = read_header(cache_dir / item["latents"]).tensors["latents"].shape
    shape = _check_tensor(cache_dir, item.get("condition"), "condition", 4, 0, conditioning.channels, where)
    frames = latents[1] if conditioning.mode == "i2v" else 1
    if shape[1:] != [frames, *latents[2:]]:
        raise SlotsmithError(
            f"{cache_dir / item['condition']}: condition {shape} does not fit the latents {list(latents)} ({where})"
        )
    if conditioning.clip_dim:
        _check_tensor(cache_dir, item.get("clip"), "image_embeds", 2, 1, conditioning.clip_dim, where)
