"""Decoding a shard sample and turning it into model input, as the paper's pipeline (README
"Streaming into every rank").

Training: resize to ``resize`` (bilinear image, nearest label) → random down-rescale by a
factor drawn from U[scale_min, scale_max] and random crop, in one resampling of the crop's
window (padding the label with 255 if the image is smaller) → random horizontal flip → colour
jitter (brightness → contrast → saturation → hue, in that fixed order) → tensor → ImageNet
normalisation. Evaluation: resize the image to ``resize``;
the label stays at its stored resolution (predictions are compared at label resolution).
The task's look-up table maps raw Cityscapes label ids to channels (or 255) while decoding.
"""

from __future__ import annotations

import io
import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageEnhance

from cil_dist import labels
from cil_dist.config import AugmentConfig
from cil_dist.labels import IGNORE
from cil_dist.urls import redact_url

try:  # optional accelerator (extra "fast"): libspng PNG decoding
    import pyspng
except ImportError:  # pragma: no cover - PIL decodes everything
    pyspng = None

IMAGE_MEMBERS = ("image.png", "image.jpg", "image.jpeg")
LABEL_MEMBER = "label.png"


class SampleError(ValueError):
    """A sample in a shard is malformed; names the shard URL and the sample key."""


def _where(sample: dict[str, Any]) -> str:
    return f"shard {redact_url(sample.get('__url__', '?'))}, sample {sample.get('__key__', '?')!r}"


def _fast_png(data: bytes, channels: int) -> np.ndarray | None:
    """An 8-bit PNG decoded by libspng (pyspng, about twice PIL's speed), or None when pyspng
    is not installed or the PNG is not plain 8-bit with ``channels`` channels (PIL then)."""
    if pyspng is None:
        return None
    try:
        array = pyspng.load(data)
    except Exception:  # PIL decodes again and names the problem
        return None
    shape_ok = array.ndim == 2 if channels == 1 else array.ndim == 3 and array.shape[2] == channels
    return array if shape_ok and array.dtype == np.uint8 else None


def decode_image(sample: dict[str, Any]) -> Image.Image:
    """The sample's RGB image (PNG or JPEG member)."""
    if "image.png" in sample and (array := _fast_png(sample["image.png"], 3)) is not None:
        return Image.fromarray(array, "RGB")
    for name in IMAGE_MEMBERS:
        if name in sample:
            try:
                image = Image.open(io.BytesIO(sample[name]))
                image.load()
            except Exception as exc:
                raise SampleError(f"{_where(sample)}: cannot decode {name}: {exc}") from exc
            return image.convert("RGB") if image.mode != "RGB" else image
    raise SampleError(f"{_where(sample)}: no image member (have {sorted(sample)})")


def decode_label(sample: dict[str, Any]) -> np.ndarray:
    """The sample's raw Cityscapes label ids as a uint8 (H, W) array, validated."""
    if LABEL_MEMBER not in sample:
        raise SampleError(f"{_where(sample)}: no {LABEL_MEMBER} member (have {sorted(sample)})")
    ids, mode = _fast_png(sample[LABEL_MEMBER], 1), "L"
    if ids is None:
        try:
            image = Image.open(io.BytesIO(sample[LABEL_MEMBER]))
            ids, mode = np.asarray(image), image.mode
        except Exception as exc:
            raise SampleError(f"{_where(sample)}: cannot decode {LABEL_MEMBER}: {exc}") from exc
    try:
        return labels.checked_label_ids(ids, mode)
    except ValueError as exc:
        raise SampleError(f"{_where(sample)}: {exc}") from exc


def decode_pair(
    sample: dict[str, Any],
    allow_other_label_size: Callable[[dict[str, Any], np.ndarray], bool] | None = None,
) -> tuple[Image.Image, np.ndarray]:
    """The sample's image and raw label ids, of the same size unless
    ``allow_other_label_size(sample, label)`` says otherwise."""
    image, label = decode_image(sample), decode_label(sample)
    if image.size != label.shape[::-1] and not (
        allow_other_label_size and allow_other_label_size(sample, label)
    ):
        raise SampleError(
            f"{_where(sample)}: image is {image.size[0]}x{image.size[1]}, "
            f"label {label.shape[1]}x{label.shape[0]}"
        )
    return image, label


