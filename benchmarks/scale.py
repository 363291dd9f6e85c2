"""Full-scale proof: train, splice and verify a slot of a real-layout Wan base with the real CLI (figures only).

Writes a synthetic base of a known layout (``slotsmith/layouts``: exact
names, shapes, bf16; finite random values, streamed so it is never whole in
RAM) and a one-item cache (a small latent, a short text of the layout's text
width), then runs the ``slotsmith`` CLI as child processes under
``/usr/bin/time -v`` (peak RSS of each):

1. ``cat BASE > /dev/null`` (the read speed the load is measured against);
2. ``train --ff 0.01 --ffid 1 --steps 2 --fp8-base --offload-blocks --gradient-checkpointing``;
3. the same for ``--ffid 2`` (the second slot);
4. ``cp BASE`` + fsync (then deleted), and ``splice BASE slot1 slot2``;
5. ``verify OUT slot1 slot2 --base BASE``;

and prints one table. Page caches are dropped before each phase when this
runs as root, so reads are cold. Big files are deleted at the end, also on
failure, unless ``--keep``; ``--reuse`` takes a base (and cache) left by
``--keep`` instead of writing them again, e.g. to rerun a phase another
process's load got OOM-killed.

Compute precision: ``--fp8-base`` stores the frozen weights in float8 and
computes in bf16 (the trainer's only fp8 path). On a CPU bf16 is practical only
for a handful of tokens, so the default latent is one frame of 16x16 (64
tokens) with 16 text tokens: the step time measures the machinery, not a
real training size (``benchmarks/gpu.py`` does that).

    python benchmarks/scale.py --layout wan2.1-t2v-1.3b [--dir DIR] [--keep] [--reuse] [--xfs]
    python benchmarks/scale.py --layout wan2.2-t2v-a14b
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import time
from math import prod
from pathlib import Path

from slotsmith.io.header import DTYPE_SIZES
from slotsmith.io.writer import TensorOut, write_safetensors
from slotsmith.layout import KNOWN_MODELS, wan_tensor_shapes

POOL_VALUES = 32 * 2**20
"""bf16 values in the random pool the base is cut from (64 MiB)."""

CHUNK = 16 * 2**20
"""Bytes per part of a tensor written from the pool."""


def base_bytes(layout: str) -> int:
    """The bf16 file size of a layout's tensors (without the header)."""
    return sum(prod(s) for s in wan_tensor_shapes(KNOWN_MODELS[layout].config).values()) * DTYPE_SIZES["BF16"]


def write_base(path: Path, layout: str) -> None:
    """A bf16 safetensors file with the layout's exact tensors, finite random values (N(0, 0.02)).

    Every tensor is a run of slices of one random pool (shifted per tensor),
    so the file streams out at disk speed and never sits whole in memory.
    """
    import torch

    g = torch.Generator().manual_seed(0)
    pool = (torch.randn(POOL_VALUES, generator=g) * 0.02).to(torch.bfloat16).view(torch.uint8).numpy()
    pool = memoryview(pool)
    span = len(pool) - CHUNK
    tensors = []
    for i, (name, shape) in enumerate(wan_tensor_shapes(KNOWN_MODELS[layout].config).items()):
        nbytes, pos, parts = prod(shape) * DTYPE_SIZES["BF16"], (i * 7919 * 2) % span, []
        while nbytes:
            n = min(nbytes, CHUNK)
            parts.append(pool[pos : pos + n])
            nbytes -= n
            pos = (pos + 4099 * 2) % span  # even: a part never splits a bf16 value
        tensors.append(TensorOut(name, "BF16", shape, tuple(parts)))
    write_safetensors(path, tensors, {"format": "pt"})


def write_cache(folder: Path, layout: str, latent: tuple[int, int, int], text_len: int) -> None:
    """A one-item cache in slotsmith's cache format: a random latent and text embedding."""
    import torch

    from slotsmith.data import cache

    cfg = KNOWN_MODELS[layout].config
    g = torch.Generator().manual_seed(1)
    key = "0" * 32
    lat = cache.write_latents(folder, key, torch.randn(cfg.in_dim, *latent, generator=g))
    txt = cache.write_text(folder, key, torch.randn(text_len, cfg.text_dim, generator=g))
    cache.write_index(folder, [{"latents": lat, "text": txt}], cfg.in_dim, cfg.text_dim)


def drop_caches() -> None:
    """Drop the page cache (root only), so the next read comes from the disk."""
    os.sync()
    try:
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
    except OSError:
        pass


