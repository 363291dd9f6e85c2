"""``slotsmith train``: fully fine-tune one slot of a Wan DiT, write only the slot.

How the slot is trained:

- The slot's tensors are taken *out* of the model's parameter registry and
  kept as fp32 master copies (``SlotParams``) on the training device. A
  forward pre-hook on each owning module hands the module its tensor cast to
  the compute dtype, so gradients flow to the masters while every hook that
  moves or casts *registered* parameters (diffusers group offloading,
  layerwise fp8 casting) leaves them alone. Hence ``--offload-blocks`` and
  ``--fp8-base`` never touch trained tensors, their gradients or optimizer
  state.
- Data parallel: each process computes gradients on its share of the global
  batch and only the slot's gradients are averaged (no DDP wrapper, so the
  frozen base is never broadcast).
- Every sample's noise and timestep come from a generator seeded by (seed,
  the sample's position in the data stream), and the data order is a pure
  function of (seed, epoch): results do not depend on the number of
  processes, and resuming needs only the step counter.

Flow matching as in Wan: ``x_t = (1 - t) x0 + t noise``, target ``noise - x0``,
model timestep ``t * 1000``, MSE loss.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import random
import signal
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from tqdm import tqdm

from slotsmith.cache import CachedDataset, load_index
from slotsmith.caching import ensure_cache
from slotsmith.digest import digest_json
from slotsmith.errors import SlotsmithError
from slotsmith.inventory import Inventory
from slotsmith.io.header import read_header
from slotsmith.io.writer import atomic_file, refuse_input_as_output
from slotsmith.layout import KNOWN_MODELS, WanConfig
from slotsmith.manifest import Manifest
from slotsmith.names import native_to_diffusers
from slotsmith.select import Selection, select_v2
from slotsmith.slot import SLOT_SUFFIX, SNAPSHOT_SUFFIX, read_slot, write_slot
from slotsmith.train_config import TrainSettings
from slotsmith.wan import TORCH_DTYPES, inspect_base, load_base

STATE_FORMAT = "slotsmith-train-state/1"
_SEED_MIX = 0x9E3779B97F4A7C15
"""Odd 64-bit constant that spreads (seed, position) pairs over generator seeds."""


# --------------------------------------------------------------------------- slot parameters


class SlotParams(nn.Module):
    """The trained tensors, detached from the model they feed.

    Attributes:
        names: Canonical native names, in selection order.
        masters: ``names[i]`` -> fp32 ``nn.Parameter`` (keys use ``/`` for ``.``).
        compute_dtype: The dtype each tensor is cast to for the forward pass.
    """

    def __init__(self, names: list[str], masters: dict[str, nn.Parameter], compute_dtype: torch.dtype):
        super().__init__()
        self.names = list(names)
        self.masters = nn.ParameterDict({n.replace(".", "/"): p for n, p in masters.items()})
        self.compute_dtype = compute_dtype

    def __getitem__(self, name: str) -> nn.Parameter:
        return self.masters[name.replace(".", "/")]

    def parameters_in_order(self) -> list[nn.Parameter]:
        return [self[n] for n in self.names]

    @property
    def numel(self) -> int:
        return sum(p.numel() for p in self.masters.values())


def attach_slot(model: nn.Module, names: list[str], device: torch.device, compute_dtype: torch.dtype) -> SlotParams:
    """Move the named tensors out of ``model`` into fp32 trainable masters.

    Args:
        model: A ``WanTransformer3DModel`` (its other parameters stay frozen).
        names: Canonical native names of the slot's tensors.
        device: Where the masters, their gradients and optimizer state live.
        compute_dtype: The dtype the model computes in.

    Returns:
        The slot's parameters; ``model`` reads them through forward pre-hooks.
    """
    masters: dict[str, nn.Parameter] = {}
    owners: dict[nn.Module, list[tuple[str, nn.Parameter]]] = {}
    for name in names:
        module_path, _, attr = native_to_diffusers(name).rpartition(".")
        module = model.get_submodule(module_path)
        frozen = module._parameters.pop(attr)
        master = nn.Parameter(frozen.detach().to(device=device, dtype=torch.float32).clone())
        masters[name] = master
        owners.setdefault(module, []).append((attr, master))
        # Plain attribute, not a registered parameter: module.to() and the
        # diffusers hooks never see it.
        module.__dict__[attr] = master.detach().to(compute_dtype)
        del frozen

    def feed(module: nn.Module, _args) -> None:
        for attr, master in owners[module]:
            module.__dict__[attr] = master.to(compute_dtype)

    for module in owners:
        module.register_forward_pre_hook(feed)
        if next(module.parameters(), None) is None:
            # diffusers reads a module's dtype off its first parameter (e.g. the
            # time embedder's); keep one, empty and frozen, when the slot took all.
            module.register_parameter("slot_dtype", nn.Parameter(torch.empty(0, dtype=compute_dtype), False))
    return SlotParams(names, masters, compute_dtype)


# --------------------------------------------------------------------------- timesteps and loss


def sample_t(settings: TrainSettings, generator: torch.Generator, t_range: tuple[float, float]) -> float:
    """One flow-matching time in ``t_range`` (fractions of 1000) for one sample.

    Args:
        settings: Sampling method and parameters.
        generator: The sample's own generator.
        t_range: ``(low, high)`` in [0, 1].

    Returns:
        ``t`` in ``[low, high]``.
    """
    method = settings.timestep_sampling
    if method == "uniform":
        t = torch.rand((), generator=generator).item()
    else:
        z = torch.randn((), generator=generator).item()
        if method == "logit_normal":
            t = 1 / (1 + math.exp(-(settings.logit_mean + settings.logit_std * z)))
        else:
            t = 1 / (1 + math.exp(-settings.sigmoid_scale * z))
            if method == "shift":
                s = settings.flow_shift
                t = s * t / (1 + (s - 1) * t)
    low, high = t_range
    return low + (high - low) * t


def flow_loss(
    model: nn.Module,
    latents: torch.Tensor,
    context: torch.Tensor,
    t: torch.Tensor,
    noise: torch.Tensor,
    input_dtype: torch.dtype,
) -> torch.Tensor:
    """Per-sample flow-matching MSE.

    Args:
        model: The Wan model.
        latents: ``[B, C, F, H, W]`` clean latents (x0).
        context: ``[B, 512, text_dim]`` text embeddings.
        t: ``[B]`` times in [0, 1].
        noise: Like ``latents``.
        input_dtype: The dtype the model's inputs must have.

    Returns:
        ``[B]`` losses in float32.
    """
    tb = t.view(-1, 1, 1, 1, 1)
    x_t = (1 - tb) * latents + tb * noise
    pred = model(
        hidden_states=x_t.to(input_dtype),
        timestep=t * 1000,
        encoder_hidden_states=context.to(input_dtype),
        return_dict=False,
    )[0]
    target = noise - latents
    return ((pred.float() - target) ** 2).flatten(1).mean(1)


def lr_factor(settings: TrainSettings, step: int, total: int) -> float:
    """Learning-rate multiplier for optimizer step ``step`` (0-based) of ``total``."""
    if step < settings.warmup_steps:
        return (step + 1) / settings.warmup_steps
    if settings.lr_scheduler == "constant":
        return 1.0
    progress = (step - settings.warmup_steps) / max(1, total - settings.warmup_steps)
    if settings.lr_scheduler == "linear":
        return max(0.0, 1.0 - progress)
    return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def make_optimizer(kind: str, params: list[nn.Parameter], lr: float, weight_decay: float) -> torch.optim.Optimizer:
    """The optimizer over the slot's masters.

    Raises:
        SlotsmithError: The optimizer's library is not installed.
    """
    if kind == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    if kind == "adamw8bit":
        try:
            import bitsandbytes
        except ImportError:
            raise SlotsmithError("--optimizer adamw8bit needs bitsandbytes (pip install bitsandbytes)") from None
        return bitsandbytes.optim.AdamW8bit(params, lr=lr, weight_decay=weight_decay)
    try:
        from transformers.optimization import Adafactor
    except ImportError:
        raise SlotsmithError("--optimizer adafactor needs transformers (pip install transformers)") from None
    return Adafactor(
        params, lr=lr, weight_decay=weight_decay, scale_parameter=False, relative_step=False, warmup_init=False
    )


def optimizer_state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes held by the optimizer's per-parameter state tensors."""
    return sum(
        v.numel() * v.element_size() for s in optimizer.state.values() for v in s.values() if torch.is_tensor(v)
    )


