"""Where a run's metrics go: one folder per run, through accelerate's trackers.

``--log-dir DIR`` makes ``DIR/<OUT's name>-<timestamp>`` (or ``DIR/<--log-name>``)
holding ``settings.json`` and what the trackers of ``--log-with`` write:
``jsonl`` (``train_log.jsonl``, one line per step, always available),
``tensorboard`` and ``wandb`` (when installed; a clear error when not).
"""

from __future__ import annotations

import importlib.util
import json
import time
from pathlib import Path

from accelerate.tracking import GeneralTracker

from slotsmith.errors import SlotsmithError
from slotsmith.io.writer import atomic_file, write_all
from slotsmith.train import TrainSettings

_PACKAGES = {"tensorboard": "tensorboard", "wandb": "wandb"}
"""Trackers that need a package of their own: tracker -> the module to look for (and pip install)."""


class JsonlTracker(GeneralTracker):
    """One JSON line per logged step in ``train_log.jsonl`` (needs nothing installed)."""

    name = "jsonl"
    requires_logging_directory = True
    main_process_only = True

    def __init__(self, folder: Path):
        super().__init__()
        self.folder = folder
        self._file = None

    def start(self) -> None:
        self._file = open(self.folder / "train_log.jsonl", "a", encoding="utf-8")

    @property
    def tracker(self):
        return self._file

    def store_init_configuration(self, values: dict) -> None:
        """Settings go to ``settings.json`` (written by `open_run_folder`), not into the metrics."""

    def log(self, values: dict, step: int | None = None, **kwargs) -> None:
        self._file.write(json.dumps({"step": step, **values, "time": time.time()}) + "\n")
        self._file.flush()

    def finish(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


def trackers_for(settings: TrainSettings) -> list[str]:
    """The trackers a run logs to: ``--log-with``'s, or jsonl when only ``--log-dir`` is given.

    Raises:
        SlotsmithError: A tracker whose package is not installed.
    """
    if not settings.log_dir:
        return []
    kinds = [k.strip() for k in (settings.log_with or "jsonl").split(",") if k.strip()]
    for kind in kinds:
        module = _PACKAGES.get(kind)
        if module and importlib.util.find_spec(module) is None:
            raise SlotsmithError(f"--log-with {kind}: {module} is not installed (pip install {module}), or use jsonl")
    return kinds


def run_folder(settings: TrainSettings, now: float | None = None) -> Path | None:
    """This run's log folder: ``LOG_DIR/<--log-name>``, or ``LOG_DIR/<OUT's stem>-<YYYYmmdd-HHMMSS>``."""
    if not settings.log_dir:
        return None
    name = settings.log_name or f"{Path(settings.out).stem}-{time.strftime('%Y%m%d-%H%M%S', time.localtime(now))}"
    return Path(settings.log_dir) / name


def open_run_folder(folder: Path, settings: TrainSettings, facts: dict) -> None:
    """Make the run's log folder and write ``settings.json`` (the settings and what the run established).

    A folder of that name that exists already is reused only by a ``--resume``
    run (``settings.json`` then replaced); otherwise it is refused.

    Raises:
        SlotsmithError: The folder exists (and not resuming), or cannot be made.
    """
    if folder.exists() and not settings.resume:
        raise SlotsmithError(f"{folder}: log folder already exists (give another --log-name, or --resume)")
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise SlotsmithError(f"{folder}: cannot make the log folder ({e.strerror or e})") from None
    doc = {"settings": settings.to_json(), **facts}
    with atomic_file(folder / "settings.json", force=True) as fd:
        write_all(fd, (json.dumps(doc, indent=1) + "\n").encode())


def make_trackers(kinds: list[str], folder: Path | None) -> list:
    """``log_with`` for ``Accelerator``: names of accelerate's own trackers, a `JsonlTracker` for jsonl."""
    return [JsonlTracker(folder) if kind == "jsonl" else kind for kind in kinds]
