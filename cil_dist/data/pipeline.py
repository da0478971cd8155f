"""The streaming input pipeline: shards → samples → augmented batches, on every rank.

The recipe (it avoids webdataset's known multi-rank traps by construction):

1. The shard list comes from a manifest (with sample counts and checksums) or from URLs.
2. Every epoch the list is permuted with a seed shared by all ranks, *then* split into
   ``world_size × num_workers`` disjoint slots (:mod:`cil_dist.data.shardlist`); a slot never
   comes up empty, because fewer shards than slots are shared sample-wise.
3. Each slot streams its shards (:mod:`cil_dist.data.reading`, checksums verified), shuffles
   undecoded samples in a buffer, decodes, applies the stage's look-up table and augments with
   an RNG seeded by ``(seed, epoch, rank, worker)``, and batches inside the worker.
4. **Training** produces exactly ``samples // (world_size × batch_size)`` batches on every
   rank: each worker cycles over its (re-permuted) share until it has produced its quota, and
   the quotas of a rank's workers add up to that number — so no rank runs out early and DDP
   never hangs at an epoch's end. **Evaluation** reads every sample exactly once across all
   ranks and workers (last batches may be partial).
   Batches carry uint8 images and labels (a fifth of the bytes of float/int64 between worker
   processes and to the GPU); :attr:`EpochLoader.to_device` normalises them on the device.
5. A shard whose transfer fails is re-opened at its byte offset (``data.read_retries``); when
   that is exhausted, ``data.on_shard_error: skip`` skips it and counts it once with the
   samples lost (:attr:`EpochLoader.skipped`, over workers; :meth:`SkipCounter.totals` over
   ranks), training still cycling to its quota so every rank keeps the same number of batches.
   Otherwise the shard's error (URL redacted, last key read) reaches the training process as
   raised, also from a worker process. A training slot that finds no readable sample in
   ``MAX_EMPTY_CYCLES`` passes over its shards (every one skipped) ends the run with
   :class:`EmptySlotError`, a data error like the others (:data:`DATA_ERRORS`).
"""

from __future__ import annotations

import atexit
import itertools
import logging
import multiprocessing
import random
import signal
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any
from weakref import WeakSet

import numpy as np
import torch
from braceexpand import braceexpand
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from webdataset.filters import shuffle as shuffle_filter

from cil_dist import urls
from cil_dist.config import ConfigError, DataConfig
from cil_dist.data.manifest import Manifest, ShardRef
from cil_dist.data.reading import ReadPolicy, ShardReadError, iter_slice
from cil_dist.data.shardlist import (
    ShardSlice,
    assign,
    derive_seed,
    epoch_order,
    slot_of,
    worker_quota,
)
from cil_dist.data.transforms import Normalize, SampleError, SegmentationTransform
from cil_dist.distributed import DistEnv, all_reduce_sum
from cil_dist.storage import StorageOptions

log = logging.getLogger(__name__)

MAX_EMPTY_CYCLES = 64


class EmptySlotError(RuntimeError):
    """A training slot (a DataLoader worker's share) finds no readable sample at all, e.g.
    every shard it reads skipped under ``data.on_shard_error: skip``; names the (redacted)
    source and the slot."""


# data errors: one line naming the shard (redacted) and key, or the source and slot
DATA_ERRORS = (ShardReadError, SampleError, EmptySlotError)


@dataclass(frozen=True)
class ShardSource:
    """The shards a loader reads, with their sample counts when known."""

    refs: tuple[ShardRef, ...]
    description: str

    @classmethod
    def from_manifest(
        cls,
        url: str,
        splits: list[str] | tuple[str, ...] | str,
        options: StorageOptions | None = None,
    ) -> ShardSource:
        manifest = Manifest.load(url, options)
        names = [splits] if isinstance(splits, str) else list(splits)
        shown = urls.redact_url(url)
        return cls(tuple(manifest.shard_refs(names)), f"{shown} [{'+'.join(names)}]")

    @classmethod
    def from_urls(cls, patterns: list[str] | str) -> ShardSource:
        patterns = [patterns] if isinstance(patterns, str) else list(patterns)
        urls = [url for pattern in patterns for url in braceexpand(pattern)]
        if not urls:
            raise ConfigError("data.shards: no shard URLs given")
        return cls(tuple(ShardRef(url, None) for url in urls), f"{len(urls)} shard URLs")

    @classmethod
    def from_config(cls, cfg: DataConfig, splits: list[str] | tuple[str, ...] | str):
        """The shards of ``splits`` (a manifest's, reached with the config's storage options)
        or the config's shard URLs."""
        if cfg.manifest:
            return cls.from_manifest(cfg.manifest, splits, StorageOptions.from_data_config(cfg))
        return cls.from_urls(cfg.shards)

    @property
    def samples(self) -> int | None:
        """Total samples, or None when a shard's count is unknown (URLs without manifest)."""
        counts = [ref.samples for ref in self.refs]
        return None if any(c is None for c in counts) else sum(counts)


