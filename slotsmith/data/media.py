"""A dataset's media: finding the files and their captions, reading them as pixel clips.

Reading media is separate from encoding it: this module yields pixel tensors
in ``[-1, 1]``, shaped ``[3, F, H, W]``, at each file's bucket size and with
the dataset's frame extraction, and `slotsmith.data.cache_builder` encodes them.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

from slotsmith.data.config import DEFAULT_ALIGN, DataConfig, DatasetSpec
from slotsmith.errors import SlotsmithError
from slotsmith.io.files import read_input

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
VIDEO_EXTENSIONS = (".mp4", ".mov", ".mkv", ".webm", ".avi")
CAPTION_CAP = 1_000_000
"""Largest caption file read, in bytes."""

JSONL_CAP = 100_000_000
"""Largest JSONL list read, in bytes."""

WAN_FPS = 16
"""Wan's training frame rate: clips with a ``source_fps`` are resampled to it."""


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
        source_size: The file's own ``(width, height)``, before resizing.
    """

    pixels: object
    frames: list[int] = field(default_factory=list)
    source_size: tuple[int, int] | None = None


def _read_caption(path: Path) -> str | None:
    try:  # the reader rule: a caption that is a FIFO or a link to /dev/zero is no caption
        text = read_input(path, CAPTION_CAP, "caption file").decode("utf-8").strip()
    except (SlotsmithError, UnicodeDecodeError):
        return None
    return text or None


def _media_kind(path: Path) -> str | None:
    suffix = path.suffix.lower()
    return "image" if suffix in IMAGE_EXTENSIONS else "video" if suffix in VIDEO_EXTENSIONS else None


def _jsonl_sources(spec: DatasetSpec, bad: list[BadItem]) -> list[Source]:
    try:
        raw = read_input(spec.path, JSONL_CAP, "JSONL list")
    except SlotsmithError as e:
        bad.append(BadItem(spec.path, f"cannot read: {str(e).removeprefix(f'{spec.path}: ')}"))
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
        except (ValueError, RecursionError) as e:  # also an int over Python's digit limit, or deep nesting
            bad.append(BadItem(where, f"not valid JSON: {getattr(e, 'msg', None) or type(e).__name__}"))
            continue
        # musubi-tuner's JSONL names the file image_path or video_path.
        key = next((k for k in ("path", "image_path", "video_path") if isinstance(entry, dict) and k in entry), "path")
        if not isinstance(entry, dict) or not isinstance(entry.get(key), str):
            bad.append(BadItem(where, 'needs {"path": ..., "caption": ...}'))
            continue
        media = (spec.path.parent / entry[key]).resolve()
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
    return [Clip(_to_tensor([_fit(image, size)]), [0], image.size)]


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
    non-overlapping clips. ``slide``: clips starting every ``frame_stride``
    frames. ``uniform``: ``frame_sample`` clips with evenly spaced starts from
    the first to the last possible one. Each length in ``target_frames`` gives
    its own clips; lengths longer than the video give none. ``full``: one
    clip of the whole video, cut to at most ``max_frames`` and down to 4N+1
    frames (``target_frames`` unused), as musubi-tuner does.

    Args:
        count: Frames available.
        spec: The dataset.

    Returns:
        ``(start, stop)`` pairs.
    """
    if spec.frame_extraction == "full":
        n = min(count, spec.max_frames)
        return [(0, (n - 1) // 4 * 4 + 1)] if n >= 1 else []
    ranges = []
    for n in spec.target_frames:
        if n > count:
            continue
        if spec.frame_extraction == "head":
            starts = [0]
        elif spec.frame_extraction == "chunk":
            starts = list(range(0, count - n + 1, n))
        elif spec.frame_extraction == "slide":
            starts = list(range(0, count - n + 1, spec.frame_stride))
        else:
            last = count - n
            k = spec.frame_sample
            starts = sorted({round(i * last / (k - 1)) for i in range(k)}) if k > 1 else [0]
        ranges.extend((s, s + n) for s in starts)
    return ranges


def _decode_frames(path: Path, size_for) -> tuple[list, tuple[int, int] | None]:
    """All frames of a video's first video stream, each fitted to its bucket, and the first frame's own size."""
    import av

    frames = []
    source_size = None
    with av.open(str(path)) as container:
        if not container.streams.video:
            raise SlotsmithError("unreadable video: no video stream")
        stream = container.streams.video[0]
        size = None
        for frame in container.decode(stream):
            image = frame.to_image()
            if size is None:
                source_size = image.size
                size = size_for(image.width, image.height)
            frames.append(_fit(image, size))
    return frames, source_size


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
        frames, source_size = _decode_frames(source.path, lambda w, h: bucket_size(w, h, spec, align))
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
        clips.append(Clip(_to_tensor([frames[i] for i in picked]), picked, source_size))
    return clips


def read_clips(source: Source, align: int = DEFAULT_ALIGN) -> list[Clip]:
    """Read a source (image or video) as its clips; see `read_image`, `read_video`."""
    return read_video(source, align) if source.is_video else read_image(source, align)
