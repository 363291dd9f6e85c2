"""``slotsmith sample``: slots overlaid in memory, checked as splice checks them; files that say what made them."""

from __future__ import annotations

import json
import random
import shutil

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import save_file

from slotsmith.cli import main
from slotsmith.demo import tiny
from slotsmith.errors import SlotsmithError
from slotsmith.inventory import inventory_from_checkpoint
from slotsmith.sampling import run as sample_run
from slotsmith.sampling.generate import Renderer, encode_prompts, read_metadata
from slotsmith.sampling.prompts import SampleSpec
from slotsmith.sampling.run import SlotOverlay, Variant, check_variants
from slotsmith.select import select_v2
from slotsmith.slot import write_slot
from slotsmith.slotspec import SlotSpec
from slotsmith.splice import splice
from slotsmith.training import wan

SIZE = 32


def _slot(path, base_path, ffid, seed):
    """A slot of ``ffid``'s selection whose tensors are the base's plus noise."""
    inventory = inventory_from_checkpoint(base_path)
    selection = select_v2(inventory.numels(), 0.1, ffid)
    tensors = wan.read_tensors(inventory, selection.tensors)
    g = torch.Generator().manual_seed(seed)
    changed = {n: (t + 0.5 * torch.randn(t.shape, generator=g)).contiguous().numpy().tobytes() for n, t in tensors.items()}
    write_slot(path, inventory, changed, selection=selection.record(), provenance={"test": True})
    return path


@pytest.fixture(scope="module")
def world(tmp_path_factory, tiny_models, tiny_base):
    root = tmp_path_factory.mktemp("sample")
    base = root / "base" / "dit.safetensors"
    base.parent.mkdir()
    for f in tiny_base.parent.iterdir():
        shutil.copy(f, base.parent / f.name)  # splices are written beside it
    return {
        "root": root, "base": base,
        "one": _slot(root / "one.slot", base, 1, 1), "two": _slot(root / "two.slot", base, 2, 2),
        "one_again": _slot(root / "one_again.slot", base, 1, 3),
        "vae": tiny_models["vae_dir"], "t5": tiny_models["t5_dir"], "tok": tiny_models["tok"],
    }


def _args(world, out, *extra):
    return ["sample", "-b", str(world["base"]), "--vae", str(world["vae"]), "--t5", str(world["t5"]),
            "--tokenizer", str(world["tok"]), "--width", str(SIZE), "--height", str(SIZE), "--steps", "2",
            "-o", str(out), "-q", *extra]


def _renderer(world, specs):
    from slotsmith.data.encoders import load_text_encoder, load_tokenizer, load_vae

    contexts = encode_prompts(load_tokenizer(world["tok"]), load_text_encoder(world["t5"]), specs)
    return Renderer(load_vae(world["vae"]), contexts, torch.device("cpu"))


SPEC = SampleSpec(prompt="a red cat sits", negative_prompt="dark", width=SIZE, height=SIZE, steps=2, seed=3)


def test_sample_writes_a_png_that_records_what_made_it(world, tmp_path):
    out = tmp_path / "out"
    result = CliRunner().invoke(main, _args(world, out, "--slot", str(world["one"]), "--slot",
                                            f"{world['two']}:0.5", "-p", "a red cat sits", "--seed", "7"))
    assert result.exit_code == 0, result.output
    (png,) = out.glob("*.png")
    meta = read_metadata(png)
    assert meta["prompt"] == "a red cat sits" and meta["seed"] == 7
    assert meta["settings"]["steps"] == 2 and meta["settings"]["width"] == SIZE
    assert meta["base"]["file"] == "dit.safetensors"
    assert meta["base"]["layout_digest"] == inventory_from_checkpoint(world["base"]).layout_digest()
    from slotsmith.slot import read_slot

    assert [(s["file"], s["digest"], s["strength"]) for s in meta["slots"]] == [
        ("one.slot", read_slot(world["one"]).manifest.digest, 1.0),
        ("two.slot", read_slot(world["two"]).manifest.digest, 0.5),
    ]
    from PIL import Image

    assert Image.open(png).size == (SIZE, SIZE)