def read_policy(cfg: DataConfig) -> ReadPolicy:
    return ReadPolicy(cfg.read_retries, cfg.retry_backoff, cfg.on_shard_error)


class SkipCounter:
    """Shards and samples skipped under ``on_shard_error: skip``, shared with DataLoader workers.

    Kept per shard of the source: a shard counts once however many slots (workers, ranks) or
    training cycles met it unreadable. Its lost samples are counted in an epoch's first cycle
    only, where the slots' slices partition every shard exactly (later cycles re-read shards
    just to fill a worker's quota).
    """

    def __init__(self, refs: tuple[ShardRef, ...] | list[ShardRef]) -> None:
        self._index = {ref.url: i for i, ref in enumerate(refs)}
        self._counts = multiprocessing.Array("q", 2 * len(self._index))  # flags, then samples

    def add(self, piece: ShardSlice, missing: int | None, cycle: int = 0) -> None:
        i, n = self._index[piece.ref.url], len(self._index)
        with self._counts.get_lock():
            self._counts[i] = 1
            if cycle == 0:
                self._counts[n + i] += missing or 0

    def reset(self) -> None:
        with self._counts.get_lock():
            self._counts[:] = [0] * len(self._counts)

    def vector(self) -> list[float]:
        """Per shard: skipped (0/1), then per shard: samples lost (this process's view)."""
        with self._counts.get_lock():
            return [float(c) for c in self._counts]

    @staticmethod
    def count(vector: list[float]) -> tuple[int, int]:
        """``(shards, samples)`` of a (possibly rank-summed) :meth:`vector`."""
        n = len(vector) // 2
        return sum(1 for flag in vector[:n] if flag > 0), int(sum(vector[n:]))

    def totals(self, env: DistEnv) -> tuple[int, int]:
        """``(shards, samples)`` skipped over all ranks (a collective: every rank calls it)."""
        return self.count(all_reduce_sum(self.vector(), env))

    @property
    def shards(self) -> int:
        """Distinct shards skipped by this rank."""
        return self.count(self.vector())[0]

    @property
    def samples(self) -> int:
        """Samples lost on this rank."""
        return self.count(self.vector())[1]


def collate(items: list[tuple[torch.Tensor, torch.Tensor, str]]) -> dict[str, Any]:
    images, targets, keys = zip(*items, strict=True)
    return {"image": torch.stack(images), "label": torch.stack(targets), "key": list(keys)}


