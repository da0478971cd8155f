"""The augmentation on the device draws from the CPU path's distributions and moves image and
label together (README "Decoded cache and augmentation on the device")."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image, ImageEnhance

from cil_dist.config import AugmentConfig
from cil_dist.data import device_augment as da
from cil_dist.data.transforms import SegmentationTransform, _shift_hue, normalize, rescaled_crop

FRAME = (256, 128)  # w, h: the frames of the decoded cache, already at data.resize
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
NO_JITTER = {"brightness": 0.0, "contrast": 0.0, "saturation": 0.0, "hue": 0.0}


class FixedCorner:
    """A generator for the CPU path's crop corner: returns the given x, then y."""

    def __init__(self, x: int, y: int) -> None:
        self.values = [x, y]

    def integers(self, low: int, high: int) -> int:
        value = self.values.pop(0)
        assert low <= value < high
        return value


def smooth_image(seed: int = 0) -> np.ndarray:
    small = np.random.default_rng(seed).integers(0, 256, (16, 32, 3), dtype=np.uint8)
    return np.asarray(Image.fromarray(small).resize(FRAME, Image.BILINEAR))


def batch_of(array: np.ndarray, count: int) -> torch.Tensor:
    return torch.from_numpy(np.array(array))[None].expand(count, *array.shape).clone()


def ks_statistic(a: np.ndarray, b: np.ndarray) -> float:
    """Two-sample Kolmogorov-Smirnov statistic."""
    grid = np.sort(np.concatenate([a, b]))
    cdf_a = np.searchsorted(np.sort(a), grid, side="right") / len(a)
    cdf_b = np.searchsorted(np.sort(b), grid, side="right") / len(b)
    return float(np.abs(cdf_a - cdf_b).max())


def ks_critical(n: int, m: int, c_alpha: float = 1.95) -> float:  # alpha = 0.001
    return c_alpha * np.sqrt((n + m) / (n * m))


@pytest.mark.parametrize(
    ("op", "enhancer"),
    [
        (da.adjust_brightness, ImageEnhance.Brightness),
        (da.adjust_contrast, ImageEnhance.Contrast),
        (da.adjust_saturation, ImageEnhance.Color),
    ],
)
@pytest.mark.parametrize("factor", [0.8, 1.2])
def test_blend_operations_equal_pil_imageenhance(op, enhancer, factor):
    # a colour cast: the grey PIL blends with is the luma, not the channels' mean
    image = (smooth_image() * np.array([1.0, 0.6, 0.2])).astype(np.uint8)
    expected = np.asarray(enhancer(Image.fromarray(image)).enhance(factor)).astype(np.float64)
    got = op(batch_of(image, 1).permute(0, 3, 1, 2).float(), torch.tensor([factor]))
    assert np.abs(got[0].permute(1, 2, 0).numpy() - expected).max() <= 1.5  # PIL rounds


@pytest.mark.parametrize("shift", [-0.1, 0.03, 0.1])
def test_hue_shift_equals_the_cpu_paths_hsv_rotation(shift):
    image = smooth_image()
    expected = np.asarray(_shift_hue(Image.fromarray(image), shift)).astype(np.float64)
    got = da.adjust_hue(batch_of(image, 1).permute(0, 3, 1, 2).float(), torch.tensor([shift]))
    diff = np.abs(got[0].permute(1, 2, 0).numpy() - expected)
    assert diff.mean() < 1.0 and diff.max() <= 10  # PIL's HSV holds 8 bits per channel


def test_crop_and_flip_equal_the_cpu_paths_for_the_same_parameters():
    """Labels: the very same source pixels; images: PIL's antialiased bilinear resize, to its
    rounding (a bilinear sampler without antialiasing was 0.55 grey levels off on average and
    up to 9 on this smooth image, 9.4 and 120 on noise)."""
    image = smooth_image()
    label = np.random.default_rng(1).integers(0, 19, FRAME[::-1], dtype=np.uint8)
    cfg = AugmentConfig(crop=[160, 80], **NO_JITTER)
    params = da.draw_params(40, FRAME, cfg, torch.Generator().manual_seed(3))
    assert params.flip.any() and not params.flip.all()
    crops, crop_labels = da.DeviceAugment(cfg, MEAN, STD).geometry(
        batch_of(image, 40), batch_of(label, 40), params
    )
    for i in range(40):
        corner = FixedCorner(int(params.x[i]), int(params.y[i]))
        ref_image, ref_label = rescaled_crop(
            Image.fromarray(image), label, float(params.factor[i]), (160, 80), corner
        )
        ref_image = np.asarray(ref_image).astype(np.float64)
        if params.flip[i]:
            ref_image, ref_label = ref_image[:, ::-1], ref_label[:, ::-1]
        np.testing.assert_array_equal(crop_labels[i].numpy(), ref_label)
        diff = np.abs(crops[i].permute(1, 2, 0).numpy() - ref_image)
        assert diff.mean() < 0.1 and diff.max() <= 2.0, (i, diff.mean(), diff.max())