def resize_pair(image: Image.Image, label: np.ndarray, size: tuple[int, int]):
    """Image (bilinear) and label (nearest) at ``size`` (w, h)."""

    if image.size != size:
        image = image.resize(size, Image.BILINEAR)
    if label.shape[::-1] != size:
        label = np.asarray(Image.fromarray(label).resize(size, Image.NEAREST))
    return image, label


def _shift_hue(image: Image.Image, factor: float) -> Image.Image:
    hsv = np.array(image.convert("HSV"))
    hsv[..., 0] = (hsv[..., 0].astype(np.int16) + round(factor * 255)) % 256
    return Image.fromarray(hsv, "HSV").convert("RGB")


def color_jitter(image: Image.Image, cfg: AugmentConfig, rng: np.random.Generator) -> Image.Image:
    """Brightness, contrast, saturation and hue jitter, in that fixed order (as the original).

    Each factor is drawn uniformly: brightness/contrast/saturation from [1 − x, 1 + x], the hue
    shift from [−hue, hue] (a fraction of the hue circle)."""
    if cfg.brightness:
        f = rng.uniform(1 - cfg.brightness, 1 + cfg.brightness)
        image = ImageEnhance.Brightness(image).enhance(f)
    if cfg.contrast:
        f = rng.uniform(1 - cfg.contrast, 1 + cfg.contrast)
        image = ImageEnhance.Contrast(image).enhance(f)
    if cfg.saturation:
        f = rng.uniform(1 - cfg.saturation, 1 + cfg.saturation)
        image = ImageEnhance.Color(image).enhance(f)
    if cfg.hue:
        image = _shift_hue(image, rng.uniform(-cfg.hue, cfg.hue))
    return image


def random_crop(image: Image.Image, label: np.ndarray, crop: tuple[int, int], rng):
    """A random ``crop`` (w, h) window; pads (image 0, label 255) where the input is smaller."""
    cw, ch = crop
    w, h = image.size
    if w < cw or h < ch:
        padded = Image.new("RGB", (max(w, cw), max(h, ch)))
        padded.paste(image)
        padded_label = np.full((max(h, ch), max(w, cw)), IGNORE, dtype=np.uint8)
        padded_label[:h, :w] = label
        image, label, (w, h) = padded, padded_label, padded.size
    x = int(rng.integers(0, w - cw + 1))
    y = int(rng.integers(0, h - ch + 1))
    return image.crop((x, y, x + cw, y + ch)), label[y : y + ch, x : x + cw]


def rescaled_crop(
    image: Image.Image, label: np.ndarray, factor: float, crop: tuple[int, int], rng
) -> tuple[Image.Image, np.ndarray]:
    """Down-rescale by ``factor`` then take a random ``crop`` — computed in one step.

    Only the source window that becomes the crop is resampled (bilinear image, nearest label,
    PIL's pixel-centre convention), instead of resizing the whole image first; a rescaled image
    smaller than the crop falls back to resize-then-pad.
    """
    w, h = image.size
    sw, sh = round(w / factor), round(h / factor)
    cw, ch = crop
    if sw < cw or sh < ch:
        image, label = resize_pair(image, label, (sw, sh))
        return random_crop(image, label, crop, rng)
    x = int(rng.integers(0, sw - cw + 1))
    y = int(rng.integers(0, sh - ch + 1))
    sx, sy = w / sw, h / sh  # source pixels per output pixel
    box = (x * sx, y * sy, (x + cw) * sx, (y + ch) * sy)
    image = image.resize((cw, ch), Image.BILINEAR, box=box)
    rows = np.minimum(((y + np.arange(ch) + 0.5) * sy).astype(np.int64), h - 1)
    cols = np.minimum(((x + np.arange(cw) + 0.5) * sx).astype(np.int64), w - 1)
    return image, label[np.ix_(rows, cols)]


