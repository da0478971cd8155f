"""The paper's training augmentation as batched torch ops on the training device.

The same pipeline as the CPU path (:mod:`cil_dist.data.transforms`, README "Streaming into every
rank"), applied to a batch of uint8 frames already resized to ``data.resize`` (the decoded
cache's frames) after they were moved to the device: down-rescale by a factor drawn from
U[scale_min, scale_max] and a random crop (label padded with 255 where the rescaled frame is
smaller than the crop) → horizontal flip with probability ½ → colour jitter, brightness →
contrast → saturation → hue in that fixed order, each factor uniform as in the CPU path →
ImageNet normalisation.

The random parameters are drawn per sample (:func:`draw_params`) from a ``torch.Generator`` on
the CPU, exactly as the CPU path draws them, so a batch's augmentation does not depend on the
device nor on how a global batch is split among ranks (each rank takes its
:meth:`AugmentParams.slice`).

Geometry: images are resized to the rescaled size with the antialiased bilinear filter of PIL's
``resize`` (``F.interpolate(antialias=True)``; equal to the CPU path's one-step rescaled crop up
to uint8 rounding) and cropped; labels take the nearest source pixel with the CPU path's exact
indices (PIL's pixel-centre convention), so no new label id can appear. The colour operations
follow PIL's ``ImageEnhance`` (blend with black, with the mean grey, with the grey image; ITU-R
601 luma) and shift the hue in HSV by the same ``round(f · 255)`` steps of 1/256 of the circle,
in float without PIL's rounding to uint8 after each operation.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch
import torch.nn.functional as F

from cil_dist.config import AugmentConfig
from cil_dist.data.transforms import normalize
from cil_dist.labels import IGNORE

LUMA = (0.299, 0.587, 0.114)  # ITU-R 601-2, as PIL's "L" conversion


@dataclass(frozen=True)
class AugmentParams:
    """Per-sample random parameters of a batch (tensors of length B, on the CPU).

    ``factor``: down-rescale factor; ``x``, ``y``: the crop's top-left corner in the rescaled
    frame; ``flip``: bool; ``brightness``/``contrast``/``saturation``: blend factors (1 = none);
    ``hue``: shift as a fraction of the hue circle (0 = none).
    """

    factor: torch.Tensor
    x: torch.Tensor
    y: torch.Tensor
    flip: torch.Tensor
    brightness: torch.Tensor
    contrast: torch.Tensor
    saturation: torch.Tensor
    hue: torch.Tensor

    def __len__(self) -> int:
        return len(self.factor)

    def slice(self, start: int, stop: int) -> AugmentParams:
        """The parameters of samples ``start:stop`` (a rank's part of a global batch)."""
        return AugmentParams(*(getattr(self, f.name)[start:stop] for f in fields(self)))

    def to(self, device: str | torch.device) -> AugmentParams:
        return AugmentParams(*(getattr(self, f.name).to(device) for f in fields(self)))


def rescaled_size(factor: torch.Tensor, frame_size: tuple[int, int]) -> tuple[torch.Tensor, ...]:
    """``(sw, sh)``: the frame's size after down-rescaling by ``factor`` (rounded as the CPU
    path's ``round``: half to even)."""
    w, h = frame_size
    return torch.round(w / factor).long(), torch.round(h / factor).long()


def draw_params(
    count: int, frame_size: tuple[int, int], cfg: AugmentConfig, generator: torch.Generator
) -> AugmentParams:
    """Random parameters for ``count`` frames of ``frame_size`` (w, h), drawn from the CPU
    path's distributions: factor ~ U[scale_min, scale_max]; crop corner uniform over the
    positions where the crop fits the rescaled (or padded) frame; flip with probability ½ if
    ``cfg.flip``; brightness, contrast, saturation ~ U[1 − x, 1 + x]; hue ~ U[−hue, hue]."""

    def uniform(low: float, high: float) -> torch.Tensor:
        u = torch.rand(count, generator=generator, dtype=torch.float64)
        return low + (high - low) * u

    cw, ch = cfg.crop
    factor = uniform(cfg.scale_min, cfg.scale_max)
    sw, sh = rescaled_size(factor, frame_size)

    def corner(rescaled: torch.Tensor, crop: int) -> torch.Tensor:
        positions = torch.clamp(rescaled, min=crop) - crop + 1  # padded when smaller than crop
        drawn = (uniform(0.0, 1.0) * positions).long()
        return torch.minimum(drawn, positions - 1)

    x, y = corner(sw, cw), corner(sh, ch)
    flip = uniform(0.0, 1.0) < 0.5 if cfg.flip else torch.zeros(count, dtype=torch.bool)

    def blend(amount: float) -> torch.Tensor:
        return uniform(1 - amount, 1 + amount) if amount else torch.ones(count, dtype=torch.float64)

    hue = uniform(-cfg.hue, cfg.hue) if cfg.hue else torch.zeros(count, dtype=torch.float64)
    return AugmentParams(
        factor, x, y, flip, blend(cfg.brightness), blend(cfg.contrast), blend(cfg.saturation), hue
    )


def source_indices(
    params: AugmentParams, frame_size: tuple[int, int], crop: tuple[int, int]
) -> tuple[torch.Tensor, ...]:
    """Per sample and output column/row: the nearest source index (as the CPU path's label
    sampling) and whether the pixel lies inside the rescaled frame (else padding). Flipped
    samples read their columns in reverse."""
    w, h = frame_size
    cw, ch = crop
    sw, sh = rescaled_size(params.factor, frame_size)
    device = params.factor.device
    cols = torch.arange(cw, device=device).expand(len(params), cw)
    cols = torch.where(params.flip[:, None], cw - 1 - cols, cols)
    rows = torch.arange(ch, device=device).expand(len(params), ch)
    u = params.x[:, None] + cols  # pixel of the rescaled frame
    v = params.y[:, None] + rows
    sx, sy = (w / sw.double())[:, None], (h / sh.double())[:, None]  # source px per output px
    near_x = torch.clamp(((u + 0.5) * sx).long(), max=w - 1)
    near_y = torch.clamp(((v + 0.5) * sy).long(), max=h - 1)
    inside = (u < sw[:, None])[:, None, :] & (v < sh[:, None])[:, :, None]  # (B, ch, cw)
    return near_x, near_y, inside


def grey(images: torch.Tensor) -> torch.Tensor:
    """(B, 1, H, W) luma of (B, 3, H, W) images in [0, 255]."""
    r, g, b = images.unbind(1)
    return (LUMA[0] * r + LUMA[1] * g + LUMA[2] * b).unsqueeze(1)


def _factor(images: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    return factor.to(images.dtype).view(-1, 1, 1, 1)


def adjust_brightness(images: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """PIL's ``ImageEnhance.Brightness``: a blend with black, clipped to [0, 255]."""
    return (images * _factor(images, factor)).clamp_(0.0, 255.0)


def adjust_contrast(images: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """PIL's ``ImageEnhance.Contrast``: a blend with the image's mean grey."""
    f = _factor(images, factor)
    mean = grey(images).mean(dim=(1, 2, 3), keepdim=True)
    return (images * f).add_(mean * (1 - f)).clamp_(0.0, 255.0)


def adjust_saturation(images: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """PIL's ``ImageEnhance.Color``: a blend with the grey image."""
    f = _factor(images, factor)
    return (images * f).add_(grey(images) * (1 - f)).clamp_(0.0, 255.0)


def adjust_hue(images: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """Rotate the hue by ``round(shift · 255) / 256`` of the circle (the CPU path's 8-bit HSV
    step), keeping saturation and value."""
    steps = torch.round(shift * 255).to(images.dtype).view(-1, 1, 1) * (6.0 / 256.0)
    r, g, b = images.unbind(1)
    value = torch.maximum(torch.maximum(r, g), b)
    span = value - torch.minimum(torch.minimum(r, g), b)
    safe = torch.where(span > 0, span, 1.0)
    # hue in sixths of the circle, in [0, 6): sector by the largest channel
    hue = torch.where(
        value == r,
        (g - b).div_(safe),
        torch.where(value == g, (b - r).div_(safe).add_(2.0), (r - g).div_(safe).add_(4.0)),
    )
    hue = hue.masked_fill_(span == 0, 0.0).add_(steps).remainder_(6.0)
    out = torch.empty_like(images)
    for channel, offset in enumerate((5.0, 3.0, 1.0)):  # HSV -> RGB, channel by channel
        k = (hue + offset).remainder_(6.0)
        ramp = torch.minimum(k, 4.0 - k).clamp_(0.0, 1.0)
        torch.sub(value, ramp.mul_(span), out=out[:, channel])
    return out


class DeviceAugment:
    """uint8 frames (B, H, W, 3) and uint8 labels (B, H, W), on the device →
    ``(normalised float crops (B, 3, ch, cw), int64 labels (B, ch, cw))``."""

    def __init__(
        self,
        cfg: AugmentConfig,
        mean: tuple[float, float, float],
        std: tuple[float, float, float],
    ) -> None:
        self.cfg = cfg
        self.crop = (int(cfg.crop[0]), int(cfg.crop[1]))
        self.mean, self.std = tuple(mean), tuple(std)

    def geometry(
        self,
        images: torch.Tensor,
        labels: torch.Tensor,
        params: AugmentParams,
        lut: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Rescale, crop (pad) and flip: float images (B, 3, ch, cw) in [0, 255] and int64
        labels (``lut`` applied to the crop's raw labels, padding 255).

        Images: the whole frame is resized to the rescaled size with antialiased bilinear
        filtering (``F.interpolate(antialias=True)``, the filter of PIL's ``resize`` that the CPU
        path uses; on the CPU straight from uint8, channels last), then cropped. Labels: the
        nearest source pixel of each output pixel, gathered from the crop's window only."""
        batch, h, w, _ = images.shape
        cw, ch = self.crop
        device = images.device
        cpu = params.to("cpu")
        sw, sh = rescaled_size(cpu.factor, (w, h))
        near_x, near_y, inside = source_indices(cpu, (w, h), self.crop)
        # the source columns of each label crop's window (indices on the host: no syncs)
        low, high = near_x.min(1).values, near_x.max(1).values + 1
        near_x = near_x - low[:, None]
        near_y, near_x = near_y.to(device, non_blocking=True), near_x.to(device, non_blocking=True)
        crops = torch.zeros((batch, 3, ch, cw), dtype=torch.float32, device=device)
        crop_labels = labels.new_empty((batch, ch, cw))
        for i in range(batch):
            frame = images[i].permute(2, 0, 1)[None]  # (1, 3, h, w), channels last
            if frame.device.type != "cpu":  # CUDA's antialiased resize takes floats only
                frame = frame.float()
            size = (int(sh[i]), int(sw[i]))
            rescaled = F.interpolate(
                frame, size=size, mode="bilinear", antialias=True, align_corners=False
            )[0]
            x, y = int(cpu.x[i]), int(cpu.y[i])
            window = rescaled[:, y : y + ch, x : x + cw]  # padding: right and bottom
            if cpu.flip[i]:  # the flipped crop sits at the right (see source_indices)
                crops[i, :, : window.shape[1], cw - window.shape[2] :] = window.flip(-1)
            else:
                crops[i, :, : window.shape[1], : window.shape[2]] = window
            label_window = labels[i, :, int(low[i]) : int(high[i])]
            crop_labels[i] = label_window.index_select(0, near_y[i]).index_select(1, near_x[i])
        crop_labels = crop_labels.long() if lut is None else lut[crop_labels.long()].long()
        crop_labels = crop_labels.masked_fill_(~inside.to(device), IGNORE)
        return crops, crop_labels

    def jitter(self, images: torch.Tensor, params: AugmentParams) -> torch.Tensor:
        """Brightness → contrast → saturation → hue, in that fixed order (as the original)."""
        if self.cfg.brightness:
            images = adjust_brightness(images, params.brightness)
        if self.cfg.contrast:
            images = adjust_contrast(images, params.contrast)
        if self.cfg.saturation:
            images = adjust_saturation(images, params.saturation)
        if self.cfg.hue:
            images = adjust_hue(images, params.hue)
        return images

    def __call__(
        self,
        images: torch.Tensor,
        labels: torch.Tensor,
        params: AugmentParams,
        memory_format: torch.memory_format = torch.contiguous_format,
        lut: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``lut``: the stage's label look-up table (on the device), applied to the crops'
        raw label ids; None: ``labels`` are used as they are."""
        crops, crop_labels = self.geometry(images, labels, params, lut)
        crops = normalize(self.jitter(crops, params.to(images.device)), self.mean, self.std)
        return crops.contiguous(memory_format=memory_format), crop_labels
