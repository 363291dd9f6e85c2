"""The resumable state of a run: saving, loading, and checking it continues the same run.

The state is slot-sized (the masters and their optimizer state, the RNG
states and the losses so far) and carries the run's identity: the options
and facts a resumed run must share with the run it continues.
"""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

import torch

from slotsmith.errors import SlotsmithError
from slotsmith.io.files import open_input, parse_json_object, safe_repr
from slotsmith.io.header import is_int
from slotsmith.io.writer import atomic_file
from slotsmith.train import INT_RANGES, TrainSettings
from slotsmith.training.preflight import RunPlan
from slotsmith.training.slot_params import SlotParams

STATE_FORMAT = "slotsmith-train-state/1"


def _rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "python": list(random.getstate()[1])}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    """Restore the random number generators to a state saved by ``save_state``."""
    torch.set_rng_state(state["torch"])
    random.setstate((3, tuple(state["python"]), None))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


_RESUME_OPTIONS = ("ff", "ffid", "seed", "batch_size", "grad_accum", "optimizer", "timestep_sampling", "expert")
"""The options a resumed run must share with the run it continues."""

_RESUME_FACTS = {  # how the saved run differs, for what the identity holds besides options
    "layout": "a base of another layout",
    "dataset": "other training data (the cache differs)",
    "tensors": "another selection of tensors",
    "rows": "another selection of rows (v3: another --pools or --ff)",
}


def state_identity(settings: TrainSettings, plan: RunPlan, num_processes: int) -> dict:
    """What must match for a resumed run to continue the same run exactly.

    Options come first, so a resume refused for another ``--ffid`` names that
    option rather than the tensor list it implies.
    """
    return {
        **{k: getattr(settings, k) for k in _RESUME_OPTIONS},
        "layout": plan.inventory.layout_digest(),
        "dataset": plan.dataset_digest,
        "processes": num_processes,
        "tensors": list(plan.selection.tensors),
        # v3 slots are rows of tensors: the rows are part of what the run trains (absent for v2).
        **({"rows": {n: list(r) for n, r in plan.selection.rows.items()}} if plan.selection.rows else {}),
    }


def _resume_difference(key: str, saved, value) -> str:
    """How the saved run differs from this one in ``key`` of the identity."""
    if key in _RESUME_OPTIONS:
        flag = "--" + key.replace("_", "-")

        def given(v) -> str:
            return f"no {flag}" if v is None else f"{flag} {v}"

        return f"{given(saved)}, but this run has {given(value)}"
    if key == "processes":
        return f"{saved} process(es), but this run has {value}"
    return _RESUME_FACTS[key]


def save_state(path: Path, identity: dict, step: int, slot: SlotParams, optimizer, scaler, losses: list) -> None:
    """Write the resumable state atomically (slot-sized: masters + optimizer state).

    Raises:
        SlotsmithError: Writing failed (naming the file); nothing was written.
    """
    state = {
        "format": STATE_FORMAT,
        "identity": json.dumps(identity, sort_keys=True),
        "step": step,
        "masters": {n: slot[n].detach().cpu() for n in slot.names},
        "optimizer": optimizer.state_dict(),
        "scaler": scaler.state_dict() if scaler is not None else {},
        "rng": _rng_state(),
        "losses": list(losses),
    }
    with atomic_file(path, force=True) as fd, os.fdopen(os.dup(fd), "wb") as f:
        torch.save(state, f)


START_OVER = "delete it, or run without --resume to start over"
"""What to do about a state that cannot be resumed."""


def _damaged(path: Path, problem: str) -> SlotsmithError:
    return SlotsmithError(f"{path}: damaged training state ({problem}); {START_OVER}")


def _check_rng(path: Path, rng: object) -> None:
    """Refuse RNG states that the generators would not take (tried on throwaway generators)."""
    if not isinstance(rng, dict) or not isinstance(rng.get("torch"), torch.Tensor) or not isinstance(
        rng.get("python"), list
    ):
        raise _damaged(path, "rng must hold the torch and python generator states")
    try:
        torch.Generator().set_state(rng["torch"])
        random.Random().setstate((3, tuple(rng["python"]), None))
    except (RuntimeError, TypeError, ValueError, OverflowError):
        raise _damaged(path, "rng holds a generator state the generators refuse") from None


