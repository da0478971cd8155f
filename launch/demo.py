"""``make demo``: the paper's protocol end to end on a synthetic Cityscapes, on this machine.

Steps: generate the synthetic Cityscapes → pack it into shards → stream every split back and
summarise → train stage 1, then stages 2 and 3 with the paper's method (``cil``), the
fine-tuning lower bound (``finetune``) and the joint baseline → evaluate every model on the
val split for its task sets → print and write the paper-shaped table.

The stages run one after another in this process (world size 1, CPU). The chains issue moves
this onto submitit (local executor or SLURM) with 2 ranks per stage.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from collections import Counter
from pathlib import Path

from cil_dist.config import DataConfig
from cil_dist.data.manifest import Manifest
from cil_dist.data.pipeline import ShardSource, build_eval_loader
from cil_dist.distributed import DistEnv
from cil_dist.logs import setup_logging
from cil_dist.metrics import format_paper_table
from cil_dist.protocol import TaskProtocol
from shards.commands import summary

log = logging.getLogger("demo")

TASK_SETS = ("1", "2", "12", "3", "123")


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


def run_chain(out: Path, epochs: int) -> dict[str, dict[str, float]]:
    """Stage 1 → 2 → 3 (cil and finetune) and the joint baseline; returns mIoU rows."""
    from cil_dist.cli import load_train_config
    from cil_dist.train import run_training

    runs = out / "runs"
    common = [
        f"out_dir={runs}",
        f"data.manifest={out / 'shards' / 'manifest.json'}",
        f"optim.epochs={epochs}",
    ]

    def train(name: str, stage: int, method: str, teacher: Path | None) -> Path:
        overrides = [*common, f"name={name}", f"stage.stage={stage}", f"stage.method={method}"]
        if teacher:
            overrides.append(f"teacher.checkpoint={teacher}")
        return run_training(load_train_config("demo_synthetic", overrides))

    stage1 = train("stage1", 1, "cil", None)
    cil2 = train("cil_stage2", 2, "cil", stage1)
    cil3 = train("cil_stage3", 3, "cil", cil2)
    ft2 = train("finetune_stage2", 2, "finetune", stage1)
    ft3 = train("finetune_stage3", 3, "finetune", ft2)
    joint = train("joint", 3, "joint", None)
    rows = {}
    for label, run in (
        ("CIL (this method)", "cil_stage3"),
        ("fine-tuning (lower bound)", "finetune_stage3"),
        ("joint baseline", "joint"),
        ("stage 1 only", "stage1"),
    ):
        metrics = json.loads((runs / run / "eval_val" / "metrics.json").read_text())
        rows[label] = {name: result["miou"] for name, result in metrics.items()}
    del cil3, ft3, joint
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="out/demo")
    parser.add_argument("--images-per-city", type=int, default=8)
    parser.add_argument("--size", default="256x128")
    parser.add_argument("--epochs", type=int, default=8)
    args = parser.parse_args()
    setup_logging(0)
    from shards.cli import parse_size
    from shards.pack import pack
    from shards.synth import generate

    out, size, start = Path(args.out), parse_size(args.size), time.perf_counter()
    protocol = TaskProtocol.load("cityscapes_cil")
    generate(out / "cityscapes", protocol, images_per_city=args.images_per_city, size=size, seed=0)
    pack(out / "cityscapes", str(out / "shards"), protocol, size=size, samples_per_shard=8)
    manifest_url = str(out / "shards" / "manifest.json")
    log.info("\n%s", summary(Manifest.load(manifest_url)))
    log.info("read back: %s", read_back(manifest_url))
    rows = run_chain(out, args.epochs)
    table = format_paper_table(rows, TASK_SETS)
    (out / "results.md").write_text(table + "\n")
    log.info(
        "demo finished in %.0f s; results in %s\n%s",
        time.perf_counter() - start,
        out / "results.md",
        table,
    )


if __name__ == "__main__":
    main()
