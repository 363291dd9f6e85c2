"""Hostile inputs to the torch side: resume state, cache, dataset YAML, a base's config.

Generated here, no committed binaries. Each case must be refused with one
``SlotsmithError`` line naming the file, fast, leaving inputs unchanged.
"""

from __future__ import annotations

import json
import os
import random
import time
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

from helpers import HANG_SECONDS, make_checkpoint
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from slotsmith.data.cache import (
    CachedDataset,
    load_index,
    write_index,
    write_latents,
    write_text,
)
from slotsmith.data.config import load_data_config
from slotsmith.errors import SlotsmithError
from slotsmith.inventory import inventory_from_checkpoint
from slotsmith.training.slot_params import SlotParams
from slotsmith.training.state import STATE_FORMAT, load_state, restore_state
from slotsmith.training.wan import HEAD_DIM, find_head_dim

LAUGHS = "a: &a [x, x, x, x, x, x, x, x, x]\n" + "".join(
    f"{chr(98 + i)}: &{chr(98 + i)} [{', '.join(['*' + chr(97 + i)] * 9)}]\n" for i in range(8)
)


def _refused(fn, *words):
    started = time.perf_counter()
    with pytest.raises(SlotsmithError) as e:
        fn()
    assert time.perf_counter() - started < HANG_SECONDS
    message = str(e.value)
    assert "\n" not in message and "Traceback" not in message
    for w in words:
        assert w in message, message
    return message


# ---- resume state ------------------------------------------------------------------------------

IDENTITY = {"ff": 0.1, "ffid": 0, "seed": 42, "tensors": ["a.weight"]}


def _good_state() -> dict:
    return {
        "format": STATE_FORMAT,
        "identity": json.dumps(IDENTITY, sort_keys=True),
        "step": 2,
        "masters": {"a.weight": torch.ones(3, 2)},
        "optimizer": {"state": {}, "param_groups": [{"lr": 1e-3, "params": [0]}]},
        "scaler": {},
        "rng": {"torch": torch.get_rng_state(), "python": list(random.getstate()[1])},
        "losses": [0.5, 0.25],
    }


def _save(tmp_path: Path, state) -> Path:
    path = tmp_path / "x.state"
    torch.save(state, path)
    return path


def _damage(**changes) -> dict:
    state = _good_state()
    for k, v in changes.items():
        if v is KeyError:
            del state[k]
        else:
            state[k] = v
    return state


DAMAGED = {
    "identity missing": _damage(identity=KeyError),
    "identity not JSON": _damage(identity="{not json"),
    "identity not a string": _damage(identity=7),
    "masters missing": _damage(masters=KeyError),
    "masters of other tensors": _damage(masters={"b.weight": torch.ones(3, 2)}),
    "master not a tensor": _damage(masters={"a.weight": [1.0]}),
    "master NaN": _damage(masters={"a.weight": torch.full((3, 2), float("nan"))}),
    "master inf": _damage(masters={"a.weight": torch.full((3, 2), float("inf"))}),
    "step a string": _damage(step="2"),
    "step negative": _damage(step=-1),
    "losses short": _damage(losses=[0.5]),
    "rng garbage": _damage(rng={"torch": torch.zeros(3, dtype=torch.uint8), "python": [1, 2]}),
    "rng missing": _damage(rng=KeyError),
    "optimizer garbage": _damage(optimizer="adam"),
    "not a mapping": [1, 2, 3],
}


@pytest.mark.parametrize("case", list(DAMAGED))
def test_damaged_resume_state_says_what_and_how_to_start_over(tmp_path, case):
    path = _save(tmp_path, DAMAGED[case])
    before = path.read_bytes()
    _refused(lambda: load_state(path, IDENTITY), str(path), "start over")
    assert path.read_bytes() == before


def test_good_state_loads_and_restores(tmp_path):
    path = _save(tmp_path, _good_state())
    state = load_state(path, IDENTITY)
    slot = SlotParams(["a.weight"], {"a.weight": torch.nn.Parameter(torch.zeros(3, 2))}, torch.float32)
    optimizer = torch.optim.AdamW(slot.parameters_in_order(), lr=1e-3)
    step, losses = restore_state(path, state, slot, optimizer, None)
    assert step == 2 and losses == [0.5, 0.25] and torch.equal(slot["a.weight"].detach(), torch.ones(3, 2))


