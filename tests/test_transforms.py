"""Decoding and augmentation of one sample."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from cil_dist.config import AugmentConfig, ConfigError, DataConfig
from cil_dist.data.transforms import Normalize, SampleError, SegmentationTransform

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def png(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def two_halves(width: int = 128, height: int = 64) -> dict:
    """Left half red with label 7 (road), right half blue with label 26 (car)."""
    image = np.zeros((height, width, 3), np.uint8)
    image[:, : width // 2] = (255, 0, 0)
    image[:, width // 2 :] = (0, 0, 255)
    label = np.full((height, width), 26, np.uint8)
    label[:, : width // 2] = 7
    return {
        "__key__": "aachen_000000_000019",
        "__url__": "mem.tar",
        "image.png": png(image),
        "label.png": png(label),
    }


def test_geometry_moves_image_and_label_together():
    lut = np.full(256, 255, np.uint8)
    lut[7], lut[26] = 0, 13
    no_jitter = AugmentConfig(crop=[48, 24], brightness=0, contrast=0, saturation=0, hue=0)
    transform = SegmentationTransform((128, 64), MEAN, STD, lut=lut, augment=no_jitter)
    for seed in range(20):
        image, label, key = transform(two_halves(), np.random.default_rng(seed))
        assert key == "aachen_000000_000019"
        assert image.shape == (3, 24, 48) and label.shape == (24, 48)
        red = image[0] > image[2]  # channel 0 dominates where the scene is red
        road = label == 0
        assert set(label.unique().tolist()) <= {0, 13}
        assert (red == road).float().mean() > 0.9


def test_crop_larger_than_image_pads_label_with_ignore():
    transform = SegmentationTransform(
        (32, 16), MEAN, STD, augment=AugmentConfig(crop=[40, 20], scale_min=1.0, scale_max=1.0)
    )
    _, label, _ = transform(two_halves(), np.random.default_rng(0))
    assert label.shape == (20, 40)
    assert (label == 255).sum() == 40 * 20 - 32 * 16


def test_color_jitter_is_seeded():
    transform = SegmentationTransform((128, 64), MEAN, STD, augment=AugmentConfig(crop=[64, 32]))
    a = transform(two_halves(), np.random.default_rng(5))[0]
    b = transform(two_halves(), np.random.default_rng(5))[0]
    c = transform(two_halves(), np.random.default_rng(6))[0]
    assert (a == b).all() and not (a == c).all()


def test_compact_output_normalised_on_device_equals_the_float_output():
    augment = AugmentConfig(crop=[64, 32])
    full = SegmentationTransform((128, 64), MEAN, STD, augment=augment)
    compact = SegmentationTransform((128, 64), MEAN, STD, augment=augment, compact=True)
    image, label, _ = full(two_halves(), np.random.default_rng(3))
    small_image, small_label, _ = compact(two_halves(), np.random.default_rng(3))
    assert small_image.dtype == small_label.dtype == torch.uint8
    batch = {"image": small_image[None], "label": small_label[None]}
    images, labels = Normalize(MEAN, STD)(batch, "cpu", torch.channels_last)
    assert images.is_contiguous(memory_format=torch.channels_last)
    assert torch.allclose(images[0], image, atol=1e-5) and torch.equal(labels[0], label)


def test_evaluation_resizes_image_keeps_raw_labels():
    transform = SegmentationTransform((64, 32), MEAN, STD)
    image, label, _ = transform(two_halves(), np.random.default_rng(0))
    assert image.shape == (3, 32, 64)
    assert label.shape == (64, 128)
    assert set(label.unique().tolist()) == {7, 26}


def test_invalid_label_ids_are_named():
    sample = two_halves()
    label = np.full((64, 128), 200, np.uint8)
    sample["label.png"] = png(label)
    with pytest.raises(SampleError, match=r"mem\.tar.*aachen_000000_000019.*\[200\]"):
        SegmentationTransform((128, 64), MEAN, STD)(sample, np.random.default_rng(0))


def test_size_mismatch_and_missing_members_are_named():
    sample = two_halves()
    sample["label.png"] = png(np.zeros((10, 10), np.uint8))
    with pytest.raises(SampleError, match=r"aachen_000000_000019.*128x64.*10x10"):
        SegmentationTransform((128, 64), MEAN, STD)(sample, np.random.default_rng(0))
    del sample["label.png"]
    with pytest.raises(SampleError, match=r"no label\.png"):
        SegmentationTransform((128, 64), MEAN, STD)(sample, np.random.default_rng(0))


def test_color_jitter_applies_brightness_contrast_saturation_hue_in_that_order():
    from PIL import ImageEnhance

    from cil_dist.data.transforms import _shift_hue, color_jitter

    rng_image = np.random.default_rng(3)
    image = Image.fromarray(rng_image.integers(0, 256, (16, 24, 3), dtype=np.uint8))
    cfg = AugmentConfig()
    for seed in range(5):  # a random order differs from the fixed one for most seeds
        draws = np.random.default_rng(seed)
        b, c, s = (draws.uniform(0.8, 1.2) for _ in range(3))
        expected = ImageEnhance.Brightness(image).enhance(b)
        expected = ImageEnhance.Contrast(expected).enhance(c)
        expected = ImageEnhance.Color(expected).enhance(s)
        expected = _shift_hue(expected, draws.uniform(-cfg.hue, cfg.hue))
        jittered = color_jitter(image, cfg, np.random.default_rng(seed))
        assert np.array_equal(np.asarray(jittered), np.asarray(expected)), seed


def test_shipped_cpu_configs_never_pad_their_crops():
    """A crop larger than the frame rescaled by 1/scale_max is padded with black pixels whose
    label is 255, which the distillation then learns; the paper's 640x192 of 1024x512 never is."""
    from cil_dist.config import load_train_config

    for name in ("demo_synthetic", "reproduce_synthetic", "paper_stage1"):
        data = load_train_config(name, []).data
        width, height = data.resize
        scale = data.augment.scale_max
        crop_w, crop_h = data.augment.crop
        assert crop_w <= round(width / scale) and crop_h <= round(height / scale), name


def test_a_crop_larger_than_the_resized_frame_is_refused():
    cfg = DataConfig(manifest="m.json", resize=[256, 128])
    cfg.augment.crop = [320, 96]
    with pytest.raises(ConfigError, match=r"data\.augment\.crop: \[320, 96\] is larger than"):
        cfg.validate()
