"""The dataset YAML, media discovery, and reading images and clips as pixels.

A dataset YAML names one or more datasets (an image folder, a video folder or
a JSONL list) and how to turn each file into training clips (resolution,
aspect-ratio buckets, frame extraction). Everything is validated up front with
errors that name the YAML file and the key. Reading media is separate from
encoding it: this module yields pixel tensors in ``[-1, 1]``, shaped
``[3, F, H, W]``, and `slotsmith.caching` encodes them.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from slotsmith.errors import SlotsmithError

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
VIDEO_EXTENSIONS = (".mp4", ".mov", ".mkv", ".webm", ".avi")
FRAME_EXTRACTIONS = ("head", "uniform", "chunk")
WAN_FPS = 16
"""Wan's training frame rate: clips with a ``source_fps`` are resampled to it."""
DEFAULT_ALIGN = 16
"""Pixel sizes must be multiples of this: the Wan 2.1 VAE's /8 times the DiT's patch 2."""

_SOURCE_KEYS = ("image_directory", "video_directory", "jsonl_file")
_DATASET_KEYS = {
    "caption_extension": ".txt",
    "resolution": None,
    "enable_bucket": False,
    "bucket_no_upscale": False,
    "repeats": 1,
    "batch_size": 1,
    "target_frames": [81],
    "frame_extraction": "head",
    "frame_sample": 1,
    "source_fps": None,
}
_TOP_KEYS = ("cache_dir", "general", "datasets")


@dataclass(frozen=True)
class DatasetSpec:
    """One validated dataset of the YAML.

    Attributes:
        index: Position in ``datasets`` (for messages).
        kind: ``image``, ``video`` or ``jsonl``.
        path: The folder or JSONL file, absolute.
        caption_extension: Caption file suffix beside each media file.
        resolution: ``(W, H)``: the size, or with buckets the target area.
        enable_bucket: Pick the aspect-ratio bucket closest to each file's.
        bucket_no_upscale: With buckets, never enlarge a smaller file.
        repeats: How often each item counts per epoch.
        batch_size: Items per batch for this dataset (recorded in the index).
        target_frames: Clip lengths in frames, each 4N+1 (videos only;
            an image is always one frame).
        frame_extraction: ``head``, ``uniform`` or ``chunk``.
        frame_sample: Clips per length for ``uniform``.
        source_fps: When set, the clip is resampled from this rate to 16 fps.
    """

    index: int
    kind: str
    path: Path
    caption_extension: str
    resolution: tuple[int, int]
    enable_bucket: bool
    bucket_no_upscale: bool
    repeats: int
    batch_size: int
    target_frames: tuple[int, ...]
    frame_extraction: str
    frame_sample: int
    source_fps: float | None

    def settings(self) -> dict:
        """Every setting that changes the pixels of an item (for cache keys)."""
        return {
            "resolution": list(self.resolution),
            "enable_bucket": self.enable_bucket,
            "bucket_no_upscale": self.bucket_no_upscale,
            "target_frames": list(self.target_frames),
            "frame_extraction": self.frame_extraction,
            "frame_sample": self.frame_sample,
            "source_fps": self.source_fps,
        }


@dataclass(frozen=True)
class DataConfig:
    """A validated dataset YAML.

    Attributes:
        path: The YAML file.
        cache_dir: Where the cache goes (absolute).
        datasets: The datasets, in order.
    """

    path: Path
    cache_dir: Path
    datasets: tuple[DatasetSpec, ...]


@dataclass(frozen=True)
class Source:
    """One media file to cache, with its caption.

    Attributes:
        path: The media file.
        caption: The caption text, or None when missing.
        is_video: Read as a video (else as one image).
        dataset: The dataset it belongs to.
    """

    path: Path
    caption: str | None
    is_video: bool
    dataset: DatasetSpec


@dataclass
class BadItem:
    """A file that cannot be cached, and why."""

    path: Path
    problem: str

    def __str__(self) -> str:
        return f"{self.path}: {self.problem}"


@dataclass
class Clip:
    """Pixels of one training item.

    Attributes:
        pixels: float32 ``[3, F, H, W]`` in ``[-1, 1]``.
        frames: Indices of the source frames used (after fps resampling).
    """

    pixels: object
    frames: list[int] = field(default_factory=list)