@dataclass
class SegmentationTransform:
    """Raw shard sample → ``(image tensor (3,H,W) float, label tensor (H,W) long, key)``."""

    resize: tuple[int, int]
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    lut: np.ndarray | None = None  # labelId -> target; None keeps raw label ids
    augment: AugmentConfig | None = None  # None: evaluation (no augmentation)
    # uint8 image and label tensors, normalised later on the device (see Normalize): a fifth
    # of the bytes between worker processes and to the GPU
    compact: bool = False

    def __call__(self, sample: dict[str, Any], rng: np.random.Generator):
        image, label = decode_pair(sample, allow_other_label_size=self._full_size_eval_label)
        image, label = self.apply(image, label, rng)
        return image, label, sample["__key__"]

    def _full_size_eval_label(self, sample: dict[str, Any], label: np.ndarray) -> bool:
        """In evaluation a label may differ in size from its image (the image is resized anyway)
        when the sample's meta.json records that label size (val labels packed at full
        resolution); training samples must match."""
        if self.augment is not None or "meta.json" not in sample:
            return False
        try:
            recorded = json.loads(sample["meta.json"]).get("label_size")
        except (ValueError, AttributeError):
            return False
        return recorded == [label.shape[1], label.shape[0]]

    def apply(self, image: Image.Image, label: np.ndarray, rng: np.random.Generator):
        """Look-up table, resize/augmentation and normalisation of a decoded pair."""
        if self.lut is not None:
            label = self.lut[label]
        if self.augment is None:
            if image.size != self.resize:
                image = image.resize(self.resize, Image.BILINEAR)
        else:
            image, label = self._augment(image, label, rng)
        image_tensor = torch.from_numpy(np.array(image)).permute(2, 0, 1)
        if self.compact:
            return image_tensor, torch.from_numpy(np.ascontiguousarray(label, dtype=np.uint8))
        normalised = normalize(image_tensor, self.mean, self.std)
        return normalised, torch.from_numpy(label.astype(np.int64))

    def _augment(self, image: Image.Image, label: np.ndarray, rng: np.random.Generator):
        cfg = self.augment
        image, label = resize_pair(image, label, self.resize)
        factor = rng.uniform(cfg.scale_min, cfg.scale_max)
        image, label = rescaled_crop(image, label, factor, tuple(cfg.crop), rng)
        # Flipping the crop is the same distribution as cropping the flipped image (the crop
        # offset is uniform), and 5-10x fewer pixels to move.
        if cfg.flip and rng.random() < 0.5:
            image, label = image.transpose(Image.FLIP_LEFT_RIGHT), label[:, ::-1]
        return color_jitter(image, cfg, rng), label


def normalize(images: torch.Tensor, mean: tuple, std: tuple) -> torch.Tensor:
    """uint8 images (..., 3, H, W) → float, ImageNet-normalised (``mean``/``std`` of [0, 1])."""
    scale = torch.tensor(std, device=images.device).view(3, 1, 1) * 255.0
    shift = torch.tensor(mean, device=images.device).view(3, 1, 1) * 255.0
    return (images.float() - shift) / scale


@dataclass(frozen=True)
class Normalize:
    """A batch as the model and the losses take it, on ``device``: uint8 images → float,
    ImageNet-normalised (in ``memory_format``); uint8 labels → int64. Batches that are already
    float/int64 pass through unchanged."""

    mean: tuple[float, float, float]
    std: tuple[float, float, float]

    def __call__(
        self,
        batch: dict[str, Any],
        device: str | torch.device,
        memory_format: torch.memory_format = torch.contiguous_format,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        images = batch["image"].to(device, non_blocking=True, memory_format=memory_format)
        labels = batch["label"].to(device, non_blocking=True).long()
        if images.dtype == torch.uint8:
            images = normalize(images, self.mean, self.std)
        return images, labels
