"""Training v3 (row-range) slots: only the rows train, everything else stays bit-identical."""

import pytest
import test_train
import torch
from click.testing import CliRunner
from safetensors import safe_open
from test_train import _base_tensors, _fixed_loss, _settings

from slotsmith.cli import main
from slotsmith.demo import tiny
from slotsmith.errors import SlotsmithError
from slotsmith.inventory import inventory_from_checkpoint
from slotsmith.select import select_v3
from slotsmith.slot import read_slot
from slotsmith.training import wan
from slotsmith.training.flow import flow_loss
from slotsmith.training.run import train
from slotsmith.training.slot_params import attach_slot

world = test_train.world  # the same module-scoped fixture: one tiny base and cache

torch.set_num_threads(1)
V3 = dict(algorithm="v3", pools=8, ff=0.1, ffid=3)


def _rows_of(path):
    """Slot entry name -> (rows, tensor of those rows), hashes checked."""
    slot = read_slot(path)
    slot.verify_hashes()
    return {
        e.name: (e.rows, torch.frombuffer(bytearray(slot.read_tensor(e.name)), dtype=torch.float32).view(e.stored_shape))
        for e in slot.manifest.entries
    }


def _selection(world):
    inv = inventory_from_checkpoint(world["base"])
    return select_v3({n: t.shape for n, t in inv.tensors.items()}, V3["ff"], V3["ffid"], V3["pools"])


def test_v3_run_trains_exactly_its_rows_and_splices(world, tmp_path):
    result = train(_settings(world, tmp_path / "a.slot", steps=20, **V3))
    sel = _selection(world)
    slot = _rows_of(tmp_path / "a.slot")
    assert {n: rows for n, (rows, _) in slot.items()} == sel.rows
    assert read_slot(tmp_path / "a.slot").manifest.selection == {"algorithm": "v3", "ff": 0.1, "ffid": 3,
                                                                 "num_pools": 8}
    assert result.trained_params == sel.selected_params
    # Optimizer state in proportion to the rows: two fp32 moments per trained parameter.
    assert 8 * result.trained_params <= result.optimizer_bytes <= 8 * result.trained_params + 8 * len(slot)
    base = _base_tensors(world)
    assert any(not torch.equal(t, base[n][a:b]) for n, ((a, b), t) in slot.items())
    spliced = tmp_path / "spliced.safetensors"
    r = CliRunner().invoke(main, ["splice", str(world["base"]), str(tmp_path / "a.slot"), "-o", str(spliced), "-q"])
    assert r.exit_code == 0, r.output
    with safe_open(str(spliced), framework="pt") as f:
        tuned = {k: f.get_tensor(k) for k in f.keys()}
    for name, tensor in tuned.items():
        if name in slot:
            (a, b), rows = slot[name]
            assert torch.equal(tensor[:a], base[name][:a]) and torch.equal(tensor[b:], base[name][b:])
            assert torch.equal(tensor[a:b], rows)
        else:
            assert torch.equal(tensor, base[name]), name
    assert _fixed_loss(world, {n: tuned[n] for n in slot}) < _fixed_loss(world, {})
    r = CliRunner().invoke(main, ["verify", "-q", "--base", str(world["base"]), str(tmp_path / "a.slot"), str(spliced)])
    assert r.exit_code == 0, r.output


def test_outside_the_rows_the_model_stays_bit_identical():
    torch.manual_seed(0)
    model = wan.build_model(tiny.TINY_CONFIG, tiny.TINY_HEAD_DIM).requires_grad_(False)  # as load_base gives it
    reference = wan.build_model(tiny.TINY_CONFIG, tiny.TINY_HEAD_DIM)
    reference.load_state_dict(model.state_dict())
    before = {k: v.clone() for k, v in model.state_dict().items()}
    shapes = {n: tuple(t.shape) for n, t in wan.native_state_dict(model).items()}
    sel = select_v3(shapes, 0.125, 2, 8)
    slot = attach_slot(model, list(sel.tensors), torch.device("cpu"), torch.float32, sel.rows)
    latents, context = torch.randn(2, 16, 1, 4, 4), torch.randn(2, 8, 32)
    t, noise = torch.tensor([0.3, 0.7]), torch.randn(2, 16, 1, 4, 4)
    with torch.no_grad():  # untrained masters: the same function as the untouched model
        assert torch.allclose(flow_loss(model, latents, context, t, noise, torch.float32),
                              flow_loss(reference, latents, context, t, noise, torch.float32), atol=1e-6)
    opt = torch.optim.AdamW(slot.parameters_in_order(), lr=1e-2)
    for _ in range(3):
        flow_loss(model, latents, context, t, noise, torch.float32).sum().backward()
        opt.step()
        opt.zero_grad()
    for name in sel.tensors:
        a, b = sel.rows[name]
        assert slot[name].shape[0] == b - a and slot[name].grad is None
    assert all(p.grad is None for p in model.parameters())  # no gradient for any frozen row
    after = model.state_dict()
    assert set(after) == set(before)
    assert all(torch.equal(after[k], before[k]) for k in before)  # the frozen tensors were never written
    changed = [n for n in sel.tensors if not torch.equal(slot[n].detach(), before[wan.native_to_diffusers(n)][
        sel.rows[n][0]:sel.rows[n][1]])]
    assert changed
    with torch.no_grad():  # and the trained rows do reach the forward
        assert not torch.allclose(flow_loss(model, latents, context, t, noise, torch.float32),
                                  flow_loss(reference, latents, context, t, noise, torch.float32), atol=1e-6)