def _err(config_path: Path, where: str, message: str) -> SlotsmithError:
    return SlotsmithError(f"{config_path}: {where}: {message}")


def _positive_int(value, config_path: Path, where: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise _err(config_path, where, f"must be a positive integer, got {value!r}")
    return value


def _bool(value, config_path: Path, where: str) -> bool:
    if not isinstance(value, bool):
        raise _err(config_path, where, f"must be true or false, got {value!r}")
    return value


def _resolution(value, config_path: Path, where: str, align: int) -> tuple[int, int]:
    if (
        not isinstance(value, (list, tuple))
        or len(value) != 2
        or not all(isinstance(v, int) and not isinstance(v, bool) for v in value)
    ):
        raise _err(config_path, where, f"must be [width, height] in pixels, got {value!r}")
    w, h = value
    if w < align or h < align or w % align or h % align:
        raise _err(config_path, where, f"{w}x{h}: width and height must be positive multiples of {align}")
    return w, h


def _target_frames(value, config_path: Path, where: str) -> tuple[int, ...]:
    values = value if isinstance(value, list) else [value]
    if not values:
        raise _err(config_path, where, "must not be empty")
    for v in values:
        if not isinstance(v, int) or isinstance(v, bool) or v < 1 or (v - 1) % 4:
            raise _err(config_path, where, f"{v!r}: Wan needs 4N+1 frames (1, 5, 9, ..., 81)")
    return tuple(values)


def _dataset(raw: dict, general: dict, index: int, config_path: Path, align: int) -> DatasetSpec:
    where = f"datasets[{index}]"
    if not isinstance(raw, dict):
        raise _err(config_path, where, "must be a mapping")
    unknown = sorted(set(raw) - set(_DATASET_KEYS) - set(_SOURCE_KEYS))
    if unknown:
        raise _err(config_path, f"{where}.{unknown[0]}", "unknown key")
    sources = [k for k in _SOURCE_KEYS if k in raw]
    if len(sources) != 1:
        raise _err(config_path, where, f"needs exactly one of {', '.join(_SOURCE_KEYS)}")
    source_key = sources[0]
    if not isinstance(raw[source_key], str) or not raw[source_key]:
        raise _err(config_path, f"{where}.{source_key}", "must be a path")
    path = (config_path.parent / raw[source_key]).resolve()
    if source_key == "jsonl_file" and not path.is_file():
        raise _err(config_path, f"{where}.{source_key}", f"{path} is not a file")
    if source_key != "jsonl_file" and not path.is_dir():
        raise _err(config_path, f"{where}.{source_key}", f"{path} is not a folder")
    merged = {**_DATASET_KEYS, **general, **raw}

    def key(name):
        return f"{where}.{name}" if name in raw else f"general.{name}" if name in general else f"{where}.{name}"

    if merged["resolution"] is None:
        raise _err(config_path, key("resolution"), "missing: give [width, height] here or under general")
    ext = merged["caption_extension"]
    if not isinstance(ext, str) or not ext.startswith(".") or len(ext) < 2:
        raise _err(config_path, key("caption_extension"), f"must look like '.txt', got {ext!r}")
    extraction = merged["frame_extraction"]
    if extraction not in FRAME_EXTRACTIONS:
        raise _err(config_path, key("frame_extraction"), f"{extraction!r} is not one of {', '.join(FRAME_EXTRACTIONS)}")
    fps = merged["source_fps"]
    if fps is not None and (not isinstance(fps, (int, float)) or isinstance(fps, bool) or not fps > 0):
        raise _err(config_path, key("source_fps"), f"must be a positive number, got {fps!r}")
    enable_bucket = _bool(merged["enable_bucket"], config_path, key("enable_bucket"))
    no_upscale = _bool(merged["bucket_no_upscale"], config_path, key("bucket_no_upscale"))
    if no_upscale and not enable_bucket:
        raise _err(config_path, key("bucket_no_upscale"), "needs enable_bucket: true")
    return DatasetSpec(
        index=index,
        kind={"image_directory": "image", "video_directory": "video", "jsonl_file": "jsonl"}[source_key],
        path=path,
        caption_extension=ext,
        resolution=_resolution(merged["resolution"], config_path, key("resolution"), align),
        enable_bucket=enable_bucket,
        bucket_no_upscale=no_upscale,
        repeats=_positive_int(merged["repeats"], config_path, key("repeats")),
        batch_size=_positive_int(merged["batch_size"], config_path, key("batch_size")),
        target_frames=_target_frames(merged["target_frames"], config_path, key("target_frames")),
        frame_extraction=extraction,
        frame_sample=_positive_int(merged["frame_sample"], config_path, key("frame_sample")),
        source_fps=None if fps is None else float(fps),
    )


def load_data_config(path, align: int = DEFAULT_ALIGN) -> DataConfig:
    """Read and validate a dataset YAML.

    Relative paths (folders, JSONL files, ``cache_dir``) are relative to the
    YAML's own folder. Keys under ``general`` are defaults for every dataset.

    Args:
        path: The YAML file.
        align: Pixel sizes must be multiples of this (16 for Wan 2.1, 32 for
            the Wan 2.2 TI2V VAE).

    Returns:
        The validated config.

    Raises:
        SlotsmithError: Unreadable YAML, unknown or bad keys, missing folders;
            the message names the file and the key.
    """
    config_path = Path(path).resolve()
    try:
        raw = yaml.safe_load(config_path.read_text(encoding="utf-8"))
    except OSError as e:
        raise SlotsmithError(f"{config_path}: cannot read dataset config: {e.strerror or e}") from None
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise SlotsmithError(f"{config_path}: not valid YAML: {str(e).splitlines()[0]}") from None
    if not isinstance(raw, dict):
        raise SlotsmithError(f"{config_path}: must be a mapping with a 'datasets' list")
    unknown = sorted(set(raw) - set(_TOP_KEYS))
    if unknown:
        raise _err(config_path, unknown[0], f"unknown key (expected {', '.join(_TOP_KEYS)})")
    general = raw.get("general") or {}
    if not isinstance(general, dict):
        raise _err(config_path, "general", "must be a mapping")
    bad_general = sorted(set(general) - set(_DATASET_KEYS))
    if bad_general:
        raise _err(config_path, f"general.{bad_general[0]}", "unknown key")
    datasets = raw.get("datasets")
    if not isinstance(datasets, list) or not datasets:
        raise _err(config_path, "datasets", "must be a non-empty list")
    cache_dir = raw.get("cache_dir", "cache")
    if not isinstance(cache_dir, str) or not cache_dir:
        raise _err(config_path, "cache_dir", f"must be a path, got {cache_dir!r}")
    return DataConfig(
        path=config_path,
        cache_dir=(config_path.parent / cache_dir).resolve(),
        datasets=tuple(_dataset(d, general, i, config_path, align) for i, d in enumerate(datasets)),
    )


def _read_caption(path: Path) -> str | None:
    try:
        text = path.read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError):
        return None
    return text or None


