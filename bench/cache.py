"""Benchmark: the decoded cache's loader vs the shard pipeline, samples/s per core, epochs ≥ 2.

The same synthetic task-1 shards (1024x512 PNG) feed both, with the paper's augmentation and
crop, until normalised float crops and int64 labels are in the training process:

- ``shards``: today's streaming path (``data.cache: none``): ``--workers`` DataLoader workers
  read, decode and augment every epoch (cores = workers);
- ``cache``: ``data.cache: disk`` in a temporary folder: building the loader streams and
  decodes the shards into the cache (``data.cache_build_workers`` = ``--workers``, timed
  apart); every epoch gathers uint8 frames from the mapping (one prefetch thread) and augments
  them with ``DeviceAugment``, here on the CPU with one torch thread (cores = 1; on a GPU this
  part runs on the device).

Epoch 1 is reported apart (worker start-up); the rates are of epochs 2..N.
The last line is ``ratio=X.XX`` (cache / shards, samples/s per core).

    python bench/cache.py [--frames-per-city 6] [--samples-per-shard 4] [--workers 2]
                          [--epochs 4] [--batch-size 6] [--frame 1024x512] [--crop 640x192]
"""

from __future__ import annotations

import argparse
import logging
import tempfile
import time
from pathlib import Path

import torch

from cil_dist.config import AugmentConfig, DataConfig
from cil_dist.data.cached_loader import build_cached_loader
from cil_dist.data.pipeline import ShardSource, build_train_loader
from cil_dist.distributed import DistEnv
from cil_dist.logs import setup_logging
from cil_dist.protocol import TaskProtocol
from shards.pack import pack
from shards.synth import generate

log = logging.getLogger("bench.cache")


def epochs_timed(loader, epochs: int) -> tuple[float, float, int]:
    """``(seconds of epoch 1, samples/s of epochs 2..N, samples of epochs 2..N)``."""
    first, count, later = 0.0, 0, 0.0
    for epoch in range(epochs):
        start = time.perf_counter()
        loader.set_epoch(epoch)
        for batch in loader:
            images, labels = loader.to_device(batch, "cpu")
            assert images.dtype == torch.float32 and labels.dtype == torch.int64
            if epoch:
                count += images.shape[0]
        seconds = time.perf_counter() - start
        first, later = (seconds, later) if epoch == 0 else (first, later + seconds)
    return first, count / later, count


def size(text: str) -> tuple[int, int]:
    width, height = text.split("x")
    return int(width), int(height)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--frames-per-city", type=int, default=6)
    parser.add_argument("--samples-per-shard", type=int, default=4)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=6)
    parser.add_argument("--frame", type=size, default=(1024, 512), help="WxH of the shards")
    parser.add_argument("--crop", type=size, default=(640, 192), help="WxH")
    args = parser.parse_args()
    if args.epochs < 2:
        parser.error("--epochs: at least 2 (epoch 1 is reported apart)")
    setup_logging(0)
    torch.set_num_threads(1)
    protocol = TaskProtocol.load("cityscapes_cil")
    lut = protocol.stage_lut(1)
    with tempfile.TemporaryDirectory() as tmp:
        root, out = Path(tmp) / "cityscapes", Path(tmp) / "shards"
        generate(root, protocol, images_per_city=args.frames_per_city, size=args.frame, seed=0)
        pack(root, str(out), protocol, size=args.frame, samples_per_shard=args.samples_per_shard)
        common = dict(
            manifest=str(out / "manifest.json"),
            resize=list(args.frame),
            augment=AugmentConfig(crop=list(args.crop)),
            global_batch_size=args.batch_size,
            num_workers=args.workers,
            shuffle_buffer=16,
        )
        source = ShardSource.from_manifest(common["manifest"], "task1")
        shards = build_train_loader(DataConfig(**common), source, lut, DistEnv(), seed=0)
        shard_first, shard_rate, shard_n = epochs_timed(shards, args.epochs)
        shards.close()
        cached_cfg = DataConfig(
            **common, cache="disk", cache_dir=f"{tmp}/cache", cache_build_workers=args.workers
        )
        start = time.perf_counter()
        cached = build_cached_loader(cached_cfg, source, lut, DistEnv(), seed=0)
        build = time.perf_counter() - start
        cache_first, cache_rate, cache_n = epochs_timed(cached, args.epochs)
    cores = max(1, args.workers)
    (fw, fh), (cw, ch) = args.frame, args.crop
    print(f"frames: {source.samples} (task 1), shards {fw}x{fh} PNG, crop {cw}x{ch}, batch "
          f"{args.batch_size}, epochs 2..{args.epochs} timed")  # fmt: skip
    print(
        f"shards ({args.workers} workers):  {shard_rate / cores:7.2f} samples/s/core "
        f"({shard_rate:.2f} samples/s, {shard_n} samples; epoch 1 {shard_first:.1f} s)"
    )
    print(
        f"cache (1 thread):     {cache_rate:7.2f} samples/s/core ({cache_n} samples; "
        f"build {build:.1f} s with {args.workers} processes, epoch 1 {cache_first:.1f} s)"
    )
    print(f"ratio={cache_rate / (shard_rate / cores):.2f}")


if __name__ == "__main__":
    main()
