"""``FILE[:STRENGTH]`` on the command line."""

from __future__ import annotations

from pathlib import Path

import pytest

from slotsmith.errors import SlotsmithError
from slotsmith.slotspec import parse_slot_spec


@pytest.mark.parametrize(
    "text, path, strength",
    [
        ("char1.slot", "char1.slot", 1.0),
        ("char1.slot:0.7", "char1.slot", 0.7),
        ("dir/char1.slot:0", "dir/char1.slot", 0.0),
        ("char1.slot:2", "char1.slot", 2.0),
        ("C:\\slots\\char1.slot", "C:\\slots\\char1.slot", 1.0),  # a drive letter is not a strength
        ("odd:name.slot", "odd:name.slot", 1.0),
        ("d:1/x.slot", "d:1/x.slot", 1.0),
    ],
)
def test_parses_file_and_strength(text, path, strength):
    spec = parse_slot_spec(text)
    assert spec.path == Path(path) and spec.strength == strength


@pytest.mark.parametrize(
    "text, message",
    [
        ("x.slot:strong", "strength 'strong' is not a number"),
        ("x.slot:2.5", "strength 2.5 is outside [0, 2]"),
        ("x.slot:-0.1", "strength -0.1 is outside [0, 2]"),
        ("x.slot:nan", "strength nan is outside [0, 2]"),
    ],
)
def test_bad_strength_is_refused_naming_it(text, message):
    with pytest.raises(SlotsmithError, match="^" + text.replace(".", r"\.") + ": ") as e:
        parse_slot_spec(text)
    assert message in str(e.value)


def test_label_shows_the_strength_only_when_not_one():
    assert parse_slot_spec("a/c.slot").label == "c.slot"
    assert parse_slot_spec("a/c.slot:0.5").label == "c.slot:0.5"
