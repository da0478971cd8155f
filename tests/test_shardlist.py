"""Shard-to-slot assignment: disjoint, complete, never empty, equal quotas."""

from collections import Counter

import pytest

from cil_dist.data.manifest import ShardRef
from cil_dist.data.shardlist import assign, epoch_order, slot_of, worker_quota


def refs(counts: list[int]) -> list[ShardRef]:
    return [ShardRef(f"shard-{i}.tar", n) for i, n in enumerate(counts)]


@pytest.mark.parametrize("num_shards", [1, 2, 3, 5, 8, 13])
@pytest.mark.parametrize("num_slots", [1, 2, 4, 6])
def test_every_sample_exactly_once_and_no_slot_empty(num_shards, num_slots):
    shards = refs([7 + (i % 3) for i in range(num_shards)])
    seen = Counter()
    for slot in range(num_slots):
        pieces = assign(shards, num_slots, slot)
        assert pieces, f"slot {slot} of {num_slots} got nothing from {num_shards} shards"
        for piece in pieces:
            for index in range(piece.offset, piece.ref.samples, piece.stride):
                seen[(piece.ref.url, index)] += 1
    assert sum(seen.values()) == sum(r.samples for r in shards)
    assert set(seen.values()) == {1}


def test_epoch_order_is_shared_and_changes_per_epoch():
    shards = refs([1] * 20)
    assert epoch_order(shards, 1234, 0) == epoch_order(shards, 1234, 0)
    assert epoch_order(shards, 1234, 0) != epoch_order(shards, 1234, 1)
    assert epoch_order(shards, 1234, 0, cycle=1) != epoch_order(shards, 1234, 0)
    assert sorted(r.url for r in epoch_order(shards, 1, 3)) == sorted(r.url for r in shards)


def test_slots_and_quotas():
    assert [slot_of(r, 2, w, 3) for r in range(2) for w in range(3)] == [(s, 6) for s in range(6)]
    assert slot_of(1, 4, 0, 0) == (1, 4)
    for batches in range(0, 12):
        for workers in (0, 1, 2, 3, 5):
            quotas = [worker_quota(batches, w, workers) for w in range(max(1, workers))]
            assert sum(quotas) == batches
            assert max(quotas) - min(quotas) <= 1
            assert quotas == sorted(quotas, reverse=True)  # round-robin order ends cleanly
