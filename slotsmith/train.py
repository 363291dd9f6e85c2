"""Training settings: one dataclass, filled from the command line and a YAML file.

Every option of ``slotsmith train`` has a field here under the same name
(dashes become underscores); ``--config train.yaml`` supplies any of them and
the command line wins over the file. Relative paths in the file are relative
to the file's folder (as in a dataset YAML); on the command line, to the
current folder.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from slotsmith.errors import SlotsmithError
from slotsmith.io.files import int_digits, load_yaml, safe_repr
from slotsmith.select import ALGORITHM, ALGORITHMS, NUM_POOLS, check_selection_args

TIMESTEP_SAMPLINGS = ("uniform", "sigmoid", "shift", "logit_normal")
LR_SCHEDULERS = ("constant", "linear", "cosine")
OPTIMIZERS = ("adamw", "adamw8bit", "adafactor")
MIXED_PRECISIONS = ("no", "bf16", "fp16")
EXPERTS = ("high", "low")
CONFIG_CAP = 1_000_000
"""Largest ``--config`` YAML read, in bytes."""

INT_RANGES = {
    "seed": (0, 2**64 - 1),  # what torch.manual_seed accepts
    "steps": (1, 10**9),
    "batch_size": (1, 4096),
    "grad_accum": (1, 65536),
    "warmup_steps": (0, 10**9),
    "save_every": (0, 10**9),
    "sample_every": (0, 10**9),
    "stop_after": (1, 10**9),
    "head_dim": (1, 4096),
}
"""Integer options and their inclusive ranges: checked before anything uses them."""

MAX_EPOCHS = 1e6
"""Most ``--epochs``."""

LOG_TRACKERS = ("jsonl", "tensorboard", "wandb")
PATH_OPTIONS = ("base", "cache", "data", "vae", "t5", "tokenizer", "clip", "out", "log_dir", "sample_prompts")
"""Options naming files or folders: relative ones in a config file are relative to its folder."""


def _option(default=None, help: str = "", **cli) -> object:
    """A settings field that is also an option of ``slotsmith train``.

    Args:
        default: The field's default (and the option's).
        help: The option's ``--help`` text.
        **cli: How the option is spelled beyond ``--field-name``:
            ``aliases`` (more names), ``metavar``, ``choices``, ``show_default``,
            ``flag`` (a bare switch like ``-q``, no ``--no-`` form) and
            ``cli_default`` (the command line's default when it differs, e.g.
            None for "not given" where the field holds "").

    Returns:
        A dataclass field whose metadata the CLI turns into a click option.
    """
    return field(default=default, metadata={"help": help, **cli})


@dataclass
class TrainSettings:
    """Everything one training run needs (see ``slotsmith train --help``).

    Each field is an option of ``slotsmith train`` (the CLI generates them from
    these fields, in this order, with the help in their metadata).
    """

    base: str = _option("", "Wan DiT checkpoint: .safetensors, sharded index or folder.", aliases=("-b",),
                        metavar="CKPT", cli_default=None)
    cache: str = _option("", "Cache folder (latents + text embeddings, see `slotsmith cache`).", metavar="DIR",
                         cli_default=None)
    data: str = _option("", "Dataset YAML (or musubi-tuner dataset TOML) instead of --cache: its cache is used, and "
                        "what is missing is encoded first when --vae, --t5 and --tokenizer are given.", metavar="YAML",
                        cli_default=None)
    vae: str | None = _option(None, "With --data: the Wan VAE (as for `slotsmith cache`).", metavar="PATH")
    t5: str | None = _option(None, "With --data: the UMT5 text encoder.", metavar="PATH")
    tokenizer: str | None = _option(None, "With --data: the tokenizer folder.", metavar="DIR")
    i2v: bool = _option(False, "With --data: image-to-video, cache each clip's first-frame conditioning too (as "
                        "`slotsmith cache --i2v`); see docs/i2v.md.")
    clip: str | None = _option(None, "With --data: CLIP vision encoder folder for Wan 2.1 I2V's image features "
                               "(implies --i2v).", metavar="DIR")
    skip_bad: bool = _option(False, "With --data: leave bad items out, as `slotsmith cache --skip-bad` does.")
    no_reuse_musubi: bool = _option(False, "With --data: encode everything, even what musubi-tuner's cache files "
                                    "hold, as `slotsmith cache --no-reuse-musubi` does.")
    out: str = _option("", "The .slot file to write.", aliases=("--output", "-o"), metavar="FILE", cli_default=None)
    ff: float | None = _option(None, "Fraction of the model's parameters, as in `plan`.")
    ffid: int | None = _option(None, "Pool id 0..POOLS-1 (0..7 for v2), as in `plan`.")
    algorithm: str = _option(
        ALGORITHM, "Selection: v2 (whole tensors, as the original --ff/--ffid) or v3 (the same share of every "
        "tensor's rows; see docs/selection-v3.md).", choices=tuple(ALGORITHMS), show_default=True)
    pools: int = _option(NUM_POOLS, "v3: number of disjoint pools N (2..256); --ff can reach 1/N. v2 always has 8.",
                         show_default=True)
    steps: int | None = _option(None, "Optimizer steps (or give --epochs).")
    epochs: float | None = _option(None, "Passes over the cache (or give --steps).")
    lr: float = _option(2e-5, "Peak learning rate.", show_default=True)
    lr_scheduler: str = _option("constant", choices=LR_SCHEDULERS, show_default=True)
    warmup_steps: int = _option(0, show_default=True)
    batch_size: int | None = _option(
        None, "Samples per process [default: the dataset YAML's batch_size, else 1]. With several latent shapes "
        "(buckets, clip lengths) each batch is drawn from one shape.")
    grad_accum: int = _option(1, show_default=True)
    optimizer: str = _option("adamw", choices=OPTIMIZERS, show_default=True)
    weight_decay: float = _option(0.0, show_default=True)
    max_grad_norm: float = _option(1.0, "0 disables.", show_default=True)
    mixed_precision: str = _option("no", choices=MIXED_PRECISIONS, show_default=True)
    gradient_checkpointing: bool = _option(False)
    offload_blocks: int = _option(
        0, "Keep the last N blocks in CPU memory, brought to the device for their forward (musubi-tuner's "
        "--blocks_to_swap N); the flag alone: every block, one on the device at a time. [default: 0, none]",
        metavar="[N]", flag_value=-1)
    fp8_base: bool = _option(False, "Store frozen weights in float8, compute in bf16 (slot stays full precision).")
    attention: str | None = _option(
        None, "Attention backend among those diffusers offers on this machine (native, flex, flash, sage, xformers "
        "...; an unusable one is refused with the list) [default: DIFFUSERS_ATTN_BACKEND, else native].",
        metavar="NAME")
    compile: bool = _option(False, "torch.compile each transformer block (slower start, faster steps).")
    seed: int = _option(42, show_default=True)
    timestep_sampling: str = _option("shift", choices=TIMESTEP_SAMPLINGS, show_default=True)
    flow_shift: float = _option(3.0, show_default=True)
    sigmoid_scale: float = _option(1.0, show_default=True)
    logit_mean: float = _option(0.0, show_default=True)
    logit_std: float = _option(1.0, show_default=True)
    min_timestep: float = _option(0.0, "0..1000.", show_default=True)
    max_timestep: float = _option(1000.0, "0..1000.", show_default=True)
    expert: str | None = _option(
        None, "Wan 2.2 A14B: train the high- or low-noise expert. The timestep boundary is that of the known "
        "Wan 2.2 layout the base's shapes match (0.875 for T2V, which a Wan 2.1 T2V 14B base matches too; 0.9 for "
        "I2V), else give --boundary.", choices=EXPERTS)
    boundary: float | None = _option(None, "Expert boundary in (0, 1), instead of the layout's.")
    head_dim: int | None = _option(None, "Attention head size (default: config.json, metadata, or 128).")
    save_every: int = _option(
        0, "Every N steps (0: off), a resumable state and a snapshot slot as OUT-stepN.snapshot (`verify` and "
        "`splice` take it when named; folder walks skip it).", show_default=True)
    stop_after: int | None = _option(None, "Stop after N steps of this run, keeping a resumable state.")
    resume: bool = _option(False, "Continue from OUT.state.")
    log_dir: str | None = _option(
        None, "Log the run into a folder of its own under DIR (OUT's name and the time, or --log-name), with its "
        "settings.json and what --log-with writes.", metavar="DIR")
    log_with: str | None = _option(
        None, "Comma-separated trackers: jsonl (train_log.jsonl), tensorboard, wandb [default with --log-dir: jsonl].",
        metavar="LIST")
    log_name: str | None = _option(None, "The run's folder under --log-dir, instead of OUT's name and the time.",
                                   metavar="NAME")
    sample_prompts: str | None = _option(
        None, "Sample these prompts (a `slotsmith sample --prompts` file) at the start, every --sample-every steps "
        "and at the end, into OUT.samples/stepNNNNNN/; needs --vae, --t5 and --tokenizer.", metavar="FILE")
    sample_every: int = _option(0, "With --sample-prompts: every N steps (0: only at the start and the end).",
                                show_default=True)
    force: bool = _option(False, "Replace OUT; skip the taken-ffid check.")
    quiet: bool = _option(False, "No progress (a bar on a terminal, lines in a log otherwise).", aliases=("-q",),
                          flag=True)

    def to_json(self) -> dict:
        """The settings as a JSON-able dict (for provenance and the resume check)."""
        return asdict(self)

    def validate(self) -> None:
        """Refuse impossible combinations before anything is loaded.

        Raises:
            SlotsmithError: Names the offending option.
        """
        for name in ("base", "out", "ff", "ffid"):
            if getattr(self, name) in ("", None):
                raise SlotsmithError(f"--{name} is required")
        for f in fields(self):
            value = getattr(self, f.name)
            # NaN passes every range check below (each comparison is false), so refuse it first.
            if f.type.startswith("float") and value is not None and not math.isfinite(value):
                raise SlotsmithError(f"--{f.name.replace('_', '-')} {value} must be a finite number")
        for name, (low, high) in INT_RANGES.items():
            value = getattr(self, name)
            if value is not None and not low <= value <= high:
                shown = value if int_digits(value) <= 30 else f"of about {int_digits(value)} digits"
                raise SlotsmithError(f"--{name.replace('_', '-')} {shown} is out of range ({low}..{high})")
        if self.epochs is not None and self.epochs > MAX_EPOCHS:
            raise SlotsmithError(f"--epochs {self.epochs} is out of range (at most {MAX_EPOCHS:g})")
        if bool(self.cache) == bool(self.data):
            raise SlotsmithError("give exactly one of --cache (a cache folder) and --data (a dataset YAML)")
        if not self.data and not self.sample_prompts and (self.vae or self.t5 or self.tokenizer):
            raise SlotsmithError(
                "--vae, --t5 and --tokenizer go with --data (they encode what is not cached yet) or --sample-prompts"
            )
        if self.sample_prompts and not (self.vae and self.t5 and self.tokenizer):
            raise SlotsmithError("--sample-prompts needs --vae, --t5 and --tokenizer (to encode prompts and decode samples)")
        if self.sample_every and not self.sample_prompts:
            raise SlotsmithError("--sample-every goes with --sample-prompts FILE")
        if not self.data and (self.i2v or self.clip):
            raise SlotsmithError(
                "--i2v and --clip go with --data (they say how to cache; a --cache folder has its conditioning)"
            )
        if not self.data and self.skip_bad:
            raise SlotsmithError("--skip-bad goes with --data (a --cache folder holds only the items it was made of)")
        if not self.data and self.no_reuse_musubi:
            raise SlotsmithError("--no-reuse-musubi goes with --data (it says how to cache; a --cache folder is made)")
        check_selection_args(self.algorithm, self.ff, self.ffid, self.pools)
        if (self.steps is None) == (self.epochs is None):
            raise SlotsmithError("give exactly one of --steps and --epochs")
        if self.steps is not None and self.steps < 1 or self.epochs is not None and not self.epochs > 0:
            raise SlotsmithError("--steps / --epochs must be positive")
        _choice("timestep-sampling", self.timestep_sampling, TIMESTEP_SAMPLINGS)
        _choice("lr-scheduler", self.lr_scheduler, LR_SCHEDULERS)
        _choice("optimizer", self.optimizer, OPTIMIZERS)
        _choice("mixed-precision", self.mixed_precision, MIXED_PRECISIONS)
        if self.expert is not None:
            _choice("expert", self.expert, EXPERTS)
        # The flags spelled out: the messages stay findable in the code (docs/troubleshooting.md is checked against it).
        for name, flag in (("batch_size", "--batch-size"), ("grad_accum", "--grad-accum")):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise SlotsmithError(f"{flag} must be at least 1")
        for name, flag in (("warmup_steps", "--warmup-steps"), ("save_every", "--save-every"),
                           ("sample_every", "--sample-every")):
            if getattr(self, name) < 0:
                raise SlotsmithError(f"{flag} must not be negative")
        if not self.lr > 0:
            raise SlotsmithError(f"--lr {self.lr} must be a positive number")
        if not 0 <= self.min_timestep < self.max_timestep <= 1000:
            raise SlotsmithError("need 0 <= --min-timestep < --max-timestep <= 1000")
        if self.boundary is not None and not 0 < self.boundary < 1:
            raise SlotsmithError(f"--boundary {self.boundary} must be in (0, 1)")
        if self.flow_shift <= 0:
            raise SlotsmithError("--flow-shift must be positive")
        if self.offload_blocks < -1:
            raise SlotsmithError("--offload-blocks N must be 0 or more (the flag alone: every block)")
        if self.stop_after is not None and self.stop_after < 1:
            raise SlotsmithError("--stop-after must be at least 1")
        if self.head_dim is not None and self.head_dim < 1:
            raise SlotsmithError("--head-dim must be positive")
        if (self.log_with or self.log_name) and not self.log_dir:
            raise SlotsmithError("--log-with and --log-name go with --log-dir (the folder the run's logs go under)")
        for kind in (self.log_with or "").split(","):
            if kind.strip():
                _choice("log-with", kind.strip(), LOG_TRACKERS)
        if self.log_name is not None and (not self.log_name or Path(self.log_name).name != self.log_name):
            raise SlotsmithError(f"--log-name {self.log_name!r} must be a plain folder name")


def _choice(option: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise SlotsmithError(f"--{option} {value!r} is not one of {', '.join(allowed)}")


MUSUBI_OPTIONS = {
    "dit": "base",
    "dataset_config": "data",
    "text_encoder": "t5",
    "t5": "t5",
    "vae": "vae",
    "output_dir": "out",
    "output_name": "out",
    "max_train_steps": "steps",
    "max_train_epochs": "epochs",
    "learning_rate": "lr",
    "lr_warmup_steps": "warmup_steps",
    "train_batch_size": "batch_size",
    "gradient_accumulation_steps": "grad_accum",
    "optimizer_type": "optimizer",
    "discrete_flow_shift": "flow_shift",
    "save_every_n_steps": "save_every",
    "logging_dir": "log_dir",
    "blocks_to_swap": "offload_blocks",
    "sdpa": "attention",
    "flash_attn": "attention",
    "sage_attn": "attention",
    "xformers": "attention",
    "compile": "compile",
}
"""musubi-tuner's training option names and the slotsmith option each maps to (see docs/musubi.md)."""