def test_state_of_the_wrong_shape_is_refused_at_restore(tmp_path):
    path = _save(tmp_path, _good_state())
    state = load_state(path, IDENTITY)
    slot = SlotParams(["a.weight"], {"a.weight": torch.nn.Parameter(torch.zeros(4, 2))}, torch.float32)
    optimizer = torch.optim.AdamW(slot.parameters_in_order(), lr=1e-3)
    _refused(lambda: restore_state(path, state, slot, optimizer, None), "damaged training state", "[3, 2]")
    assert torch.equal(slot["a.weight"].detach(), torch.zeros(4, 2))  # nothing half-restored


def test_state_that_is_a_fifo_is_refused(tmp_path):
    path = tmp_path / "x.state"
    os.mkfifo(path)
    _refused(lambda: load_state(path, IDENTITY), "not a regular file")


_VALUES = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True),
    st.text(max_size=20),
    st.lists(st.integers(min_value=-5, max_value=5), max_size=5),
    st.dictionaries(st.text(max_size=5), st.integers(), max_size=3),
    st.builds(lambda n, v: torch.full((n, 2), v), st.integers(min_value=0, max_value=4),
              st.floats(allow_nan=True, allow_infinity=True, width=32)),
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(field=st.sampled_from(sorted(_good_state())), value=_VALUES)
def test_fuzzed_resume_state_is_loaded_or_refused_cleanly(tmp_path, field, value):
    state = _good_state()
    state[field] = value
    path = _save(tmp_path, state)
    try:
        loaded = load_state(path, IDENTITY)
    except SlotsmithError as e:
        assert "\n" not in str(e) and str(path) in str(e)
        return
    # What loads must be usable: finite masters of the slot's tensors, a step count, its losses.
    assert set(loaded["masters"]) == set(IDENTITY["tensors"])
    assert all(torch.isfinite(t).all() for t in loaded["masters"].values())
    assert isinstance(loaded["step"], int) and len(loaded["losses"]) == loaded["step"]


# ---- cache ---------------------------------------------------------------------------------------


def _cache(tmp_path: Path, latents: torch.Tensor, repeats: int = 1) -> Path:
    cache = tmp_path / "cache"
    cache.mkdir()
    lat = write_latents(cache, "ab", latents)
    txt = write_text(cache, "cd", torch.zeros(3, 8))
    write_index(cache, [{"latents": lat, "text": txt, "repeats": repeats}], latents.shape[0], 8)
    return cache


def test_cache_with_nan_latents_is_refused_before_training_on_it(tmp_path):
    cache = _cache(tmp_path, torch.full((4, 1, 2, 2), float("nan")))
    dataset = CachedDataset(cache)
    _refused(lambda: dataset[0], "non-finite", "latents")


def test_cache_index_with_huge_repeats_is_refused(tmp_path):
    cache = _cache(tmp_path, torch.zeros(4, 1, 2, 2))
    index = cache / "index.json"
    doc = json.loads(index.read_text())
    doc["items"][0]["repeats"] = 10**10
    index.write_text(json.dumps(doc))
    _refused(lambda: load_index(cache), "repeats", "10000")


def test_cache_index_nested_20000_levels_is_refused(tmp_path):
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / "index.json").write_text('{"items": ' + "[" * 20000 + "]" * 20000 + "}")
    _refused(lambda: load_index(cache), "index.json", "JSON")


def test_cache_index_that_links_to_dev_zero_is_refused(tmp_path):
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / "index.json").symlink_to("/dev/zero")
    _refused(lambda: load_index(cache), "not a regular file")


# ---- dataset YAML --------------------------------------------------------------------------------


def _dataset(tmp_path: Path, text: str) -> Path:
    (tmp_path / "img").mkdir(exist_ok=True)
    path = tmp_path / "data.yaml"
    path.write_text(text)
    return path


DATASETS = {
    "resolution 16384x16384": ("datasets:\n  - image_directory: img\n    resolution: [16384, 16384]\n", "limit"),
    "repeats 10^10": ("datasets:\n  - image_directory: img\n    resolution: [64, 64]\n    repeats: 10000000000\n",
                      "limit of 10000"),
    "billion laughs": (LAUGHS + "datasets: *i\n", "aliases"),
    "nested 20000 levels": ("datasets: " + "[" * 20000 + "]" * 20000 + "\n", "YAML"),
    "400-digit number": ("datasets:\n  - image_directory: img\n    resolution: [64, 64]\n    repeats: "
                         + "9" * 400 + "\n", "digits"),
}


