"""The run's sample stream: which dataset entry and which generator each sample position gets.

Every sample's noise and timestep come from a generator seeded by (seed, the
sample's position in the data stream), and the data order is a pure function
of (seed, epoch): results do not depend on the number of processes, and
resuming needs only the step counter.
"""

from __future__ import annotations

import torch

_SEED_MIX = 0x9E3779B97F4A7C15
"""Odd 64-bit constant that spreads (seed, position) pairs over generator seeds."""


class DataStream:
    """Which dataset entry each sample position of the run uses.

    The stream is the concatenation of per-epoch permutations seeded by
    (seed, epoch), so it is the same for any number of processes and a
    resumed run needs only its step counter.
    """

    def __init__(self, size: int, seed: int):
        self.size = size
        self.seed = seed
        self._perms: dict[int, list[int]] = {}

    def entry(self, position: int) -> int:
        """The dataset index of the sample at ``position`` of the stream."""
        epoch, i = divmod(position, self.size)
        perm = self._perms.get(epoch)
        if perm is None:
            g = torch.Generator().manual_seed((self.seed * _SEED_MIX + epoch) % 2**63)
            perm = self._perms[epoch] = torch.randperm(self.size, generator=g).tolist()
        return perm[i]


def sample_generator(seed: int, position: int) -> torch.Generator:
    """The generator of the sample at ``position`` (noise and timestep)."""
    return torch.Generator().manual_seed((seed * _SEED_MIX + position * 2 + 1) % 2**63)
