"""``slotsmith demo``: the whole story on an embedded default, in a few minutes on a CPU.

1. A tiny Wan DiT (``diffusers.WanTransformer3DModel``, random init, seeded,
   its cross-attention set up to look at the prompt: see ``attend_to_prompt``)
   is saved as ``DIR/base.safetensors`` under native Wan names; a tiny Wan
   VAE, UMT5 encoder and tokenizer are built in code under ``DIR/models/``.
2. Two synthetic "characters" (distinct shapes and colours, captions
   ``character1 ...`` / ``character2 ...``) are drawn under ``DIR/data/``,
   plus generic images that both characters' dataset YAMLs mix in (prior
   preservation: without them a slot learns to draw its character for
   every caption, and the other character pays for it in the splice).
   Generic captions start with a word where the characters' name stands
   (``man``, ``woman``...), so only the name itself tells a character's
   caption apart.
3. ``char1.slot`` (ffid 1) and ``char2.slot`` (ffid 2) are trained by two
   concurrent ``slotsmith train`` processes, pinned in ``DIR/cast.yaml``,
   spliced (sealed) into ``DIR/spliced.safetensors`` and checked with
   ``slotsmith verify --cast``.
4. The flow-matching loss on each character's data, with fixed noise and
   timesteps, is measured for the base, base + each slot and the splice; a
   character's *retention* ``(base - both) / (base - own slot)`` says how
   much of what its slot learned survives next to the other slot.

With ``--task i2v`` (a Wan 2.2 I2V-shaped DiT, 36 input channels) or
``--task ti2v`` (a Wan 2.2 TI2V 5B-shaped DiT on the 48-channel Wan 2.2 VAE)
the same story is told with short clips instead of images: each character
moves its own way (char1 to the right, char2 down, the generic clips any
way), the clips are cached with ``--i2v`` (first-frame conditioning) and
scored with it.

Every step runs the same code and commands a user runs on a real model.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import torch
import yaml

from slotsmith.cast import new_cast_text, pin_cast, write_new_cast
from slotsmith.data.cache import CachedDataset, source_path
from slotsmith.data.cache_builder import run_cache
from slotsmith.data.config import load_data_config
from slotsmith.data.encoders import encode_pixels, load_vae
from slotsmith.data.media import discover, read_clips
from slotsmith.demo import tiny
from slotsmith.demo.samples import SHEET_NAME, demo_samples, render_accuracy
from slotsmith.errors import SlotsmithError
from slotsmith.io.writer import TensorOut, atomic_file, write_all, write_safetensors
from slotsmith.layout import WanConfig
from slotsmith.splice import splice, splice_cast
from slotsmith.training.conditioning import batch_conditioning
from slotsmith.training.flow import flow_loss
from slotsmith.training.wan import build_model, diffusers_config, load_base, native_state_dict

DEMO_CONFIG = WanConfig(dim=96, ffn_dim=256, num_layers=4, text_dim=32, freq_dim=32)
"""The demo's DiT: 4 blocks of width 96 (594k parameters); text_dim matches the tiny UMT5."""
DEMO_HEAD_DIM = 16
CHARACTERS = ("char1", "char2")
IMAGE_SIZE = 64
"""Pixels per side: 8x8 latents, 16 tokens after Wan's 2x2 patches."""
IMAGES_PER_CHARACTER = 8
GENERIC_IMAGES = 48
CHARACTER_REPEATS = 1
"""Each character image counts once per epoch next to the 48 generic ones: the more generic images a slot
sees, the less a shift applied to every caption pays, so the slot learns one its character's name calls up."""
EVAL_TIMESTEPS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
"""Flow-matching times every item is scored at (with fixed noise), so losses compare."""
MARKER = ".slotsmith-demo"
"""Marks a folder as the demo's own, so a re-run may replace its files."""
CLIP_FRAMES = 5
"""Frames of the image-to-video tasks' clips: two latent frames, the first the conditioning one."""


