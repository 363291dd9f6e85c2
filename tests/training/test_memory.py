"""The trainer's memory estimate, its early refusal and its end-of-run figures (tiny model, no weights read)."""

import dataclasses

import pytest
import torch

from slotsmith.demo import tiny
from slotsmith.errors import SlotsmithError
from slotsmith.layout import wan_tensor_shapes
from slotsmith.names import native_to_diffusers
from slotsmith.select import select_v2
from slotsmith.train import TrainSettings
from slotsmith.training import memory, wan
from slotsmith.training.knobs import ALL_BLOCKS

CFG = dataclasses.replace(tiny.TINY_CONFIG, num_layers=8)
"""Enough blocks for offloading and checkpointing to pay (with 2, two blocks are the whole model)."""


class _Inventory:
    """What ``estimate`` reads of an inventory: tensor numels and the file's tensor sizes."""

    def __init__(self):
        from types import SimpleNamespace

        shapes = wan_tensor_shapes(CFG)
        self.tensors = {n: SimpleNamespace(numel=torch.Size(s).numel()) for n, s in shapes.items()}
        infos = {n: SimpleNamespace(nbytes=2 * torch.Size(s).numel()) for n, s in shapes.items()}
        self.checkpoint = SimpleNamespace(tensors={n: (None, i) for n, i in infos.items()})


def _estimate(fp8=False, device="cpu", offload=0, checkpointing=False, latent=(16, 1, 8, 8)):
    inventory = _Inventory()
    slot = list(select_v2({n: t.numel for n, t in inventory.tensors.items()}, 0.05, 1).tensors)
    model, compute = wan.empty_training_model(CFG, tiny.TINY_HEAD_DIM, torch.bfloat16, fp8)
    return memory.estimate(
        model, inventory, CFG, slot, device=torch.device(device), compute_dtype=compute, offload_blocks=offload,
        checkpointing=checkpointing, optimizer="adamw", latent=latent, batch=1, runtime_bytes=10**8,
    ), slot


def test_fp8_halves_the_frozen_weights_and_the_slot_is_counted_apart():
    (plain, slot), (fp8, _) = _estimate(), _estimate(fp8=True)
    total = sum(t.numel for t in _Inventory().tensors.values())
    slot_numel = sum(_Inventory().tensors[n].numel for n in slot)
    assert plain.parts["frozen weights"] == ("host", 2 * (total - slot_numel))
    # Norms and embeddings stay bf16 under layerwise casting: a bit over half.
    assert 0.5 < fp8.parts["frozen weights"][1] / plain.parts["frozen weights"][1] < 0.75
    assert plain.parts["slot (masters, grads, optimizer)"] == ("host", slot_numel * (8 + 8 + 2))
    assert plain.device is None and plain.host == sum(n for _, n in plain.parts.values())
    # A float8 block is cast to bf16 while it runs: one block's worth at 2 bytes a weight.
    block = sum(t.numel for n, t in _Inventory().tensors.items() if n.startswith("blocks.1."))
    assert plain.parts["cast block"][1] == 0 and 0 < fp8.parts["cast block"][1] <= 2 * block


def test_offload_keeps_the_frozen_weights_on_the_host_of_a_gpu_run():
    (on_device, _), (offloaded, _) = _estimate(device="cuda"), _estimate(device="cuda", offload=ALL_BLOCKS)
    frozen = on_device.parts["frozen weights"][1]
    assert on_device.parts["frozen weights"] == ("device", frozen)
    assert offloaded.parts["offloaded weights"] == ("host", frozen)
    assert offloaded.host - on_device.host == frozen
    assert offloaded.device < on_device.device


def test_offloading_the_last_n_blocks_moves_just_those_to_the_host():
    (on_device, slot), (one, _) = _estimate(device="cuda"), _estimate(device="cuda", offload=1)
    (three, _), (every, _) = _estimate(device="cuda", offload=3), _estimate(device="cuda", offload=ALL_BLOCKS)
    last = CFG.num_layers - 1
    # Frozen bytes of the last block, bf16, counted from the inventory apart from the code under test.
    last_block = 2 * sum(t.numel for n, t in _Inventory().tensors.items()
                         if n.startswith(f"blocks.{last}.") and n not in slot)
    assert one.host - on_device.host == last_block
    assert one.parts["frozen weights"] == ("device", on_device.parts["frozen weights"][1] - last_block)
    # One offloaded block is on the device only while it runs; with three, at most two of them are.
    assert one.device == on_device.device and on_device.device > three.device > every.device
    assert on_device.host < one.host < three.host < every.host


def test_activations_grow_with_tokens_and_checkpointing_keeps_fewer():
    small = memory.activation_bytes(CFG, (16, 1, 8, 8), 1, 16, 2, False, False)
    assert memory.activation_bytes(CFG, (16, 4, 8, 8), 1, 16, 2, False, False) > 3 * small
    assert memory.activation_bytes(CFG, (16, 1, 8, 8), 1, 16, 2, True, False) < small


def _fake(host, device=None):
    return memory.MemoryEstimate(host, device)


def test_refusal_names_the_fewest_options_that_fit(monkeypatch):
    monkeypatch.delenv(memory.SKIP_ENV, raising=False)
    sizes = {(): 31e9, ("fp8_base",): 18e9, ("offload_blocks",): 31e9, ("gradient_checkpointing",): 28e9}

    def alternative(options):
        return _fake(int(sizes.get(tuple(sorted(options)), 17e9)))

    memory.check_fits(_fake(20 * 10**9), alternative, TrainSettings(), 24 * 10**9, None)  # fits: no error
    with pytest.raises(SlotsmithError) as e:
        memory.check_fits(_fake(int(31e9)), alternative, TrainSettings(), 24 * 10**9, None)
    assert str(e.value) == (
        f"this run needs ~31.0 GB of RAM, this machine has 24.0 GB available: add --fp8-base "
        f"(or set {memory.SKIP_ENV}=1 to try anyway)"
    )
    with pytest.raises(SlotsmithError, match="no combination of --fp8-base"):
        memory.check_fits(_fake(int(31e9)), alternative, TrainSettings(), 10**9, None)
    with pytest.raises(SlotsmithError, match=r"needs ~9\.0 GB of device memory, this machine has 8\.0 GB"):
        memory.check_fits(_fake(10**9, 9 * 10**9), lambda o: _fake(10**9, 9 * 10**9), TrainSettings(), None, 8 * 10**9)
    monkeypatch.setenv(memory.SKIP_ENV, "1")
    memory.check_fits(_fake(int(31e9)), alternative, TrainSettings(), 24 * 10**9, None)


def test_measured_line_puts_the_peak_beside_the_estimate():
    line = memory.measured(_fake(2 * 10**9), torch.device("cpu"), "device cpu, weights bfloat16")
    assert line.startswith("memory: peak host RSS ") and "(estimated 2.0 GB)" in line
    assert line.endswith("; device cpu, weights bfloat16")
    assert memory.peak_rss() > 0 and memory.rss_now() > 0


def test_available_host_memory_is_read_from_meminfo():
    assert memory.available_host_bytes() > 0


def test_slot_names_map_onto_the_empty_model():
    # The estimate leaves the slot out by its diffusers name: every canonical name must find its parameter.
    model, _ = wan.empty_training_model(CFG, tiny.TINY_HEAD_DIM, torch.bfloat16, True)
    params = dict(model.named_parameters())
    assert all(native_to_diffusers(n) in params for n in wan_tensor_shapes(CFG))
