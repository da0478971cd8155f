"""The losses of the method, as plain functions on tensors (SEED_FACTS, "Loss of an incremental
stage"). All are computed in float32, whatever the dtype of the logits or an active autocast.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

IGNORE = 255


def _float32(*tensors: torch.Tensor) -> list[torch.Tensor]:
    """At least float32 (bf16/fp16 are upcast; float64 stays float64)."""
    return [t.to(torch.promote_types(t.dtype, torch.float32)) for t in tensors]


def cross_entropy(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = IGNORE):
    """Static cross-entropy over all channels, mean over labelled pixels (0 if none)."""
    with torch.autocast(logits.device.type, enabled=False):
        (logits,) = _float32(logits)
        mask = labels != ignore_index
        if not mask.any():
            return logits.sum() * 0.0
        return F.cross_entropy(logits, labels.long(), ignore_index=ignore_index)


def _new_class_nll(log_probs: torch.Tensor, labels: torch.Tensor, num_old: int) -> torch.Tensor:
    """NLL of the new channels C_old..C−1 against y − C_old, mean over labelled pixels."""
    mask = labels != IGNORE
    if not mask.any():
        return log_probs.sum() * 0.0
    target = torch.where(mask, labels.long() - num_old, torch.zeros_like(labels, dtype=torch.long))
    if (target[mask] < 0).any() or (target[mask] >= log_probs.shape[1] - num_old).any():
        raise ValueError(
            f"labels must hold new-task channels {num_old}..{log_probs.shape[1] - 1} or 255"
        )
    picked = log_probs[:, num_old:].gather(1, target.unsqueeze(1)).squeeze(1)
    return -(picked * mask).sum() / mask.sum()


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


def finetune_loss(student_logits: torch.Tensor, labels: torch.Tensor, num_old_classes: int):
    """Lower bound: cross-entropy on the new classes (log-softmax over all channels), no KD."""
    _check_shapes(student_logits, None, labels, num_old_classes)
    with torch.autocast(student_logits.device.type, enabled=False):
        log_probs = F.log_softmax(*_float32(student_logits), dim=1)
        return _new_class_nll(log_probs, labels, num_old_classes)


def incremental_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    labels: torch.Tensor,
    num_old_classes: int,
    temperature: float = 1.0,
    lambda_gs: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(total, ce, kd)``: CE on the new classes + entropy-weighted distillation where y = 255.

    ``kd = T² · Σ_unlabelled (1 + λ·H₂(q)) · (−Σ_c q_c log r_c) / #unlabelled`` with
    ``q = softmax(t / T)`` over the teacher's channels and ``r`` the softmax of ``s / T`` over
    all student channels, restricted to the old ones.
    """
    _check_shapes(student_logits, teacher_logits, labels, num_old_classes)
    with torch.autocast(student_logits.device.type, enabled=False):
        student, teacher = _float32(student_logits, teacher_logits.detach())
        ce = _new_class_nll(F.log_softmax(student, dim=1), labels, num_old_classes)
        unlabelled = labels == IGNORE
        if not unlabelled.any():
            kd = student.sum() * 0.0
        else:
            q = F.softmax(teacher / temperature, dim=1)
            log_r = F.log_softmax(student / temperature, dim=1)[:, :num_old_classes]
            entropy_bits = -torch.xlogy(q, q).sum(1) / math.log(2)
            weight = 1.0 + lambda_gs * entropy_bits
            per_pixel = weight * -(q * log_r).sum(1)
            kd = temperature**2 * (per_pixel * unlabelled).sum() / unlabelled.sum()
    return ce + kd, ce, kd