def timed(cmd: list[str], label: str, log: Path) -> dict:
    """Run ``cmd`` under ``/usr/bin/time -v``; its wall seconds, peak RSS and output.

    Raises:
        SystemExit: The command failed (its output's tail is printed).
    """
    drop_caches()
    t0 = time.perf_counter()
    proc = subprocess.run(["/usr/bin/time", "-v", *cmd], capture_output=True, text=True)
    wall = time.perf_counter() - t0
    log.write_text(proc.stdout + proc.stderr)
    if proc.returncode:
        tail = "\n".join((proc.stdout + proc.stderr).splitlines()[-25:])
        raise SystemExit(f"{label} failed (exit {proc.returncode}); full output in {log}:\n{tail}")
    rss = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", proc.stderr).group(1)) * 1024
    print(f"  {label}: {wall:.1f} s, peak RSS {rss / 1e9:.2f} GB", flush=True)
    return {"wall": wall, "rss": rss, "out": proc.stdout + proc.stderr}


def slotsmith(*args: str) -> list[str]:
    return [sys.executable, "-m", "slotsmith", *args]


def train_figures(out: str) -> dict:
    """Load time, MB/s and step time, as ``slotsmith train`` printed them."""
    load = re.search(r"loaded base: ([\d.]+) GB in ([\d.]+) s \((\d+) MB/s\)", out)
    steps = re.search(r"steps: \d+ -> (\d+) of \d+ \([\d.]+ it/s, ([\d.]+) s\)", out)
    est = re.search(r"memory estimate: ~([\d.]+) GB host RAM", out)
    return {
        "load_s": float(load.group(2)), "load_mbs": float(load.group(3)),
        "step_s": float(steps.group(2)) / int(steps.group(1)), "estimate_gb": float(est.group(1)),
    }


def check_disk(folder: Path, need: int) -> None:
    free = shutil.disk_usage(folder).free
    if free < need:
        raise SystemExit(
            f"{folder}: needs {need / 1e9:.1f} GB of free disk (base, spliced output and slots), has "
            f"{free / 1e9:.1f} GB; free some space or give --dir on a bigger disk"
        )


def fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def run(args, work: Path) -> dict:
    """Every phase, each recorded in ``results.json`` as it ends (``--reuse`` skips the recorded ones)."""
    base, cache_dir, out = work / "base.safetensors", work / "cache", work / "spliced.safetensors"
    record = work / "results.json"
    size = base_bytes(args.layout)
    res: dict = json.loads(record.read_text()) if args.reuse and record.is_file() else {}
    res["base_gb"] = size / 1e9

    def phase(key: str, fn) -> None:
        if key in res:
            print(f"  {key}: reused from {record}", flush=True)
            return
        r = fn()
        r.pop("out", None)
        res[key] = r
        record.write_text(json.dumps(res, indent=1))

    if not (args.reuse and base.is_file()):
        check_disk(work, 2 * size + 2 * 10**9)
        t0 = time.perf_counter()
        base.unlink(missing_ok=True)
        write_base(base, args.layout)
        print(f"  wrote {base} ({size / 1e9:.2f} GB) in {time.perf_counter() - t0:.1f} s", flush=True)
        res = {"base_gb": size / 1e9}  # a new base: no earlier figures apply
    else:
        check_disk(work, size + 2 * 10**9)
    if not (args.reuse and (cache_dir / "index.json").is_file()):
        shutil.rmtree(cache_dir, ignore_errors=True)
        write_cache(cache_dir, args.layout, tuple(args.latent), args.text_len)
    logs = work / "logs"
    logs.mkdir(exist_ok=True)

    phase("cat", lambda: timed(["sh", "-c", f"cat '{base}' > /dev/null"], "cat base", logs / "cat.txt"))
    slots = [work / f"slot{ffid}.slot" for ffid in args.ffids]
    for ffid, slot, steps in zip(args.ffids, slots, [args.steps] + [args.second_steps or args.steps] * 9):
        def train(ffid=ffid, slot=slot, steps=steps) -> dict:
            slot.unlink(missing_ok=True)
            cmd = slotsmith(
                "train", "-b", str(base), "--cache", str(cache_dir), "--ff", "0.01", "--ffid", str(ffid), "--steps",
                str(steps), "--fp8-base", "--offload-blocks", "--gradient-checkpointing", "-o", str(slot),
                "--force",
            )
            r = timed(cmd, f"train ffid {ffid}", logs / f"train{ffid}.txt")
            r.update(train_figures(r["out"]), slot_bytes=slot.stat().st_size, steps=steps)
            Path(f"{slot}.state").unlink(missing_ok=True)
            return r

        phase(f"train{ffid}", train)

    def cp() -> dict:
        check_disk(work, size + 10**9)
        copy = work / "copy.safetensors"
        t0 = time.perf_counter()
        r = timed(["cp", "--reflink=never", str(base), str(copy)], "cp base", logs / "cp.txt")
        fsync_path(copy)
        r["wall"] = time.perf_counter() - t0
        copy.unlink()
        return r

    phase("cp", cp)

    def splice() -> dict:
        out.unlink(missing_ok=True)
        return timed(slotsmith("splice", str(base), *map(str, slots), "-o", str(out), "-q"), "splice",
                     logs / "splice.txt")

    phase("splice", splice)
    phase("verify", lambda: timed(slotsmith("verify", str(out), *map(str, slots), "--base", str(base), "-q"),
                                  "verify", logs / "verify.txt"))
    if args.xfs:
        phase("xfs", lambda: run_xfs(base, slots, work, logs) or {})
    return res


