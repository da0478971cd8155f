"""Evaluation per task set (the paper; README "Evaluation and inference"): task-restricted
argmax at label resolution, confusion matrices summed across ranks, per-class IoU and mIoU,
written as JSON and a paper-shaped table.
Optionally exports predictions as Cityscapes label-id PNGs (``{frame}_leftImg8bit.png``), the
format the official Cityscapes scripts and benchmark server read.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from cil_dist.config import TrainConfig
from cil_dist.data.pipeline import EpochLoader, ShardSource, build_eval_loader
from cil_dist.distributed import DistEnv
from cil_dist.evaluation.metrics import TaskSetEvaluator, upsample_logits
from cil_dist.evaluation.tables import format_class_table, format_paper_table
from cil_dist.evaluation.visualize import channels_to_label_ids
from cil_dist.protocol import TaskProtocol
from cil_dist.storage import StorageOptions
from cil_dist.training.checkpoint import model_from_checkpoint
from cil_dist.training.precision import Precision

log = logging.getLogger(__name__)


def export_predictions(logits: torch.Tensor, keys: list[str], names: list[str], out: Path):
    """Write the argmax over all of the model's channels as Cityscapes label-id PNGs."""
    out.mkdir(parents=True, exist_ok=True)
    channels = logits.argmax(1).to(torch.uint8).cpu().numpy()
    for key, channel_map in zip(keys, channels, strict=True):
        ids = channels_to_label_ids(channel_map, names)
        Image.fromarray(ids.astype(np.uint8)).save(out / f"{key}_leftImg8bit.png")


def evaluate(
    model: torch.nn.Module,
    loader: EpochLoader,
    evaluator: TaskSetEvaluator,
    precision: Precision,
    env: DistEnv,
    export_dir: Path | None = None,
    class_names: list[str] | None = None,
) -> dict[str, Any]:
    """Run ``model`` over every sample of ``loader`` (once across ranks) and reduce metrics."""
    model.eval()
    with torch.inference_mode():
        for batch in loader:
            images, labels = loader.to_device(batch, env.device)
            with precision.autocast():
                logits = model(images)
            logits = upsample_logits(logits.float(), tuple(labels.shape[-2:]))
            evaluator.update(logits, labels)
            if export_dir is not None:
                export_predictions(logits, batch["key"], class_names or [], export_dir)
    evaluator.reduce()
    return evaluator.results()


def json_safe(value: Any) -> Any:
    """``value`` with NaN floats as None: JSON has no NaN (``null`` = no ground truth and no
    prediction, the class is left out of the mean)."""
    if isinstance(value, dict):
        return {key: json_safe(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [json_safe(item) for item in value]
    if isinstance(value, float) and math.isnan(value):
        return None
    return value


def write_results(results: dict[str, Any], protocol: TaskProtocol, out: Path, label: str) -> None:
    """``metrics.json`` plus ``table.md`` (paper-shaped mIoU row and per-class IoU)."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "metrics.json").write_text(json.dumps(json_safe(results), indent=1, allow_nan=False))
    row = {name: res["miou"] for name, res in results.items()}
    table = format_paper_table({label: row}, tuple(results))
    classes = format_class_table(results, protocol.class_names)
    (out / "table.md").write_text(f"{table}\n\n{classes}\n")
    log.info("evaluation (%s):\n%s", out, table)


def evaluate_run(
    model: torch.nn.Module,
    cfg: TrainConfig,
    plan,
    env: DistEnv,
    run_dir: Path,
    precision: Precision,
    split: str = "val",
) -> dict[str, Any]:
    """Evaluate a freshly trained model on ``split`` for its task sets; rank 0 writes files."""
    task_sets = list(cfg.eval.task_sets) or plan.task_sets
    evaluator = TaskSetEvaluator(plan.protocol, plan.num_classes, task_sets, device=env.device)
    source = ShardSource.from_config(cfg.data, split)
    loader = build_eval_loader(cfg.data, source, env)
    export = run_dir / "predictions" / split if cfg.eval.export_predictions else None
    results = evaluate(model, loader, evaluator, precision, env, export, plan.protocol.class_names)
    if env.is_main:
        write_results(results, plan.protocol, run_dir / f"eval_{split}", cfg.name)
    return results


def evaluate_checkpoint(
    path: str,
    cfg: TrainConfig,
    env: DistEnv,
    task_sets: list[str] | None = None,
    split: str = "val",
    out: Path | None = None,
    export: Path | None = None,
) -> dict[str, Any]:
    """``cil eval``: evaluate a checkpoint on a manifest split for the given task sets."""
    from cil_dist.training.precision import build_precision

    model, payload = model_from_checkpoint(
        path, env.device, StorageOptions.from_data_config(cfg.data)
    )
    protocol = (
        TaskProtocol.from_dict(payload["protocol"], source=path)
        if "protocol" in payload
        else TaskProtocol.load(cfg.stage.tasks)
    )
    num_classes = model.decoder.output_conv.out_channels
    unknown = [name for name in task_sets or [] if name not in protocol.eval_task_sets]
    if unknown:
        raise ValueError(
            f"--task-sets: unknown task set(s) {', '.join(unknown)}; protocol "
            f"{protocol.name!r} defines {', '.join(protocol.eval_task_sets)}"
        )
    if not task_sets:
        task_sets = protocol.covered_task_sets(num_classes)
    evaluator = TaskSetEvaluator(protocol, num_classes, task_sets, device=env.device)
    loader = build_eval_loader(cfg.data, ShardSource.from_config(cfg.data, split), env)
    precision = build_precision(cfg.precision, env)
    results = evaluate(model, loader, evaluator, precision, env, export, protocol.class_names)
    if env.is_main:
        write_results(
            results, protocol, out or Path(path).parent.parent / f"eval_{split}", Path(path).stem
        )
    return results


def run_evaluation(
    path: str,
    cfg: TrainConfig,
    task_sets: list[str] | None = None,
    split: str = "val",
    out: Path | None = None,
    export: Path | None = None,
) -> dict[str, Any]:
    """Entry point of an evaluation in this process (plain, torchrun or a submitit task)."""
    from cil_dist.distributed import process_group
    from cil_dist.logs import setup_logging

    env = DistEnv.from_environment()
    setup_logging(env.rank)
    with process_group(env, cfg.dist.timeout_s):  # the run's dist.timeout_s, as in training
        return evaluate_checkpoint(path, cfg, env, task_sets, split, out, export)
