"""Slot selection: which tensors (or rows of them) ``--ff F --ffid K`` picks.

``select_v2`` is the musubi-compatible "Selection Algorithm v2.0", exactly as
``docs/selection-v2.md`` describes it: whole tensors, 8 pools, the default.
``select_v3`` slices: every tensor with at least N rows is cut into N shares
and a slot takes a prefix of its share's rows, fraction F of every tensor
(``docs/selection-v3.md``). Both are pure functions of the tensors' names and
sizes, so they run on a layout as well as on a real checkpoint.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from fractions import Fraction

from slotsmith.errors import SlotsmithError
from slotsmith.names import block_of

ALGORITHM = "v2"
NUM_POOLS = 8
"""v2's pool count, and v3's default ``--pools``."""
V3 = "v3"
MIN_POOLS_V3, MAX_POOLS_V3 = 2, 256

_QKVO_RANK = {"v": 0, "k": 1, "o": 2, "q": 3}


@dataclass(frozen=True)
class Selection:
    """The outcome of one selection.

    Attributes:
        algorithm: Algorithm name (``"v2"`` or ``"v3"``).
        ff: Fraction of the model asked for.
        ffid: Pool id.
        num_pools: Number of disjoint pools.
        total_params: Parameters in the whole model.
        target_params: The budget: v2 ``max(1, floor(total * ff))``, v3
            ``floor(ff * sliceable_params)``.
        pool: Every tensor of the pool, in candidate (draft) order (v3: every
            sliceable tensor, in apportioning order).
        pool_params: Parameters in the whole pool (v3: in this ffid's shares).
        tensors: The selected tensors, in selection order.
        selected_params: Parameters selected.
        rows: v3: tensor -> ``(start, stop)`` of the rows taken (every
            selected tensor has an entry); empty for v2 (whole tensors).
        left_out: v3: tensors with fewer rows than pools, which v3 never takes.
        sliceable_params: v3: parameters of the tensors v3 can slice (S).
    """

    algorithm: str
    ff: float
    ffid: int
    num_pools: int
    total_params: int
    target_params: int
    pool: tuple[str, ...]
    pool_params: int
    tensors: tuple[str, ...]
    selected_params: int
    rows: dict[str, tuple[int, int]] = field(default_factory=dict)
    left_out: tuple[str, ...] = ()
    sliceable_params: int = 0

    @property
    def overshoot(self) -> float:
        """Selected parameters as a multiple of the target."""
        return self.selected_params / self.target_params

    def record(self) -> dict:
        """How the tensors were chosen, as a slot's manifest records it."""
        return {"algorithm": self.algorithm, "ff": self.ff, "ffid": self.ffid, "num_pools": self.num_pools}


def _local(name: str) -> str:
    block = block_of(name)
    return name if block is None else name.split(".", 2)[2]


def tensor_class(local: str) -> int:
    """The v2 class of a tensor from its local name (first match wins)."""
    attn_or_ffn = "attn" in local or "ffn" in local
    if attn_or_ffn and "weight" in local:
        return 0
    if attn_or_ffn and "bias" in local:
        return 1
    if "norm" in local:
        return 2
    return 3


def pools_v2(numels: Mapping[str, int], num_pools: int = NUM_POOLS) -> list[list[str]]:
    """Deal every tensor into ``num_pools`` disjoint pools (steps 1-5 of the spec).

    Returns:
        ``pools[k]`` lists pool k's tensors in global order.
    """
    order = sorted(numels, key=lambda n: (tensor_class(_local(n)), numels[n], n))
    return [order[k::num_pools] for k in range(num_pools)]


def _in_block_key(name: str, numel: int) -> tuple:
    # Spec step 7. The spec's two key shapes never meet at equal numel in Wan;
    # the middle element keeps the order total for any other model.
    local = _local(name)
    parts = local.split(".")
    if "attn" in local and "weight" in local and len(parts) >= 2 and parts[-2] in _QKVO_RANK:
        return (numel, 0, _QKVO_RANK[parts[-2]], name)
    return (numel, 1, 0, name)


def draft_order(pool: list[str], numels: Mapping[str, int]) -> list[str]:
    """Order a pool into the candidate list (spec steps 6-8)."""
    blocks: dict[int, list[str]] = {}
    rest: list[str] = []
    for name in pool:
        block = block_of(name)
        if block is None:
            rest.append(name)
        else:
            blocks.setdefault(block, []).append(name)
    queues = [sorted(blocks[b], key=lambda n: _in_block_key(n, numels[n])) for b in sorted(blocks)]
    candidates = []
    for round_ in range(max((len(q) for q in queues), default=0)):
        candidates.extend(q[round_] for q in queues if round_ < len(q))
    candidates.extend(sorted(rest, key=lambda n: (numels[n], n)))
    return candidates


def max_ff(pool_params: int, total_params: int) -> float:
    """The largest ff (to 6 significant digits, rounded down) a pool can serve."""
    exact = pool_params / total_params
    scale = 10 ** (5 - math.floor(math.log10(exact)))
    return math.floor(exact * scale) / scale


def check_ff_ffid(ff: float, ffid: int, num_pools: int = NUM_POOLS) -> None:
    """Refuse an ``ff`` outside (0, 1] or an ``ffid`` outside the pools.

    Raises:
        SlotsmithError: Names the option and its range.
    """
    if not 0 <= ffid < num_pools or isinstance(ffid, bool):
        shown = ffid if abs(ffid) < 10**12 else "(a huge number)"
        raise SlotsmithError(f"--ffid {shown} is out of range: pools are numbered 0..{num_pools - 1}")
    if not (isinstance(ff, (int, float)) and 0 < ff <= 1):
        raise SlotsmithError(f"--ff {ff} is out of range: it must be in (0, 1]")


def select_v2(numels: Mapping[str, int], ff: float, ffid: int, num_pools: int = NUM_POOLS) -> Selection:
    """Select the slot ``--ff ff --ffid ffid`` of a model.

    Args:
        numels: Canonical tensor name -> number of elements, for every tensor
            of the model.
        ff: Fraction of the model's parameters, in (0, 1].
        ffid: Pool id, in ``0 .. num_pools - 1``.
        num_pools: Number of disjoint pools (8 in v2).

    Returns:
        The selection.

    Raises:
        SlotsmithError: ``ff`` or ``ffid`` out of range, an empty model, or a
            budget beyond the pool's capacity (the message names the largest
            ff the pool can serve).
    """
    check_ff_ffid(ff, ffid, num_pools)
    if not numels:
        raise SlotsmithError("the model has no tensors to select from")
    total = sum(numels.values())
    target = max(1, math.floor(total * ff))
    pool = draft_order(pools_v2(numels, num_pools)[ffid], numels)
    pool_params = sum(numels[n] for n in pool)
    if pool_params < target:
        limit = max_ff(pool_params, total) if pool_params else 0
        raise SlotsmithError(
            f"--ff {ff} asks for {target:,} parameters but pool {ffid} holds only {pool_params:,}; "
            f"the largest ff this pool can serve is {limit:g}"
        )
    selected, cumulative = [], 0
    for name in pool:
        selected.append(name)
        cumulative += numels[name]
        if cumulative >= target:
            break
    return Selection(
        ALGORITHM, ff, ffid, num_pools, total, target, tuple(pool), pool_params, tuple(selected), cumulative
    )


def shared_tensors(a: Selection, b: Selection) -> list[str]:
    """The tensors two selections share rows of, sorted (a whole-tensor selection holds every row)."""
    shared = []
    for name in sorted(set(a.tensors) & set(b.tensors)):
        ra, rb = a.rows.get(name), b.rows.get(name)
        if ra is None or rb is None or max(ra[0], rb[0]) < min(ra[1], rb[1]):
            shared.append(name)
    return shared


def check_pools(algorithm: str, ffid: int, num_pools: int) -> None:
    """Refuse an unknown algorithm, a pool count it does not have, or an ffid outside the pools.

    Raises:
        SlotsmithError: Names the option and its range.
    """
    if algorithm not in ALGORITHMS:
        raise SlotsmithError(f"--algorithm {algorithm!r} is not one of {', '.join(ALGORITHMS)}")
    if algorithm == ALGORITHM and num_pools != NUM_POOLS:
        raise SlotsmithError(f"--pools {num_pools}: selection v2 always has {NUM_POOLS} pools (use --algorithm v3)")
    if isinstance(num_pools, bool) or not MIN_POOLS_V3 <= num_pools <= MAX_POOLS_V3:
        raise SlotsmithError(f"--pools {num_pools} is out of range: v3 takes {MIN_POOLS_V3}..{MAX_POOLS_V3} pools")
    if isinstance(ffid, bool) or not 0 <= ffid < num_pools:
        raise SlotsmithError(f"--ffid {ffid} is out of range: pools are numbered 0..{num_pools - 1}")


def check_selection_args(algorithm: str, ff: float, ffid: int, num_pools: int = NUM_POOLS) -> None:
    """Refuse what ``select`` would refuse before looking at a model: bad algorithm, pools, ffid or ff.

    Raises:
        SlotsmithError: Names the option and its range (for v3, an ff above
            ``1/num_pools`` names the largest ff that pool count allows).
    """
    check_pools(algorithm, ffid, num_pools)
    if algorithm == ALGORITHM:
        check_ff_ffid(ff, ffid, num_pools)
        return
    if not (isinstance(ff, (int, float)) and not isinstance(ff, bool) and ff > 0):
        raise SlotsmithError(f"--ff {ff} is out of range: it must be in (0, 1/{num_pools}]")
    if ff > 1 / num_pools:
        raise SlotsmithError(
            f"--ff {ff} is more than {num_pools} pools allow: each pool holds 1/{num_pools} of every sliceable "
            f"tensor, so the largest ff for --pools {num_pools} is {1 / num_pools:g}"
        )


def share_rows(rows: int, ffid: int, num_pools: int) -> tuple[int, int]:
    """Pool ``ffid``'s contiguous share of a tensor's ``rows`` rows: ``floor(K*R/N) .. floor((K+1)*R/N)``."""
    return (ffid * rows // num_pools, (ffid + 1) * rows // num_pools)


def _apportion_order(names) -> list[str]:
    # Blocks in numeric order (names sort "blocks.10" before "blocks.2"), then the
    # tensors outside blocks; by name inside each group.
    return sorted(names, key=lambda n: (block_of(n) is None, block_of(n) or 0, n))


def select_v3(
    shapes: Mapping[str, tuple[int, ...]], ff: float, ffid: int, num_pools: int = NUM_POOLS
) -> Selection:
    """Select the sliced slot ``--algorithm v3 --pools N --ffid K --ff F`` of a model.

    Every tensor whose first dimension R is at least N is cut along it into N
    contiguous shares; the slot takes a prefix of share K of every such
    tensor, ``floor(F*R)`` or ``ceil(F*R)`` rows. Which tensors round up is
    decided by a carried remainder, tensor by tensor in block order, so the
    running total never strays more than half a row from ``F`` times the
    parameters seen so far: each block gets ``F`` of its parameters to
    within one row, the whole slot ``floor(F*S)`` to within one row of the
    largest row (``docs/selection-v3.md``).

    Args:
        shapes: Canonical tensor name -> shape, for every tensor of the model.
        ff: Fraction of the sliceable parameters, in ``(0, 1/num_pools]``.
        ffid: Pool id, in ``0 .. num_pools - 1``.
        num_pools: N, in ``2 .. 256``.

    Returns:
        The selection (``rows`` holds every selected tensor's row range).

    Raises:
        SlotsmithError: ``ff``, ``ffid`` or ``num_pools`` out of range (an ff
            above ``1/num_pools`` names the largest ff N allows), or no tensor
            with at least N rows.
    """
    check_selection_args(V3, ff, ffid, num_pools)
    # Exact arithmetic: the float 1/N may exceed the rational 1/N by an ulp.
    fraction = min(Fraction(ff), Fraction(1, num_pools))
    numels = {n: math.prod(s) for n, s in shapes.items()}
    sliceable = _apportion_order(n for n, s in shapes.items() if len(s) >= 1 and s[0] >= num_pools and numels[n])
    if not sliceable:
        largest = max((s[0] for s in shapes.values() if len(s) >= 1), default=0)
        raise SlotsmithError(
            f"no tensor can be sliced into {num_pools} pools: v3 needs a first dimension of at least {num_pools} "
            f"rows and the model's longest is {largest}"
        )
    left_out = tuple(sorted(set(shapes) - set(sliceable)))
    total = sum(numels.values())
    sliceable_params = sum(numels[n] for n in sliceable)
    target = math.floor(fraction * sliceable_params)
    ideal = Fraction(0)  # F times the parameters of the tensors apportioned so far
    taken = 0
    rows: dict[str, tuple[int, int]] = {}
    pool_params = 0
    for name in sliceable:
        length = shapes[name][0]
        row = numels[name] // length
        start, stop = share_rows(length, ffid, num_pools)
        pool_params += (stop - start) * row
        ideal += fraction * numels[name]
        count = math.floor(fraction * length)  # <= floor(R/N) <= the share's length
        # Round up when that brings the running total nearer the ideal (ties down), room permitting.
        if start + count < stop and ideal - (taken + count * row) > Fraction(row, 2):
            count += 1
        taken += count * row
        if count:
            rows[name] = (start, start + count)
    tensors = tuple(rows)
    return Selection(
        V3, ff, ffid, num_pools, total, target, tuple(sliceable), pool_params, tensors, taken,
        rows, left_out, sliceable_params,
    )


def select(
    shapes: Mapping[str, tuple[int, ...]], ff: float, ffid: int, algorithm: str = ALGORITHM,
    num_pools: int = NUM_POOLS,
) -> Selection:
    """Run the named selection algorithm on a model's shapes.

    Args:
        shapes: Canonical tensor name -> shape, for every tensor of the model.
        ff: Fraction of the model (v3: of its sliceable parameters).
        ffid: Pool id.
        algorithm: ``"v2"`` (the default, whole tensors) or ``"v3"`` (rows).
        num_pools: Number of pools (v2: always 8).

    Returns:
        The selection.

    Raises:
        SlotsmithError: An unknown algorithm, or what that algorithm refuses.
    """
    check_pools(algorithm, ffid, num_pools)
    if algorithm == V3:
        return select_v3(shapes, ff, ffid, num_pools)
    return select_v2({n: math.prod(s) for n, s in shapes.items()}, ff, ffid, num_pools)


ALGORITHMS = {ALGORITHM: select_v2, V3: select_v3}
"""Selection algorithms by the name a manifest records (see ``select`` for one signature)."""
