"""Building diffusers' WanTransformer3DModel from Wan checkpoints, offline."""

import json

import pytest
import torch
from diffusers import WanTransformer3DModel
from diffusers.loaders.single_file_utils import convert_wan_transformer_to_diffusers
from safetensors.torch import save_file

from slotsmith.demo import tiny
from slotsmith.errors import SlotsmithError
from slotsmith.layout import WanConfig, config_from_shapes, wan_tensor_shapes
from slotsmith.names import diffusers_to_native, from_canonical, native_to_diffusers
from slotsmith.training import wan

torch.set_num_threads(1)

I2V = WanConfig(dim=64, ffn_dim=128, num_layers=2, in_dim=36, text_dim=32, freq_dim=32, image_dim=48)


def _diffusers_model(cfg: WanConfig) -> WanTransformer3DModel:
    """Made with diffusers' own arguments, not with slotsmith.training.wan.diffusers_config."""
    torch.manual_seed(0)
    return WanTransformer3DModel(
        patch_size=(1, 2, 2),
        num_attention_heads=cfg.dim // 16,
        attention_head_dim=16,
        in_channels=cfg.in_dim,
        out_channels=cfg.out_dim,
        text_dim=cfg.text_dim,
        freq_dim=cfg.freq_dim,
        ffn_dim=cfg.ffn_dim,
        num_layers=cfg.num_layers,
        image_dim=cfg.image_dim or None,
        added_kv_proj_dim=cfg.dim if cfg.image_dim else None,
    )


@pytest.mark.parametrize("cfg", [tiny.TINY_CONFIG, I2V], ids=["t2v", "i2v"])
def test_diffusers_state_dict_matches_layout(cfg):
    model = _diffusers_model(cfg)
    native = {diffusers_to_native(k): tuple(v.shape) for k, v in model.state_dict().items()}
    assert native == wan_tensor_shapes(cfg)
    assert config_from_shapes(native) == cfg


@pytest.mark.parametrize("cfg", [tiny.TINY_CONFIG, I2V], ids=["t2v", "i2v"])
def test_rename_agrees_with_diffusers_converter(cfg):
    model = _diffusers_model(cfg)
    native = {diffusers_to_native(k): v for k, v in model.state_dict().items()}
    converted = convert_wan_transformer_to_diffusers(dict(native))
    assert set(converted) == set(model.state_dict())
    for name, tensor in native.items():
        assert converted[native_to_diffusers(name)] is tensor


def test_diffusers_config_builds_the_same_model():
    ours = wan.build_model(tiny.TINY_CONFIG, tiny.TINY_HEAD_DIM)
    theirs = _diffusers_model(tiny.TINY_CONFIG)
    assert {k: v.shape for k, v in ours.state_dict().items()} == {k: v.shape for k, v in theirs.state_dict().items()}
    assert ours.config.num_attention_heads == theirs.config.num_attention_heads