def _check_state(path: Path, state: object) -> dict:
    """Refuse a state whose parts are missing, of the wrong type or non-finite.

    Shapes are checked against the slot when it is restored (``restore_state``).
    """
    if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
        raise SlotsmithError(f"{path}: not a {STATE_FORMAT} file; {START_OVER}")
    missing = sorted({"identity", "step", "masters", "optimizer", "scaler", "rng", "losses"} - set(state))
    if missing:
        raise _damaged(path, f"{', '.join(missing)} missing")
    if not isinstance(state["identity"], str):
        raise _damaged(path, "identity is not a JSON string")
    try:
        saved = parse_json_object(state["identity"].encode("utf-8"), "identity")
    except (SlotsmithError, UnicodeEncodeError) as e:
        raise _damaged(path, f"identity: {str(e).removeprefix('identity: ')}") from None
    step = state["step"]
    if not is_int(step) or not 0 <= step <= INT_RANGES["steps"][1]:
        raise _damaged(path, f"step {safe_repr(step)} is not a step count")
    tensors = saved.get("tensors")
    if not (isinstance(tensors, list) and all(isinstance(n, str) for n in tensors)):
        raise _damaged(path, "identity lacks the list of the slot's tensors")
    masters = state["masters"]
    if not isinstance(masters, dict) or set(masters) != set(tensors):
        raise _damaged(path, "masters do not hold exactly the slot's tensors")
    for name, t in masters.items():
        if not isinstance(t, torch.Tensor) or not t.is_floating_point():
            raise _damaged(path, f"master {name!r} is not a floating-point tensor")
        if not torch.isfinite(t).all():
            raise _damaged(path, f"master {name!r} holds NaN or inf")
    losses = state["losses"]
    if not (isinstance(losses, list) and len(losses) == step and all(isinstance(x, float) for x in losses)):
        raise _damaged(path, f"losses must be {step} number(s), one per step")
    optimizer = state["optimizer"]
    if not (isinstance(optimizer, dict) and isinstance(optimizer.get("state"), dict)
            and isinstance(optimizer.get("param_groups"), list)):
        raise _damaged(path, "optimizer state must hold state and param_groups")
    if not isinstance(state["scaler"], dict):
        raise _damaged(path, "scaler state must be a mapping")
    _check_rng(path, state["rng"])
    return saved


def restore_state(path: Path, state: dict, slot: SlotParams, optimizer, scaler) -> tuple[int, list[float]]:
    """Put a loaded state back into the slot, the optimizer, the scaler and the RNGs.

    Returns:
        ``(step, losses)`` of the saved run.

    Raises:
        SlotsmithError: A master or optimizer tensor of the wrong shape, or an
            optimizer state that does not fit (the state is damaged).
    """
    for n in slot.names:
        if state["masters"][n].shape != slot[n].shape:
            raise _damaged(path, f"master {n!r} is {list(state['masters'][n].shape)}, the slot's is {list(slot[n].shape)}")
    params = slot.parameters_in_order()
    for key, per_param in state["optimizer"]["state"].items():
        if not (is_int(key) and 0 <= key < len(params) and isinstance(per_param, dict)):
            raise _damaged(path, "optimizer state names a parameter the slot lacks")
        for field, value in per_param.items():
            if isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape != params[key].shape:
                raise _damaged(path, f"optimizer {field} of parameter {key} has the wrong shape")
    with torch.no_grad():
        for n in slot.names:
            slot[n].copy_(state["masters"][n])
    try:
        optimizer.load_state_dict(state["optimizer"])
        if scaler is not None and state["scaler"]:
            scaler.load_state_dict(state["scaler"])
    except (KeyError, TypeError, ValueError, RuntimeError) as e:
        raise _damaged(path, f"optimizer or scaler state does not fit ({type(e).__name__})") from None
    set_rng_state(state["rng"])
    return state["step"], list(state["losses"])


def load_state(path: Path, identity: dict) -> dict:
    """Read a resumable state and check it belongs to this run.

    Raises:
        SlotsmithError: Unreadable, damaged (saying what is wrong and how to
            start over), or made by a different run.
    """
    fd = open_input(path, "training state")
    try:
        with os.fdopen(fd, "rb") as f:
            state = torch.load(f, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many types for a bad file
        raise SlotsmithError(f"{path}: not a readable training state ({type(e).__name__}); {START_OVER}") from None
    saved = _check_state(path, state)
    for key, value in identity.items():
        if saved.get(key) != value:
            raise SlotsmithError(
                f"{path}: was made with {_resume_difference(key, saved.get(key), value)}; cannot resume "
                "(run with the same settings, or without --resume to start over)"
            )
    return state
