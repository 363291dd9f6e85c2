"""The ``slotsmith`` command line: thin click commands over the library.

Every command imports its library modules inside its body, so starting the
CLI loads only click and the training options' defaults. Light commands
(plan, inspect, splice, extract, verify) never import torch; the trainer's
commands import their heavy modules under ``training_extra`` (so a light
install without them says which extra to install).
Every command turns a ``SlotsmithError`` into ``error:`` lines (one per line
of its message) and exit 1.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import signal
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import click
from click.core import ParameterSource

from slotsmith import __version__
from slotsmith.errors import SlotsmithError, printable
from slotsmith.train import EXPERTS, MIXED_PRECISIONS, TrainSettings, load_settings, unknown_option_hint


class Terminated(KeyboardInterrupt):
    """SIGTERM (a job scheduler, ``docker stop``), raised where the process is so that
    every cleanup runs as for Ctrl-C: no temp file outlives the process."""


def _raise_terminated(signum, frame) -> None:
    raise Terminated


def user_errors(fn):
    """Run a command body, turning user errors into ``error:`` lines on stderr and exit 1.

    Ctrl-C exits 130 and SIGTERM 143 (128 + the signal), both after the same cleanup.
    """

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            previous = signal.signal(signal.SIGTERM, _raise_terminated)
        except ValueError:  # not the main thread (an embedding program): leave signals alone
            previous = None
        try:
            return fn(*args, **kwargs)
        except SlotsmithError as e:
            for line in str(e).splitlines() or [""]:
                click.echo(f"error: {printable(line)}", err=True)
            sys.exit(1)
        except Terminated:
            click.echo("terminated", err=True)
            sys.exit(128 + signal.SIGTERM)
        except KeyboardInterrupt:
            click.echo("interrupted", err=True)
            sys.exit(130)
        finally:
            if previous is not None:
                signal.signal(signal.SIGTERM, previous)

    return wrapper


@contextmanager
def training_extra(command: str) -> Iterator[None]:
    """Import a heavy command's modules; without the training extra, say how to get it.

    Raises:
        SlotsmithError: A dependency of the training extra is not installed.
    """
    try:
        yield
    except ModuleNotFoundError as e:
        if (e.name or "").partition(".")[0] == "slotsmith":
            raise  # our own module missing is a bug, not a light install
        raise SlotsmithError(f"slotsmith {command} needs the training extra: pip install 'slotsmith[train]'") from None


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="slotsmith")
def main() -> None:
    """Fine-tune disjoint slots of a Wan video DiT and splice them together.

    A slot is a deterministic set of the model's own tensors, chosen by --ff
    (fraction of the model) and --ffid (one of 8 disjoint pools). Slots of
    different ffids never share a tensor, so they can be trained apart and
    spliced into one checkpoint. --algorithm v3 --pools N slices instead: the
    same rows' share of every tensor, up to 256 pools.
    """


def _algorithm_options(default: str = "v2"):
    """``--algorithm`` and ``--pools``: which selection picks the slot (``default`` unless given)."""

    def decorate(fn):
        fn = click.option(
            "--pools", type=click.IntRange(2, 256), default=8, show_default=True,
            help="v3: number of disjoint pools N (2..256); ff can reach 1/N. v2 always has 8.",
        )(fn)
        return click.option(
            "--algorithm", type=click.Choice(["v2", "v3"]), default=default, show_default=True,
            help="v2: whole tensors, as the original --ff/--ffid (musubi-tuner). v3: the same fraction of every "
            "tensor's rows, exact budget, up to 256 pools (docs/selection-v3.md).",
        )(fn)

    return decorate


@main.command()
@click.option(
    "--model",
    "-m",
    metavar="MODEL",
    help="A shipped layout name (e.g. wan2.2-t2v-a14b), a layout YAML, or a checkpoint "
    "(.safetensors, sharded *.index.json, or a folder).",
)
@click.option("--ff", type=float,
              help="Fraction of the model's parameters: in (0, 1] for v2, in (0, 1/POOLS] for v3.")
@click.option(
    "--ffid",
    type=int,
    multiple=True,
    help="Pool id 0..POOLS-1 (0..7 for v2). Repeat to compare several slots and get an overlap table.",
)
@_algorithm_options()
@click.option("--cast", "cast_file", metavar="CAST.yaml",
              help="Plan a cast file's characters instead of --model/--ff/--ffid.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of the report.")
@user_errors
def plan(
    model: str | None, ff: float | None, ffid: tuple[int, ...], algorithm: str, pools: int, cast_file: str | None,
    as_json: bool,
) -> None:
    """Show exactly which tensors (v3: which rows of them) --ff/--ffid select on MODEL.

    With --cast, the allocation table of a cast file: per character its ffid,
    ff, parameters and blocks covered; the free ffids; overlaps; warnings.

    \b
    Examples:
      slotsmith plan -m wan2.2-t2v-a14b --ff 0.01 --ffid 2
      slotsmith plan -m dit.safetensors --ff 0.01 --ffid 1 --ffid 2 --json
      slotsmith plan -m wan2.2-t2v-a14b --algorithm v3 --pools 16 --ff 0.01 --ffid 0 --ffid 15
      slotsmith plan --cast manifests/cast.yaml
    """
    if cast_file is not None:
        if model or ff is not None or ffid:
            raise click.UsageError("--cast takes the model, ff and ffids from the cast file: give none of them")
        from slotsmith.cast import cast_plan_json, load_cast, render_cast_plan

        doc = cast_plan_json(load_cast(cast_file))
        click.echo(json.dumps(doc, indent=2) if as_json else render_cast_plan(doc), nl=as_json)
        return
    if not model or ff is None or not ffid:
        raise click.UsageError("give --model, --ff and at least one --ffid (or --cast)")
    from slotsmith.inventory import load_inventory
    from slotsmith.plan import plan_json, render_plan
    from slotsmith.select import select

    inventory = load_inventory(model)
    shapes = {n: t.shape for n, t in inventory.tensors.items()}
    selections = [select(shapes, ff, k, algorithm, pools) for k in ffid]
    if as_json:
        docs = [plan_json(inventory, s) for s in selections]
        click.echo(json.dumps(docs[0] if len(docs) == 1 else docs, indent=2))
    else:
        click.echo(render_plan(inventory, selections))


def _strength_given(arg: str) -> bool:
    """Whether a command-line slot is written ``FILE:S`` (a bad S counts: it was meant as one)."""
    from slotsmith.slotspec import parse_slot_spec

    try:
        return parse_slot_spec(arg).strength != 1.0
    except SlotsmithError:
        return True


@main.command()
@click.argument("base", required=False, type=click.Path(path_type=str))
@click.argument("slots", nargs=-1, type=click.Path(path_type=str))
@click.option(
    "--out",
    "--output",
    "-o",
    "out",
    metavar="OUT",
    help="Output file (a folder for a sharded base). Default: BASE+SLOT1+... in the current folder "
    "(with --cast: the cast's output).",
)
@click.option("--cast", "cast_file", metavar="CAST.yaml", help="Splice a cast file's pinned slots into its base "
              "(instead of BASE and SLOTS).")
@click.option("--seal", is_flag=True, help="Record every output tensor's digest, so `verify` detects a byte "
              "changed anywhere without the base (reads the base once more).")
@click.option("--force", is_flag=True, help="Overwrite an existing OUT.")
@click.option("--quiet", "-q", is_flag=True, help="No progress (a bar on a terminal, lines in a log otherwise).")
@user_errors
def splice(
    base: str | None, slots: tuple[str, ...], out: str | None, cast_file: str | None, seal: bool, force: bool,
    quiet: bool,
) -> None:
    """Splice disjoint SLOTS into BASE, giving one ordinary checkpoint.

    Every check runs before a byte is written: slot structure and manifest
    digest, every slot tensor's hash, the base fingerprint (a slot made on
    another base, e.g. the other Wan 2.2 expert, is refused), disjointness,
    shapes and dtypes. The output keeps BASE's key convention, dtypes, files
    and metadata, and records the splice in its metadata.

    A SLOT written X.slot:S is applied at strength S in [0, 2]: base + S *
    (slot - base) on its tensors, computed as `sample --slot X.slot:S` does
    (default 1: exactly the slot's bytes); the strength and the blended
    tensors' digests are recorded for `verify`.

    With --cast, the base, the slots and the output come from a cast file;
    a slot whose manifest differs from its pin is refused.

    \b
    Examples:
      slotsmith splice wan2.2_low.safetensors char1.slot char2.slot -o spliced.safetensors
      slotsmith splice base_folder/ char1.slot -o spliced_folder
      slotsmith splice wan2.2_low.safetensors char1.slot:0.7 char2.slot
      slotsmith splice --cast manifests/cast.yaml --seal
    """
    from slotsmith.cast import STRENGTH_IN_CAST
    from slotsmith.slotspec import parse_slot_spec
    from slotsmith.splice import splice as run_splice
    from slotsmith.splice import splice_cast

    if cast_file is not None:
        if any(_strength_given(a) for a in (base, *slots) if a is not None):
            raise SlotsmithError(STRENGTH_IN_CAST)
        if base is not None:
            raise click.UsageError("--cast takes the base and the slots from the cast file: give neither")
        path = splice_cast(cast_file, out, force=force, quiet=quiet, seal=seal)
    else:
        if base is None or not slots:
            raise click.UsageError("give BASE and at least one SLOT (or --cast)")
        path = run_splice(base, [parse_slot_spec(s) for s in slots], out, force=force, quiet=quiet, seal=seal)
    if not quiet:
        click.echo(f"wrote {path}", err=True)


@main.command()
@click.argument("base", type=click.Path(path_type=str))
@click.argument("tuned", type=click.Path(path_type=str))
@click.option("--out", "--output", "-o", "out", required=True, metavar="X.slot", help="The slot file to write.")
@click.option("--ff", type=float, default=None, help="With --ffid: refuse changes outside this selection.")
@click.option("--ffid", type=int, default=None, help="Pool id of the selection (with --ff).")
@_algorithm_options()
@click.option("--expert", type=click.Choice(EXPERTS), help="Wan 2.2 expert the slot is for, recorded in the manifest.")
@click.option("--force", is_flag=True, help="Overwrite an existing output.")
@click.option("--quiet", "-q", is_flag=True, help="No progress (a bar on a terminal, lines in a log otherwise).")
@user_errors
def extract(
    base: str,
    tuned: str,
    out: str,
    ff: float | None,
    ffid: int | None,
    algorithm: str,
    pools: int,
    expert: str | None,
    force: bool,
    quiet: bool,
) -> None:
    """Make a slot of what differs between BASE and TUNED: per tensor, its changed rows.

    Each changed tensor is recorded from its first changed row to its last
    (whole when that is all of it; with a v2 --ff/--ffid, always whole).

    \b
    Examples:
      slotsmith extract base.safetensors finetuned.safetensors -o char1.slot
      slotsmith extract base.safetensors finetuned.safetensors -o char1.slot --ff 0.01 --ffid 2
      slotsmith extract base.safetensors finetuned.safetensors -o c.slot --algorithm v3 --pools 16 --ff 0.01 --ffid 9
    """
    from slotsmith.splice import extract as run_extract

    manifest = run_extract(
        base, tuned, out, ff=ff, ffid=ffid, algorithm=algorithm, pools=pools, expert=expert, force=force, quiet=quiet
    )
    if not quiet:
        click.echo(f"wrote {out}: {len(manifest.entries)} tensor(s), {manifest.nbytes:,} bytes", err=True)


@main.command()
@click.argument("file", type=click.Path(path_type=str))
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.option("--yaml", "as_yaml", is_flag=True, help="Print YAML (e.g. a slot manifest to commit to git).")
@click.option("--strict", is_flag=True, help="Exit 1 when what is shown does not check out (see the warnings).")
@user_errors
def inspect(file: str, as_json: bool, as_yaml: bool, strict: bool) -> None:
    """Show a slot's manifest, a spliced checkpoint's record, or a checkpoint summary.

    FILE is a .slot, a .safetensors file, a sharded *.index.json, or a folder.
    What does not check out (a slot's tensor bytes against its manifest, its
    shapes against the model it names, a splice record's slots and their
    bytes) is said in warning lines on stderr; `slotsmith verify` runs every check.
    """
    from slotsmith.inspection import describe, render, to_yaml, warning_lines

    if as_json and as_yaml:
        raise click.UsageError("give --json or --yaml, not both")
    doc = describe(file)
    if as_json:
        click.echo(json.dumps(doc, indent=2))
    elif as_yaml:
        click.echo(to_yaml(doc), nl=False)
    else:
        click.echo(render(doc))
    for line in warning_lines(doc):
        click.echo(line, err=True)
    if strict and doc["warnings"]:
        sys.exit(1)


@main.command()
@click.argument("paths", nargs=-1, metavar="[PATH]...", type=click.Path(exists=True, path_type=str))
@click.option(
    "--base",
    metavar="BASE",
    type=click.Path(exists=True, path_type=str),
    help="The real base checkpoint: check every slot's base fingerprint and every spliced "
    "checkpoint's other bytes against it.",
)
@click.option("--cast", "cast_file", metavar="CAST.yaml", help="Verify what a cast file names: its slots against "
              "their pins, its allocations, its output (instead of PATHs).")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@click.option("--quiet", "-q", is_flag=True, help="No progress (bar or log lines); print only failed checks and the summary.")
@user_errors
def verify(paths: tuple[str, ...], base: str | None, cast_file: str | None, as_json: bool, quiet: bool) -> None:
    """Check slots and spliced checkpoints; exit 1 if any check fails (for CI).

    With no PATH, verifies every .slot file and every spliced checkpoint under
    the current folder (hidden folders skipped). Checks: each slot's structure,
    manifest digest and tensor hashes; that its selection recomputes to its
    tensors; that slots claiming one base are disjoint and agree on it; each
    spliced checkpoint's record, slot bytes and (sealed) every tensor's bytes,
    and that it holds the versions of the slots checked alongside. With
    --base: every slot's base fingerprint, and every spliced checkpoint byte
    outside its slots; a slot spliced at a strength (FILE:S) has its blend
    recomputed from --base and the slot file, when that file is given too.

    With --cast: every character's slot present and equal to its pin, its
    selection the cast's, the allocations disjoint, the output (when built)
    holding exactly the pinned slots; with --base, the base's fingerprint too.

    \b
    Examples:
      slotsmith verify
      slotsmith verify slots/ --base wan2.2_low.safetensors --json
      slotsmith verify --cast manifests/cast.yaml
    """
    from slotsmith.verify import render, verify_cast
    from slotsmith.verify import verify as run_verify

    if cast_file is not None and paths:
        raise click.UsageError("--cast names the files to verify: give no PATH")
    if cast_file is not None:
        report = verify_cast(cast_file, base, quiet=quiet)
    else:
        report = run_verify(paths, base, quiet=quiet)
    if as_json:
        click.echo(json.dumps(report.to_json(), indent=2))
    else:
        click.echo(render(report, failures_only=quiet))
    if not report.ok:
        sys.exit(1)


@main.group()
def cast() -> None:
    """Work on a cast file: who holds which slot of which base (see docs/cast.md)."""


@cast.command("pin")
@click.argument("file", type=click.Path(path_type=str))
@click.option("--base", metavar="BASE", type=click.Path(exists=True, path_type=str),
              help="The base checkpoint, instead of the cast's base.path.")
@click.option("--dry-run", is_flag=True, help="Show what would change; write nothing.")
@user_errors
def cast_pin(file: str, base: str | None, dry_run: bool) -> None:
    """Pin every character of the cast FILE to its current slot's manifest digest.

    Each slot must be present and be what the cast says (selection, layout,
    expert). An empty base fingerprint is filled in (from the base when it
    is present). FILE is replaced atomically, changed only where the values
    are: comments and order are kept.

    \b
    Example:
      slotsmith cast pin manifests/cast.yaml
    """
    from slotsmith.cast import pin_cast

    changes = pin_cast(file, base=base, dry_run=dry_run)
    for ch in changes:
        click.echo(f"{'would set' if dry_run else 'set'} {ch.key}: {ch.old or 'null'} -> {ch.new}")
    if not changes:
        click.echo(f"{file}: every character is pinned to its current slot already")


_CLICK_TYPES = {"int": int, "float": float, "str": str}


def _settings_option(f: dataclasses.Field):
    """The click option of one ``TrainSettings`` field (its name, type, default and help from the field)."""
    meta = f.metadata
    flag = "--" + f.name.replace("_", "-")
    kind = f.type.split(" | ")[0]
    kwargs = {"help": meta.get("help") or None, "default": meta.get("cli_default", f.default)}
    if kind == "bool":
        names = [flag, *meta.get("aliases", ())] if meta.get("flag") else [f"{flag}/--no-{flag[2:]}"]
        return click.option(*names, f.name, is_flag=True, **kwargs)
    if "choices" in meta:
        kwargs["type"] = click.Choice(meta["choices"])
    else:
        kwargs["type"] = _CLICK_TYPES[kind]
    if "metavar" in meta:
        kwargs["metavar"] = meta["metavar"]
    if "flag_value" in meta:  # an optional value: the option alone means flag_value
        kwargs.update(is_flag=False, flag_value=meta["flag_value"])
    return click.option(flag, *meta.get("aliases", ()), f.name, show_default=meta.get("show_default", False), **kwargs)


def _train_options(fn):
    """The options of ``train``: one per ``TrainSettings`` field, in field order, then ``--config``."""
    opts = [_settings_option(f) for f in dataclasses.fields(TrainSettings)]
    opts.append(
        click.option("--config", "config", metavar="YAML", help="Options from a YAML file; the command line wins. "
                     "Relative paths in the file are relative to its folder.")
    )
    for opt in reversed(opts):
        fn = opt(fn)
    return fn


class _TrainCommand(click.Command):
    """``train``, whose unknown options get a hint (musubi-tuner's names are mapped to ours)."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        try:
            return super().parse_args(ctx, args)
        except click.NoSuchOption as e:
            known = [f.name for f in dataclasses.fields(TrainSettings)]
            hint = unknown_option_hint(e.option_name.lstrip("-"), known, flags=True)
            raise click.NoSuchOption(e.option_name, f"No such option: {e.option_name} ({hint})", ctx=ctx) from None


@main.command(cls=_TrainCommand)
@_train_options
@click.option("--cast", "cast_file", metavar="CAST.yaml", help="Take --base, --out, --ff, --ffid and --expert "
              "from a cast file (with --character); contradicting them is refused.")
@click.option("--character", metavar="NAME", help="The cast's character to train (with --cast).")
@click.pass_context
@user_errors
def train(ctx: click.Context, config: str | None, cast_file: str | None, character: str | None, **options) -> None:
    """Fine-tune one slot of a Wan DiT; write only the slot.

    Trains on a cache folder (--cache, made by `slotsmith cache`) or on a
    dataset YAML (--data): with --vae, --t5 and --tokenizer, what its cache
    is missing is encoded first; without them, its cache must be complete.
    Everything outside the slot stays frozen; the written .slot holds the
    trained tensors in the base's dtype, with a manifest. Runs unchanged under
    `accelerate launch` (data parallel; only the main process writes).

    \b
    Examples:
      slotsmith train -b dit.safetensors --cache cache/ --ff 0.01 --ffid 1 --steps 2000 -o char1.slot
      slotsmith train -b dit.safetensors --data data.yaml --vae Wan2.1_VAE.pth \\
        --t5 models_t5_umt5-xxl-enc-bf16.pth --tokenizer umt5-xxl/ --ff 0.01 --ffid 2 --epochs 10 -o char2.slot
      slotsmith train --config train.yaml --resume
      slotsmith train --cast manifests/cast.yaml --character alice --cache cache/ --steps 2000
    """
    fixed = None
    if (cast_file is None) != (character is None):
        raise click.UsageError("give --cast and --character together")
    if cast_file is not None:
        from slotsmith.cast import train_values

        fixed = (f"the cast {cast_file} (character {character!r})", train_values(cast_file, character))
    with training_extra("train"):
        from slotsmith.training.run import summary
        from slotsmith.training.run import train as run_training

    explicit = {
        name for name in options if ctx.get_parameter_source(name) in (ParameterSource.COMMANDLINE, ParameterSource.ENVIRONMENT)
    }
    settings = load_settings(options, explicit, config, fixed=fixed)
    result = run_training(settings)
    if result.is_main:
        click.echo(summary(result), err=True)
    if result.interrupted:
        sys.exit(128 + result.interrupted)


@main.command()
@click.option("--data", "data_yaml", required=True, type=click.Path(dir_okay=False),
              help="Dataset YAML, or a musubi-tuner dataset TOML (see docs/musubi.md).")
@click.option("--vae", required=True, type=click.Path(), help="Wan VAE: Wan2.1_VAE.pth/.safetensors or a diffusers folder.")
@click.option("--t5", required=True, type=click.Path(), help="UMT5 encoder: Wan's .pth, a safetensors file or a transformers folder.")
@click.option("--tokenizer", required=True, type=click.Path(file_okay=False), help="Tokenizer folder (google/umt5-xxl's files).")
@click.option("--device", default=None, help="Torch device [default: cuda if available, else cpu].")
@click.option("--batch-size", default=1, show_default=True, type=click.IntRange(min=1), help="Clips and captions encoded at once.")
@click.option("--dtype", type=click.Choice(["float32", "bfloat16", "float16"]), default=None, help="Encoder dtype [default: bfloat16 on cuda, float32 on cpu].")
@click.option("--skip-bad", is_flag=True, help="Leave bad items out (and list them) instead of failing.")
@click.option("--i2v", is_flag=True, help="Image-to-video: also cache each clip's first frame as the "
              "conditioning Wan's I2V models take (the Wan 2.2 VAE gives TI2V 5B's). See docs/i2v.md.")
@click.option("--clip", type=click.Path(), help="CLIP vision encoder folder (transformers CLIPVisionModel, e.g. "
              "image_encoder/ of Wan2.1-I2V-14B-480P-Diffusers): cache the first frame's CLIP features for "
              "Wan 2.1 I2V; implies --i2v.")
@click.option("--no-reuse-musubi", is_flag=True, help="With a musubi-tuner dataset TOML: encode everything "
              "instead of taking latents and text embeddings from musubi-tuner's cache files (see docs/musubi.md).")
@click.option("-q", "--quiet", is_flag=True, help="No progress (a bar on a terminal, lines in a log otherwise).")
@user_errors
def cache(
    data_yaml, vae, t5, tokenizer, device, batch_size, dtype, skip_bad, i2v, clip, no_reuse_musubi, quiet
) -> None:
    """Encode a dataset's images and clips (VAE) and captions (UMT5) into its cache folder.

    Only what changed since the last run is encoded; the index the trainer
    reads is written when every item is good (or --skip-bad leaves the bad
    ones out). With a musubi-tuner dataset TOML, latents and text embeddings
    in musubi-tuner's cache are taken instead of encoded where they check out.

    \b
    Example:
      slotsmith cache --data data.yaml --vae Wan2.1_VAE.pth \\
        --t5 models_t5_umt5-xxl-enc-bf16.pth --tokenizer umt5-xxl/
      slotsmith cache --data data.yaml --vae Wan2.1_VAE.pth --t5 ... --tokenizer umt5-xxl/ \\
        --clip Wan2.1-I2V-14B-480P-Diffusers/image_encoder   # for Wan 2.1 I2V 14B
    """
    with training_extra("cache"):
        from slotsmith.data.cache_builder import LISTED_PROBLEMS, run_cache

    report = run_cache(
        data_yaml, vae, t5, tokenizer, device=device, dtype=dtype, batch_size=batch_size,
        skip_bad=skip_bad, progress=not quiet, i2v=i2v, clip=clip, reuse_musubi=not no_reuse_musubi,
    )
    for item in report.bad:
        click.echo(f"skipped: {item}", err=True)
    notes = report.musubi_notes
    for note in notes[:LISTED_PROBLEMS]:
        click.echo(f"encoded, not taken from musubi-tuner's cache: {note}", err=True)
    if len(notes) > LISTED_PROBLEMS:
        click.echo(f"... and {len(notes) - LISTED_PROBLEMS} more not taken from musubi-tuner's cache", err=True)
    click.echo(report.summary())


@main.command()
@click.option("--base", "-b", required=True, metavar="CKPT",
              help="Wan DiT checkpoint, as `train` takes it: any convention, sharded set or folder, a spliced one too "
              "(with --base-high: the low-noise expert).")
@click.option("--slot", "slots", multiple=True, metavar="X.slot[:S]",
              help="Overlay a slot in memory (repeatable); :S applies base + S*(slot - base), S in [0, 2] "
              "(default 1: exactly the slot). Checked as `splice` checks it, before any weight loads.")
@click.option("--base-high", metavar="CKPT", help="Wan 2.2 A14B: the high-noise expert (then --base is the "
              "low-noise one); it denoises the steps from the boundary up, as WanPipeline's transformer does.")
@click.option("--slot-high", "slots_high", multiple=True, metavar="X.slot[:S]",
              help="Overlay a slot on --base-high (repeatable), checked against it as --slot is against --base.")
@click.option("--boundary", type=float, help="With --base-high: the expert boundary in (0, 1) [default: the "
              "layout's, 0.875 for T2V A14B].")
@click.option("--vae", required=True, metavar="PATH", help="The Wan VAE, as `slotsmith cache` takes it.")
@click.option("--t5", required=True, metavar="PATH", help="The UMT5 text encoder, as `slotsmith cache` takes it.")
@click.option("--tokenizer", required=True, metavar="DIR", help="The tokenizer folder, as `slotsmith cache` takes it.")
@click.option("--prompt", "-p", "prompts", multiple=True, metavar="TEXT", help="A prompt (repeatable).")
@click.option("--prompts", "prompts_file", metavar="FILE", help="One prompt per line, each with optional "
              "musubi-style overrides: --w --h --f --d --s --g --fs --n (see docs/sampling.md).")
@click.option("--negative-prompt", default="", help="What to steer away from (with --guidance above 1).")
@click.option("--width", default=832, show_default=True, type=int, help="Pixels (a multiple of 16; 32 for TI2V).")
@click.option("--height", default=480, show_default=True, type=int, help="Pixels (a multiple of 16; 32 for TI2V).")
@click.option("--frames", default=1, show_default=True, type=int, help="1 writes a PNG; 4N+1 (e.g. 81) an MP4.")
@click.option("--steps", default=30, show_default=True, type=int, help="Denoising steps.")
@click.option("--guidance", default=5.0, show_default=True, type=float, help="Guidance scale (1: none).")
@click.option("--flow-shift", default=5.0, show_default=True, type=float, help="Scheduler timestep shift.")
@click.option("--seed", default=42, show_default=True, type=int, help="Noise seed (the same for every prompt).")
@click.option("--grid", is_flag=True, help="Write one labelled contact sheet, grid.png: a row per prompt.")
@click.option("--compare", metavar="LIST", help="With --grid: a column per item, e.g. "
              "base,char1.slot,char2.slot,char1.slot+char2.slot (same seed along a row).")
@click.option("--fp8-base/--no-fp8-base", default=False, help="Store the frozen base in float8, compute in bf16.")
@click.option("--offload-blocks/--no-offload-blocks", default=False,
              help="Keep blocks in CPU memory, one on the device at a time.")
@click.option("--mixed-precision", type=click.Choice(MIXED_PRECISIONS), default="no", show_default=True,
              help="Autocast the denoising to bf16 or fp16.")
@click.option("--head-dim", type=int, help="Attention head size (default: config.json, metadata, or 128).")
@click.option("--device", default=None, help="Torch device [default: cuda if available, else cpu].")
@click.option("--out", "--output", "-o", "out", default="samples", show_default=True, type=click.Path(file_okay=False),
              help="Folder for the samples.")
@click.option("--force", is_flag=True, help="Replace samples of the same name.")
@click.option("--quiet", "-q", is_flag=True, help="No progress messages or bar.")
@user_errors
def sample(base, slots, base_high, slots_high, boundary, vae, t5, tokenizer, prompts, prompts_file, negative_prompt,
           width, height, frames, steps, guidance, flow_shift, seed, grid, compare, fp8_base, offload_blocks,
           mixed_precision, head_dim, device, out, force, quiet) -> None:
    """Sample images (PNG) or videos (MP4) from BASE plus slots, without writing a checkpoint.

    Each file records its prompt, seed, settings and the base's and slots'
    digests (PNG text chunk "slotsmith"; MP4 comment). Everything loads from
    local files; nothing is downloaded.

    \b
    Examples:
      slotsmith sample -b dit.safetensors --slot char1.slot --vae Wan2.1_VAE.pth \\
        --t5 models_t5_umt5-xxl-enc-bf16.pth --tokenizer umt5-xxl/ -p "character1 walks" -o samples/
      slotsmith sample -b dit.safetensors --vae ... --t5 ... --tokenizer ... --prompts prompts.txt \\
        --grid --compare base,char1.slot,char2.slot,char1.slot+char2.slot
      slotsmith sample -b low_noise.safetensors --slot char1.slot --base-high high_noise.safetensors \\
        --slot-high char1_high.slot --vae ... --t5 ... --tokenizer ... -p "character1 walks"
    """
    with training_extra("sample"):
        from slotsmith.sampling.prompts import SampleSpec
        from slotsmith.sampling.run import SampleOptions, run_sample

    defaults = SampleSpec(prompt="", negative_prompt=negative_prompt, width=width, height=height, frames=frames,
                          steps=steps, guidance=guidance, seed=seed, flow_shift=flow_shift)
    opts = SampleOptions(
        base=base, vae=vae, t5=t5, tokenizer=tokenizer, out=out, slots=slots, base_high=base_high,
        slots_high=slots_high, boundary=boundary, prompts=prompts,
        prompts_file=prompts_file, defaults=defaults, grid=grid, compare=compare, fp8_base=fp8_base,
        offload_blocks=offload_blocks, mixed_precision=mixed_precision, head_dim=head_dim, device=device,
        force=force, quiet=quiet,
    )
    say = (lambda _: None) if quiet else (lambda msg: click.echo(msg, err=True))
    for path in run_sample(opts, say):
        click.echo(f"wrote {path}")


@main.command()
@click.option("--out", "--output", "-o", "out", default="demo-out", show_default=True, type=click.Path(file_okay=False, path_type=str),
              help="Folder for everything the demo makes (a re-run replaces the demo's files there).")
@click.option("--steps", default=600, show_default=True, type=click.IntRange(min=1), help="Training steps per slot.")
@click.option("--seed", default=0, show_default=True, type=int, help="Seed of the model, the data and the training.")
@_algorithm_options(default="v3")
@click.option("--task", type=click.Choice(["t2v", "i2v", "ti2v"]), default="t2v", show_default=True,
              help="t2v: images on a text-to-video DiT; i2v: clips on a Wan 2.2 I2V-shaped DiT (36 input channels); "
              "ti2v: clips on a Wan 2.2 TI2V 5B-shaped DiT with the 48-channel Wan 2.2 VAE.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON on stdout.")
@click.option("--quiet", "-q", is_flag=True, help="No progress messages.")
@user_errors
def demo(out: str, steps: int, seed: int, algorithm: str, pools: int, task: str, as_json: bool, quiet: bool) -> None:
    """Train two characters into disjoint slots at once, splice them, measure what survives.

    Everything is built on the spot (a tiny Wan DiT, VAE, UMT5 and two
    synthetic image sets), nothing is downloaded; it takes well under three
    minutes on a 2-core CPU. The loss table and each character's retention,
    (loss_base - loss_spliced) / (loss_base - loss_own_slot), are printed and
    written to OUT/report.json.

    Both slots take ff 0.1 (v3: at most 1/POOLS). The demo selects with v3,
    whose slots take the same share of every tensor: v2's whole tensors can
    give the two slots very different layers, and then one character wins
    both prompts in the splice (3 of 5 seeds measured; docs/selection-v3.md).

    \b
    Examples:
      slotsmith demo --out demo-out
      slotsmith demo --out demo-v2 --algorithm v2
      slotsmith demo --task i2v --out demo-i2v
    """
    with training_extra("demo"):
        from slotsmith.demo.run import DemoSettings, render_table, run_demo

    say = (lambda _: None) if quiet else (lambda msg: click.echo(msg, err=True))
    settings = DemoSettings(out=Path(out), steps=steps, seed=seed, algorithm=algorithm, pools=pools, task=task)
    report = run_demo(settings, say)
    if as_json:
        click.echo(json.dumps(report, indent=2))
    else:
        click.echo(render_table(report))
        if not quiet:
            click.echo(f"\nwrote {Path(out) / 'report.json'}", err=True)
