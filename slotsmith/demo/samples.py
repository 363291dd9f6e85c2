"""The demo's pictures: a contact sheet of base, +char1, +char2 and the splice, and how often each is recognised.

Samples come from the same code ``slotsmith sample`` runs (the slots are
checked as splice checks them and overlaid in memory; the spliced column is
the spliced checkpoint itself). A sample is *recognised* as the character
whose training images' mean colour is nearest to its own mean colour
(Euclidean, RGB): the two characters differ most in their backgrounds,
which fill most of every picture, and no caption word names them, so only
a slot that learned its character paints the right one.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from slotsmith.data.encoders import load_text_encoder, load_tokenizer, load_vae
from slotsmith.io.writer import atomic_file, write_all
from slotsmith.sampling.generate import (
    Renderer,
    contact_sheet,
    encode_prompts,
    png_bytes,
)
from slotsmith.sampling.prompts import SampleSpec
from slotsmith.sampling.run import SlotOverlay, check_variants
from slotsmith.slotspec import SlotSpec
from slotsmith.training.wan import inspect_base, load_base, load_inspected

PROMPTS = {
    "char1": "character1 a red cat sits",
    "char2": "character2 a green dog sits",
    "generic": "a yellow cat walks",
}
"""A row of the sheet per prompt; the character rows are scored."""
SEEDS = (0, 1, 2, 3)
SAMPLE_STEPS = 10
SAMPLE_GUIDANCE = 1.0
"""Classifier-free guidance of the demo samples."""
SHEET_NAME = "samples.png"


def mean_colour(image: np.ndarray) -> np.ndarray:
    """The mean RGB of ``uint8 [H, W, 3]``, as floats."""
    return image.reshape(-1, 3).astype(np.float64).mean(0)


def reference_colours(folders: dict[str, Path]) -> dict[str, np.ndarray]:
    """Each character's mean colour over its training images (``*.png`` in its folder)."""
    from PIL import Image

    out = {}
    for name, folder in folders.items():
        colours = [mean_colour(np.asarray(Image.open(p).convert("RGB"))) for p in sorted(folder.glob("*.png"))]
        out[name] = np.mean(colours, axis=0)
    return out


def recognise(image: np.ndarray, references: dict[str, np.ndarray]) -> str:
    """The character whose reference colour is nearest to ``image``'s mean colour."""
    colour = mean_colour(image)
    return min(references, key=lambda name: float(np.linalg.norm(colour - references[name])))


def demo_samples(out: Path, base: Path, slots: dict[str, Path], spliced: Path, models: dict[str, Path],
                 images: dict[str, Path], size: int) -> dict:
    """Sample every prompt and seed on base, +char1, +char2 and the splice; write the sheet; score.

    Args:
        out: The demo folder (``samples.png`` goes there).
        base: The base checkpoint.
        slots: Character -> its slot.
        spliced: The spliced checkpoint.
        models: ``vae``, ``t5``, ``tokenizer`` -> their folders.
        images: Character -> its training images' folder.
        size: Pixels per side.

    Returns:
        ``{"sheet": "samples.png", "accuracy": {model: {char: fraction}}, "recognised_by": ...}``.
    """
    specs = [SampleSpec(prompt=PROMPTS[row], width=size, height=size, frames=1, steps=SAMPLE_STEPS, guidance=SAMPLE_GUIDANCE,
                        seed=seed, flow_shift=3.0, where=f"demo {row}")
             for row in PROMPTS for seed in SEEDS]
    contexts = encode_prompts(load_tokenizer(models["tokenizer"]), load_text_encoder(models["t5"]), specs)
    renderer = Renderer(load_vae(models["vae"]), contexts, torch.device("cpu"))
    inventory, cfg, head_dim = inspect_base(base)
    variants = check_variants(inventory, [("base", [])] + [(c, [SlotSpec(p)]) for c, p in slots.items()])
    model = load_inspected(inventory, cfg, head_dim).model
    names = sorted({e.name for v in variants for s, _ in v.slots for e in s.manifest.entries})
    overlay = SlotOverlay(model, names, torch.device("cpu"), torch.float32)
    columns: dict[str, list[np.ndarray]] = {}
    for variant in variants:
        overlay.apply(variant)
        columns["+" + variant.label if variant.slots else "base"] = [f[0] for f in renderer.render_batch(model, specs)]
    columns["spliced"] = [f[0] for f in renderer.render_batch(load_base(spliced).model, specs)]

    references = reference_colours(images)
    accuracy = {}
    for label, samples in columns.items():
        key = label.lstrip("+")
        accuracy[key] = {}
        for char in slots:
            picked = [img for spec, img in zip(specs, samples) if spec.prompt == PROMPTS[char]]
            accuracy[key][char] = sum(recognise(img, references) == char for img in picked) / len(picked)
    cells = [[columns[label][i] for label in columns] for i in range(len(specs))]
    rows = [f"{s.prompt} (seed {s.seed})" for s in specs]
    sheet = np.asarray(contact_sheet(cells, rows, list(columns)))
    with atomic_file(out / SHEET_NAME, force=True) as fd:
        write_all(fd, png_bytes(sheet))
    return {"sheet": SHEET_NAME, "accuracy": accuracy,
            "recognised_by": "nearest mean colour to each character's training images"}


def render_accuracy(samples: dict) -> str:
    """The accuracy table, for the terminal after the loss table."""
    labels = list(samples["accuracy"])
    heads = {"base": "base", "char1": "+char1", "char2": "+char2", "spliced": "spliced"}
    chars = list(next(iter(samples["accuracy"].values())))
    lines = [f"samples recognised as the prompt's character ({samples['recognised_by']}; sheet: {samples['sheet']})",
             f"{'prompt':<8}" + "".join(f"{heads.get(m, m):>10}" for m in labels)]
    for char in chars:
        lines.append(f"{char:<8}" + "".join(f"{samples['accuracy'][m][char]:>10.0%}" for m in labels))
    return "\n".join(lines)