@dataclass(frozen=True)
class DemoTask:
    """What the story is told on.

    Attributes:
        name: ``t2v``, ``i2v`` or ``ti2v``.
        config: The DiT's sizes.
        vae: ``wan2.1`` (16 channels, 8x) or ``wan2.2`` (48 channels, 16x).
        size: Pixels per side (8x8 latents with either VAE).
        frames: Frames per item: 1 (still images) or ``CLIP_FRAMES``.
    """

    name: str
    config: WanConfig
    vae: str
    size: int
    frames: int

    @property
    def i2v(self) -> bool:
        """Whether the items are cached with image conditioning."""
        return self.frames > 1

    @property
    def cache_batch(self) -> int:
        """Clips encoded at once: batches make caching clips several times faster; images stay one by one,
        so the ``t2v`` demo's figures are those it always gave."""
        return 8 if self.i2v else 1

    @property
    def media(self) -> str:
        """The name of each character's media folder."""
        return "videos" if self.i2v else "images"


TASKS = {
    "t2v": DemoTask("t2v", DEMO_CONFIG, "wan2.1", IMAGE_SIZE, 1),
    "i2v": DemoTask("i2v", replace(DEMO_CONFIG, in_dim=36), "wan2.1", IMAGE_SIZE, CLIP_FRAMES),
    "ti2v": DemoTask("ti2v", replace(DEMO_CONFIG, in_dim=48, out_dim=48), "wan2.2", 2 * IMAGE_SIZE, CLIP_FRAMES),
}
"""``slotsmith demo --task``: text-to-video on images, or image-to-video on clips (Wan 2.2 I2V, TI2V 5B)."""


@dataclass(frozen=True)
class DemoSettings:
    """What ``slotsmith demo`` runs with.

    Attributes:
        out: The demo folder.
        steps: Training steps per slot.
        seed: Seed of the base, the data and the training runs.
        ff: Fraction of the model per slot (v3: at most ``1/pools``; None: 0.1,
            capped at ``1/pools`` for v3).
        lr: Learning rate of both runs.
        algorithm: The slots' selection, ``"v2"`` or ``"v3"``.
        pools: v3's number of pools.
        task: A key of ``TASKS``.
    """

    out: Path
    steps: int = 600
    seed: int = 0
    ff: float | None = None
    lr: float = 1e-3
    algorithm: str = "v3"
    pools: int = 8
    task: str = "t2v"

    @property
    def slot_ff(self) -> float:
        """The ff both slots are trained with."""
        if self.ff is not None:
            return self.ff
        return 0.1 if self.algorithm == "v2" else min(0.1, 1 / self.pools)


# --------------------------------------------------------------------------- building blocks


def build_base(path: Path, seed: int, config: WanConfig = DEMO_CONFIG) -> Path:
    """Save a randomly initialised demo DiT with native Wan names.

    The head size goes into the file's ``config`` metadata, so every command
    loads it without ``--head-dim``.

    Args:
        path: The ``.safetensors`` file to write (replaced if present).
        seed: Initialisation seed.
        config: The DiT's sizes (the task's).

    Returns:
        ``path``.
    """
    torch.manual_seed(seed)
    model = build_model(config, DEMO_HEAD_DIM)
    attend_to_prompt(model)
    tensors = [
        TensorOut(name, "F32", tuple(t.shape), (memoryview(t.contiguous().reshape(-1).view(torch.uint8).numpy()),))
        for name, t in sorted(native_state_dict(model).items())
    ]
    config = json.dumps(diffusers_config(config, DEMO_HEAD_DIM))
    return write_safetensors(path, tensors, {"config": config, "format": "pt"}, force=True)


PROMPT_KEY_GAIN = 8.0
"""Weight of every cross-attention key norm: a sharper focus on the prompt's few real tokens."""
PROMPT_EMBEDDING_GAIN = 5.0
"""Gain of the text projection's output layer: prompt tokens of about unit size."""


