"""How much memory a training run will need, said before loading, and what it did use, said at the end.

The estimate adds up, per place (host RAM, the training device):

- the frozen weights, at the dtype each is stored in (read off the empty
  model ``wan.empty_training_model`` builds: float8 where ``--fp8-base``
  casts, the compute dtype for the norms and embeddings it skips, the
  file's dtype otherwise), on the device, except the blocks
  ``--offload-blocks`` keeps on the host (all, or the last N: the device
  then also holds two of them at a time, the one running and the one
  arriving);
- the slot: fp32 masters and their gradients, the optimizer's state (AdamW 8
  bytes a parameter, 8-bit AdamW 2, Adafactor about 1) and a compute-dtype
  copy, on the device;
- activations of the largest cached latent (see ``activation_bytes``);
- while a float8 block runs, its weights in the compute dtype, and a fixed
  256 MiB of kernel workspace;
- on the host, what the process holds already (Python, torch, diffusers) and
  the load's one read buffer.

Host figures are per process; ``accelerate launch`` on one machine multiplies
them. ``SLOTSMITH_SKIP_MEMORY_CHECK=1`` runs anyway when the estimate says no.
"""

from __future__ import annotations

import itertools
import os
import resource
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from math import prod

import torch

from slotsmith.errors import SlotsmithError
from slotsmith.inventory import Inventory
from slotsmith.io.header import read_header
from slotsmith.layout import WanConfig
from slotsmith.names import native_to_diffusers
from slotsmith.train import TrainSettings
from slotsmith.training.knobs import ALL_BLOCKS
from slotsmith.training.preflight import RunPlan

SKIP_ENV = "SLOTSMITH_SKIP_MEMORY_CHECK"
"""Set to 1 to start a run the estimate says will not fit."""

OPTIMIZER_BYTES_PER_PARAM = {"adamw": 8.0, "adamw8bit": 2.0, "adafactor": 1.0}
"""Optimizer state per trained parameter (Adafactor's factored moments: about one byte, rounded up)."""

GB = 1e9

WORKSPACE_BYTES = 256 * 2**20
"""What a first step adds beyond its tensors (kernel libraries' workspaces, autograd), measured on CPU runs."""


@dataclass
class MemoryEstimate:
    """Bytes a run needs, by place and by part.

    Attributes:
        host: Host RAM (per process).
        device: Training device memory (None when the device is the CPU: all of it is ``host``).
        parts: Part name -> (place, bytes), for the printout.
        processes: Processes on this machine (host memory is per process).
    """

    host: int
    device: int | None
    parts: dict[str, tuple[str, int]] = field(default_factory=dict)
    processes: int = 1

    def describe(self) -> str:
        """Two lines: the totals, then the parts."""
        where = f"~{self.host / GB:.1f} GB host RAM" + (f" per process x {self.processes}" if self.processes > 1 else "")
        if self.device is not None:
            where += f", ~{self.device / GB:.1f} GB device memory"
        parts = ", ".join(f"{name} {n / GB:.2f} GB ({place})" for name, (place, n) in self.parts.items() if n)
        return f"memory estimate: {where}\n  {parts}"


def rss_now() -> int:
    """This process's resident memory now, in bytes."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def peak_rss() -> int:
    """This process's peak resident memory so far, in bytes (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
"""glibc ``mallopt`` parameters (malloc.h)."""

PROMPT_RELEASE_BYTES = 2**20
"""Allocations from this size up get their own mapping, returned to the system when freed."""


def release_freed_memory_promptly() -> bool:
    """Make glibc hand freed tensor memory back to the system at once.

    By default glibc raises its mmap threshold (up to 32 MiB) each time a
    mapped block is freed, so the casts and activations of a training step
    (blocks of a few to tens of MiB) then come from the heap, which fragments
    and keeps growing: a 1.3B fp8 run measured 2.44 GB peak RSS instead of
    2.15 GB. A fixed threshold turns that off. Elsewhere (no glibc) nothing happens.

    Returns:
        Whether the setting was applied.
    """
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else None
        mallopt = libc.mallopt if libc is not None else None
    except (OSError, AttributeError):
        return False
    if mallopt is None:
        return False
    return bool(mallopt(_M_MMAP_THRESHOLD, PROMPT_RELEASE_BYTES)) and bool(mallopt(_M_TRIM_THRESHOLD, PROMPT_RELEASE_BYTES))