@pytest.mark.slow  # trains or samples several models
def test_overlay_at_strength_one_samples_exactly_as_the_spliced_checkpoint(world, tmp_path):
    spliced = splice(world["base"], [world["one"], world["two"]], world["base"].parent / "spliced.safetensors", force=True)
    renderer = _renderer(world, [SPEC])
    inventory, cfg, head = wan.inspect_base(world["base"])
    (variant,) = check_variants(inventory, [("both", [SlotSpec(world["one"]), SlotSpec(world["two"])])])
    model = wan.load_inspected(inventory, cfg, head).model
    overlay = SlotOverlay(model, [e.name for s, _ in variant.slots for e in s.manifest.entries], "cpu", torch.float32)
    overlay.apply(variant)
    from_overlay = renderer.render(model, SPEC)
    from_splice = renderer.render(wan.load_base(spliced).model, SPEC)
    overlay.apply(Variant("base"))
    from_base = renderer.render(model, SPEC)
    assert np.array_equal(from_overlay, from_splice)
    assert not np.array_equal(from_overlay, from_base)
    assert np.array_equal(from_base, renderer.render(wan.load_base(world["base"]).model, SPEC))


def test_strength_scales_the_slots_change(world):
    inventory, cfg, head = wan.inspect_base(world["base"])
    variants = check_variants(inventory, [(f"s{k}", [SlotSpec(world["one"], k)]) for k in (0.0, 0.5, 2.0)])
    model = wan.load_inspected(inventory, cfg, head).model
    names = [e.name for e in variants[0].slots[0][0].manifest.entries]
    base = wan.read_tensors(inventory, names)
    slot = wan.read_tensors(inventory_from_checkpoint(splice(world["base"], [world["one"]],
                                                              world["base"].parent / "one-spliced.safetensors",
                                                              force=True)), names)
    overlay = SlotOverlay(model, names, "cpu", torch.float32)
    for variant, k in zip(variants, (0.0, 0.5, 2.0)):
        overlay.apply(variant)
        for n in names:
            torch.testing.assert_close(overlay.params[n].detach(), base[n] + k * (slot[n] - base[n]))


def test_sampling_leaves_the_global_random_state_and_train_mode_alone(world):
    renderer = _renderer(world, [SPEC])
    model = wan.load_base(world["base"]).model.train()
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    first = renderer.render(model, SPEC)
    assert torch.equal(torch.rand(3), expected) and model.training
    assert np.array_equal(first, renderer.render(model, SPEC))  # same seed, same picture


def test_video_is_an_mp4_with_its_record_as_comment(world, tmp_path):
    import av

    out = tmp_path / "out"
    result = CliRunner().invoke(main, _args(world, out, "-p", "a dog runs", "--frames", "5"))
    assert result.exit_code == 0, result.output
    (mp4,) = out.glob("*.mp4")
    with av.open(str(mp4)) as container:
        frames = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
    assert len(frames) == 5 and frames[0].shape == (SIZE, SIZE, 3)
    meta = read_metadata(mp4)
    assert meta["prompt"] == "a dog runs" and meta["settings"]["frames"] == 5 and meta["slots"] == []


@pytest.mark.slow  # trains or samples several models
def test_grid_is_one_sheet_with_a_column_per_variant_and_a_row_per_prompt(world, tmp_path):
    out = tmp_path / "out"
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red cat sits --d 1\na green dog --d 2\n", encoding="utf-8")
    compare = f"base,{world['one']},{world['two']}:0.5,{world['one']}+{world['two']}"
    result = CliRunner().invoke(main, _args(world, out, "--prompts", str(prompts), "--grid", "--compare", compare))
    assert result.exit_code == 0, result.output
    assert [p.name for p in out.iterdir()] == ["grid.png"]
    meta = read_metadata(out / "grid.png")
    assert len(meta["columns"]) == 4 and len(meta["cells"]) == 8
    seeds = {(c["prompt"], c["seed"]) for c in meta["cells"]}
    assert seeds == {("a red cat sits", 1), ("a green dog", 2)}  # one seed along each row
    from PIL import Image

    width, height = Image.open(out / "grid.png").size
    assert width > 4 * SIZE and 2 * SIZE < height < 3 * SIZE + 40


