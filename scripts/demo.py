"""``make demo`` / ``make reproduce``: the paper's protocol end to end on a synthetic
Cityscapes, on this machine.

Steps: generate the synthetic Cityscapes → pack it into shards → stream every split back and
summarise → train stage 1, then stages 2 and 3 with the paper's method (``cil``), the
fine-tuning lower bound (``finetune``) and the joint baseline, with validation curves on the
held-out city → evaluate every model on the val split for its task sets → print and write the
paper-shaped table, the ratio CIL / joint, the curves (PNG) and a picture of predictions.

The chain (``--chain``: ``demo_synthetic``, the few-minute demo, or ``reproduce_synthetic``, the
converged run) is run by submitit's local executor, as the chain's resources say (one rank per
job; ``--max-parallel`` jobs at once) — exactly what ``cil-launch submit CHAIN --executor local``
does.
"""

from __future__ import annotations

import argparse
import logging
import time
from collections import Counter
from pathlib import Path

from cil_dist.config import DataConfig
from cil_dist.data.manifest import Manifest
from cil_dist.data.pipeline import ShardSource, build_eval_loader
from cil_dist.distributed import DistEnv
from cil_dist.logs import setup_logging
from cil_dist.protocol import TaskProtocol
from shards.commands import summary

log = logging.getLogger("demo")


def read_back(manifest_url: str) -> dict[str, int]:
    """Stream every split once (evaluation mode) and count the samples per split."""
    manifest = Manifest.load(manifest_url)
    cfg = DataConfig(manifest=manifest_url, resize=list(manifest.resolution), num_workers=2)
    counts = {}
    for split in manifest.splits:
        seen = Counter()
        for batch in build_eval_loader(
            cfg, ShardSource.from_manifest(manifest_url, split), DistEnv()
        ):
            seen.update(batch["key"])
        if sum(seen.values()) != manifest.splits[split].samples or set(seen.values()) != {1}:
            raise RuntimeError(
                f"split {split}: read {sum(seen.values())} samples, manifest says "
                f"{manifest.splits[split].samples}"
            )
        counts[split] = sum(seen.values())
    return counts


def run_chain(
    out: Path, chain_name: str, overrides: list[str], max_parallel: int
) -> dict[str, Path]:
    """The chain (stages 1 → 2 → 3 with cil and finetune, joint, evaluations) on submitit's
    local executor, ``max_parallel`` jobs at once; returns the run folder's final checkpoints."""
    from launch.chain import load_chain
    from launch.report import write_report
    from launch.submit import submit_chain

    manifest = out / "shards" / "manifest.json"
    chain = load_chain(chain_name, [f"manifest={manifest}", *overrides])
    run_dir = out / "chain"
    chain_state = submit_chain(chain, run_dir, "local", chain_name, max_parallel)
    failed = [r for r in chain_state.jobs.values() if r.state not in ("COMPLETED", "SKIPPED")]
    if failed:
        raise RuntimeError(
            "demo chain failed: "
            + "; ".join(f"{r.name} {r.state} {r.error} (log: {r.log})" for r in failed)
        )
    write_report(chain, run_dir)
    return {name: Path(r.checkpoint) for name, r in chain_state.jobs.items() if r.kind == "train"}


def picture(out: Path, checkpoints: dict[str, Path], frames: int = 3) -> Path:
    """Image | ground truth | each method's prediction (all 19 classes) for a few val frames."""
    import numpy as np
    import torch
    from PIL import Image

    from cil_dist.evaluation.metrics import upsample_logits
    from cil_dist.evaluation.visualize import colorize, label_ids_to_color, side_by_side
    from cil_dist.training.checkpoint import model_from_checkpoint

    root = out / "cityscapes"
    images = sorted((root / "leftImg8bit" / "val").glob("*/*_leftImg8bit.png"))[::7][:frames]
    models = {name: model_from_checkpoint(str(path), "cpu") for name, path in checkpoints.items()}
    cfg = DataConfig()
    rows = []
    for path in images:
        image = np.asarray(Image.open(path).convert("RGB"))
        label = path.parent.parent.parent.parent / "gtFine" / "val" / path.parent.name
        label = label / path.name.replace("leftImg8bit.png", "gtFine_labelIds.png")
        row = [image, label_ids_to_color(np.asarray(Image.open(label)))]
        tensor = (torch.from_numpy(image / 255.0).float() - torch.tensor(cfg.mean)) / torch.tensor(
            cfg.std
        )
        for model, payload in models.values():
            names = TaskProtocol.from_dict(payload["protocol"]).class_names
            with torch.inference_mode():
                logits = model(tensor.permute(2, 0, 1)[None])
            logits = upsample_logits(logits, image.shape[:2])
            row.append(colorize(logits.argmax(1)[0].numpy(), names))
        rows.append(row)
    grid = side_by_side(rows, ["image", "ground truth", *models])
    target = out / "chain" / "predictions.png"
    Image.fromarray(grid).save(target)
    return target


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--chain", default="demo_synthetic", help="shipped chain or YAML")
    parser.add_argument("--out", default="out/demo")
    parser.add_argument("--images-per-city", type=int, default=12)
    parser.add_argument("--size", default="256x128")
    parser.add_argument("--max-parallel", type=int, default=1, help="jobs running at once")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="chain overrides")
    parser.add_argument(
        "--data-only", action="store_true", help="generate and pack the data, train nothing"
    )
    args = parser.parse_args()
    setup_logging(0)
    from shards.cli import parse_size
    from shards.pack import pack
    from shards.synth import generate

    out, size, start = Path(args.out).resolve(), parse_size(args.size), time.perf_counter()
    protocol = TaskProtocol.load("cityscapes_cil")
    generate(out / "cityscapes", protocol, images_per_city=args.images_per_city, size=size, seed=0)
    pack(out / "cityscapes", str(out / "shards"), protocol, size=size, samples_per_shard=8)
    manifest_url = str(out / "shards" / "manifest.json")
    log.info("\n%s", summary(Manifest.load(manifest_url)))
    log.info("read back: %s", read_back(manifest_url))
    if args.data_only:
        return
    checkpoints = run_chain(out, args.chain, args.set, args.max_parallel)
    target = picture(
        out,
        {
            "CIL": checkpoints["cil_stage3"],
            "fine-tuning": checkpoints["finetune_stage3"],
            "joint": checkpoints["joint"],
        },
    )
    results = out / "chain" / "results.md"
    log.info(
        "demo finished in %.0f s; table and per-class IoU in %s, picture in %s\n%s",
        time.perf_counter() - start,
        results,
        target,
        results.read_text().split("\n\n## ")[0],
    )


if __name__ == "__main__":
    main()
