"""Speed of ``splice BASE X.slot:S`` against a plain splice (prints figures; never gates CI).

Builds a synthetic bf16 Wan-shaped base (8 blocks of dim 1024, about 270 MB)
of normal values and a 10 % slot of the base plus noise, then times, each in
a child process (peak RSS from ``os.wait4``), ``slotsmith splice`` of the
slot as is and at strength 0.7: medians of 3. The blend's speed is the
slot's bytes over the time the strength adds.

    python benchmarks/blend_bench.py [--dir DIR]
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
from splice_bench import splice_cmd, timed_child

from slotsmith.inventory import inventory_from_checkpoint
from slotsmith.io.writer import TensorOut, write_safetensors
from slotsmith.layout import WanConfig, wan_tensor_shapes
from slotsmith.select import select_v2
from slotsmith.slot import read_slot, write_slot

CONFIG = WanConfig(dim=1024, ffn_dim=4096, num_layers=8, text_dim=1024, freq_dim=256)
REPEATS = 3


def _bf16(values: np.ndarray) -> bytes:
    return (values.astype(np.float32).view(np.uint32) >> 16).astype("<u2").tobytes()


def build(folder: Path) -> None:
    rng = np.random.default_rng(0)
    base = folder / "base.safetensors"
    tensors = [TensorOut(n, "BF16", s, (_bf16(rng.standard_normal(s, np.float32) * 0.02),))
               for n, s in wan_tensor_shapes(CONFIG).items()]
    write_safetensors(base, tensors, {"format": "pt"})
    inv = inventory_from_checkpoint(base)
    sel = select_v2(inv.numels(), 0.1, 1)
    data = {n: _bf16(rng.standard_normal(inv.tensors[n].shape, np.float32) * 0.02) for n in sel.tensors}
    write_slot(folder / "a.slot", inv, data, selection=sel.record(), provenance={})


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dir", type=Path, default=Path.cwd(), help="Folder on the disk to measure (default: cwd).")
    ap.add_argument("--build", type=Path, metavar="FOLDER", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.build:
        build(args.build)
        return
    work = Path(tempfile.mkdtemp(prefix="blend-bench-", dir=args.dir))
    try:
        # Built in a child so that this process stays small: Linux carries a
        # parent's peak RSS into a forked child's ru_maxrss.
        subprocess.run([sys.executable, __file__, "--build", str(work)], check=True)
        base, slot = work / "base.safetensors", work / "a.slot"
        nbytes = inventory_from_checkpoint(base).checkpoint.nbytes
        slot_bytes = read_slot(slot).manifest.nbytes
        times: dict[str, list[float]] = {"plain": [], "strength": []}
        rss: dict[str, int] = {}
        for _ in range(REPEATS):
            for kind, arg in (("plain", str(slot)), ("strength", f"{slot}:0.7")):
                out = work / f"{kind}.safetensors"
                wall, peak = timed_child(splice_cmd(base, [arg], out))
                times[kind].append(wall)
                rss[kind] = max(rss.get(kind, 0), peak)
                out.unlink()
        plain, strength = (statistics.median(times[k]) for k in ("plain", "strength"))
        print(f"base {nbytes / 1e6:.0f} MB bf16, slot {slot_bytes / 1e6:.1f} MB: splice {plain:.2f} s "
              f"(peak RSS {rss['plain'] / 2**20:.0f} MiB), at :0.7 {strength:.2f} s "
              f"(peak RSS {rss['strength'] / 2**20:.0f} MiB); blend {slot_bytes / 1e6 / (strength - plain):.1f} MB/s "
              "of slot bytes", flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
