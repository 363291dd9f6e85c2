"""Slot training on one GPU against the common way: step time, peak VRAM, host RSS (figures only).

On a synthetic bf16 base with the Wan 2.1 T2V 1.3B layout, at 480x832 with
81 frames (latent 21x60x104: 32,760 tokens) and with 1 frame (1,560 tokens),
ff 0.01, each case a fresh child process:

- ``plain``: ``slotsmith train`` in bf16;
- ``fp8``: ``--fp8-base``;
- ``fp8+offload+ckpt``: ``--fp8-base --offload-blocks --gradient-checkpointing``;
- ``baseline``: the common way: the whole diffusers model in bf16 on the
  device, ``requires_grad`` only on the slot's tensors, torch AdamW on them.

Step time is the median of the steps after the first (from ``train_log.jsonl``
time stamps; the baseline times its own), peak VRAM is
``torch.cuda.max_memory_allocated``, host RSS the child's peak. Ratios are
slotsmith / baseline. The attention kernel is the one PyTorch's
``scaled_dot_product_attention`` (what diffusers' Wan attention calls) runs
at the model's shapes, read from the profiler. A case that runs out of
memory is reported as OOM and the rest go on. Meant to fit in 8 minutes on
one H200; ``--cpu`` runs a 2-block model at a few tokens in a minute or two.

    python benchmarks/gpu.py [--dir DIR] [--steps 4]
    python benchmarks/gpu.py --cpu
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from scale import write_cache  # noqa: E402  (benchmarks share their synthetic-data helpers)

from slotsmith.layout import KNOWN_MODELS, WanConfig  # noqa: E402

LAYOUT = "wan2.1-t2v-1.3b"
SIZES = {"81 frames": (21, 60, 104), "1 frame": (1, 60, 104)}
"""Latent [F, H, W] of 480x832 video (VAE: 4x in time, 8x in space)."""
CPU_SIZES = {"1 frame": (1, 8, 8)}
CASES = {
    "plain": [],
    "fp8": ["--fp8-base"],
    "fp8+offload+ckpt": ["--fp8-base", "--offload-blocks", "--gradient-checkpointing"],
}
TEXT_LEN = 128


def cpu_config() -> WanConfig:
    return dataclasses.replace(KNOWN_MODELS[LAYOUT].config, num_layers=2)


def write_base(path: Path, cfg: WanConfig) -> None:
    """A bf16 base of ``cfg`` with finite random values (the scale benchmark's writer, any config)."""
    import scale

    name = "gpu-bench"
    KNOWN_MODELS[name] = dataclasses.replace(KNOWN_MODELS[LAYOUT], config=cfg)
    try:
        scale.write_base(path, name)
    finally:
        del KNOWN_MODELS[name]


def child(cmd: list[str]) -> tuple[int, int, str]:
    """(exit code, peak RSS bytes, output) of a child process."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    out = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    return os.waitstatus_to_exitcode(status), usage.ru_maxrss * 1024, out


def step_seconds(times: list[float]) -> float:
    """Median step time after the first step (warm-up)."""
    diffs = [b - a for a, b in zip(times, times[1:])]
    return statistics.median(diffs) if diffs else float("nan")


def run_slotsmith(work: Path, case: str, options: list[str], cache_dir: Path, steps: int) -> dict:
    logs = work / "logs" / case  # the run folder --log-dir and --log-name make
    shutil.rmtree(logs, ignore_errors=True)
    cmd = [
        sys.executable, "-m", "slotsmith", "train", "-b", str(work / "base.safetensors"), "--cache", str(cache_dir),
        "--ff", "0.01", "--ffid", "1", "--steps", str(steps), "-o", str(work / f"{case}.slot"), "--force",
        "--log-dir", str(logs.parent), "--log-name", case, *options,
    ]
    code, rss, out = child(cmd)
    if code:
        return {"error": "OOM" if "out of memory" in out.lower() else f"exit {code}: {out.strip().splitlines()[-1]}"}
    times = [json.loads(line)["time"] for line in (logs / "train_log.jsonl").read_text().splitlines()]
    line = next(x for x in out.splitlines() if x.startswith("memory: "))
    vram = line.split("peak device ")[1].split(" GB")[0] if "peak device" in line else "nan"
    (work / f"{case}.slot").unlink(missing_ok=True)
    (work / f"{case}.slot.state").unlink(missing_ok=True)
    return {"step_s": step_seconds(times), "vram_gb": float(vram), "rss_gb": rss / 1e9, "memory_line": line}


def baseline_child(base: str, cache_dir: str, steps: int) -> None:
    """The common way, in this process: prints a JSON line of its figures."""
    import torch

    from slotsmith.data.cache import CachedDataset
    from slotsmith.names import native_to_diffusers
    from slotsmith.select import select_v2
    from slotsmith.training.flow import flow_loss
    from slotsmith.training.wan import load_base

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    loaded = load_base(base)
    model = loaded.model.to(device)
    params = dict(model.named_parameters())
    names = select_v2(loaded.inventory.numels(), 0.01, 1).tensors
    trained = [params[native_to_diffusers(n)].requires_grad_(True) for n in names]
    optimizer = torch.optim.AdamW(trained, lr=2e-5)
    item = CachedDataset(cache_dir)[0]
    latents = item["latents"][None].to(device)
    context = item["context"][None].to(device)
    model.train()
    times = []
    for _ in range(steps):
        loss = flow_loss(model, latents, context, torch.tensor([0.5], device=device), torch.randn_like(latents),
                         loaded.dtype).mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.time())
    vram = torch.cuda.max_memory_allocated() / 1e9 if device.type == "cuda" else float("nan")
    print(json.dumps({"times": times, "vram_gb": vram}))


def run_baseline(work: Path, cache_dir: Path, steps: int) -> dict:
    cmd = [sys.executable, __file__, "--baseline-child", str(work / "base.safetensors"), str(cache_dir), str(steps)]
    code, rss, out = child(cmd)
    if code:
        return {"error": "OOM" if "out of memory" in out.lower() else f"exit {code}: {out.strip().splitlines()[-1]}"}
    doc = json.loads(out.strip().splitlines()[-1])
    return {"step_s": step_seconds(doc["times"]), "vram_gb": doc["vram_gb"], "rss_gb": rss / 1e9}


def attention_kernel(cfg: WanConfig, tokens: int, cpu: bool) -> str:
    """The kernels ``scaled_dot_product_attention`` runs at the model's self-attention shapes."""
    import torch
    import torch.nn.functional as F
    from torch.profiler import ProfilerActivity, profile

    device = "cpu" if cpu else "cuda"
    heads = cfg.dim // 128
    q = torch.randn(1, heads, tokens, 128, device=device, dtype=torch.bfloat16, requires_grad=True)
    activities = [ProfilerActivity.CPU] + ([] if cpu else [ProfilerActivity.CUDA])
    with profile(activities=activities) as prof:
        F.scaled_dot_product_attention(q, q, q).sum().backward()
    names = {e.key for e in prof.key_averages()}
    found = sorted(n for n in names if any(k in n.lower() for k in ("flash", "efficient", "cudnn", "_math", "fmha")))
    return ", ".join(found[:4]) or "unknown"


def table(results: dict) -> str:
    rows = ["| size | case | step s | peak VRAM GB | host RSS GB | time / baseline | VRAM / baseline |",
            "|---|---|---|---|---|---|---|"]
    for size, cases in results.items():
        base = cases.get("baseline", {})
        for case, r in cases.items():
            if "error" in r:
                rows.append(f"| {size} | {case} | {r['error']} | | | | |")
                continue
            ratio_t = r["step_s"] / base["step_s"] if base.get("step_s") else float("nan")
            ratio_v = r["vram_gb"] / base["vram_gb"] if base.get("vram_gb") else float("nan")
            rows.append(f"| {size} | {case} | {r['step_s']:.2f} | {r['vram_gb']:.2f} | {r['rss_gb']:.2f} | "
                        f"{ratio_t:.2f} | {ratio_v:.2f} |")
    return "\n".join(rows)


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--baseline-child":
        baseline_child(sys.argv[2], sys.argv[3], int(sys.argv[4]))
        return
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dir", type=Path, default=Path.cwd(), help="Folder for the synthetic base and caches.")
    ap.add_argument("--steps", type=int, default=4, help="Steps per case (the first is warm-up).")
    ap.add_argument("--cpu", action="store_true", help="A 2-block model at 64 tokens on the CPU (checks the script).")
    args = ap.parse_args()
    import torch

    if not args.cpu and not torch.cuda.is_available():
        raise SystemExit("no GPU: run with --cpu for the small CPU mode")
    cfg = cpu_config() if args.cpu else KNOWN_MODELS[LAYOUT].config
    sizes = CPU_SIZES if args.cpu else SIZES
    work = args.dir / "gpu-bench"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    started = time.perf_counter()
    try:
        write_base(work / "base.safetensors", cfg)
        device = "cpu" if args.cpu else torch.cuda.get_device_name()
        print(f"{LAYOUT} layout ({cfg.num_layers} blocks), bf16 base {(work / 'base.safetensors').stat().st_size / 1e9:.2f} "
              f"GB, ff 0.01, {args.steps} steps, device: {device}", flush=True)
        results: dict = {}
        for size, latent in sizes.items():
            cache_dir = work / f"cache-{latent[0]}"
            write_cache(cache_dir, LAYOUT, latent, TEXT_LEN)
            tokens = latent[0] * latent[1] // 2 * latent[2] // 2
            print(f"{size}: latent {latent}, {tokens} tokens; attention kernel: "
                  f"{attention_kernel(cfg, tokens, args.cpu)}", flush=True)
            results[size] = {}
            for case, options in CASES.items():
                results[size][case] = run_slotsmith(work, case, options, cache_dir, args.steps)
                print(f"  {case}: {results[size][case]}", flush=True)
            results[size]["baseline"] = run_baseline(work, cache_dir, args.steps)
            print(f"  baseline: {results[size]['baseline']}", flush=True)
        print(f"\nwhole run {time.perf_counter() - started:.0f} s\n{table(results)}")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
