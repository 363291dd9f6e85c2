"""``slotsmith sample``: a base, slots overlaid in memory, prompts -> PNGs, MP4s or a contact sheet.

Order of work, so bad input fails fast: settings and prompts; the base's
headers (and ``--base-high``'s); every slot through exactly the checks
``splice`` runs (``slotsmith.splice.check_slots``), each against its own
expert's base; the encoders' paths. Only then are the text encoder (prompts
encoded, then freed), the VAE and the DiT (or both experts) loaded.
"""

from __future__ import annotations

import dataclasses
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from slotsmith import __version__
from slotsmith.errors import SlotsmithError
from slotsmith.inventory import Inventory
from slotsmith.layout import WanConfig
from slotsmith.sampling.generate import (
    AMP_DTYPES,
    Renderer,
    contact_sheet,
    encode_prompts,
    png_bytes,
    record,
    sample_name,
    write_sample,
)
from slotsmith.sampling.prompts import SampleSpec, check_spec, read_prompt_file
from slotsmith.slot import InputFiles, Slot, read_slot
from slotsmith.slotspec import SlotSpec, parse_slot_spec
from slotsmith.splice import check_slots
from slotsmith.training.slot_params import SlotParams, attach_slot
from slotsmith.training.wan import TORCH_DTYPES, enable_fp8_storage, inspect_base, load_inspected

BASE_LABEL = "base"
"""The ``--compare`` item that means the base alone."""


@dataclass(frozen=True)
class SampleOptions:
    """What ``slotsmith sample`` runs with (see ``slotsmith sample --help``)."""

    base: str
    vae: str
    t5: str
    tokenizer: str
    out: str
    slots: tuple[str, ...] = ()
    base_high: str | None = None
    slots_high: tuple[str, ...] = ()
    boundary: float | None = None
    prompts: tuple[str, ...] = ()
    prompts_file: str | None = None
    defaults: SampleSpec = field(default_factory=lambda: SampleSpec(prompt=""))
    grid: bool = False
    compare: str | None = None
    fp8_base: bool = False
    offload_blocks: bool = False
    mixed_precision: str = "no"
    head_dim: int | None = None
    device: str | None = None
    force: bool = False
    quiet: bool = False


@dataclass(frozen=True)
class Variant:
    """One model to sample: the base with some slots, each at a strength.

    Attributes:
        label: How it is named in file names and column heads.
        slots: ``(slot, strength)`` pairs, checked against the base.
    """

    label: str
    slots: tuple[tuple[Slot, float], ...] = ()

    def made_with(self, base_name: str, layout_digest: str) -> dict:
        """The base and slot digests a sample of this variant records."""
        return {
            "base": {"file": base_name, "layout_digest": layout_digest},
            "slots": [{"file": s.path.name, "digest": s.manifest.digest, "strength": k} for s, k in self.slots],
            "slotsmith": __version__,
        }


def parse_compare(text: str) -> list[tuple[str, list[SlotSpec]]]:
    """``base,a.slot,b.slot:0.5,a.slot+b.slot`` -> (label, slot specs) per column, labelled by file names.

    Raises:
        SlotsmithError: An empty item, or a bad strength.
    """
    columns = []
    for item in text.split(","):
        item = item.strip()
        if not item:
            raise SlotsmithError(f"--compare {text!r}: an empty item (write e.g. base,char1.slot,char1.slot+char2.slot)")
        specs = [] if item == BASE_LABEL else [parse_slot_spec(part.strip()) for part in item.split("+")]
        columns.append(("+".join(s.label for s in specs) or BASE_LABEL, specs))  # file names: short column heads
    return columns


