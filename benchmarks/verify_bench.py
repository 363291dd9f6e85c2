"""Verify throughput beside raw xxh3 and ``cat`` over the same bytes (prints figures; never gates CI).

Builds a synthetic bf16 slot of about 1.2 GB (every tensor of a 12-block,
Wan 2.1 1.3B-shaped model), then reads it three ways: ``cat FILE >
/dev/null``; raw streaming xxh3-128 of its data section
(``digest_file_range``, what every check hashes with); and ``verify`` (in
process, and the ``slotsmith verify`` command in a child). Each runs cold
(the file dropped from the page cache with ``posix_fadvise``, so it is read
from the disk) and warm (already cached: the hashing CPU cost alone); cold is the median of
three runs, warm the best of three. The files are removed afterwards.

    python benchmarks/verify_bench.py [--dir DIR] [--layers N]
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from math import prod
from pathlib import Path

from slotsmith.digest import digest_file_range
from slotsmith.inventory import inventory_from_checkpoint
from slotsmith.io.header import read_header
from slotsmith.io.writer import FileRange, TensorOut, write_safetensors
from slotsmith.layout import KNOWN_MODELS, wan_tensor_shapes
from slotsmith.slot import write_slot
from slotsmith.verify import verify

POOL = 64 * 1024 * 1024


def build_slot(folder: Path, layers: int) -> Path:
    """A slot holding every tensor of a synthetic bf16 base (the base is removed again)."""
    cfg = dataclasses.replace(KNOWN_MODELS["wan2.1-t2v-1.3b"].config, num_layers=layers)
    pool = memoryview(os.urandom(POOL))
    tensors = []
    for i, (name, shape) in enumerate(wan_tensor_shapes(cfg).items()):
        nbytes, parts, pos = prod(shape) * 2, [], (i * 7919 * 2) % POOL
        while nbytes:  # slices of one random pool: building runs at disk speed
            n = min(nbytes, POOL - pos)
            parts.append(pool[pos : pos + n])
            nbytes, pos = nbytes - n, 0
        tensors.append(TensorOut(name, "BF16", shape, tuple(parts)))
    base_path = folder / "base.safetensors"
    write_safetensors(base_path, tensors, {"format": "pt"})
    inv = inventory_from_checkpoint(base_path)
    slot = folder / "all.slot"
    fd = os.open(base_path, os.O_RDONLY)
    try:
        ranges = {n: FileRange(fd, *_span(inv, n)) for n in inv.tensors}
        write_slot(slot, inv, ranges, selection=None, provenance={"benchmark": "verify"})
    finally:
        os.close(fd)
    base_path.unlink()
    return slot


def _span(inv, name: str) -> tuple[int, int]:
    _, info = inv.checkpoint.tensors[inv.keys[name]]
    return info.start, info.end


def drop_cache(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def timed_cold(fn, path: Path) -> float:
    """Seconds of ``fn`` with ``path`` read from the disk, not the page cache."""
    drop_cache(path)
    return timed(fn)


def raw_xxh3(slot: Path) -> None:
    header = read_header(slot)
    fd = os.open(slot, os.O_RDONLY)
    try:
        digest_file_range(fd, header.data_start, os.fstat(fd).st_size)
    finally:
        os.close(fd)


def _ok(report) -> None:
    if not report.ok:
        raise SystemExit("verify failed on the benchmark slot")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dir", type=Path, default=None, help="Folder on the disk to measure (default: a temp folder).")
    ap.add_argument("--layers", type=int, default=12, help="Blocks of the synthetic model (12: about 1.2 GB).")
    args = ap.parse_args()
    folder = Path(tempfile.mkdtemp(prefix="verify_bench_", dir=args.dir))
    try:
        slot = build_slot(folder, args.layers)
        gb = slot.stat().st_size / 1e9
        print(f"slot: {slot} ({gb:.2f} GB, {len(read_header(slot).tensors)} tensors)")
        cli = [str(Path(sys.executable).parent / "slotsmith"), "verify", "-q", str(slot)]
        ways = {
            "cat FILE > /dev/null": lambda: subprocess.run(f"cat '{slot}' > /dev/null", shell=True, check=True),
            "raw xxh3-128 (digest_file_range)": lambda: raw_xxh3(slot),
            "verify (in process)": lambda: _ok(verify([slot])),
            "slotsmith verify -q (command)": lambda: subprocess.run(cli, check=True, stdout=subprocess.DEVNULL),
        }
        print(f"{'':34} {'cold s':>8} {'cold GB/s':>10} {'warm s':>8} {'warm GB/s':>10}")
        for label, fn in ways.items():
            cold = statistics.median(timed_cold(fn, slot) for _ in range(3))
            warm = min(timed(fn) for _ in range(3))
            print(f"{label:34} {cold:8.2f} {gb / cold:10.2f} {warm:8.2f} {gb / warm:10.2f}")
    finally:
        shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
