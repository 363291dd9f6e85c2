"""The dataset YAML: its schema, and reading it with validation.

A dataset YAML names one or more datasets (an image folder, a video folder or
a JSONL list) and how to turn each file into training clips (resolution,
aspect-ratio buckets, frame extraction). Everything is validated up front with
errors that name the YAML file and the key. `slotsmith.data.media` finds and reads
the files it names.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

from slotsmith.errors import SlotsmithError
from slotsmith.io.files import load_yaml, read_input, safe_repr

FRAME_EXTRACTIONS = ("head", "uniform", "chunk", "slide", "full")
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
    "frame_stride": 1,
    "max_frames": 129,
    "source_fps": None,
}
_TOP_KEYS = ("cache_dir", "general", "datasets")

CONFIG_CAP = 1_000_000
"""Largest dataset YAML read, in bytes."""

MAX_REPEATS = 10_000
"""Most ``repeats`` of a dataset (each repeat is an entry of the epoch held in memory)."""

MAX_SIDE = 4096
"""Largest width or height of a ``resolution``, in pixels."""

MAX_AREA = 2048 * 2048
"""Largest area of a ``resolution``, in pixels (Wan trains at up to 1280x720)."""


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
        frame_extraction: ``head``, ``uniform``, ``chunk``, ``slide`` or ``full``.
        frame_sample: Clips per length for ``uniform``.
        source_fps: When set, the clip is resampled from this rate to 16 fps.
        frame_stride: Frames between clip starts for ``slide``.
        max_frames: Longest clip for ``full``.
        musubi_cache: musubi-tuner's cache folder for this dataset (its
            ``cache_directory``, by default its media folder), for a dataset
            read from a musubi-tuner TOML; None otherwise. Not a pixel setting:
            `slotsmith.data.musubi` reads it.
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
    frame_stride: int = 1
    max_frames: int = 129
    musubi_cache: Path | None = None

    def settings(self) -> dict:
        """Every setting that changes the pixels of an item (for cache keys)."""
        # The newer settings enter the keys only where they act, so caches made before them stay valid.
        extra = {"frame_stride": self.frame_stride} if self.frame_extraction == "slide" else {}
        if self.frame_extraction == "full":
            extra = {"max_frames": self.max_frames}
        return {
            **extra,
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


def _err(config_path: Path, where: str, message: str) -> SlotsmithError:
    return SlotsmithError(f"{config_path}: {where}: {message}")


def _positive_int(value, config_path: Path, where: str, limit: int | None = None) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise _err(config_path, where, f"must be a positive integer, got {safe_repr(value)}")
    if limit is not None and value > limit:
        raise _err(config_path, where, f"{value} is over the limit of {limit}")
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
        raise _err(config_path, where, f"must be [width, height] in pixels, got {safe_repr(value)}")
    w, h = value
    if w < align or h < align or w % align or h % align:
        raise _err(config_path, where, f"{w}x{h}: width and height must be positive multiples of {align}")
    if w > MAX_SIDE or h > MAX_SIDE or w * h > MAX_AREA:
        raise _err(config_path, where, f"{w}x{h} is over the limit (sides up to {MAX_SIDE}, area up to {MAX_AREA} pixels)")
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
        repeats=_positive_int(merged["repeats"], config_path, key("repeats"), MAX_REPEATS),
        batch_size=_positive_int(merged["batch_size"], config_path, key("batch_size")),
        target_frames=_target_frames(merged["target_frames"], config_path, key("target_frames")),
        frame_extraction=extraction,
        frame_sample=_positive_int(merged["frame_sample"], config_path, key("frame_sample")),
        source_fps=None if fps is None else float(fps),
        frame_stride=_positive_int(merged["frame_stride"], config_path, key("frame_stride")),
        max_frames=_positive_int(merged["max_frames"], config_path, key("max_frames")),
    )


MUSUBI_RENAMED = {
    "num_repeats": "repeats",
    "image_jsonl_file": "jsonl_file",
    "video_jsonl_file": "jsonl_file",
}
"""musubi-tuner dataset keys that slotsmith spells otherwise; the rest of its common keys are the same."""

MUSUBI_REFUSED = {
    "control_directory": "control images (FramePack one-frame or ControlNet training) are not supported: remove it",
    "fp_latent_window_size": "a FramePack setting; Wan does not use it: remove it",
    "fp_1f_clean_indices": "a FramePack setting; Wan does not use it: remove it",
    "fp_1f_target_index": "a FramePack setting; Wan does not use it: remove it",
    "fp_1f_no_post": "a FramePack setting; Wan does not use it: remove it",
    "multiple_target": "multiple targets (FLUX Kontext / Qwen-Image-Edit) are not supported: remove it",
    "debug_dataset": "not a dataset setting here: remove it",
}
"""musubi-tuner dataset keys slotsmith does not support, with what to do."""

MUSUBI_DEFAULT_RESOLUTION = [960, 544]
"""musubi-tuner's resolution when neither general nor the dataset gives one."""