def run_xfs(base: Path, slots: list[Path], work: Path, logs: Path) -> dict | None:
    """Splice again on a loop-mounted XFS image (reflinks): time and new disk bytes."""
    if shutil.which("mkfs.xfs") is None or os.geteuid() != 0:
        print("  xfs: skipped (needs root and mkfs.xfs, from xfsprogs)", flush=True)
        return None
    sys.path.insert(0, str(Path(__file__).parent))
    from splice_bench import mount_xfs, unmount_xfs, used_bytes

    mnt = mount_xfs(work, int(base.stat().st_size * 2.5 / 2**30) + 2)
    try:
        local = [Path(shutil.copy(p, mnt)) for p in (base, *slots)]
        before = used_bytes(mnt)
        r = timed(slotsmith("splice", *map(str, local), "-o", str(mnt / "out.safetensors"), "-q"), "splice (xfs)",
                  logs / "splice-xfs.txt")
        r["new_bytes"] = used_bytes(mnt) - before
        return r
    finally:
        unmount_xfs(mnt, work)


def table(args, res: dict) -> str:
    gb = res["base_gb"]
    rows = [("base", f"{args.layout}, bf16, {gb:.2f} GB")]
    rows.append(("cat base > /dev/null", f"{res['cat']['wall']:.1f} s ({gb * 1e3 / res['cat']['wall']:.0f} MB/s)"))
    for ffid in args.ffids:
        t = res[f"train{ffid}"]
        rows += [
            (f"train ffid {ffid}: load", f"{t['load_s']:.1f} s ({t['load_mbs']:.0f} MB/s)"),
            (f"train ffid {ffid}: peak RSS", f"{t['rss'] / 1e9:.2f} GB ({t['rss'] / 1e9 / gb:.2f}x the file; "
             f"estimated {t['estimate_gb']:.1f} GB)"),
            (f"train ffid {ffid}: step", f"{t['step_s']:.1f} s/step, {t['steps']} steps (whole run {t['wall']:.0f} s)"),
            (f"train ffid {ffid}: slot", f"{t['slot_bytes'] / 1e6:.1f} MB"),
        ]
    rows += [
        ("cp --reflink=never + fsync", f"{res['cp']['wall']:.1f} s"),
        ("splice (ext4)", f"{res['splice']['wall']:.1f} s ({res['splice']['wall'] / res['cp']['wall']:.2f}x cp), "
         f"peak RSS {res['splice']['rss'] / 1e9:.2f} GB"),
        ("verify --base", f"{res['verify']['wall']:.1f} s ({2 * gb / res['verify']['wall']:.2f} GB/s over base + "
         f"output), peak RSS {res['verify']['rss'] / 1e9:.2f} GB"),
    ]
    if res.get("xfs", {}).get("wall"):
        x = res["xfs"]
        rows.append(("splice (xfs, reflinks)", f"{x['wall']:.1f} s, new disk bytes {x['new_bytes'] / 1e6:.0f} MB"))
    width = max(len(r[0]) for r in rows)
    return "\n".join(f"| {a:<{width}} | {b} |" for a, b in rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layout", required=True, choices=sorted(KNOWN_MODELS), help="Known layout to build.")
    ap.add_argument("--dir", type=Path, default=Path.cwd(), help="Folder for the big files (default: cwd).")
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--second-steps", type=int, help="Steps of the other slots (default: --steps).")
    ap.add_argument("--ffids", type=int, nargs="+", default=[1, 2], help="Slots to train (default: 1 2).")
    ap.add_argument("--latent", type=int, nargs=3, default=[1, 16, 16], metavar=("F", "H", "W"),
                    help="Latent frames, height, width of the cache item (default 1 16 16: 64 tokens).")
    ap.add_argument("--text-len", type=int, default=16, help="Text tokens of the cache item.")
    ap.add_argument("--keep", action="store_true", help="Keep the base, cache and slots (for --reuse).")
    ap.add_argument("--reuse", action="store_true", help="Reuse a base and cache left in --dir by --keep.")
    ap.add_argument("--xfs", action="store_true", help="Also splice on a loop-mounted XFS image (root, xfsprogs).")
    args = ap.parse_args()
    work = args.dir / f"scale-{args.layout}"
    if not args.reuse:
        shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True, exist_ok=True)
    print(f"{args.layout}: working in {work}", flush=True)
    t0 = time.perf_counter()
    ok = False
    try:
        res = run(args, work)
        ok = True
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
        elif not ok:
            print(f"kept {work} (rerun with --reuse: the phases in results.json are not run again)", flush=True)
    print(f"\n{args.layout}, {os.cpu_count()} CPUs, whole run {time.perf_counter() - t0:.0f} s\n{table(args, res)}")


if __name__ == "__main__":
    main()
