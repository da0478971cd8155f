"""``cil infer``: segment one image; write the coloured segmentation, an overlay and metrics."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from cil_dist.config import DataConfig
from cil_dist.data.transforms import normalize
from cil_dist.evaluation.evaluate import json_safe
from cil_dist.evaluation.metrics import TaskSetEvaluator, restricted_prediction, upsample_logits
from cil_dist.evaluation.visualize import colorize, overlay
from cil_dist.protocol import TaskProtocol
from cil_dist.training.checkpoint import model_from_checkpoint

log = logging.getLogger(__name__)


def load_ground_truth(path: str, size: tuple[int, int]) -> np.ndarray:
    """Cityscapes label ids of a ``*_labelIds.png``, resized (nearest) to the image size."""
    from cil_dist import labels

    ids = np.asarray(Image.open(path))
    if ids.ndim != 2:
        raise ValueError(f"{path}: a ground truth must be a single-channel labelIds PNG")
    if not labels.valid_label_ids()[ids.clip(0, 255).astype(np.uint8)].all() or ids.max() > 255:
        raise ValueError(f"{path}: holds values that are not Cityscapes label ids")
    if ids.shape[::-1] != size:
        ids = np.asarray(Image.fromarray(ids.astype(np.uint8)).resize(size, Image.NEAREST))
    return ids.astype(np.uint8)


def infer(
    checkpoint: str,
    image_path: str,
    output_path: str,
    ground_truth: str | None = None,
    task_set: str | None = None,
    resize: tuple[int, int] | None = None,
    device: str = "cpu",
) -> dict[str, Any]:
    """Segment ``image_path``; returns the written file paths (and metrics with a ground truth)."""
    model, payload = model_from_checkpoint(checkpoint, device)
    protocol = (
        TaskProtocol.from_dict(payload["protocol"], source=checkpoint)
        if "protocol" in payload
        else TaskProtocol.load("cityscapes_cil")
    )
    num_classes = model.decoder.output_conv.out_channels
    channels = protocol.set_channels(task_set) if task_set else list(range(num_classes))
    if max(channels) >= num_classes:
        raise ValueError(
            f"task set {task_set!r} needs channels the {num_classes}-class model lacks"
        )
    try:
        image = Image.open(image_path).convert("RGB")
    except (OSError, ValueError) as exc:  # PIL's UnidentifiedImageError is an OSError
        raise ValueError(f"--image: {image_path}: not a readable image ({exc})") from None
    defaults, trained = DataConfig(), payload.get("config", {}).get("data", {})
    resize = tuple(resize or trained.get("resize") or defaults.resize)  # as the run was trained
    mean, std = trained.get("mean", defaults.mean), trained.get("std", defaults.std)
    pixels = torch.from_numpy(np.array(image.resize(resize, Image.BILINEAR))).permute(2, 0, 1)
    tensor = normalize(pixels[None].to(device), tuple(mean), tuple(std))  # as training does
    with torch.inference_mode():
        logits = model(tensor).float()
        logits = upsample_logits(logits, (image.height, image.width))
        prediction = restricted_prediction(logits, channels)[0].cpu().numpy()
    names = [protocol.class_names[c] for c in channels]
    color = colorize(prediction, names)
    out = Path(output_path)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--output-path: {out} is a file, not a folder")
    out.mkdir(parents=True, exist_ok=True)
    stem = Path(image_path).stem
    written = {
        "segmentation": out / f"{stem}_segmentation.png",
        "overlay": out / f"{stem}_overlay.png",
    }
    Image.fromarray(color).save(written["segmentation"])
    Image.fromarray(overlay(np.asarray(image), color)).save(written["overlay"])
    result: dict[str, Any] = {k: str(v) for k, v in written.items()}
    if ground_truth:
        gt = torch.from_numpy(load_ground_truth(ground_truth, image.size))[None].to(device)
        sets = [task_set] if task_set else protocol.covered_task_sets(num_classes)
        evaluator = TaskSetEvaluator(protocol, num_classes, sets, device=device)
        evaluator.update(logits, gt)
        result["metrics"] = evaluator.results()
        metrics = json.dumps(json_safe(result["metrics"]), indent=1, allow_nan=False)
        (out / f"{stem}_metrics.json").write_text(metrics)
    log.info("wrote %s", ", ".join(result[k] for k in ("segmentation", "overlay")))
    return result