def _media_kind(path: Path) -> str | None:
    suffix = path.suffix.lower()
    return "image" if suffix in IMAGE_EXTENSIONS else "video" if suffix in VIDEO_EXTENSIONS else None


def _jsonl_sources(spec: DatasetSpec, bad: list[BadItem]) -> list[Source]:
    try:
        raw = spec.path.read_bytes()
    except OSError as e:
        bad.append(BadItem(spec.path, f"cannot read: {e.strerror or e}"))
        return []
    sources = []
    # Line by line, so one line that is not UTF-8 is one bad item, not a lost dataset.
    for n, raw_line in enumerate(raw.splitlines(), 1):
        if not raw_line.strip():
            continue
        where = Path(f"{spec.path}:{n}")
        try:
            entry = json.loads(raw_line.decode("utf-8"))
        except UnicodeDecodeError:
            bad.append(BadItem(where, "not valid UTF-8"))
            continue
        except json.JSONDecodeError as e:
            bad.append(BadItem(where, f"not valid JSON: {e.msg}"))
            continue
        if not isinstance(entry, dict) or not isinstance(entry.get("path"), str):
            bad.append(BadItem(where, 'needs {"path": ..., "caption": ...}'))
            continue
        media = (spec.path.parent / entry["path"]).resolve()
        kind = _media_kind(media)
        caption = entry.get("caption")
        if kind is None:
            bad.append(BadItem(media, f"unsupported media type {media.suffix!r} (listed in {where})"))
        elif not media.is_file():
            bad.append(BadItem(media, f"no such file (listed in {where})"))
        elif not isinstance(caption, str) or not caption.strip():
            bad.append(BadItem(media, f"missing caption (no 'caption' in {where})"))
        else:
            sources.append(Source(media, caption.strip(), kind == "video", spec))
    return sources


