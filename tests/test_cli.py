"""The CLI's generated options."""

from dataclasses import fields

from click.testing import CliRunner

from slotsmith.cli import main, train
from slotsmith.train import TrainSettings


def test_every_setting_is_a_train_option_with_its_default_and_help():
    params = {p.name: p for p in train.params}
    for f in fields(TrainSettings):
        option = params[f.name]
        assert option.opts[0] == "--" + f.name.replace("_", "-")
        assert option.default == f.metadata.get("cli_default", f.default)
        assert (option.help or "") == f.metadata["help"]
    assert set(params) == {f.name for f in fields(TrainSettings)} | {"config", "cast_file", "character"}


def test_option_spellings_stay_as_documented():
    params = {p.name: p for p in train.params}
    assert params["out"].opts == ["--out", "--output", "-o"]
    assert params["base"].opts == ["--base", "-b"]
    assert params["quiet"].opts == ["--quiet", "-q"] and params["quiet"].secondary_opts == []
    assert params["resume"].secondary_opts == ["--no-resume"]
    assert list(params["optimizer"].type.choices) == ["adamw", "adamw8bit", "adafactor"]
    assert params["lr"].type.name == "float" and params["steps"].type.name == "integer"


def test_offload_blocks_takes_an_optional_count():
    for argv, value in (([], 0), (["--offload-blocks"], -1), (["--offload-blocks", "3"], 3),
                        (["--offload-blocks", "--seed", "1"], -1)):
        assert train.make_context("train", list(argv)).params["offload_blocks"] == value


def test_musubi_flags_on_the_command_line_get_ours():
    r = CliRunner().invoke(main, ["train", "--max_train_steps", "10"])
    assert r.exit_code == 2
    assert "No such option: --max_train_steps (musubi-tuner's --max_train_steps is --steps here)" in r.output
    r = CliRunner().invoke(main, ["train", "--stpes", "10"])
    assert "No such option: --stpes (did you mean '--steps'?)" in r.output