MUSUBI_NO_EQUIVALENT = {
    "network_module": "a slot is a full fine-tune of the model's own tensors, not a LoRA: choose its size with ff",
    "network_dim": "a slot has no rank: its size is ff, the fraction of the model's parameters",
    "network_alpha": "a slot has no LoRA alpha: its learning rate is lr",
    "network_args": "a slot has no LoRA arguments: see `slotsmith plan` for what ff and ffid select",
    "sample_prompts": "slotsmith train makes no samples: splice the slot and sample with your usual pipeline",
    "sample_every_n_steps": "slotsmith train makes no samples: save_every writes snapshot slots to sample from",
    "save_every_n_epochs": "give save_every in steps",
    "task": "the model is read from the base checkpoint's own shapes",
}
"""musubi-tuner options slotsmith has no counterpart for, with what to do instead."""


def unknown_option_hint(key: str, known: list[str], flags: bool = False) -> str:
    """How to spell an unknown option: its musubi-tuner counterpart, or the nearest known name.

    Args:
        key: The unknown name (a config key, or a command-line flag without its dashes).
        known: The names there are.
        flags: Word the hint as command-line flags (``--max-train-steps``) rather than config keys.

    Returns:
        The hint, e.g. ``musubi-tuner's max_train_steps is steps here``.
    """
    import difflib

    def spell(name: str) -> str:
        return "--" + name.replace("_", "-") if flags else name

    def theirs(name: str) -> str:  # musubi-tuner's flags keep their underscores
        return "--" + name if flags else name

    name = key.replace("-", "_")
    if name in MUSUBI_NO_EQUIVALENT:
        return f"musubi-tuner's {theirs(name)} has no counterpart here: {MUSUBI_NO_EQUIVALENT[name]}"
    if name in MUSUBI_OPTIONS:
        return f"musubi-tuner's {theirs(name)} is {spell(MUSUBI_OPTIONS[name])} here"
    near = difflib.get_close_matches(name, [*known, *MUSUBI_OPTIONS], n=1, cutoff=0.6)
    if not near:
        return "see `slotsmith train --help` for the options"
    if near[0] in MUSUBI_OPTIONS:
        return f"did you mean {spell(MUSUBI_OPTIONS[near[0]])!r}? (musubi-tuner's {theirs(near[0])})"
    return f"did you mean {spell(near[0])!r}?"