@pytest.mark.parametrize("case", list(DATASETS))
def test_hostile_dataset_yaml_is_refused(tmp_path, case):
    text, word = DATASETS[case]
    path = _dataset(tmp_path, text)
    _refused(lambda: load_data_config(path), str(path), word)
    assert path.read_text() == text


_JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=20,
)


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(doc=_JSON, dataset=st.dictionaries(st.sampled_from(["resolution", "repeats", "batch_size", "target_frames",
                                                            "frame_extraction", "enable_bucket"]), _JSON))
def test_fuzzed_dataset_yaml_is_read_or_refused_cleanly(tmp_path, doc, dataset):
    (tmp_path / "img").mkdir(exist_ok=True)
    path = tmp_path / "data.yaml"
    for text in (json.dumps(doc), json.dumps({"datasets": [{"image_directory": "img", **dataset}]})):
        path.write_text(text)  # JSON is YAML
        try:
            load_data_config(path)
        except SlotsmithError as e:
            assert "\n" not in str(e) and str(path) in str(e)


def test_dataset_yaml_that_is_a_fifo_is_refused(tmp_path):
    path = tmp_path / "data.yaml"
    os.mkfifo(path)
    _refused(lambda: load_data_config(path), "not a regular file")


# ---- a base's config.json and metadata config ----------------------------------------------------


@pytest.fixture
def base(tmp_path):
    folder = tmp_path / "base"
    folder.mkdir()
    return make_checkpoint(folder / "dit.safetensors").path


CONFIGS = {
    "nested 20000 levels": ('{"x": ' + "[" * 20000 + "]" * 20000 + "}", "JSON"),
    "5000-digit integer": ('{"attention_head_dim": ' + "9" * 5000 + "}", "digits"),
    "boolean head size": ('{"attention_head_dim": true}', "head size"),
    "huge head size": ('{"dim": 5120, "num_heads": 1}', "head size"),
}


@pytest.mark.parametrize("case", list(CONFIGS))
def test_hostile_config_json_is_refused(base, case):
    text, word = CONFIGS[case]
    (base.parent / "config.json").write_text(text)
    _refused(lambda: find_head_dim(inventory_from_checkpoint(base)), "config.json", word)


def test_config_json_that_is_a_link_loop_is_refused(base):
    (base.parent / "config.json").symlink_to(base.parent / "config.json")
    _refused(lambda: find_head_dim(inventory_from_checkpoint(base)), "symbolic links")


def test_unreadable_metadata_config_is_ignored_but_a_bad_head_size_is_refused(tmp_path):
    deep = make_checkpoint(tmp_path / "deep.safetensors", metadata={"config": "[" * 5000 + "]" * 5000}).path
    assert find_head_dim(inventory_from_checkpoint(deep)) == HEAD_DIM
    bad = make_checkpoint(tmp_path / "bad.safetensors", metadata={"config": '{"attention_head_dim": true}'}).path
    _refused(lambda: find_head_dim(inventory_from_checkpoint(bad)), "metadata 'config'", "head size")



def test_hostile_captions_and_jsonl_lines_are_bad_items_not_hangs(tmp_path):
    from media import write_image

    from slotsmith.data.media import discover

    img = tmp_path / "img"
    img.mkdir()
    write_image(img / "fifo.png")
    os.mkfifo(img / "fifo.txt")  # reading it would block forever
    write_image(img / "zero.png")
    (img / "zero.txt").symlink_to("/dev/zero")  # reading it would never end
    write_image(img / "good.png")
    (img / "good.txt").write_text("a cat")
    lines = ['{"path": "img/good.png", "caption": "a" }', "[" * 5000 + "]" * 5000, '{"x": ' + "9" * 5000 + "}"]
    (tmp_path / "list.jsonl").write_text("\n".join(lines) + "\n")
    path = _dataset(tmp_path, "datasets:\n  - image_directory: img\n    resolution: [64, 64]\n"
                              "  - jsonl_file: list.jsonl\n    resolution: [64, 64]\n")
    started = time.perf_counter()
    sources, bad = discover(load_data_config(path))
    assert time.perf_counter() - started < HANG_SECONDS
    assert sorted(s.path.name for s in sources) == ["good.png", "good.png"]
    reasons = sorted(f"{b.path.name} {b.problem}" for b in bad)
    assert [r.split()[0] for r in reasons] == ["fifo.png", "list.jsonl:2", "list.jsonl:3", "zero.png"], reasons
    assert all("not valid JSON" in r for r in reasons if "jsonl" in r)
