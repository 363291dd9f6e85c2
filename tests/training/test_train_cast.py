"""`slotsmith train --cast FILE --character NAME`: the cast's values reach the trainer (imports torch)."""

from types import SimpleNamespace

import pytest
from click.testing import CliRunner
from helpers import make_checkpoint

import slotsmith.training.run as run
from slotsmith.cli import main

CAST = """\
format: slotsmith-cast/1
base: {path: base.safetensors}
selection: {algorithm: v2, ff: 0.05}
characters:
  alice: {ffid: 1, slot: alice.slot}
  bob: {ffid: 2, ff: 0.1, slot: bob.slot}
"""


@pytest.fixture
def trained(tmp_path, monkeypatch):
    """A cast and base; the trainer replaced by one that records the settings it gets."""
    make_checkpoint(tmp_path / "base.safetensors")
    (tmp_path / "cast.yaml").write_text(CAST)
    seen = []
    monkeypatch.setattr(run, "train", lambda s: seen.append(s) or SimpleNamespace(is_main=True, interrupted=False))
    monkeypatch.setattr(run, "summary", lambda result: "trained")
    return tmp_path, seen


def _train(*args):
    return CliRunner().invoke(main, ["train", "--cache", "cache", "--steps", "1", *map(str, args)])


def test_train_takes_base_out_ff_ffid_from_the_cast(trained):
    folder, seen = trained
    r = _train("--cast", folder / "cast.yaml", "--character", "bob", "--lr", "1e-4")
    assert r.exit_code == 0, r.output
    (s,) = seen
    assert (s.base, s.out, s.ff, s.ffid, s.expert, s.lr) == (
        str(folder / "base.safetensors"), str(folder / "bob.slot"), 0.1, 2, None, 1e-4,
    )


@pytest.mark.parametrize(
    "extra",
    [("--ffid", "3"), ("--ff", "0.2"), ("--expert", "high"), ("-o", "elsewhere.slot"), ("-b", "other.safetensors")],
)
def test_train_refuses_a_command_line_that_contradicts_the_cast(trained, extra):
    folder, seen = trained
    r = _train("--cast", folder / "cast.yaml", "--character", "alice", *extra)
    assert r.exit_code == 1 and "contradicts the cast" in r.output and "character 'alice'" in r.output
    assert not seen


def test_train_accepts_a_command_line_that_repeats_the_cast(trained):
    folder, seen = trained
    r = _train("--cast", folder / "cast.yaml", "--character", "alice", "--ffid", "1", "-o", folder / "alice.slot")
    assert r.exit_code == 0, r.output
    assert len(seen) == 1


def test_train_cast_needs_a_known_character_and_both_options(trained):
    folder, seen = trained
    r = _train("--cast", folder / "cast.yaml", "--character", "carol")
    assert r.exit_code == 1 and "no character 'carol'" in r.output
    r = _train("--cast", folder / "cast.yaml")
    assert r.exit_code == 2 and "--character" in r.output
    assert not seen
