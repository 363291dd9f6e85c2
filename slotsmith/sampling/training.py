"""Samples during training: ``slotsmith train --sample-prompts FILE --sample-every N``.

The run's model (base plus the slot being trained) is sampled at the start,
every N steps and at the end, into ``OUT.samples/stepNNNNNN/``, through the
same ``Renderer`` as ``slotsmith sample``. Sampling leaves training exactly
as it was: the renderer draws its noise from its own seeded generators,
restores the global random state and the model's train mode, and computes
under ``no_grad``.
"""

from __future__ import annotations

from pathlib import Path

import torch

from slotsmith import __version__
from slotsmith.errors import SlotsmithError
from slotsmith.sampling.generate import (
    Renderer,
    encode_prompts,
    record,
    sample_name,
    write_sample,
)
from slotsmith.sampling.prompts import SampleSpec, read_prompt_file
from slotsmith.train import TrainSettings


def samples_dir(out: str | Path) -> Path:
    """``OUT.samples``: where a run's samples go, beside its slot."""
    out = Path(out)
    return out.with_name(out.name + ".samples")


class TrainingSampler:
    """Writes samples of the model being trained at chosen steps.

    Args:
        specs: The prompts and their settings.
        renderer: Holds the VAE and the encoded prompts.
        folder: ``OUT.samples``.
        every: Sample every this many steps (0: only at the start and the end).
        made_with: What each sample records about the run.
    """

    def __init__(self, specs: list[SampleSpec], renderer: Renderer, folder: Path, every: int, made_with: dict):
        self.specs, self.renderer, self.folder, self.every, self.made_with = specs, renderer, folder, every, made_with
        self.done: set[int] = set()

    def due(self, step: int, start: bool = False, end: bool = False) -> bool:
        """Whether ``step`` is sampled: the run's first and last step, and every ``every``-th."""
        return step not in self.done and (start or end or (self.every > 0 and step % self.every == 0))

    def sample(self, model: torch.nn.Module, step: int) -> Path:
        """Write every prompt's sample of ``model`` into ``stepNNNNNN/`` (replacing a previous run's).

        Returns:
            The step's folder.
        """
        folder = self.folder / f"step{step:06d}"
        folder.mkdir(parents=True, exist_ok=True)
        made_with = {**self.made_with, "step": step}
        for i, spec in enumerate(self.specs):
            frames = self.renderer.render(model, spec)
            write_sample(folder / sample_name(i, spec), frames, record(spec, made_with), force=True)
        self.done.add(step)
        return folder


def training_sampler(settings: TrainSettings, base_name: str, device: torch.device) -> TrainingSampler | None:
    """The sampler of a run with ``--sample-prompts`` (None without): prompts read and encoded, VAE loaded.

    Called before the base loads, so a bad prompt file or encoder fails first.

    Args:
        settings: The run's settings as the user gave them (its encoders).
        base_name: The base's file name, recorded in each sample.
        device: The training device.

    Raises:
        SlotsmithError: A bad prompt file, a missing encoder, or encoders that cannot load.
    """
    from slotsmith.data.encoders import load_text_encoder, load_tokenizer, load_vae

    if not settings.sample_prompts:
        return None
    specs = read_prompt_file(settings.sample_prompts, SampleSpec(prompt="", width=832, height=480, steps=20))
    for name in ("vae", "t5", "tokenizer"):
        path = getattr(settings, name)
        if not Path(path).exists():
            raise SlotsmithError(f"{path}: no such file (--{name}, for --sample-prompts)")
    text_dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    contexts = encode_prompts(load_tokenizer(settings.tokenizer), load_text_encoder(settings.t5, device, text_dtype),
                              specs)
    renderer = Renderer(load_vae(settings.vae, device), contexts, device, settings.mixed_precision)
    made_with = {"base": {"file": base_name}, "training": {"slot": Path(settings.out).name, "ff": settings.ff,
                                                           "ffid": settings.ffid}, "slotsmith": __version__}
    return TrainingSampler(specs, renderer, samples_dir(settings.out), settings.sample_every, made_with)
