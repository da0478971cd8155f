"""Dropout drawn over the global batch, so that every sample's mask is the same at any world size.

``nn.Dropout2d`` draws each rank's masks from that rank's RNG: 2 ranks × 3 images and 1 rank × 6
see other masks, and a run's figures then depend on the number of GPUs. Here every rank draws the
masks of the *whole* global batch from one generator seeded per optimiser step (the same on every
rank) and keeps the rows of its own samples: global sample ``i`` gets the same channel mask
whether it is trained on rank 0 of 1 or rank 1 of 2. The draws cost ``global batch × channels``
Bernoulli numbers per layer, nothing next to the convolutions.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass
class DropoutDraw:
    """One step's shared generator and where this rank's samples sit in the global batch."""

    generator: torch.Generator
    global_batch: int
    start: int


class GlobalBatchDropout2d(nn.Dropout2d):
    """``nn.Dropout2d`` (whole channels, kept ones scaled by 1/(1 − p)) whose masks come from
    the step's :class:`DropoutDraw` when one is set; without one it is plain ``Dropout2d``."""

    draw: DropoutDraw | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0 or self.draw is None:
            return super().forward(x)
        draw, samples = self.draw, x.shape[0]
        if draw.start + samples > draw.global_batch:
            raise ValueError(
                f"dropout draw for a global batch of {draw.global_batch} at {draw.start}, "
                f"got {samples} samples"
            )
        keep_rate = torch.full((draw.global_batch, x.shape[1], 1, 1), 1.0 - self.p, device=x.device)
        keep = torch.bernoulli(keep_rate, generator=draw.generator)
        mask = keep[draw.start : draw.start + samples] / (1.0 - self.p)
        return x * mask.to(x.dtype)


def set_dropout_draws(model: nn.Module, seed: int, global_batch: int, start: int) -> None:
    """Give every :class:`GlobalBatchDropout2d` of ``model`` one generator seeded by ``seed``:
    call it before each training forward with the same seed on every rank, this rank's first
    position ``start`` in the global batch of ``global_batch`` samples."""
    device = next(model.parameters()).device
    generator = torch.Generator(device=device).manual_seed(seed % 2**63)
    draw = DropoutDraw(generator, global_batch, start)
    for module in model.modules():
        if isinstance(module, GlobalBatchDropout2d):
            module.draw = draw
