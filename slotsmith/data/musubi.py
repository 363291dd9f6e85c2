"""musubi-tuner's Wan caches: finding and checking its latent and text-encoder files for a dataset item.

musubi-tuner (``wan_cache_latents.py``, ``wan_cache_text_encoder_outputs.py``)
writes into each dataset's ``cache_directory`` (by default its media folder):

- per image, ``{stem}_{W:04d}x{H:04d}_wan.safetensors`` (the image's own
  size), and per video clip, ``{stem}_{start:05d}-{frames:03d}_{W:04d}x{H:04d}_wan.safetensors``
  (the size of the frames as it read them: the bucket size in its current
  versions, the video's own in older ones). Tensor ``latents_{F}x{H}x{W}_{dtype}``,
  ``[C, F, H, W]`` normalised as Wan does; with ``--i2v`` also ``clip_{dtype}``
  and ``latents_image_...``, which are not read here (slotsmith encodes its own
  image conditioning). Metadata ``architecture`` (``wan``), ``width``,
  ``height``, ``format_version``, and for a clip ``frame_count``.
- per media file, ``{stem}_wan_te.safetensors``: tensor ``varlen_t5_{dtype}``,
  ``[L, 4096]``, the caption's real tokens; metadata ``architecture``,
  ``caption1`` (the caption) and ``format_version``.

Nothing is guessed: a file is taken only when its name, metadata, tensor
names, dtype, shape and values all fit the item; otherwise the caller
encodes the item and reports the reason. Whether musubi-tuner encoded with
the same VAE, encoder and resizing cannot be read from the files: the
caller encodes one item itself and compares (`check_same_encoding`).
Every read goes through `slotsmith.io.header`.
"""

from __future__ import annotations

import os
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import torch

from slotsmith.data.cache import TEXT_LEN
from slotsmith.data.encoders import DTYPES, clean_caption
from slotsmith.data.media import Clip, Source
from slotsmith.digest import digest_bytes, digest_json
from slotsmith.errors import SlotsmithError
from slotsmith.io.header import SafetensorsHeader, read_header, read_tensor_bytes

ARCHITECTURE = "wan"
"""musubi-tuner's ``architecture`` metadata and file-name suffix for Wan (2.1 and 2.2)."""

FORMAT_MAJOR = "1"
"""The ``format_version`` major number read here (musubi-tuner writes ``1.0.1``)."""

TOLERANCE = 0.1
"""Largest relative difference (L2) between musubi-tuner's encoding of an item and slotsmith's.

Bigger than what the same VAE and encoder give: bfloat16 against float32,
and musubi-tuner's resize kernels (OpenCV's area filter to shrink, Lanczos
to enlarge) against slotsmith's (Lanczos, bicubic). Smaller than another VAE,
unnormalised latents, another image or another text encoder. Measured with
the tiny test VAE on ``docs/demo-samples.png`` shrunk to 256x160: bfloat16
0.2 %, a box filter instead of Lanczos 4 %, the crop one output pixel off
11 %, the image mirrored 22 %, another VAE 185 %.
"""

SAFETENSORS_DTYPES = {"float32": "F32", "bfloat16": "BF16", "float16": "F16"}
"""musubi-tuner's dtype suffixes (torch names) -> safetensors dtypes, for the float types it caches in."""

_LATENTS = re.compile(r"latents_(\d+)x(\d+)x(\d+)_([a-z0-9]+)")
_TEXT = re.compile(r"varlen_t5_([a-z0-9]+)")
_NOT_READ = re.compile(r"(latents_image_\d+x\d+x\d+|clip)_[a-z0-9]+")
"""Image-to-video extras (first-frame latents, CLIP features): slotsmith encodes its own."""
_REFUSED = re.compile(r"(latents_control_\d+x\d+x\d+|f_indices)_[a-z0-9]+")
"""Control latents and one-frame indices: training slotsmith does not do."""


@dataclass(frozen=True)
class Found:
    """A tensor taken from a musubi-tuner cache file.

    Attributes:
        path: The file.
        tensor: The tensor as stored (its own dtype).
        key: Digest of its name, shape, dtype and bytes: part of the content
            address it is stored under in slotsmith's cache.
    """

    path: Path
    tensor: torch.Tensor
    key: str


def has_cache_files(folder: Path | None) -> bool:
    """Whether ``folder`` holds any musubi-tuner Wan cache file (latents or text)."""
    if folder is None or not folder.is_dir():
        return False
    return any(folder.glob(f"*_{ARCHITECTURE}.safetensors")) or any(folder.glob(f"*_{ARCHITECTURE}_te.safetensors"))


