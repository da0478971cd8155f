"""The losses of the method, as plain functions on tensors (Klingner et al., ITSC 2020, Sec. III;
README "Training a stage"). All are computed in float32, whatever the dtype of the logits or an
active autocast.

Each loss is a sum over pixels divided by a pixel count. By default the count is this batch's
own; under data parallelism the trainer passes :class:`PixelCounts` of the *global* batch
(summed over ranks, divided by the world size), so that after DDP averages the gradients, 1 rank
× 6 images and 2 ranks × 3 images optimise the same loss (:func:`global_pixel_counts`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from cil_dist.labels import IGNORE


@dataclass(frozen=True)
class PixelCounts:
    """Denominators of the losses: labelled pixels (cross-entropy), unlabelled (distillation)."""

    labelled: torch.Tensor
    unlabelled: torch.Tensor

    @classmethod
    def of(cls, labels: torch.Tensor) -> PixelCounts:
        labelled = (labels != IGNORE).sum().double()
        return cls(labelled, labels.numel() - labelled)


def global_pixel_counts(labels: torch.Tensor, world_size: int) -> PixelCounts:
    """This rank's share of the global batch's pixel counts: the sum over ranks / world size.

    With per-rank losses ``sum_r / (N / W)``, DDP's gradient average ``(1/W) Σ_r`` equals the
    gradient of ``Σ_r sum_r / N``, the loss of the whole batch on one process.
    """
    counts = PixelCounts.of(labels)
    if world_size <= 1:
        return counts
    import torch.distributed as dist

    both = torch.stack([counts.labelled, counts.unlabelled])
    dist.all_reduce(both)
    both = both / world_size
    return PixelCounts(both[0], both[1])


def _float32(*tensors: torch.Tensor) -> list[torch.Tensor]:
    """At least float32 (bf16/fp16 are upcast; float64 stays float64)."""
    return [t.to(torch.promote_types(t.dtype, torch.float32)) for t in tensors]


def _mean(total: torch.Tensor, count: torch.Tensor) -> torch.Tensor:
    """``total / count``; 0 (still in the graph) when nothing was counted, as ``total`` then
    sums no pixel. No host synchronisation."""
    return total / count.to(total.dtype).clamp_min(1e-12)


def cross_entropy(
    logits: torch.Tensor, labels: torch.Tensor, counts: PixelCounts | None = None
) -> torch.Tensor:
    """Static cross-entropy over all channels, mean over labelled pixels (0 if none)."""
    counts = counts or PixelCounts.of(labels)
    with torch.autocast(logits.device.type, enabled=False):
        (logits,) = _float32(logits)
        total = F.cross_entropy(logits, labels.long(), ignore_index=IGNORE, reduction="sum")
        return _mean(total, counts.labelled)


def _new_class_nll(
    log_probs: torch.Tensor, labels: torch.Tensor, num_old: int, counts: PixelCounts
) -> torch.Tensor:
    """NLL of the new channels C_old..C−1 against y − C_old, mean over labelled pixels."""
    mask = labels != IGNORE
    target = torch.where(mask, labels.long() - num_old, torch.zeros_like(labels, dtype=torch.long))
    if (target[mask] < 0).any() or (target[mask] >= log_probs.shape[1] - num_old).any():
        raise ValueError(
            f"labels must hold new-task channels {num_old}..{log_probs.shape[1] - 1} or 255"
        )
    picked = log_probs[:, num_old:].gather(1, target.unsqueeze(1)).squeeze(1)
    return _mean(-(picked * mask).sum(), counts.labelled)


def _check_shapes(student: torch.Tensor, teacher: torch.Tensor | None, labels, num_old: int):
    if student.dim() != 4 or labels.shape != (student.shape[0], *student.shape[2:]):
        raise ValueError(f"student logits {tuple(student.shape)} and labels {tuple(labels.shape)}")
    if not 0 < num_old < student.shape[1]:
        raise ValueError(f"num_old_classes {num_old} must be in 1..{student.shape[1] - 1}")
    if teacher is not None and teacher.shape != (student.shape[0], num_old, *student.shape[2:]):
        raise ValueError(
            f"teacher logits {tuple(teacher.shape)} must be {num_old} channels of the student's "
            f"{tuple(student.shape)}"
        )


def finetune_loss(
    student_logits: torch.Tensor,
    labels: torch.Tensor,
    num_old_classes: int,
    counts: PixelCounts | None = None,
):
    """Lower bound: cross-entropy on the new classes (log-softmax over all channels), no KD."""
    _check_shapes(student_logits, None, labels, num_old_classes)
    counts = counts or PixelCounts.of(labels)
    with torch.autocast(student_logits.device.type, enabled=False):
        log_probs = F.log_softmax(*_float32(student_logits), dim=1)
        return _new_class_nll(log_probs, labels, num_old_classes, counts)


def incremental_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    labels: torch.Tensor,
    num_old_classes: int,
    temperature: float = 1.0,
    lambda_gs: float = 1.0,
    counts: PixelCounts | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(total, ce, kd)``: CE on the new classes + entropy-weighted distillation where y = 255.

    ``kd = T² · Σ_unlabelled (1 + λ·H₂(q)) · (−Σ_c q_c log r_c) / #unlabelled`` with
    ``q = softmax(t / T)`` over the teacher's channels and ``r`` the softmax of ``s / T`` over
    all student channels, restricted to the old ones.
    """
    _check_shapes(student_logits, teacher_logits, labels, num_old_classes)
    counts = counts or PixelCounts.of(labels)
    with torch.autocast(student_logits.device.type, enabled=False):
        student, teacher = _float32(student_logits, teacher_logits.detach())
        ce = _new_class_nll(F.log_softmax(student, dim=1), labels, num_old_classes, counts)
        unlabelled = labels == IGNORE
        q = F.softmax(teacher / temperature, dim=1)
        log_r = F.log_softmax(student / temperature, dim=1)[:, :num_old_classes]
        entropy_bits = -torch.xlogy(q, q).sum(1) / math.log(2)
        weight = 1.0 + lambda_gs * entropy_bits
        per_pixel = weight * -(q * log_r).sum(1)
        kd = temperature**2 * _mean((per_pixel * unlabelled).sum(), counts.unlabelled)
    return ce + kd, ce, kd