# --------------------------------------------------------------------------- data order


class DataStream:
    """Which dataset entry each sample position of the run uses.

    The stream is the concatenation of per-epoch permutations seeded by
    (seed, epoch), so it is the same for any number of processes and a
    resumed run needs only its step counter.
    """

    def __init__(self, size: int, seed: int):
        self.size = size
        self.seed = seed
        self._perms: dict[int, list[int]] = {}

    def entry(self, position: int) -> int:
        """The dataset index of the sample at ``position`` of the stream."""
        epoch, i = divmod(position, self.size)
        perm = self._perms.get(epoch)
        if perm is None:
            g = torch.Generator().manual_seed((self.seed * _SEED_MIX + epoch) % 2**63)
            perm = self._perms[epoch] = torch.randperm(self.size, generator=g).tolist()
        return perm[i]


def sample_generator(seed: int, position: int) -> torch.Generator:
    """The generator of the sample at ``position`` (noise and timestep)."""
    return torch.Generator().manual_seed((seed * _SEED_MIX + position * 2 + 1) % 2**63)


# --------------------------------------------------------------------------- checks before work


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
    if settings.boundary is not None:
        boundary, source = settings.boundary, "--boundary"
    else:
        source = inventory.known_model(settings.expert)
        experts = KNOWN_MODELS[source].experts if source else None
        if not experts:
            two = ", ".join(name for name, model in KNOWN_MODELS.items() if model.experts)
            raise SlotsmithError(
                f"{inventory.source}: --expert needs the expert boundary, and the base's shapes match no "
                f"two-expert Wan 2.2 layout ({two}); give --boundary"
            )
        boundary = experts["low"][1]
    return ((boundary, 1.0) if settings.expert == "high" else (0.0, boundary)), boundary, source


