"""What ``slotsmith train`` checks before loading any weights: base, selection, output, cache.

The checks read headers only, so a run that cannot start fails in seconds,
and ``train --data`` runs the base's and the output's before encoding anything.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from slotsmith.data.cache import load_index
from slotsmith.digest import digest_json
from slotsmith.errors import SlotsmithError
from slotsmith.inventory import Inventory
from slotsmith.io.files import os_error
from slotsmith.io.header import read_header
from slotsmith.io.writer import refuse_input_as_output
from slotsmith.layout import KNOWN_MODELS, WanConfig
from slotsmith.sampling.run import refuse_image_to_video
from slotsmith.select import Selection, select
from slotsmith.slot import SLOT_SUFFIX, SNAPSHOT_SUFFIX, read_slot
from slotsmith.train import INT_RANGES, TrainSettings
from slotsmith.training.conditioning import check_cache_fits_base, check_data_for_base
from slotsmith.training.optim import make_optimizer
from slotsmith.training.stream import epoch_length
from slotsmith.training.wan import inspect_base


@dataclass
class BasePlan:
    """What the checks of the base, the selection and the output established (headers only).

    Attributes:
        boundary_from: Where ``boundary`` came from: ``--boundary``, or the
            known Wan 2.2 model whose layout the base matches (None without
            an expert).
    """

    inventory: Inventory
    config: WanConfig
    head_dim: int
    selection: Selection
    t_range: tuple[float, float]
    boundary: float | None
    boundary_from: str | None
    out: Path
    state_path: Path


@dataclass
class RunPlan(BasePlan):
    """What every cheap check established, the cache's included, before any weights are loaded."""

    cache_index: dict
    dataset_digest: str
    total_steps: int
    batch_size: int  # per process: --batch-size, else the dataset's
    batch_from: str  # where batch_size came from, for the summary
    entry_shapes: tuple  # each dataset entry's latent shape (items times their repeats), for bucketed batches


def state_path_for(out: Path) -> Path:
    """Where a run writing ``out`` keeps its resumable state."""
    return out.with_name(out.name + ".state")


def snapshot_path_for(out: Path, step: int) -> Path:
    """The ``--save-every`` snapshot of ``step``: ``OUT-stepN.snapshot`` beside ``OUT`` (a slot file)."""
    return out.with_name(f"{out.name.removesuffix(SLOT_SUFFIX)}-step{step:06d}{SNAPSHOT_SUFFIX}")


def expert_range(
    settings: TrainSettings, inventory: Inventory
) -> tuple[tuple[float, float], float | None, str | None]:
    """The timestep range of ``--expert`` (the whole [0, 1] without one).

    The boundary is ``--boundary``, else that of the known two-expert Wan 2.2
    model whose layout the base's shapes match. Wan 2.1 T2V 14B has the
    layout of Wan 2.2 T2V A14B, so such a base gets that model's 0.875.

    Returns:
        ((low, high), boundary, where the boundary came from: ``--boundary``
        or the model's name); the last two are None without an expert.

    Raises:
        SlotsmithError: ``--boundary`` without ``--expert``, or ``--expert``
            on a base that matches no two-expert layout and no ``--boundary``.
    """
    if settings.expert is None:
        if settings.boundary is not None:
            raise SlotsmithError("--boundary only makes sense with --expert")
        return (0.0, 1.0), None, None
    boundary, source = expert_boundary(inventory, settings.boundary, "--expert")
    return ((boundary, 1.0) if settings.expert == "high" else (0.0, boundary)), boundary, source


def expert_boundary(inventory: Inventory, given: float | None, option: str) -> tuple[float, str]:
    """Where the high-noise expert hands over to the low-noise one, as a fraction of the timesteps.

    Args:
        inventory: A base of the model.
        given: ``--boundary``, when given.
        option: The option that needs the boundary, for the message.

    Returns:
        ``(boundary, where it came from)``: ``--boundary``, or the name of
        the known two-expert model whose layout the base's shapes match.

    Raises:
        SlotsmithError: No ``given`` boundary and no two-expert layout matches.
    """
    if given is not None:
        return given, "--boundary"
    source = inventory.known_model("low")
    experts = KNOWN_MODELS[source].experts if source else None
    if not experts:
        two = ", ".join(name for name, model in KNOWN_MODELS.items() if model.experts)
        raise SlotsmithError(
            f"{inventory.source}: {option} needs the expert boundary, and the base's shapes match no "
            f"two-expert Wan 2.2 layout ({two}); give --boundary"
        )
    return experts["low"][1], source


