"""The run's sample stream: which dataset entry and which generator each sample position gets.

Every sample's noise and timestep come from a generator seeded by (seed, the
sample's position in the data stream), and the data order is a pure function
of (seed, epoch): results do not depend on the number of processes, and
resuming needs only the step counter.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

_SEED_MIX = 0x9E3779B97F4A7C15
"""Odd 64-bit constant that spreads (seed, position) pairs over generator seeds."""


def epoch_length(shapes: Sequence[tuple] | None, batch: int) -> int:
    """Samples in one epoch of the stream: the entries, plus the padding that fills each bucket's last batch."""
    if shapes is None:
        return 0
    if batch == 1 or len(set(shapes)) <= 1:
        return len(shapes)
    counts: dict[tuple, int] = {}
    for shape in shapes:
        counts[shape] = counts.get(shape, 0) + 1
    return sum(math.ceil(n / batch) * batch for n in counts.values())


class DataStream:
    """Which dataset entry each sample position of the run uses.

    The stream is the concatenation of per-epoch orders seeded by (seed,
    epoch), so it is the same for any number of processes and a resumed run
    needs only its step counter. When entries have several latent shapes
    (aspect-ratio buckets, clip lengths) and a batch holds more than one
    sample, each batch of ``batch`` consecutive positions is drawn from one
    shape: an epoch's permutation is split by shape, each shape's part cut
    into batches (the last one filled up with that shape's first entries),
    and the batches ordered by where their first entry fell in the
    permutation. With one shape, or ``batch`` 1, the order is the plain
    permutation.

    Args:
        size: Dataset entries.
        seed: The run's seed.
        shapes: Each entry's latent shape (None: treat them as one shape).
        batch: Samples per batch, each batch of one shape.
    """

    def __init__(self, size: int, seed: int, shapes: Sequence[tuple] | None = None, batch: int = 1):
        self.size = size
        self.seed = seed
        self._shapes = list(shapes) if shapes is not None else None
        self._batch = batch
        self._bucketed = self._shapes is not None and batch > 1 and len(set(self._shapes)) > 1
        self.epoch_length = epoch_length(self._shapes, batch) if self._bucketed else size
        self._orders: dict[int, list[int]] = {}

    def entry(self, position: int) -> int:
        """The dataset index of the sample at ``position`` of the stream."""
        epoch, i = divmod(position, self.epoch_length)
        order = self._orders.get(epoch)
        if order is None:
            order = self._orders[epoch] = self._order(epoch)
        return order[i]

    def _order(self, epoch: int) -> list[int]:
        g = torch.Generator().manual_seed((self.seed * _SEED_MIX + epoch) % 2**63)
        perm = torch.randperm(self.size, generator=g).tolist()
        if not self._bucketed:
            return perm
        buckets: dict[tuple, list[int]] = {}
        for e in perm:
            buckets.setdefault(self._shapes[e], []).append(e)
        rank = {e: i for i, e in enumerate(perm)}
        batches = []
        for members in buckets.values():
            for k in range(0, len(members), self._batch):
                chunk = members[k : k + self._batch]
                chunk += [members[j % len(members)] for j in range(self._batch - len(chunk))]
                batches.append(chunk)
        batches.sort(key=lambda chunk: rank[chunk[0]])
        return [e for chunk in batches for e in chunk]


def sample_generator(seed: int, position: int) -> torch.Generator:
    """The generator of the sample at ``position`` (noise and timestep)."""
    return torch.Generator().manual_seed((seed * _SEED_MIX + position * 2 + 1) % 2**63)
