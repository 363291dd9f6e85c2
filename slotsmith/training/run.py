"""``slotsmith train``: fully fine-tune one slot of a Wan DiT, write only the slot.

The run: check everything that needs no weights (`slotsmith.training.preflight`),
load the base, move the slot's tensors out into fp32 masters
(`slotsmith.training.slot_params`), then step through the sample stream
(`slotsmith.training.stream`) on the flow-matching loss (`slotsmith.training.flow`), saving a
resumable state (`slotsmith.training.state`) and writing only the slot.

Data parallel: each process computes gradients on its share of the global
batch and only the slot's gradients are averaged (no DDP wrapper, so the
frozen base is never broadcast).
"""

from __future__ import annotations

import dataclasses
import random
import signal
import time
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch

from slotsmith.data.cache import CachedDataset
from slotsmith.data.cache_builder import ensure_cache
from slotsmith.errors import SlotsmithError
from slotsmith.manifest import Manifest
from slotsmith.progress import Progress, phase
from slotsmith.sampling.training import TrainingSampler, training_sampler
from slotsmith.slot import write_slot
from slotsmith.train import TrainSettings
from slotsmith.training import memory
from slotsmith.training.conditioning import batch_conditioning
from slotsmith.training.flow import flow_loss, sample_t
from slotsmith.training.knobs import (
    apply_attention,
    compile_blocks,
    place_model,
    process_warning,
    resolve_attention,
    runtime_line,
    say,
)
from slotsmith.training.logs import make_trackers, open_run_folder, run_folder, trackers_for
from slotsmith.training.optim import lr_factor, make_optimizer, optimizer_state_bytes
from slotsmith.training.preflight import RunPlan, plan_base, plan_run, snapshot_path_for
from slotsmith.training.slot_params import SlotParams
from slotsmith.training.state import load_state, restore_state, save_state, state_identity
from slotsmith.training.stream import DataStream, sample_generator
from slotsmith.training.wan import TORCH_DTYPES, base_dtype, empty_training_model, load_for_training


@dataclass
class TrainResult:
    """What a run did."""

    manifest: Manifest | None
    out: Path | None
    state_path: Path
    start_step: int
    steps: int
    total_steps: int
    first_loss: float | None
    final_loss: float | None
    seconds: float
    trained_params: int
    optimizer_bytes: int
    interrupted: int = 0
    is_main: bool = True
    expert_note: str | None = None
    skipped: tuple[str, ...] = ()
    batch_note: str | None = None
    runtime_note: str | None = None
    memory_note: str | None = None


@contextmanager
def _graceful_interrupt() -> Iterator[list[int]]:
    """First Ctrl-C or SIGTERM asks the loop to stop at the next step boundary (the flag holds
    the signal number); the second aborts."""
    flag = [0]

    def handler(signum, frame):
        if flag[0]:
            raise KeyboardInterrupt
        flag[0] = signum

    try:
        previous = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    except ValueError:  # not the main thread: keep the default behaviour
        yield flag
        return
    try:
        yield flag
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


def _slot_bytes(slot: SlotParams, dtypes: dict[str, str]) -> dict[str, memoryview]:
    return {
        n: memoryview(slot[n].detach().to(TORCH_DTYPES[dtypes[n]]).contiguous().cpu().view(torch.uint8).numpy())
        for n in slot.names
    }


def _write(path: Path, plan: RunPlan, settings: TrainSettings, slot: SlotParams, extra: dict) -> Manifest:
    """Write a slot (or snapshot) of the run; ``settings`` as the user gave them, for the provenance."""
    dtypes = {n: plan.inventory.tensors[n].dtype for n in slot.names}
    provenance = {
        "trainer": "slotsmith train",
        "settings": settings.to_json(),
        "dataset_digest": plan.dataset_digest,
        "seed": settings.seed,
        "timestep_range": list(plan.t_range),
        "expert_boundary": plan.boundary,
        **extra,
    }
    return write_slot(
        path, plan.inventory, _slot_bytes(slot, dtypes), selection=plan.selection.record(), provenance=provenance,
        rows=plan.selection.rows, expert=settings.expert, force=True,
    )


