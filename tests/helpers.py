"""Build tiny Wan-shaped safetensors checkpoints for tests (no slotsmith writer involved).

Files are written with plain ``json`` + bytes, exactly as the official
library lays them out, so tests of slotsmith's own writer and reader do not
check the code against itself. `mutate_bytes` damages such files for fuzzing.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass, field
from math import prod
from pathlib import Path

import numpy as np

from slotsmith.layout import WanConfig, wan_tensor_shapes
from slotsmith.names import from_canonical

TINY = WanConfig(dim=64, ffn_dim=128, num_layers=2, text_dim=32, freq_dim=16)
"""A Wan DiT small enough for unit tests (a few hundred KB)."""

_SIZES = {"F32": 4, "BF16": 2, "F16": 2}

HANG_SECONDS = 30
"""A hostile input must be refused well within this; it guards against hangs and
quadratic blow-ups (which take minutes), not speed, so a loaded machine does not fail it."""


@dataclass
class Built:
    """A checkpoint written by ``make_checkpoint``.

    Attributes:
        path: What to pass to slotsmith: the file, or the folder of a sharded set.
        tensors: Canonical name -> raw bytes.
        shapes: Canonical name -> shape.
        dtype: Safetensors dtype of every tensor.
        convention: Key convention of the file(s).
        index: The index JSON of a sharded set, else None.
        files: The safetensors files written.
    """

    path: Path
    tensors: dict[str, bytes]
    shapes: dict[str, tuple[int, ...]]
    dtype: str
    convention: str
    index: Path | None = None
    files: list[Path] = field(default_factory=list)

    def key(self, name: str) -> str:
        """The file key of canonical ``name``."""
        return from_canonical(name, self.convention)

    def row_bytes(self, name: str) -> int:
        return prod(self.shapes[name][1:]) * _SIZES[self.dtype]


def random_bytes(shape: tuple[int, ...], dtype: str, rng: np.random.Generator) -> bytes:
    """Random normal values of ``shape`` as raw little-endian ``dtype`` bytes."""
    values = rng.standard_normal(prod(shape), dtype=np.float32)
    if dtype == "F32":
        return values.astype("<f4").tobytes()
    if dtype == "F16":
        return values.astype("<f2").tobytes()
    if dtype == "BF16":
        return (values.view("<u4") >> 16).astype("<u2").tobytes()
    raise ValueError(dtype)


def as_float32(raw: bytes, dtype: str) -> np.ndarray:
    """Raw little-endian ``F32``/``F16``/``BF16`` bytes as float32 values (exactly)."""
    if dtype == "BF16":
        return (np.frombuffer(raw, "<u2").astype(np.uint32) << 16).view(np.float32)
    return np.frombuffer(raw, {"F32": "<f4", "F16": "<f2"}[dtype]).astype(np.float32)


def from_float32(values: np.ndarray, dtype: str) -> bytes:
    """float32 values as raw ``dtype`` bytes, rounded to nearest, ties to even (for BF16 on the bits)."""
    if dtype == "BF16":
        bits = values.astype(np.float32).view(np.uint32).astype(np.uint64)
        return ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype("<u2").tobytes()
    with np.errstate(over="ignore"):
        return values.astype({"F32": "<f4", "F16": "<f2"}[dtype]).tobytes()


def blend_reference(base: bytes, slot: bytes, dtype: str, strength: float) -> bytes:
    """``base + s * (slot - base)`` in numpy float32, step by step (``s`` rounded to float32 first), as torch does."""
    a, b = as_float32(base, dtype), as_float32(slot, dtype)
    return from_float32(a + np.float32(strength) * (b - a), dtype)


def write_raw_safetensors(path: Path, tensors: dict[str, tuple[str, tuple[int, ...], bytes]], metadata=None) -> None:
    """Write ``key -> (dtype, shape, bytes)`` as a safetensors file, official layout."""
    header: dict = {}
    if metadata:
        header["__metadata__"] = metadata
    offset = 0
    for key, (dtype, shape, data) in tensors.items():
        header[key] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + len(data)]}
        offset += len(data)
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        for _, _, data in tensors.values():
            f.write(data)


def read_raw_safetensors(path: Path) -> tuple[dict, dict[str, bytes]]:
    """Parse a safetensors file with plain ``json``: (header, key -> bytes)."""
    blob = Path(path).read_bytes()
    (n,) = struct.unpack("<Q", blob[:8])
    header = json.loads(blob[8 : 8 + n])
    data = blob[8 + n :]
    out = {k: data[v["data_offsets"][0] : v["data_offsets"][1]] for k, v in header.items() if k != "__metadata__"}
    return header, out


def rewrite_metadata(src: Path, dst: Path, key: str, value: str) -> None:
    """Write ``src`` to ``dst`` (may be ``src``) with one ``__metadata__`` value replaced, tensors kept."""
    header, tensors = read_raw_safetensors(src)
    meta = dict(header.pop("__metadata__"))
    meta[key] = value
    write_raw_safetensors(dst, {k: (v["dtype"], tuple(v["shape"]), tensors[k]) for k, v in header.items()}, meta)


def mutate_bytes(data: bytes, mutations, span: int | None = None) -> bytes:
    """Apply byte-wise fuzzing mutations, in order, to a copy of ``data``.

    Args:
        data: The original bytes.
        mutations: ``(kind, pos, value)`` tuples: ``flip`` XORs the byte at
            ``pos`` with ``value``, ``cut`` truncates at ``pos``, ``insert``
            inserts byte ``value`` at ``pos``, ``delete`` removes ``value``
            bytes from ``pos``.
        span: Positions are taken modulo ``span + 1`` (default: the current
            length), then kept within the data, so mutations can aim at a part
            of the file such as its header.

    Returns:
        The mutated bytes.
    """
    out = bytearray(data)
    for kind, pos, value in mutations:
        pos = min(pos % ((len(out) if span is None else span) + 1), len(out))
        if kind == "flip" and pos < len(out):
            out[pos] ^= value
        elif kind == "cut":
            del out[pos:]
        elif kind == "insert":
            out.insert(pos, value)
        elif kind == "delete":
            del out[pos : pos + value]
    return bytes(out)


def make_checkpoint(
    path: str | Path,
    cfg: WanConfig = TINY,
    convention: str = "native",
    dtype: str = "F32",
    seed: int = 0,
    shards: int | None = None,
    metadata: dict[str, str] | None = None,
) -> Built:
    """Write a random Wan-shaped checkpoint.

    Args:
        path: The .safetensors file, or (with ``shards``) the folder to create.
        cfg: Model sizes (default ``TINY``).
        convention: ``native``, ``prefixed`` or ``diffusers`` keys.
        dtype: ``F32``, ``BF16`` or ``F16``.
        seed: Random seed of the values.
        shards: Split into this many shard files plus an index JSON.
        metadata: ``__metadata__`` of every file (default ``{"format": "pt"}``).

    Returns:
        What was written.
    """
    path = Path(path)
    rng = np.random.default_rng(seed)
    shapes = wan_tensor_shapes(cfg)
    tensors = {name: random_bytes(shape, dtype, rng) for name, shape in shapes.items()}
    metadata = {"format": "pt"} if metadata is None else metadata
    entries = {from_canonical(n, convention): (dtype, shapes[n], tensors[n]) for n in shapes}
    if not shards:
        write_raw_safetensors(path, entries, metadata)
        return Built(path, tensors, shapes, dtype, convention, files=[path])
    path.mkdir(parents=True)
    keys = list(entries)
    per = -(-len(keys) // shards)
    weight_map, files = {}, []
    for i in range(shards):
        name = f"diffusion_pytorch_model-{i + 1:05d}-of-{shards:05d}.safetensors"
        part = {k: entries[k] for k in keys[i * per : (i + 1) * per]}
        write_raw_safetensors(path / name, part, metadata)
        weight_map.update({k: name for k in part})
        files.append(path / name)
    index = path / "diffusion_pytorch_model.safetensors.index.json"
    total = sum(len(d) for d in tensors.values())
    index.write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    return Built(path, tensors, shapes, dtype, convention, index=index, files=files)


def read_checkpoint_tensors(built_or_path: Built | Path) -> dict[str, bytes]:
    """Every tensor of a (possibly sharded) checkpoint, by file key, parsed with plain json."""
    path = built_or_path.path if isinstance(built_or_path, Built) else Path(built_or_path)
    files = sorted(path.glob("*.safetensors")) if path.is_dir() else [path]
    out: dict[str, bytes] = {}
    for f in files:
        out.update(read_raw_safetensors(f)[1])
    return out


def disk_full(monkeypatch) -> None:
    """Make the temp files of slotsmith's atomic writes behave like files on a full disk.

    Each temp file is created as usual (so its removal can be checked), but
    its descriptor writes to ``/dev/full``: every write fails with ENOSPC.
    """
    import os
    import tempfile

    real = tempfile.mkstemp

    def mkstemp(*args, **kwargs):
        fd, name = real(*args, **kwargs)
        full = os.open("/dev/full", os.O_WRONLY)
        os.dup2(full, fd)
        os.close(full)
        return fd, name

    monkeypatch.setattr(tempfile, "mkstemp", mkstemp)


SCHEMAS = Path(__file__).parent.parent / "manifests" / "schema"
"""The JSON Schemas of slotsmith's file formats."""


def schemas() -> dict[str, dict]:
    """Every schema in ``SCHEMAS`` by name (``slot-manifest``, ``cast``...)."""
    return {p.name.removesuffix(".schema.json"): json.loads(p.read_text()) for p in SCHEMAS.glob("*.schema.json")}


def schema_validator(name: str):
    """A validator of one schema that resolves the others by their ``$id``."""
    import jsonschema
    from referencing import Registry, Resource

    docs = schemas()
    registry = Registry().with_resources((s["$id"], Resource.from_contents(s)) for s in docs.values())
    schema = docs[name]
    cls = jsonschema.validators.validator_for(schema)
    cls.check_schema(schema)
    return cls(schema, registry=registry)