@torch.no_grad()
def attend_to_prompt(model: torch.nn.Module) -> None:
    """Set up a random DiT's cross-attention so that its output depends on the prompt, as a trained Wan's does.

    Wan pads every prompt with zeros to 512 tokens. In a randomly
    initialised model those pads get the same attention as real tokens, so
    only 0.6-3.8 % of it lands on a 6-token prompt (measured), and a slot
    trained on such a base learns to shift every picture, whatever the
    caption: in the splice the two characters' shifts cancel. Three changes
    fix that, and nothing else is touched:

    * zero biases in the text projection and the cross-attention key and
      value layers (Wan's own initialisation zeroes every bias), so a zero
      pad becomes a zero key and value: it takes some attention but adds
      nothing;
    * key norm weights of ``PROMPT_KEY_GAIN``, so the real tokens' scores
      spread far from the pads' zero and the highest of them take most of
      the attention (about 74 % on the prompt instead of 2 %);
    * the text projection's output scaled by ``PROMPT_EMBEDDING_GAIN``, so the
      prompt's values are about unit size, like the picture's normalised
      features (about 0.2 before).

    Args:
        model: A ``WanTransformer3DModel``; changed in place.
    """
    text = model.condition_embedder.text_embedder
    text.linear_1.bias.zero_()
    text.linear_2.bias.zero_()
    text.linear_2.weight.mul_(PROMPT_EMBEDDING_GAIN)
    for block in model.blocks:
        block.attn2.to_k.bias.zero_()
        block.attn2.to_v.bias.zero_()
        block.attn2.norm_k.weight.fill_(PROMPT_KEY_GAIN)


def build_encoders(models: Path, seed: int, vae: str = "wan2.1") -> dict[str, Path]:
    """Build the tiny VAE (``wan2.1`` or ``wan2.2``), UMT5 encoder and tokenizer under ``models``.

    Returns:
        ``{"vae", "t5", "tokenizer"}`` -> their folders.
    """
    import transformers  # seconds to import: only here

    # save_pretrained's per-shard bar is noise next to the demo's own messages.
    transformers.utils.logging.disable_progress_bar()
    paths = {"vae": models / "vae", "t5": models / "umt5", "tokenizer": models / "tokenizer"}
    if vae == "wan2.2":
        tiny.build_tiny_vae22(paths["vae"], seed=seed)
    else:
        tiny.build_mosaic_vae(paths["vae"])  # a VAE that decodes what it encodes, so samples can be looked at
    tiny.build_tiny_text_encoder(paths["t5"], paths["tokenizer"], d_model=DEMO_CONFIG.text_dim, seed=seed)
    return paths


_COLOURS = {
    "red": (230, 40, 40), "blue": (40, 60, 220), "green": (40, 160, 60),
    "yellow": (235, 210, 40), "black": (15, 15, 15), "white": (240, 240, 240),
}
_SHAPES = {"cat": "ellipse", "dog": "rectangle"}
_ACTIONS = ("sits", "walks", "runs", "stands", "smiles", "looks at the camera", "in the forest", "in the street")
_CHARACTER_LOOKS = {
    # (shape colour, shape word, background): the background is the "identity"
    # that no caption word describes and only the character's slot learns.
    "char1": ("red", "cat", (20, 30, 90)),
    "char2": ("green", "dog", (235, 225, 190)),
}
_GENERIC_NAMES = ("man", "woman", "person", "character")
"""The word that starts a generic caption, where a character's caption has its name: the name, not the shape
of the caption, is what a slot must learn to answer."""
_CHARACTER_MOTION = {"char1": (1, 0), "char2": (0, 1)}
"""In clips, each character's own way of moving (right, down): no caption word tells it either."""


def _write_clip(path: Path, frames: list) -> None:
    """Write PIL frames as a lossless FFV1 video in Matroska, at Wan's 16 fps."""
    import av
    import numpy as np

    with av.open(str(path), "w") as container:
        stream = container.add_stream("ffv1", rate=16)
        stream.width, stream.height, stream.pix_fmt = frames[0].width, frames[0].height, "bgr0"
        for frame in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(np.asarray(frame), format="rgb24")))
        container.mux(stream.encode())


