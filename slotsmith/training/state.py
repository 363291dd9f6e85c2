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
from slotsmith.io.writer import atomic_file
from slotsmith.train import TrainSettings
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


def load_state(path: Path, identity: dict) -> dict:
    """Read a resumable state and check it belongs to this run.

    Raises:
        SlotsmithError: Unreadable, or made by a different run.
    """
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many types for a bad file
        raise SlotsmithError(f"{path}: not a readable training state ({type(e).__name__})") from None
    if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
        raise SlotsmithError(f"{path}: not a {STATE_FORMAT} file")
    saved = json.loads(state["identity"])
    for key, value in identity.items():
        if saved.get(key) != value:
            raise SlotsmithError(
                f"{path}: was made with {_resume_difference(key, saved.get(key), value)}; cannot resume "
                "(run with the same settings, or without --resume to start over)"
            )
    return state