def shared_stems(sources: list[Source]) -> set[tuple[Path, str]]:
    """``(musubi cache folder, file stem)`` pairs several sources share.

    musubi-tuner names its files by stem alone, so ``a.png`` and ``a.jpg``
    (or two folders' ``a.png`` with one ``cache_directory``) would share
    theirs: such files belong to no one item for sure and are never taken.
    """
    counts = Counter((s.dataset.musubi_cache, s.path.stem) for s in sources if s.dataset.musubi_cache)
    return {pair for pair, n in counts.items() if n > 1}


def _open(path: Path) -> tuple[SafetensorsHeader | None, str | None]:
    """The header of a musubi-tuner Wan cache file, or None and why it is not one."""
    try:
        header = read_header(path)
    except SlotsmithError as e:
        return None, str(e)
    arch = header.metadata.get("architecture")
    if arch != ARCHITECTURE:
        return None, f"{path}: architecture {arch!r} in its metadata, not Wan's {ARCHITECTURE!r}"
    version = header.metadata.get("format_version", "")
    if version.split(".")[0] != FORMAT_MAJOR:
        return None, f"{path}: format_version {version!r}, not {FORMAT_MAJOR}.x"
    return header, None


def _read(header: SafetensorsHeader, name: str, dtype: str) -> tuple[Found | None, str | None]:
    """The tensor ``name`` (musubi dtype suffix ``dtype``), refused when its dtype disagrees or it is not finite."""
    info = header.tensors[name]
    if dtype not in SAFETENSORS_DTYPES:
        return None, f"{header.path}: tensor {name!r}: dtype {dtype!r} is not one of {', '.join(SAFETENSORS_DTYPES)}"
    if info.dtype != SAFETENSORS_DTYPES[dtype]:
        return None, f"{header.path}: tensor {name!r} is stored as {info.dtype}, not the {dtype} its name says"
    try:
        raw = read_tensor_bytes(header, name)
    except SlotsmithError as e:
        return None, str(e)
    tensor = torch.frombuffer(bytearray(raw), dtype=DTYPES[dtype]).reshape(info.shape)
    if not torch.isfinite(tensor).all():
        return None, f"{header.path}: tensor {name!r} holds NaN or inf"
    key = digest_json({"name": name, "shape": list(info.shape), "dtype": info.dtype, "bytes": digest_bytes(raw)})
    return Found(header.path, tensor, key), None


def _one_key(header: SafetensorsHeader, wanted: re.Pattern, what: str) -> tuple[re.Match | None, str | None]:
    """The one tensor name matching ``wanted``; other names must be known extras."""
    matches, problems = [], []
    for name in header.tensors:
        if m := wanted.fullmatch(name):
            matches.append(m)
        elif _REFUSED.fullmatch(name):
            problems.append(f"{header.path}: holds {name!r} (control or one-frame training, not done here)")
        elif not _NOT_READ.fullmatch(name):
            problems.append(f"{header.path}: unexpected tensor {name!r}")
    if problems:
        return None, problems[0]
    if len(matches) != 1:
        found = ", ".join(repr(m.group(0)) for m in matches) or "none"
        return None, f"{header.path}: needs exactly one {what} tensor, found {found}"
    return matches[0], None


def latents_file(source: Source, clip: Clip) -> tuple[Path | None, str | None]:
    """Where musubi-tuner cached the latents of one of ``source``'s clips.

    Args:
        source: The media file (its dataset has a ``musubi_cache``).
        clip: One of its clips, as `slotsmith.data.media.read_clips` made it.

    Returns:
        ``(path, None)``, or ``(None, why not)``: no such file, or a clip
        whose frames musubi-tuner's names cannot say exactly.
    """
    folder, stem = source.dataset.musubi_cache, source.path.stem
    _, frames, height, width = clip.pixels.shape
    if not source.is_video:
        names = [f"{stem}_{clip.source_size[0]:04d}x{clip.source_size[1]:04d}_{ARCHITECTURE}.safetensors"]
    else:
        if source.dataset.source_fps is not None:
            return None, f"{source.path}: source_fps is set: musubi-tuner picks other frames; its clips are not taken"
        start = clip.frames[0]
        if clip.frames != list(range(start, start + frames)):
            return None, f"{source.path}: frames {clip.frames} are not consecutive"
        # musubi-tuner names a clip by the size of the frames it read: the bucket's now, the video's before.
        sizes = dict.fromkeys([(width, height), tuple(clip.source_size)])
        names = [f"{stem}_{start:05d}-{frames:03d}_{w:04d}x{h:04d}_{ARCHITECTURE}.safetensors" for w, h in sizes]
    found = [folder / name for name in names if (folder / name).is_file()]
    if len(found) > 1:
        return None, f"{found[0]} and {found[1].name}: two files for one clip; neither is taken"
    if not found:
        return None, f"{source.path}: no {names[0]} in {folder}"
    return found[0], None