def check_variants(base_inventory, columns: Sequence[tuple[str, Sequence[SlotSpec]]]) -> list[Variant]:
    """Read each slot once and run splice's checks on every variant's set of slots.

    Args:
        base_inventory: The base's inventory (headers only).
        columns: (label, slot specs) per variant.

    Returns:
        The checked variants.

    Raises:
        SlotsmithError: A slot that is missing, malformed, made on another
            base, or overlapping another of its variant (splice's messages).
    """
    read: dict[Path, Slot] = {}
    variants = []
    with InputFiles() as files:
        for label, specs in columns:
            slots = []
            for spec in specs:
                if spec.path not in read:
                    if not spec.path.exists():
                        raise SlotsmithError(f"{spec.path}: no such file")
                    read[spec.path] = read_slot(spec.path)
                slots.append(read[spec.path])
            check_slots(base_inventory, slots, files)
            variants.append(Variant(label, tuple(zip(slots, (s.strength for s in specs)))))
    return variants


class SlotOverlay:
    """The tensors any variant touches, held apart from the model as fp32 copies.

    They are attached as the trainer attaches a slot (``attach_slot``), so
    ``--fp8-base`` and ``--offload-blocks`` never touch them, and changing
    variant rewrites only them. With the compute dtype equal to the base's,
    a strength-1 slot reaches the model as exactly its own bytes.

    Args:
        model: The loaded base (not yet cast or offloaded).
        names: Canonical names of every tensor the variants touch.
        device: The compute device.
        compute_dtype: The dtype the model computes in.
    """

    def __init__(self, model: torch.nn.Module, names: Sequence[str], device, compute_dtype: torch.dtype):
        self.params: SlotParams = attach_slot(model, list(names), device, compute_dtype)
        self.base = {n: self.params[n].detach().to("cpu", copy=True) for n in self.params.names}
        for p in self.params.parameters_in_order():
            p.requires_grad_(False)

    @torch.no_grad()
    def apply(self, variant: Variant) -> None:
        """Make the model the base plus ``variant``'s slots: ``base + s * (slot - base)`` on their rows."""
        for name, value in self.base.items():
            self.params[name].copy_(value)
        for slot, strength in variant.slots:
            for e in slot.manifest.entries:
                raw = bytearray(slot.read_tensor(e.name))
                new = torch.frombuffer(raw, dtype=TORCH_DTYPES[e.dtype]).reshape(e.stored_shape).float()
                target = self.params[e.name]
                if e.rows is not None:
                    target = target[e.rows[0] : e.rows[1]]
                new = new.to(target.device)
                target.copy_(new if strength == 1.0 else target + strength * (new - target))


def place(model: torch.nn.Module, device: torch.device, fp8_base: bool, offload_blocks: bool) -> None:
    """Put the frozen base where ``train`` puts it: fp8 storage and block offloading as asked."""
    if fp8_base:
        enable_fp8_storage(model)
    if offload_blocks:
        model.enable_group_offload(
            onload_device=device, offload_device=torch.device("cpu"), offload_type="block_level",
            num_blocks_per_group=1, use_stream=device.type == "cuda",
        )
    else:
        model.to(device)


def collect_specs(opts: SampleOptions) -> list[SampleSpec]:
    """The prompts to sample: each ``--prompt``, then each line of ``--prompts``.

    Raises:
        SlotsmithError: None given, or a bad setting or prompt-file line.
    """
    specs = [check_spec(dataclasses.replace(opts.defaults, prompt=p, where="--prompt")) for p in opts.prompts]
    if opts.prompts_file:
        specs += read_prompt_file(opts.prompts_file, opts.defaults)
    if not specs:
        raise SlotsmithError("give --prompt TEXT (repeatable) or --prompts FILE")
    return specs


def resolve_device(name: str | None) -> torch.device:
    """``--device``, or cuda when there is one, else cpu."""
    from slotsmith.data.cache_builder import resolve_device as check

    return torch.device(check(name))


def refuse_image_to_video(cfg: WanConfig, base_name, what: str) -> None:
    """Sampling draws from text alone: an image-to-video base would need a first frame (not supported yet).

    Raises:
        SlotsmithError: ``base_name`` conditions on images.
    """
    if cfg.conditions_on_images:
        raise SlotsmithError(
            f"{base_name}: an image-to-video base ({cfg.in_dim} input channels); {what} draws text-to-video "
            "models only so far"
        )