def _yaml_settings(path: Path) -> dict:
    doc = load_yaml(path, CONFIG_CAP, "training config")
    if doc is None:
        return {}
    if not isinstance(doc, dict):
        raise SlotsmithError(f"{path}: a training config must be a mapping of option: value")
    known = [f.name for f in fields(TrainSettings)]
    out, unknown = {}, []
    for key, value in doc.items():
        name = str(key).replace("-", "_")
        if name in known:
            out[name] = value
        else:
            unknown.append(f"{safe_repr(key)} ({unknown_option_hint(str(key), known)})")
    # Every one at once, on one line: a config ported from elsewhere often has several.
    if len(unknown) == 1:
        raise SlotsmithError(f"{path}: unknown option {unknown[0]}")
    if unknown:
        raise SlotsmithError(f"{path}: {len(unknown)} unknown options: {'; '.join(unknown)}")
    return out


_TYPE_WORDS = {"bool": "true or false", "int": "a whole number", "float": "a number", "str": "text"}


def _number(value):
    """A YAML scalar as a number: PyYAML (YAML 1.1) leaves ``2e-5`` and ``"1"`` as strings."""
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return value
    if isinstance(value, str):
        text = value.strip().replace("_", "")
        for parse in (int, float):
            try:
                return parse(text)
            except ValueError:
                pass
    return None


