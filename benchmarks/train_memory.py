"""Memory and speed of slot training on a Wan-shaped model (CPU; figures only, never gates CI).

For ff 0.001, 0.01, 0.05 (ffid 0) with selection v2 (whole tensors) and v3
(rows of every tensor, ``--pools 8``), and full fine-tuning, each in a fresh
process (peak RSS is per process): build a random bf16 Wan DiT of >= 100M
parameters, attach the slot (fp32 masters), run a few AdamW steps of flow
matching, and print trained parameters, optimizer-state bytes, RSS after
loading, peak RSS, bytes per trained parameter and step time. v3 against v2
at the same ff is the cost of training rows (each row-range Linear computes
its rows' outputs a second time and splices them in).

On a shared machine step times drift between processes; ``--pair FF``
times v2 and v3 at one ff in one process instead, two copies of the model
stepped in alternation, and prints the median step time of each.

Usage:
    .venv/bin/python benchmarks/train_memory.py [--steps 3] [--dim 768 --ffn 3072 --layers 12]
    .venv/bin/python benchmarks/train_memory.py --pair 0.01 --steps 8
"""

from __future__ import annotations

import argparse
import gc
import json
import resource
import subprocess
import sys
import time

CASES = ("0.001", "0.01", "0.05", "v3:0.001", "v3:0.01", "v3:0.05", "full")
"""ff with selection v2, ``v3:ff`` with selection v3 over 8 pools, and full fine-tuning."""


def _rss_now() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def _peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def run_case(case: str, args) -> dict:
    """Train one case in this process and return its figures."""
    import torch

    from slotsmith.layout import WanConfig
    from slotsmith.select import select_v2, select_v3
    from slotsmith.training.flow import flow_loss
    from slotsmith.training.optim import make_optimizer, optimizer_state_bytes
    from slotsmith.training.slot_params import attach_slot
    from slotsmith.training.wan import build_model, native_state_dict

    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    cfg = WanConfig(dim=args.dim, ffn_dim=args.ffn, num_layers=args.layers)
    # Built directly in bf16, as a released base is, without an fp32 transient.
    torch.set_default_dtype(torch.bfloat16)
    model = build_model(cfg)
    torch.set_default_dtype(torch.float32)
    model.requires_grad_(False)
    shapes = {n: tuple(t.shape) for n, t in native_state_dict(model).items()}
    numels = {n: t.numel() for n, t in native_state_dict(model).items()}
    total = sum(numels.values())
    rows = {}
    if case == "full":
        names = list(numels)
    elif case.startswith("v3:"):
        selection = select_v3(shapes, float(case[3:]), 0, 8)
        names, rows = list(selection.tensors), selection.rows
    else:
        names = list(select_v2(numels, float(case), 0).tensors)
    gc.collect()
    rss_loaded = _rss_now()
    slot = attach_slot(model, names, torch.device("cpu"), torch.bfloat16, rows)
    params = slot.parameters_in_order()
    optimizer = make_optimizer("adamw", params, 1e-5, 0.0)
    latents = torch.randn(args.batch, cfg.in_dim, args.frames, args.size, args.size)
    context = torch.randn(args.batch, 512, cfg.text_dim)
    times = []
    for _ in range(args.steps):
        start = time.perf_counter()
        t = torch.rand(args.batch)
        loss = flow_loss(model, latents, context, t, torch.randn_like(latents), torch.bfloat16).mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - start)
    trained = slot.numel
    return {
        "case": case,
        "total_params": total,
        "trained_params": trained,
        "trained_tensors": len(names),
        "optimizer_state_bytes": optimizer_state_bytes(optimizer),
        "master_bytes": 4 * trained,
        "rss_loaded": rss_loaded,
        "peak_rss": _peak_rss(),
        "step_s": min(times[1:] or times),
    }


