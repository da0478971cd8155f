"""Benchmark: shard pipeline vs a folder loader in the reference's style, samples/s per core.

Both produce identical tensors shapes with the same augmentation (the paper's): the folder
loader opens the full-resolution 2048x1024 PNG image and label of each frame and resizes to
1024x512 per sample, as the reference did; the shard pipeline streams 1024x512 PNGs from
webdataset shards, ships uint8 tensors and normalises them in the training process (as the
trainer does on its device). Both run with the same number of DataLoader workers, measured in
this run, and are timed until float images and int64 labels are in the training process.
The last line is ``ratio=X.XX`` (shard pipeline / folder loader, samples/s per core).

``--transports local,http,s3`` adds, before that line, one row per way of reaching the same
shards: the local folder, a loopback HTTP server (Python's file server), S3 on loopback
(moto's server, the shards packed straight into it, read through s3fs) and ``s3+<N>ms``, the
same S3 behind a proxy that holds every request N ms (a distant store's time to first byte),
each with its samples/s per core and its ratio to local.

    python bench/data_pipeline.py [--frames-per-city 6] [--samples-per-shard 4] [--workers 2]
                                  [--epochs 6]
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
from cil_dist.data.pipeline import EpochLoader, ShardSource, build_train_loader
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


def throughput(loader, epochs: int) -> tuple[float, int, tuple]:
    """Samples/s until float, normalised images and int64 labels are in the training process
    (the shard loaders ship uint8 and normalise there, as the trainer does on its device)."""
    count, shape = 0, None
    start = time.perf_counter()
    for epoch in range(epochs):
        if isinstance(loader, EpochLoader):
            loader.set_epoch(epoch)
        for batch in loader:
            if isinstance(loader, EpochLoader):
                images, labels = loader.to_device(batch, "cpu")
            else:
                images, labels = batch
            assert images.dtype == torch.float32 and labels.dtype == torch.int64
            count += images.shape[0]
            shape = tuple(images.shape[1:])
    return count / (time.perf_counter() - start), count, shape


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


def transport_rows(args, out: Path, root: Path, protocol, lut) -> list[tuple[str, float, int]]:
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
            rate, count, _ = throughput(loader, args.epochs)
            rows.append((kind, rate, count))
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
        "--transports",
        default="",
        help="comma list of local,http,s3,s3+<N>ms (S3 with N ms added per request): a row each",
    )
    args = parser.parse_args()
    setup_logging(0)
    torch.set_num_threads(1)
    protocol = TaskProtocol.load("cityscapes_cil")
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
        folder_rate, folder_n, folder_shape = throughput(folder_loader, args.epochs)
        shard_rate, shard_n, shard_shape = throughput(shard_loader, args.epochs)
        rows = transport_rows(args, out, root, protocol, lut)
    assert folder_shape == shard_shape, (folder_shape, shard_shape)
    print(f"frames: {len(folder)} (task 1 cities), source 2048x1024 PNG, shards 1024x512 PNG")
    print(f"workers: {args.workers}, batch {args.batch_size}, output {shard_shape}")
    print(
        f"folder loader (reference style): {folder_rate / cores:7.2f} samples/s/core "
        f"({folder_n} samples)"
    )
    print(
        f"shard pipeline (webdataset):     {shard_rate / cores:7.2f} samples/s/core "
        f"({shard_n} samples)"
    )
    local = next((rate for kind, rate, _ in rows if kind == "local"), shard_rate)
    for kind, rate, count in rows:
        print(
            f"transport {kind:<6} {rate / cores:7.2f} samples/s/core "
            f"({count} samples), {rate / local:.2f}x local"
        )
    print(f"ratio={shard_rate / folder_rate:.2f}")


if __name__ == "__main__":
    main()
