"""``cil-shards``: make a synthetic Cityscapes tree, pack Cityscapes into shards, check shards.

cil-shards synth  --out DIR [--images-per-city N] [--size WxH] [--seed S] [--tasks YAML]
cil-shards pack   --cityscapes ROOT --out DIR [--tasks YAML] [--size WxH]
                  [--val-labels full|resized] [--samples-per-shard N]
                  [--image-format png|jpg] [--workers N]
cil-shards verify MANIFEST            # every shard's size, sample count and sha256
cil-shards inspect MANIFEST           # splits, label sizes, shard and sample counts

DIR and MANIFEST may be URLs: s3://bucket/prefix (pack, verify, inspect; S3-compatible stores
via --endpoint-url or AWS_ENDPOINT_URL), gs://…, https://… (reading).
"""

from __future__ import annotations

import argparse
import logging
import sys

from cil_dist import urls
from cil_dist.logs import setup_logging

log = logging.getLogger("cil-shards")


def parse_size(text: str) -> tuple[int, int]:
    """``"1024x512"`` → ``(1024, 512)`` (width, height)."""
    try:
        width, height = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected WIDTHxHEIGHT, got {text!r}") from None
    if width <= 0 or height <= 0:
        raise argparse.ArgumentTypeError(f"size must be positive, got {text!r}")
    return width, height


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cil-shards", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    store = argparse.ArgumentParser(add_help=False)
    store.add_argument(
        "--endpoint-url",
        default="",
        help="S3-compatible endpoint for s3:// URLs (default: AWS_ENDPOINT_URL, ~/.aws, AWS)",
    )
    tasks_help = "task protocol: a YAML file or a shipped name (default: cityscapes_cil)"

    synth = sub.add_parser("synth", help="write a synthetic dataset in the Cityscapes layout")
    synth.add_argument("--out", required=True, help="output folder (Cityscapes root)")
    synth.add_argument("--images-per-city", type=int, default=10)
    synth.add_argument("--size", type=parse_size, default=(1024, 512), help="WxH (1024x512)")
    synth.add_argument("--seed", type=int, default=0)
    synth.add_argument("--tasks", default="cityscapes_cil", help=tasks_help)
    synth.add_argument("--workers", type=int, default=None, help="processes (default: all cores)")

    pack = sub.add_parser(
        "pack", parents=[store], help="pack a Cityscapes tree into webdataset shards"
    )
    pack.add_argument("--cityscapes", required=True, help="Cityscapes root (leftImg8bit, gtFine)")
    pack.add_argument("--out", required=True, help="output folder (or URL) for shards + manifest")
    pack.add_argument("--tasks", default="cityscapes_cil", help=tasks_help)
    pack.add_argument("--size", type=parse_size, default=(1024, 512), help="stored WxH")
    pack.add_argument(
        "--val-labels",
        choices=("full", "resized"),  # shards.pack.VAL_LABEL_MODES (imported lazily)
        default="full",
        help="val labels at their source resolution (full, the paper's evaluation) or at --size",
    )
    pack.add_argument("--samples-per-shard", type=int, default=None)
    pack.add_argument("--image-format", choices=("png", "jpg"), default="png")
    pack.add_argument("--jpeg-quality", type=int, default=95)
    pack.add_argument("--workers", type=int, default=None, help="processes (default: all cores)")

    verify = sub.add_parser(
        "verify", parents=[store], help="check every shard against the manifest"
    )
    verify.add_argument("manifest", help="path or URL of manifest.json")

    inspect = sub.add_parser("inspect", parents=[store], help="summarise a manifest")
    inspect.add_argument("manifest", help="path or URL of manifest.json")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(0)
    from cil_dist.data.reading import TRANSIENT
    from shards import commands

    try:
        return commands.run(args)
    except (ValueError, OSError, RuntimeError, *TRANSIENT) as exc:  # TRANSIENT: transport errors
        log.error("%s", urls.redact_url(str(exc)))  # an fsspec error may quote a signed URL
        return 2


if __name__ == "__main__":
    sys.exit(main())