def _coerce(name: str, value, path: Path):
    """A YAML value as the field's type, accepting the forms YAML users write (``2e-5``, ``"1"``, ``100.0``).

    Raises:
        SlotsmithError: The value is not of the type, named in words.
    """
    kind = {f.name: f.type for f in fields(TrainSettings)}[name]
    base = kind.split(" | ")[0]
    if value is None:
        if "None" in kind:
            return None
        raise SlotsmithError(f"{path}: option {name!r} cannot be empty (it wants {_TYPE_WORDS[base]})")
    result = None
    if name == "offload_blocks" and isinstance(value, bool):
        return -1 if value else 0  # the switch it was before it took a count: true meant every block
    if base == "bool":
        result = value if isinstance(value, bool) else None
    elif base == "int":
        number = _number(value)
        # 2.0 and "1e3" are whole numbers; 2.5 is not, and rounding it would be a guess.
        if isinstance(number, int) or isinstance(number, float) and number.is_integer():
            result = int(number)
    elif base == "float":
        number = _number(value)
        result = None if number is None else float(number)
    elif isinstance(value, (str, int, float)) and not isinstance(value, bool):
        result = str(value)
    if result is None:
        raise SlotsmithError(f"{path}: option {name!r} wants {_TYPE_WORDS[base]}, got {safe_repr(value)}")
    return result


