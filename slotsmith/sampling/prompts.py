"""What to sample: prompts with their settings, from the command line or a prompt file.

A prompt file has one prompt per line; blank lines and lines starting with
``#`` are skipped. A line may override the defaults with musubi-tuner's
options, after the prompt::

    character1 a red cat sits --w 832 --h 480 --f 81 --d 7 --s 30 --g 5 --fs 3 --n blurry, low quality

``--w``/``--h`` width and height, ``--f`` frames (1 or 4N+1), ``--d`` seed,
``--s`` steps, ``--g`` guidance scale, ``--fs`` flow shift and ``--n`` the
negative prompt (the rest of the option's text, up to the next option).
This module imports no torch: a training run checks its prompt file before
it loads a weight.
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass
from pathlib import Path

from slotsmith.errors import SlotsmithError


@dataclass(frozen=True)
class SampleSpec:
    """One sample to make.

    Attributes:
        prompt: The prompt.
        negative_prompt: What to steer away from ("" for none).
        width: Pixels; a multiple of the model's 16 (32 for Wan 2.2 TI2V).
        height: Pixels, likewise.
        frames: 1 (an image) or 4N+1 (a video).
        steps: Denoising steps.
        guidance: Classifier-free guidance scale (1 turns it off).
        seed: Seed of the starting noise.
        flow_shift: The scheduler's timestep shift.
        where: Where the spec came from (``FILE:LINE`` or ``--prompt``), for messages.
    """

    prompt: str
    negative_prompt: str = ""
    width: int = 832
    height: int = 480
    frames: int = 1
    steps: int = 30
    guidance: float = 5.0
    seed: int = 42
    flow_shift: float = 5.0
    where: str = "--prompt"

    def settings(self) -> dict:
        """Everything but the prompt and its origin, for metadata and labels."""
        return {k: v for k, v in dataclasses.asdict(self).items() if k not in ("prompt", "where")}


OVERRIDES = {"w": "width", "h": "height", "f": "frames", "d": "seed", "s": "steps", "g": "guidance",
             "fs": "flow_shift", "n": "negative_prompt"}
"""musubi-tuner's per-line options -> ``SampleSpec`` fields."""

_OPTION = re.compile(r"(?:^|\s)--([A-Za-z]+)(?=\s|$)")


def check_spec(spec: SampleSpec) -> SampleSpec:
    """Refuse settings no model can sample with, naming where they came from.

    Returns:
        ``spec``.

    Raises:
        SlotsmithError: A non-positive size or step count, frames that are
            not 1 or 4N+1, a non-finite or negative guidance, a non-positive
            flow shift, an empty prompt.
    """
    problem = None
    if not spec.prompt.strip():
        problem = "the prompt is empty"
    elif spec.width < 1 or spec.height < 1:
        problem = f"width and height must be positive, got {spec.width}x{spec.height}"
    elif spec.frames < 1 or (spec.frames - 1) % 4:
        problem = f"frames must be 1 or 4N+1 (5, 9, ..., 81), got {spec.frames}"
    elif spec.steps < 1:
        problem = f"steps must be at least 1, got {spec.steps}"
    elif not math.isfinite(spec.guidance) or spec.guidance < 0:
        problem = f"guidance must be a number >= 0, got {spec.guidance}"
    elif not math.isfinite(spec.flow_shift) or spec.flow_shift <= 0:
        problem = f"flow shift must be positive, got {spec.flow_shift}"
    elif not 0 <= spec.seed < 2**63:
        problem = f"seed must be in [0, 2^63), got {spec.seed}"
    if problem:
        raise SlotsmithError(f"{spec.where}: {problem}")
    return spec


def parse_line(line: str, defaults: SampleSpec, where: str) -> SampleSpec:
    """One prompt-file line: the prompt, then optional ``--w``/``--h``/... overrides.

    Args:
        line: The line (no newline).
        defaults: Settings for what the line does not override.
        where: ``FILE:LINE``, for messages.

    Returns:
        The checked spec.

    Raises:
        SlotsmithError: ``FILE:LINE: ...``: an unknown option, a missing or
            malformed value, an option given twice, or a setting no model
            can use.
    """
    marks = list(_OPTION.finditer(line))
    prompt = line[: marks[0].start()] if marks else line
    values: dict[str, object] = {}
    for i, m in enumerate(marks):
        key = m.group(1)
        value = line[m.end() : marks[i + 1].start() if i + 1 < len(marks) else len(line)].strip()
        field = OVERRIDES.get(key)
        if field is None:
            known = " ".join(f"--{k}" for k in OVERRIDES)
            raise SlotsmithError(f"{where}: unknown option --{key} (known: {known})")
        if field in values:
            raise SlotsmithError(f"{where}: --{key} given twice")
        if field == "negative_prompt":
            values[field] = value
            continue
        kind = int if field in ("width", "height", "frames", "seed", "steps") else float
        try:
            values[field] = kind(value)
        except ValueError:
            what = "an integer" if kind is int else "a number"
            shown = repr(value) if value else "nothing"
            raise SlotsmithError(f"{where}: --{key} needs {what}, got {shown}") from None
    return check_spec(dataclasses.replace(defaults, prompt=prompt.strip(), where=where, **values))


def read_prompt_file(path: str | Path, defaults: SampleSpec) -> list[SampleSpec]:
    """Every prompt of a prompt file (see the module docstring).

    Args:
        path: The file.
        defaults: Settings for what a line does not override.

    Returns:
        One spec per prompt line, in order.

    Raises:
        SlotsmithError: Unreadable file, no prompt in it, or a bad line
            (``FILE:LINE: problem``).
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise SlotsmithError(f"{path}: no such file") from None
    except (OSError, UnicodeDecodeError) as e:
        raise SlotsmithError(f"{path}: cannot read the prompt file ({getattr(e, 'strerror', None) or e})") from None
    specs = [
        parse_line(line, defaults, f"{path}:{number}")
        for number, line in enumerate(text.splitlines(), 1)
        if line.strip() and not line.lstrip().startswith("#")
    ]
    if not specs:
        raise SlotsmithError(f"{path}: no prompt in the file (one prompt per line; # starts a comment)")
    return specs
