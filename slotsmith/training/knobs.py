"""Runtime knobs of ``slotsmith train``: attention backend, torch.compile, block offloading, processes.

The attention backends are diffusers' own (its attention dispatcher): the
ones offered are those the installed diffusers, torch and packages can run on
the run's device, without downloading a kernel (no network at run time).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch

from slotsmith.errors import SlotsmithError

ALL_BLOCKS = -1
"""``--offload-blocks`` given alone: every block offloaded, one on the device at a time."""

_CUDA_ONLY = ("flash", "flash_varlen", "sage", "sage_varlen", "xformers")
"""Backends whose kernels run on CUDA devices only, however they are installed."""


def attention_backends(device: torch.device) -> list[str]:
    """The attention backends diffusers can run here: ``native`` first, then the others usable on ``device``.

    Private backends (a leading underscore) and hub kernels (a download) are
    left out.
    """
    from diffusers.models.attention_dispatch import AttentionBackendName, _check_attention_backend_requirements

    usable = []
    for backend in AttentionBackendName:
        name = backend.value
        if name.startswith("_") or name.endswith("_hub"):
            continue
        if name in _CUDA_ONLY and device.type != "cuda":
            continue
        try:
            _check_attention_backend_requirements(backend)
        except RuntimeError:  # its package is missing or too old
            continue
        usable.append(name)
    return sorted(usable, key=lambda n: (n != "native", n))


def resolve_attention(asked: str | None, device: torch.device) -> tuple[str, str]:
    """The attention backend of a run, and where the choice came from.

    Args:
        asked: ``--attention``, or None for diffusers' default
            (``DIFFUSERS_ATTN_BACKEND``, else ``native``).
        device: The run's device.

    Returns:
        ``(backend, source)``.

    Raises:
        SlotsmithError: A backend this machine cannot run, naming those it can.
    """
    env = os.environ.get("DIFFUSERS_ATTN_BACKEND")
    name, source = (asked, "--attention") if asked else (env, "DIFFUSERS_ATTN_BACKEND") if env else ("native", "default")
    usable = attention_backends(device)
    if name.lower() not in usable:
        flag = f"--attention {name}" if source == "--attention" else f"DIFFUSERS_ATTN_BACKEND={name}"
        raise SlotsmithError(
            f"{flag}: this attention backend cannot run here (device {device.type}, torch {torch.__version__}); "
            f"available: {', '.join(usable)}"
        )
    return name.lower(), source


def apply_attention(model: torch.nn.Module, backend: str) -> None:
    """Make every attention layer of ``model`` use ``backend`` (native is diffusers' default already)."""
    if backend != "native":
        model.set_attention_backend(backend)


def compile_blocks(model: torch.nn.Module) -> None:
    """``torch.compile`` each transformer block in place (the blocks repeat: one compilation serves them all)."""
    for block in model.blocks:
        block.compile()


def place_model(model: torch.nn.Module, device: torch.device, offload_blocks: int) -> None:
    """Put the frozen model on ``device``, keeping ``offload_blocks`` of its blocks in CPU memory.

    Args:
        model: The Wan transformer, on the CPU.
        device: The run's device.
        offload_blocks: 0: all resident; N: the last N blocks stay in CPU
            memory and are brought over for their forward (musubi-tuner's
            ``--blocks_to_swap N``); ``ALL_BLOCKS``: every block, one at a time.
    """
    if offload_blocks == 0:
        model.to(device)
        return
    cpu = torch.device("cpu")
    stream = device.type == "cuda"
    if offload_blocks == ALL_BLOCKS or offload_blocks >= len(model.blocks):
        model.enable_group_offload(
            onload_device=device, offload_device=cpu, offload_type="block_level", num_blocks_per_group=1,
            use_stream=stream,
        )
        return
    from diffusers.hooks import apply_group_offloading

    first_offloaded = len(model.blocks) - offload_blocks
    for i, block in enumerate(model.blocks):
        if i < first_offloaded:
            block.to(device)
        else:  # one group per block: brought over when its forward starts, sent back when it ends
            apply_group_offloading(
                block, onload_device=device, offload_device=cpu, offload_type="block_level", num_blocks_per_group=1,
                use_stream=stream,
            )
    for name, child in model.named_children():
        if child is not model.blocks:
            child.to(device)
    with torch.no_grad():
        for p in model.parameters(recurse=False):
            p.data = p.data.to(device)
        for name, b in list(model.named_buffers(recurse=False)):
            model.register_buffer(name, b.to(device), persistent=name not in model._non_persistent_buffers_set)


def requested_processes() -> int | None:
    """How many processes ``accelerate launch`` was asked for (read from its command line), or None.

    accelerate's simple launcher starts one process whatever
    ``--num_processes`` says (``--cpu --num_processes 2``, say) and tells the
    script nothing: its own command line is the only record.
    """
    if "ACCELERATE_USE_CPU" not in os.environ and "ACCELERATE_MIXED_PRECISION" not in os.environ:
        return None  # not started by accelerate launch
    try:
        args = Path(f"/proc/{os.getppid()}/cmdline").read_bytes().decode(errors="replace").split("\0")
    except OSError:
        return None
    for i, arg in enumerate(args):
        for flag in ("--num_processes", "--num-processes"):
            value = arg.removeprefix(flag + "=") if arg.startswith(flag + "=") else None
            if arg == flag and i + 1 < len(args):
                value = args[i + 1]
            if value is not None and value.isdigit():
                return int(value)
    return None


def runtime_line(device: torch.device, dtype: torch.dtype, mixed: str, attention: str, processes: int) -> str:
    """One line on where and how the run computes, printed before the first step."""
    precision = str(dtype).removeprefix("torch.") + ("" if mixed == "no" else f", autocast {mixed}")
    return f"device {device}, weights {precision}, attention {attention}, {processes} process(es)"


def process_warning(started: int) -> str | None:
    """A warning when ``accelerate launch`` asked for more processes than started, else None."""
    asked = requested_processes()
    if asked is not None and asked > started:
        return (
            f"warning: accelerate launch asked for {asked} processes but {started} started (with --cpu it starts "
            "one: drop --cpu and pass --multi_gpu, which on a machine without GPUs runs the processes on the CPU; "
            "on GPUs, check --multi_gpu and CUDA_VISIBLE_DEVICES)"
        )
    return None


def say(message: str, show: bool) -> None:
    """Print a line on stderr unless quiet."""
    if show:
        print(message, file=sys.stderr, flush=True)
