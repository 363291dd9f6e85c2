"""The ``slotsmith`` command line: thin click commands over the library.

Light commands (plan, inspect, splice, extract, verify) never import torch;
the trainer's commands import their heavy modules inside the command body.
Every command turns a ``SlotsmithError`` into one ``error:`` line and exit 1.
"""

from __future__ import annotations

import functools
import json
import sys

import click

from slotsmith import __version__
from slotsmith.errors import SlotsmithError


def user_errors(fn):
    """Run a command body, turning user errors into one line on stderr and exit 1."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except SlotsmithError as e:
            click.echo(f"error: {e}", err=True)
            sys.exit(1)
        except KeyboardInterrupt:
            click.echo("interrupted", err=True)
            sys.exit(130)

    return wrapper


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="slotsmith")
def main() -> None:
    """Fine-tune disjoint slots of a Wan video DiT and splice them together.

    A slot is a deterministic set of the model's own tensors, chosen by --ff
    (fraction of the model) and --ffid (one of 8 disjoint pools). Slots of
    different ffids never share a tensor, so they can be trained apart and
    spliced into one checkpoint.
    """


@main.command()
@click.option(
    "--model",
    "-m",
    required=True,
    metavar="MODEL",
    help="A shipped layout name (e.g. wan2.2-t2v-a14b), a layout YAML, or a checkpoint "
    "(.safetensors, sharded *.index.json, or a folder).",
)
@click.option("--ff", type=float, required=True, help="Fraction of the model's parameters, in (0, 1].")
@click.option(
    "--ffid",
    type=int,
    multiple=True,
    required=True,
    help="Pool id 0..7. Repeat to compare several slots and get an overlap table.",
)
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of the report.")
@user_errors
def plan(model: str, ff: float, ffid: tuple[int, ...], as_json: bool) -> None:
    """Show exactly which tensors --ff/--ffid select on MODEL.

    \b
    Examples:
      slotsmith plan -m wan2.2-t2v-a14b --ff 0.01 --ffid 2
      slotsmith plan -m dit.safetensors --ff 0.01 --ffid 1 --ffid 2 --json
    """
    from slotsmith.inventory import load_inventory
    from slotsmith.plan import plan_json, render_plan
    from slotsmith.select import select_v2

    inventory = load_inventory(model)
    numels = inventory.numels()
    selections = [select_v2(numels, ff, k) for k in ffid]
    if as_json:
        docs = [plan_json(inventory, s) for s in selections]
        click.echo(json.dumps(docs[0] if len(docs) == 1 else docs, indent=2))
    else:
        click.echo(render_plan(inventory, selections))
