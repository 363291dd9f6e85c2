"""Slot selection: which tensors ``--ff F --ffid K`` picks.

``select_v2`` is the musubi-compatible "Selection Algorithm v2.0", exactly as
``../shared/spec/selection-v2.md`` describes it. It is a pure function of
``name -> numel``, so it runs on a layout as well as on a real checkpoint.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

from slotsmith.errors import SlotsmithError
from slotsmith.names import block_of

ALGORITHM = "v2"
NUM_POOLS = 8

_QKVO_RANK = {"v": 0, "k": 1, "o": 2, "q": 3}


@dataclass(frozen=True)
class Selection:
    """The outcome of one selection.

    Attributes:
        algorithm: Algorithm name (``"v2"``).
        ff: Fraction of the model asked for.
        ffid: Pool id.
        num_pools: Number of disjoint pools.
        total_params: Parameters in the whole model.
        target_params: The budget, ``max(1, floor(total * ff))``.
        pool: Every tensor of the pool, in candidate (draft) order.
        pool_params: Parameters in the whole pool.
        tensors: The selected tensors, in selection order.
        selected_params: Parameters selected.
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


ALGORITHMS = {ALGORITHM: select_v2}
"""Selection algorithms by the name a manifest records."""