def _save(tmp_path, model, convention, sharded=False):
    tensors = {from_canonical(n, convention): v.contiguous() for n, v in wan.native_state_dict(model).items()}
    folder = tmp_path / convention
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"dim": 64, "num_heads": 4}))
    if not sharded:
        save_file(tensors, folder / "model.safetensors")
        return folder / "model.safetensors"
    keys = sorted(tensors)
    halves = {"a.safetensors": keys[: len(keys) // 2], "b.safetensors": keys[len(keys) // 2 :]}
    weight_map = {}
    for file, part in halves.items():
        save_file({k: tensors[k] for k in part}, folder / file)
        weight_map.update({k: file for k in part})
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return folder


@pytest.mark.parametrize(
    "convention, sharded", [("native", False), ("prefixed", False), ("diffusers", False), ("native", True)]
)
def test_load_base_from_every_layout(tmp_path, convention, sharded):
    model = _diffusers_model(tiny.TINY_CONFIG).eval()
    path = _save(tmp_path, model, convention, sharded)
    base = wan.load_base(path)
    assert base.head_dim == 16 and base.config == tiny.TINY_CONFIG and base.dtype == torch.float32
    theirs = model.state_dict()
    for k, v in base.model.state_dict().items():
        assert torch.equal(v, theirs[k]), k
    assert not any(p.requires_grad for p in base.model.parameters())
    x = torch.randn(1, 16, 1, 4, 4)
    ctx = torch.randn(1, 7, 32)
    t = torch.tensor([500.0])
    with torch.no_grad():
        a = base.model.eval()(x, t, ctx, return_dict=False)[0]
        b = model(x, t, ctx, return_dict=False)[0]
    assert torch.allclose(a, b, atol=1e-6)  # same weights; kernels may differ with memory alignment


def test_head_dim_sources(tmp_path):
    model = _diffusers_model(tiny.TINY_CONFIG)
    path = _save(tmp_path, model, "native")
    (path.parent / "config.json").write_text(json.dumps({"attention_head_dim": 32, "num_attention_heads": 2}))
    assert wan.inspect_base(path)[2] == 32
    (path.parent / "config.json").unlink()
    # Without a config: Wan's 128, which a 64-wide model cannot have.
    with pytest.raises(SlotsmithError) as e:
        wan.inspect_base(path)
    assert str(e.value) == (
        f"{path}: model width 64 is not a multiple of the head size 128; give --head-dim, "
        'or put a config.json with "attention_head_dim" beside the checkpoint'
    )
    assert wan.inspect_base(path, head_dim=16)[2] == 16
    # A given head size that does not fit: say so, rather than ask for --head-dim.
    with pytest.raises(SlotsmithError) as e:
        wan.inspect_base(path, head_dim=7)
    assert str(e.value) == f"{path}: --head-dim 7 does not divide the model width 64"
    tensors = {k: v.contiguous() for k, v in wan.native_state_dict(model).items()}
    save_file(tensors, path, metadata={"config": json.dumps({"dim": 64, "num_heads": 8})})
    assert wan.inspect_base(path)[2] == 8


def test_refuses_non_wan_and_missing(tmp_path):
    save_file({"encoder.weight": torch.zeros(4, 4)}, tmp_path / "other.safetensors")
    with pytest.raises(SlotsmithError, match="not a Wan DiT"):
        wan.inspect_base(tmp_path / "other.safetensors", head_dim=16)
    with pytest.raises(SlotsmithError, match="no such file"):
        wan.inspect_base(tmp_path / "missing.safetensors")


@pytest.mark.parametrize("offload", [False, True], ids=["device", "offload"])
@pytest.mark.parametrize("fp8", [False, True], ids=["file-dtype", "fp8"])
def test_load_for_training_puts_each_tensor_in_its_final_form(tmp_path, fp8, offload):
    model = _diffusers_model(tiny.TINY_CONFIG).to(torch.bfloat16)
    path = _save(tmp_path, model, "prefixed", sharded=True)
    inventory, cfg, head_dim = wan.inspect_base(path)
    slot_names = ["blocks.0.ffn.0.weight", "head.head.bias"]
    empty, compute = wan.empty_training_model(cfg, head_dim, torch.bfloat16, fp8)
    slot, stats = wan.load_for_training(
        empty, inventory, slot_names, torch.device("cpu"), compute, offload_blocks=-1 if offload else 0
    )
    theirs = wan.native_state_dict(model)
    assert stats.nbytes == sum(t.numel() * 2 for t in theirs.values())
    for name in slot_names:  # fp32 masters holding the file's exact values
        assert slot[name].dtype == torch.float32 and torch.equal(slot[name], theirs[name].float())
    ours = wan.native_state_dict(empty)
    assert set(ours) == set(theirs) - set(slot_names)
    stored = {t.dtype for t in ours.values()}
    assert stored == ({torch.float8_e4m3fn, torch.bfloat16} if fp8 else {torch.bfloat16})
    for name, t in ours.items():
        assert torch.equal(t, theirs[name].to(t.dtype)), name
        assert t.device.type == "cpu" and not t.requires_grad
    assert ours["blocks.1.self_attn.q.weight"].dtype == (torch.float8_e4m3fn if fp8 else torch.bfloat16)


def test_truncated_base_is_a_clear_error(tmp_path):
    model = _diffusers_model(tiny.TINY_CONFIG)
    path = _save(tmp_path, model, "native")
    inventory, cfg, head_dim = wan.inspect_base(path)
    with open(path, "r+b") as f:
        f.truncate(path.stat().st_size - 4)
    with pytest.raises(SlotsmithError, match="shorter than its header says"):
        wan.load_inspected(inventory, cfg, head_dim)


# The peak RSS (VmHWM) is reset to the current RSS just before the load (Linux's clear_refs "5"),
# so what the imports and the empty model peaked at does not hide the load's own peak.
_LOAD_PEAK = """
import sys, torch
from slotsmith.training import wan
from slotsmith.training.memory import rss_now
def hwm():
    return int(next(l for l in open("/proc/self/status") if l.startswith("VmHWM:")).split()[1]) * 1024
inventory, cfg, head_dim = wan.inspect_base(sys.argv[1])
model, compute = wan.empty_training_model(cfg, head_dim, torch.bfloat16, True)
open("/proc/self/clear_refs", "w").write("5")
before = rss_now()
wan.load_for_training(model, inventory, ["head.head.bias"], torch.device("cpu"), compute, offload_blocks=-1)
print(hwm() - before)
"""


@pytest.mark.slow
def test_fp8_load_peak_stays_well_below_the_file(tmp_path):
    """Streaming: loading a bf16 base into fp8 grows the peak RSS by about half the file, not by the file."""
    import subprocess
    import sys

    cfg = WanConfig(dim=512, ffn_dim=2048, num_layers=8, text_dim=256, freq_dim=64)
    torch.manual_seed(0)
    path = tmp_path / "base.safetensors"
    save_file({n: (torch.randn(s) * 0.02).to(torch.bfloat16) for n, s in wan_tensor_shapes(cfg).items()}, path)
    size = path.stat().st_size
    growth = int(subprocess.run([sys.executable, "-c", _LOAD_PEAK, str(path)], capture_output=True, text=True,
                                check=True).stdout)
    # fp8 weights are half the file; the old load (everything at the file's dtype first) grew by more than the file.
    assert growth < 0.75 * size, (growth, size)


@pytest.mark.parametrize("fp8", [False, True], ids=["file-dtype", "fp8"])
def test_load_for_training_keeps_a_row_range_tensor_frozen_in_its_final_form(tmp_path, fp8):
    model = _diffusers_model(tiny.TINY_CONFIG).to(torch.bfloat16)
    path = _save(tmp_path, model, "native")
    inventory, cfg, head_dim = wan.inspect_base(path)
    name, rows = "blocks.1.self_attn.q.weight", (3, 9)
    empty, compute = wan.empty_training_model(cfg, head_dim, torch.bfloat16, fp8)
    slot, _ = wan.load_for_training(
        empty, inventory, [name], torch.device("cpu"), compute, rows={name: rows}, fp8=fp8, offload_blocks=-1
    )
    theirs, ours = wan.native_state_dict(model), wan.native_state_dict(empty)
    assert torch.equal(slot[name], theirs[name][3:9].float())
    assert ours[name].dtype == (torch.float8_e4m3fn if fp8 else torch.bfloat16)
    assert torch.equal(ours[name], theirs[name].to(ours[name].dtype))
    x = torch.randn(2, cfg.dim, dtype=torch.bfloat16)
    q = empty.get_submodule("blocks.1.attn1.to_q")
    with torch.no_grad():  # the forward reads the master's rows (through the fp8 hook's cast, if any)
        slot[name][:] = 0
        out = q(x)
    assert torch.equal(out[:, 3:9], q.bias[3:9].to(out.dtype).expand(2, -1))
    assert not torch.equal(out[:, :3], q.bias[:3].to(out.dtype).expand(2, -1))
