"""Prompt files: musubi-style per-line overrides, and errors that name the line."""

from __future__ import annotations

import pytest

from slotsmith.errors import SlotsmithError
from slotsmith.sampling.prompts import SampleSpec, parse_line, read_prompt_file

DEFAULTS = SampleSpec(prompt="", width=64, height=48, frames=1, steps=7, guidance=3.0, seed=5, flow_shift=2.0)


def test_overrides_replace_only_what_they_name(tmp_path):
    path = tmp_path / "p.txt"
    path.write_text(
        "# a comment\n\ncharacter1 walks --w 128 --h 96 --f 9 --d 11 --s 3 --g 1.5 --fs 4 --n blurry, dark\n"
        "plain prompt\n",
        encoding="utf-8",
    )
    first, second = read_prompt_file(path, DEFAULTS)
    assert (first.prompt, first.width, first.height, first.frames, first.seed, first.steps) == (
        "character1 walks", 128, 96, 9, 11, 3)
    assert (first.guidance, first.flow_shift, first.negative_prompt) == (1.5, 4.0, "blurry, dark")
    assert first.where == f"{path}:3"
    assert second.prompt == "plain prompt" and second.settings() == DEFAULTS.settings()


def test_option_order_is_free_and_the_negative_prompt_runs_to_the_next_option():
    spec = parse_line("a cat --n low quality, noise --d 3", DEFAULTS, "f:1")
    assert spec.negative_prompt == "low quality, noise" and spec.seed == 3


@pytest.mark.parametrize(
    "line, problem",
    [
        ("a cat --x 3", "unknown option --x"),
        ("a cat --w wide", "--w needs an integer, got 'wide'"),
        ("a cat --g", "--g needs a number, got nothing"),
        ("a cat --f 8", "frames must be 1 or 4N+1"),
        ("a cat --s 0", "steps must be at least 1"),
        ("a cat --w 0", "width and height must be positive"),
        ("a cat --fs -1", "flow shift must be positive"),
        ("a cat --d 1 --d 2", "--d given twice"),
        ("--w 64", "the prompt is empty"),
    ],
)
def test_bad_override_names_the_line_and_the_problem(tmp_path, line, problem):
    path = tmp_path / "p.txt"
    path.write_text("fine prompt\n" + line + "\n", encoding="utf-8")
    with pytest.raises(SlotsmithError) as e:
        read_prompt_file(path, DEFAULTS)
    assert str(e.value).startswith(f"{path}:2: ") and problem in str(e.value)


def test_empty_or_missing_file_is_refused(tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("# only a comment\n\n", encoding="utf-8")
    with pytest.raises(SlotsmithError, match="no prompt in the file"):
        read_prompt_file(empty, DEFAULTS)
    with pytest.raises(SlotsmithError, match="no such file"):
        read_prompt_file(tmp_path / "absent.txt", DEFAULTS)
