"""The CLI's generated options."""

from dataclasses import fields

from slotsmith.cli import train
from slotsmith.train import TrainSettings


def test_every_setting_is_a_train_option_with_its_default_and_help():
    params = {p.name: p for p in train.params}
    for f in fields(TrainSettings):
        option = params[f.name]
        assert option.opts[0] == "--" + f.name.replace("_", "-")
        assert option.default == f.metadata.get("cli_default", f.default)
        assert (option.help or "") == f.metadata["help"]
    assert set(params) == {f.name for f in fields(TrainSettings)} | {"config"}


def test_option_spellings_stay_as_documented():
    params = {p.name: p for p in train.params}
    assert params["out"].opts == ["--out", "--output", "-o"]
    assert params["base"].opts == ["--base", "-b"]
    assert params["quiet"].opts == ["--quiet", "-q"] and params["quiet"].secondary_opts == []
    assert params["resume"].secondary_opts == ["--no-resume"]
    assert list(params["optimizer"].type.choices) == ["adamw", "adamw8bit", "adafactor"]
    assert params["lr"].type.name == "float" and params["steps"].type.name == "integer"
