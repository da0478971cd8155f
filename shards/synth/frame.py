"""One frame: the layers drawn in order (background, ground, street sides, objects, void),
per-frame photometry, and the Cityscapes encodings of its ground truth."""

from __future__ import annotations

import zlib
from typing import NamedTuple

import numpy as np

from shards.synth.canvas import _Canvas, _grey, _noise, _pick
from shards.synth.objects import _scene_objects
from shards.synth.palette import CLOTHES, COLOURS, EGO, HAS_INSTANCES, UNLABELED
from shards.synth.scenery import _draw_background, _draw_sides
from shards.synth.street import _draw_ground, _Street


def _city_key(city: str) -> int:
    return zlib.crc32(city.encode())


class SynthFrame(NamedTuple):
    """One rendered frame: the photo and its ground truth in the Cityscapes encodings."""

    image: np.ndarray  # (H, W, 3) uint8 RGB
    label_ids: np.ndarray  # (H, W) uint8 label ids
    instance_ids: np.ndarray  # (H, W) uint16: labelId * 1000 + instance, or the label id

    @property
    def color(self) -> np.ndarray:
        """(H, W, 4) uint8: the label ids in the Cityscapes palette (RGBA)."""
        return color_image(self.label_ids)


def render_frame(
    size: tuple[int, int], seed: int, city: str, index: int, rare: frozenset[str] = frozenset()
) -> SynthFrame:
    """One synthetic frame: image, label ids and instance ids.

    ``rare`` names the rare classes (keys of :data:`shards.synth.files.RARE_PERIODS`) to include.
    """
    width, height = size
    rng = np.random.default_rng(np.random.SeedSequence([seed, _city_key(city), 1, index]))
    canvas = _Canvas.blank(height, width, rng)
    street = _Street.sample(rng, height, width)
    _draw_background(canvas, street)
    _draw_ground(canvas, street)
    _draw_sides(canvas, street)
    for number, draw in enumerate(_scene_objects(canvas, street, rare), start=1):
        canvas.current = number  # every pixel this call paints belongs to object ``number``
        draw()
    canvas.current = 0
    _draw_void(canvas, street)
    image = _photometric(rng, canvas.img)
    return SynthFrame(image, canvas.lab, instance_ids(canvas.lab, canvas.obj))


def instance_ids(label_ids: np.ndarray, objects: np.ndarray) -> np.ndarray:
    """Cityscapes instance ids (uint16) from label ids and the drawn object of every pixel.

    Where the class has instances, a pixel gets ``labelId * 1000 + i``: ``i`` numbers the
    (object, class) pairs of that class from 0, in drawing order (a rider and the bicycle it
    sits on are two instances). Every other pixel keeps its label id.
    """
    out = label_ids.astype(np.uint16)
    thing = HAS_INSTANCES[label_ids]
    keys = objects[thing].astype(np.int64) * 256 + label_ids[thing]
    pairs, inverse = np.unique(keys, return_inverse=True)  # sorted: drawing order, then class
    values = np.empty(len(pairs), np.uint16)
    seen: dict[int, int] = {}
    for i, key in enumerate(pairs.tolist()):
        label = key % 256
        values[i] = label * 1000 + seen.get(label, 0)
        seen[label] = seen.get(label, 0) + 1
    out[thing] = values[inverse]
    return out


def color_image(label_ids: np.ndarray) -> np.ndarray:
    """(H, W, 4) uint8: the Cityscapes palette colour of every label id, alpha 255."""
    return COLOURS[label_ids]


# --------------------------------------------------------------------------- void and photometry
def _draw_void(cv: _Canvas, st: _Street) -> None:
    rng = cv.rng
    for _ in range(int(rng.integers(0, 3))):  # unlabelled clutter
        y, x = rng.uniform(st.hz - 0.2 * cv.h, cv.h), rng.uniform(0, cv.w)
        r = cv.h * rng.uniform(0.01, 0.03)
        cv.ellipse(y, x, r, r * rng.uniform(0.5, 2), UNLABELED, _pick(rng, CLOTHES, 0.1))
    if rng.random() < 0.85:  # ego vehicle: the bonnet at the bottom
        height = cv.h * rng.uniform(0.05, 0.12)
        box = cv.box(cv.h - height, cv.h, 0, cv.w)
        if box is not None:
            yy, xx = box.grid()
            edge = cv.h - height * (1 - 0.6 * ((xx - cv.w / 2) / (cv.w / 2)) ** 2)
            paint = _grey(rng, 0.03, 0.25)
            shine = 1 + 0.5 * np.clip(_noise(rng, *box.shape, 0.05 * cv.h, 0.3 * cv.w), 0, None)
            cv.paint(box, EGO, paint * shine[..., None], yy >= edge)


def _photometric(rng: np.random.Generator, img: np.ndarray) -> np.ndarray:
    """Per-frame illumination (gain, colour cast, gamma, soft shadows) and pixel noise → uint8."""
    h, w, _ = img.shape
    shadow = 1 - rng.uniform(0.0, 0.45) * np.clip(_noise(rng, h, w, 0.2 * h, 0.3 * w), 0, 1)
    gain = rng.uniform(0.7, 1.25)
    cast = rng.normal(0, 0.035, 3).astype(np.float32)
    lit = img * (shadow * np.float32(255 * gain))[..., None] + cast * 255
    levels = np.clip(lit, 0, 255, out=lit).astype(np.uint8)
    gamma = (np.arange(256, dtype=np.float32) / 255) ** rng.uniform(0.8, 1.25) * 255
    noise = rng.random(img.shape, dtype=np.float32) - np.float32(0.5)  # uniform: cheap to draw
    out = gamma[levels] + noise * np.float32(255 * rng.uniform(0.035, 0.12)) + 0.5
    return np.clip(out, 0, 255, out=out).astype(np.uint8)