def check_taken(out: Path, inventory: Inventory, selection: Selection, expert: str | None) -> None:
    """Refuse when another slot of the same base in ``out``'s folder shares a tensor.

    Our own output is not "another slot"; nor are snapshots, which are not
    ``.slot`` files.

    Raises:
        SlotsmithError: Names the other slot, the tensor and its ffid.
    """
    ours = set(selection.tensors)
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
        shared = sorted(e.name for e in manifest.entries if e.name in ours)
        if shared:
            origin = f"ffid {manifest.selection['ffid']}" if manifest.selection else "an extracted slot"
            raise SlotsmithError(
                f"{other}: already holds tensor {shared[0]!r} of this base ({origin}); "
                f"pick another --ffid or pass --force"
            )


def dataset_digest(index: dict) -> str:
    """Digest of a cache's content: its items are content-addressed files."""
    return digest_json([[i["latents"], i["text"], i["repeats"]] for i in index["items"]])


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
    if cfg.image_dim or cfg.in_dim != cfg.out_dim:
        raise SlotsmithError(
            f"{inventory.source}: image-to-video bases (image conditioning channels) are not supported by the trainer yet"
        )
    selection = select_v2(inventory.numels(), settings.ff, settings.ffid)
    t_range, boundary, boundary_from = expert_range(settings, inventory)
    low = max(t_range[0], settings.min_timestep / 1000)
    high = min(t_range[1], settings.max_timestep / 1000)
    if not low < high:
        raise SlotsmithError(f"--min/--max-timestep leave nothing of the {settings.expert} expert's range {t_range}")
    out = Path(settings.out)
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
        raise SlotsmithError(f"{out}: already exists (pass --force to replace it)")
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
    if index["latent_channels"] != cfg.in_dim:
        raise SlotsmithError(
            f"{settings.cache}: latents have {index['latent_channels']} channels but the base takes {cfg.in_dim}"
        )
    if index["text_dim"] != cfg.text_dim:
        raise SlotsmithError(
            f"{settings.cache}: text embeddings are {index['text_dim']}-dim but the base takes {cfg.text_dim}"
        )
    _check_latent_shapes(Path(settings.cache), index, cfg)
    entries = sum(i["repeats"] for i in index["items"])
    global_batch = settings.batch_size * num_processes * settings.grad_accum
    total = settings.steps if settings.steps is not None else math.ceil(settings.epochs * entries / global_batch)
    return RunPlan(**vars(base), cache_index=index, dataset_digest=dataset_digest(index), total_steps=total)