def check_taken(out: Path, inventory: Inventory, selection: Selection, expert: str | None) -> None:
    """Refuse when another slot of the same base in ``out``'s folder shares a tensor.

    Our own output is not "another slot"; nor are snapshots, which are not
    ``.slot`` files.

    Raises:
        SlotsmithError: Names the other slot, the tensor and its ffid.
    """
    ours = {n: selection.rows.get(n, (0, inventory.tensors[n].shape[0] if inventory.tensors[n].shape else 1))
            for n in selection.tensors}
    layout = inventory.layout_digest()
    for other in sorted(out.parent.glob(f"*{SLOT_SUFFIX}")):
        if other.resolve() == out.resolve():
            continue
        try:
            manifest = read_slot(other).manifest
        except SlotsmithError:
            continue  # Not a readable slot: nothing it could collide with.
        if manifest.base.layout_digest != layout or manifest.expert != expert:
            continue
        shared = sorted(
            e.describe() for e in manifest.entries
            if e.name in ours and max(e.span[0], ours[e.name][0]) < min(e.span[1], ours[e.name][1])
        )
        if shared:
            origin = f"ffid {manifest.selection['ffid']}" if manifest.selection else "an extracted slot"
            pools = (manifest.selection or {}).get("num_pools")
            differ = (
                f"; its pool count {pools} differs from this run's {selection.num_pools}"
                if pools is not None and pools != selection.num_pools else ""
            )
            raise SlotsmithError(
                f"{other}: already holds tensor {shared[0]!r} of this base ({origin}{differ}); "
                f"pick another --ffid or pass --force"
            )


def dataset_digest(index: dict) -> str:
    """Digest of a cache's content: its items are content-addressed files (image conditioning's too)."""
    return digest_json([
        [i["latents"], i["text"], i["repeats"], *(i[k] for k in ("condition", "clip") if k in i)]
        for i in index["items"]
    ])


def plan_base(settings: TrainSettings) -> BasePlan:
    """The checks of the base, the selection and the output: headers only.

    They need no cache, so ``train --data`` runs them before encoding anything.

    Args:
        settings: The run's settings.

    Returns:
        What they established.

    Raises:
        SlotsmithError: Invalid settings, a missing file, a base that is not
            a (supported) Wan DiT, an expert without a boundary, an output
            that is not a ``.slot`` file, a taken ffid, an existing output,
            a missing resume state, a missing optimizer library.
    """
    settings.validate()
    inventory, cfg, head_dim = inspect_base(settings.base, settings.head_dim)
    if settings.data:
        check_data_for_base(cfg, settings.i2v, settings.clip, settings.vae is not None, inventory.source)
    if settings.sample_prompts:
        refuse_image_to_video(cfg, inventory.source, "--sample-prompts")
    shapes = {n: t.shape for n, t in inventory.tensors.items()}
    selection = select(shapes, settings.ff, settings.ffid, settings.algorithm, settings.pools)
    t_range, boundary, boundary_from = expert_range(settings, inventory)
    low = max(t_range[0], settings.min_timestep / 1000)
    high = min(t_range[1], settings.max_timestep / 1000)
    if not low < high:
        raise SlotsmithError(f"--min/--max-timestep leave nothing of the {settings.expert} expert's range {t_range}")
    out = Path(settings.out)
    for path in (out, state_path_for(out), snapshot_path_for(out, 0)):
        # The state and snapshot names are longer than OUT: a name over the system's
        # limit is found now, not when the first state is saved.
        try:
            os.stat(path)
        except FileNotFoundError:
            pass
        except OSError as e:
            raise os_error(path, e, "cannot write") from None
    if not out.parent.is_dir():
        raise SlotsmithError(f"{out.parent}: output folder does not exist")
    if not os.access(out.parent, os.W_OK):
        # Found now, not after hours of training when the slot is written.
        raise SlotsmithError(f"{out.parent}: output folder is not writable")
    refuse_input_as_output(out, inventory.checkpoint.paths)
    if out.suffix != SLOT_SUFFIX:
        # Other runs look for taken tensors in .slot files only: a slot under another name would hide.
        raise SlotsmithError(f"{out}: the output must be a {SLOT_SUFFIX} file (e.g. -o {out.stem}{SLOT_SUFFIX})")
    state_path = state_path_for(out)
    if settings.resume and not state_path.is_file():
        raise SlotsmithError(f"{state_path}: no training state to resume from")
    if out.exists() and not (settings.force or settings.resume):
        raise SlotsmithError(f"{out}: already exists (use --force to overwrite)")
    if not settings.force:
        check_taken(out, inventory, selection, settings.expert)
    if settings.optimizer != "adamw":
        make_optimizer(settings.optimizer, [nn.Parameter(torch.zeros(1))], 1e-3, 0.0)
    return BasePlan(inventory, cfg, head_dim, selection, (low, high), boundary, boundary_from, out, state_path)


