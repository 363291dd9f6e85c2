"""Splice speed and memory on a synthetic Wan-shaped bf16 base (prints figures; never gates CI).

Builds a base with the layout of Wan 2.1 T2V 1.3B (about 2.8 GB in bf16) and
two 1% slots (``--ff 0.01``, ffids 0 and 1), then times ``cp`` of the base
(alone, plus fsync, and with ``--reflink=never``) and ``slotsmith splice``
(which fsyncs) on the same disk, each in a child process whose peak RSS is
read with ``os.wait4``: medians of 3 runs, page cache dropped before each.
``--big`` splices a base about 4x larger (the Wan 2.2 TI2V 5B layout, about
10 GB) once, for peak RSS. ``--xfs`` (root, ``xfsprogs``) also runs on a
loop-mounted XFS image with reflinks and reports the new disk blocks the
output used; with ``--big`` too, the larger base is timed there against ``cp``.

    python benchmarks/splice_bench.py [--dir DIR] [--big] [--xfs]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from math import prod
from pathlib import Path

from slotsmith.inventory import inventory_from_checkpoint
from slotsmith.io.header import DTYPE_SIZES
from slotsmith.io.writer import TensorOut, write_safetensors
from slotsmith.layout import KNOWN_MODELS, wan_tensor_shapes
from slotsmith.select import select_v2
from slotsmith.slot import write_slot

CHUNK = 64 * 1024 * 1024
REPEATS = 3


def _parts(nbytes: int, pool: memoryview, salt: int) -> tuple:
    # Slices of one random pool, shifted per tensor, so that building the base
    # runs at disk speed rather than random-number speed.
    parts, pos = [], salt % (len(pool) - CHUNK)
    while nbytes:
        n = min(nbytes, CHUNK)
        parts.append(pool[pos : pos + n])
        nbytes -= n
        pos = (pos + 4099) % (len(pool) - CHUNK)
    return tuple(parts)


def build_base(path: Path, model: str) -> None:
    shapes = wan_tensor_shapes(KNOWN_MODELS[model].config)
    pool = memoryview(os.urandom(2 * CHUNK))
    tensors = []
    for i, (name, shape) in enumerate(shapes.items()):
        nbytes = prod(shape) * DTYPE_SIZES["BF16"]
        tensors.append(TensorOut(name, "BF16", shape, _parts(nbytes, pool, i * 7919)))
    write_safetensors(path, tensors, {"format": "pt"}, data_mod=123 * 8)


def build_slots(base: Path, folder: Path) -> list[Path]:
    inv = inventory_from_checkpoint(base)
    paths = []
    for ffid in (0, 1):
        sel = select_v2(inv.numels(), 0.01, ffid)
        data = {n: os.urandom(inv.tensors[n].numel * 2) for n in sel.tensors}
        p = folder / f"slot{ffid}.slot"
        write_slot(p, inv, data, selection={"algorithm": "v2", "ff": 0.01, "ffid": ffid, "num_pools": 8}, provenance={})
        paths.append(p)
    return paths


def timed_child(cmd: list[str]) -> tuple[float, int]:
    """Wall seconds and peak RSS (bytes) of one child process."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode:
        raise SystemExit(f"{cmd[0]} failed with {proc.returncode}")
    return wall, usage.ru_maxrss * 1024


def drop_caches() -> None:
    os.sync()
    try:
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
    except OSError:
        pass  # not root or not allowed: runs start warm instead


def used_bytes(folder: Path) -> int:
    os.sync()
    st = os.statvfs(folder)
    return (st.f_blocks - st.f_bfree) * st.f_frsize


def splice_cmd(base: Path, slots: list[Path], out: Path) -> list[str]:
    code = "from slotsmith.cli import main; main()"
    return [sys.executable, "-c", code, "splice", str(base), *map(str, slots), "-o", str(out), "-q"]