MUSUBI_CACHE_FOLDER = "slotsmith-cache"
"""slotsmith's cache inside the first musubi ``cache_directory``: musubi's own files there are left alone."""


def _musubi_cache_folder(raw: dict) -> str | None:
    """Where musubi-tuner puts a dataset's cache files: its ``cache_directory``, else its media folder."""
    folder = raw.get("cache_directory") or raw.get("image_directory") or raw.get("video_directory")
    return folder if isinstance(folder, str) else None


def _from_musubi(doc: dict, config_path: Path) -> tuple[dict, list[str | None]]:
    """A musubi-tuner dataset TOML as this module's dataset YAML document.

    Every key is mapped (renamed where slotsmith spells it otherwise) or
    refused; all refusals are reported at once, each with what to do.

    Returns:
        The document, and each dataset's musubi-tuner cache folder as the
        TOML names it (None for a JSONL list without ``cache_directory``).

    Raises:
        SlotsmithError: One line per unsupported key.
    """
    problems = []

    def mapped(section: dict, where: str) -> dict:
        out = {}
        if not isinstance(section, dict):
            problems.append(f"{config_path}: {where}: must be a table")
            return out
        for key, value in section.items():
            if key in MUSUBI_REFUSED:
                problems.append(f"{config_path}: {where}.{key}: {MUSUBI_REFUSED[key]}")
            elif key == "cache_directory":
                if not isinstance(value, str) or not value:
                    problems.append(f"{config_path}: {where}.{key}: must be a path")
                # one cache for all datasets: see MUSUBI_CACHE_FOLDER; musubi's own files are read by data.musubi
            elif key in MUSUBI_RENAMED or key in _DATASET_KEYS or (where != "general" and key in _SOURCE_KEYS):
                out[MUSUBI_RENAMED.get(key, key)] = value
            else:
                problems.append(f"{config_path}: {where}.{key}: not a musubi-tuner dataset key slotsmith knows: remove it")
        return out

    for key in sorted(set(doc) - {"general", "datasets"}):
        problems.append(f"{config_path}: {key}: unknown table (expected general and datasets): remove it")
    general = mapped(doc.get("general", {}), "general")
    raw_datasets = doc.get("datasets")
    datasets = [mapped(d, f"datasets[{i}]") for i, d in enumerate(raw_datasets)] if isinstance(raw_datasets, list) else raw_datasets
    if problems:
        raise SlotsmithError("\n".join(problems))
    if isinstance(datasets, list) and "resolution" not in general and not all("resolution" in d for d in datasets):
        general["resolution"] = MUSUBI_DEFAULT_RESOLUTION
    caches = [_musubi_cache_folder(d) for d in raw_datasets] if isinstance(raw_datasets, list) else []
    anchor = caches[0] if caches and caches[0] else "."
    doc = {"cache_dir": str(Path(anchor) / MUSUBI_CACHE_FOLDER), "general": general, "datasets": datasets}
    return doc, caches


def _read_document(config_path: Path) -> tuple[object, list[str | None] | None]:
    """The dataset file's document: YAML, or TOML (musubi-tuner's format) for a ``.toml`` file.

    Returns:
        The document, and for a TOML each dataset's musubi-tuner cache
        folder (see `_from_musubi`); None for a YAML.
    """
    if config_path.suffix.lower() != ".toml":
        return load_yaml(config_path, CONFIG_CAP, "dataset config"), None
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10: the same parser, as a package
        import tomli as tomllib

    raw = read_input(config_path, CONFIG_CAP, "dataset config")
    try:
        doc = tomllib.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as e:
        raise SlotsmithError(f"{config_path}: not valid UTF-8 ({e.reason} at byte {e.start})") from None
    except tomllib.TOMLDecodeError as e:
        raise SlotsmithError(f"{config_path}: not valid TOML: {str(e).splitlines()[0]}") from None
    return _from_musubi(doc, config_path)


def check_align(config: DataConfig, align: int) -> None:
    """Check a loaded config's sizes against the encoder's alignment (known only once the VAE is loaded).

    Args:
        config: A config loaded with the default alignment.
        align: The pixel alignment the VAE needs (32 for the Wan 2.2 TI2V VAE).

    Raises:
        SlotsmithError: A resolution that is not a multiple of ``align``.
    """
    for spec in config.datasets:
        _resolution(list(spec.resolution), config.path, f"datasets[{spec.index}].resolution", align)


def load_data_config(path, align: int = DEFAULT_ALIGN) -> DataConfig:
    """Read and validate a dataset YAML, or a musubi-tuner dataset TOML (see `_from_musubi`).

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
    raw, musubi_caches = _read_document(config_path)
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
    specs = tuple(_dataset(d, general, i, config_path, align) for i, d in enumerate(datasets))
    if musubi_caches is not None:
        specs = tuple(
            replace(spec, musubi_cache=(config_path.parent / folder).resolve() if folder else None)
            for spec, folder in zip(specs, musubi_caches)
        )
    return DataConfig(path=config_path, cache_dir=(config_path.parent / cache_dir).resolve(), datasets=specs)
