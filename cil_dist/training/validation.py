"""Curves during training: validation per class and the distillation diagnostic.

Every ``eval.every_epochs`` epochs (and after the last) the student is evaluated on
``eval.splits`` (by default ``heldout``: the paper's hyper-parameter city erfurt; ``val`` may be
added) for every task set it covers, per-class IoU included. Each epoch also records the loss
parts, the learning rate and, in an incremental stage, the distillation diagnostic measured on
the stage's own training batches at the pixels without a new label:

- ``distill/agreement``: how often the student's argmax over the old channels equals the
  teacher's (1.0 = the old classes are kept pixel for pixel);
- ``distill/old_mass``: the student's softmax mass on the old channels (the teacher's is 1).

Everything goes to TensorBoard (``split/name``) and to ``RUN/metrics.csv`` as tidy rows
``epoch,step,split,name,value`` (one file per run; a resumed run drops the rows after its
checkpoint's epoch, so the file always describes the weights that exist).
"""

from __future__ import annotations

import csv
import math
from pathlib import Path
from typing import Any

import torch

from cil_dist.config import ConfigError, TrainConfig
from cil_dist.data.manifest import ManifestError
from cil_dist.data.pipeline import EpochLoader, ShardSource, build_eval_loader
from cil_dist.distributed import DistEnv
from cil_dist.evaluation.metrics import TaskSetEvaluator
from cil_dist.labels import IGNORE
from cil_dist.training.precision import Precision
from cil_dist.training.run_folder import METRICS_CSV

FIELDS = ("epoch", "step", "split", "name", "value")


def distill_sums(logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor):
    """``[agreeing pixels, old-channel mass, unlabelled pixels]`` of one batch (float64)."""
    with torch.no_grad():
        unlabelled = labels == IGNORE
        old = teacher_logits.shape[1]
        student = logits.detach().float()
        agree = student[:, :old].argmax(1) == teacher_logits.argmax(1)
        mass = torch.softmax(student, 1)[:, :old].sum(1)
        return torch.stack(
            [
                (agree & unlabelled).sum().double(),
                (mass * unlabelled).sum().double(),
                unlabelled.sum().double(),
            ]
        )


def distill_metrics(sums: torch.Tensor) -> dict[str, float]:
    """Epoch figures from :func:`distill_sums` summed over steps and ranks."""
    agree, mass, pixels = (float(v) for v in sums)
    if pixels <= 0:
        return {}
    return {"distill/agreement": agree / pixels, "distill/old_mass": mass / pixels}


class MetricsLog:
    """``RUN/metrics.csv`` and TensorBoard, written by rank 0 only."""

    def __init__(self, run_dir: Path, env: DistEnv, tensorboard: bool):
        self.path = Path(run_dir) / METRICS_CSV
        self.enabled = env.is_main
        self.writer = None
        if self.enabled and tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(Path(run_dir) / "tensorboard"))

    def truncate_after(self, epoch: int) -> None:
        """Drop rows of epochs after ``epoch`` (those of a run resumed from an older state)."""
        if not (self.enabled and self.path.is_file()):
            return
        with self.path.open(newline="") as stream:
            rows = [r for r in csv.DictReader(stream) if int(r["epoch"]) <= epoch]
        self._write(rows, "w")

    def add(self, epoch: int, step: int, split: str, values: dict[str, float]) -> None:
        if not self.enabled:
            return
        rows = [
            {"epoch": epoch, "step": step, "split": split, "name": name, "value": value}
            for name, value in values.items()
        ]
        self._write(rows, "a")
        if self.writer:
            for name, value in values.items():
                if not math.isnan(value):
                    self.writer.add_scalar(f"{split}/{name}", value, epoch)

    def scalar(self, tag: str, value: float, step: int) -> None:
        """A per-step TensorBoard scalar (not in the CSV)."""
        if self.writer:
            self.writer.add_scalar(tag, value, step)

    def _write(self, rows: list[dict[str, Any]], mode: str) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        new = mode == "w" or not self.path.is_file()
        with self.path.open(mode, newline="") as stream:
            writer = csv.DictWriter(stream, FIELDS)
            if new:
                writer.writeheader()
            writer.writerows(rows)

    def close(self) -> None:
        if self.writer:
            self.writer.close()


def flatten(results: dict[str, dict[str, Any]]) -> dict[str, float]:
    """``{"12/mIoU": .., "12/road": ..}`` from the evaluator's results."""
    values = {}
    for task_set, result in results.items():
        values[f"{task_set}/mIoU"] = result["miou"]
        for name, iou in result["iou"].items():
            values[f"{task_set}/{name}"] = iou
    return values


class Validator:
    """Evaluates the student on ``eval.splits`` for every task set it covers."""

    def __init__(self, cfg: TrainConfig, plan, env: DistEnv, precision: Precision):
        self.cfg, self.plan, self.env, self.precision = cfg, plan, env, precision
        self.loaders: dict[str, EpochLoader] = {}
        if cfg.eval.every_epochs:  # settings checked by TrainConfig.validate
            for split in cfg.eval.splits:
                try:
                    source = ShardSource.from_config(cfg.data, split)
                except ManifestError as exc:
                    raise ConfigError(f"eval.splits: {exc}") from None
                self.loaders[split] = build_eval_loader(cfg.data, source, env)

    def due(self, epoch: int) -> bool:
        every = self.cfg.eval.every_epochs
        return bool(every) and (epoch % every == 0 or epoch == self.cfg.optim.epochs)

    def __call__(self, model: torch.nn.Module) -> dict[str, dict[str, float]]:
        from cil_dist.evaluation.evaluate import evaluate

        out = {}
        for split, loader in self.loaders.items():
            evaluator = TaskSetEvaluator(
                self.plan.protocol, self.plan.num_classes, self.plan.task_sets, self.env.device
            )
            results = evaluate(model, loader, evaluator, self.precision, self.env)
            out[split] = flatten(results)
        model.train()
        return out

    def close(self) -> None:
        for loader in self.loaders.values():
            loader.close()