def _check_latent_shapes(cache_dir: Path, index: dict, cfg: WanConfig) -> None:
    for item in index["items"]:
        shape = read_header(cache_dir / item["latents"]).tensors["latents"].shape
        if any(s % p for s, p in zip(shape[1:], cfg.patch_size, strict=True)):
            raise SlotsmithError(
                f"{cache_dir / item['latents']}: latent size {list(shape[1:])} is not a multiple of the "
                f"patch size {list(cfg.patch_size)}"
            )


# --------------------------------------------------------------------------- state


def _rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "python": list(random.getstate()[1])}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate((3, tuple(state["python"]), None))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


_RESUME_OPTIONS = ("ff", "ffid", "seed", "batch_size", "grad_accum", "optimizer", "timestep_sampling", "expert")
"""The options a resumed run must share with the run it continues."""

_RESUME_FACTS = {  # how the saved run differs, for what the identity holds besides options
    "layout": "a base of another layout",
    "dataset": "other training data (the cache differs)",
    "tensors": "another selection of tensors",
}


def _state_identity(settings: TrainSettings, plan: RunPlan, num_processes: int) -> dict:
    """What must match for a resumed run to continue the same run exactly.

    Options come first, so a resume refused for another ``--ffid`` names that
    option rather than the tensor list it implies.
    """
    return {
        **{k: getattr(settings, k) for k in _RESUME_OPTIONS},
        "layout": plan.inventory.layout_digest(),
        "dataset": plan.dataset_digest,
        "processes": num_processes,
        "tensors": list(plan.selection.tensors),
    }


def _resume_difference(key: str, saved, value) -> str:
    """How the saved run differs from this one in ``key`` of the identity."""
    if key in _RESUME_OPTIONS:
        flag = "--" + key.replace("_", "-")

        def given(v) -> str:
            return f"no {flag}" if v is None else f"{flag} {v}"

        return f"{given(saved)}, but this run has {given(value)}"
    if key == "processes":
        return f"{saved} process(es), but this run has {value}"
    return _RESUME_FACTS[key]


def save_state(path: Path, identity: dict, step: int, slot: SlotParams, optimizer, scaler, losses: list) -> None:
    """Write the resumable state atomically (slot-sized: masters + optimizer state).

    Raises:
        SlotsmithError: Writing failed (naming the file); nothing was written.
    """
    state = {
        "format": STATE_FORMAT,
        "identity": json.dumps(identity, sort_keys=True),
        "step": step,
        "masters": {n: slot[n].detach().cpu() for n in slot.names},
        "optimizer": optimizer.state_dict(),
        "scaler": scaler.state_dict() if scaler is not None else {},
        "rng": _rng_state(),
        "losses": list(losses),
    }
    with atomic_file(path, force=True) as fd, os.fdopen(os.dup(fd), "wb") as f:
        torch.save(state, f)


def load_state(path: Path, identity: dict) -> dict:
    """Read a resumable state and check it belongs to this run.

    Raises:
        SlotsmithError: Unreadable, or made by a different run.
    """
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many types for a bad file
        raise SlotsmithError(f"{path}: not a readable training state ({type(e).__name__})") from None
    if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
        raise SlotsmithError(f"{path}: not a {STATE_FORMAT} file")
    saved = json.loads(state["identity"])
    for key, value in identity.items():
        if saved.get(key) != value:
            raise SlotsmithError(
                f"{path}: was made with {_resume_difference(key, saved.get(key), value)}; cannot resume "
                "(run with the same settings, or without --resume to start over)"
            )
    return state


# --------------------------------------------------------------------------- the run


@dataclass
class TrainResult:
    """What a run did."""

    manifest: Manifest | None
    out: Path | None
    state_path: Path
    start_step: int
    steps: int
    total_steps: int
    first_loss: float | None
    final_loss: float | None
    seconds: float
    trained_params: int
    optimizer_bytes: int
    interrupted: bool = False
    is_main: bool = True
    expert_note: str | None = None
    skipped: tuple[str, ...] = ()


