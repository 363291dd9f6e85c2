"""``slotsmith cache``: from a dataset YAML to the cache folder the trainer reads.

Each item is content-addressed (xxh3-128): its latents by the source file's
bytes, the dataset settings that shape its pixels, the clip's frames, the
VAE's bytes and the dtype; its text by the cleaned caption, the text encoder's
and tokenizer's bytes and the dtype. A re-run therefore encodes nothing that
is unchanged, and an edited caption re-encodes only its text. With ``i2v``,
each clip's image condition (and CLIP features) is addressed by its latents'
file and the conditioning mode (and the CLIP encoder's bytes). Latents and
text taken from musubi-tuner's cache (see `_Musubi`) are addressed by the
same parts plus a digest of the musubi-tuner tensor, so a run with
``reuse_musubi=False`` never mistakes them for its own. The index is
written last, and only when every item is good (or ``skip_bad`` leaves the bad
ones out), so the trainer never sees a half-made dataset.
"""

from __future__ import annotations

import os
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import torch

from slotsmith.data.cache import (
    INDEX_CAP,
    INDEX_NAME,
    ImageConditioning,
    load_index,
    source_path,
    write_clip_embeds,
    write_condition,
    write_index,
    write_latents,
    write_text,
)
from slotsmith.data.config import DEFAULT_ALIGN, DataConfig, check_align, load_data_config
from slotsmith.data.encoders import (
    encode_pixels,
    encode_texts,
    load_text_encoder,
    load_tokenizer,
    load_vae,
    parse_dtype,
    vae_spatial_factor,
    vae_temporal_factor,
)
from slotsmith.data.i2v import (
    ClipImageEncoder,
    clip_hidden_size,
    condition_channels,
    conditioning_mode,
    encode_condition,
    first_frame_problem,
)
from slotsmith.data.media import BadItem, Clip, Source, discover, read_clips
from slotsmith.data.musubi import Found, check_same_encoding, find_latents, find_text, has_cache_files, shared_stems
from slotsmith.digest import digest_file_range, digest_json
from slotsmith.errors import SlotsmithError
from slotsmith.io.files import parse_json_object, read_input
from slotsmith.io.header import read_header
from slotsmith.progress import Progress, phase

KEY_VERSION = 1
"""Bump when the encoding changes in a way the other key parts do not capture."""

LISTED_PROBLEMS = 10
"""Most lines of a stale-cache error: the first problems show what is wrong, the count the rest."""


class BadItemsError(SlotsmithError):
    """Some files cannot be cached; ``bad`` lists each with its problem.

    The message has one line per bad item, then a count and the way out
    (``--skip-bad``, which ``cache`` and ``train --data`` both take).
    """

    def __init__(self, bad: list[BadItem]):
        self.bad = bad
        lines = [str(b) for b in bad]
        lines.append(f"{len(bad)} bad item(s); fix them or pass --skip-bad to leave them out")
        super().__init__("\n".join(lines))


@dataclass
class CacheReport:
    """What a caching run did.

    Attributes:
        cache_dir: The cache folder.
        items: Items in the written index.
        latents_encoded: Clips encoded by the VAE in this run.
        latents_reused: Clips already in the cache.
        texts_encoded: Captions encoded in this run.
        texts_reused: Captions already in the cache.
        bad: Files left out, with their problems.
        musubi: Whether musubi-tuner's cache files were looked for.
        latents_from_musubi: Clips whose latents were taken from musubi-tuner's cache in this run.
        texts_from_musubi: Captions whose embeddings were taken from it in this run.
        musubi_notes: Why musubi-tuner's files were not taken for the items encoded instead.
    """

    cache_dir: Path
    items: int = 0
    latents_encoded: int = 0
    latents_reused: int = 0
    texts_encoded: int = 0
    texts_reused: int = 0
    bad: list[BadItem] = field(default_factory=list)
    musubi: bool = False
    latents_from_musubi: int = 0
    texts_from_musubi: int = 0
    musubi_notes: list[str] = field(default_factory=list)

    def summary(self) -> str:
        """One line for the user."""

        def musubi(n: int) -> str:
            return f", {n} from musubi-tuner's cache" if self.musubi else ""

        return (
            f"{self.items} items in {self.cache_dir}: latents {self.latents_encoded} encoded, "
            f"{self.latents_reused} reused{musubi(self.latents_from_musubi)}; texts {self.texts_encoded} encoded, "
            f"{self.texts_reused} reused{musubi(self.texts_from_musubi)}; {len(self.bad)} bad"
        )