@dataclass
class HighExpert:
    """Wan 2.2 A14B's high-noise expert (``--base-high``), checked; its model once loaded.

    Attributes:
        inventory: Its base's inventory.
        cfg: Its sizes.
        head_dim: Its attention head size.
        variant: Its slots (``--slot-high``), checked against its base.
        boundary: Where it hands over to the low-noise expert, in (0, 1).
        boundary_from: ``--boundary`` or the known model whose layout gave it.
        model: The loaded expert, slots applied (None until loaded).
    """

    inventory: Inventory
    cfg: WanConfig
    head_dim: int
    variant: Variant
    boundary: float
    boundary_from: str
    model: torch.nn.Module | None = None

    def made_with(self) -> dict:
        """What a sample records about the high-noise expert."""
        mine = self.variant.made_with(Path(self.inventory.source).name, self.inventory.layout_digest())
        return {"base_high": mine["base"], "slots_high": mine["slots"], "boundary": self.boundary}


def check_high_expert(opts: SampleOptions, low: Inventory) -> HighExpert | None:
    """``--base-high`` and its ``--slot-high`` slots, checked as the low expert's are (no weights load).

    Args:
        opts: The settings.
        low: The ``--base`` inventory (the low-noise expert).

    Returns:
        The checked high-noise expert, or None without ``--base-high``.

    Raises:
        SlotsmithError: ``--slot-high`` or ``--boundary`` without ``--base-high``;
            a boundary outside (0, 1), or none (a base of no two-expert
            layout and no ``--boundary``); a ``--base-high`` of another
            layout; a high slot that fails splice's checks on it.
    """
    from slotsmith.training.preflight import expert_boundary  # preflight imports this module

    if opts.base_high is None:
        if opts.slots_high:
            raise SlotsmithError("--slot-high needs --base-high (the high-noise expert its slots go into)")
        if opts.boundary is not None:
            raise SlotsmithError("--boundary goes with --base-high (where the two experts hand over)")
        return None
    if opts.boundary is not None and not 0 < opts.boundary < 1:
        raise SlotsmithError(f"--boundary {opts.boundary} must be in (0, 1)")
    boundary, source = expert_boundary(low, opts.boundary, "--base-high")
    inventory, cfg, head_dim = inspect_base(opts.base_high, opts.head_dim)
    if inventory.layout_digest() != low.layout_digest():
        raise SlotsmithError(
            f"{inventory.source}: --base-high has layout {inventory.layout_digest()}, but --base {low.source} has "
            f"{low.layout_digest()}: the two experts of one model share a layout"
        )
    given = [parse_slot_spec(s) for s in opts.slots_high]
    (variant,) = check_variants(inventory, [("+".join(s.label for s in given) or BASE_LABEL, given)])
    return HighExpert(inventory, cfg, head_dim, variant, boundary, source)


def load_model(inventory: Inventory, cfg: WanConfig, head_dim: int, variants: Sequence[Variant], opts: SampleOptions,
               device: torch.device) -> tuple[torch.nn.Module, SlotOverlay | None]:
    """Load a base, attach the overlay its variants need, and place it as ``train`` places a base.

    Returns:
        The model and its overlay (None when no variant has a slot).
    """
    base = load_inspected(inventory, cfg, head_dim)
    model = base.model
    compute_dtype = base.dtype
    if opts.fp8_base and base.dtype != torch.bfloat16:
        compute_dtype = torch.bfloat16
        for p in model.parameters():
            p.data = p.data.to(torch.bfloat16)
    touched = sorted({e.name for v in variants for s, _ in v.slots for e in s.manifest.entries})
    overlay = SlotOverlay(model, touched, device, compute_dtype) if touched else None
    place(model, device, opts.fp8_base, opts.offload_blocks)
    return model, overlay