class ShardStream(IterableDataset):
    """Batches of one rank; see the module docstring for the recipe."""

    def __init__(
        self,
        source: ShardSource,
        transform: SegmentationTransform,
        env: DistEnv,
        batch_size: int,
        *,
        train: bool,
        seed: int,
        num_workers: int,
        batches_per_epoch: int = 0,
        shuffle_buffer: int = 0,
        verify: bool = True,
        policy: ReadPolicy | None = None,
        storage_options: StorageOptions | None = None,
    ):
        super().__init__()
        self.source, self.transform, self.env = source, transform, env
        self.batch_size, self.train, self.seed = batch_size, train, seed
        self.num_workers, self.batches_per_epoch = num_workers, batches_per_epoch
        self.shuffle_buffer, self.verify = shuffle_buffer, verify
        self.policy = policy or ReadPolicy()
        self.storage_options = storage_options or StorageOptions()  # pickled to workers
        self.skipped = SkipCounter(source.refs)
        self._epoch = multiprocessing.Value("q", 0, lock=False)  # seen by persistent workers

    @property
    def epoch(self) -> int:
        return int(self._epoch.value)

    @epoch.setter
    def epoch(self, value: int) -> None:
        self._epoch.value = value

    def _read(self, piece: ShardSlice, cycle: int = 0) -> Iterator[dict[str, Any]]:
        def skipped(piece: ShardSlice, missing: int | None, _: ShardReadError) -> None:
            self.skipped.add(piece, missing, cycle)

        return iter_slice(piece, self.verify, self.policy, skipped, self.storage_options)

    def _slot(self) -> tuple[int, int, int]:
        info = get_worker_info()
        worker = info.id if info is not None else 0
        slot, slots = slot_of(self.env.rank, self.env.world_size, worker, self.num_workers)
        return worker, slot, slots

    def _train_samples(self, slot: int, slots: int, epoch: int) -> Iterator[dict[str, Any]]:
        """Endless samples of this slot: one disjoint share of the shards per cycle."""
        refs, empty_cycles = list(self.source.refs), 0
        for cycle in itertools.count():
            produced = 0
            for piece in assign(epoch_order(refs, self.seed, epoch, cycle), slots, slot):
                for sample in self._read(piece, cycle):
                    produced += 1
                    yield sample
            # a tiny shard shared by many slots can leave one slot empty in some cycles
            empty_cycles = 0 if produced else empty_cycles + 1
            if empty_cycles > MAX_EMPTY_CYCLES:
                raise EmptySlotError(
                    f"{self.source.description}: slot {slot} of {slots} finds no samples in "
                    f"{MAX_EMPTY_CYCLES} passes over its shards (every shard it reads is "
                    f"unreadable; data.on_shard_error={self.policy.on_error})"
                )

    def _eval_samples(self, slot: int, slots: int) -> Iterator[dict[str, Any]]:
        for piece in assign(list(self.source.refs), slots, slot):
            yield from self._read(piece)

    def _shuffled(self, samples: Iterator, epoch: int, worker: int) -> Iterator[dict[str, Any]]:
        if self.shuffle_buffer <= 1:
            return samples
        rng = random.Random(derive_seed("shuffle", self.seed, epoch, self.env.rank, worker))
        return shuffle_filter(self.shuffle_buffer, initial=self.shuffle_buffer, rng=rng)(samples)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        worker, slot, slots = self._slot()
        epoch = self.epoch
        rng = np.random.default_rng(derive_seed("augment", self.seed, epoch, self.env.rank, worker))
        if self.train:
            quota = worker_quota(self.batches_per_epoch, worker, self.num_workers)
            # exactly the samples of the quota's batches are read: none past the epoch's end
            needed = quota * self.batch_size
            samples = itertools.islice(self._train_samples(slot, slots, epoch), needed)
            samples = self._shuffled(samples, epoch, worker)
        else:
            samples = self._eval_samples(slot, slots)
        items = (self.transform(sample, rng) for sample in samples)
        try:
            yield from _batches(items, self.batch_size, partial=not self.train)
        except DATA_ERRORS as exc:
            if get_worker_info() is None:
                raise
            yield WorkerFailure(exc)  # ends this worker's epoch; the loader raises it


@dataclass(frozen=True)
class WorkerFailure:
    """A data error of a DataLoader worker, sent to the training process as an item: torch
    would re-raise it as a RuntimeError holding the worker's whole traceback instead of the
    one line that names the shard and sample."""

    error: Exception


def _batches(items: Iterator, size: int, partial: bool) -> Iterator[dict[str, Any]]:
    while chunk := list(itertools.islice(items, size)):
        if len(chunk) < size and not partial:
            return
        yield collate(chunk)


def _worker_init(_: int) -> None:
    """One thread per worker; preemption signals are the training process's business.

    SLURM signals every process of a job step; a worker that died of (or, having inherited
    submitit's handler, acted on) SIGUSR2/SIGTERM would break the requeue of its job.
    """
    torch.set_num_threads(1)
    for name in ("SIGUSR2", "SIGUSR1", "SIGTERM"):
        signal.signal(getattr(signal, name), signal.SIG_IGN)


_OPEN_LOADERS: WeakSet[EpochLoader] = WeakSet()


@atexit.register  # runs before multiprocessing's own exit hook, which would wait forever
def _close_open_loaders() -> None:
    for loader in list(_OPEN_LOADERS):
        loader.close()