@contextmanager
def _graceful_interrupt() -> Iterator[list[bool]]:
    """First Ctrl-C asks the loop to stop at the next step boundary; the second aborts."""
    flag = [False]

    def handler(signum, frame):
        if flag[0]:
            raise KeyboardInterrupt
        flag[0] = True

    try:
        previous = signal.signal(signal.SIGINT, handler)
    except ValueError:  # not the main thread: keep the default behaviour
        yield flag
        return
    try:
        yield flag
    finally:
        signal.signal(signal.SIGINT, previous)


def _slot_bytes(slot: SlotParams, dtypes: dict[str, str]) -> dict[str, memoryview]:
    return {
        n: memoryview(slot[n].detach().to(TORCH_DTYPES[dtypes[n]]).contiguous().cpu().view(torch.uint8).numpy())
        for n in slot.names
    }


def _write(path: Path, plan: RunPlan, settings: TrainSettings, slot: SlotParams, extra: dict) -> Manifest:
    """Write a slot (or snapshot) of the run; ``settings`` as the user gave them, for the provenance."""
    dtypes = {n: plan.inventory.tensors[n].dtype for n in slot.names}
    provenance = {
        "trainer": "slotsmith train",
        "settings": settings.to_json(),
        "dataset_digest": plan.dataset_digest,
        "seed": settings.seed,
        "timestep_range": list(plan.t_range),
        "expert_boundary": plan.boundary,
        **extra,
    }
    return write_slot(
        path, plan.inventory, _slot_bytes(slot, dtypes), selection=plan.selection.record(), provenance=provenance,
        expert=settings.expert, force=True,
    )


