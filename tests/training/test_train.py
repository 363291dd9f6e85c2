"""The embedded trainer on a tiny Wan DiT and a synthetic cache (CPU, float32)."""

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from click.testing import CliRunner
from helpers import disk_full
from media import write_image, write_video
from safetensors import safe_open
from safetensors.torch import save_file

from slotsmith.cli import main
from slotsmith.data import cache
from slotsmith.demo import tiny
from slotsmith.digest import digest_bytes
from slotsmith.errors import SlotsmithError
from slotsmith.inventory import inventory_from_checkpoint, load_inventory
from slotsmith.select import select_v2
from slotsmith.slot import read_slot
from slotsmith.train import TrainSettings, load_settings
from slotsmith.training import wan
from slotsmith.training.flow import flow_loss, sample_t
from slotsmith.training.knobs import attention_backends, place_model, process_warning, resolve_attention
from slotsmith.training.optim import lr_factor
from slotsmith.training.preflight import expert_range, state_path_for
from slotsmith.training.run import summary, train
from slotsmith.training.state import load_state
from slotsmith.training.stream import DataStream, epoch_length, sample_generator

torch.set_num_threads(1)
FF, FFID = 0.05, 1


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A tiny random Wan DiT (with config.json for its head size) and a 4-item cache."""
    root = tmp_path_factory.mktemp("train")
    torch.manual_seed(0)
    model = wan.build_model(tiny.TINY_CONFIG, tiny.TINY_HEAD_DIM)
    base = root / "base" / "dit.safetensors"
    base.parent.mkdir()
    save_file({k: v.contiguous() for k, v in wan.native_state_dict(model).items()}, base)
    (base.parent / "config.json").write_text(json.dumps({"attention_head_dim": tiny.TINY_HEAD_DIM}))
    cache_dir = root / "cache"
    items = []
    for i in range(4):
        lat = cache.write_latents(cache_dir, f"{i:032x}", torch.randn(16, 1, 4, 4))
        txt = cache.write_text(cache_dir, f"{i:032x}", torch.randn(3 + i, 32))
        items.append({"latents": lat, "text": txt})
    cache.write_index(cache_dir, items, 16, 32)
    return {"base": base, "cache": cache_dir, "root": root}


def _settings(world, out, **kw):
    args = dict(
        base=str(world["base"]), cache=str(world["cache"]), out=str(out), ff=FF, ffid=FFID, steps=4, lr=1e-3,
        batch_size=2, quiet=True,
    )
    args.update(kw)
    return TrainSettings(**args)


def _own(tmp_path, name):
    """``tmp_path/<stem>/<name>``: a folder of its own, so runs of one ffid do not collide."""
    folder = tmp_path / Path(name).stem
    folder.mkdir()
    return folder / name


def _slot_tensors(path):
    slot = read_slot(path)
    slot.verify_hashes()
    return {
        e.name: torch.frombuffer(bytearray(slot.read_tensor(e.name)), dtype=torch.float32).view(e.shape)
        for e in slot.manifest.entries
    }


def _fixed_loss(world, replace):
    """Mean flow loss over every cache item at fixed (t, noise), with ``replace`` swapped into the base."""
    base = wan.load_base(world["base"])
    sd = base.model.state_dict()
    with torch.no_grad():
        for name, tensor in replace.items():
            sd[wan.native_to_diffusers(name)].copy_(tensor)
    ds = cache.CachedDataset(world["cache"])
    settings = TrainSettings()
    losses = []
    with torch.no_grad():
        for i in range(len(ds)):
            item = ds[i]
            g = sample_generator(1234, i)
            t = torch.tensor([sample_t(settings, g, (0.0, 1.0))])
            noise = torch.randn(item["latents"].shape, generator=g)[None]
            losses.append(flow_loss(base.model, item["latents"][None], item["context"][None], t, noise, torch.float32))
    return torch.cat(losses).mean().item()


def _base_tensors(world):
    with safe_open(str(world["base"]), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


def test_trains_exactly_the_slot_and_lowers_the_loss(world, tmp_path):
    before = digest_bytes(world["base"].read_bytes())
    result = train(_settings(world, tmp_path / "a.slot", steps=30))
    assert digest_bytes(world["base"].read_bytes()) == before  # inputs never change
    selection = select_v2(inventory_from_checkpoint(world["base"]).numels(), FF, FFID)
    trained = _slot_tensors(tmp_path / "a.slot")
    assert set(trained) == set(selection.tensors)
    manifest = read_slot(tmp_path / "a.slot").manifest
    assert manifest.selection["ff"] == FF and manifest.selection["ffid"] == FFID
    assert manifest.provenance["steps"] == 30 and manifest.provenance["seed"] == 42
    base = _base_tensors(world)
    assert all(not torch.equal(trained[n], base[n]) for n in trained)
    assert _fixed_loss(world, trained) < _fixed_loss(world, {})
    assert result.trained_params == selection.selected_params
    # AdamW: two fp32 moments per trained parameter (+ a step counter per tensor).
    assert 8 * result.trained_params <= result.optimizer_bytes <= 8 * result.trained_params + 8 * len(trained)


def test_splice_of_the_slot_changes_nothing_else(world, tmp_path):
    train(_settings(world, tmp_path / "a.slot"))
    out = tmp_path / "spliced.safetensors"
    r = CliRunner().invoke(main, ["splice", str(world["base"]), str(tmp_path / "a.slot"), "-o", str(out), "-q"])
    assert r.exit_code == 0, r.output
    trained = _slot_tensors(tmp_path / "a.slot")
    base = _base_tensors(world)
    with safe_open(str(out), framework="pt") as f:
        assert set(f.keys()) == set(base)
        for key in f.keys():
            expected = trained.get(key, base[key])
            assert torch.equal(f.get_tensor(key), expected), key


def test_resume_continues_exactly(world, tmp_path):
    kw = dict(steps=6, lr_scheduler="cosine", warmup_steps=2, grad_accum=2, batch_size=1)
    train(_settings(world, _own(tmp_path, "straight.slot"), **kw))
    stopped = train(_settings(world, tmp_path / "resumed.slot", stop_after=3, **kw))
    assert stopped.manifest is None and not (tmp_path / "resumed.slot").exists()
    assert state_path_for(tmp_path / "resumed.slot").is_file()
    resumed = train(_settings(world, tmp_path / "resumed.slot", resume=True, **kw))
    assert resumed.start_step == 3 and resumed.steps == 6
    a, b = _slot_tensors(tmp_path / "straight" / "straight.slot"), _slot_tensors(tmp_path / "resumed.slot")
    assert all(torch.equal(a[n], b[n]) for n in a)


def test_resume_refuses_a_different_run_naming_the_setting(world, tmp_path):
    out = tmp_path / "a.slot"
    train(_settings(world, out, stop_after=1))
    state = state_path_for(out)
    for change, said in (
        (dict(seed=7), "--seed 42, but this run has --seed 7"),
        (dict(ffid=2), "--ffid 1, but this run has --ffid 2"),  # not the tensor list it implies
        (dict(expert="high", boundary=0.5), "no --expert, but this run has --expert high"),
    ):
        with pytest.raises(SlotsmithError) as e:
            train(_settings(world, out, resume=True, **change))
        assert str(e.value) == (
            f"{state}: was made with {said}; cannot resume (run with the same settings, or without --resume to "
            "start over)"
        )
    saved = json.loads(torch.load(state, weights_only=True)["identity"])
    with pytest.raises(SlotsmithError, match=r"was made with 1 process\(es\), but this run has 2; cannot resume"):
        load_state(state, {**saved, "processes": 2})


@pytest.mark.parametrize(
    "options",
    [dict(gradient_checkpointing=True), dict(offload_blocks=-1), dict(offload_blocks=1),
     dict(offload_blocks=-1, gradient_checkpointing=True), dict(offload_blocks=1, gradient_checkpointing=True)],
    ids=["checkpointing", "offload-all", "offload-1", "both-all", "both-1"],
)
def test_memory_options_give_the_same_slot(world, tmp_path, options):
    train(_settings(world, _own(tmp_path, "plain.slot")))
    train(_settings(world, tmp_path / "opt.slot", **options))
    a, b = _slot_tensors(tmp_path / "plain" / "plain.slot"), _slot_tensors(tmp_path / "opt.slot")
    assert all(torch.allclose(a[n], b[n], rtol=0, atol=1e-6) for n in a)


def test_fp8_base_and_bf16_run_and_keep_the_slot_dtype(world, tmp_path):
    for name, kw in (("fp8", dict(fp8_base=True)), ("bf16", dict(mixed_precision="bf16"))):
        train(_settings(world, _own(tmp_path, f"{name}.slot"), steps=2, **kw))
        slot = read_slot(tmp_path / name / f"{name}.slot")
        assert {e.dtype for e in slot.manifest.entries} == {"F32"}
        assert all(torch.isfinite(t).all() for t in _slot_tensors(tmp_path / name / f"{name}.slot").values())


def test_save_every_writes_slot_sized_snapshots(world, tmp_path):
    train(_settings(world, tmp_path / "a.slot", steps=4, save_every=2, log_dir=str(tmp_path / "logs")))
    snap = tmp_path / "a-step000002.snapshot"
    assert read_slot(snap).manifest.provenance["steps"] == 2
    assert snap.stat().st_size < world["base"].stat().st_size / 5
    (run,) = (tmp_path / "logs").iterdir()  # one folder per run, named after OUT and the time
    assert re.fullmatch(r"a-\d{8}-\d{6}", run.name)
    lines = (run / "train_log.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == [1, 2, 3, 4]
    assert set(json.loads(lines[0])) == {"step", "loss", "lr", "time"}
    doc = json.loads((run / "settings.json").read_text())
    assert doc["settings"]["save_every"] == 2 and doc["total_steps"] == 4 and doc["processes"] == 1


def test_snapshots_are_left_out_of_folder_walks_but_usable_when_named(world, tmp_path, monkeypatch):
    """A snapshot shares the run's ffid: the CI's plain `verify` and the taken-ffid check must not see it."""
    train(_settings(world, tmp_path / "c1.slot", steps=4, save_every=2))
    snap = tmp_path / "c1-step000002.snapshot"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c1-step000002.snapshot", "c1.slot", "c1.slot.state"]
    monkeypatch.chdir(tmp_path)
    r = CliRunner().invoke(main, ["verify", "-q"])
    assert r.exit_code == 0, r.output
    r = CliRunner().invoke(main, ["verify", "-q", str(snap)])
    assert r.exit_code == 0, r.output
    out = tmp_path / "spliced.safetensors"
    r = CliRunner().invoke(main, ["splice", str(world["base"]), str(snap), "-o", str(out), "-q"])
    assert r.exit_code == 0, r.output
    with safe_open(str(out), framework="pt") as f:
        assert all(torch.equal(f.get_tensor(n), t) for n, t in _slot_tensors(snap).items())
    (tmp_path / "c1.slot").unlink()
    train(_settings(world, tmp_path / "c2.slot", steps=1))  # the snapshot's ffid is not taken


def test_expert_range_is_recorded(world, tmp_path):
    with pytest.raises(SlotsmithError) as e:
        train(_settings(world, tmp_path / "a.slot", expert="high"))
    assert str(e.value) == (
        f"{world['base']}: --expert needs the expert boundary, and the base's shapes match no two-expert "
        "Wan 2.2 layout (wan2.2-t2v-a14b, wan2.2-i2v-a14b); give --boundary"
    )
    result = train(_settings(world, tmp_path / "a.slot", expert="high", boundary=0.9, steps=1))
    manifest = read_slot(tmp_path / "a.slot").manifest
    assert manifest.expert == "high"
    assert manifest.provenance["timestep_range"] == [0.9, 1.0]
    assert "expert: high, timesteps [0.9, 1] (boundary 0.9 from --boundary)" in summary(result).splitlines()


def test_expert_boundary_comes_from_the_wan22_layout_the_base_matches():
    """Wan 2.1 T2V 14B has Wan 2.2 T2V A14B's layout: an expert run on it takes that model's boundary."""
    wan21 = load_inventory("wan2.1-t2v-14b")
    assert expert_range(TrainSettings(expert="high"), wan21) == ((0.875, 1.0), 0.875, "wan2.2-t2v-a14b")
    assert expert_range(TrainSettings(expert="low", boundary=0.5), wan21) == ((0.0, 0.5), 0.5, "--boundary")
    i2v = load_inventory("wan2.2-i2v-a14b")
    assert expert_range(TrainSettings(expert="low"), i2v) == ((0.0, 0.9), 0.9, "wan2.2-i2v-a14b")
    assert expert_range(TrainSettings(), wan21) == ((0.0, 1.0), None, None)


def test_taken_ffid_is_refused_unless_forced(world, tmp_path):
    train(_settings(world, tmp_path / "first.slot", steps=1))
    with pytest.raises(SlotsmithError, match="first.slot: already holds tensor"):
        train(_settings(world, tmp_path / "second.slot", steps=1))
    train(_settings(world, tmp_path / "other.slot", steps=1, ffid=2))
    train(_settings(world, tmp_path / "second.slot", steps=1, force=True))
    with pytest.raises(SlotsmithError, match="already exists"):
        train(_settings(world, tmp_path / "first.slot", steps=1, ffid=3))


def test_bad_inputs_fail_before_loading(world, tmp_path):
    out = tmp_path / "a.slot"
    with pytest.raises(SlotsmithError, match="no such file"):
        train(_settings(world, out, base=str(tmp_path / "missing.safetensors")))
    save_file({"x.weight": torch.zeros(2, 2)}, tmp_path / "notwan.safetensors")
    with pytest.raises(SlotsmithError, match="not a Wan DiT"):
        train(_settings(world, out, base=str(tmp_path / "notwan.safetensors")))
    wrong = tmp_path / "cache"
    shutil.copytree(world["cache"], wrong)
    index = json.loads((wrong / "index.json").read_text())
    for field, value, message in (("latent_channels", 4, "channels"), ("text_dim", 8, "text embeddings")):
        items = []
        for i in range(2):
            lat = cache.write_latents(wrong, f"f{i}", torch.zeros(value if field == "latent_channels" else 16, 1, 4, 4))
            txt = cache.write_text(wrong, f"f{i}", torch.zeros(3, value if field == "text_dim" else 32))
            items.append({"latents": lat, "text": txt})
        cache.write_index(wrong, items, value if field == "latent_channels" else 16, value if field == "text_dim" else 32)
        with pytest.raises(SlotsmithError, match=message):
            train(_settings(world, out, cache=str(wrong)))
    cache.write_index(wrong, index["items"], 16, 32)
    with pytest.raises(SlotsmithError, match="no training state"):
        train(_settings(world, out, resume=True))
    with pytest.raises(SlotsmithError, match="exactly one of --steps and --epochs"):
        train(_settings(world, out, epochs=1))
    with pytest.raises(SlotsmithError) as e:
        train(_settings(world, out, cache=str(tmp_path / "nosuch")))
    assert str(e.value) == f"{tmp_path / 'nosuch'}: no such cache folder"
    assert not list(tmp_path.glob("*.slot")) and not list(tmp_path.glob("*.state"))


def test_output_must_be_a_slot_file(world, tmp_path):
    """Other runs look for taken tensors in .slot files only."""
    out = tmp_path / "c1.safetensors"
    with pytest.raises(SlotsmithError) as e:
        train(_settings(world, out))
    assert str(e.value) == f"{out}: the output must be a .slot file (e.g. -o c1.slot)"
    assert not list(tmp_path.iterdir())


def test_missing_optimizer_library_is_a_clear_error(world, tmp_path):
    pytest.importorskip("transformers")
    if "bitsandbytes" in sys.modules or _importable("bitsandbytes"):
        pytest.skip("bitsandbytes is installed")
    with pytest.raises(SlotsmithError, match="bitsandbytes"):
        train(_settings(world, tmp_path / "a.slot", optimizer="adamw8bit"))


def _importable(name):
    import importlib.util

    return importlib.util.find_spec(name) is not None


def test_cli_reads_yaml_and_command_line_wins(world, tmp_path):
    config = tmp_path / "train.yaml"
    config.write_text(
        yaml.safe_dump(
            {"base": str(world["base"]), "cache": str(world["cache"]), "ff": FF, "ffid": FFID, "steps": 3,
             "lr": 1e-3, "seed": 5}
        )
    )
    out = tmp_path / "cli.slot"
    r = CliRunner().invoke(main, ["train", "--config", str(config), "-o", str(out), "--steps", "2", "-q"])
    assert r.exit_code == 0, r.output
    manifest = read_slot(out).manifest
    assert manifest.provenance["steps"] == 2 and manifest.provenance["seed"] == 5
    config.write_text("bogus_option: 1\n")
    r = CliRunner().invoke(main, ["train", "--config", str(config)])
    assert r.exit_code == 1 and "unknown option 'bogus_option'" in r.output


@pytest.mark.slow
def test_two_processes_match_one(world, tmp_path):
    """Two gloo processes with batch 1 == one process with batch 2.

    ``accelerate launch --cpu`` starts a single process unless MPI is set up;
    ``--multi_gpu`` on a machine without GPUs starts torchrun workers that
    accelerate runs as MULTI_CPU over gloo.
    """
    train(_settings(world, _own(tmp_path, "one.slot"), batch_size=2, steps=3))
    script = Path(sys.executable).with_name("slotsmith")
    accelerate = Path(sys.executable).with_name("accelerate")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [
        str(accelerate), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
        "--dynamo_backend", "no", str(script), "train", "-b", str(world["base"]), "--cache", str(world["cache"]),
        "-o", str(tmp_path / "two.slot"), "--ff", str(FF), "--ffid", str(FFID), "--steps", "3", "--lr", "1e-3",
        "--batch-size", "1", "-q",
    ]
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    a, b = _slot_tensors(tmp_path / "one" / "one.slot"), _slot_tensors(tmp_path / "two.slot")
    assert all(torch.allclose(a[n], b[n], rtol=0, atol=1e-5) for n in a)


def test_attach_slot_can_take_every_tensor():
    """Even whole modules (the time embedder, whose dtype diffusers reads off a parameter)."""
    from slotsmith.training.slot_params import attach_slot

    torch.manual_seed(0)
    model = wan.build_model(tiny.TINY_CONFIG, tiny.TINY_HEAD_DIM).requires_grad_(False)
    names = list(wan.native_state_dict(model))
    slot = attach_slot(model, names, torch.device("cpu"), torch.float32)
    assert not any(p.numel() for p in model.parameters())
    t = torch.tensor([0.5])
    latents = torch.randn(1, 16, 1, 4, 4)
    flow_loss(model, latents, torch.randn(1, 8, 32), t, torch.randn_like(latents), torch.float32).sum().backward()
    assert all(slot[n].grad is not None for n in names)


def _cli_args(world, out, *extra):
    return ["train", "-b", str(world["base"]), "--cache", str(world["cache"]), "-o", str(out), "--steps", "1", "-q",
            *extra]


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--ffid", "1"], "--ff is required"),
        (["--ff", "0.05"], "--ffid is required"),
        (["--ff", "1.5", "--ffid", "1"], "--ff 1.5 is out of range: it must be in (0, 1]"),
        (["--ff", "0.05", "--ffid", "8"], "--ffid 8 is out of range: pools are numbered 0..7"),
        (["--ff", "0.05", "--ffid", "1", "--flow-shift", "nan"], "--flow-shift nan must be a finite number"),
        (["--ff", "0.05", "--ffid", "1", "--lr", "inf"], "--lr inf must be a finite number"),
        (["--ff", "0.05", "--ffid", "1", "--expert", "high", "--boundary", "nan"],
         "--boundary nan must be a finite number"),
        (["--ff", "0.05", "--ffid", "1", "--skip-bad"], "--skip-bad goes with --data (a --cache folder holds only "
         "the items it was made of)"),
        (["--ff", "0.05", "--ffid", "1", "--no-reuse-musubi"], "--no-reuse-musubi goes with --data (it says how to "
         "cache; a --cache folder is made)"),
    ],
)
def test_option_errors_name_the_option(world, tmp_path, extra, message):
    r = CliRunner().invoke(main, _cli_args(world, tmp_path / "a.slot", *extra))
    assert r.exit_code == 1 and r.output == f"error: {message}\n"
    assert not list(tmp_path.iterdir())


def test_config_that_cannot_be_read_is_a_clear_error(tmp_path):
    r = CliRunner().invoke(main, ["train", "--config", str(tmp_path)])
    assert r.exit_code == 1
    assert r.output == f"error: {tmp_path}: is a directory, not a training config\n"


def test_full_disk_when_saving_is_a_clear_error(world, tmp_path, monkeypatch):
    disk_full(monkeypatch)
    out = tmp_path / "a.slot"
    r = CliRunner().invoke(main, _cli_args(world, out, "--ff", str(FF), "--ffid", str(FFID)))
    assert r.exit_code == 1
    assert r.output == f"error: {out}.state: writing failed (No space left on device); nothing was written\n"
    assert not list(tmp_path.iterdir())


def test_data_runs_check_the_base_and_output_before_encoding(world, tmp_path, monkeypatch):
    def never(*args, **kwargs):
        raise AssertionError("the dataset was encoded before the base and output were checked")

    monkeypatch.setattr("slotsmith.training.run.ensure_cache", never)
    data = dict(cache="", data=str(tmp_path / "data.yaml"), vae="vae.pth", t5="t5.pth", tokenizer="tok")
    with pytest.raises(SlotsmithError, match="missing.safetensors: no such file"):
        train(_settings(world, tmp_path / "a.slot", base=str(tmp_path / "missing.safetensors"), **data))
    with pytest.raises(SlotsmithError, match="output folder does not exist"):
        train(_settings(world, tmp_path / "nowhere" / "a.slot", **data))
    with pytest.raises(SlotsmithError, match="give --boundary"):
        train(_settings(world, tmp_path / "a.slot", expert="high", **data))


def test_skip_bad_trains_on_what_cache_skip_bad_kept(world, tiny_models, tmp_path):
    imgs = tmp_path / "imgs"
    imgs.mkdir()
    for name in ("a", "b", "trunc", "nocap"):
        write_image(imgs / f"{name}.png", 32, 32, seed=len(name))
    raw = (imgs / "trunc.png").read_bytes()
    (imgs / "trunc.png").write_bytes(raw[: len(raw) // 2])
    for name in ("a", "b", "trunc"):
        (imgs / f"{name}.txt").write_text(f"a {name} cat")
    data = tmp_path / "data.yaml"
    data.write_text(yaml.safe_dump({"datasets": [{"image_directory": "imgs", "resolution": [32, 32]}]}))
    encoders = ["--vae", str(tiny_models["vae_pth"]), "--t5", str(tiny_models["t5_pth"]),
                "--tokenizer", str(tiny_models["tok"])]
    r = CliRunner().invoke(main, ["cache", "--data", str(data), *encoders, "--skip-bad", "-q"])
    assert r.exit_code == 0, r.output
    out = tmp_path / "a.slot"
    args = ["train", "-b", str(world["base"]), "--data", str(data), "--ff", str(FF), "--ffid", str(FFID),
            "--steps", "1", "-o", str(out), "-q"]
    r = CliRunner().invoke(main, args)
    assert r.exit_code == 1
    # Every bad item at once: the unreadable one (which `cache --skip-bad` left out) too.
    lines = r.output.splitlines()
    assert len(lines) == 3
    assert lines[0] == f"error: {(imgs / 'nocap.png').resolve()}: missing caption (nocap.txt absent or empty)"
    assert lines[1].startswith(f"error: {(imgs / 'trunc.png').resolve()}: unreadable image")
    assert lines[2] == "error: 2 bad item(s); fix them or pass --skip-bad to leave them out"
    r = CliRunner().invoke(main, [*args, "--skip-bad"])
    assert r.exit_code == 0, r.output
    skipped = [line for line in r.output.splitlines() if line.startswith("skipped: ")]
    assert [line.split(": ")[1] for line in skipped] == [str((imgs / n).resolve()) for n in ("nocap.png", "trunc.png")]
    assert "unreadable image" in skipped[1]
    assert read_slot(out).manifest.provenance["steps"] == 1


def test_output_that_is_the_base_is_refused_even_with_force(world, tmp_path):
    base = Path(world["base"])
    before = base.read_bytes()
    with pytest.raises(SlotsmithError, match="is an input"):
        train(_settings(world, base, force=True))
    assert base.read_bytes() == before


def test_unwritable_output_folder_is_refused_before_training(world, tmp_path, monkeypatch):
    folder = tmp_path / "ro"
    folder.mkdir()
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda p, mode: False if Path(p) == folder else real_access(p, mode))
    with pytest.raises(SlotsmithError, match="not writable"):
        train(_settings(world, folder / "a.slot"))


def test_data_run_records_its_data_and_encoders_and_resumes_with_data(world, tiny_models, tmp_path):
    imgs = tmp_path / "imgs"
    imgs.mkdir()
    for i, name in enumerate(("a", "b")):
        write_image(imgs / f"{name}.png", 32, 32, seed=i)
        (imgs / f"{name}.txt").write_text(f"a {name} cat")
    data = tmp_path / "data.yaml"
    data.write_text(yaml.safe_dump({"datasets": [{"image_directory": "imgs", "resolution": [32, 32]}]}))
    given = dict(cache="", data=str(data), vae=str(tiny_models["vae_pth"]), t5=str(tiny_models["t5_pth"]),
                 tokenizer=str(tiny_models["tok"]), skip_bad=True)
    out = tmp_path / "a.slot"
    assert train(_settings(world, out, steps=2, stop_after=1, save_every=1, **given)).manifest is None
    resumed = train(_settings(world, out, steps=2, resume=True, **given))
    assert (resumed.start_step, resumed.steps) == (1, 2)
    for slot in (out, tmp_path / "a-step000001.snapshot"):
        recorded = read_slot(slot).manifest.provenance["settings"]
        assert {k: recorded[k] for k in given} == given


def test_config_paths_are_relative_to_the_config_file(world, tmp_path, monkeypatch):
    from slotsmith.train import load_settings

    cfg, elsewhere = tmp_path / "cfg", tmp_path / "elsewhere"
    cfg.mkdir()
    elsewhere.mkdir()
    config = cfg / "train.yaml"
    config.write_text(yaml.safe_dump({
        "base": os.path.relpath(world["base"], cfg), "cache": os.path.relpath(world["cache"], cfg),
        "out": "c1.slot", "log_dir": "logs", "ff": FF, "ffid": FFID, "steps": 1,
    }))
    monkeypatch.chdir(elsewhere)
    r = CliRunner().invoke(main, ["train", "--config", "../cfg/train.yaml", "-q"])
    assert r.exit_code == 0, r.output
    assert (cfg / "c1.slot").is_file() and len(list((cfg / "logs").glob("c1-*/train_log.jsonl"))) == 1
    # On the command line, paths stay relative to the current folder.
    r = CliRunner().invoke(main, ["train", "--config", "../cfg/train.yaml", "-o", "c2.slot", "-q"])
    assert r.exit_code == 0, r.output
    assert (elsewhere / "c2.slot").is_file()
    # The dataset and encoder paths too; absolute ones stay as they are.
    encoders = {"data": "data.yaml", "vae": "vae.pth", "t5": "sub/t5.pth", "tokenizer": str(tmp_path / "tok")}
    config.write_text(yaml.safe_dump({"base": "dit.safetensors", "out": "c1.slot", "ff": FF, "ffid": FFID,
                                      "steps": 1, **encoders}))
    settings = load_settings({}, set(), "../cfg/train.yaml")
    here = Path("../cfg")
    assert (settings.base, settings.out) == (str(here / "dit.safetensors"), str(here / "c1.slot"))
    assert (settings.data, settings.vae, settings.t5) == tuple(str(here / encoders[k]) for k in ("data", "vae", "t5"))
    assert settings.tokenizer == str(tmp_path / "tok")


def test_resume_beyond_the_total_is_refused_and_at_the_total_rewrites_the_slot(world, tmp_path, monkeypatch):
    out = tmp_path / "a.slot"
    train(_settings(world, out, steps=4))
    trained, before = _slot_tensors(out), out.read_bytes()

    def never(*args, **kwargs):
        raise AssertionError("the weights were loaded before the saved step was checked")

    with monkeypatch.context() as m:
        m.setattr("slotsmith.training.run.load_for_training", never)
        # --epochs 1: 4 cache items at batch 2 are 2 steps.
        for options, asked in ((dict(steps=2), "--steps 2"), (dict(steps=None, epochs=1.0), "--epochs 1")):
            with pytest.raises(SlotsmithError) as e:
                train(_settings(world, out, resume=True, **options))
            assert str(e.value) == (
                f"{state_path_for(out)}: is at step 4 already, beyond the 2 step(s) of this run ({asked}); cannot "
                "resume (ask for at least 4 steps, or run without --resume to start over)"
            )
    assert out.read_bytes() == before
    out.unlink()
    result = train(_settings(world, out, steps=4, resume=True))
    assert (result.start_step, result.steps, result.total_steps) == (4, 4, 4)
    assert "steps: none to train, the saved run is at step 4 of 4 already" in summary(result).splitlines()
    again = _slot_tensors(out)
    assert all(torch.equal(trained[n], again[n]) for n in trained)


def test_train_help_shows_data_runs_as_well_as_cache_runs():
    r = CliRunner().invoke(main, ["train", "--help"])
    assert r.exit_code == 0
    examples = [line.strip() for line in r.output.splitlines() if line.strip().startswith("slotsmith train ")]
    assert any("--cache" in line for line in examples) and any("--data" in line for line in examples)
    text = " ".join(r.output.split())  # as wrapped for any terminal width
    assert "Trains on a cache folder (--cache, made by `slotsmith cache`) or on a dataset YAML (--data)" in text


def test_non_finite_loss_stops_the_run_keeping_the_last_good_state(world, tmp_path, monkeypatch):
    from slotsmith.training import run as run_module

    real = run_module._micro_step
    calls = []

    def nan_at_the_third_step(*args, **kwargs):
        calls.append(1)
        loss = real(*args, **kwargs)
        return loss * float("nan") if len(calls) == 3 else loss

    monkeypatch.setattr(run_module, "_micro_step", nan_at_the_third_step)
    out = _own(tmp_path, "nan.slot")
    with pytest.raises(SlotsmithError, match=r"step 3: the loss is nan, not a finite number; stopped before applying"):
        train(_settings(world, out))
    assert not out.exists()
    state = torch.load(state_path_for(out), weights_only=True)
    assert state["step"] == 2 and len(state["losses"]) == 2
    assert all(torch.isfinite(t).all() for t in state["masters"].values())


def test_sigterm_stops_training_at_a_step_boundary_like_ctrl_c(world, tmp_path, monkeypatch):
    import signal

    from slotsmith.training import run as run_module

    real = run_module._micro_step

    def terminated_during_the_first_step(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)  # what a job scheduler or `docker stop` sends
        return real(*args, **kwargs)

    monkeypatch.setattr(run_module, "_micro_step", terminated_during_the_first_step)
    out = _own(tmp_path, "term.slot")
    result = train(_settings(world, out))
    assert result.interrupted == signal.SIGTERM and result.steps == 1 and not out.exists()
    assert load_state(state_path_for(out), json.loads(torch.load(state_path_for(out), weights_only=True)["identity"]))
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL


def test_off_a_terminal_train_prints_progress_lines(world, tmp_path):
    out = tmp_path / "a.slot"
    args = ["train", "-b", str(world["base"]), "--cache", str(world["cache"]), "-o", str(out), "--steps", "3",
            "--ff", str(FF), "--ffid", str(FFID)]
    r = CliRunner().invoke(main, args)  # CliRunner's stderr is not a terminal, as in a log file
    assert r.exit_code == 0, r.output
    lines = r.output.splitlines()
    assert "train: 0/3 it (0%) elapsed 0s" in lines
    last = [line for line in lines if line.startswith("train: 3/3 it (100%)")]
    assert last and all(f" {word} " in last[0] for word in ("loss", "lr", "it/s"))
    quiet = CliRunner().invoke(main, [*args, "-q", "--force"])
    assert quiet.exit_code == 0 and not any(line.startswith("train:") for line in quiet.output.splitlines())


def _from_yaml(tmp_path, text: str) -> TrainSettings:
    config = tmp_path / "train.yaml"
    config.write_text("base: b.safetensors\ncache: c\nout: o.slot\nff: 0.01\nffid: 1\n" + text)
    return load_settings({}, set(), str(config))


@pytest.mark.parametrize(
    ("text", "field", "value"),
    [
        ("lr: 2e-5\nsteps: 10\n", "lr", 2e-5),  # a string to PyYAML (YAML 1.1 wants a dot)
        ("lr: 1.5E-4\nsteps: 10\n", "lr", 1.5e-4),
        ("steps: '100'\n", "steps", 100),
        ("steps: 1e3\n", "steps", 1000),
        ("steps: 200.0\n", "steps", 200),
        ("steps: 1_000\n", "steps", 1000),
        ("epochs: 3\n", "epochs", 3.0),
    ],
)
def test_config_numbers_in_the_forms_yaml_users_write(tmp_path, text, field, value):
    settings = _from_yaml(tmp_path, text)
    assert getattr(settings, field) == value and type(getattr(settings, field)) is type(value)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("steps: 2.5\n", "option 'steps' wants a whole number, got 2.5"),
        ("steps: 10\nlr: fast\n", "option 'lr' wants a number, got 'fast'"),
        ("steps: 10\nresume: maybe\n", "option 'resume' wants true or false, got 'maybe'"),
        ("steps: 10\nlr:\n", "option 'lr' cannot be empty (it wants a number)"),
    ],
)
def test_config_types_are_named_in_words(tmp_path, text, message):
    with pytest.raises(SlotsmithError) as e:
        _from_yaml(tmp_path, text)
    assert str(e.value) == f"{tmp_path / 'train.yaml'}: {message}"


def test_unknown_config_keys_are_all_named_with_a_hint(tmp_path):
    with pytest.raises(SlotsmithError) as e:
        _from_yaml(tmp_path, "max_train_steps: 10\nlearning_rat: 1e-4\nnetwork_dim: 16\nzzz: 1\nsed: 3\n")
    message = str(e.value)
    assert "\n" not in message and message.startswith(f"{tmp_path / 'train.yaml'}: 5 unknown options: ")
    parts = message.split(": 5 unknown options: ", 1)[1].split("; ")
    assert len(parts) == 5
    assert parts[0] == "'max_train_steps' (musubi-tuner's max_train_steps is steps here)"
    assert parts[1] == "'learning_rat' (did you mean 'lr'? (musubi-tuner's learning_rate))"
    assert "network_dim has no counterpart here" in parts[2]
    assert parts[3] == "'zzz' (see `slotsmith train --help` for the options)"
    assert parts[4] == "'sed' (did you mean 'seed'?)"


def test_stream_batches_never_mix_shapes_and_one_shape_keeps_the_plain_order():
    shapes = [(16, 1, 4, 4)] * 5 + [(16, 1, 4, 6)] * 2 + [(16, 5, 4, 4)] * 1
    stream = DataStream(len(shapes), 7, shapes, batch=2)
    assert stream.epoch_length == epoch_length(shapes, 2) == 6 + 2 + 2  # each shape's last batch filled up
    for epoch in range(3):
        order = [stream.entry(epoch * stream.epoch_length + i) for i in range(stream.epoch_length)]
        assert set(order) == set(range(len(shapes)))  # every entry every epoch
        batches = [order[i : i + 2] for i in range(0, len(order), 2)]
        assert all(shapes[a] == shapes[b] for a, b in batches)
    plain = DataStream(5, 7)
    one_shape = DataStream(5, 7, [(16, 1, 4, 4)] * 5, batch=2)
    assert [plain.entry(i) for i in range(15)] == [one_shape.entry(i) for i in range(15)]


def test_batch_size_comes_from_the_dataset_unless_given(world, tmp_path):
    index = json.loads((world["cache"] / "index.json").read_text())
    cache_dir = tmp_path / "cache"
    shutil.copytree(world["cache"], cache_dir)
    for item in index["items"]:
        item["batch_size"] = 2
    (cache_dir / "index.json").write_text(json.dumps(index))
    result = train(_settings(world, _own(tmp_path, "a.slot"), cache=str(cache_dir), batch_size=None, epochs=1.0,
                             steps=None))
    assert result.total_steps == 2  # 4 entries, 2 per step
    assert result.batch_note == "batch size: 2 per process (from the dataset's batch_size)"
    assert "batch size: 2 per process" in summary(result)
    given = train(_settings(world, _own(tmp_path, "b.slot"), cache=str(cache_dir), batch_size=1, epochs=1.0, steps=None))
    assert given.total_steps == 4 and given.batch_note.endswith("(from --batch-size)")
    index["items"][0]["batch_size"] = 3
    (cache_dir / "index.json").write_text(json.dumps(index))
    with pytest.raises(SlotsmithError, match=r"different batch sizes \(2, 3\).*give --batch-size"):
        train(_settings(world, _own(tmp_path, "c.slot"), cache=str(cache_dir), batch_size=None))


def test_log_with_a_tracker_that_is_not_installed_is_a_clear_error(world, tmp_path, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    args = _cli_args(world, tmp_path / "a.slot", "--ff", str(FF), "--ffid", str(FFID), "--log-dir", str(tmp_path))
    r = CliRunner().invoke(main, [*args, "--log-with", "jsonl,wandb"])
    assert r.exit_code == 1 and r.output == "error: --log-with wandb: wandb is not installed (pip install wandb), or use jsonl\n"
    r = CliRunner().invoke(main, [*args, "--log-with", "mlflow"])
    assert r.exit_code == 1 and "--log-with 'mlflow' is not one of jsonl, tensorboard, wandb" in r.output
    r = CliRunner().invoke(main, [*_cli_args(world, tmp_path / "a.slot", "--ff", str(FF), "--ffid", str(FFID)),
                                  "--log-with", "jsonl"])
    assert r.exit_code == 1 and "--log-with and --log-name go with --log-dir" in r.output
    assert not (tmp_path / "a.slot").exists()


def test_log_name_names_the_run_folder_and_is_not_reused_by_a_new_run(world, tmp_path):
    logs = tmp_path / "logs"
    train(_settings(world, tmp_path / "a.slot", steps=2, log_dir=str(logs), log_name="first", stop_after=1))
    assert (logs / "first" / "settings.json").is_file()
    with pytest.raises(SlotsmithError, match="log folder already exists"):
        train(_settings(world, tmp_path / "a.slot", steps=2, log_dir=str(logs), log_name="first", force=True))
    train(_settings(world, tmp_path / "a.slot", steps=2, log_dir=str(logs), log_name="first", resume=True))
    steps = [json.loads(line)["step"] for line in (logs / "first" / "train_log.jsonl").read_text().splitlines()]
    assert steps == [1, 2]


def test_offload_blocks_keeps_the_rest_resident(world):
    """On CPU both devices are one, so what is checked is where the offload hooks sit."""
    model = wan.build_model(tiny.TINY_CONFIG, tiny.TINY_HEAD_DIM)
    place_model(model, torch.device("cpu"), 1)
    hooked = [hasattr(b, "_diffusers_hook") and b._diffusers_hook.get_hook("group_offloading") is not None
              for b in model.blocks]
    assert hooked == [False] * (len(model.blocks) - 1) + [True]


def test_attention_backend_is_checked_against_this_machine(world, tmp_path, monkeypatch):
    cpu = torch.device("cpu")
    usable = attention_backends(cpu)
    assert usable[0] == "native" and "flash" not in usable  # flash kernels need CUDA
    assert resolve_attention(None, cpu) == ("native", "default")
    args = _cli_args(world, tmp_path / "a.slot", "--ff", str(FF), "--ffid", str(FFID))
    r = CliRunner().invoke(main, [*args, "--attention", "flash"])
    assert r.exit_code == 1 and r.output.startswith("error: --attention flash: this attention backend cannot run here")
    assert r.output.rstrip().endswith(f"available: {', '.join(usable)}")
    monkeypatch.setenv("DIFFUSERS_ATTN_BACKEND", "xformers")
    r = CliRunner().invoke(main, args)
    assert r.exit_code == 1 and r.output.startswith("error: DIFFUSERS_ATTN_BACKEND=xformers: ")
    assert not (tmp_path / "a.slot").exists()


def test_summary_states_device_precision_attention_and_processes(world, tmp_path):
    result = train(_settings(world, tmp_path / "a.slot", steps=1))
    assert result.runtime_note == "device cpu, weights float32, attention native, 1 process(es)"
    assert "ran on: device cpu, weights float32, attention native, 1 process(es)" in summary(result)


def test_accelerate_asking_for_more_processes_than_started_is_warned(monkeypatch, tmp_path):
    cmdline = tmp_path / "cmdline"
    cmdline.write_bytes(b"\0".join([b"accelerate", b"launch", b"--cpu", b"--num_processes", b"2", b"x.py"]))
    real = Path.read_bytes
    monkeypatch.setattr(Path, "read_bytes", lambda p: real(cmdline) if str(p).endswith("/cmdline") else real(p))
    assert process_warning(1) is None  # not started by accelerate launch
    monkeypatch.setenv("ACCELERATE_USE_CPU", "True")
    assert process_warning(1).startswith("warning: accelerate launch asked for 2 processes but 1 started")
    assert process_warning(2) is None


@pytest.mark.slow
def test_compile_gives_the_same_slot(world, tmp_path):
    train(_settings(world, _own(tmp_path, "plain.slot"), steps=2))
    train(_settings(world, tmp_path / "compiled.slot", steps=2, compile=True))
    a, b = _slot_tensors(tmp_path / "plain" / "plain.slot"), _slot_tensors(tmp_path / "compiled.slot")
    assert all(torch.allclose(a[n], b[n], rtol=0, atol=1e-5) for n in a)


def test_resume_says_what_the_schedule_does_and_refuses_to_restart_a_finished_decay(world, tmp_path, capsys):
    out = tmp_path / "a.slot"
    kw = dict(lr_scheduler="cosine", lr=1e-3)
    train(_settings(world, out, steps=6, stop_after=3, **kw))
    capsys.readouterr()
    train(_settings(world, out, steps=6, resume=True, **kw), progress=True)
    at_3 = 1e-3 * lr_factor(TrainSettings(**kw), 2, 6)  # the rate of the saved run's last step (step index 2)
    said = [line for line in capsys.readouterr().err.splitlines() if line.startswith("resume: ")]
    now = 1e-3 * lr_factor(TrainSettings(**kw), 3, 6)
    assert said == [f"resume: step 3 of 6, lr {at_3:.3g} -> {now:.3g} (the cosine schedule over 6 steps continues)"]
    # Finished, then extended: the cosine over 10 steps would put step 6 far above where the decay ended.
    with pytest.raises(SlotsmithError) as e:
        train(_settings(world, out, steps=10, resume=True, **kw))
    ended = 1e-3 * lr_factor(TrainSettings(**kw), 5, 6)
    assert f"had decayed to {ended:.3g} by step 6" in str(e.value)
    assert f"Pass --lr-scheduler constant --lr {ended:.3g} to go on" in str(e.value)
    result = train(_settings(world, out, steps=10, resume=True, lr_scheduler="constant", lr=float(f"{ended:.3g}")),
                   progress=True)
    assert result.steps == 10
    said = [line for line in capsys.readouterr().err.splitlines() if line.startswith("resume: ")]
    assert said == [f"resume: step 6 of 10, lr {ended:.3g} -> {float(f'{ended:.3g}'):.3g} (constant from here)"]


def test_a_musubi_dataset_toml_caches_and_trains(world, tiny_models, tmp_path):
    """The shape of musubi-tuner's documented image + video sample, at tiny sizes."""
    (tmp_path / "imgs").mkdir()
    (tmp_path / "clips").mkdir()
    for name in ("a", "b"):
        write_image(tmp_path / "imgs" / f"{name}.png", 32, 32, seed=len(name))
        (tmp_path / "imgs" / f"{name}.txt").write_text(f"a {name} cat")
    write_video(tmp_path / "clips" / "v.mp4", 9, seed=3)
    (tmp_path / "clips.jsonl").write_text('{"video_path": "clips/v.mp4", "caption": "a man walks"}\n')
    data = tmp_path / "dataset.toml"
    data.write_text(
        '[general]\nresolution = [32, 32]\ncaption_extension = ".txt"\nbatch_size = 2\nenable_bucket = true\n'
        'bucket_no_upscale = false\n\n[[datasets]]\nimage_directory = "imgs"\ncache_directory = "cache/imgs"\n'
        'num_repeats = 1\n\n[[datasets]]\nvideo_jsonl_file = "clips.jsonl"\ntarget_frames = [1, 5]\n'
        'frame_extraction = "slide"\nframe_stride = 4\ncache_directory = "cache/clips"\n'
    )
    out = tmp_path / "a.slot"
    r = CliRunner().invoke(main, [
        "train", "-b", str(world["base"]), "--data", str(data), "--vae", str(tiny_models["vae_pth"]),
        "--t5", str(tiny_models["t5_pth"]), "--tokenizer", str(tiny_models["tok"]), "--ff", str(FF), "--ffid",
        str(FFID), "--epochs", "1", "-o", str(out), "-q",
    ])
    assert r.exit_code == 0, r.output
    index = cache.load_index(tmp_path / "cache" / "imgs" / "slotsmith-cache")
    # Two images; of the 9-frame clip, 1-frame clips from frames 0, 4, 8 and 5-frame clips from 0 and 4.
    assert len(index["items"]) == 2 + 3 + 2
    assert "batch size: 2 per process (from the dataset's batch_size)" in r.output
    # One-frame items (5) fill 3 pairs, 5-frame clips (2) one: an epoch is 4 steps.
    assert read_slot(out).manifest.provenance["steps"] == 4