def discover(config: DataConfig) -> tuple[list[Source], list[BadItem]]:
    """List every media file of every dataset with its caption.

    Cheap: reads captions, not media. A missing or empty caption makes the
    file a bad item.

    Args:
        config: The dataset config.

    Returns:
        ``(sources, bad)`` in a stable order.
    """
    sources: list[Source] = []
    bad: list[BadItem] = []
    for spec in config.datasets:
        if spec.kind == "jsonl":
            sources.extend(_jsonl_sources(spec, bad))
            continue
        found = sorted(p for p in spec.path.iterdir() if p.is_file() and _media_kind(p) == spec.kind)
        if not found:
            suffixes = IMAGE_EXTENSIONS if spec.kind == "image" else VIDEO_EXTENSIONS
            bad.append(BadItem(spec.path, f"no {spec.kind} files ({', '.join(suffixes)})"))
        for media in found:
            caption_path = media.with_suffix(spec.caption_extension)
            caption = _read_caption(caption_path)
            if caption is None:
                bad.append(BadItem(media, f"missing caption ({caption_path.name} absent or empty)"))
            else:
                sources.append(Source(media, caption, spec.kind == "video", spec))
    return sources, bad


def bucket_size(width: int, height: int, spec: DatasetSpec, align: int = DEFAULT_ALIGN) -> tuple[int, int]:
    """The pixel size a ``width`` x ``height`` file is resized and cropped to.

    Without buckets this is ``resolution``. With buckets it is the size, of
    area at most ``resolution``'s and sides multiples of ``align``, whose
    aspect ratio is closest to the file's; with ``bucket_no_upscale`` a file
    smaller than that area keeps its own size, rounded down to ``align``.

    Args:
        width: The file's width.
        height: The file's height.
        spec: The dataset.
        align: Size granularity.

    Returns:
        ``(W, H)``.

    Raises:
        SlotsmithError: The file is smaller than ``align`` on a side.
    """
    if not spec.enable_bucket:
        return spec.resolution
    area = spec.resolution[0] * spec.resolution[1]
    if spec.bucket_no_upscale and width * height <= area:
        w, h = width // align * align, height // align * align
        if w < align or h < align:
            raise SlotsmithError(f"{width}x{height} is smaller than {align} pixels on a side")
        return w, h
    target = math.log(width / height)
    best = None
    # Every width with the largest aligned height that keeps the area; aspect
    # ratios beyond 1:4 make no sense for video.
    for w in range(align, 4 * int(math.sqrt(area)) + 1, align):
        h = min(area // w // align * align, 4 * w)
        if h < align or w > 4 * h:
            continue
        score = (abs(math.log(w / h) - target), -w * h)
        if best is None or score < best[0]:
            best = (score, (w, h))
    return best[1]


def _to_tensor(frames: list) -> object:
    """PIL frames of one size -> float32 ``[3, F, H, W]`` in ``[-1, 1]``."""
    import numpy as np
    import torch

    array = np.stack([np.asarray(f.convert("RGB"), dtype=np.uint8) for f in frames])  # F, H, W, 3
    return torch.from_numpy(array).permute(3, 0, 1, 2).float().div_(127.5).sub_(1.0)


def _fit(image, size: tuple[int, int]):
    """Resize to cover ``size`` keeping the aspect ratio, then crop the centre."""
    from PIL import Image

    w, h = size
    scale = max(w / image.width, h / image.height)
    rw, rh = max(w, round(image.width * scale)), max(h, round(image.height * scale))
    if (rw, rh) != image.size:
        image = image.resize((rw, rh), Image.Resampling.LANCZOS if scale < 1 else Image.Resampling.BICUBIC)
    left, top = (rw - w) // 2, (rh - h) // 2
    return image.crop((left, top, left + w, top + h))


def read_image(source: Source, align: int = DEFAULT_ALIGN) -> list[Clip]:
    """Read one image as a one-frame clip at its bucket size.

    Args:
        source: The image.
        align: Size granularity.

    Returns:
        One clip of ``[3, 1, H, W]``.

    Raises:
        SlotsmithError: Unreadable or truncated image (message without the
            path: the caller reports it per file).
    """
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(source.path) as im:
            im.load()
            image = im.convert("RGB")
    except (OSError, UnidentifiedImageError, Image.DecompressionBombError, ValueError) as e:
        raise SlotsmithError(f"unreadable image: {e}") from None
    size = bucket_size(image.width, image.height, source.dataset, align)
    return [Clip(_to_tensor([_fit(image, size)]), [0])]


def resample_indices(count: int, source_fps: float | None, target_fps: float = WAN_FPS) -> list[int]:
    """Which of ``count`` source frames make the clip at ``target_fps``.

    Args:
        count: Frames in the source.
        source_fps: The source's frame rate, or None to keep every frame.
        target_fps: The wanted rate.

    Returns:
        Source frame indices, one per output frame.
    """
    if source_fps is None or count == 0:
        return list(range(count))
    step = source_fps / target_fps
    n = int((count - 1) / step + 1e-9) + 1
    return [min(count - 1, round(k * step)) for k in range(n)]


def clip_ranges(count: int, spec: DatasetSpec) -> list[tuple[int, int]]:
    """Start and stop of each clip in a ``count``-frame sequence.

    ``head``: the first ``target_frames``. ``chunk``: consecutive,
    non-overlapping clips. ``uniform``: ``frame_sample`` clips with evenly
    spaced starts from the first to the last possible one. Each length in
    ``target_frames`` gives its own clips; lengths longer than the video give
    none.

    Args:
        count: Frames available.
        spec: The dataset.

    Returns:
        ``(start, stop)`` pairs.
    """
    ranges = []
    for n in spec.target_frames:
        if n > count:
            continue
        if spec.frame_extraction == "head":
            starts = [0]
        elif spec.frame_extraction == "chunk":
            starts = list(range(0, count - n + 1, n))
        else:
            last = count - n
            k = spec.frame_sample
            starts = sorted({round(i * last / (k - 1)) for i in range(k)}) if k > 1 else [0]
        ranges.extend((s, s + n) for s in starts)
    return ranges


def _decode_frames(path: Path, size_for) -> list:
    """All frames of a video's first video stream, each fitted to its bucket."""
    import av

    frames = []
    with av.open(str(path)) as container:
        if not container.streams.video:
            raise SlotsmithError("unreadable video: no video stream")
        stream = container.streams.video[0]
        size = None
        for frame in container.decode(stream):
            image = frame.to_image()
            if size is None:
                size = size_for(image.width, image.height)
            frames.append(_fit(image, size))
    return frames


def read_video(source: Source, align: int = DEFAULT_ALIGN) -> list[Clip]:
    """Read one video's clips, as the dataset's frame extraction says.

    Args:
        source: The video.
        align: Size granularity.

    Returns:
        The clips, each ``[3, F, H, W]`` with F one of ``target_frames``.

    Raises:
        SlotsmithError: Unreadable or truncated video, or too short for every
            ``target_frames`` (message without the path).
    """
    import av

    spec = source.dataset
    try:
        frames = _decode_frames(source.path, lambda w, h: bucket_size(w, h, spec, align))
    except (av.error.FFmpegError, OSError, ValueError) as e:
        raise SlotsmithError(f"unreadable video: {e}") from None
    if not frames:
        raise SlotsmithError("unreadable video: no frames decoded")
    order = resample_indices(len(frames), spec.source_fps)
    ranges = clip_ranges(len(order), spec)
    if not ranges:
        fps_note = f" at {WAN_FPS} fps from source_fps {spec.source_fps:g}" if spec.source_fps else ""
        raise SlotsmithError(
            f"clip too short: {len(order)} frames{fps_note}, target_frames needs "
            f"{min(spec.target_frames)}"
        )
    clips = []
    for start, stop in ranges:
        picked = order[start:stop]
        clips.append(Clip(_to_tensor([frames[i] for i in picked]), picked))
    return clips


def read_clips(source: Source, align: int = DEFAULT_ALIGN) -> list[Clip]:
    """Read a source (image or video) as its clips; see `read_image`, `read_video`."""
    return read_video(source, align) if source.is_video else read_image(source, align)
