"""The demo over several seeds and both selections: what survives the splice, and what the samples show.

Runs ``slotsmith demo`` (default settings otherwise) once per seed and
algorithm, one after the other, and prints per run each character's
retention, its own slot's gain (base loss minus own-slot loss), how often
the spliced model's samples of its prompt are recognised as it, and the
training phase's seconds. Wall-clock figures depend on the machine; nothing
here gates anything.

    python benchmarks/demo_seeds.py --seeds 0 1 2 3 4 --algorithms v2 v3 --out /tmp/demo-seeds
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
from pathlib import Path

from slotsmith.demo.run import slotsmith_command


def run_one(out: Path, seed: int, algorithm: str, task: str) -> dict:
    """Run the demo into ``out`` and return its report."""
    cmd = slotsmith_command("demo", "--out", str(out), "--seed", str(seed), "--algorithm", algorithm,
                            "--task", task, "--json", "-q")
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"demo seed {seed} {algorithm} failed:\n{done.stdout}{done.stderr}")
    return json.loads(done.stdout)


def row(seed: int, algorithm: str, report: dict) -> str:
    """One table row: retention, own gain, recognised in the splice, base recognised, training seconds."""
    loss, chars = report["loss"], ("char1", "char2")
    retention = " / ".join(f"{report['retention'][c]:.1%}" if report["retention"][c] is not None else "n/a"
                           for c in chars)
    gain = " / ".join(f"{loss[c]['base'] - loss[c][c]:.3f}" for c in chars)
    cells = [str(seed), algorithm, retention, gain]
    if "samples" in report:
        accuracy = report["samples"]["accuracy"]
        cells += [" / ".join(f"{accuracy[m][c]:.0%}" for c in chars) for m in ("spliced", "base")]
    cells.append(f"{report['seconds']['train']:.1f} s")
    return "| " + " | ".join(cells) + " |"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--algorithms", nargs="+", default=["v2", "v3"], choices=["v2", "v3"])
    parser.add_argument("--task", default="t2v", choices=["t2v", "i2v", "ti2v"])
    parser.add_argument("--out", type=Path, default=Path("demo-seeds"), help="Scratch folder (removed at the end).")
    args = parser.parse_args()
    head = ["seed", "selection", "retention char1 / char2", "own-slot gain"]
    if args.task == "t2v":
        head += ["splice recognised char1 / char2", "base recognised char1 / char2"]
    head.append("training")
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head), flush=True)
    try:
        for seed in args.seeds:
            for algorithm in args.algorithms:
                report = run_one(args.out / f"{algorithm}-{seed}", seed, algorithm, args.task)
                print(row(seed, algorithm, report), flush=True)
    finally:
        shutil.rmtree(args.out, ignore_errors=True)


if __name__ == "__main__":
    main()
