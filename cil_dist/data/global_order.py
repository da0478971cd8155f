"""The order of the decoded cache's samples: global batches that do not depend on the world size.

Each epoch draws one permutation of all N samples from ``(seed, epoch)``. Global batch ``s``
is positions ``[s·G, (s+1)·G)`` of it (``G = data.global_batch_size``; samples past the last
whole batch wait for another epoch) and rank ``r`` of ``W`` takes its slice ``[r·B, (r+1)·B)``,
``B = G / W``. The augmentation's random parameters are drawn for the *whole* global batch from
``(seed, epoch, s)`` and sliced the same way, so a sample's crop, flip and jitter are the same
with 1, 2, 3 or 6 ranks; and any step can be reached directly (a mid-epoch resume).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from cil_dist.data.shardlist import derive_seed


def epoch_permutation(seed: int, epoch: int, samples: int) -> np.ndarray:
    """The epoch's order of positions ``0..samples-1``, identical on every rank."""
    return np.random.default_rng(derive_seed("order", seed, epoch)).permutation(samples)


def augment_generator(seed: int, epoch: int, step: int) -> torch.Generator:
    """The generator of global batch ``step``'s augmentation parameters."""
    return torch.Generator().manual_seed(derive_seed("augment", seed, epoch, step) % 2**63)


def rank_part(global_batch: int, rank: int, world_size: int) -> slice:
    """Rank ``rank``'s positions in a global batch of ``global_batch`` samples."""
    if global_batch % world_size:
        raise ValueError(f"global batch {global_batch} does not divide by {world_size}")
    per_rank = global_batch // world_size
    return slice(rank * per_rank, (rank + 1) * per_rank)


@dataclass(frozen=True)
class GlobalOrder:
    """Global batches of ``global_batch`` samples out of ``samples``; rank slices of them."""

    samples: int
    global_batch: int
    seed: int

    @property
    def steps(self) -> int:
        """Whole global batches per epoch."""
        return self.samples // self.global_batch

    def batch(self, permutation: np.ndarray, step: int) -> np.ndarray:
        """Positions of global batch ``step`` in an epoch's ``permutation``."""
        if not 0 <= step < self.steps:
            raise IndexError(f"step {step} outside 0..{self.steps - 1}")
        return permutation[step * self.global_batch : (step + 1) * self.global_batch]

    def rank_slice(self, rank: int, world_size: int) -> slice:
        """Rank ``rank``'s part of every global batch."""
        return rank_part(self.global_batch, rank, world_size)
