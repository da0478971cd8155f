"""Benchmark: the decoded cache and the shard pipeline vs a folder loader in the reference's
style, samples/s per core in epochs 2..N.

All produce identical tensor shapes with the same augmentation (the paper's): the folder
loader opens the full-resolution 2048x1024 PNG image and label of each frame and resizes to
1024x512 per sample, as the reference did; the shard pipeline streams 1024x512 PNGs from
webdataset shards, ships uint8 tensors and normalises them in the training process (as the
trainer does on its device); the decoded cache (``data.cache: disk``, in a temporary folder)
is built from the same shards (timed apart), then every epoch gathers uint8 frames from its
mapping (a prefetch thread) and augments them with ``cil_dist.data.device_augment`` in the
training process, here on the CPU with one torch thread. All are timed until float images and
int64 labels are in the training process, over epochs 2..N (epoch 1 starts the workers). Per
core: the folder and shard loaders divide by their DataLoader workers; the cache row divides
by the CPU seconds of its process (training thread and prefetch thread together).
The last lines are ``cache/folder=``, ``cache/shards=`` and ``ratio=X.XX`` (shard pipeline /
folder loader, samples/s per core).

``--transports local,http,s3`` adds one row per way of reaching the same shards: the local
folder, a loopback HTTP server (Python's file server), S3 on loopback (moto's server, the
shards packed straight into it, read through s3fs) and ``s3+<N>ms``, the same S3 behind a
proxy that holds every request N ms (a distant store's time to first byte), each with the
shard pipeline's samples/s per core and the cache's samples/s (built from that transport),
with their ratios to local.

    python bench/data_pipeline.py [--frames-per-city 6] [--samples-per-shard 4] [--workers 2]
                                  [--epochs 6] [--cache-epochs 24]
                                  [--transports local,http,s3,s3+30ms]
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from cil_dist.config import DataConfig
from cil_dist.data.cached_loader import build_cached_loader
from cil_dist.data.pipeline import ShardSource, build_train_loader
from cil_dist.data.transforms import SegmentationTransform
from cil_dist.distributed import DistEnv
from cil_dist.logs import setup_logging
from cil_dist.protocol import TaskProtocol
from cil_dist.storage import StorageOptions
from shards.pack import pack
from shards.synth import generate

log = logging.getLogger("bench.data_pipeline")


class FolderDataset(Dataset):
    """The reference's loader: PNG files from the Cityscapes folders, resized per sample."""

    def __init__(self, root: Path, cities: list[str], transform: SegmentationTransform, lut):
        images = sorted(p for c in cities for p in (root / "leftImg8bit/train" / c).glob("*.png"))
        self.pairs = [
            (
                p,
                root
                / "gtFine/train"
                / p.parent.name
                / p.name.replace("leftImg8bit.png", "gtFine_labelIds.png"),
            )
            for p in images
        ]
        self.transform, self.lut = transform, lut

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, index: int):
        image_path, label_path = self.pairs[index]
        image = Image.open(image_path).convert("RGB")
        label = np.asarray(Image.open(label_path))
        rng = np.random.default_rng(index)
        image, label = self.transform.apply(image, label, rng)
        return image, label


def throughput(loader, epochs: int) -> tuple[float, float, int, tuple]:
    """``(samples/s, samples per CPU-second of this process, samples, shape)`` of epochs
    2..N, until float, normalised images and int64 labels are in the training process (the
    shard and cache loaders ship uint8 and finish on the device, here the CPU)."""
    count, shape, seconds, cpu = 0, None, 0.0, 0.0
    for epoch in range(epochs):
        start, start_cpu = time.perf_counter(), time.process_time()
        if hasattr(loader, "set_epoch"):
            loader.set_epoch(epoch)
        for batch in loader:
            if hasattr(loader, "to_device"):
                images, labels = loader.to_device(batch, "cpu")
            else:
                images, labels = batch
            assert images.dtype == torch.float32 and labels.dtype == torch.int64
            count += images.shape[0] if epoch else 0
            shape = tuple(images.shape[1:])
        if epoch:  # epoch 1: worker start-up
            seconds += time.perf_counter() - start
            cpu += time.process_time() - start_cpu
    return count / seconds, count / cpu, count, shape