@dataclass
class _Run:
    """What the phases of one run share."""

    settings: TrainSettings  # the settings the run uses (a --data run's point at its cache)
    given: TrainSettings  # as the user gave them, for the provenance
    plan: RunPlan
    accelerator: object
    identity: dict
    state: dict | None
    show: bool
    skipped: tuple[str, ...]
    runtime: str | None = None  # device, precision, attention, processes: said before the first step and at the end
    memory: memory.MemoryEstimate | None = None  # made by _load, before any weight is read


@dataclass
class _Loop:
    """The trained slot, its optimizer and where the step loop stands."""

    model: torch.nn.Module
    slot: SlotParams
    compute_dtype: torch.dtype
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler | None
    step: int
    losses: list[float]


def train(settings: TrainSettings, progress: bool | None = None) -> TrainResult:
    """Run ``slotsmith train``: check, load, fine-tune the slot, write it.

    Args:
        settings: The run's settings.
        progress: Show progress on stderr, a bar on a terminal and lines in a log
            (None: unless ``settings.quiet``).

    Returns:
        What the run did (``manifest`` None when stopped early).

    Raises:
        SlotsmithError: Bad input (before any weights are loaded).
    """
    from accelerate import Accelerator  # slow to import, and only a run needs it

    trackers = trackers_for(settings)  # a tracker that is not installed fails here, before any work
    log_folder = run_folder(settings)
    accelerator = Accelerator(
        cpu=not torch.cuda.is_available(), log_with=make_trackers(trackers, log_folder) or None,
        project_dir=str(log_folder) if log_folder else None,
    )
    show = (progress if progress is not None else not settings.quiet) and accelerator.is_main_process
    # Checked before any work: an attention backend this machine cannot run is refused with the usable ones.
    attention, _ = resolve_attention(settings.attention, accelerator.device)
    warning = process_warning(accelerator.num_processes)
    if warning and accelerator.is_main_process:
        say(warning, True)  # even with -q: a run on fewer processes than asked is not what the user thinks
    run = _prepare(settings, accelerator, show)
    if trackers:
        _start_logs(run, log_folder)
    sampler = None
    if accelerator.is_main_process:  # before the base loads: a bad prompt file fails first
        sampler = training_sampler(run.given, Path(run.plan.inventory.source).name, accelerator.device)
    with phase("loading the base", show):
        model, slot, compute_dtype = _load(run)
    apply_attention(model, attention)
    if settings.compile:
        compile_blocks(model)
    run.runtime = runtime_line(
        accelerator.device, compute_dtype, settings.mixed_precision, attention, accelerator.num_processes
    )
    say(f"train: {run.runtime}; batch size {run.plan.batch_size} per process (from {run.plan.batch_from})", show)
    loop = _restore(run, model, slot, compute_dtype)
    start_step = loop.step
    started = time.perf_counter()
    interrupted = _step_loop(run, loop, sampler)
    result = _finish(run, loop, start_step, time.perf_counter() - started, interrupted)
    how = run.runtime + (", frozen weights float8" if settings.fp8_base else "")
    result.memory_note = memory.measured(run.memory, accelerator.device, how)
    # Trackers closed, and the process group (of a multi-process run) ended before the interpreter exits.
    accelerator.end_training()
    return result