def test_a_crop_larger_than_the_rescaled_frame_is_padded_black_with_label_255():
    cfg = AugmentConfig(crop=[250, 120], scale_min=1.3, scale_max=1.5, **NO_JITTER)
    params = da.draw_params(8, FRAME, cfg, torch.Generator().manual_seed(0))
    labels = torch.full((8, FRAME[1], FRAME[0]), 7, dtype=torch.uint8)
    images = torch.full((8, FRAME[1], FRAME[0], 3), 200, dtype=torch.uint8)
    crops, crop_labels = da.DeviceAugment(cfg, MEAN, STD).geometry(images, labels, params)
    sw, sh = da.rescaled_size(params.factor, FRAME)
    for i in range(8):
        flipped = crop_labels[i].flip(-1) if params.flip[i] else crop_labels[i]
        inside = flipped[: int(sh[i]), : int(sw[i])]
        assert (inside == 7).all() and (flipped == 255).sum() == 250 * 120 - inside.numel()
        padded = (flipped == 255).unsqueeze(0).expand(3, -1, -1)
        image = crops[i].flip(-1) if params.flip[i] else crops[i]
        assert (image[padded] == 0).all() and torch.allclose(image[~padded], torch.tensor(200.0))


def test_labels_are_sampled_nearest_no_new_label_id_appears():
    ids = np.array([0, 7, 13, 26, 255], np.uint8)
    labels = ids[np.random.default_rng(2).integers(0, len(ids), (16, FRAME[1], FRAME[0]))]
    cfg = AugmentConfig(crop=[160, 80])
    params = da.draw_params(16, FRAME, cfg, torch.Generator().manual_seed(5))
    images = torch.zeros(16, FRAME[1], FRAME[0], 3, dtype=torch.uint8)
    _, crop_labels = da.DeviceAugment(cfg, MEAN, STD)(images, torch.from_numpy(labels), params)
    assert crop_labels.dtype == torch.int64
    assert set(crop_labels.unique().tolist()) <= set(ids.tolist())


def _cpu_outcomes(count: int, cfg: AugmentConfig, coordinate: np.ndarray) -> list[torch.Tensor]:
    """The CPU path's label crops of a frame whose label holds a pixel coordinate."""
    transform = SegmentationTransform(FRAME, MEAN, STD, augment=cfg, compact=True)
    rng = np.random.default_rng(11)
    image = Image.fromarray(smooth_image())
    return [transform.apply(image, coordinate, rng)[1] for _ in range(count)]


def _device_outcomes(count: int, cfg: AugmentConfig, coordinate: np.ndarray) -> torch.Tensor:
    params = da.draw_params(count, FRAME, cfg, torch.Generator().manual_seed(11))
    images = batch_of(smooth_image(), count)
    return da.DeviceAugment(cfg, MEAN, STD)(images, batch_of(coordinate, count), params)[1]


def _window(crops) -> dict[str, np.ndarray]:
    """Per crop: first source index, span of source indices, flipped (from a coordinate label)."""
    first, last = np.array([int(c[0]) for c in crops]), np.array([int(c[-1]) for c in crops])
    return {
        "start": np.minimum(first, last),
        "span": np.abs(last - first),
        "flip": first > last,
    }


def test_crop_positions_scale_factors_and_flips_follow_the_cpu_paths_distributions():
    """Black box: frames whose label is the pixel's column (then its row) show where each crop
    came from; both paths' windows are compared with two-sample KS tests."""
    cfg = AugmentConfig(crop=[160, 80], **NO_JITTER)
    n = 400
    columns = np.tile(np.arange(FRAME[0], dtype=np.uint8), (FRAME[1], 1))
    rows = np.tile(np.arange(FRAME[1], dtype=np.uint8)[:, None], (1, FRAME[0]))
    for coordinate, along in ((columns, "x"), (rows, "y")):
        cpu = _cpu_outcomes(n, cfg, coordinate)
        device = _device_outcomes(n, cfg, coordinate)
        line = (lambda c: c[0]) if along == "x" else (lambda c: c[:, 0])
        cpu_w, dev_w = _window([line(c) for c in cpu]), _window([line(c) for c in device])
        for key in ("start", "span"):
            statistic = ks_statistic(cpu_w[key], dev_w[key])
            assert statistic < ks_critical(n, n), (along, key, statistic)
        if along == "x":
            assert abs(cpu_w["flip"].mean() - dev_w["flip"].mean()) < 0.12
            assert 0.4 < dev_w["flip"].mean() < 0.6
    # the window spans the crop's source width: 159 · factor, with factor ~ U[1, 1.5]
    assert dev_w["span"].min() >= 79 * 1.0 - 1 and dev_w["span"].max() <= 79 * 1.5 + 1


