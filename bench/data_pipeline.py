"""Benchmark: shard pipeline vs a folder loader in the reference's style, samples/s per core.

Both produce identical tensors shapes with the same augmentation (SEED_FACTS): the folder
loader opens the full-resolution 2048x1024 PNG image and label of each frame and resizes to
1024x512 per sample, as the reference did; the shard pipeline streams 1024x512 PNGs from
webdataset shards. Both run with the same number of DataLoader workers, measured in this run.
The last line is ``ratio=X.XX`` (shard pipeline / folder loader, samples/s per core).

    python bench/data_pipeline.py [--frames-per-city 4] [--workers 2] [--epochs 2]
"""

from __future__ import annotations

import argparse
import logging
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from cil_dist.config import DataConfig
from cil_dist.data.pipeline import ShardSource, build_train_loader
from cil_dist.data.transforms import SegmentationTransform
from cil_dist.distributed import DistEnv
from cil_dist.logs import setup_logging
from cil_dist.protocol import TaskProtocol
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


def throughput(loader, epochs: int, set_epoch=None) -> tuple[float, int, tuple]:
    count, shape = 0, None
    start = time.perf_counter()
    for epoch in range(epochs):
        if set_epoch:
            set_epoch(epoch)
        for batch in loader:
            images = batch["image"] if isinstance(batch, dict) else batch[0]
            count += images.shape[0]
            shape = tuple(images.shape[1:])
    return count / (time.perf_counter() - start), count, shape


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--frames-per-city", type=int, default=6)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=6)
    args = parser.parse_args()
    setup_logging(0)
    torch.set_num_threads(1)
    protocol = TaskProtocol.load("cityscapes_cil")
    cities = list(protocol.task(1).cities)
    with tempfile.TemporaryDirectory() as tmp:
        root, out = Path(tmp) / "cityscapes", Path(tmp) / "shards"
        generate(root, protocol, images_per_city=args.frames_per_city, size=(2048, 1024), seed=0)
        pack(root, str(out), protocol, size=(1024, 512), samples_per_shard=4)
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
        shard_rate, shard_n, shard_shape = throughput(
            shard_loader, args.epochs, shard_loader.set_epoch
        )
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
    print(f"ratio={shard_rate / folder_rate:.2f}")


if __name__ == "__main__":
    main()
