"""Segmentation metrics per task set (the paper's per-task evaluation; README "Evaluation").

For a task set S: argmax over S's channels only, ground-truth pixels outside S ignored,
confusion matrix over S's classes, IoU = TP / (TP + FP + FN), mIoU = NaN-mean over classes
(a class with neither ground truth nor prediction is skipped). Matrices accumulate on the
device and are summed across ranks with one ``all_reduce`` each.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F

from cil_dist.labels import IGNORE
from cil_dist.protocol import TaskProtocol


class ConfusionMatrix:
    """``matrix[target, prediction]`` counts, accumulated on a device."""

    def __init__(self, num_classes: int, device: str | torch.device = "cpu"):
        self.num_classes = num_classes
        self.matrix = torch.zeros(num_classes, num_classes, dtype=torch.int64, device=device)

    def update(self, prediction: torch.Tensor, target: torch.Tensor) -> None:
        keep = target != IGNORE
        index = target[keep].long() * self.num_classes + prediction[keep].long()
        counts = torch.bincount(index, minlength=self.num_classes**2)
        self.matrix += counts.view(self.num_classes, self.num_classes)

    def reduce(self) -> None:
        """Sum over all ranks (no-op without a process group)."""
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(self.matrix)

    def reset(self) -> None:
        self.matrix.zero_()

    def iou(self) -> torch.Tensor:
        """Per-class IoU (float64); NaN where a class has neither ground truth nor prediction."""
        m = self.matrix.double()
        tp = m.diag()
        union = m.sum(0) + m.sum(1) - tp
        return torch.where(union > 0, tp / union.clamp(min=1), torch.full_like(tp, math.nan))

    def miou(self) -> float:
        iou = self.iou()
        valid = ~iou.isnan()
        return float(iou[valid].mean()) if valid.any() else math.nan

    def to_dict(self, class_names: list[str]) -> dict[str, Any]:
        return {
            "miou": self.miou(),
            "iou": {n: float(v) for n, v in zip(class_names, self.iou().tolist(), strict=True)},
            "pixels": int(self.matrix.sum()),
        }


def restricted_prediction(logits: torch.Tensor, channels: list[int]) -> torch.Tensor:
    """Argmax over ``channels`` only, as indices into ``channels``."""
    index = torch.as_tensor(channels, device=logits.device)
    return logits.index_select(1, index).argmax(1)


def upsample_logits(logits: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Nearest upsampling of logits (N, C, h, w) to the label size (H, W)."""
    if tuple(logits.shape[-2:]) == tuple(size):
        return logits
    return F.interpolate(logits, size=size, mode="nearest")


class TaskSetEvaluator:
    """One confusion matrix per task set, fed with logits and raw Cityscapes label ids."""

    def __init__(
        self,
        protocol: TaskProtocol,
        num_channels: int,
        task_sets: list[str],
        device: str | torch.device = "cpu",
    ):
        self.protocol, self.task_sets = protocol, list(task_sets)
        self.channels, self.luts, self.matrices = {}, {}, {}
        for name in self.task_sets:
            channels = protocol.set_channels(name)
            if max(channels) >= num_channels:
                raise ValueError(
                    f"task set {name!r} needs channels up to {max(channels)}, but the model has "
                    f"{num_channels} output channels"
                )
            self.channels[name] = channels
            self.luts[name] = torch.from_numpy(protocol.eval_lut(name)).long().to(device)
            self.matrices[name] = ConfusionMatrix(len(channels), device)

    def update(self, logits: torch.Tensor, label_ids: torch.Tensor) -> None:
        ids = label_ids.long().clamp(0, 255)
        for name in self.task_sets:
            target = self.luts[name][ids]
            prediction = restricted_prediction(logits, self.channels[name])
            self.matrices[name].update(prediction, target)

    def reduce(self) -> None:
        for matrix in self.matrices.values():
            matrix.reduce()

    def results(self) -> dict[str, dict[str, Any]]:
        names = self.protocol.class_names
        return {
            name: self.matrices[name].to_dict([names[c] for c in self.channels[name]])
            for name in self.task_sets
        }