def test_v3_resume_continues_exactly_and_refuses_other_pools(world, tmp_path):
    (tmp_path / "straight").mkdir()
    train(_settings(world, tmp_path / "straight" / "s.slot", steps=3, **V3))
    train(_settings(world, tmp_path / "r.slot", steps=3, stop_after=1, **V3))
    with pytest.raises(SlotsmithError, match="another selection of rows"):
        train(_settings(world, tmp_path / "r.slot", steps=3, resume=True, **{**V3, "pools": 9}))
    train(_settings(world, tmp_path / "r.slot", steps=3, resume=True, **V3))
    a, b = _rows_of(tmp_path / "straight" / "s.slot"), _rows_of(tmp_path / "r.slot")
    assert all(a[n][0] == b[n][0] and torch.equal(a[n][1], b[n][1]) for n in a)


@pytest.mark.parametrize(
    "options", [dict(gradient_checkpointing=True, offload_blocks=True)], ids=["checkpointing+offload"]
)
def test_v3_memory_options_give_the_same_slot(world, tmp_path, options):
    (tmp_path / "plain").mkdir()
    train(_settings(world, tmp_path / "plain" / "plain.slot", **V3))
    train(_settings(world, tmp_path / "opt.slot", **V3, **options))
    a, b = _rows_of(tmp_path / "plain" / "plain.slot"), _rows_of(tmp_path / "opt.slot")
    assert all(a[n][0] == b[n][0] and torch.allclose(a[n][1], b[n][1], rtol=0, atol=1e-6) for n in a)


def test_v3_fp8_base_runs(world, tmp_path):
    train(_settings(world, tmp_path / "fp8.slot", steps=2, fp8_base=True, **V3))
    assert all(torch.isfinite(t).all() for _, t in _rows_of(tmp_path / "fp8.slot").values())


def test_v3_slots_of_one_pool_count_share_a_folder_and_others_are_refused(world, tmp_path):
    train(_settings(world, tmp_path / "a.slot", steps=1, **V3))
    train(_settings(world, tmp_path / "b.slot", steps=1, **{**V3, "ffid": 4}))  # another share: no clash
    with pytest.raises(SlotsmithError, match="pool count 8 differs from this run's 16"):
        train(_settings(world, tmp_path / "c.slot", steps=1, **{**V3, "pools": 16, "ffid": 6, "ff": 0.05}))


@pytest.mark.parametrize(
    "change,message",
    [
        (dict(ff=0.2), "the largest ff for --pools 8 is 0.125"),
        (dict(ffid=8), "--ffid 8 is out of range: pools are numbered 0..7"),
        (dict(pools=300), "--pools 300 is out of range"),
    ],
)
def test_v3_bad_settings_fail_before_loading(world, tmp_path, change, message):
    with pytest.raises(SlotsmithError) as info:
        train(_settings(world, tmp_path / "a.slot", **{**V3, **change}))
    assert message in str(info.value)


@pytest.mark.slow
def test_sixteen_characters_train_splice_and_verify_together(world, tmp_path):
    pools = 16
    slots = []
    for ffid in range(pools):
        out = tmp_path / f"char{ffid:02d}.slot"
        train(_settings(world, out, steps=1, batch_size=1, algorithm="v3", pools=pools, ff=1 / pools, ffid=ffid))
        slots.append(out)
    spliced = tmp_path / "all.safetensors"
    r = CliRunner().invoke(main, ["splice", str(world["base"]), *map(str, slots), "-o", str(spliced), "-q"])
    assert r.exit_code == 0, r.output
    r = CliRunner().invoke(main, ["verify", "--base", str(world["base"]), str(tmp_path)])
    assert r.exit_code == 0, r.output
    assert "disjoint" in r.output
    with safe_open(str(spliced), framework="pt") as f:
        tuned = {k: f.get_tensor(k) for k in f.keys()}
    base = _base_tensors(world)
    covered = {}
    for path in slots:
        for name, ((a, b), rows) in _rows_of(path).items():
            assert torch.equal(tuned[name][a:b], rows)
            covered.setdefault(name, []).append((a, b))
    # ff = 1/16 takes each pool's whole share: together the 16 slots cover every row of every sliceable tensor.
    for name, spans in covered.items():
        assert sorted(spans)[0][0] == 0 and sorted(spans)[-1][1] == base[name].shape[0]
        assert all(x[1] == y[0] for x, y in zip(sorted(spans), sorted(spans)[1:]))
    for name in set(base) - set(covered):
        assert base[name].shape[0] < pools and torch.equal(tuned[name], base[name])
