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


def run_chain(out: Path, epochs_stage1: int, epochs: int) -> dict[str, dict[str, float]]:
    """Stage 1 → 2 → 3 (cil and finetune) and the joint baseline; returns mIoU rows."""
    from cil_dist.cli import load_train_config
    from cil_dist.train import run_training

    runs = out / "runs"
    common = [
        f"out_dir={runs}",
        f"data.manifest={out / 'shards' / 'manifest.json'}",
    ]

    def train(name: str, stage: int, method: str, teacher: Path | None) -> Path:
        overrides = [*common, f"name={name}", f"stage.stage={stage}", f"stage.method={method}"]
        overrides.append(f"optim.epochs={epochs_stage1 if stage == 1 else epochs}")
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
    picture(out, {"CIL": cil3, "fine-tuning": ft3, "joint": joint})
    return rows


def picture(out: Path, checkpoints: dict[str, Path], frames: int = 3) -> Path:
    """Image | ground truth | each method's prediction (all 19 classes) for a few val frames."""
    import numpy as np
    import torch
    from PIL import Image

    from cil_dist.evaluate import model_from_checkpoint
    from cil_dist.metrics import upsample_logits
    from cil_dist.visualize import colorize, label_ids_to_color, side_by_side

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
    target = out / "predictions.png"
    Image.fromarray(grid).save(target)
    return target


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="out/demo")
    parser.add_argument("--images-per-city", type=int, default=8)
    parser.add_argument("--size", default="256x128")
    parser.add_argument("--epochs-stage1", type=int, default=40)
    parser.add_argument("--epochs", type=int, default=25, help="epochs of the later stages")
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
    rows = run_chain(out, args.epochs_stage1, args.epochs)
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