def _same(name: str, a, b) -> bool:
    """Whether two values of one setting agree (paths by the file they name)."""
    if name in PATH_OPTIONS and a and b:
        return Path(a).resolve() == Path(b).resolve()
    return a == b


def load_settings(
    cli_values: dict, explicit: set[str], config: str | None, fixed: tuple[str, dict] | None = None
) -> TrainSettings:
    """Merge defaults, a YAML config and the command line (which wins).

    Args:
        cli_values: Field name -> value as the CLI parsed it (defaults included).
        explicit: Field names the user gave on the command line.
        config: Path of the YAML config, or None. Relative paths in it
            (``PATH_OPTIONS``) are taken relative to its folder.
        fixed: ``(source, values)``: settings that another file (a cast)
            fixes; the config and the command line may repeat them, never
            contradict them.

    Returns:
        The validated settings.

    Raises:
        SlotsmithError: Bad YAML, unknown or mistyped option, a contradiction
            of ``fixed``, invalid settings.
    """
    merged = {}
    if config:
        path = Path(config)
        merged = {n: _coerce(n, v, path) for n, v in _yaml_settings(path).items()}
        for name in PATH_OPTIONS:
            if merged.get(name):  # None and "" mean "not given"; an absolute path stays as it is
                merged[name] = str(path.parent / merged[name])
    from_config = set(merged)
    for name, value in cli_values.items():
        if name in explicit or name not in merged:
            merged[name] = value
    if fixed is not None:
        source, values = fixed
        given = {n: v for n, v in merged.items() if n in explicit or n in from_config}
        for name, value in values.items():
            if name in given and not _same(name, given[name], value):
                says = "none" if value is None else value
                option = f"--{name.replace('_', '-')} {given[name]}"
                raise SlotsmithError(f"{option} contradicts {source}, which says {says}")
            merged[name] = value
    settings = TrainSettings(**merged)
    settings.validate()
    return settings