def plan_run(settings: TrainSettings, num_processes: int = 1, base: BasePlan | None = None) -> RunPlan:
    """Every check that needs no weights: fail fast, before heavy work.

    Args:
        settings: Validated settings naming a cache folder.
        num_processes: Data-parallel processes (the global batch grows with it).
        base: ``plan_base(settings)``, when it already ran.

    Returns:
        The plan.

    Raises:
        SlotsmithError: What ``plan_base`` raises, or a cache that does not
            fit the base.
    """
    base = base or plan_base(settings)
    cfg = base.config
    index = load_index(settings.cache)
    check_cache_fits_base(settings.cache, index, cfg, base.inventory.source)
    if index["text_dim"] != cfg.text_dim:
        raise SlotsmithError(
            f"{settings.cache}: text embeddings are {index['text_dim']}-dim but the base takes {cfg.text_dim}"
        )
    shapes = _check_latent_shapes(Path(settings.cache), index, cfg)
    entry_shapes = tuple(shape for item, shape in zip(index["items"], shapes) for _ in range(item["repeats"]))
    batch, batch_from = _batch_size(settings, index)
    global_batch = batch * num_processes * settings.grad_accum
    if settings.steps is not None:
        total = settings.steps
    else:  # an epoch is the stream's: the entries, and the padding that keeps each batch one shape
        total = math.ceil(settings.epochs * epoch_length(entry_shapes, batch) / global_batch)
    high = INT_RANGES["steps"][1]
    if total > high:
        raise SlotsmithError(f"--epochs {settings.epochs:g} makes {total} steps, over the limit of {high}")
    return RunPlan(
        **vars(base), cache_index=index, dataset_digest=dataset_digest(index), total_steps=total, batch_size=batch,
        batch_from=batch_from, entry_shapes=entry_shapes,
    )


def _batch_size(settings: TrainSettings, index: dict) -> tuple[int, str]:
    """The batch size per process: ``--batch-size`` when given, else the dataset's (as musubi-tuner takes it).

    Raises:
        SlotsmithError: No --batch-size and the datasets ask for different ones.
    """
    if settings.batch_size is not None:
        return settings.batch_size, "--batch-size"
    asked = sorted({item["batch_size"] for item in index["items"] if isinstance(item.get("batch_size"), int)})
    if not asked:
        return 1, "the default: the cache records no batch size"
    if len(asked) > 1:
        raise SlotsmithError(
            f"{settings.cache}: its datasets ask for different batch sizes ({', '.join(map(str, asked))}); one run "
            "has one batch size: give --batch-size"
        )
    return asked[0], "the dataset's batch_size"


def _check_latent_shapes(cache_dir: Path, index: dict, cfg: WanConfig) -> list[tuple[int, ...]]:
    """Each item's latent shape, checked against the patch size."""
    shapes = []
    for item in index["items"]:
        shape = read_header(cache_dir / item["latents"]).tensors["latents"].shape
        if any(s % p for s, p in zip(shape[1:], cfg.patch_size, strict=True)):
            raise SlotsmithError(
                f"{cache_dir / item['latents']}: latent size {list(shape[1:])} is not a multiple of the "
                f"patch size {list(cfg.patch_size)}"
            )
        shapes.append(tuple(shape))
    return shapes