def bench(folder: Path, model: str, with_cp: bool = True) -> dict:
    base, out, copy = folder / "base.safetensors", folder / "out.safetensors", folder / "copy.safetensors"
    t0 = time.perf_counter()
    # Built in a child so that this process stays small: Linux carries a
    # parent's peak RSS into a forked child's ru_maxrss.
    subprocess.run([sys.executable, __file__, "--build", str(folder), model], check=True)
    slots = [folder / "slot0.slot", folder / "slot1.slot"]
    print(f"  built {base.stat().st_size / 1e9:.2f} GB base + slots {[p.stat().st_size // 10**6 for p in slots]} MB "
          f"in {time.perf_counter() - t0:.1f} s", flush=True)
    res = {"base_gb": base.stat().st_size / 1e9}
    runs: dict[str, list[float]] = {"cp": [], "cp_fsync": [], "cp_full": [], "splice": []}
    for _ in range(REPEATS if with_cp else 1):
        if with_cp:
            drop_caches()
            wall, _ = timed_child(["cp", str(base), str(copy)])
            t0 = time.perf_counter()
            fd = os.open(copy, os.O_RDONLY)
            os.fsync(fd)
            os.close(fd)
            runs["cp"].append(wall)
            runs["cp_fsync"].append(wall + time.perf_counter() - t0)
            copy.unlink()
            # A real copy too, where cp would otherwise reflink (XFS, btrfs).
            drop_caches()
            wall, _ = timed_child(["cp", "--reflink=never", str(base), str(copy)])
            runs["cp_full"].append(wall)
            copy.unlink()
        drop_caches()
        before = used_bytes(folder)
        wall, rss = timed_child(splice_cmd(base, slots, out))
        res["new_blocks"] = used_bytes(folder) - before
        runs["splice"].append(wall)
        res["splice_rss"] = max(res.get("splice_rss", 0), rss)
        out.unlink()
    for k, v in runs.items():
        if v:
            res[f"{k}_s"] = statistics.median(v)
    res["slots_bytes"] = sum(p.stat().st_size for p in slots)
    for p in (base, *slots):
        p.unlink()
    return res


def report(label: str, r: dict) -> None:
    line = f"{label}: base {r['base_gb']:.2f} GB, splice {r['splice_s']:.2f} s, peak RSS {r['splice_rss'] / 2**20:.0f} MiB"
    if "cp_s" in r:
        line += (
            f", cp {r['cp_s']:.2f} s (splice/cp {r['splice_s'] / r['cp_s']:.2f}x), "
            f"cp+fsync {r['cp_fsync_s']:.2f} s ({r['splice_s'] / r['cp_fsync_s']:.2f}x), "
            f"cp --reflink=never {r['cp_full_s']:.2f} s ({r['splice_s'] / r['cp_full_s']:.2f}x)"
        )
    line += f", new disk bytes {r['new_blocks'] / 1e6:.0f} MB (slots {r['slots_bytes'] / 1e6:.0f} MB)"
    print(line, flush=True)


def mount_xfs(image_dir: Path, size_gb: int) -> Path:
    """Loop-mount a fresh XFS image with reflinks; returns the mount point."""
    image = image_dir / "xfs-bench.img"
    with open(image, "wb") as f:
        f.truncate(size_gb * 2**30)
    subprocess.run(["mkfs.xfs", "-q", "-f", "-m", "reflink=1", str(image)], check=True)
    mnt = Path(tempfile.mkdtemp(prefix="xfs-bench-"))
    subprocess.run(["mount", "-o", "loop", str(image), str(mnt)], check=True)
    return mnt


def unmount_xfs(mnt: Path, image_dir: Path) -> None:
    subprocess.run(["umount", str(mnt)], check=False)
    mnt.rmdir()
    (image_dir / "xfs-bench.img").unlink(missing_ok=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dir", type=Path, default=Path.cwd(), help="Folder on the disk to measure (default: cwd).")
    ap.add_argument("--big", action="store_true", help="Also splice a ~10 GB base (peak RSS; on XFS also timed).")
    ap.add_argument("--xfs", action="store_true", help="Also measure on a loop-mounted XFS image (root).")
    ap.add_argument("--build", nargs=2, metavar=("FOLDER", "MODEL"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.build:
        folder, model = Path(args.build[0]), args.build[1]
        build_base(folder / "base.safetensors", model)
        build_slots(folder / "base.safetensors", folder)
        return
    work = Path(tempfile.mkdtemp(prefix="splice-bench-", dir=args.dir))
    try:
        print(f"disk: {work}", flush=True)
        report("host disk, 2.8 GB base", bench(work, "wan2.1-t2v-1.3b"))
        if args.big:
            report("host disk, 4x base", bench(work, "wan2.2-ti2v-5b", with_cp=False))
        if args.xfs:
            mnt = mount_xfs(work, 24 if args.big else 12)
            try:
                report("XFS (reflink), 2.8 GB base", bench(mnt, "wan2.1-t2v-1.3b"))
                if args.big:
                    # Splice's fixed costs (start-up, hashing the slots) shrink beside a bigger base.
                    report("XFS (reflink), 4x base", bench(mnt, "wan2.2-ti2v-5b"))
            finally:
                unmount_xfs(mnt, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