def test_config_numbers_too_large_are_refused_in_one_line(tmp_path):
    """Long digit runs are refused by the YAML reader before they reach the types (the reader rule)."""
    for text in (f"steps: {'9' * 400}\n", f"steps: 10\nlr: '{'9' * 400}'\n"):
        with pytest.raises(SlotsmithError) as e:
            _from_yaml(tmp_path, text)
        assert "integer of 400 digits" in str(e.value) and "\n" not in str(e.value)


def test_a_run_too_big_for_the_machine_is_refused_before_loading(world, tmp_path, monkeypatch):
    def never(*args, **kwargs):
        raise AssertionError("the weights were loaded although the run cannot fit")

    monkeypatch.delenv("SLOTSMITH_SKIP_MEMORY_CHECK", raising=False)
    monkeypatch.setattr("slotsmith.training.run.load_for_training", never)
    monkeypatch.setattr("slotsmith.training.memory.available_host_bytes", lambda: 10**6)
    with pytest.raises(SlotsmithError, match=r"^this run needs ~[\d.]+ GB of RAM, this machine has 0\.0 GB available: "
                       "no combination of --fp8-base, --offload-blocks and --gradient-checkpointing fits"):
        train(_settings(world, tmp_path / "a.slot"))
    assert not list(tmp_path.iterdir())


def test_summary_reports_the_measured_peak_beside_the_estimate(world, tmp_path):
    result = train(_settings(world, tmp_path / "a.slot", steps=1, fp8_base=True))
    line = next(x for x in summary(result).splitlines() if x.startswith("memory: "))
    assert "peak host RSS" in line and "(estimated" in line
    assert line.endswith("; device cpu, weights bfloat16, attention native, 1 process(es), frozen weights float8")
