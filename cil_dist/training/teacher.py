"""The frozen teacher of an incremental stage: the previous stage's final model.

It is loaded on every rank, never wrapped in DDP, holds no ``requires_grad`` parameters, stays
in eval mode, and its forward runs under ``torch.inference_mode()`` (no autograd graph at all)
with the same autocast as the student, on the same augmented batch.
"""

from __future__ import annotations

import logging

import torch

from cil_dist.config import teacher_classes_problem
from cil_dist.model import ERFNet, load_state_dict_checked
from cil_dist.storage import StorageOptions
from cil_dist.training.checkpoint import CheckpointError, load_checkpoint, num_classes_of
from cil_dist.training.precision import Precision
from cil_dist.urls import redact_url

log = logging.getLogger(__name__)


def load_previous_state(
    path: str, expected_classes: int, options: StorageOptions | None = None, *, stage: int
) -> dict[str, torch.Tensor]:
    """Model weights of the previous stage's checkpoint, checked to be a stage model with the
    ``expected_classes`` of the tasks before ``stage`` (``options``: how an object-storage URL
    is reached, the stage's data options)."""
    payload = load_checkpoint(path, options=options)
    state = payload["model"]
    found = num_classes_of(state, path)
    problem = teacher_classes_problem(found, expected_classes, stage, payload.get("method"))
    if problem:
        raise CheckpointError(f"{redact_url(path)}: the previous stage's model {problem}")
    return state


def load_teacher(
    path: str,
    expected_classes: int,
    device: str,
    channels_last: bool = False,
    options: StorageOptions | None = None,
    *,
    stage: int,
) -> ERFNet:
    """Build the frozen teacher of ``stage`` from a checkpoint (cil-dist or a reference state
    dict)."""
    teacher = ERFNet(expected_classes)
    previous = load_previous_state(path, expected_classes, options, stage=stage)
    load_state_dict_checked(teacher, previous)
    teacher.requires_grad_(False)
    teacher.eval()
    teacher.to(
        device, memory_format=torch.channels_last if channels_last else torch.preserve_format
    )
    log.info("teacher: %s (%d classes), frozen, inference mode", path, expected_classes)
    return teacher


def teacher_forward(teacher: torch.nn.Module, images: torch.Tensor, precision: Precision):
    """Teacher logits as inference tensors: no autograd graph is built."""
    with torch.inference_mode(), precision.autocast():
        return teacher(images)


def init_from_previous(
    student: ERFNet, previous: dict[str, torch.Tensor], num_old_classes: int
) -> None:
    """Start ``student`` from the previous model; new output channels keep their fresh init."""
    own = student.state_dict()
    for key, value in previous.items():
        key = key.removeprefix("module.")
        if key == "decoder.output_conv.weight":  # ConvTranspose2d: (in, out, kH, kW)
            own[key][:, :num_old_classes] = value
        elif key == "decoder.output_conv.bias":
            own[key][:num_old_classes] = value
        elif key in own:
            own[key] = value
    load_state_dict_checked(student, own)