def find_latents(source: Source, clip: Clip, expected: tuple[int, ...]) -> tuple[Found | None, str | None]:
    """musubi-tuner's latents of one clip, when every check passes.

    Args:
        source: The media file.
        clip: One of its clips.
        expected: The latents' shape ``[C, F, H, W]`` slotsmith's VAE gives the clip.

    Returns:
        ``(found, None)``, or ``(None, why not)`` (one line naming the file).
    """
    path, why = latents_file(source, clip)
    if path is None:
        return None, why
    header, why = _open(path)
    if header is None:
        return None, why
    size = path.name.rsplit("_", 2)[-2]  # WWWWxHHHH
    meta = header.metadata
    if f"{meta.get('width')}x{meta.get('height')}" != "x".join(str(int(v)) for v in size.split("x")):
        return None, f"{path}: its metadata says {meta.get('width')}x{meta.get('height')}, its name {size}"
    frames = clip.pixels.shape[1]
    if source.is_video and meta.get("frame_count") != str(frames):
        return None, f"{path}: frame_count {meta.get('frame_count')!r} in its metadata, the clip has {frames}"
    match, why = _one_key(header, _LATENTS, "latents_FxHxW_dtype")
    if match is None:
        return None, why
    shape = header.tensors[match.group(0)].shape
    named = tuple(int(match.group(i)) for i in (1, 2, 3))
    if len(shape) != 4 or shape[1:] != named:
        return None, f"{path}: tensor {match.group(0)!r} has shape {list(shape)}, not [C, {', '.join(map(str, named))}]"
    if shape != tuple(expected):
        return None, f"{path}: latents of shape {list(shape)}, slotsmith's VAE makes {list(expected)} for this item"
    if os.stat(path).st_mtime_ns < os.stat(source.path).st_mtime_ns:
        return None, f"{path}: older than {source.path.name} (changed after musubi-tuner cached it)"
    return _read(header, match.group(0), match.group(4))


def find_text(source: Source, text_dim: int | None) -> tuple[Found | None, str | None]:
    """musubi-tuner's text-encoder output for ``source``'s caption, when every check passes.

    Args:
        source: The media file (its dataset has a ``musubi_cache``).
        text_dim: The embedding size slotsmith's encoder gives, when known.

    Returns:
        ``(found, None)``: ``[L, D]`` as stored; or ``(None, why not)``.
    """
    path = source.dataset.musubi_cache / f"{source.path.stem}_{ARCHITECTURE}_te.safetensors"
    if not path.is_file():
        return None, f"{source.path}: no {path.name} in {path.parent}"
    header, why = _open(path)
    if header is None:
        return None, why
    caption = header.metadata.get("caption1")
    # The same text reaches the encoder: both clean captions this way (whitespace, HTML entities).
    if caption is None or clean_caption(caption) != clean_caption(source.caption):
        return None, f"{path}: made for another caption ({(caption or '')[:40]!r}...)"
    match, why = _one_key(header, _TEXT, "varlen_t5_dtype")
    if match is None:
        return None, why
    shape = header.tensors[match.group(0)].shape
    if len(shape) != 2 or not 0 < shape[0] <= TEXT_LEN or (text_dim is not None and shape[1] != text_dim):
        dim = f"D = {text_dim}" if text_dim is not None else "D"
        return None, f"{path}: tensor {match.group(0)!r} has shape {list(shape)}, not [L <= {TEXT_LEN}, {dim}]"
    return _read(header, match.group(0), match.group(1))


def relative_difference(ours: torch.Tensor, theirs: torch.Tensor) -> float:
    """``||ours - theirs|| / ||ours||`` (L2, in float32); infinite when the shapes differ."""
    if ours.shape != theirs.shape:
        return float("inf")
    ours, theirs = ours.float(), theirs.float()
    return float((ours - theirs).norm() / ours.norm().clamp_min(1e-12))


def check_same_encoding(found: Found, ours: torch.Tensor, source: Source, what: str) -> None:
    """Refuse musubi-tuner's cache when one item's encoding differs from slotsmith's own.

    Args:
        found: musubi-tuner's tensor for the item.
        ours: slotsmith's encoding of the same item.
        source: The item's media file.
        what: ``latents`` or ``text embedding``.

    Raises:
        SlotsmithError: The relative difference is over `TOLERANCE`.
    """
    diff = relative_difference(ours, found.tensor)
    if diff > TOLERANCE:
        shapes = f"shape {list(found.tensor.shape)} against {list(ours.shape)}"
        shown = f"{diff:.2f}" if diff != float("inf") else shapes
        raise SlotsmithError(
            f"{found.path}: musubi-tuner's {what} of {source.path.name} differ from slotsmith's encoding "
            f"(relative difference {shown}, over {TOLERANCE}): they were made with another model, settings "
            "or resizing; pass --no-reuse-musubi to encode everything with slotsmith's encoders"
        )
