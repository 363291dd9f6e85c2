"""Build ``diffusers.WanTransformer3DModel`` from any Wan DiT checkpoint, offline.

The configuration is read off the tensor shapes (``layout.config_from_shapes``);
only the attention head size cannot be, so it is Wan's 128 unless a
``config.json`` beside the checkpoint or the file's metadata says otherwise.
The weights are read tensor by tensor under their canonical native names and
renamed with ``names.native_to_diffusers``, so native, prefixed, sharded and
diffusers checkpoints all load the same way. Nothing is ever downloaded.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

from slotsmith.errors import SlotsmithError
from slotsmith.inventory import Inventory, inventory_from_checkpoint
from slotsmith.io.files import load_json, parse_json, safe_repr
from slotsmith.io.header import is_int
from slotsmith.layout import HEAD_DIM, WanConfig, config_from_shapes
from slotsmith.names import diffusers_to_native, native_to_diffusers
from slotsmith.training.knobs import ALL_BLOCKS
from slotsmith.training.slot_params import SlotParams, attach_slot

CONFIG_CAP = 1_000_000
"""Largest config.json read, in bytes."""

TORCH_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}
"""safetensors dtype names -> torch dtypes (the float types a Wan DiT may use)."""


def diffusers_config(cfg: WanConfig, head_dim: int = HEAD_DIM) -> dict:
    """The ``WanTransformer3DModel`` constructor arguments for a Wan layout.

    Args:
        cfg: The model's sizes.
        head_dim: Attention head size (128 in every released Wan model).

    Returns:
        Keyword arguments for ``WanTransformer3DModel``.

    Raises:
        SlotsmithError: ``cfg.dim`` is not a multiple of ``head_dim``.
    """
    if head_dim <= 0 or cfg.dim % head_dim:
        raise SlotsmithError(f"model width {cfg.dim} is not a multiple of the head size {head_dim}")
    return {
        "patch_size": tuple(cfg.patch_size),
        "num_attention_heads": cfg.dim // head_dim,
        "attention_head_dim": head_dim,
        "in_channels": cfg.in_dim,
        "out_channels": cfg.out_dim,
        "text_dim": cfg.text_dim,
        "freq_dim": cfg.freq_dim,
        "ffn_dim": cfg.ffn_dim,
        "num_layers": cfg.num_layers,
        "cross_attn_norm": True,
        "qk_norm": "rms_norm_across_heads",
        "eps": 1e-6,
        # Wan 2.1 I2V: CLIP image tokens through an extra k/v projection per block.
        "image_dim": cfg.image_dim or None,
        "added_kv_proj_dim": cfg.dim if cfg.image_dim else None,
    }


MAX_HEAD_DIM = 4096
"""Largest attention head size taken from a config."""


def _head_dim_from(doc: dict, what: str) -> int | None:
    """Head size from a diffusers or native Wan config object, if it tells.

    Raises:
        SlotsmithError: The config gives a head size that is not an integer in 1..MAX_HEAD_DIM.
    """
    found = doc.get("attention_head_dim")
    if found is None:
        dim, heads = doc.get("dim"), doc.get("num_heads", doc.get("num_attention_heads"))
        if not (is_int(dim) and is_int(heads) and heads > 0):
            return None
        found = dim // heads
    if not (is_int(found) and 1 <= found <= MAX_HEAD_DIM):
        raise SlotsmithError(
            f"{what}: attention head size {safe_repr(found)} is not an integer in 1..{MAX_HEAD_DIM} (give --head-dim)"
        )
    return found


def find_head_dim(inventory: Inventory) -> int:
    """The attention head size of a checkpoint.

    Looks at a ``config.json`` beside the checkpoint (diffusers or native Wan
    style), then at a ``config`` JSON in the file's metadata; else 128.

    Args:
        inventory: The checkpoint's inventory.

    Returns:
        The head size.

    Raises:
        SlotsmithError: The config.json is not valid JSON.
    """
    src = Path(inventory.source)
    folder = src if src.is_dir() else src.parent
    config_json = folder / "config.json"
    if os.path.lexists(config_json):  # a broken or looping link is refused, not skipped
        doc = load_json(config_json, CONFIG_CAP, "config.json")
        if isinstance(doc, dict) and (found := _head_dim_from(doc, str(config_json))):
            return found
    meta = inventory.checkpoint.metadata if inventory.checkpoint else {}
    what = f"{inventory.source}: metadata 'config'"
    try:
        doc = parse_json(meta.get("config", "{}").encode("utf-8"), what)
    except SlotsmithError:
        doc = {}  # free-form metadata of another tool: only a clear head size in it counts
    return (_head_dim_from(doc, what) if isinstance(doc, dict) else None) or HEAD_DIM


@dataclass
class WanBase:
    """A Wan DiT loaded for training.

    Attributes:
        model: The diffusers model, weights in the base's dtype.
        inventory: The checkpoint's inventory (canonical names, file keys).
        config: Sizes read off the tensors.
        head_dim: Attention head size used.
        dtype: The base's (single) floating dtype.
    """

    model: torch.nn.Module
    inventory: Inventory
    config: WanConfig
    head_dim: int
    dtype: torch.dtype


def base_dtype(inventory: Inventory) -> torch.dtype:
    """The one floating dtype of a checkpoint's tensors.

    Raises:
        SlotsmithError: Mixed or non-float dtypes.
    """
    dtypes = {t.dtype for t in inventory.tensors.values()}
    if len(dtypes) != 1 or next(iter(dtypes)) not in TORCH_DTYPES:
        raise SlotsmithError(f"{inventory.source}: tensors must share one float dtype, found {sorted(dtypes)}")
    return TORCH_DTYPES[dtypes.pop()]


def inspect_base(path: str | os.PathLike, head_dim: int | None = None) -> tuple[Inventory, WanConfig, int]:
    """Check that a checkpoint is a Wan DiT, reading headers only (cheap).

    Args:
        path: Checkpoint file, sharded index or folder.
        head_dim: Attention head size (``--head-dim``); None to look it up
            (``find_head_dim``).

    Returns:
        (inventory, config, head dim).

    Raises:
        SlotsmithError: Missing or malformed file, not a Wan DiT, or a width
            that is not a multiple of the head size (given or looked up).
    """
    if not Path(path).exists():
        raise SlotsmithError(f"{path}: no such file")
    inventory = inventory_from_checkpoint(path)
    try:
        cfg = config_from_shapes({n: t.shape for n, t in inventory.tensors.items()})
    except SlotsmithError as e:
        raise SlotsmithError(f"{inventory.source}: {e}") from None
    given = head_dim is not None
    head_dim = head_dim if given else find_head_dim(inventory)
    try:
        diffusers_config(cfg, head_dim)
    except SlotsmithError as e:
        if given:  # the user's own value is wrong: asking for it again would not help
            raise SlotsmithError(
                f"{inventory.source}: --head-dim {head_dim} does not divide the model width {cfg.dim}"
            ) from None
        raise SlotsmithError(
            f"{inventory.source}: {e}; give --head-dim, or put a config.json with \"attention_head_dim\" "
            "beside the checkpoint"
        ) from None
    base_dtype(inventory)
    return inventory, cfg, head_dim


def build_model(cfg: WanConfig, head_dim: int = HEAD_DIM, *, empty: bool = False) -> torch.nn.Module:
    """A ``WanTransformer3DModel`` of the given sizes.

    Args:
        cfg: The model's sizes.
        head_dim: Attention head size.
        empty: Create the parameters on the meta device (no memory), for
            ``load_state_dict(..., assign=True)``; buffers stay real.

    Returns:
        The model (random weights unless ``empty``).
    """
    from accelerate import init_empty_weights
    from diffusers import WanTransformer3DModel

    kwargs = diffusers_config(cfg, head_dim)
    if empty:
        with init_empty_weights(include_buffers=False):
            return WanTransformer3DModel(**kwargs)
    return WanTransformer3DModel(**kwargs)


def load_base(path: str | os.PathLike, head_dim: int | None = None) -> WanBase:
    """Load a Wan DiT checkpoint into a diffusers model, fully offline.

    Args:
        path: A native, prefixed or diffusers checkpoint: a safetensors file,
            a sharded ``*.index.json`` or a folder.
        head_dim: Attention head size; None to look it up.

    Returns:
        The loaded base, weights in the checkpoint's dtype, on the CPU.

    Raises:
        SlotsmithError: Missing or malformed file, or not a Wan DiT.
    """
    return load_inspected(*inspect_base(path, head_dim))


def load_inspected(inventory: Inventory, cfg: WanConfig, head_dim: int) -> WanBase:
    """``load_base`` for a base that ``inspect_base`` already checked (its headers are not read again).

    The weights are streamed in (``stream_tensors``): peak memory is the
    model plus one tensor.

    Args:
        inventory: The base's inventory.
        cfg: Its sizes.
        head_dim: Its attention head size.

    Returns:
        The loaded base, weights in the checkpoint's dtype, on the CPU.
    """
    model = build_model(cfg, head_dim, empty=True)
    dtype = base_dtype(inventory)
    for p in model.parameters():
        p.data = p.data.to(dtype)
    fill(model, inventory, inventory.tensors, torch.device("cpu"))
    model.requires_grad_(False)
    return WanBase(model, inventory, cfg, head_dim, dtype)


@dataclass
class LoadStats:
    """What streaming a base in cost.

    Attributes:
        nbytes: Bytes read from the checkpoint's files.
        seconds: Wall time of the reads and conversions.
        buffer_bytes: Size of the one reused read buffer.
    """

    nbytes: int = 0
    seconds: float = 0.0
    buffer_bytes: int = 0

    @property
    def mb_per_s(self) -> float:
        return self.nbytes / 1e6 / self.seconds if self.seconds > 0 else 0.0


def stream_tensors(
    inventory: Inventory, names: Iterable[str], stats: LoadStats | None = None
) -> Iterator[tuple[str, torch.Tensor]]:
    """Read tensors of a checkpoint one at a time into one reused buffer.

    Files are read in offset order with ``os.preadv`` (no mapping, so nothing
    of the file counts in the process's RSS); each yielded tensor is a view of
    the buffer, valid only until the next one is read: copy what you keep.

    Args:
        inventory: Inventory of a real checkpoint.
        names: Canonical native names to read.
        stats: Bytes read, time taken and buffer size are added to it.

    Yields:
        (canonical name, CPU tensor in its stored dtype).

    Raises:
        SlotsmithError: A file is shorter than its header says, or cannot be read.
    """
    stats = stats if stats is not None else LoadStats()
    by_file: dict[Path, list[tuple[int, str]]] = {}
    largest = 0
    for name in names:
        header, info = inventory.checkpoint.tensors[inventory.keys[name]]
        by_file.setdefault(header.path, []).append((info.start, name))
        largest = max(largest, info.nbytes)
    buffer = torch.empty(largest, dtype=torch.uint8)
    stats.buffer_bytes = max(stats.buffer_bytes, largest)
    view = memoryview(buffer.numpy())
    started = time.perf_counter() - stats.seconds  # stats may carry an earlier stream's time
    for path, entries in by_file.items():
        try:
            fd = os.open(path, os.O_RDONLY)
        except OSError as e:
            raise SlotsmithError(f"{path}: cannot read ({e.strerror})") from None
        try:
            for start, name in sorted(entries):
                info = inventory.checkpoint.tensors[inventory.keys[name]][1]
                _pread_exact(fd, view[: info.nbytes], start, path)
                stats.nbytes += info.nbytes
                raw = buffer[: info.nbytes]
                yield name, raw.view(TORCH_DTYPES[info.dtype]).view(info.shape)
                stats.seconds = time.perf_counter() - started
        finally:
            os.close(fd)
    stats.seconds = time.perf_counter() - started


def read_tensors(inventory: Inventory, names: Iterable[str]) -> dict[str, torch.Tensor]:
    """Read tensors of a checkpoint by canonical name, each in its stored dtype (``stream_tensors``, kept).

    Args:
        inventory: Inventory of a real checkpoint.
        names: Canonical native names to read.

    Returns:
        Canonical name -> CPU tensor.
    """
    return {name: t.clone() for name, t in stream_tensors(inventory, names)}


def _pread_exact(fd: int, view: memoryview, offset: int, path: Path) -> None:
    done = 0
    while done < len(view):
        try:
            n = os.preadv(fd, [view[done:]], offset + done)
        except OSError as e:
            raise SlotsmithError(f"{path}: cannot read ({e.strerror})") from None
        if n == 0:
            raise SlotsmithError(f"{path}: file is shorter than its header says (truncated?)")
        done += n


def fill(
    model: torch.nn.Module,
    inventory: Inventory,
    names: Iterable[str],
    device: torch.device,
    *,
    dtype: torch.dtype | None = None,
    stats: LoadStats | None = None,
    progress: bool = False,
) -> None:
    """Give parameters of an empty (meta) model their weights, streamed from the checkpoint.

    Each tensor is read into one reused buffer and copied straight into its
    final form: the dtype its (meta) parameter already has (float8 once
    ``enable_layerwise_casting`` ran on the empty model), on ``device``.
    Nothing else of the file is ever held.

    Args:
        model: A diffusers Wan model built with ``build_model(..., empty=True)``.
        inventory: The checkpoint's inventory.
        names: Canonical native names to fill.
        device: Where the weights go (the CPU for an offloaded model).
        dtype: Put every tensor in this dtype instead of its parameter's.
        stats: Filled with what the reads cost.
        progress: Show a progress bar (bytes).
    """
    from tqdm import tqdm

    names = list(names)
    total = sum(inventory.checkpoint.tensors[inventory.keys[n]][1].nbytes for n in names)
    with tqdm(total=total, unit="B", unit_scale=True, desc="loading base", disable=not progress, leave=False) as bar:
        for name, raw in stream_tensors(inventory, names, stats):
            module_path, _, attr = native_to_diffusers(name).rpartition(".")
            module = model.get_submodule(module_path)
            target = torch.empty(raw.shape, dtype=dtype or module._parameters[attr].dtype, device=device)
            target.copy_(raw)
            module._parameters[attr] = torch.nn.Parameter(target, requires_grad=False)
            bar.update(raw.numel() * raw.element_size())


def native_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """A diffusers Wan model's weights under canonical native names."""
    return {diffusers_to_native(k): v for k, v in model.state_dict().items()}


def empty_training_model(
    cfg: WanConfig, head_dim: int, file_dtype: torch.dtype, fp8: bool
) -> tuple[torch.nn.Module, torch.dtype]:
    """The model a training run fills: empty (meta), its parameters already in their final dtypes.

    With ``fp8``, each parameter diffusers' layerwise casting stores in float8
    is float8 already and the rest (norms, embeddings) bf16, so ``fill`` reads
    every tensor straight into that form; the casting hooks themselves go on
    in ``load_for_training``, after the slot is attached (they must wrap the
    row-range forwards ``attach_slot`` installs). Without, the parameters keep
    the file's dtype. Buffers (RoPE tables) are real and float32.

    Args:
        cfg: The model's sizes.
        head_dim: Attention head size.
        file_dtype: The checkpoint's dtype.
        fp8: ``--fp8-base``.

    Returns:
        (empty model, compute dtype).
    """
    model = build_model(cfg, head_dim, empty=True)
    compute_dtype = torch.bfloat16 if fp8 else file_dtype
    stored = {}
    if fp8:  # Which parameters diffusers stores in float8: asked of a second empty model (no weights, cheap).
        probe = build_model(cfg, head_dim, empty=True)
        enable_fp8_storage(probe)
        stored = {n: p.dtype for n, p in probe.named_parameters() if p.dtype == FP8_STORAGE}
    for name, p in model.named_parameters():
        p.data = p.data.to(stored.get(name, compute_dtype))
    model.requires_grad_(False)
    return model, compute_dtype


FP8_STORAGE = torch.float8_e4m3fn
"""How ``--fp8-base`` stores frozen weights (computing in bf16)."""


def enable_fp8_storage(model: torch.nn.Module) -> None:
    """diffusers' layerwise casting: weights stored in float8, cast to bf16 around each layer's forward."""
    model.enable_layerwise_casting(storage_dtype=FP8_STORAGE, compute_dtype=torch.bfloat16)


def load_for_training(
    model: torch.nn.Module,
    inventory: Inventory,
    slot_names: list[str],
    device: torch.device,
    compute_dtype: torch.dtype,
    *,
    rows: Mapping[str, tuple[int, int]] | None = None,
    fp8: bool = False,
    offload_blocks: int = 0,
    progress: bool = False,
) -> tuple[SlotParams, LoadStats]:
    """Stream a base into an ``empty_training_model``: the slot as fp32 masters, the rest frozen in place.

    The slot's tensors are read first (in the file's dtype) and moved out into
    fp32 masters on ``device`` (``attach_slot``); every other tensor goes
    straight to its final form and home: the CPU for the blocks
    ``--offload-blocks`` keeps there (``knobs.place_model`` brings them to the
    device for their forward; with every block offloaded, the rest of the
    model too), else ``device``. A row-range entry's whole tensor stays in the
    model, frozen, in its final form like the rest.
    Host memory never holds more than the resident model and one tensor's buffer.

    Args:
        model: From ``empty_training_model``.
        inventory: The base's inventory.
        slot_names: Canonical names of the slot's tensors.
        device: The training device.
        compute_dtype: The dtype the model computes in.
        rows: Canonical name -> ``(start, stop)``: train only those rows (selection v3).
        fp8: ``--fp8-base``: the model came from ``empty_training_model(..., fp8=True)``;
            the casting hooks go on once the slot is attached.
        offload_blocks: ``--offload-blocks``: 0 none, N the last N blocks, ``knobs.ALL_BLOCKS`` all.
        progress: Show a progress bar.

    Returns:
        (the slot's masters, what the reads cost).
    """
    rows = dict(rows or {})
    stats = LoadStats()
    final = {n: _parameter(model, n).dtype for n in rows}
    fill(model, inventory, slot_names, torch.device("cpu"), dtype=base_dtype(inventory), stats=stats)
    slot = attach_slot(model, slot_names, device, compute_dtype, rows)
    if fp8:
        enable_fp8_storage(model)
    frozen = [n for n in inventory.tensors if n not in set(slot_names)]
    layers = len(model.blocks)
    every = offload_blocks == ALL_BLOCKS or offload_blocks >= layers
    first_offloaded = 0 if every else layers - offload_blocks

    def offloaded(name: str) -> bool:
        if not offload_blocks:
            return False
        if not name.startswith("blocks."):
            return every
        return int(name.split(".")[1]) >= first_offloaded

    homes: dict[torch.device, list[str]] = {}
    for name in frozen:
        homes.setdefault(torch.device("cpu") if offloaded(name) else device, []).append(name)
    for home, names in homes.items():
        fill(model, inventory, names, home, stats=stats, progress=progress)
    for name in rows:  # Read already, at the file's dtype: now to its final form and home.
        module_path, _, attr = native_to_diffusers(name).rpartition(".")
        module = model.get_submodule(module_path)
        home = torch.device("cpu") if offloaded(name) else device
        module._parameters[attr] = torch.nn.Parameter(
            module._parameters[attr].detach().to(device=home, dtype=final[name]), requires_grad=False
        )
    return slot, stats


def _parameter(model: torch.nn.Module, name: str) -> torch.nn.Parameter:
    module_path, _, attr = native_to_diffusers(name).rpartition(".")
    return model.get_submodule(module_path)._parameters[attr]