class EpochLoader:
    """A DataLoader over a :class:`ShardStream` with ``set_epoch`` and a known length.

    Its workers persist across epochs and ignore SIGTERM (SLURM's preemption signal is the
    training process's business), so they are stopped explicitly: by :meth:`close`, when the
    loader is garbage-collected, or at interpreter exit.
    """

    def __init__(self, stream: ShardStream, num_workers: int, pin_memory: bool = False):
        self.stream = stream
        transform = stream.transform
        self.to_device = Normalize(transform.mean, transform.std)  # batch -> model input
        self.loader = DataLoader(
            stream,
            batch_size=None,
            num_workers=num_workers,
            pin_memory=pin_memory,
            worker_init_fn=_worker_init if num_workers else None,
            # workers (and their open HTTP/S3 clients) live as long as the loader; each epoch
            # re-iterates them with the epoch number set through shared memory
            persistent_workers=num_workers > 0,
        )
        self.start_step = 0
        _OPEN_LOADERS.add(self)

    def close(self) -> None:
        """Stop the persistent worker processes (a later iteration starts new ones)."""
        iterator, self.loader._iterator = getattr(self.loader, "_iterator", None), None
        if iterator is not None:
            iterator._shutdown_workers()

    def sampler_state(self) -> dict[str, Any]:
        """What, besides (seed, epoch, step), fixes the streaming order (checkpointed)."""
        stream = self.stream
        return {
            "order": "shards",
            "shards": len(stream.source.refs),
            "batches": stream.batches_per_epoch,
            "batch_size": stream.batch_size,
        }

    def set_epoch(self, epoch: int, start_step: int = 0) -> None:
        """Select the epoch's shard permutation and augmentation seeds (call before iterating);
        ``start_step``: resume inside the epoch (the batches before it are read and dropped:
        the streaming order can only be replayed; the decoded cache jumps there directly)."""
        self.stream.epoch = epoch
        self.start_step = start_step

    def __iter__(self) -> Iterator[dict[str, Any]]:
        self.stream.skipped.reset()
        batches = self.raise_failures(iter(self.loader))
        return itertools.islice(batches, self.start_step, None)

    @staticmethod
    def raise_failures(batches: Iterator) -> Iterator[dict[str, Any]]:
        """The batches of a DataLoader over a :class:`ShardStream`, a worker's data error
        raised here as itself."""
        for batch in batches:
            if isinstance(batch, WorkerFailure):
                raise batch.error
            yield batch

    @property
    def skipped(self) -> SkipCounter:
        """Shards/samples skipped by this rank in the current (or last finished) epoch."""
        return self.stream.skipped

    def __len__(self) -> int:
        if self.stream.train:
            return self.stream.batches_per_epoch
        raise TypeError("an evaluation loader's length depends on the shards; iterate it")


def build_train_loader(
    cfg: DataConfig, source: ShardSource, lut: np.ndarray, env: DistEnv, seed: int
) -> EpochLoader:
    """Training batches ``{"image" uint8, "label" uint8 (channels or 255), "key"}``, equal count
    per rank; ``loader.to_device(batch, device)`` gives the model's input and int64 labels."""
    total = source.samples if source.samples is not None else cfg.samples_per_epoch
    if not total:
        raise ConfigError(
            "data.samples_per_epoch: required when training from shard URLs without a manifest"
        )
    batch_size = cfg.rank_batch_size(env.world_size)
    batches = cfg.batches_per_epoch(total, env.world_size)  # the chain validation's rule too
    transform = SegmentationTransform(
        tuple(cfg.resize),
        tuple(cfg.mean),
        tuple(cfg.std),
        lut=lut,
        augment=cfg.augment,
        compact=True,
    )
    stream = ShardStream(
        source,
        transform,
        env,
        batch_size,
        train=True,
        seed=seed,
        num_workers=cfg.num_workers,
        batches_per_epoch=batches,
        shuffle_buffer=cfg.shuffle_buffer,
        verify=cfg.verify_checksums,
        policy=read_policy(cfg),
        storage_options=StorageOptions.from_data_config(cfg),
    )
    log.info(
        "training data %s: %d samples, %d batches of %d per rank per epoch",
        source.description,
        total,
        batches,
        batch_size,
    )
    return EpochLoader(stream, cfg.num_workers, pin_memory=env.device.startswith("cuda"))


def build_eval_loader(
    cfg: DataConfig, source: ShardSource, env: DistEnv, lut: np.ndarray | None = None
) -> EpochLoader:
    """Evaluation batches (every sample once across ranks); raw label ids unless ``lut``."""
    transform = SegmentationTransform(
        tuple(cfg.resize), tuple(cfg.mean), tuple(cfg.std), lut=lut, compact=True
    )
    stream = ShardStream(
        source,
        transform,
        env,
        cfg.eval_batch_size,
        train=False,
        seed=0,
        num_workers=cfg.num_workers,
        verify=cfg.verify_checksums,
        policy=read_policy(cfg),
        storage_options=StorageOptions.from_data_config(cfg),
    )
    return EpochLoader(stream, cfg.num_workers, pin_memory=env.device.startswith("cuda"))