def train(settings: TrainSettings, progress: bool | None = None) -> TrainResult:
    """Run ``slotsmith train``: check, load, fine-tune the slot, write it.

    Args:
        settings: The run's settings.
        progress: Show a progress bar (None: when stderr is a terminal and not quiet).

    Returns:
        What the run did (``manifest`` None when stopped early).

    Raises:
        SlotsmithError: Bad input (before any weights are loaded).
    """
    from accelerate import Accelerator  # slow to import, and only a run needs it

    accelerator = Accelerator(cpu=not torch.cuda.is_available())
    show = progress if progress is not None else (not settings.quiet and sys.stderr.isatty())
    # The base and the output are checked first: encoding a dataset for a run that cannot start is waste.
    base_plan = plan_base(settings)
    skipped = []
    given = settings  # what the provenance records: the user's --data and encoders, not the cache-only copy below
    if settings.data:
        # The main process encodes what is missing; the others then find a complete cache.
        with accelerator.main_process_first():
            cache_dir, skipped = ensure_cache(
                settings.data, settings.vae, settings.t5, settings.tokenizer, skip_bad=settings.skip_bad,
                progress=show and accelerator.is_main_process,
            )
        # From here on the run is a run on that cache folder (the same one --cache would name).
        settings = dataclasses.replace(
            settings, cache=str(cache_dir), data="", vae=None, t5=None, tokenizer=None, skip_bad=False
        )
    plan = plan_run(settings, accelerator.num_processes, base_plan)
    device = accelerator.device
    world, rank = accelerator.num_processes, accelerator.process_index
    identity = _state_identity(settings, plan, world)
    # Read before the weights are loaded: a state this run cannot continue fails fast.
    state = load_state(plan.state_path, identity) if settings.resume else None
    if state is not None and state["step"] > plan.total_steps:
        asked = f"--steps {settings.steps}" if settings.steps is not None else f"--epochs {settings.epochs:g}"
        raise SlotsmithError(
            f"{plan.state_path}: is at step {state['step']} already, beyond the {plan.total_steps} step(s) of this "
            f"run ({asked}); cannot resume (ask for at least {state['step']} steps, or run without --resume to "
            "start over)"
        )
    torch.manual_seed(settings.seed)
    random.seed(settings.seed)

    base = load_base(settings.base, plan.head_dim)
    model = base.model
    compute_dtype = torch.bfloat16 if settings.fp8_base else base.dtype
    if settings.fp8_base and base.dtype != torch.bfloat16:
        # Parameters only: buffers (RoPE tables) stay float32, as diffusers keeps them.
        for p in model.parameters():
            p.data = p.data.to(torch.bfloat16)
    slot = attach_slot(model, list(plan.selection.tensors), device, compute_dtype)
    if settings.gradient_checkpointing:
        model.enable_gradient_checkpointing()
    if settings.fp8_base:
        model.enable_layerwise_casting(storage_dtype=torch.float8_e4m3fn, compute_dtype=torch.bfloat16)
    if settings.offload_blocks:
        model.enable_group_offload(
            onload_device=device,
            offload_device=torch.device("cpu"),
            offload_type="block_level",
            num_blocks_per_group=1,
            use_stream=device.type == "cuda",
        )
    else:
        model.to(device)
    model.train()

    params = slot.parameters_in_order()
    optimizer = make_optimizer(settings.optimizer, params, settings.lr, settings.weight_decay)
    amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(settings.mixed_precision)
    scaler = torch.amp.GradScaler(device.type) if amp_dtype is torch.float16 else None
    start_step, losses = 0, []
    if state is not None:
        with torch.no_grad():
            for n in slot.names:
                slot[n].copy_(state["masters"][n])
        optimizer.load_state_dict(state["optimizer"])
        if scaler is not None and state["scaler"]:
            scaler.load_state_dict(state["scaler"])
        _set_rng_state(state["rng"])
        start_step, losses = state["step"], list(state["losses"])

    dataset = CachedDataset(settings.cache, plan.cache_index)
    stream = DataStream(len(dataset), settings.seed)
    b, accum = settings.batch_size, settings.grad_accum
    micro_global = b * world
    end_step = plan.total_steps
    if settings.stop_after is not None:
        end_step = min(end_step, start_step + settings.stop_after)
    bar = tqdm(
        total=plan.total_steps, initial=start_step, disable=not (show and accelerator.is_main_process),
        file=sys.stderr, unit="it", dynamic_ncols=True,
    )
    log = _Logger(settings.log_dir, accelerator.is_main_process)
    autocast = (lambda: torch.autocast(device.type, dtype=amp_dtype)) if amp_dtype else nullcontext
    started = time.perf_counter()
    step = start_step
    interrupted = False
    with _graceful_interrupt() as stop_flag:
        while step < end_step:
            lr = settings.lr * lr_factor(settings, step, plan.total_steps)
            for group in optimizer.param_groups:
                group["lr"] = lr
            step_loss = torch.zeros((), dtype=torch.float64)
            for micro in range(accum):
                first = (step * accum + micro) * micro_global + rank * b
                step_loss += _micro_step(
                    model, slot, dataset, stream, settings, plan, range(first, first + b), device,
                    compute_dtype if amp_dtype is None else torch.float32, autocast, scaler, b * accum,
                )
            if world > 1:
                for p in params:
                    if p.grad is not None:
                        p.grad = accelerator.reduce(p.grad, reduction="mean")
                step_loss = accelerator.reduce(step_loss.to(device), reduction="mean").cpu()
            if scaler is not None:
                scaler.unscale_(optimizer)
            if settings.max_grad_norm > 0:
                torch.nn.utils.clip_grad_norm_(params, settings.max_grad_norm)
            if scaler is not None:
                scaler.step(optimizer)
                scaler.update()
            else:
                optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            loss = float(step_loss / (b * accum))
            losses.append(loss)
            bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", refresh=False)
            bar.update(1)
            log.log(step, loss, lr)
            if settings.save_every and step % settings.save_every == 0 and step < plan.total_steps:
                if accelerator.is_main_process:
                    save_state(plan.state_path, identity, step, slot, optimizer, scaler, losses)
                    _write(snapshot_path_for(plan.out, step), plan, given, slot, {"steps": step, "final_loss": loss})
            stop = torch.tensor(float(stop_flag[0]), device=device)
            if world > 1:
                stop = accelerator.reduce(stop, reduction="sum")
            if stop.item() > 0:
                interrupted = True
                break
    bar.close()
    seconds = time.perf_counter() - started
    finished = step >= plan.total_steps
    manifest = None
    if accelerator.is_main_process:
        save_state(plan.state_path, identity, step, slot, optimizer, scaler, losses)
        if finished:
            tail = losses[-min(len(losses), 10):]
            manifest = _write(plan.out, plan, given, slot, {
                "steps": step,
                "final_loss": losses[-1] if losses else None,
                "final_loss_avg10": sum(tail) / len(tail) if tail else None,
            })
    log.close()
    accelerator.wait_for_everyone()
    return TrainResult(
        manifest, plan.out if finished else None, plan.state_path, start_step, step, plan.total_steps,
        losses[0] if losses else None, losses[-1] if losses else None, seconds, slot.numel,
        optimizer_state_bytes(optimizer), interrupted, accelerator.is_main_process, _expert_note(settings, plan),
        tuple(str(item) for item in skipped),
    )


