"""Which shards (and which samples of them) each rank and DataLoader worker reads.

Every process sees the same shard list, permuted with a seed derived from ``(seed, epoch,
cycle)`` so all ranks agree, then split into ``world_size × num_workers`` disjoint *slots*
(slot = rank · num_workers + worker). When there are at least as many shards as slots, slot
``j`` reads shards ``j, j + S, j + 2S, …``. When there are fewer shards than slots, shard
``j mod n`` is shared by the slots that map onto it, each keeping every ``k``-th sample
(``k`` = number of sharers) from its own offset — so no slot is ever empty and the union of
all slots is still every sample exactly once.
"""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass

from cil_dist.data.manifest import ShardRef


@dataclass(frozen=True)
class ShardSlice:
    """Read ``ref`` keeping samples whose index within the shard is ``offset`` mod ``stride``."""

    ref: ShardRef
    stride: int = 1
    offset: int = 0

    @property
    def samples(self) -> int:
        return len(range(self.offset, self.ref.samples, self.stride))


def derive_seed(*parts: int | str) -> int:
    """A 64-bit seed from any tuple of ints/strings, stable across processes and Python runs."""
    text = "/".join(str(p) for p in parts).encode()
    return int.from_bytes(hashlib.blake2b(text, digest_size=8).digest(), "little")


def epoch_order(refs: list[ShardRef], seed: int, epoch: int, cycle: int = 0) -> list[ShardRef]:
    """The shard list permuted identically on every rank for this epoch (and cycle)."""
    order = list(refs)
    random.Random(derive_seed("shards", seed, epoch, cycle)).shuffle(order)
    return order


def assign(refs: list[ShardRef], num_slots: int, slot: int) -> list[ShardSlice]:
    """The slices of ``refs`` that ``slot`` (of ``num_slots``) reads; disjoint across slots."""
    if not 0 <= slot < num_slots:
        raise ValueError(f"slot {slot} outside 0..{num_slots - 1}")
    n = len(refs)
    if n == 0:
        return []
    if n >= num_slots:
        return [ShardSlice(ref) for ref in refs[slot::num_slots]]
    shard = slot % n
    sharers = len(range(shard, num_slots, n))
    return [ShardSlice(refs[shard], stride=sharers, offset=slot // n)]


def slot_of(rank: int, world_size: int, worker: int, num_workers: int) -> tuple[int, int]:
    """``(slot, num_slots)`` of a DataLoader worker on a rank (num_workers 0 counts as 1)."""
    workers = max(1, num_workers)
    return rank * workers + worker, world_size * workers


def worker_quota(batches: int, worker: int, num_workers: int) -> int:
    """How many of a rank's ``batches`` worker ``worker`` produces (they sum to ``batches``)."""
    workers = max(1, num_workers)
    return batches // workers + (1 if worker < batches % workers else 0)