def available_host_bytes() -> int | None:
    """``MemAvailable`` of ``/proc/meminfo`` in bytes (None where there is none)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def largest_latent(cache_dir: str, index: dict) -> tuple[int, ...]:
    """The shape ``[C, F, H, W]`` of the cache's largest latent (headers only)."""
    best: tuple[int, ...] = ()
    for item in index["items"]:
        info = read_header(os.path.join(cache_dir, item["latents"])).tensors["latents"]
        if not best or prod(info.shape) > prod(best):
            best = tuple(info.shape)
    return best


def activation_bytes(
    cfg: WanConfig, latent: tuple[int, ...], batch: int, text_len: int, dtype_bytes: int, checkpointing: bool,
    materialized_attention: bool,
) -> int:
    """Activations a training step keeps for its backward pass (a rough, deliberately generous count).

    A Wan block keeps about ``14 x dim + 3 x ffn`` values a token (norms,
    q/k/v/o of two attentions, the feed-forward's hidden layer) and its cross
    attention's keys and values of the text. Gradient checkpointing keeps only
    each block's input and recomputes one block at a time. The math attention
    kernel (the CPU's) also materializes the score matrix.

    Args:
        cfg: Model sizes.
        latent: ``[C, F, H, W]`` of the largest latent.
        batch: Samples a micro-batch.
        text_len: Text tokens (512 at most).
        dtype_bytes: Bytes per activation value.
        checkpointing: ``--gradient-checkpointing``.
        materialized_attention: The attention scores are materialized (no fused kernel).

    Returns:
        Bytes.
    """
    _, frames, height, width = latent
    pf, ph, pw = cfg.patch_size
    tokens = batch * -(-frames // pf) * -(-height // ph) * -(-width // pw)
    heads = max(cfg.dim // 128, 1)
    per_block = tokens * (14 * cfg.dim + 3 * cfg.ffn_dim) + batch * text_len * 2 * cfg.dim
    if materialized_attention:
        per_block += 2 * heads * tokens * (tokens + text_len) // max(batch, 1)
    per_block *= dtype_bytes
    if checkpointing:
        return cfg.num_layers * tokens * cfg.dim * dtype_bytes + 2 * per_block
    return cfg.num_layers * per_block


def _frozen_bytes(model: torch.nn.Module, slot: set[str], compute_bytes: int) -> tuple[int, list[int], int]:
    """Frozen weights as the empty model stores them, in bytes.

    Returns:
        (all of them, each block's in block order, the largest block's float8
        part at the compute dtype: what casting it for its forward adds).
    """
    total = 0
    per_block: dict[int, int] = {}
    cast: dict[int, int] = {}
    for name, p in model.named_parameters():
        if name in slot:
            continue
        n = p.numel() * p.element_size()
        total += n
        if name.startswith("blocks."):
            index = int(name.split(".")[1])
            per_block[index] = per_block.get(index, 0) + n
            if p.element_size() < compute_bytes:
                cast[index] = cast.get(index, 0) + p.numel() * compute_bytes
    return total, [per_block[i] for i in sorted(per_block)], max(cast.values(), default=0)


def estimate(
    model: torch.nn.Module,
    inventory: Inventory,
    cfg: WanConfig,
    slot_names: list[str],
    *,
    device: torch.device,
    compute_dtype: torch.dtype,
    offload_blocks: int,
    checkpointing: bool,
    optimizer: str,
    latent: tuple[int, ...],
    batch: int,
    processes: int = 1,
    runtime_bytes: int | None = None,
    rows: Mapping[str, tuple[int, int]] | None = None,
) -> MemoryEstimate:
    """Estimate a run's memory from the empty model, the slot, the options and the cache's largest latent.

    Args:
        model: The empty model (``wan.empty_training_model``): parameters in their final dtypes.
        inventory: The base's inventory (for the slot's size and the read buffer).
        cfg: Model sizes.
        slot_names: Canonical names of the slot's tensors.
        device: The training device.
        compute_dtype: The dtype the model computes in.
        offload_blocks: ``--offload-blocks``: 0 none, N the last N blocks,
            ``knobs.ALL_BLOCKS`` all.
        checkpointing: ``--gradient-checkpointing``.
        optimizer: ``--optimizer``.
        latent: ``[C, F, H, W]`` of the largest cached latent.
        batch: ``--batch-size``.
        processes: Processes on this machine.
        runtime_bytes: What the process holds before loading (default: its RSS now).
        rows: Row-range entries (selection v3): the master holds only those
            rows, and the whole tensor stays frozen in the model besides.

    Returns:
        The estimate.
    """
    rows = rows or {}
    slot = {native_to_diffusers(n) for n in slot_names if n not in rows}
    compute_bytes = torch.empty((), dtype=compute_dtype).element_size()
    frozen, blocks, transient = _frozen_bytes(model, slot, compute_bytes)
    # As knobs.place_model puts them: the last N blocks on the host; with every block offloaded,
    # diffusers' group offload moves the weights outside the blocks there too.
    every = offload_blocks == ALL_BLOCKS or offload_blocks >= len(blocks)
    offloaded = blocks if every else blocks[len(blocks) - offload_blocks:] if offload_blocks else []
    host_frozen = frozen if every else sum(offloaded)

    def trained(name: str) -> int:
        whole = inventory.tensors[name]
        if name not in rows:
            return whole.numel
        start, stop = rows[name]
        return whole.numel // max(whole.shape[0], 1) * (stop - start)

    slot_params = sum(trained(n) for n in slot_names)
    # Masters + gradients in fp32, the optimizer's state, and the compute-dtype copy the forward reads.
    slot_bytes = int(slot_params * (8 + OPTIMIZER_BYTES_PER_PARAM[optimizer] + (compute_bytes if compute_bytes != 4 else 0)))
    on_cpu = device.type == "cpu"
    acts = activation_bytes(cfg, latent, batch, 512, compute_bytes, checkpointing, materialized_attention=on_cpu)
    buffer = max((info.nbytes for _, info in inventory.checkpoint.tensors.values()), default=0)
    runtime = rss_now() if runtime_bytes is None else runtime_bytes
    dev = "host" if on_cpu else "device"
    parts = {
        "runtime": ("host", runtime),
        "read buffer": ("host", 2 * buffer),  # the buffer and one converted tensor
        "frozen weights": ("host", frozen) if on_cpu else (dev, frozen - host_frozen),
        "slot (masters, grads, optimizer)": (dev, slot_bytes),
        "activations": (dev, acts),
        "cast block": (dev, transient),
        "workspace": (dev, WORKSPACE_BYTES),
    }
    if offloaded and not on_cpu:
        parts["offloaded weights"] = ("host", host_frozen)
        # Two blocks on the device at a time (the one running, the one arriving), and what is outside the blocks.
        parts["onloaded blocks"] = (dev, sum(sorted(offloaded)[-2:]) + (frozen - sum(blocks) if every else 0))
    host = sum(n for place, n in parts.values() if place == "host")
    device_total = None if on_cpu else sum(n for place, n in parts.values() if place == "device")
    return MemoryEstimate(host, device_total, parts, processes)


def _gb(n: int) -> str:
    return f"{n / GB:.1f} GB"


def run_estimate(
    settings: TrainSettings, plan: RunPlan, device: torch.device, processes: int, model: torch.nn.Module | None = None,
    **options: bool,
) -> MemoryEstimate:
    """``estimate`` for a run's settings and plan, optionally with other memory options.

    Args:
        settings: The run's settings.
        plan: Its plan (base, slot, cache).
        device: The training device.
        processes: Processes on this machine.
        model: The run's empty model, when built already (else one is built: a few seconds, no weights).
        **options: ``fp8_base``, ``offload_blocks``, ``gradient_checkpointing`` overriding the settings'.

    Returns:
        The estimate.
    """
    from slotsmith.training.wan import base_dtype, empty_training_model

    fp8 = options.get("fp8_base", settings.fp8_base)
    if model is None:
        model, _ = empty_training_model(plan.config, plan.head_dim, base_dtype(plan.inventory), fp8)
    compute = torch.bfloat16 if fp8 else base_dtype(plan.inventory)
    return estimate(
        model, plan.inventory, plan.config, list(plan.selection.tensors), device=device, compute_dtype=compute,
        # check_fits asks for "with --offload-blocks" as True: every block.
        offload_blocks=ALL_BLOCKS if options.get("offload_blocks") is True else settings.offload_blocks,
        checkpointing=options.get("gradient_checkpointing", settings.gradient_checkpointing),
        optimizer=settings.optimizer, latent=largest_latent(settings.cache, plan.cache_index),
        batch=settings.batch_size, processes=processes, rows=plan.selection.rows,
    )


MEMORY_OPTIONS = ("fp8_base", "offload_blocks", "gradient_checkpointing")
"""The options that trade speed for memory, cheapest first."""


def check_fits(
    est: MemoryEstimate,
    alternative: Callable[[dict[str, bool]], MemoryEstimate],
    settings: TrainSettings,
    available_host: int | None,
    available_device: int | None,
) -> None:
    """Refuse a run whose estimate exceeds what the machine has, naming options that would fit.

    Args:
        est: The run's estimate.
        alternative: Options -> the estimate with them (called only when ``est`` does not fit).
        settings: The run's settings (which memory options it has already).
        available_host: Host RAM available (None: unknown, not checked).
        available_device: Free device memory (None: not checked).

    Raises:
        SlotsmithError: It will not fit (unless ``SLOTSMITH_SKIP_MEMORY_CHECK=1``).
    """
    if os.environ.get(SKIP_ENV) == "1":
        return

    def short(e: MemoryEstimate) -> str | None:
        if available_host is not None and e.host * e.processes > available_host:
            return "RAM"
        if available_device is not None and e.device is not None and e.device > available_device:
            return "device memory"
        return None

    what = short(est)
    if what is None:
        return
    need, have = (est.host * est.processes, available_host) if what == "RAM" else (est.device, available_device)
    missing = [o for o in MEMORY_OPTIONS if not getattr(settings, o)]
    advice = "no combination of --fp8-base, --offload-blocks and --gradient-checkpointing fits; use a machine with more memory"
    # Fewest added options first, then the cheapest (the order of MEMORY_OPTIONS).
    for combo in sorted(
        (c for r in range(1, len(missing) + 1) for c in itertools.combinations(missing, r)), key=len
    ):
        if short(alternative({o: True for o in combo})) is None:
            advice = "add " + " ".join("--" + o.replace("_", "-") for o in combo)
            break
    raise SlotsmithError(
        f"this run needs ~{_gb(need)} of {what}, this machine has {_gb(have)} available: {advice} "
        f"(or set {SKIP_ENV}=1 to try anyway)"
    )


def measured(est: MemoryEstimate | None, device: torch.device, how: str) -> str:
    """The end-of-run line: measured peaks beside the estimate, and how the run ran.

    Args:
        est: The estimate printed at the start (None: none was made).
        device: The training device.
        how: Device, precision and processes, as the run describes them.

    Returns:
        One line.
    """
    host = f"peak host RSS {_gb(peak_rss())}"
    if est is not None:
        host += f" (estimated {_gb(est.host)})"
    line = f"memory: {host}"
    if device.type == "cuda":
        line += f", peak device {_gb(torch.cuda.max_memory_allocated(device))}"
        if est is not None and est.device is not None:
            line += f" (estimated {_gb(est.device)})"
    return f"{line}; {how}"