def _refused_before_loading(monkeypatch, world, tmp_path, *extra):
    """Run ``sample``, which must fail before the DiT's weights load; returns its output."""
    def no_load(*args, **kwargs):
        raise AssertionError("weights loaded before the checks")

    monkeypatch.setattr(sample_run, "load_inspected", no_load)
    result = CliRunner().invoke(main, _args(world, tmp_path / "out", "-p", "a cat", *extra))
    assert result.exit_code == 1, result.output
    return result.output


def test_overlapping_slots_get_splices_error_before_any_weight_loads(world, tmp_path, monkeypatch):
    output = _refused_before_loading(monkeypatch, world, tmp_path, "--slot", str(world["one"]), "--slot",
                                     str(world["one_again"]))
    assert "overlap: both hold" in output
    with pytest.raises(SlotsmithError) as e:
        splice(world["base"], [world["one"], world["one_again"]], tmp_path / "x.safetensors")
    assert str(e.value).splitlines()[0] in output


def test_slot_of_another_base_is_refused_before_any_weight_loads(world, tmp_path, monkeypatch):
    other = tmp_path / "other.safetensors"
    torch.manual_seed(9)
    save_file({k: v.contiguous() for k, v in wan.native_state_dict(
        wan.build_model(tiny.TINY_CONFIG, tiny.TINY_HEAD_DIM)).items()}, other)
    (tmp_path / "config.json").write_text(json.dumps({"attention_head_dim": tiny.TINY_HEAD_DIM}))
    world = {**world, "base": other}
    output = _refused_before_loading(monkeypatch, world, tmp_path, "--slot", str(world["one"]))
    assert "wrong base" in output


def test_image_to_video_base_is_refused_before_any_weight_loads(world, tmp_path, monkeypatch):
    i2v = tmp_path / "i2v.safetensors"
    save_file({k: v.contiguous() for k, v in wan.native_state_dict(
        wan.build_model(tiny.TINY_I2V_CONFIG, tiny.TINY_HEAD_DIM)).items()}, i2v)
    (tmp_path / "config.json").write_text(json.dumps({"attention_head_dim": tiny.TINY_HEAD_DIM}))
    output = _refused_before_loading(monkeypatch, {**world, "base": i2v}, tmp_path)
    assert f"{i2v}: an image-to-video base (36 input channels); slotsmith sample draws text-to-video" in output


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--slot", "x.slot:loud"], "strength 'loud' is not a number"),
        (["--slot", "x.slot:3"], "strength 3 is outside [0, 2]"),
        (["--slot", "absent.slot"], "absent.slot: no such file"),
        (["--width", "40"], "width and height must be multiples of 16"),
        (["--frames", "4"], "frames must be 1 or 4N+1"),
        (["--compare", "base,"], "--compare goes with --grid"),
        (["--grid", "--compare", "base,,x.slot"], "an empty item"),
    ],
)
def test_bad_input_is_one_clear_line(world, tmp_path, monkeypatch, extra, message):
    assert message in _refused_before_loading(monkeypatch, world, tmp_path, *extra)


def test_missing_encoder_gets_caches_error_and_bad_prompt_file_its_line(world, tmp_path):
    args = _args(world, tmp_path / "out", "-p", "a cat")
    args[args.index("--vae") + 1] = str(tmp_path / "nothing")
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 1 and "nothing: no such file" in result.output
    prompts = tmp_path / "p.txt"
    prompts.write_text("good\nbad --s many\n", encoding="utf-8")
    result = CliRunner().invoke(main, _args(world, tmp_path / "out", "--prompts", str(prompts)))
    assert result.exit_code == 1 and f"{prompts}:2: --s needs an integer, got 'many'" in result.output
    assert not (tmp_path / "out").exists()


