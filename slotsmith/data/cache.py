"""The training cache: VAE latents and text embeddings on disk.

``slotsmith cache`` writes it, ``slotsmith train`` reads it. Layout::

    CACHE/index.json                  {"format": "slotsmith-cache/1",
                                       "latent_channels": C, "text_dim": D,
                                       "sources_from": "..",
                                       "items": [{"latents": "latents/<hex>.safetensors",
                                                  "text": "text/<hex>.safetensors",
                                                  "source": "...", "caption": "...",
                                                  "repeats": 1}, ...]}
    CACHE/latents/<hex>.safetensors   tensor "latents": float32 [C, F, H, W] (normalised)
    CACHE/text/<hex>.safetensors      tensor "context": float32 [L, D], L <= 512 real tokens

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
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save

from slotsmith.data.config import MAX_REPEATS
from slotsmith.errors import SlotsmithError
from slotsmith.io.files import parse_json_object, read_input
from slotsmith.io.header import is_int, read_header
from slotsmith.io.writer import atomic_file, write_all, write_error

CACHE_FORMAT = "slotsmith-cache/1"
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
    cache_dir, items: list[dict], latent_channels: int, text_dim: int, sources_from: str | None = None
) -> None:
    """Write ``index.json`` atomically (after every item file exists).

    Args:
        cache_dir: The cache folder.
        items: Dicts with ``latents``, ``text`` (relative paths), and
            optionally ``source``, ``caption``, ``repeats`` (default 1).
        latent_channels: C of every latent.
        text_dim: Embedding size of every context.
        sources_from: The folder the items' relative ``source`` paths start
            from, relative to ``cache_dir`` (the dataset YAML's folder).

    Raises:
        SlotsmithError: Writing failed.
    """
    doc = {
        "format": CACHE_FORMAT,
        "latent_channels": int(latent_channels),
        "text_dim": int(text_dim),
        **({"sources_from": sources_from} if sources_from is not None else {}),
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


def _check_tensor(cache_dir: Path, rel, name: str, ndim: int, dim_index: int, dim_value: int, where: str):
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
    if doc.get("format") != CACHE_FORMAT:
        raise SlotsmithError(f"{path}: format {doc.get('format')!r} is not {CACHE_FORMAT!r}")
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
        self._entries = [item for item in self.index["items"] for _ in range(item["repeats"])]

    def __len__(self) -> int:
        return len(self._entries)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        item = self._entries[i]
        latents = _load_one(self.cache_dir / item["latents"], "latents")
        context = _load_one(self.cache_dir / item["text"], "context")
        padded = context.new_zeros(TEXT_LEN, context.shape[1])
        padded[: context.shape[0]] = context
        return {"latents": latents, "context": padded}
