"""Selection v3 (sliced slots): the issue's done-when figures and its invariants."""

import itertools
import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from slotsmith.errors import SlotsmithError
from slotsmith.inventory import load_inventory
from slotsmith.names import block_of
from slotsmith.select import select, select_v3


@pytest.fixture(scope="module")
def a14b():
    return {n: t.shape for n, t in load_inventory("wan2.2-t2v-a14b").tensors.items()}


def _row(shape):
    return math.prod(shape[1:])


def _block_shares(shapes, s):
    whole, taken = {}, {}
    for name, shape in shapes.items():
        block = block_of(name)
        if block is not None:
            whole[block] = whole.get(block, 0) + math.prod(shape)
    for name, (a, b) in s.rows.items():
        block = block_of(name)
        if block is not None:
            taken[block] = taken.get(block, 0) + (b - a) * _row(shapes[name])
    return {block: taken.get(block, 0) / whole[block] for block in whole}


@pytest.mark.parametrize("ff", [0.001, 0.01, 0.05, 0.125])
def test_done_when_a14b_eight_pools(a14b, ff):
    for ffid in range(8):
        s = select_v3(a14b, ff, ffid, 8)
        sliceable = {n: a14b[n] for n in a14b if a14b[n][0] >= 8}
        assert s.sliceable_params == sum(math.prod(v) for v in sliceable.values())
        assert s.target_params == math.floor(ff * s.sliceable_params)
        assert s.selected_params == sum((b - a) * _row(a14b[n]) for n, (a, b) in s.rows.items())
        assert abs(s.selected_params - s.target_params) <= max(_row(v) for v in sliceable.values())
        shares = _block_shares(a14b, s)
        assert len(shares) == 40
        for block, share in shares.items():
            assert abs(share - ff) <= 0.05 * ff, (ffid, block, share)


def test_every_pool_at_most_ff_takes_its_whole_share_when_rows_divide(a14b):
    # Every A14B first dimension is a multiple of 8, so ff = 1/8 is each tensor's whole share, exactly S/8.
    s = select_v3(a14b, 0.125, 5, 8)
    assert s.selected_params == s.target_params == s.sliceable_params // 8
    assert s.rows["blocks.0.self_attn.q.weight"] == (5 * 5120 // 8, 6 * 5120 // 8)


def test_sixty_four_pools(a14b):
    for ffid in (0, 31, 63):
        s = select_v3(a14b, 0.01, ffid, 64)
        assert abs(s.selected_params - s.target_params) <= 13824
        start, stop = s.rows["blocks.7.ffn.0.weight"]
        assert ffid * 13824 // 64 == start and stop - start in (138, 139)  # 0.01 * 13824 = 138.24


def test_left_out_are_the_tensors_with_fewer_rows_than_pools(a14b):
    s = select_v3(a14b, 0.01, 0, 8)
    assert set(s.left_out) == {n for n, shape in a14b.items() if shape[0] < 8}
    assert "blocks.3.modulation" in s.left_out and "head.modulation" in s.left_out
    assert not set(s.left_out) & set(s.tensors)
    wide = select_v3(a14b, 0.001, 0, 128)
    assert "head.head.weight" in wide.left_out  # 64 rows, fewer than 128 pools


def test_each_tensor_gets_its_fraction_to_within_one_row(a14b):
    ff = 0.01
    s = select_v3(a14b, ff, 2, 8)
    for name in s.pool:
        a, b = s.rows.get(name, (0, 0))
        assert math.floor(ff * a14b[name][0]) <= b - a <= math.ceil(ff * a14b[name][0])


def test_deterministic_and_order_free(a14b):
    assert select_v3(a14b, 0.02, 4, 8) == select_v3(dict(reversed(list(a14b.items()))), 0.02, 4, 8)


@pytest.mark.parametrize(
    "ff,ffid,pools,message",
    [
        (0.2, 0, 8, "largest ff for --pools 8 is 0.125"),
        (0.07, 0, 16, "largest ff for --pools 16 is 0.0625"),
        (0.01, 8, 8, "--ffid 8 is out of range: pools are numbered 0..7"),
        (0.01, -1, 8, "out of range"),
        (0.01, 0, 1, "--pools 1 is out of range"),
        (0.001, 0, 257, "--pools 257 is out of range"),
        (0, 0, 8, "--ff 0 is out of range"),
        (math.nan, 0, 8, "out of range"),
    ],
)
def test_bad_input(a14b, ff, ffid, pools, message):
    with pytest.raises(SlotsmithError) as info:
        select_v3(a14b, ff, ffid, pools)
    assert message in str(info.value)


def test_largest_ff_named_is_accepted(a14b):
    s = select_v3(a14b, 1 / 12, 11, 12)
    assert s.selected_params > 0


def test_nothing_sliceable_is_refused():
    with pytest.raises(SlotsmithError, match="no tensor can be sliced into 16 pools.*longest is 12"):
        select_v3({"a.weight": (12, 4), "b": (3,), "c": ()}, 0.01, 0, 16)


def test_v2_refuses_other_pool_counts_and_dispatch_runs_both(a14b):
    with pytest.raises(SlotsmithError, match="v2 always has 8 pools"):
        select(a14b, 0.01, 0, "v2", 16)
    with pytest.raises(SlotsmithError, match="not one of v2, v3"):
        select(a14b, 0.01, 0, "v4", 8)
    assert select(a14b, 0.01, 2, "v2").tensors[0] == "blocks.0.cross_attn.q.bias"  # spec's worked example
    assert select(a14b, 0.01, 2, "v3", 8) == select_v3(a14b, 0.01, 2, 8)


_shape = st.tuples(st.integers(0, 300), st.integers(1, 5)) | st.tuples(st.integers(0, 300))


@settings(max_examples=80, deadline=None)
@given(
    shapes=st.dictionaries(st.sampled_from([f"blocks.{b}.t{i}" for b in range(4) for i in range(4)] + ["x", "y"]),
                           _shape, min_size=1, max_size=18),
    pools=st.integers(2, 40),
    data=st.data(),
)
def test_any_two_ffids_are_disjoint_whatever_their_ff(shapes, pools, data):
    if not any(s[0] >= pools for s in shapes.values()):
        with pytest.raises(SlotsmithError, match="no tensor can be sliced"):
            select_v3(shapes, 1 / pools, 0, pools)
        return
    chosen = {}
    for ffid in data.draw(st.lists(st.integers(0, pools - 1), min_size=2, max_size=4, unique=True)):
        ff = data.draw(st.floats(1e-4, 1 / pools))
        s = select_v3(shapes, ff, ffid, pools)
        for name, (a, b) in s.rows.items():
            rows = shapes[name][0]
            assert ffid * rows // pools <= a < b <= (ffid + 1) * rows // pools  # inside its own share
        chosen[ffid] = s
    for a, b in itertools.combinations(chosen.values(), 2):
        for name in set(a.rows) & set(b.rows):
            (a0, a1), (b0, b1) = a.rows[name], b.rows[name]
            assert a1 <= b0 or b1 <= a0
