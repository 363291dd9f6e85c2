"""What ``splice --seal`` costs, and what a cast's base fingerprint costs (prints figures; never gates CI).

Builds the synthetic bf16 base of ``splice_bench.py`` (the Wan 2.1 T2V 1.3B
layout, about 2.8 GB) and two 1% slots on the disk of ``--dir``, then times,
each in a child process (median of 3, page cache dropped before each when
allowed): ``splice``, ``splice --seal``, ``verify`` of the sealed output
(which hashes every tensor), and the cast's ``base_sample_digest``.

    python benchmarks/seal_bench.py [--dir DIR]
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from splice_bench import drop_caches, timed_child

REPEATS = 3


def cli(*args: str) -> list[str]:
    return [sys.executable, "-c", "from slotsmith.cli import main; main()", *args]


SAMPLE = """
import sys
from slotsmith.cast import base_sample_digest
from slotsmith.inventory import inventory_from_checkpoint
from slotsmith.io.files import InputFiles
with InputFiles() as files:
    base_sample_digest(inventory_from_checkpoint(sys.argv[1]), files)
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dir", type=Path, default=Path.cwd(), help="Folder on the disk to measure (default: cwd).")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="seal-bench-", dir=args.dir))
    try:
        bench = Path(__file__).with_name("splice_bench.py")
        subprocess.run([sys.executable, str(bench), "--build", str(work), "wan2.1-t2v-1.3b"], check=True)
        base, out = work / "base.safetensors", work / "out.safetensors"
        slots = [str(work / "slot0.slot"), str(work / "slot1.slot")]
        runs: dict[str, list[float]] = {"splice": [], "splice --seal": [], "verify (sealed)": [], "sample digest": []}
        for _ in range(REPEATS):
            drop_caches()
            runs["splice"].append(timed_child(cli("splice", str(base), *slots, "-o", str(out), "-q"))[0])
            out.unlink()
            drop_caches()
            runs["splice --seal"].append(timed_child(cli("splice", str(base), *slots, "-o", str(out), "-q", "--seal"))[0])
            drop_caches()
            runs["verify (sealed)"].append(timed_child(cli("verify", str(out), "-q"))[0])
            out.unlink()
            drop_caches()
            runs["sample digest"].append(timed_child([sys.executable, "-c", SAMPLE, str(base)])[0])
        print(f"disk {work}, base {base.stat().st_size / 1e9:.2f} GB, medians of {REPEATS}:")
        for name, times in runs.items():
            print(f"  {name:<16} {statistics.median(times):6.2f} s  (runs: {', '.join(f'{t:.2f}' for t in times)})")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