def _start_logs(run: _Run, folder: Path) -> None:
    """Open the run's log folder (main process) with its settings, and start the trackers."""
    accelerator = run.accelerator
    if accelerator.is_main_process:
        facts = {
            "out": str(run.plan.out), "total_steps": run.plan.total_steps, "batch_size": run.plan.batch_size,
            "processes": accelerator.num_processes, "device": str(accelerator.device),
            "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
        open_run_folder(folder, run.given, facts)
    # Trackers take flat str/int/float/bool values: "not given" becomes "".
    config = {k: ("" if v is None else v) for k, v in run.settings.to_json().items()}
    accelerator.init_trackers(folder.name, config=config, init_kwargs={"wandb": {"dir": str(folder)}})


def _prepare(settings: TrainSettings, accelerator, show: bool) -> _Run:
    """Every check that needs no weights, the cache (``--data``) and the resume state: fail before loading."""
    # The base and the output are checked first: encoding a dataset for a run that cannot start is waste.
    with phase("checking the base", show):
        base_plan = plan_base(settings)
    skipped = []
    given = settings  # what the provenance records: the user's --data and encoders, not the cache-only copy below
    if settings.data:
        # The main process encodes what is missing; the others then find a complete cache.
        with accelerator.main_process_first():
            cache_dir, skipped = ensure_cache(
                settings.data, settings.vae, settings.t5, settings.tokenizer, skip_bad=settings.skip_bad, progress=show,
                i2v=settings.i2v, clip=settings.clip, reuse_musubi=not settings.no_reuse_musubi,
            )
        # From here on the run is a run on that cache folder (the same one --cache would name).
        settings = dataclasses.replace(
            settings, cache=str(cache_dir), data="", vae=None, t5=None, tokenizer=None, skip_bad=False,
            i2v=False, clip=None, no_reuse_musubi=False,
        )
    with phase("checking the cache", show):
        plan = plan_run(settings, accelerator.num_processes, base_plan)
    # From here on the batch size is the one the run uses (given, or the dataset's).
    settings = dataclasses.replace(settings, batch_size=plan.batch_size)
    identity = state_identity(settings, plan, accelerator.num_processes)
    # Read before the weights are loaded: a state this run cannot continue fails fast.
    with phase("reading the resume state", show):
        state = load_state(plan.state_path, identity) if settings.resume else None
    if state is not None and state["step"] > plan.total_steps:
        asked = f"--steps {settings.steps}" if settings.steps is not None else f"--epochs {settings.epochs:g}"
        raise SlotsmithError(
            f"{plan.state_path}: is at step {state['step']} already, beyond the {plan.total_steps} step(s) of this "
            f"run ({asked}); cannot resume (ask for at least {state['step']} steps, or run without --resume to "
            "start over)"
        )
    if state is not None:
        say(f"resume: {_resume_schedule(settings, plan, state)}", show)
    return _Run(settings, given, plan, accelerator, identity, state, show, tuple(str(item) for item in skipped))


RESTART_RATIO = 2.0
"""A resumed run whose schedule puts the learning rate this many times above the saved one is refused."""


def _resume_schedule(settings: TrainSettings, plan: RunPlan, state: dict) -> str:
    """What the learning rate does at the resume point: said, or refused when the decay would start again.

    The saved optimizer holds the rate of the saved run's last step. A run
    extended past a finished cosine or linear decay (``--steps`` raised) would
    put the rate back near its peak: that is refused, naming the ways on.

    Raises:
        SlotsmithError: The schedule over this run's total jumps the rate up.
    """
    step, total = state["step"], plan.total_steps
    groups = state["optimizer"].get("param_groups") or [{}]
    saved = groups[0].get("lr")
    now = settings.lr * lr_factor(settings, step, total) if step < total else None
    where = f"step {step} of {total}"
    if saved is None or now is None:
        return f"{where}" + ("" if now is None else f", lr {now:.3g} ({settings.lr_scheduler})")
    jumps = now > RESTART_RATIO * saved and step >= settings.warmup_steps
    if settings.lr_scheduler != "constant" and jumps:
        raise SlotsmithError(
            f"{plan.state_path}: the saved run's learning rate had decayed to {saved:.3g} by step {step}; this run's "
            f"{settings.lr_scheduler} schedule over {total} steps puts step {step} at {now:.3g}, so the decay would "
            f"start again. Pass --lr-scheduler constant --lr {saved:.3g} to go on at the rate it reached, or run "
            "without --resume to start a fresh schedule"
        )
    if settings.lr_scheduler == "constant":
        return f"{where}, lr {saved:.3g} -> {now:.3g} (constant from here)"
    return f"{where}, lr {saved:.3g} -> {now:.3g} (the {settings.lr_scheduler} schedule over {total} steps continues)"


def _load(run: _Run) -> tuple[torch.nn.Module, SlotParams, torch.dtype]:
    """Estimate the memory (refusing a run that will not fit), then stream the base in.

    The model is built empty with its final dtypes (``wan.empty_training_model``);
    the slot becomes fp32 masters and every frozen tensor goes straight to its
    float8 / offload / device form (``wan.load_for_training``).
    """
    settings, plan, accelerator = run.settings, run.plan, run.accelerator
    device = accelerator.device
    torch.manual_seed(settings.seed)
    random.seed(settings.seed)
    memory.release_freed_memory_promptly()
    file_dtype = base_dtype(plan.inventory)
    model, compute_dtype = empty_training_model(plan.config, plan.head_dim, file_dtype, settings.fp8_base)
    processes = accelerator.num_processes
    run.memory = memory.run_estimate(settings, plan, device, processes, model)
    say(run.memory.describe(), run.show)
    free_device = torch.cuda.mem_get_info(device)[0] if device.type == "cuda" else None
    memory.check_fits(
        run.memory, lambda options: memory.run_estimate(settings, plan, device, processes, **options), settings,
        memory.available_host_bytes(), free_device,
    )
    slot, stats = load_for_training(
        model, plan.inventory, list(plan.selection.tensors), device, compute_dtype,
        rows=plan.selection.rows, fp8=settings.fp8_base, offload_blocks=settings.offload_blocks, progress=run.show,
    )
    say(
        f"loaded base: {stats.nbytes / 1e9:.2f} GB in {stats.seconds:.1f} s ({stats.mb_per_s:.0f} MB/s), "
        f"host RSS {memory.rss_now() / 1e9:.2f} GB", run.show,
    )
    if settings.gradient_checkpointing:
        model.enable_gradient_checkpointing()
    place_model(model, device, settings.offload_blocks)
    model.train()
    return model, slot, compute_dtype


def _restore(run: _Run, model: torch.nn.Module, slot: SlotParams, compute_dtype: torch.dtype) -> _Loop:
    """The optimizer (and fp16 scaler) over the slot, continued from the resume state when there is one."""
    settings, state = run.settings, run.state
    optimizer = make_optimizer(settings.optimizer, slot.parameters_in_order(), settings.lr, settings.weight_decay)
    scaler = torch.amp.GradScaler(run.accelerator.device.type) if settings.mixed_precision == "fp16" else None
    loop = _Loop(model, slot, compute_dtype, optimizer, scaler, 0, [])
    if state is not None:
        loop.step, loop.losses = restore_state(run.plan.state_path, state, slot, optimizer, scaler)
    return loop


def _step_loop(run: _Run, loop: _Loop, sampler: TrainingSampler | None = None) -> int:
    """Train until the run's last step (or ``--stop-after``, or a Ctrl-C or SIGTERM).

    With a ``sampler`` (``--sample-prompts``), samples the model at the first step, its due steps and the last.

    Returns:
        The signal that interrupted it, or 0.
    """
    settings, plan, accelerator = run.settings, run.plan, run.accelerator
    device, world, rank = accelerator.device, accelerator.num_processes, accelerator.process_index
    model, slot, optimizer, scaler = loop.model, loop.slot, loop.optimizer, loop.scaler
    params = slot.parameters_in_order()
    amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(settings.mixed_precision)
    dataset = CachedDataset(settings.cache, plan.cache_index)
    stream = DataStream(len(dataset), settings.seed, plan.entry_shapes, settings.batch_size)
    b, accum = settings.batch_size, settings.grad_accum
    micro_global = b * world
    end_step = plan.total_steps
    if settings.stop_after is not None:
        end_step = min(end_step, loop.step + settings.stop_after)
    autocast = (lambda: torch.autocast(device.type, dtype=amp_dtype)) if amp_dtype else nullcontext
    input_dtype = loop.compute_dtype if amp_dtype is None else torch.float32
    interrupted = 0
    if sampler is not None and sampler.due(loop.step, start=True):
        sampler.sample(model, loop.step)
    bar = Progress("train", plan.total_steps, initial=loop.step, show=run.show)
    with bar, _graceful_interrupt() as stop_flag:
        while loop.step < end_step:
            step = loop.step
            lr = settings.lr * lr_factor(settings, step, plan.total_steps)
            for group in optimizer.param_groups:
                group["lr"] = lr
            step_loss = torch.zeros((), dtype=torch.float64)
            for micro in range(accum):
                first = (step * accum + micro) * micro_global + rank * b
                step_loss += _micro_step(
                    model, slot, dataset, stream, settings, plan, range(first, first + b), device,
                    input_dtype, autocast, scaler, b * accum,
                )
            if world > 1:
                for p in params:
                    if p.grad is not None:
                        p.grad = accelerator.reduce(p.grad, reduction="mean")
                step_loss = accelerator.reduce(step_loss.to(device), reduction="mean").cpu()
            if not torch.isfinite(step_loss):
                # Checked before the optimizer applies this step: the masters are still the last good ones.
                if accelerator.is_main_process:
                    save_state(plan.state_path, run.identity, step, slot, optimizer, scaler, loop.losses)
                raise SlotsmithError(
                    f"step {step + 1}: the loss is {float(step_loss)}, not a finite number; stopped before applying "
                    f"it, the state after step {step} is kept in {plan.state_path} (lower --lr, or check the data)"
                )
            if scaler is not None:
                scaler.unscale_(optimizer)
            if settings.max_grad_norm > 0:
                torch.nn.utils.clip_grad_norm_(params, settings.max_grad_norm)
            if scaler is not None:
                scaler.step(optimizer)
                scaler.update()
            else:
                optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            loop.step = step = step + 1
            loss = float(step_loss / (b * accum))
            loop.losses.append(loss)
            bar.update(1, loss=f"{loss:.4f}", lr=f"{lr:.2e}")
            if accelerator.trackers:
                accelerator.log({"loss": loss, "lr": lr}, step=step)
            if sampler is not None and sampler.due(step, end=step == end_step):
                sampler.sample(model, step)
            if settings.save_every and step % settings.save_every == 0 and step < plan.total_steps:
                if accelerator.is_main_process:
                    save_state(plan.state_path, run.identity, step, slot, optimizer, scaler, loop.losses)
                    _write(snapshot_path_for(plan.out, step), plan, run.given, slot, {"steps": step, "final_loss": loss})
            stop = torch.tensor(float(stop_flag[0]), device=device)
            if world > 1:
                stop = accelerator.reduce(stop, reduction="sum")
            if stop.item() > 0:
                interrupted = stop_flag[0] or int(signal.SIGINT)  # another process may have had the signal
                break
    return interrupted


def _finish(run: _Run, loop: _Loop, start_step: int, seconds: float, interrupted: int) -> TrainResult:
    """Save the state and, when the run reached its last step, write the slot."""
    plan, accelerator, losses, step = run.plan, run.accelerator, loop.losses, loop.step
    finished = step >= plan.total_steps
    manifest = None
    if accelerator.is_main_process:
        save_state(plan.state_path, run.identity, step, loop.slot, loop.optimizer, loop.scaler, losses)
        if finished:
            tail = losses[-min(len(losses), 10):]
            manifest = _write(plan.out, plan, run.given, loop.slot, {
                "steps": step,
                "final_loss": losses[-1] if losses else None,
                "final_loss_avg10": sum(tail) / len(tail) if tail else None,
            })
    accelerator.wait_for_everyone()
    return TrainResult(
        manifest, plan.out if finished else None, plan.state_path, start_step, step, plan.total_steps,
        losses[0] if losses else None, losses[-1] if losses else None, seconds, loop.slot.numel,
        optimizer_state_bytes(loop.optimizer), interrupted, accelerator.is_main_process,
        _expert_note(run.settings, plan), run.skipped,
        f"batch size: {plan.batch_size} per process (from {plan.batch_from})", run.runtime,
    )


def _expert_note(settings: TrainSettings, plan: RunPlan) -> str | None:
    """Which timesteps an expert run trained on, and where its boundary came from."""
    if settings.expert is None:
        return None
    source = "--boundary" if plan.boundary_from == "--boundary" else f"{plan.boundary_from}, whose layout the base has"
    low, high = plan.t_range
    return f"expert: {settings.expert}, timesteps [{low:g}, {high:g}] (boundary {plan.boundary:g} from {source})"


def _micro_step(model, slot, dataset, stream, settings, plan, positions, device, input_dtype, autocast, scaler, divisor):
    """Forward and backward one micro-batch (grouped by latent shape); returns its summed loss."""
    groups: dict[tuple, list] = {}
    for pos in positions:
        item = dataset[stream.entry(pos)]
        g = sample_generator(settings.seed, pos)
        t = sample_t(settings, g, plan.t_range)
        noise = torch.randn(item["latents"].shape, generator=g)
        groups.setdefault(tuple(item["latents"].shape), []).append((item, t, noise))
    total = torch.zeros((), dtype=torch.float64)
    for members in groups.values():
        latents = torch.stack([m[0]["latents"] for m in members]).to(device)
        context = torch.stack([m[0]["context"] for m in members]).to(device)
        t = torch.tensor([m[1] for m in members], dtype=torch.float32, device=device)
        noise = torch.stack([m[2] for m in members]).to(device)
        cond = batch_conditioning([m[0] for m in members], dataset.conditioning and dataset.conditioning.mode, device)
        with autocast():
            per_sample = flow_loss(model, latents, context, t, noise, input_dtype, cond)
        loss = per_sample.sum() / divisor
        (scaler.scale(loss) if scaler is not None else loss).backward()
        total += per_sample.detach().sum().double().cpu()
    return total


def summary(result: TrainResult) -> str:
    """A few lines on what a run did, for the end of ``slotsmith train``."""
    done = result.steps - result.start_step
    rate = done / result.seconds if result.seconds > 0 else 0.0
    if done == 0 and result.manifest is not None:
        # A resumed run that had already reached its total: the slot was rewritten from the saved state.
        steps = f"steps: none to train, the saved run is at step {result.steps} of {result.total_steps} already"
    else:
        steps = (
            f"steps: {result.start_step} -> {result.steps} of {result.total_steps} ({rate:.2f} it/s, "
            f"{result.seconds:.1f} s)"
        )
    lines = [f"skipped: {item}" for item in result.skipped]
    lines += [
        steps,
        f"trained parameters: {result.trained_params:,} (optimizer state {result.optimizer_bytes / 2**20:.1f} MiB)",
    ]
    if result.runtime_note is not None:
        lines.append(f"ran on: {result.runtime_note}")
    if result.batch_note is not None:
        lines.append(result.batch_note)
    if result.expert_note is not None:
        lines.append(result.expert_note)
    if result.memory_note is not None:
        lines.append(result.memory_note)
    if result.first_loss is not None:
        lines.append(f"loss: first {result.first_loss:.5f}, last {result.final_loss:.5f}")
    if result.manifest is not None:
        lines.append(
            f"wrote {result.out} ({len(result.manifest.entries)} tensors, {result.manifest.nbytes / 2**20:.1f} MiB)"
        )
    else:
        lines.append(f"stopped early; state saved to {result.state_path} (rerun with --resume to continue)")
    return "\n".join(lines)
