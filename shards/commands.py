"""What each ``cil-shards`` sub-command does (argument parsing lives in :mod:`shards.cli`)."""

from __future__ import annotations

import argparse
import logging

from cil_dist.data.manifest import Manifest
from cil_dist.protocol import TaskProtocol
from cil_dist.storage import StorageOptions
from cil_dist.urls import redact_url
from shards.verify import verify_manifest

log = logging.getLogger("cil-shards")


def summary(manifest: Manifest) -> str:
    """A human-readable table of a manifest's splits."""
    width, height = manifest.resolution
    lines = [
        f"manifest {redact_url(manifest.url)}: images {width}x{height} {manifest.image_format}, "
        f"protocol {manifest.task_config.get('name', '?')}",
        f"{'split':<10} {'cities':>6} {'labels':>10} {'shards':>6} {'samples':>8} {'MiB':>9}",
    ]
    for name, rec in manifest.splits.items():
        label_w, label_h = manifest.label_size(name)
        lines.append(
            f"{name:<10} {len(rec.cities):>6} {f'{label_w}x{label_h}':>10} {len(rec.shards):>6} "
            f"{rec.samples:>8} {rec.bytes / 2**20:>9.1f}"
        )
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    # --endpoint-url of pack, verify and inspect: how their s3:// URLs are reached
    options = StorageOptions(endpoint_url=getattr(args, "endpoint_url", "") or "")
    if args.command == "synth":
        from shards.synth import generate

        result = generate(
            args.out,
            TaskProtocol.load(args.tasks),
            images_per_city=args.images_per_city,
            size=args.size,
            seed=args.seed,
            workers=args.workers,
        )
        log.info("%s", result)
        return 0
    if args.command == "pack":
        from shards.pack import DEFAULT_SAMPLES_PER_SHARD, pack

        result = pack(
            args.cityscapes,
            args.out,
            TaskProtocol.load(args.tasks),
            size=args.size,
            samples_per_shard=(
                DEFAULT_SAMPLES_PER_SHARD
                if args.samples_per_shard is None
                else args.samples_per_shard
            ),
            image_format=args.image_format,
            jpeg_quality=args.jpeg_quality,
            workers=args.workers,
            val_labels=args.val_labels,
            options=options,
        )
        log.info("\n%s", summary(Manifest.load(result.manifest_url, options)))
        return 0
    if args.command == "verify":
        bad = verify_manifest(args.manifest, options=options)
        for problem in bad:
            log.error("%s", problem)
        if bad:
            log.error("%d bad shard(s) in %s", len(bad), redact_url(args.manifest))
            return 1
        log.info("all shards of %s match the manifest", redact_url(args.manifest))
        return 0
    if args.command == "inspect":
        print(summary(Manifest.load(args.manifest, options)))
        return 0
    raise ValueError(f"unknown command {args.command!r}")