def test_brightness_and_hue_factors_follow_the_cpu_paths_ranges():
    """Black box on a flat frame: brightness scales its grey; the hue shift moves a pure
    colour's hue. Both paths, two-sample KS; the device path's draws within the config's
    ranges and uniform over them."""
    n = 300
    flat = np.full((FRAME[1], FRAME[0], 3), 100, np.uint8)
    bright = AugmentConfig(crop=[160, 80], flip=False, contrast=0.0, saturation=0.0, hue=0.0)
    transform = SegmentationTransform(FRAME, MEAN, STD, augment=bright, compact=True)
    rng = np.random.default_rng(4)
    label = np.zeros(FRAME[::-1], np.uint8)
    cpu = [
        float(transform.apply(Image.fromarray(flat), label, rng)[0].float().mean()) / 100
        for _ in range(n)
    ]
    params = da.draw_params(n, FRAME, bright, torch.Generator().manual_seed(4))
    crops = da.DeviceAugment(bright, (0.0, 0.0, 0.0), (1 / 255,) * 3)(
        batch_of(flat, n), batch_of(label, n), params
    )[0]
    device = (crops.mean(dim=(1, 2, 3)) / 100).numpy()
    assert ks_statistic(np.array(cpu), device) < ks_critical(n, n)
    assert device.min() >= 0.8 - 0.01 and device.max() <= 1.2 + 0.01
    for name, low, high in (("brightness", 0.8, 1.2), ("contrast", 0.8, 1.2), ("hue", -0.1, 0.1)):
        drawn = getattr(da.draw_params(2000, FRAME, AugmentConfig(), torch.Generator()), name)
        drawn = drawn.numpy()
        uniform = np.random.default_rng(0).uniform(low, high, 2000)
        assert drawn.min() >= low and drawn.max() <= high
        assert ks_statistic(drawn, uniform) < ks_critical(2000, 2000), name


def test_output_is_normalised_like_the_cpu_path_and_in_the_requested_memory_format():
    cfg = AugmentConfig(crop=[160, 80], flip=False, scale_max=1.0, **NO_JITTER)
    image = smooth_image()
    params = da.draw_params(2, FRAME, cfg, torch.Generator().manual_seed(0))
    out, _ = da.DeviceAugment(cfg, MEAN, STD)(
        batch_of(image, 2),
        torch.zeros(2, FRAME[1], FRAME[0], dtype=torch.uint8),
        params,
        torch.channels_last,
    )
    assert out.dtype == torch.float32 and out.shape == (2, 3, 80, 160)
    assert out.is_contiguous(memory_format=torch.channels_last)
    x, y = int(params.x[0]), int(params.y[0])  # factor 1: the crop is the frame's pixels
    window = torch.from_numpy(image[y : y + 80, x : x + 160].copy()).permute(2, 0, 1)
    torch.testing.assert_close(out[0], normalize(window, MEAN, STD), atol=1e-4, rtol=1e-4)


def test_a_rank_slice_of_the_parameters_is_the_global_batchs_part():
    cfg = AugmentConfig(crop=[160, 80])
    whole = da.draw_params(6, FRAME, cfg, torch.Generator().manual_seed(9))
    part = whole.slice(2, 4)
    assert len(part) == 2
    torch.testing.assert_close(part.factor, whole.factor[2:4])
    torch.testing.assert_close(part.hue, whole.hue[2:4])


def test_the_look_up_table_maps_the_crops_raw_labels_and_leaves_padding_255():
    cfg = AugmentConfig(crop=[250, 120], scale_min=1.3, scale_max=1.5, **NO_JITTER)
    params = da.draw_params(4, FRAME, cfg, torch.Generator().manual_seed(1))
    raw = np.random.default_rng(3).integers(0, 34, (4, FRAME[1], FRAME[0]), dtype=np.uint8)
    lut = torch.full((256,), 255, dtype=torch.uint8)
    lut[7], lut[8], lut[0] = 0, 1, 2  # road, sidewalk, and the unlabelled id 0 mapped to 2
    images = torch.zeros(4, FRAME[1], FRAME[0], 3, dtype=torch.uint8)
    augment = da.DeviceAugment(cfg, MEAN, STD)
    _, mapped = augment(images, torch.from_numpy(raw), params, lut=lut)
    _, plain = augment(images, torch.from_numpy(raw), params)
    padding = plain == 255  # raw ids stop at 33: 255 only where padded
    assert padding.any()
    assert (mapped[padding] == 255).all()
    torch.testing.assert_close(mapped[~padding], lut[plain[~padding]].long())