def _expert_note(settings: TrainSettings, plan: RunPlan) -> str | None:
    """Which timesteps an expert run trained on, and where its boundary came from."""
    if settings.expert is None:
        return None
    source = "--boundary" if plan.boundary_from == "--boundary" else f"{plan.boundary_from}, whose layout the base has"
    low, high = plan.t_range
    return f"expert: {settings.expert}, timesteps [{low:g}, {high:g}] (boundary {plan.boundary:g} from {source})"


def _micro_step(model, slot, dataset, stream, settings, plan, positions, device, input_dtype, autocast, scaler, divisor):
    """Forward and backward one micro-batch (grouped by latent shape); returns its summed loss."""
    groups: dict[tuple, list] = {}
    for pos in positions:
        item = dataset[stream.entry(pos)]
        g = sample_generator(settings.seed, pos)
        t = sample_t(settings, g, plan.t_range)
        noise = torch.randn(item["latents"].shape, generator=g)
        groups.setdefault(tuple(item["latents"].shape), []).append((item, t, noise))
    total = torch.zeros((), dtype=torch.float64)
    for members in groups.values():
        latents = torch.stack([m[0]["latents"] for m in members]).to(device)
        context = torch.stack([m[0]["context"] for m in members]).to(device)
        t = torch.tensor([m[1] for m in members], dtype=torch.float32, device=device)
        noise = torch.stack([m[2] for m in members]).to(device)
        with autocast():
            per_sample = flow_loss(model, latents, context, t, noise, input_dtype)
        loss = per_sample.sum() / divisor
        (scaler.scale(loss) if scaler is not None else loss).backward()
        total += per_sample.detach().sum().double().cpu()
    return total


class _Logger:
    """Metrics to ``LOG_DIR/train_log.jsonl`` and, when installed, TensorBoard."""

    def __init__(self, log_dir: str | None, main: bool):
        self._file = self._tb = None
        if not (log_dir and main):
            return
        folder = Path(log_dir)
        folder.mkdir(parents=True, exist_ok=True)
        self._file = open(folder / "train_log.jsonl", "a", encoding="utf-8")
        try:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(str(folder))
        except ImportError:
            self._tb = None

    def log(self, step: int, loss: float, lr: float) -> None:
        if self._file:
            self._file.write(json.dumps({"step": step, "loss": loss, "lr": lr, "time": time.time()}) + "\n")
            self._file.flush()
        if self._tb:
            self._tb.add_scalar("train/loss", loss, step)
            self._tb.add_scalar("train/lr", lr, step)

    def close(self) -> None:
        if self._file:
            self._file.close()
        if self._tb:
            self._tb.close()


def summary(result: TrainResult) -> str:
    """A few lines on what a run did, for the end of ``slotsmith train``."""
    done = result.steps - result.start_step
    rate = done / result.seconds if result.seconds > 0 else 0.0
    if done == 0 and result.manifest is not None:
        # A resumed run that had already reached its total: the slot was rewritten from the saved state.
        steps = f"steps: none to train, the saved run is at step {result.steps} of {result.total_steps} already"
    else:
        steps = (
            f"steps: {result.start_step} -> {result.steps} of {result.total_steps} ({rate:.2f} it/s, "
            f"{result.seconds:.1f} s)"
        )
    lines = [f"skipped: {item}" for item in result.skipped]
    lines += [
        steps,
        f"trained parameters: {result.trained_params:,} (optimizer state {result.optimizer_bytes / 2**20:.1f} MiB)",
    ]
    if result.expert_note is not None:
        lines.append(result.expert_note)
    if result.first_loss is not None:
        lines.append(f"loss: first {result.first_loss:.5f}, last {result.final_loss:.5f}")
    if result.manifest is not None:
        lines.append(
            f"wrote {result.out} ({len(result.manifest.entries)} tensors, {result.manifest.nbytes / 2**20:.1f} MiB)"
        )
    else:
        lines.append(f"stopped early; state saved to {result.state_path} (rerun with --resume to continue)")
    return "\n".join(lines)