def _file_digest(path: Path) -> str:
    fd = os.open(path, os.O_RDONLY)
    try:
        return digest_file_range(fd, 0, os.fstat(fd).st_size)
    finally:
        os.close(fd)


def model_identity(path) -> dict:
    """Digests of a model file's bytes, or of every file in a model folder.

    Args:
        path: A file or folder.

    Returns:
        ``{relative path: xxh3-128}`` (dot files left out).

    Raises:
        SlotsmithError: The path does not exist.
    """
    path = Path(path)
    if path.is_file():
        return {path.name: _file_digest(path)}
    if not path.is_dir():
        raise SlotsmithError(f"{path}: no such file or folder")
    return {
        str(f.relative_to(path)): _file_digest(f)
        for f in sorted(path.rglob("*"))
        if f.is_file() and not any(part.startswith(".") for part in f.relative_to(path).parts)
    }


def pixel_settings(source: Source, align: int) -> str:
    """Digest of the dataset settings that shape a source's pixels."""
    settings = source.dataset.settings()
    if not source.is_video:
        settings = {k: settings[k] for k in ("resolution", "enable_bucket", "bucket_no_upscale")}
    return digest_json({"settings": settings, "align": align, "video": source.is_video})


def _previous_items(cache_dir: Path) -> dict[str, list[dict]]:
    """The last index's items by ``source_key``, read leniently (a bad index just means no reuse)."""
    try:
        doc = parse_json_object(read_input(cache_dir / INDEX_NAME, INDEX_CAP, "cache index"), str(cache_dir))
        items = doc["items"]
    except (SlotsmithError, KeyError):
        return {}
    by_key: dict[str, list[dict]] = defaultdict(list)
    for item in items if isinstance(items, list) else []:
        if isinstance(item, dict) and isinstance(item.get("source_key"), str):
            by_key[item["source_key"]].append(item)
    return by_key


def _tensor_dim(path: Path, name: str) -> int:
    info = read_header(path).tensors[name]
    return info.shape[0] if name == "latents" else info.shape[1]


class _Encoders:
    """The VAE, and the text and CLIP encoders loaded only when something needs encoding."""

    def __init__(self, vae, t5, tokenizer, device, dtype, show: bool, clip=None):
        # Imported only when encoding: they take seconds to import.
        import diffusers
        import transformers

        # Their per-file loading bars would drown the one bar that matters.
        diffusers.utils.logging.disable_progress_bar()
        transformers.utils.logging.disable_progress_bar()
        self.t5_path, self.device, self.dtype, self.show = t5, device, dtype, show
        with phase("loading the VAE", show):
            self.vae = load_vae(vae, device, dtype)
        self.tokenizer = load_tokenizer(tokenizer)
        self._t5 = None
        self.clip_path = clip
        # Checked now (config.json only), loaded when some clip needs its features.
        self.clip_dim = clip_hidden_size(clip) if clip is not None else None
        self._clip = None

    @property
    def t5(self):
        if self._t5 is None:
            with phase("loading the text encoder", self.show):
                self._t5 = load_text_encoder(self.t5_path, self.device, self.dtype)
        return self._t5

    @property
    def clip(self) -> ClipImageEncoder:
        if self._clip is None:
            self._clip = ClipImageEncoder(self.clip_path, self.device, self.dtype)
        return self._clip


