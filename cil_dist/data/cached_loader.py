"""Training batches from the decoded cache, in world-size-independent global batches.

:class:`CachedLoader` has the interface of :class:`~cil_dist.data.pipeline.EpochLoader`
(``set_epoch(epoch, start_step)``, iteration, ``len``, ``skipped``, ``to_device``). A batch
holds the rank's slice of a global batch (:mod:`cil_dist.data.global_order`) as uint8 frames
gathered from the cache's mapping by a prefetch thread, with the slice's augmentation
parameters; ``to_device`` moves it to the training device, applies the stage's look-up table
and the augmentation there (:class:`~cil_dist.data.device_augment.DeviceAugment`). Nothing is
decoded or fetched after the cache is built, and ``set_epoch`` jumps straight to a step.
"""

from __future__ import annotations

import collections
import logging
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from datetime import timedelta
from typing import Any

import numpy as np
import torch

from cil_dist.config import DataConfig
from cil_dist.data.cache import CacheSpec, DecodedFrames, ensure
from cil_dist.data.device_augment import DeviceAugment, draw_params
from cil_dist.data.global_order import GlobalOrder, augment_generator, epoch_permutation
from cil_dist.data.pipeline import ShardSource, read_policy
from cil_dist.distributed import DistEnv, all_reduce_sum
from cil_dist.storage import StorageOptions

log = logging.getLogger(__name__)

PREFETCH = 2  # batches gathered ahead of the training step
# how long the ranks wait for each other's cache build: a node that builds while another's
# cache is ready would otherwise hold that node's first collective past dist.timeout_s
BUILD_WAIT = timedelta(hours=6)


class NoSkips:
    """The cache holds every frame: nothing is skipped (the interface of ``SkipCounter``)."""

    shards = samples = 0

    def totals(self, env: DistEnv) -> tuple[int, int]:
        """``(0, 0)``, still a collective as ``SkipCounter.totals``: every rank calls it."""
        shards, samples = all_reduce_sum([0.0, 0.0], env)
        return int(shards), int(samples)


class CachedLoader:
    """A rank's batches of the decoded cache (see the module docstring)."""

    def __init__(
        self,
        frames: DecodedFrames,
        order: GlobalOrder,
        env: DistEnv,
        lut: np.ndarray,
        augment: DeviceAugment,
        pin_memory: bool = False,
    ) -> None:
        self.frames, self.order, self.env, self.augment = frames, order, env, augment
        self.part = order.rank_slice(env.rank, env.world_size)
        self.lut = torch.as_tensor(np.asarray(lut, dtype=np.uint8))
        self.pin_memory = pin_memory
        self.skipped = NoSkips()
        self.epoch = self.start_step = 0
        self._luts: dict[str, torch.Tensor] = {}

    def set_epoch(self, epoch: int, start_step: int = 0) -> None:
        """Select the epoch's permutation; ``start_step``: begin at that global batch."""
        self.epoch, self.start_step = epoch, start_step

    def __len__(self) -> int:
        return self.order.steps

    def close(self) -> None:
        """Nothing to stop (the prefetch thread ends with each epoch's iteration)."""

    def sampler_state(self) -> dict[str, Any]:
        """What, besides (seed, epoch, step), fixes the order: checkpointed, so a mid-epoch
        resume on other data is refused rather than repeating or skipping samples."""
        return {
            "order": "global",
            "samples": self.order.samples,
            "global_batch": self.order.global_batch,
            "cache": self.frames.digest,
        }

    def batch(self, permutation: np.ndarray, step: int) -> dict[str, Any]:
        """This rank's part of global batch ``step``: uint8 frames, raw labels, keys and the
        augmentation parameters (drawn for the whole global batch, then sliced)."""
        positions = self.order.batch(permutation, step)[self.part]
        images, labels, keys = self.frames.gather(positions)
        generator = augment_generator(self.order.seed, self.epoch, step)
        params = draw_params(self.order.global_batch, self.frames.size, self.augment.cfg, generator)
        batch = {
            "image": torch.from_numpy(images),
            "label": torch.from_numpy(labels),
            "key": keys,
            "augment": params.slice(self.part.start, self.part.stop),
        }
        if self.pin_memory:
            batch["image"], batch["label"] = (
                batch["image"].pin_memory(),
                batch["label"].pin_memory(),
            )
        return batch

    def __iter__(self) -> Iterator[dict[str, Any]]:
        permutation = epoch_permutation(self.order.seed, self.epoch, self.order.samples)
        steps = iter(range(self.start_step, len(self)))
        pool = ThreadPoolExecutor(1, thread_name_prefix="cache-prefetch")
        pending: collections.deque[Future] = collections.deque()
        try:
            for step in steps:
                pending.append(pool.submit(self.batch, permutation, step))
                if len(pending) >= PREFETCH:
                    break
            while pending:
                batch = pending.popleft().result()
                step = next(steps, None)
                if step is not None:
                    pending.append(pool.submit(self.batch, permutation, step))
                yield batch
        finally:
            pool.shutdown(wait=True, cancel_futures=True)

    def _lut_on(self, device: torch.device) -> torch.Tensor:
        key = str(device)
        if key not in self._luts:
            self._luts[key] = self.lut.to(device)
        return self._luts[key]

    def to_device(
        self,
        batch: dict[str, Any],
        device: str | torch.device,
        memory_format: torch.memory_format = torch.contiguous_format,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The model's input (normalised float crops) and int64 labels, on ``device``."""
        images = batch["image"].to(device, non_blocking=True)
        labels = batch["label"].to(device, non_blocking=True)
        lut = self._lut_on(images.device)  # applied to the crops' labels only
        return self.augment(images, labels, batch["augment"], memory_format, lut)


@contextmanager
def ranks_wait_for_the_builds(env: DistEnv) -> Iterator[None]:
    """All ranks leave the block together, waiting up to :data:`BUILD_WAIT` (a gloo group of
    its own: the process group's ``dist.timeout_s`` is not meant for a build)."""
    import torch.distributed as dist

    if not (env.distributed and dist.is_initialized()):
        yield
        return
    group = dist.new_group(backend="gloo", timeout=BUILD_WAIT)
    try:
        yield
        dist.barrier(group=group)
    finally:
        dist.destroy_process_group(group)


def build_cached_loader(
    cfg: DataConfig, source: ShardSource, lut: np.ndarray, env: DistEnv, seed: int
) -> CachedLoader:
    """The training loader of ``data.cache: memory | disk``: builds the node's cache if it is
    missing or incomplete (the first local process to get its lock), waits for the other
    nodes' builds, then maps it."""
    spec = CacheSpec.of(cfg, source.refs)
    with ranks_wait_for_the_builds(env):
        ensure(
            spec,
            verify=cfg.verify_checksums,
            policy=read_policy(cfg),
            options=StorageOptions.from_data_config(cfg),
            workers=cfg.cache_build_workers,
        )
    frames = DecodedFrames.open(spec.dir)
    rank_batch = cfg.rank_batch_size(env.world_size)
    cfg.batches_per_epoch(len(frames), env.world_size)  # the chain validation's rule too
    order = GlobalOrder(len(frames), rank_batch * env.world_size, seed)
    log.info(
        "training data %s from the decoded cache %s: %d samples, %d global batches of %d "
        "(%d per rank) per epoch",
        source.description,
        spec.dir,
        len(frames),
        order.steps,
        order.global_batch,
        rank_batch,
    )
    augment = DeviceAugment(cfg.augment, tuple(cfg.mean), tuple(cfg.std))
    return CachedLoader(frames, order, env, lut, augment, env.device.startswith("cuda"))