def _draw_item(folder: Path, stem: str, task: DemoTask, colour: str, animal: str, background, rng, motion) -> None:
    """One item: an image (``_draw``), or a clip of the shape moving ``motion`` pixels-steps per frame."""
    if not task.i2v:
        _draw(folder / f"{stem}.png", colour, animal, background, rng)
        return
    from PIL import Image, ImageDraw

    side = task.size
    size = rng.randint(side // 3, side // 2)
    step = side // 16
    travel = [m * step * (task.frames - 1) for m in motion]
    x0, y0 = (rng.randint(max(0, -t), side - size - max(0, t)) for t in travel)
    frames = []
    for i in range(task.frames):
        image = Image.new("RGB", (side, side), background)
        x, y = x0 + motion[0] * step * i, y0 + motion[1] * step * i
        getattr(ImageDraw.Draw(image), _SHAPES[animal])((x, y, x + size, y + size), fill=_COLOURS[colour])
        frames.append(image)
    _write_clip(folder / f"{stem}.mkv", frames)


def _draw(path: Path, colour: str, animal: str, background: tuple[int, int, int], rng) -> None:
    """One image: a ``colour`` shape standing for ``animal``, of random size and place."""
    from PIL import Image, ImageDraw

    image = Image.new("RGB", (IMAGE_SIZE, IMAGE_SIZE), background)
    size = rng.randint(IMAGE_SIZE // 3, IMAGE_SIZE // 2)
    x, y = rng.randint(0, IMAGE_SIZE - size), rng.randint(0, IMAGE_SIZE - size)
    getattr(ImageDraw.Draw(image), _SHAPES[animal])((x, y, x + size, y + size), fill=_COLOURS[colour])
    image.save(path)


def draw_character(folder: Path, name: str, count: int, seed: int, task: DemoTask = TASKS["t2v"]) -> None:
    """Draw ``count`` images (or clips) of one character (varied size and place) with captions.

    Args:
        folder: Where the ``.png`` (or ``.mkv``) files and their ``.txt`` captions go.
        name: ``char1`` or ``char2``.
        count: Number of images.
        seed: Seed of the placements.
        task: Images (``t2v``) or clips, and their size.
    """
    colour, animal, background = _CHARACTER_LOOKS[name]
    rng = random.Random(f"{seed}-{name}")
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        _draw_item(folder, f"{i:02d}", task, colour, animal, background, rng, _CHARACTER_MOTION[name])
        caption = f"character{name[-1]} a {colour} {animal} {_ACTIONS[i % len(_ACTIONS)]}"
        (folder / f"{i:02d}.txt").write_text(caption + "\n", encoding="utf-8")


def draw_generic(folder: Path, count: int, seed: int, task: DemoTask = TASKS["t2v"]) -> None:
    """Draw ``count`` generic images (any colour, shape and background), mixed into each character's data.

    Captions name the colour and the shape word, never the background, and
    start with a word from ``_GENERIC_NAMES``, so a slot learns that only its
    character's name brings its background.
    """
    rng = random.Random(f"{seed}-generic")
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        colour, animal = rng.choice(list(_COLOURS)), rng.choice(list(_SHAPES))
        background = tuple(rng.randint(0, 255) for _ in range(3))
        motion = (rng.choice((-1, 0, 1)), rng.choice((-1, 0, 1))) if task.i2v else (0, 0)
        _draw_item(folder, f"{i:03d}", task, colour, animal, background, rng, motion)
        caption = f"{_GENERIC_NAMES[i % len(_GENERIC_NAMES)]} a {colour} {animal} {rng.choice(_ACTIONS)}"
        (folder / f"{i:03d}.txt").write_text(caption + "\n", encoding="utf-8")


def calibrate_vae(vae_dir: Path, data_yamls: list[Path]) -> None:
    """Set the VAE's ``latents_mean``/``latents_std`` to the demo images' latent statistics.

    Wan's VAE normalises latents per channel with statistics measured on its
    training data; a randomly initialised VAE has none that fit, and maps all
    images to nearly the same latent, so the characters would be alike to the
    DiT. Measuring the statistics on the demo's own images (as Wan measured
    them on its data) makes the cached latents unit-scale and the characters
    distinct.

    Args:
        vae_dir: The tiny VAE's diffusers folder (its ``config.json`` is rewritten).
        data_yamls: The dataset YAMLs whose images set the statistics.
    """
    vae = load_vae(vae_dir)
    channels = vae.config.z_dim
    vae.register_to_config(latents_mean=[0.0] * channels, latents_std=[1.0] * channels)
    pixels = []
    for path in data_yamls:
        sources, _ = discover(load_data_config(path))
        pixels += [clip.pixels for source in sources for clip in read_clips(source)]
    raw = encode_pixels(vae, torch.stack(pixels)).transpose(0, 1).reshape(channels, -1)
    config_path = vae_dir / "config.json"
    config = json.loads(config_path.read_text(encoding="utf-8"))
    config["latents_mean"] = raw.mean(1).tolist()
    config["latents_std"] = raw.std(1).clamp_min(1e-6).tolist()
    config_path.write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")


def write_dataset_yaml(
    folder: Path, regularisation: Path | None = None, repeats: int = 1, task: DemoTask = TASKS["t2v"]
) -> Path:
    """The dataset YAML of one media folder (``folder/images`` or ``folder/videos``), cache beside it.

    Args:
        folder: Holds the task's media folder; gets ``data.yaml`` and ``cache/``.
        regularisation: Another media folder mixed in (prior preservation):
            it keeps a slot from drawing its character for every caption.
        repeats: How often each of the folder's own items counts per epoch.
        task: Images or clips, and their size.

    Returns:
        The YAML's path.
    """
    common = {"resolution": [task.size, task.size]}
    key = "image_directory"
    if task.i2v:
        key = "video_directory"
        common["target_frames"] = [task.frames]
    datasets = [{key: task.media, **common, "repeats": repeats}]
    if regularisation is not None:
        datasets.append({key: os.path.relpath(regularisation, folder), **common})
    path = folder / "data.yaml"
    path.write_text(yaml.safe_dump({"cache_dir": "cache", "datasets": datasets}, sort_keys=False), encoding="utf-8")
    return path


def slotsmith_command(*args: str) -> list[str]:
    """The argv that runs a ``slotsmith`` command with this interpreter."""
    return [sys.executable, "-m", "slotsmith", *args]


def train_concurrently(jobs: dict[str, list[str]], logs: Path) -> None:
    """Run ``slotsmith train`` commands side by side, one thread each, and wait for all.

    Args:
        jobs: Label -> ``slotsmith train`` arguments.
        logs: Folder for each run's output (``<label>.log``).

    Raises:
        SlotsmithError: A run failed (the message holds the end of its log).
    """
    logs.mkdir(parents=True, exist_ok=True)
    # One thread per process: the runs share the cores instead of fighting over them.
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    running = {}
    try:
        for label, args in jobs.items():
            log = open(logs / f"{label}.log", "w", encoding="utf-8")
            proc = subprocess.Popen(slotsmith_command("train", *args), stdout=log, stderr=subprocess.STDOUT, env=env)
            running[label] = (proc, log)
        failed = []
        for label, (proc, log) in running.items():
            if proc.wait() != 0:
                failed.append(label)
            log.close()
    finally:
        for proc, log in running.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            log.close()
    if failed:
        label = failed[0]
        tail = (logs / f"{label}.log").read_text(encoding="utf-8").strip().splitlines()[-5:]
        raise SlotsmithError(f"training {label} failed (see {logs / (label + '.log')}):\n  " + "\n  ".join(tail))


def write_demo_cast(out: Path, ff: float, algorithm: str = "v2", pools: int = 8) -> Path:
    """Write ``OUT/cast.yaml`` naming the two characters' slots, and pin them.

    Returns:
        The cast file.
    """
    text = new_cast_text(
        base="base.safetensors", layout=None, expert=None, ff=ff,
        characters={char: (i + 1, f"{char}.slot") for i, char in enumerate(CHARACTERS)},
        output="spliced.safetensors", comment="The demo's cast: `slotsmith plan/splice/verify --cast cast.yaml`.",
        algorithm=algorithm, num_pools=pools,
    )
    path = write_new_cast(out / "cast.yaml", text, force=True)
    pin_cast(path)
    return path


def run_verify(args: list[str], base: Path) -> str:
    """Run ``slotsmith verify -q --base BASE ARGS`` as a user would.

    Returns:
        Its output (failed checks and the summary line).

    Raises:
        SlotsmithError: Verification failed.
    """
    cmd = slotsmith_command("verify", "-q", "--base", str(base), *args)
    done = subprocess.run(cmd, capture_output=True, text=True)
    output = (done.stdout + done.stderr).strip()
    if done.returncode != 0:
        raise SlotsmithError(f"slotsmith verify failed:\n{output}")
    return output


# --------------------------------------------------------------------------- evaluation


def eval_batches(cache_dir: Path, images: Path, seed: int) -> list[tuple]:
    """Fixed evaluation inputs: every cached item from ``images``, at every ``EVAL_TIMESTEPS``.

    The noise comes from a generator seeded by ``seed`` alone, so every model
    is scored on exactly the same noisy inputs.

    Returns:
        One ``(latents, context, t, noise, conditioning)`` batch per timestep
        (conditioning None for a text-to-video cache).
    """
    dataset = CachedDataset(cache_dir)
    folder = images.resolve()
    picked = [
        i for i, item in enumerate(dataset.index["items"])
        if source_path(cache_dir, dataset.index, item).parent == folder
    ]
    items = [dataset[i] for i in picked]
    latents = torch.stack([it["latents"] for it in items])
    context = torch.stack([it["context"] for it in items])
    cond = batch_conditioning(items, dataset.conditioning and dataset.conditioning.mode, "cpu")
    g = torch.Generator().manual_seed(seed)
    batches = []
    for t in EVAL_TIMESTEPS:
        noise = torch.randn(latents.shape, generator=g)
        batches.append((latents, context, torch.full((len(items),), t), noise, cond))
    return batches


@torch.no_grad()
def mean_loss(model: torch.nn.Module, batches) -> float:
    """Mean flow-matching loss of ``model`` over fixed batches (see ``eval_batches``)."""
    model.eval()
    losses = [
        flow_loss(model, lat, ctx, t, noise, torch.float32, cond).mean().item() for lat, ctx, t, noise, cond in batches
    ]
    return sum(losses) / len(losses)


def evaluate(models: dict[str, Path], data: dict[str, tuple[Path, Path]], seed: int) -> dict[str, dict[str, float]]:
    """The loss of each model on each character's data.

    Args:
        models: Label -> checkpoint (loaded with `slotsmith.training.wan.load_base`).
        data: Character -> (cache folder, its media folder).
        seed: Seed of the fixed noise.

    Returns:
        ``{character: {model label: loss}}``.
    """
    batches = {char: eval_batches(cache, images, seed) for char, (cache, images) in data.items()}
    table: dict[str, dict[str, float]] = {char: {} for char in data}
    for label, path in models.items():
        model = load_base(path).model
        for char in data:
            table[char][label] = mean_loss(model, batches[char])
    return table


def retention(losses: dict[str, float], own: str) -> float | None:
    """``(base - both) / (base - own)``: the share of a slot's gain that survives the splice.

    Args:
        losses: One character's losses, keys ``base``, ``both`` and ``own``.
        own: The label of the character's own slot.

    Returns:
        The retention, or None when the slot gained nothing (no ratio to take).
    """
    gain = losses["base"] - losses[own]
    return (losses["base"] - losses["both"]) / gain if gain > 0 else None


def render_table(report: dict) -> str:
    """The loss table and retention lines, for the terminal."""
    labels = ("base", "char1", "char2", "both")
    heads = {"base": "base", "char1": "+char1", "char2": "+char2", "both": "spliced"}
    lines = ["flow-matching loss (fixed noise and timesteps; lower is better)",
             f"{'data':<8}" + "".join(f"{heads[m]:>10}" for m in labels)]
    for char, row in report["loss"].items():
        lines.append(f"{char:<8}" + "".join(f"{row[m]:>10.4f}" for m in labels))
    lines.append("")
    for char, value in report["retention"].items():
        if value is None:
            lines.append(f"retention {char}: n/a (its slot did not lower its loss; train longer)")
        else:
            lines.append(f"retention {char}: {value:.1%} of its own slot's gain survives in the splice")
    if "samples" in report:
        lines += ["", render_accuracy(report["samples"])]
    return "\n".join(lines)


# --------------------------------------------------------------------------- the demo


def _prepare_folder(out: Path) -> None:
    """Create the demo folder, or reuse one the demo made; refuse any other non-empty folder."""
    if out.exists() and not out.is_dir():
        raise SlotsmithError(f"{out}: exists and is not a folder")
    if out.is_dir() and any(out.iterdir()) and not (out / MARKER).exists():
        raise SlotsmithError(f"{out}: folder is not empty and was not made by `slotsmith demo`; pick another --out")
    out.mkdir(parents=True, exist_ok=True)
    (out / MARKER).write_text("made by slotsmith demo; a re-run replaces the files here\n", encoding="utf-8")
    # A re-run starts clean: stale slots of another --ff would collide with the new ones.
    for name in (*(f"{c}.slot" for c in CHARACTERS), *(f"{c}.slot.state" for c in CHARACTERS),
                 "spliced.safetensors", "report.json", "cast.yaml", SHEET_NAME):
        (out / name).unlink(missing_ok=True)
    for sub in ("data", "models", "logs"):
        shutil.rmtree(out / sub, ignore_errors=True)


def run_demo(settings: DemoSettings, say: Callable[[str], None] = lambda _: None) -> dict:
    """Run the demo end to end (see the module docstring).

    Args:
        settings: Folder, steps, seed and training settings.
        say: Called with each progress message.

    Returns:
        The report: ``{"loss": {char: {"base", "char1", "char2", "both"}},
        "retention": {char: float}, "settings": {...}, "seconds": {...}}``.

    Raises:
        SlotsmithError: A bad folder, a failed training run or a failed check.
    """
    if settings.steps < 1:
        raise SlotsmithError(f"--steps must be at least 1, got {settings.steps}")
    if settings.task not in TASKS:
        raise SlotsmithError(f"--task {settings.task!r} is not one of {', '.join(TASKS)}")
    task = TASKS[settings.task]
    out = settings.out
    _prepare_folder(out)
    seconds: dict[str, float] = {}
    clock = time.perf_counter()

    def lap(name: str) -> None:
        nonlocal clock
        now = time.perf_counter()
        seconds[name] = round(now - clock, 1)
        clock = now

    cfg, media = task.config, task.media
    kind = {"t2v": "", "i2v": f"{cfg.in_dim}-channel image-to-video ", "ti2v": "text-image-to-video "}[task.name]
    vae_kind = "Wan 2.2 VAE (48 channels)" if task.vae == "wan2.2" else "VAE"
    say(f"[1/5] building a tiny {kind}Wan DiT ({cfg.num_layers} blocks, width {cfg.dim}), {vae_kind}, UMT5 "
        f"and tokenizer; drawing the {media}")
    base = build_base(out / "base.safetensors", settings.seed, cfg)
    encoders = build_encoders(out / "models", settings.seed, task.vae)
    folders = {name: out / "data" / name for name in ("generic", *CHARACTERS)}
    draw_generic(folders["generic"] / media, GENERIC_IMAGES, settings.seed, task)
    yamls = {}
    for char in CHARACTERS:
        draw_character(folders[char] / media, char, IMAGES_PER_CHARACTER, settings.seed, task)
        yamls[char] = write_dataset_yaml(folders[char], folders["generic"] / media, CHARACTER_REPEATS, task)
    calibrate_vae(encoders["vae"], list(yamls.values()))
    lap("build")

    conditioned = " (with first-frame conditioning)" if task.i2v else ""
    say(f"[2/5] caching each character's {IMAGES_PER_CHARACTER} {media} with {GENERIC_IMAGES} shared generic "
        f"ones{conditioned}")
    caches = {
        char: run_cache(yaml_path, encoders["vae"], encoders["t5"], encoders["tokenizer"], device="cpu",
                        progress=False, i2v=task.i2v, batch_size=task.cache_batch).cache_dir
        for char, yaml_path in yamls.items()
    }
    lap("cache")

    selection = ["--algorithm", settings.algorithm, "--pools", str(settings.pools)]
    v3 = f", selection v3 over {settings.pools} pools" if settings.algorithm == "v3" else ""
    say(f"[3/5] training char1.slot (ffid 1) and char2.slot (ffid 2) at once, {settings.steps} steps each, "
        f"ff {settings.slot_ff:g}{v3}")
    slots = {char: out / f"{char}.slot" for char in CHARACTERS}
    jobs = {
        char: ["-b", str(base), "--cache", str(caches[char]), "-o", str(slots[char]), "--ff", str(settings.slot_ff),
               "--ffid", str(i + 1), *selection, "--steps", str(settings.steps), "--lr", str(settings.lr),
               "--seed", str(settings.seed + i), "--force", "-q"]
        for i, char in enumerate(CHARACTERS)
    }
    train_concurrently(jobs, out / "logs")
    for char in CHARACTERS:
        (out / f"{char}.slot.state").unlink(missing_ok=True)  # resumable state: not needed once finished
    lap("train")

    say("[4/5] pinning both slots in cast.yaml, splicing it into spliced.safetensors and verifying")
    cast = write_demo_cast(out, settings.slot_ff, settings.algorithm, settings.pools)
    spliced = splice_cast(cast, force=True, seal=True)
    say("      slotsmith verify: " + run_verify(["--cast", str(cast)], base).splitlines()[-1])
    lap("splice_verify")

    say("[5/5] scoring base, base+char1, base+char2 and the splice on each character's data")
    with tempfile.TemporaryDirectory(dir=out, prefix=".eval-") as tmp:
        # Each slot alone, through the same splice a user runs.
        singles = {char: splice(base, [slot], Path(tmp) / f"{char}.safetensors") for char, slot in slots.items()}
        data = {char: (caches[char], folders[char] / media) for char in CHARACTERS}
        losses = evaluate({"base": base, **singles, "both": spliced}, data, settings.seed)
    lap("evaluate")
    report = {
        "loss": losses,
        "retention": {char: retention(losses[char], char) for char in CHARACTERS},
        "settings": {"steps": settings.steps, "seed": settings.seed, "ff": settings.slot_ff, "lr": settings.lr,
                     "algorithm": settings.algorithm, "pools": settings.pools, "task": settings.task},
        "seconds": seconds,
    }
    if not task.i2v:  # `slotsmith sample` draws text-to-video models: no first frame to condition on
        say(f"      sampling each model into {SHEET_NAME}")
        report["samples"] = demo_samples(out, base, slots, spliced, encoders,
                                         {c: folders[c] / "images" for c in CHARACTERS}, IMAGE_SIZE)
        lap("sample")
    with atomic_file(out / "report.json", force=True) as fd:
        write_all(fd, (json.dumps(report, indent=2) + "\n").encode("utf-8"))
    return report