def run_pair(ff: float, args) -> None:
    """Time v2 and v3 slots of one ff on two copies of one model, stepped in alternation."""
    import statistics

    import torch

    from slotsmith.layout import WanConfig
    from slotsmith.select import select_v2, select_v3
    from slotsmith.training.flow import flow_loss
    from slotsmith.training.optim import make_optimizer
    from slotsmith.training.slot_params import attach_slot
    from slotsmith.training.wan import build_model, native_state_dict

    torch.set_num_threads(args.threads)
    cfg = WanConfig(dim=args.dim, ffn_dim=args.ffn, num_layers=args.layers)
    runs = {}
    for algorithm in ("v2", "v3"):
        torch.manual_seed(0)
        torch.set_default_dtype(torch.bfloat16)
        model = build_model(cfg).requires_grad_(False)
        torch.set_default_dtype(torch.float32)
        shapes = {n: tuple(t.shape) for n, t in native_state_dict(model).items()}
        if algorithm == "v2":
            sel = select_v2({n: t.numel() for n, t in native_state_dict(model).items()}, ff, 0)
        else:
            sel = select_v3(shapes, ff, 0, 8)
        slot = attach_slot(model, list(sel.tensors), torch.device("cpu"), torch.bfloat16, sel.rows)
        optimizer = make_optimizer("adamw", slot.parameters_in_order(), 1e-5, 0.0)
        runs[algorithm] = (model, optimizer, slot.numel, [])
    latents = torch.randn(args.batch, cfg.in_dim, args.frames, args.size, args.size)
    context = torch.randn(args.batch, 512, cfg.text_dim)
    for _ in range(args.steps):
        for model, optimizer, _, times in runs.values():
            start = time.perf_counter()
            loss = flow_loss(model, latents, context, torch.rand(args.batch), torch.randn_like(latents),
                             torch.bfloat16).mean()
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            times.append(time.perf_counter() - start)
    medians = {a: statistics.median(r[3][1:] or r[3]) for a, r in runs.items()}
    for algorithm, (_, _, trained, _) in runs.items():
        print(f"ff {ff} {algorithm}: {trained:,} trained params, median step {medians[algorithm]:.3f} s")
    print(f"v3 / v2 step time: {medians['v3'] / medians['v2']:.3f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dim", type=int, default=768)
    parser.add_argument("--ffn", type=int, default=3072)
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--frames", type=int, default=1)
    parser.add_argument("--size", type=int, default=16, help="Latent height and width.")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--case", choices=CASES, help=argparse.SUPPRESS)
    parser.add_argument("--pair", type=float, metavar="FF", help="Time v2 against v3 at FF in one process.")
    args = parser.parse_args()
    if args.pair:
        run_pair(args.pair, args)
        return
    if args.case:
        print(json.dumps(run_case(args.case, args)))
        return
    forwarded = sys.argv[1:]
    rows = []
    for case in CASES:
        out = subprocess.run(
            [sys.executable, __file__, *forwarded, "--case", case], check=True, capture_output=True, text=True
        ).stdout
        rows.append(json.loads(out.strip().splitlines()[-1]))
    mib = 2**20
    print(f"Wan-shaped model: dim {args.dim}, ffn {args.ffn}, {args.layers} blocks, "
          f"{rows[0]['total_params'] / 1e6:.1f}M params, bf16 base, AdamW, fp32 masters, CPU")
    print(f"{'ff':>6} {'trained':>12} {'tensors':>7} {'opt state MiB':>13} {'loaded MiB':>10} {'peak MiB':>9} "
          f"{'peak-loaded MiB':>15} {'B/trained':>9} {'step s':>7}")
    for r in rows:
        extra = r["peak_rss"] - r["rss_loaded"]
        print(f"{r['case']:>6} {r['trained_params']:>12,} {r['trained_tensors']:>7} "
              f"{r['optimizer_state_bytes'] / mib:>13.1f} {r['rss_loaded'] / mib:>10.1f} {r['peak_rss'] / mib:>9.1f} "
              f"{extra / mib:>15.1f} {extra / r['trained_params']:>9.1f} {r['step_s']:>7.2f}")
    by_case = {r["case"]: r for r in rows}
    for ff in ("0.001", "0.01", "0.05"):
        v2, v3 = by_case[ff], by_case[f"v3:{ff}"]
        print(f"ff {ff}: v3 step {v3['step_s']:.2f} s vs v2 {v2['step_s']:.2f} s "
              f"({v3['step_s'] / v2['step_s'] - 1:+.0%}); trained {v3['trained_params']:,} vs {v2['trained_params']:,}")
    small, full = rows[0], rows[-1]
    marginal = (full["peak_rss"] - small["peak_rss"]) / (full["trained_params"] - small["trained_params"])
    print(f"marginal peak RSS per trained parameter (full vs ff {small['case']}): {marginal:.1f} bytes "
          f"(expected 16 = fp32 master 4 + grad 4 + AdamW moments 8, minus the 2-byte bf16 copy it replaces,"
          f" plus transient bf16 casts)")


if __name__ == "__main__":
    main()