def test_existing_sample_is_kept_without_force(world, tmp_path):
    out = tmp_path / "out"
    assert CliRunner().invoke(main, _args(world, out, "-p", "a cat")).exit_code == 0
    (png,) = out.glob("*.png")
    before = png.read_bytes()
    result = CliRunner().invoke(main, _args(world, out, "-p", "a cat", "--seed", "42"))
    assert result.exit_code == 1 and png.read_bytes() == before
    assert CliRunner().invoke(main, _args(world, out, "-p", "a cat", "--force")).exit_code == 0


def test_random_module_is_not_touched(world):
    random.seed(5)
    expected = random.random()
    random.seed(5)
    _renderer(world, [SPEC]).render(wan.load_base(world["base"]).model, SPEC)
    assert random.random() == expected


# --- splice FILE:S holds what the overlay computes ---------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_splice_at_a_strength_holds_the_overlays_tensors_bit_for_bit(tmp_path, dtype):
    """The model sees the overlay's fp32 blend cast to its dtype; splice FILE:0.7 must write exactly that."""
    from safetensors.torch import load_file

    torch.manual_seed(4)
    model = wan.build_model(tiny.TINY_CONFIG, tiny.TINY_HEAD_DIM)
    base = tmp_path / "dit.safetensors"
    save_file({k: v.to(dtype).contiguous() for k, v in wan.native_state_dict(model).items()}, base)
    (tmp_path / "config.json").write_text(json.dumps({"attention_head_dim": tiny.TINY_HEAD_DIM}))
    inventory = inventory_from_checkpoint(base)
    whole, rows = "blocks.0.self_attn.q.weight", "blocks.1.ffn.0.weight"
    tensors = wan.read_tensors(inventory, [whole, rows])
    g = torch.Generator().manual_seed(5)
    new = {n: (t.float() + 0.1 * torch.randn(t.shape, generator=g)).to(dtype) for n, t in tensors.items()}
    new[rows] = new[rows][3:9]
    write_slot(tmp_path / "a.slot", inventory, {n: t.contiguous().view(torch.uint8).numpy().tobytes()
                                                for n, t in new.items()},
               selection=None, provenance={"test": True}, rows={rows: (3, 9)})
    spliced = load_file(splice(base, [SlotSpec(tmp_path / "a.slot", 0.7)], tmp_path / "out.safetensors"))

    (variant,) = check_variants(inventory, [("a", [SlotSpec(tmp_path / "a.slot", 0.7)])])
    loaded = wan.load_inspected(inventory, *wan.inspect_base(base)[1:])
    overlay = SlotOverlay(loaded.model, [whole, rows], "cpu", loaded.dtype)
    overlay.apply(variant)
    for name in (whole, rows):
        fed = overlay.params[name].detach().to(dtype)  # what the pre-hook hands the module
        assert spliced[name].dtype == dtype
        assert torch.equal(spliced[name].view(torch.uint8), fed.contiguous().view(torch.uint8)), name
    assert torch.equal(spliced[rows][:3], tensors[rows][:3]) and not torch.equal(spliced[whole], tensors[whole])


# --- Wan 2.2 A14B: --base-high ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def high(world):
    """A second tiny DiT of the same layout (the high-noise expert) and a slot made on it."""
    folder = world["root"] / "high"
    folder.mkdir()
    torch.manual_seed(1)
    path = folder / "dit-high.safetensors"
    save_file({k: v.contiguous() for k, v in wan.native_state_dict(
        wan.build_model(tiny.TINY_CONFIG, tiny.TINY_HEAD_DIM)).items()}, path)
    (folder / "config.json").write_text(json.dumps({"attention_head_dim": tiny.TINY_HEAD_DIM}))
    return {"base": path, "slot": _slot(world["root"] / "high.slot", path, 1, 11)}