class _Musubi:
    """Takes latents and text embeddings from musubi-tuner's cache files where they check out.

    `slotsmith.data.musubi` finds and checks each file; here the first file
    taken per dataset (latents) and per run (text) is compared with
    slotsmith's own encoding of the same item, and a difference refuses the
    whole cache: it would mean musubi-tuner used another model, dtype or
    resizing for every item.
    """

    def __init__(self, enc: _Encoders, sources: list[Source], config: DataConfig):
        self.enc, self.config = enc, config
        folders = {s.dataset.musubi_cache for s in sources}
        self.folders = {f for f in folders if has_cache_files(f)}
        self.shared = shared_stems(sources)
        self.latent_channels = enc.vae.config.z_dim
        self.temporal, self.spatial = vae_temporal_factor(enc.vae), vae_spatial_factor(enc.vae)
        self.checked_datasets: set[int] = set()
        self.text_dim: int | None = None  # known once one caption was compared
        self.notes: list[str] = []

    def covers(self, source: Source) -> bool:
        """Whether ``source`` may have files in musubi-tuner's cache (its note is made here when it cannot)."""
        if source.dataset.musubi_cache not in self.folders:
            return False
        if (source.dataset.musubi_cache, source.path.stem) in self.shared:
            self.notes.append(f"{source.path}: another file of the same name {source.path.stem!r} shares its "
                              "musubi-tuner cache files; neither is taken")
            return False
        return True

    def relative(self, path: Path) -> str:
        """``path`` as the index records it: relative to the dataset YAML's folder, as sources are."""
        return os.path.relpath(path, self.config.path.parent)

    def latents(self, source: Source, clip: Clip) -> Found | None:
        """musubi-tuner's latents of ``clip``, checked (its note is made here when there are none)."""
        _, frames, height, width = clip.pixels.shape
        latent_frames = (frames - 1) // self.temporal + 1
        expected = (self.latent_channels, latent_frames, height // self.spatial, width // self.spatial)
        found, why = find_latents(source, clip, expected)
        if found is None:
            self.notes.append(why)
        return found

    def check_latents(self, found: Found, source: Source, clip: Clip) -> None:
        """Compare with slotsmith's encoding of the clip, once per dataset.

        Raises:
            SlotsmithError: They differ (see `check_same_encoding`).
        """
        if source.dataset.index not in self.checked_datasets:
            ours = encode_pixels(self.enc.vae, clip.pixels.unsqueeze(0))[0]
            check_same_encoding(found, ours, source, "latents")
            self.checked_datasets.add(source.dataset.index)

    def text(self, source: Source) -> Found | None:
        """musubi-tuner's embedding of ``source``'s caption, checked (its note is made here when there is none)."""
        found, why = find_text(source, self.text_dim)
        if found is None:
            self.notes.append(why)
        return found

    def check_text(self, found: Found, source: Source) -> None:
        """Compare with slotsmith's encoding of the caption, once per run (one text encoder for all).

        Raises:
            SlotsmithError: They differ (see `check_same_encoding`).
        """
        if self.text_dim is None:
            ours = encode_texts(self.enc.tokenizer, self.enc.t5, [source.caption])[0]
            check_same_encoding(found, ours, source, "text embedding")
            self.text_dim = ours.shape[1]


def _origin_field(origin: dict, latents: str | None) -> dict:
    """An index item's ``musubi`` field: the musubi-tuner files of its text (``origin``) and latents; {} for none."""
    fields = {**origin, **({"latents": latents} if latents else {})}
    return {"musubi": fields} if fields else {}


def _from_musubi(item: dict, what: str) -> str | None:
    """The musubi-tuner file an index item's ``latents`` or ``text`` came from, or None."""
    origin = item.get("musubi")
    return origin.get(what) if isinstance(origin, dict) else None


def _musubi_summary(items: list[dict]) -> dict | None:
    """The index's ``musubi`` object: how many items came from musubi-tuner's cache, and from which folders."""
    paths = {what: [p for item in items if (p := _from_musubi(item, what))] for what in ("latents", "text")}
    if not paths["latents"] and not paths["text"]:
        return None
    folders = sorted({os.path.dirname(p) or "." for found in paths.values() for p in found})
    return {"latents": len(paths["latents"]), "texts": len(paths["text"]), "folders": folders}


def _media_problems(sources: list[Source], align: int = DEFAULT_ALIGN) -> list[BadItem]:
    problems = []
    for source in sources:
        try:
            read_clips(source, align)
        except SlotsmithError as e:
            problems.append(BadItem(source.path, str(e)))
    return problems


def resolve_device(device: str | None) -> str:
    """The device to encode on: ``device`` once checked, else cuda when a GPU is there, else cpu.

    Raises:
        SlotsmithError: Not a torch device name, or a device this machine (or
            this torch build) does not have.
    """
    if device is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        parsed = torch.device(device)
    except RuntimeError:
        raise SlotsmithError(f"--device {device!r} is not a torch device (e.g. cpu, cuda, cuda:1)") from None
    if parsed.type == "cpu":
        return device
    # torch.cuda, torch.mps, torch.xpu...: each backend module says whether it can run here.
    backend = getattr(torch, parsed.type, None)
    if not (hasattr(backend, "is_available") and backend.is_available()):
        raise SlotsmithError(
            f"--device {device}: this machine or torch build has no {parsed.type} device; use --device cpu"
        )
    count = backend.device_count() if hasattr(backend, "device_count") else None
    if parsed.index is not None and count is not None and parsed.index >= count:
        raise SlotsmithError(f"--device {device}: there are only {count} {parsed.type} device(s), from index 0")
    return device


def run_cache(
    data_yaml,
    vae,
    t5,
    tokenizer,
    *,
    device: str | None = None,
    dtype: str | None = None,
    batch_size: int = 1,
    skip_bad: bool = False,
    progress: bool = True,
    i2v: bool = False,
    clip=None,
    reuse_musubi: bool = True,
) -> CacheReport:
    """Cache every item of a dataset YAML: encode what is missing, write the index.

    For a musubi-tuner dataset TOML, what slotsmith's cache lacks is taken
    from musubi-tuner's own cache files where they check out (see
    `slotsmith.data.musubi`), and encoded otherwise.

    Args:
        data_yaml: The dataset YAML.
        vae: Wan VAE file or folder (see `slotsmith.data.encoders.load_vae`).
        t5: UMT5 encoder file or folder.
        tokenizer: Tokenizer folder.
        device: Torch device (default cuda when available, else cpu).
        dtype: ``float32|bfloat16|float16`` for both encoders (default
            bfloat16 on cuda, float32 on cpu).
        batch_size: Clips (of one shape) and captions encoded together.
        skip_bad: Leave bad items out instead of failing.
        progress: Show progress on stderr (a bar on a terminal, lines in a log).
        i2v: Also cache each clip's image conditioning (see
            `slotsmith.data.i2v`), for image-to-video bases; the VAE decides
            the mode (the Wan 2.2 VAE: TI2V 5B's first-frame conditioning).
        clip: CLIP vision encoder folder: also cache each clip's CLIP image
            features (Wan 2.1 I2V); implies ``i2v``.
        reuse_musubi: Take latents and text embeddings from musubi-tuner's
            cache files (False: encode everything).

    Returns:
        What was done.

    Raises:
        BadItemsError: Bad items and not ``skip_bad`` (the index is not written).
        SlotsmithError: Bad config, device, encoders or paths; or musubi-tuner's
            cache does not match slotsmith's encoding (the index is not written).
    """
    if batch_size < 1:
        raise SlotsmithError(f"batch size must be at least 1, got {batch_size}")
    device = resolve_device(device)
    dtype = dtype or ("bfloat16" if device.startswith("cuda") else "float32")
    torch_dtype = parse_dtype(dtype)
    config = load_data_config(data_yaml)
    sources, bad = discover(config)
    if bad and not skip_bad:
        # Failing anyway: read the media too (no encoders), so one run reports every problem.
        raise BadItemsError(bad + _media_problems(sources))
    with phase("hashing the encoders (cache keys)", progress):
        ids = {"vae": model_identity(vae), "t5": model_identity(t5), "tokenizer": model_identity(tokenizer)}
        if clip is not None:
            ids["clip"] = model_identity(clip)
    enc = _Encoders(vae, t5, tokenizer, device, torch_dtype, progress, clip)
    align = 2 * vae_spatial_factor(enc.vae)  # the DiT patchifies latents 2x2
    if align != DEFAULT_ALIGN:
        check_align(config, align)  # the YAML was read above: only its sizes need checking again
    cache_dir = config.cache_dir
    conditioner = _Conditioner(enc, cache_dir, ids, dtype) if i2v or clip is not None else None
    report = CacheReport(cache_dir, bad=list(bad))
    musubi = _Musubi(enc, sources, config) if reuse_musubi else None
    report.musubi = bool(musubi and musubi.folders)
    previous = _previous_items(cache_dir)
    items: list[dict] = []
    pending_latents: dict[tuple, list[tuple[str, object]]] = defaultdict(list)
    pending_texts: dict[str, str] = {}

    def flush_latents(shape):
        batch = pending_latents.pop(shape, [])
        if batch:
            latents = encode_pixels(enc.vae, torch.stack([p for _, p in batch]))
            for (key, _), lat in zip(batch, latents):
                write_latents(cache_dir, key, lat)
            report.latents_encoded += len(batch)

    def flush_texts():
        if pending_texts:
            keys, captions = list(pending_texts), list(pending_texts.values())
            for key, context in zip(keys, encode_texts(enc.tokenizer, enc.t5, captions)):
                write_text(cache_dir, key, context)
            report.texts_encoded += len(keys)
            pending_texts.clear()

    with Progress("caching", len(sources), unit="item", show=progress) as bar:
        for source in sources:
            settings = pixel_settings(source, align)
            source_digest = _file_digest(source.path)
            source_key = digest_json(
                {"v": KEY_VERSION, "source": source_digest, "pixels": settings, "vae": ids["vae"], "dtype": dtype}
            )
            text_key = digest_json(
                {
                    "v": KEY_VERSION,
                    "caption": source.caption,
                    "t5": ids["t5"],
                    "tokenizer": ids["tokenizer"],
                    "dtype": dtype,
                }
            )
            text_rel = f"text/{text_key}.safetensors"
            musubi_ok = musubi is not None and musubi.covers(source)
            origin = {}  # the musubi-tuner files this source's items came from
            if (cache_dir / text_rel).is_file() or text_key in pending_texts:
                report.texts_reused += 1
            elif musubi_ok and (found := musubi.text(source)):
                # Addressed by the file's tensor too: a re-run without musubi's files encodes its own.
                text_key = digest_json({"text_key": text_key, "musubi": found.key})
                text_rel = f"text/{text_key}.safetensors"
                origin["text"] = musubi.relative(found.path)
                if (cache_dir / text_rel).is_file():
                    report.texts_reused += 1
                else:
                    musubi.check_text(found, source)
                    write_text(cache_dir, text_key, found.tensor)
                    report.texts_from_musubi += 1
            else:
                pending_texts[text_key] = source.caption
                if len(pending_texts) >= batch_size:
                    flush_texts()
            common = {
                "text": text_rel,
                "source": os.path.relpath(source.path, config.path.parent),  # portable: see source_path
                "caption": source.caption,
                "repeats": source.dataset.repeats,
                "batch_size": source.dataset.batch_size,
                "source_digest": source_digest,
                "pixel_settings": settings,
                "align": align,
                "source_key": source_key,
            }
            reused = [p for p in previous.get(source_key, []) if (cache_dir / str(p.get("latents"))).is_file()]
            if musubi is None and any(_from_musubi(p, "latents") for p in reused):
                reused = []  # --no-reuse-musubi: encode them
            if reused and (conditioner is None or all(conditioner.ready(p["latents"]) for p in reused)):
                # Same bytes, settings and VAE as an indexed item: its clips stand, no decoding needed.
                items.extend(
                    {**common, "latents": p["latents"], "frames": p.get("frames"), **_condition_fields(conditioner, p),
                     **_origin_field(origin, _from_musubi(p, "latents"))}
                    for p in reused
                )
                report.latents_reused += len(reused)
                bar.update(1)
                continue
            try:
                clips = read_clips(source, align)
            except SlotsmithError as e:
                report.bad.append(BadItem(source.path, str(e)))
                bar.update(1, bad=len(report.bad))
                continue
            if conditioner is not None and (problem := _first_problem(clips)):
                report.bad.append(BadItem(source.path, problem))
                bar.update(1, bad=len(report.bad))
                continue
            for clip in clips:
                key = digest_json({"source_key": source_key, "frames": clip.frames})
                rel = f"latents/{key}.safetensors"
                pending = any(k == key for batch in pending_latents.values() for k, _ in batch)
                found = None
                if musubi_ok and not pending and not (cache_dir / rel).is_file():
                    found = musubi.latents(source, clip)
                if found is not None:
                    key = digest_json({"source_key": source_key, "frames": clip.frames, "musubi": found.key})
                    rel = f"latents/{key}.safetensors"
                item = {**common, "latents": rel, "frames": [clip.frames[0], clip.frames[-1]],
                        **_origin_field(origin, found and musubi.relative(found.path))}
                if conditioner is not None:
                    item.update(conditioner.add(rel, clip.pixels, batch_size))
                items.append(item)
                if (cache_dir / rel).is_file() or pending:
                    report.latents_reused += 1
                    continue
                if found is not None:
                    musubi.check_latents(found, source, clip)
                    write_latents(cache_dir, key, found.tensor)
                    report.latents_from_musubi += 1
                    continue
                shape = tuple(clip.pixels.shape)
                pending_latents[shape].append((key, clip.pixels))
                if len(pending_latents[shape]) >= batch_size:
                    flush_latents(shape)
            bar.update(1, encoded=report.latents_encoded, bad=len(report.bad))
        # The last part-batches: encoding them is work the display should still cover.
        for shape in list(pending_latents):
            flush_latents(shape)
        flush_texts()
        if conditioner is not None:
            conditioner.flush_all()
    if report.bad and not skip_bad:
        raise BadItemsError(report.bad)
    if not items:
        raise SlotsmithError(f"{config.path}: nothing to cache (no good items)")
    latent_channels = _tensor_dim(cache_dir / items[0]["latents"], "latents")
    text_dim = _tensor_dim(cache_dir / items[0]["text"], "context")
    write_index(cache_dir, items, latent_channels, text_dim, os.path.relpath(config.path.parent, cache_dir),
                conditioner.conditioning() if conditioner else None, _musubi_summary(items))
    report.items = len(items)
    report.musubi_notes = musubi.notes if musubi is not None else []
    return report


def missing_from_cache(config: DataConfig, skip_bad: bool = False) -> tuple[list[str], list[BadItem]]:
    """What a dataset YAML has that its cache does not (without loading encoders).

    Bad items are the ones ``run_cache`` finds: files without a caption, and
    files whose media cannot be read among those it would encode anew (not
    cached, changed, or with changed dataset settings), read here as it would.

    Args:
        config: The dataset config.
        skip_bad: Leave bad items out, as ``run_cache`` does with it.

    Returns:
        ``(problems, bad)``: one line per problem (none when the cache is
        complete and current), and the bad items left out.

    Raises:
        BadItemsError: Bad items, all of them, and not ``skip_bad``.
    """
    sources, bad = discover(config)
    items: list[dict] = []
    index: dict = {}
    if (config.cache_dir / INDEX_NAME).exists():
        try:
            index = load_index(config.cache_dir)
            items = index["items"]
        except SlotsmithError as e:
            if bad and not skip_bad:
                raise BadItemsError(bad) from None
            return [str(e)], bad
    by_source: dict[str, list[dict]] = defaultdict(list)
    for item in items:
        by_source[str(source_path(config.cache_dir, index, item))].append(item)
    align = _align_of(items[0]) if items else DEFAULT_ALIGN
    problems = []
    for source in sources:
        cached = by_source.get(str(source.path), [])
        # One file may be listed by several datasets (other settings or caption): any match counts.
        same_pixels = [c for c in cached if c.get("pixel_settings") == pixel_settings(source, _align_of(c))]
        if not cached:
            problem = "not cached"
        elif cached[0].get("source_digest") != _file_digest(source.path):
            problem = "changed since it was cached"
        elif not same_pixels:
            problem = "dataset settings changed since it was cached"
        else:
            # Its media stand as cached: at most its caption is encoded anew.
            if all(c.get("caption") != source.caption for c in same_pixels):
                problems.append(f"{source.path}: caption changed since it was cached")
            continue
        # run_cache reads what it encodes anew, and an unreadable file is a bad item there: so here too.
        unreadable = _media_problems([source], align)
        bad.extend(unreadable)
        if not unreadable:
            problems.append(f"{source.path}: {problem}")
    if bad and not skip_bad:
        raise BadItemsError(bad)
    wanted = {str(source.path) for source in sources}
    problems.extend(f"{s}: cached but no longer in {config.path.name}" for s in sorted(set(by_source) - wanted))
    return problems, bad


def _conditioning_problems(cache_dir: Path, with_clip: bool) -> list[str]:
    """What an existing cache lacks for image-to-video training (its index reads: ``missing_from_cache`` saw to it)."""
    conditioning = ImageConditioning.from_json(load_index(cache_dir).get("image_conditioning"), cache_dir)
    if conditioning is None:
        return [f"{cache_dir}: holds no image conditioning (it was cached without --i2v)"]
    if with_clip and not conditioning.clip_dim:
        return [f"{cache_dir}: holds no CLIP image features (it was cached without --clip)"]
    return []


def _align_of(item: dict) -> int:
    """The alignment a cached item was made with (32 when the VAE was Wan 2.2's)."""
    return 32 if item.get("align") == 32 else DEFAULT_ALIGN


def ensure_cache(
    data_yaml,
    vae=None,
    t5=None,
    tokenizer=None,
    *,
    skip_bad: bool = False,
    i2v: bool = False,
    clip=None,
    **cache_options,
) -> tuple[Path, list[BadItem]]:
    """Make sure a dataset YAML's cache is complete, for ``train --data``.

    With all three encoders, caches what is missing (see `run_cache`).
    Without any, checks the existing cache against the YAML and the files.

    Args:
        data_yaml: The dataset YAML.
        vae: Wan VAE file or folder, or None.
        t5: UMT5 encoder file or folder, or None.
        tokenizer: Tokenizer folder, or None.
        skip_bad: Leave bad items out instead of failing, the same ones
            ``slotsmith cache --skip-bad`` leaves out.
        i2v: Image-to-video: the cache must hold (or gets) each clip's image
            conditioning.
        clip: CLIP vision encoder folder for the CLIP features (Wan 2.1
            I2V), used when caching; implies ``i2v``.
        **cache_options: Passed to `run_cache` (device, dtype, batch_size,
            progress).

    Returns:
        The cache folder, ready for `slotsmith.data.cache.CachedDataset`, and the
        bad items left out.

    Raises:
        BadItemsError: Bad items and not ``skip_bad``.
        SlotsmithError: Only some encoders given; or, without encoders, the
            cache is missing or stale (one line per problem, the first
            ``LISTED_PROBLEMS`` of them, then what to do).
    """
    given = {"--vae": vae, "--t5": t5, "--tokenizer": tokenizer}
    if all(v is not None for v in given.values()):
        report = run_cache(data_yaml, vae, t5, tokenizer, skip_bad=skip_bad, i2v=i2v, clip=clip, **cache_options)
        return report.cache_dir, report.bad
    if any(v is not None for v in given.values()):
        missing = ", ".join(k for k, v in given.items() if v is None)
        raise SlotsmithError(f"caching needs --vae, --t5 and --tokenizer together; missing {missing}")
    config = load_data_config(data_yaml)
    problems, bad = missing_from_cache(config, skip_bad)
    if (i2v or clip is not None) and not problems:
        problems = _conditioning_problems(config.cache_dir, clip is not None)
    if problems:
        listed = problems[:LISTED_PROBLEMS]
        which = "listed above" if len(listed) == len(problems) else f"the first {len(listed)} listed above"
        raise SlotsmithError(
            "\n".join(listed) + f"\nthe cache {config.cache_dir} does not match {config.path}: "
            f"{len(problems)} problem(s), {which}; pass --vae, --t5 and --tokenizer to cache what is missing, "
            "or run `slotsmith cache`"
        )
    return config.cache_dir, bad


# ---------------------------------------------------------------- image conditioning


def _first_problem(clips) -> str | None:
    """The first reason one of a source's clips cannot train image-to-video, or None."""
    return next((problem for clip in clips if (problem := first_frame_problem(clip.pixels))), None)


def _condition_fields(conditioner: _Conditioner | None, item: dict) -> dict:
    return conditioner.fields(item["latents"]) if conditioner is not None else {}


class _Conditioner:
    """Caches each clip's image condition and CLIP features, batched by clip shape like the latents."""

    def __init__(self, enc: _Encoders, cache_dir, ids: dict, dtype: str):
        self.enc, self.cache_dir, self.dtype = enc, cache_dir, dtype
        self.mode = conditioning_mode(enc.vae)
        self.clip_id = ids.get("clip")
        self._pending: dict[tuple, list[tuple[dict, object]]] = defaultdict(list)

    def fields(self, latents_rel: str) -> dict:
        """The index fields of the item whose latents are ``latents_rel`` (content addresses)."""
        # The latents' address covers the source, its pixel settings, frames, VAE and dtype.
        base = {"v": KEY_VERSION, "latents": latents_rel}
        out = {"condition": f"condition/{digest_json({**base, 'mode': self.mode})}.safetensors"}
        if self.enc.clip_path is not None:
            key = digest_json({**base, "clip": self.clip_id, "dtype": self.dtype})
            out["clip"] = f"clip/{key}.safetensors"
        return out

    def ready(self, latents_rel: str) -> bool:
        """Whether every conditioning file of the item is in the cache already."""
        return all((self.cache_dir / rel).is_file() for rel in self.fields(latents_rel).values())

    def add(self, latents_rel: str, pixels, batch_size: int) -> dict:
        """Queue what the clip still needs; returns its index fields."""
        fields = self.fields(latents_rel)
        queued = {rel for batch in self._pending.values() for f, _ in batch for rel in f.values()}
        missing = {k: rel for k, rel in fields.items() if not (self.cache_dir / rel).is_file() and rel not in queued}
        if missing:
            shape = tuple(pixels.shape)
            self._pending[shape].append((missing, pixels))
            if len(self._pending[shape]) >= batch_size:
                self._flush(shape)
        return fields

    def _flush(self, shape) -> None:
        batch = self._pending.pop(shape, [])
        pixels = torch.stack([p for _, p in batch])
        if any("condition" in f for f, _ in batch):
            for (f, _), cond in zip(batch, encode_condition(self.enc.vae, pixels)):
                if "condition" in f:
                    write_condition(self.cache_dir, _key_of(f["condition"]), cond)
        if any("clip" in f for f, _ in batch):
            for (f, _), embeds in zip(batch, self.enc.clip.encode(pixels)):
                if "clip" in f:
                    write_clip_embeds(self.cache_dir, _key_of(f["clip"]), embeds)

    def flush_all(self) -> None:
        """Encode everything still queued."""
        for shape in list(self._pending):
            self._flush(shape)

    def conditioning(self) -> ImageConditioning:
        """The index's description of what every item has."""
        return ImageConditioning(self.mode, condition_channels(self.enc.vae), self.enc.clip_dim)


def _key_of(rel: str) -> str:
    """The content address in a ``sub/<hex>.safetensors`` path."""
    return Path(rel).name.removesuffix(".safetensors")