def cached_loader(manifest: str, endpoint: str, cache_dir: str, args, lut):
    """The decoded cache's loader over ``manifest`` (built here, timed apart)."""
    cfg = DataConfig(
        manifest=manifest,
        endpoint_url=endpoint,
        batch_size=args.batch_size,
        cache="disk",
        cache_dir=cache_dir,
        cache_build_workers=args.workers,
    )
    source = ShardSource.from_config(cfg, "task1")
    start = time.perf_counter()
    loader = build_cached_loader(cfg, source, lut, DistEnv(), seed=0)
    return loader, time.perf_counter() - start


def task1_protocol() -> TaskProtocol:
    """The paper's task 1 (its cities and classes, the same labels as stage 1) and one val city:
    only task 1's frames are read, so only those (and the one val frame a pack needs) are made."""
    paper = TaskProtocol.load("cityscapes_cil").to_dict()
    paper["tasks"] = paper["tasks"][:1]
    paper["heldout"]["cities"], paper["val"]["cities"] = [], paper["val"]["cities"][:1]
    paper["eval_task_sets"] = {"1": [1]}
    return TaskProtocol.from_dict(paper, "bench/data_pipeline.py")


@contextlib.contextmanager
def transport_manifest(kind: str, out: Path, root: Path, protocol, per_shard: int) -> object:
    """The manifest URL of the same shards reached through ``kind`` (local, http, s3) and the
    S3 endpoint that reaches it ("" for local and http)."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the test servers
    from tests.servers import ResetProxy, moto_server, static_http

    if kind == "local":
        yield str(out / "manifest.json"), ""
    elif kind == "http":
        with static_http(out) as url:
            yield f"{url}/manifest.json", ""
    elif kind == "s3" or kind.startswith("s3+"):
        for name, value in (("AWS_ACCESS_KEY_ID", "bench"), ("AWS_SECRET_ACCESS_KEY", "bench")):
            os.environ.setdefault(name, value)
        os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")
        with moto_server() as endpoint:
            import boto3

            boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket="bench")
            options = StorageOptions(endpoint_url=endpoint)
            pack(
                root,
                "s3://bench/shards",
                protocol,
                size=(1024, 512),
                samples_per_shard=per_shard,
                options=options,
            )
            proxy = ResetProxy(endpoint, latency=store_latency(kind)) if kind != "s3" else None
            try:
                yield "s3://bench/shards/manifest.json", proxy.url if proxy else endpoint
            finally:
                if proxy:
                    proxy.close()
    else:
        raise SystemExit(f"--transports: unknown {kind!r} (local, http, s3, s3+<N>ms)")


def store_latency(kind: str) -> float:
    """Seconds of ``s3+<N>ms``: S3 behind a proxy that delays every request by N ms."""
    text = kind.removeprefix("s3+")
    if not text.endswith("ms") or not text[:-2].isdigit():
        raise SystemExit(f"--transports: {kind!r}: expected s3+<N>ms, e.g. s3+30ms")
    return int(text[:-2]) / 1000


def transport_rows(args, out: Path, root: Path, protocol, lut, tmp: str) -> list[tuple]:
    """Per transport: ``(kind, shard samples/s, cached samples/s, cached build seconds)``."""
    rows = []
    for kind in [t for t in args.transports.split(",") if t]:
        with transport_manifest(kind, out, root, protocol, args.samples_per_shard) as found:
            manifest, endpoint = found
            cfg = DataConfig(
                manifest=manifest,
                endpoint_url=endpoint,
                batch_size=args.batch_size,
                num_workers=args.workers,
                shuffle_buffer=16,
            )
            source = ShardSource.from_config(cfg, "task1")
            loader = build_train_loader(cfg, source, lut, DistEnv(), seed=0)
            rate = throughput(loader, args.epochs)[0]
            loader.close()
            cached, build = cached_loader(manifest, endpoint, f"{tmp}/cache-{kind}", args, lut)
            rows.append((kind, rate, throughput(cached, args.epochs)[0], build))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--frames-per-city", type=int, default=6)
    parser.add_argument(
        "--samples-per-shard", type=int, default=4, help="cil-shards pack's default is 16"
    )
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--batch-size", type=int, default=6)
    parser.add_argument(
        "--cache-epochs",
        type=int,
        default=24,
        help="epochs of the cache row (4x --epochs: it runs ~10x faster, so this gives it a few "
        "seconds of timed CPU; 120 samples varied 2x from run to run)",
    )
    parser.add_argument(
        "--transports",
        default="",
        help="comma list of local,http,s3,s3+<N>ms (S3 with N ms added per request): a row each",
    )
    args = parser.parse_args()
    setup_logging(0)
    torch.set_num_threads(1)
    protocol = task1_protocol()
    cities = list(protocol.task(1).cities)
    with tempfile.TemporaryDirectory() as tmp:
        root, out = Path(tmp) / "cityscapes", Path(tmp) / "shards"
        generate(root, protocol, images_per_city=args.frames_per_city, size=(2048, 1024), seed=0)
        pack(root, str(out), protocol, size=(1024, 512), samples_per_shard=args.samples_per_shard)
        cfg = DataConfig(
            manifest=str(out / "manifest.json"),
            batch_size=args.batch_size,
            num_workers=args.workers,
            shuffle_buffer=16,
        )
        lut = protocol.stage_lut(1)
        source = ShardSource.from_manifest(cfg.manifest, "task1")
        shard_loader = build_train_loader(cfg, source, lut, DistEnv(), seed=0)
        transform = SegmentationTransform(
            tuple(cfg.resize), tuple(cfg.mean), tuple(cfg.std), augment=cfg.augment
        )
        folder = FolderDataset(root, cities, transform, lut)
        folder_loader = DataLoader(
            folder,
            batch_size=args.batch_size,
            shuffle=True,
            num_workers=args.workers,
            drop_last=True,
        )
        cores = max(1, args.workers)
        folder_rate, _, folder_n, folder_shape = throughput(folder_loader, args.epochs)
        shard_rate, _, shard_n, shard_shape = throughput(shard_loader, args.epochs)
        shard_loader.close()
        cached, build = cached_loader(cfg.manifest, "", f"{tmp}/cache", args, lut)
        cache_rate, cache_per_cpu, cache_n, cache_shape = throughput(cached, args.cache_epochs)
        rows = transport_rows(args, out, root, protocol, lut, tmp)
    assert folder_shape == shard_shape == cache_shape, (folder_shape, shard_shape, cache_shape)
    print(f"frames: {len(folder)} (task 1 cities), source 2048x1024 PNG, shards 1024x512 PNG")
    print(
        f"workers: {args.workers}, batch {args.batch_size}, output {shard_shape}, "
        f"epochs 2..{args.epochs} timed (cache: 2..{args.cache_epochs})"
    )
    print(
        f"folder loader (reference style): {folder_rate / cores:7.2f} samples/s/core "
        f"({folder_n} samples)"
    )
    print(
        f"shard pipeline (webdataset):     {shard_rate / cores:7.2f} samples/s/core "
        f"({shard_n} samples)"
    )
    print(
        f"decoded cache + device augment:  {cache_per_cpu:7.2f} samples/s/core "
        f"({cache_n} samples, {cache_rate:.2f} samples/s in one process; "
        f"build {build:.1f} s with {args.workers} processes)"
    )
    local = next((row for row in rows if row[0] == "local"), None)
    for kind, rate, cached_rate, cached_build in rows:
        shard_ratio = f"{rate / local[1]:.2f}x" if local else "-"
        cache_ratio = f"{cached_rate / local[2]:.2f}x" if local else "-"
        print(
            f"transport {kind:<7} shards {rate / cores:7.2f} samples/s/core ({shard_ratio} "
            f"local), cache {cached_rate:7.2f} samples/s ({cache_ratio} local; build "
            f"{cached_build:.1f} s)"
        )
    print(f"cache/folder={cache_per_cpu / (folder_rate / cores):.2f}")
    print(f"cache/shards={cache_per_cpu / (shard_rate / cores):.2f}")
    print(f"ratio={shard_rate / folder_rate:.2f}")


if __name__ == "__main__":
    main()