def _png(world, out, *extra):
    from PIL import Image

    result = CliRunner().invoke(main, _args(world, out, "-p", "a red cat sits", "--steps", "2", *extra))
    assert result.exit_code == 0, result.output
    (png,) = out.glob("*.png")
    return np.asarray(Image.open(png)), read_metadata(png)


@pytest.mark.slow  # samples five times
def test_base_high_denoises_the_steps_above_the_boundary(world, high, tmp_path):
    """2 steps at flow shift 5 are timesteps 999 and 833: with --boundary 0.9 the high expert takes
    the first (t >= 900, WanPipeline's `transformer`), the low one the second (`transformer_2`)."""
    low_alone, _ = _png(world, tmp_path / "low")
    high_alone, _ = _png({**world, "base": high["base"]}, tmp_path / "high", "--slot", f"{high['slot']}:0.5")
    both, meta = _png(world, tmp_path / "both", "--base-high", str(high["base"]), "--boundary", "0.9",
                      "--slot-high", f"{high['slot']}:0.5")
    assert not np.array_equal(both, low_alone) and not np.array_equal(both, high_alone)
    from slotsmith.slot import read_slot

    assert meta["base_high"] == {"file": "dit-high.safetensors",
                                 "layout_digest": inventory_from_checkpoint(high["base"]).layout_digest()}
    assert meta["slots_high"] == [{"file": "high.slot", "digest": read_slot(high["slot"]).manifest.digest,
                                   "strength": 0.5}]
    assert meta["boundary"] == 0.9 and meta["base"]["file"] == "dit.safetensors" and meta["slots"] == []
    # The same file as both experts is one model throughout (guidance_scale_2 defaults to guidance_scale).
    same, _ = _png(world, tmp_path / "same", "--base-high", str(world["base"]), "--boundary", "0.9")
    assert np.array_equal(same, low_alone)
    # A boundary above every step leaves all of them to the low expert.
    all_low, _ = _png(world, tmp_path / "all-low", "--base-high", str(high["base"]), "--boundary", "0.999999")
    assert np.array_equal(all_low, low_alone)


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--slot-high", "{one}"], "--slot-high needs --base-high (the high-noise expert its slots go into)"),
        (["--boundary", "0.5"], "--boundary goes with --base-high"),
        (["--base-high", "{high}"], "{base}: --base-high needs the expert boundary, and the base's shapes match no "
                                    "two-expert Wan 2.2 layout (wan2.2-t2v-a14b, wan2.2-i2v-a14b); give --boundary"),
        (["--base-high", "{high}", "--boundary", "1"], "--boundary 1.0 must be in (0, 1)"),
        (["--base-high", "{high}", "--boundary", "0.9", "--slot-high", "{one}"], "wrong base"),
        (["--base-high", "{high}", "--boundary", "0.9", "--slot-high", "{high_slot}:4"], "outside [0, 2]"),
    ],
)
def test_expert_input_is_refused_before_any_weight_loads(world, high, tmp_path, monkeypatch, extra, message):
    names = {"one": world["one"], "high": high["base"], "high_slot": high["slot"], "base": world["base"]}
    extra = [e.format(**names) for e in extra]
    assert message.format(**names) in _refused_before_loading(monkeypatch, world, tmp_path, *extra)


def test_base_high_of_another_layout_is_refused(world, tmp_path, monkeypatch):
    other = tmp_path / "other.safetensors"
    save_file({k: v.contiguous() for k, v in wan.native_state_dict(
        wan.build_model(tiny.TINY_TI2V_CONFIG, tiny.TINY_HEAD_DIM)).items()}, other)
    (tmp_path / "config.json").write_text(json.dumps({"attention_head_dim": tiny.TINY_HEAD_DIM}))
    output = _refused_before_loading(monkeypatch, world, tmp_path, "--base-high", str(other), "--boundary", "0.9")
    assert f"{other}: --base-high has layout" in output and "the two experts of one model share a layout" in output