def run_sample(opts: SampleOptions, say: Callable[[str], None] = lambda _: None) -> list[Path]:
    """Run ``slotsmith sample`` (see the module docstring).

    Args:
        opts: The settings.
        say: Called with each progress message.

    Returns:
        The files written (the samples, or the one contact sheet with ``grid``).

    Raises:
        SlotsmithError: Bad input, before any weight loads.
    """
    from slotsmith.data.encoders import load_text_encoder, load_tokenizer, load_vae

    specs = collect_specs(opts)
    if opts.compare and not opts.grid:
        raise SlotsmithError("--compare goes with --grid (one contact sheet, a column per variant)")
    if opts.compare and opts.slots:
        raise SlotsmithError("give --slot or --compare, not both (--compare names every column's slots)")
    if opts.mixed_precision not in ("no", *AMP_DTYPES):
        raise SlotsmithError(f"--mixed-precision {opts.mixed_precision!r} is not one of no, bf16, fp16")
    inventory, cfg, head_dim = inspect_base(opts.base, opts.head_dim)
    refuse_image_to_video(cfg, inventory.source, "slotsmith sample")
    if opts.compare:
        columns = parse_compare(opts.compare)
    else:
        given = [parse_slot_spec(s) for s in opts.slots]
        columns = [("+".join(s.label for s in given) or BASE_LABEL, given)]
    variants = check_variants(inventory, columns)
    high = check_high_expert(opts, inventory)
    for name, path in (("--vae", opts.vae), ("--t5", opts.t5), ("--tokenizer", opts.tokenizer)):
        if not Path(path).exists():
            raise SlotsmithError(f"{path}: no such file ({name})")
    out = Path(opts.out)
    if out.exists() and not out.is_dir():
        raise SlotsmithError(f"{out}: exists and is not a folder")
    device = resolve_device(opts.device)

    say("encoding the prompts")
    import transformers

    transformers.utils.logging.disable_progress_bar()  # its per-file loading bar is noise next to the step bar
    text_dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    text_encoder = load_text_encoder(opts.t5, device, text_dtype)
    contexts = encode_prompts(load_tokenizer(opts.tokenizer), text_encoder, specs)
    del text_encoder
    vae = load_vae(opts.vae, device)
    renderer = Renderer(vae, contexts, device, opts.mixed_precision, progress=not opts.quiet and sys.stderr.isatty())
    for spec in specs:  # the size check needs the VAE; fail before the DiT loads
        renderer.check(spec, cfg.patch_size)

    say(f"loading {inventory.source}")
    model, overlay = load_model(inventory, cfg, head_dim, variants, opts, device)
    expert_args = {}
    if high is not None:
        say(f"loading {high.inventory.source} (high-noise expert, from timestep {high.boundary:g} x 1000 up)")
        high.model, high_overlay = load_model(high.inventory, high.cfg, high.head_dim, [high.variant], opts, device)
        if high_overlay is not None:
            high_overlay.apply(high.variant)
        expert_args = {"high": high.model, "boundary": high.boundary}

    base_name = Path(inventory.source).name
    layout = inventory.layout_digest()
    out.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    cells: list[list[np.ndarray]] = [[] for _ in specs]
    sheet_records = []
    for variant in variants:
        if overlay is not None:
            overlay.apply(variant)
        made_with = {**variant.made_with(base_name, layout), **(high.made_with() if high else {})}
        for i, spec in enumerate(specs):
            say(f"sampling {variant.label}: {spec.prompt!r} (seed {spec.seed})")
            frames = renderer.render(model, spec, **expert_args)
            meta = record(spec, made_with)
            if opts.grid:
                cells[i].append(frames[0])
                sheet_records.append({"variant": variant.label, **meta})
            else:
                label = variant.label if variant.slots else ""
                written.append(write_sample(out / sample_name(i, spec, label), frames, meta, force=opts.force))
    if opts.grid:
        from slotsmith.io.writer import atomic_file, write_all

        sheet = contact_sheet(cells, [f"{s.prompt} (seed {s.seed})" for s in specs], [v.label for v in variants])
        path = out / "grid.png"
        with atomic_file(path, force=opts.force) as fd:
            write_all(fd, png_bytes(np.asarray(sheet), {"cells": sheet_records, "rows": "prompts",
                                                         "columns": [v.label for v in variants]}))
        written.append(path)
    return written
