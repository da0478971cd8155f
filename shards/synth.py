"""A synthetic stand-in for Cityscapes, written in the exact Cityscapes folder layout.

Every city of every city set of a task protocol gets ``images_per_city`` street scenes::

    OUT/leftImg8bit/{split}/{city}/{city}_000000_{frame:06d}_leftImg8bit.png   (RGB)
    OUT/gtFine/{split}/{city}/{city}_000000_{frame:06d}_gtFine_labelIds.png    (L, label ids)
    OUT/gtFine/{split}/{city}/{city}_000000_{frame:06d}_gtFine_instanceIds.png (16-bit)
    OUT/gtFine/{split}/{city}/{city}_000000_{frame:06d}_gtFine_color.png       (RGBA palette)

The ground truth uses the official Cityscapes encodings (``cityscapesscripts.preparation``'s
``json2labelImg`` and ``json2instanceImg``): ``instanceIds`` holds ``labelId * 1000 + i`` on
the pixels of every drawn object of a class with instances (person, rider, car, …; ``i``
counts that class's objects of the frame from 0, in drawing order) and the label id
elsewhere; ``color`` is the label ids in the Cityscapes palette, RGBA. The official scripts
(``evalPixelLevelSemanticLabeling``) therefore run on this tree unchanged.

A scene is a street in perspective: sky; buildings, walls, fences and hedges along both sides;
road with lane markings between sidewalks; terrain verges; trees; poles carrying traffic signs
and lights; cars, trucks, buses, trams, persons, riders on bicycles and motorcycles; void
(ego vehicle, static and dynamic objects, unlabelled blobs). Every frame shows classes of all
three tasks. Classes differ by texture, shape and position, their colour ranges overlap, and
each frame gets its own illumination and pixel noise, so per-pixel colour alone does not
segment a frame but a small conv net does.

Each frame's random generator is derived from ``(seed, city, index)`` only, so the output is
byte-identical for the same arguments whatever the number of worker processes.
"""

from __future__ import annotations

import logging
import os
import time
import zlib
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import NamedTuple

import numpy as np
from cityscapesscripts.helpers.labels import labels as cs_labels
from PIL import Image

from cil_dist import labels
from cil_dist.protocol import TaskProtocol

__all__ = [
    "SynthFrame",
    "SynthSummary",
    "color_image",
    "frame_name",
    "generate",
    "instance_ids",
    "render_frame",
]

log = logging.getLogger(__name__)


def _id(name: str) -> int:
    return labels.by_name(name).id


UNLABELED, EGO, STATIC, DYNAMIC = (
    _id(n) for n in ("unlabeled", "ego vehicle", "static", "dynamic")
)
ROAD, SIDEWALK, BUILDING, WALL, FENCE = (
    _id(n) for n in ("road", "sidewalk", "building", "wall", "fence")
)
POLE, LIGHT, SIGN, VEGETATION, TERRAIN, SKY = (
    _id(n) for n in ("pole", "traffic light", "traffic sign", "vegetation", "terrain", "sky")
)
PERSON, RIDER, CAR, TRUCK, BUS, TRAIN, MOTORCYCLE, BICYCLE = (
    _id(n) for n in ("person", "rider", "car", "truck", "bus", "train", "motorcycle", "bicycle")
)

#: True at the label ids of classes with instances (``hasInstances`` in the Cityscapes table).
HAS_INSTANCES = np.zeros(256, bool)
HAS_INSTANCES[[lab.id for lab in cs_labels if lab.hasInstances and lab.id >= 0]] = True
#: RGBA colour of every label id, as the official ``json2labelImg`` "color" encoding writes it.
COLOURS = np.zeros((256, 4), np.uint8)
COLOURS[[lab.id for lab in cs_labels if lab.id >= 0]] = [
    (*lab.color, 255) for lab in cs_labels if lab.id >= 0
]

#: Rare classes appear in one frame out of ``period`` of every city (with a per-city phase).
RARE_PERIODS: dict[str, int] = {"train": 3, "bus": 2, "truck": 2, "motorcycle": 2}

#: Pixels per metre at the bottom image row, as a fraction of the image height.
METRE = 0.42
#: Relative luminance noise of drawn objects (large textured regions bring their own).
OBJECT_GRAIN = 0.03
#: Distance (metres) of the sidewalk's outer edge point at the bottom image row.
NEAR_Z = 4.0

RGB = tuple[float, float, float]
Colour = np.ndarray | Callable[[tuple[int, int]], np.ndarray]
Span = tuple[float, float]  # (x left, x right)
Point = tuple[float, float]  # (y, x)

CAR_COLOURS: list[RGB] = [
    (0.85, 0.85, 0.85), (0.08, 0.08, 0.1), (0.45, 0.45, 0.47), (0.65, 0.1, 0.1),
    (0.15, 0.2, 0.5), (0.62, 0.62, 0.64), (0.2, 0.33, 0.22), (0.75, 0.65, 0.2),
]  # fmt: skip
BUS_COLOURS: list[RGB] = [
    (0.85, 0.7, 0.1), (0.75, 0.15, 0.12), (0.2, 0.35, 0.7), (0.88, 0.88, 0.86), (0.3, 0.55, 0.3),
]  # fmt: skip
FACADE_COLOURS: list[RGB] = [
    (0.75, 0.68, 0.55), (0.55, 0.55, 0.55), (0.55, 0.3, 0.22), (0.85, 0.84, 0.8),
    (0.32, 0.31, 0.33), (0.8, 0.7, 0.45), (0.7, 0.55, 0.55), (0.6, 0.65, 0.7),
]  # fmt: skip
GREENS: list[RGB] = [(0.18, 0.32, 0.12), (0.25, 0.4, 0.15), (0.12, 0.24, 0.1), (0.38, 0.4, 0.16)]
GROUNDS: list[RGB] = [(0.4, 0.42, 0.25), (0.45, 0.38, 0.28), (0.3, 0.42, 0.2), (0.5, 0.48, 0.35)]
PAVINGS: list[RGB] = [(0.58, 0.58, 0.57), (0.6, 0.55, 0.48), (0.55, 0.42, 0.4), (0.42, 0.42, 0.44)]
CLOTHES: list[RGB] = [
    (0.1, 0.1, 0.12), (0.2, 0.25, 0.45), (0.6, 0.1, 0.1), (0.85, 0.85, 0.85), (0.4, 0.35, 0.3),
    (0.2, 0.4, 0.25), (0.8, 0.6, 0.2), (0.5, 0.5, 0.52), (0.55, 0.3, 0.5),
]  # fmt: skip
SKINS: list[RGB] = [(0.85, 0.68, 0.55), (0.6, 0.45, 0.35), (0.35, 0.25, 0.2), (0.75, 0.6, 0.48)]


# --------------------------------------------------------------------------- public API
@dataclass(frozen=True)
class SynthSummary:
    """What :func:`generate` wrote."""

    root: Path
    frames: dict[str, int] = field(default_factory=dict)  # split -> number of frames
    size: tuple[int, int] = (1024, 512)  # width, height
    seed: int = 0

    @property
    def total(self) -> int:
        return sum(self.frames.values())


class SynthFrame(NamedTuple):
    """One rendered frame: the photo and its ground truth in the Cityscapes encodings."""

    image: np.ndarray  # (H, W, 3) uint8 RGB
    label_ids: np.ndarray  # (H, W) uint8 label ids
    instance_ids: np.ndarray  # (H, W) uint16: labelId * 1000 + instance, or the label id

    @property
    def color(self) -> np.ndarray:
        """(H, W, 4) uint8: the label ids in the Cityscapes palette (RGBA)."""
        return color_image(self.label_ids)


@dataclass(frozen=True)
class _Job:
    root: str
    split: str
    city: str
    index: int
    size: tuple[int, int]
    seed: int
    rare: frozenset[str]


def frame_name(city: str, index: int) -> str:
    """Frame stem of the ``index``-th frame of ``city``, e.g. ``aachen_000000_000019``."""
    return f"{city}_{0:06d}_{19 + 20 * index:06d}"


def generate(
    out: str | Path,
    protocol: TaskProtocol,
    images_per_city: int = 10,
    size: tuple[int, int] = (1024, 512),
    seed: int = 0,
    workers: int | None = None,
) -> SynthSummary:
    """Write ``images_per_city`` synthetic frames for every city of ``protocol.city_sets()``."""
    width, height = (int(v) for v in size)
    if images_per_city < 1:
        raise ValueError(f"images_per_city must be >= 1, got {images_per_city}")
    if seed < 0:
        raise ValueError(f"seed must be >= 0, got {seed}")
    if width < 16 or height < 8:
        raise ValueError(f"size must be at least 16x8 (width x height), got {width}x{height}")
    root = Path(out)
    jobs = _jobs(root, protocol, images_per_city, (width, height), seed)
    for split, city in {(job.split, job.city) for job in jobs}:
        for kind in ("leftImg8bit", "gtFine"):
            (root / kind / split / city).mkdir(parents=True, exist_ok=True)
    workers = min(workers or os.cpu_count() or 1, len(jobs))
    start = time.perf_counter()
    if workers <= 1:
        for job in jobs:
            _write_frame(job)
    else:
        with ProcessPoolExecutor(max_workers=workers) as pool:
            list(pool.map(_write_frame, jobs, chunksize=max(1, len(jobs) // (4 * workers))))
    frames: dict[str, int] = {}
    for job in jobs:
        frames[job.split] = frames.get(job.split, 0) + 1
    summary = SynthSummary(root, frames, (width, height), seed)
    log.info(
        "wrote %d synthetic frames (%s) of %dx%d to %s in %.1f s with %d worker(s)",
        summary.total,
        ", ".join(f"{k}: {v}" for k, v in sorted(frames.items())),
        width,
        height,
        root,
        time.perf_counter() - start,
        workers,
    )
    return summary


def render_frame(
    size: tuple[int, int], seed: int, city: str, index: int, rare: frozenset[str] = frozenset()
) -> SynthFrame:
    """One synthetic frame: image, label ids and instance ids.

    ``rare`` names the rare classes (keys of :data:`RARE_PERIODS`) to include.
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


# --------------------------------------------------------------------------- jobs and files
def _city_key(city: str) -> int:
    return zlib.crc32(city.encode())


def _jobs(
    root: Path, protocol: TaskProtocol, images_per_city: int, size: tuple[int, int], seed: int
) -> list[_Job]:
    pairs = dict.fromkeys(
        (cs.split, city) for cs in protocol.city_sets().values() for city in cs.cities
    )
    jobs = []
    for split, city in pairs:
        schedule = _rare_schedule(seed, city, images_per_city)
        jobs += [
            _Job(str(root), split, city, i, size, seed, schedule[i]) for i in range(images_per_city)
        ]
    return jobs


def _rare_schedule(seed: int, city: str, count: int) -> list[frozenset[str]]:
    """Which rare classes each frame of a city shows: one frame in ``period``, per-city phase."""
    rng = np.random.default_rng(np.random.SeedSequence([seed, _city_key(city), 0]))
    phases = {name: int(rng.integers(period)) for name, period in RARE_PERIODS.items()}
    return [
        frozenset(n for n, p in RARE_PERIODS.items() if (i + phases[n]) % p == 0)
        for i in range(count)
    ]


def _write_frame(job: _Job) -> None:
    frame = render_frame(job.size, job.seed, job.city, job.index, job.rare)
    stem = frame_name(job.city, job.index)
    root = Path(job.root)
    gt = root / "gtFine" / job.split / job.city / f"{stem}_gtFine"
    img_path = root / "leftImg8bit" / job.split / job.city / f"{stem}_leftImg8bit.png"
    _save_png(frame.image, img_path, compress_level=1)  # noisy photo: barely compressible
    _save_png(frame.label_ids, Path(f"{gt}_labelIds.png"), compress_level=6)
    _save_png(frame.instance_ids, Path(f"{gt}_instanceIds.png"), compress_level=6)
    _save_png(frame.color, Path(f"{gt}_color.png"), compress_level=6)


def _save_png(array: np.ndarray, path: Path, compress_level: int) -> None:
    """Write atomically: readers never see a half-written frame."""
    part = path.with_name(path.name + ".part")
    Image.fromarray(array).save(part, format="PNG", compress_level=compress_level)
    os.replace(part, path)


# --------------------------------------------------------------------------- drawing primitives
@dataclass(frozen=True)
class _Box:
    y0: int
    y1: int
    x0: int
    x1: int

    @property
    def shape(self) -> tuple[int, int]:
        return self.y1 - self.y0, self.x1 - self.x0

    @property
    def slices(self) -> tuple[slice, slice]:
        return slice(self.y0, self.y1), slice(self.x0, self.x1)

    def grid(self) -> tuple[np.ndarray, np.ndarray]:
        """Pixel-centre coordinates, shapes (h, 1) and (1, w)."""
        yy = np.arange(self.y0, self.y1, dtype=np.float32)[:, None] + 0.5
        xx = np.arange(self.x0, self.x1, dtype=np.float32)[None, :] + 0.5
        return yy, xx


@dataclass
class _Canvas:
    img: np.ndarray  # (H, W, 3) float32, linear-ish RGB in [0, 1]
    lab: np.ndarray  # (H, W) uint8 Cityscapes label ids
    rng: np.random.Generator
    obj: np.ndarray  # (H, W) int32: the object that painted each pixel (0: none)
    current: int = 0  # the object being drawn (0: background)

    @classmethod
    def blank(cls, height: int, width: int, rng: np.random.Generator) -> _Canvas:
        return cls(
            np.zeros((height, width, 3), np.float32),
            np.zeros((height, width), np.uint8),
            rng,
            np.zeros((height, width), np.int32),
        )

    @property
    def h(self) -> int:
        return self.lab.shape[0]

    @property
    def w(self) -> int:
        return self.lab.shape[1]

    def box(self, y0: float, y1: float, x0: float, x1: float) -> _Box | None:
        """The pixel box covering [y0, y1) x [x0, x1), clipped; None when empty."""
        by0, bx0 = max(int(np.floor(y0)), 0), max(int(np.floor(x0)), 0)
        by1, bx1 = min(int(np.ceil(y1)), self.h), min(int(np.ceil(x1)), self.w)
        return None if by0 >= by1 or bx0 >= bx1 else _Box(by0, by1, bx0, bx1)

    def paint(
        self, box: _Box, label: int, colour: Colour, mask: np.ndarray | None = None, grain=0.0
    ) -> None:
        """Set label and colour (RGB vector, array or ``f(shape)``) where ``mask`` holds."""
        shape = box.shape
        rgb = colour(shape) if callable(colour) else colour
        rgb = np.broadcast_to(np.asarray(rgb, np.float32), (*shape, 3))
        if grain:
            rgb = rgb * (1 + grain * self.rng.standard_normal((*shape, 1), dtype=np.float32))
        img, lab, obj = self.img[box.slices], self.lab[box.slices], self.obj[box.slices]
        if mask is None:
            img[...] = rgb
            lab[...] = label
            obj[...] = self.current
        else:
            mask = np.broadcast_to(mask, shape)
            np.copyto(img, rgb, where=mask[..., None])
            np.copyto(lab, np.uint8(label), where=mask)
            np.copyto(obj, np.int32(self.current), where=mask)

    def shape(self, box: _Box | None, label: int, colour: Colour, mask=None) -> None:
        """Paint an object's shape (with object grain) unless it lies outside the frame."""
        if box is not None:
            self.paint(box, label, colour, mask, grain=OBJECT_GRAIN)

    def rect(self, y0: float, y1: float, x0: float, x1: float, label: int, colour: Colour) -> None:
        """Axis-aligned rectangle, at least one pixel wide and high."""
        y0, x0 = round(y0), round(x0)
        self.shape(self.box(y0, max(round(y1), y0 + 1), x0, max(round(x1), x0 + 1)), label, colour)

    def ellipse(self, cy: float, cx: float, ry: float, rx: float, label: int, colour: Colour):
        ry, rx = max(ry, 0.6), max(rx, 0.6)
        box = self.box(cy - ry, cy + ry, cx - rx, cx + rx)
        if box is not None:
            yy, xx = box.grid()
            self.shape(box, label, colour, ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1)

    def ring(self, cy: float, cx: float, r: float, width: float, label: int, colour: Colour):
        r, width = max(r, 0.8), max(width, 0.7)
        box = self.box(cy - r, cy + r, cx - r, cx + r)
        if box is not None:
            yy, xx = box.grid()
            d = np.sqrt((yy - cy) ** 2 + (xx - cx) ** 2)
            self.shape(box, label, colour, (d <= r) & (d >= r - width))

    def trapezoid(
        self, y0: float, y1: float, top: Span, bottom: Span, label: int, colour: Colour
    ) -> None:
        """Rows y0..y1; x span ``top`` at y0 interpolated linearly to ``bottom`` at y1."""
        box = self.box(y0, y1, min(top[0], bottom[0]), max(top[1], bottom[1]) + 1)
        if box is None or y1 <= y0:
            return
        yy, xx = box.grid()
        f = np.clip((yy - y0) / (y1 - y0), 0, 1)
        left, right = top[0] + (bottom[0] - top[0]) * f, top[1] + (bottom[1] - top[1]) * f
        self.shape(box, label, colour, (xx >= left) & (xx < np.maximum(right, left + 1)))

    def segment(self, p0: Point, p1: Point, radius: float, label: int, colour: Colour) -> None:
        """Thick line from ``p0`` to ``p1`` (each ``(y, x)``)."""
        radius = max(radius, 0.6)
        (ya, xa), (yb, xb) = p0, p1
        box = self.box(min(ya, yb) - radius, max(ya, yb) + radius, min(xa, xb) - radius,
                       max(xa, xb) + radius)  # fmt: skip
        if box is None:
            return
        yy, xx = box.grid()
        dy, dx = yb - ya, xb - xa
        u = np.clip(((yy - ya) * dy + (xx - xa) * dx) / max(dy * dy + dx * dx, 1e-6), 0, 1)
        d2 = (yy - ya - u * dy) ** 2 + (xx - xa - u * dx) ** 2
        self.shape(box, label, colour, d2 <= radius * radius)


def _crop(box: _Box, mask: np.ndarray) -> tuple[_Box, np.ndarray] | None:
    """The smallest sub-box of ``box`` holding every True pixel of ``mask``, with its mask."""
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    if rows.size == 0:
        return None
    r0, r1, c0, c1 = rows[0], rows[-1] + 1, cols[0], cols[-1] + 1
    sub = _Box(box.y0 + r0, box.y0 + r1, box.x0 + c0, box.x0 + c1)
    return sub, mask[r0:r1, c0:c1]


def _noise(rng: np.random.Generator, h: int, w: int, cell_y: float, cell_x: float | None = None):
    """Smooth value noise (h, w), roughly unit variance at the grid points."""
    cell_y = max(cell_y, 1.0)
    cell_x = max(cell_x or cell_y, 1.0)
    grid = rng.standard_normal((int(h / cell_y) + 2, int(w / cell_x) + 2), dtype=np.float32)
    fy = np.arange(h, dtype=np.float32) / cell_y
    fx = np.arange(w, dtype=np.float32) / cell_x
    iy, ix = fy.astype(np.int64), fx.astype(np.int64)
    fy, fx = fy - iy, fx - ix
    fy, fx = (fy * fy * (3 - 2 * fy))[:, None], fx * fx * (3 - 2 * fx)
    rows = grid[:, ix] * (1 - fx) + grid[:, ix + 1] * fx  # interpolate along x on the coarse rows
    top = rows[iy]
    return top + (rows[iy + 1] - top) * fy


def _pick(rng: np.random.Generator, palette: list[RGB], jitter: float = 0.05) -> np.ndarray:
    base = np.asarray(palette[int(rng.integers(len(palette)))], np.float32)
    return np.clip(base + rng.uniform(-jitter, jitter, 3).astype(np.float32), 0, 1)


def _grey(rng: np.random.Generator, lo: float, hi: float, tint: float = 0.03) -> np.ndarray:
    value = rng.uniform(lo, hi)
    return np.clip(value + rng.uniform(-tint, tint, 3), 0, 1).astype(np.float32)


# --------------------------------------------------------------------------- textures
def _foliage(rng: np.random.Generator, unit: float) -> Callable[[tuple[int, int]], np.ndarray]:
    """Leafy green: blotchy mid-frequency noise with dark gaps (``unit`` = pixels per metre)."""
    base = _pick(rng, GREENS, 0.04)

    def texture(shape: tuple[int, int]) -> np.ndarray:
        h, w = shape
        mid = _noise(rng, h, w, max(0.25 * unit, 1.5))
        fine = _noise(rng, h, w, max(0.08 * unit, 1.0))
        lum = 1 + 0.45 * mid + 0.3 * fine
        lum = np.where(mid < -0.9, lum * 0.45, lum)
        return base * np.clip(lum, 0.15, 2.2)[..., None]

    return texture


def _grass(rng: np.random.Generator, height: int) -> Callable[[tuple[int, int]], np.ndarray]:
    """Terrain: smooth olive/brown patches with horizontal streaks and fine grain."""
    base = _pick(rng, GROUNDS, 0.05)

    def texture(shape: tuple[int, int]) -> np.ndarray:
        h, w = shape
        coarse = _noise(rng, h, w, 0.08 * height)
        streak = _noise(rng, h, w, max(0.004 * height, 1.0), 0.05 * height)
        grain = rng.random((h, w), dtype=np.float32)
        lum = 0.94 + 0.12 * coarse + 0.12 * streak + 0.12 * grain
        return base * lum[..., None] + coarse[..., None] * np.float32([0.04, -0.02, 0.0])

    return texture


# --------------------------------------------------------------------------- street geometry
@dataclass(frozen=True)
class _Street:
    """Perspective street: horizon row, vanishing column and edge columns at the bottom row."""

    h: int
    w: int
    hz: float
    vx: float
    road_l: float
    road_r: float
    walk_l: float
    walk_r: float
    centre: float

    @classmethod
    def sample(cls, rng: np.random.Generator, h: int, w: int) -> _Street:
        hz = h * rng.uniform(0.36, 0.5)
        vx = w * rng.uniform(0.35, 0.65)
        road_l = vx - w * rng.uniform(0.35, 0.75)
        road_r = vx + w * rng.uniform(0.35, 0.75)
        walk_l = road_l - w * rng.uniform(0.2, 0.5)
        walk_r = road_r + w * rng.uniform(0.2, 0.5)
        centre = road_l + (road_r - road_l) * rng.uniform(0.35, 0.65)
        return cls(h, w, hz, vx, road_l, road_r, walk_l, walk_r, centre)

    def depth(self, y: np.ndarray | float) -> np.ndarray | float:
        """Perspective scale t of a ground row: 0 at the horizon, 1 at the bottom row."""
        return (y - self.hz) / (self.h - self.hz)

    def row(self, t: float) -> float:
        return self.hz + t * (self.h - self.hz)

    def x_at(self, x_bottom: float, t: np.ndarray | float) -> np.ndarray | float:
        return self.vx + (x_bottom - self.vx) * t

    def metre(self, t: float) -> float:
        """Pixels per metre at perspective scale ``t``."""
        return METRE * self.h * t

    def on_road(self, rng: np.random.Generator, t: float, margin: float = 0.05) -> float:
        left, right = self.x_at(self.road_l, t), self.x_at(self.road_r, t)
        return float(rng.uniform(left + margin * (right - left), right - margin * (right - left)))

    def on_walk(self, rng: np.random.Generator, t: float, side: int, lo=0.1, hi=0.9) -> float:
        """A column on the left (side -1) or right (+1) sidewalk, lo..hi from road to outer edge."""
        road, walk = (self.road_l, self.walk_l) if side < 0 else (self.road_r, self.walk_r)
        f = rng.uniform(lo, hi)
        return float(self.x_at(road + f * (walk - road), t))


# --------------------------------------------------------------------------- background
def _draw_background(cv: _Canvas, st: _Street) -> None:
    _draw_sky(cv, st)
    _draw_far_buildings(cv, st)
    for _ in range(int(cv.rng.integers(3, 10))):
        _draw_tree_crown(
            cv,
            cv.rng.uniform(0, cv.w),
            st.hz - cv.h * cv.rng.uniform(0.02, 0.14),
            cv.h * cv.rng.uniform(0.04, 0.12),
        )


def _draw_sky(cv: _Canvas, st: _Street) -> None:
    rng = cv.rng
    box = cv.box(0, st.hz + 2, 0, cv.w)
    if box is None:
        return
    if rng.random() < 0.35:  # overcast
        top = _grey(rng, 0.62, 0.85)
        low = np.clip(top + rng.uniform(0.0, 0.1), 0, 1)
    else:
        top = np.array([rng.uniform(0.2, 0.4), rng.uniform(0.4, 0.6), rng.uniform(0.75, 0.95)])
        low = np.array([rng.uniform(0.65, 0.8), rng.uniform(0.75, 0.85), rng.uniform(0.85, 0.95)])
    h, w = box.shape
    f = np.linspace(0, 1, h, dtype=np.float32)[:, None, None]
    cloud = np.clip(_noise(rng, h, w, 0.12 * cv.h, 0.3 * cv.h) * rng.uniform(0.3, 1.0), 0, 1)
    white = np.float32(rng.uniform(0.8, 0.97))
    sky = (top + (low - top) * f) * (1 - cloud[..., None]) + white * cloud[..., None]
    cv.paint(box, SKY, sky.astype(np.float32))


def _facade(rng: np.random.Generator, floor_px: float, origin: tuple[float, float]):
    """Frontal facade texture with a window grid (``floor_px`` = storey height in pixels)."""
    base = _pick(rng, FACADE_COLOURS, 0.06)
    glass = _grey(rng, 0.08, 0.3) * np.array([0.9, 0.95, 1.1], np.float32)
    bay = floor_px * rng.uniform(0.7, 1.2)
    wf, hf = rng.uniform(0.35, 0.65), rng.uniform(0.4, 0.6)

    def texture(shape: tuple[int, int]) -> np.ndarray:
        h, w = shape
        yy = np.arange(h, dtype=np.float32)[:, None] + origin[0]
        xx = np.arange(w, dtype=np.float32)[None, :] + origin[1]
        win = ((xx % bay) / bay < wf) & ((yy % floor_px) / floor_px < hf)
        out = base * (1 + 0.08 * _noise(rng, h, w, max(floor_px, 2)))[..., None]
        return np.where(win[..., None], glass, out)

    return texture


def _draw_far_buildings(cv: _Canvas, st: _Street) -> None:
    rng = cv.rng
    x = st.vx - cv.w * rng.uniform(0.15, 0.4)
    end = st.vx + cv.w * rng.uniform(0.15, 0.4)
    while x < end:
        width = cv.w * rng.uniform(0.04, 0.15)
        if rng.random() < 0.8:
            top = st.hz - cv.h * rng.uniform(0.04, 0.22)
            floor_px = cv.h * rng.uniform(0.012, 0.025)
            box = cv.box(top, st.hz + 1, x, x + width)
            if box is not None:
                cv.paint(box, BUILDING, _facade(rng, floor_px, (box.y0 - top, box.x0 - x)))
        x += width


def _draw_tree_crown(cv: _Canvas, cx: float, cy: float, radius: float) -> None:
    """A crown of a few overlapping ellipses, textured as one."""
    rng = cv.rng
    texture = _foliage(rng, radius / 3)
    blobs = []
    for _ in range(int(rng.integers(2, 5))):
        r = radius * rng.uniform(0.5, 0.9)
        dy, dx = rng.uniform(-0.5, 0.5, 2) * radius
        blobs.append((cy + dy, cx + dx, r * rng.uniform(0.7, 1.0), r))
    box = cv.box(cy - 1.5 * radius, cy + 1.5 * radius, cx - 1.5 * radius, cx + 1.5 * radius)
    if box is None:
        return
    yy, xx = box.grid()
    mask = np.zeros(box.shape, bool)
    for by, bx, ry, rx in blobs:
        mask |= ((yy - by) / ry) ** 2 + ((xx - bx) / rx) ** 2 <= 1
    cv.paint(box, VEGETATION, texture, mask)


# --------------------------------------------------------------------------- ground
def _ground_coords(st: _Street, box: _Box) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per pixel of a ground box: scale t (h, 1), distance Z and lateral X in metres."""
    yy, xx = box.grid()
    t = np.maximum(st.depth(yy), 1e-3)
    z = NEAR_Z / t
    lateral = (xx - st.vx) / (METRE * st.h * t)
    return t, z, lateral


def _draw_ground(cv: _Canvas, st: _Street) -> None:
    rng = cv.rng
    box = cv.box(st.hz, cv.h, 0, cv.w)
    if box is None:
        return
    cv.paint(box, TERRAIN, _grass(rng, cv.h))
    yy, xx = box.grid()
    t = st.depth(yy)
    walk = (xx >= st.x_at(st.walk_l, t)) & (xx < st.x_at(st.walk_r, t))
    cv.paint(box, SIDEWALK, _paving(rng, st, box), walk)
    road = (xx >= st.x_at(st.road_l, t)) & (xx < st.x_at(st.road_r, t))
    cv.paint(box, ROAD, _asphalt(rng, st, box), road)
    for side in (-1, 1):
        if rng.random() < 0.4:
            _draw_verge(cv, st, box, side)


def _paving(rng: np.random.Generator, st: _Street, box: _Box) -> np.ndarray:
    base = _pick(rng, PAVINGS, 0.05)
    t, z, lateral = _ground_coords(st, box)
    tile = rng.uniform(0.3, 0.7)
    joint = rng.uniform(0.04, 0.1)
    lines = ((z % tile) < joint) | ((lateral % tile) < joint)
    h, w = box.shape
    lum = 1 + 0.07 * _noise(rng, h, w, 0.05 * st.h) - 0.22 * lines
    out = base * lum[..., None]
    # kerb: a bright strip along each road edge
    _, xx = box.grid()
    metre = METRE * st.h * t
    for road in (st.road_l, st.road_r):
        kerb = np.abs(xx - st.x_at(road, t)) < np.maximum(0.25 * metre, 0.6)
        out = np.where(kerb[..., None], np.clip(base * 1.25, 0, 1), out)
    return out


def _asphalt(rng: np.random.Generator, st: _Street, box: _Box) -> np.ndarray:
    base = _grey(rng, 0.2, 0.42) * np.array([1.0, 1.0, rng.uniform(1.0, 1.1)], np.float32)
    h, w = box.shape
    t, z, lateral = _ground_coords(st, box)
    _, xx = box.grid()
    lum = 1 + 0.1 * _noise(rng, h, w, 0.1 * st.h) + 0.06 * rng.standard_normal((h, w))
    out = base * lum[..., None].astype(np.float32)
    paint = np.clip(_grey(rng, 0.75, 0.95), 0, 1)
    metre = METRE * st.h * t
    dash = rng.uniform(1.5, 4.0)
    centre = (np.abs(xx - st.x_at(st.centre, t)) < np.maximum(0.08 * metre, 0.5)) & (
        (z % (2.5 * dash)) < dash
    )
    marks = centre
    for road in (st.road_l, st.road_r):
        edge = st.x_at(road, t) + np.sign(st.vx - road) * 0.5 * metre
        marks = marks | (np.abs(xx - edge) < np.maximum(0.06 * metre, 0.4))
    if rng.random() < 0.35:  # zebra crossing
        z0 = rng.uniform(6, 25)
        marks = marks | ((z > z0) & (z < z0 + 4) & ((lateral % 1.0) < 0.5))
    return np.where(marks[..., None], paint, out)


def _draw_verge(cv: _Canvas, st: _Street, box: _Box, side: int) -> None:
    """A grass strip on the road-side part of a sidewalk over a range of distances."""
    rng = cv.rng
    yy, xx = box.grid()
    t = np.maximum(st.depth(yy), 1e-3)
    road, walk = (st.road_l, st.walk_l) if side < 0 else (st.road_r, st.walk_r)
    inner, outer = sorted(rng.uniform(0.1, 0.6, 2))
    a, b = st.x_at(road + inner * (walk - road), t), st.x_at(road + outer * (walk - road), t)
    z = NEAR_Z / t
    z0 = rng.uniform(NEAR_Z, 20)
    mask = (xx >= np.minimum(a, b)) & (xx < np.maximum(a, b)) & (z > z0) & (z < z0 + 25)
    cropped = _crop(box, mask)
    if cropped is not None:
        cv.paint(cropped[0], TERRAIN, _grass(rng, cv.h), cropped[1])


# --------------------------------------------------------------------------- street sides
@dataclass
class _Segment:
    kind: str  # building | wall | fence | hedge | open
    z0: float
    z1: float
    height: float  # metres


SIDE_KINDS = {
    "facade": (("building", "wall", "fence", "hedge", "open"), (0.62, 0.13, 0.13, 0.07, 0.05)),
    "park": (("wall", "fence", "hedge", "open"), (0.25, 0.3, 0.25, 0.2)),
}
HEIGHTS = {"building": (8, 25), "wall": (0.8, 2.0), "fence": (1.0, 2.2), "hedge": (0.8, 2.0)}
LENGTHS = {
    "building": (8, 35),
    "wall": (4, 18),
    "fence": (4, 18),
    "hedge": (4, 15),
    "open": (3, 12),
}


def _draw_sides(cv: _Canvas, st: _Street) -> None:
    rng = cv.rng
    sides = {side: _segments(rng, st, side) for side in (-1, 1)}
    for kind in ("wall", "fence"):  # most frames show both, near enough to be seen
        if any(s.kind == kind for segs in sides.values() for s in segs[:3]):
            continue
        near = [s for segs in sides.values() for s in segs[:3] if s.kind not in ("wall", "fence")]
        if near:
            seg = near[int(rng.integers(len(near)))]
            seg.kind, seg.height = kind, rng.uniform(*HEIGHTS[kind])
    for side, segs in sides.items():
        for seg in segs:
            if seg.kind != "open":
                _draw_plane(cv, st, side, seg)
        if segs and segs[0].kind != "building" and rng.random() < 0.7:
            _draw_near_tree(cv, st, side)


def _segments(rng: np.random.Generator, st: _Street, side: int) -> list[_Segment]:
    """Pieces of the vertical plane along one sidewalk's outer edge, from near to far."""
    kinds, probs = SIDE_KINDS["facade" if rng.random() < 0.65 else "park"]
    edge_x = 0.0 if side < 0 else float(st.w)
    walk = st.walk_l if side < 0 else st.walk_r
    z = NEAR_Z * (walk - st.vx) / (edge_x - st.vx)  # distance shown at the image border
    far = NEAR_Z / 0.03
    segs = []
    while z < far:
        kind = str(rng.choice(kinds, p=probs))
        length = rng.uniform(*LENGTHS[kind]) * (1 + z / 40)
        height = rng.uniform(*HEIGHTS[kind]) if kind in HEIGHTS else 0.0
        segs.append(_Segment(kind, z, z + length, height))
        z += length
    return segs


def _plane_columns(st: _Street, side: int, z0: float, z1: float) -> tuple[float, float]:
    walk = st.walk_l if side < 0 else st.walk_r
    xa = st.vx + (walk - st.vx) * NEAR_Z / z0
    xb = st.vx + (walk - st.vx) * NEAR_Z / z1
    return min(xa, xb), max(xa, xb)


def _draw_plane(cv: _Canvas, st: _Street, side: int, seg: _Segment) -> None:
    """A segment of the street-side plane: facade, wall, fence or hedge, in perspective."""
    x0, x1 = _plane_columns(st, side, seg.z0, seg.z1)
    walk = st.walk_l if side < 0 else st.walk_r
    s_max = NEAR_Z / seg.z0
    bottom = st.row(s_max)
    top = bottom - seg.height * st.metre(s_max)
    box = cv.box(min(top, st.hz), bottom + 1, x0, x1 + 1)
    if box is None:
        return
    yy, xx = box.grid()
    s = np.clip((xx - st.vx) / (walk - st.vx), 1e-3, None)  # (1, w)
    metre = METRE * st.h * s
    ground = st.row(s)
    hm = (ground - yy) / metre  # metres above ground, (h, w)
    z = NEAR_Z / s
    mask = (hm >= 0) & (hm <= seg.height) & (z >= seg.z0) & (z < seg.z1)
    texture = PLANE_TEXTURES[seg.kind](cv, box, z, hm, seg.height)
    cv.paint(box, PLANE_LABELS[seg.kind], texture, mask)


def _building_plane(
    cv: _Canvas, box: _Box, z: np.ndarray, hm: np.ndarray, height: float
) -> np.ndarray:
    """Facade in perspective: storeys of windows, ledges, shop windows and doors at street level."""
    rng = cv.rng
    base = _pick(rng, FACADE_COLOURS, 0.06)
    glass = _grey(rng, 0.08, 0.32) * np.array([0.9, 0.95, 1.1], np.float32)
    bay, storey = rng.uniform(2.5, 4.0), rng.uniform(3.0, 3.6)
    wf, sill, hf = rng.uniform(0.35, 0.6), rng.uniform(0.2, 0.35), rng.uniform(0.35, 0.5)
    ground_floor = rng.uniform(3.0, 4.0)
    h, w = box.shape
    out = base * (1 + 0.08 * _noise(rng, h, w, 0.05 * cv.h))[..., None]
    level = (hm - ground_floor) % storey / storey
    upper = (hm > ground_floor) & (hm < height - 0.8)
    win = ((z % bay) / bay < wf) & (level > sill) & (level < sill + hf) & upper
    ledge = (level < 0.05) & (hm > ground_floor - 0.1)
    out = np.where(ledge[..., None], base * 0.7, np.where(win[..., None], glass, out))
    street = (hm > 0.3) & (hm < ground_floor - 0.5)
    if rng.random() < 0.7:  # shop windows
        shop = street & ((z % (2 * bay)) / (2 * bay) < 0.7)
        out = np.where(shop[..., None], glass * 1.3, out)
    else:  # doors
        door = (hm < 2.2) & ((z % (3 * bay)) / (3 * bay) < 0.15)
        out = np.where(door[..., None], _pick(rng, [(0.3, 0.2, 0.12), (0.15, 0.15, 0.17)]), out)
    return np.where((hm > height - 0.4)[..., None], base * 0.75, out)


def _wall_plane(cv: _Canvas, box: _Box, z: np.ndarray, hm: np.ndarray, height: float) -> np.ndarray:
    rng = cv.rng
    base = _grey(rng, 0.45, 0.75) * np.array([1.0, rng.uniform(0.92, 1.0), rng.uniform(0.82, 1)])
    h, w = box.shape
    lum = 1 + 0.1 * _noise(rng, h, w, 0.03 * cv.h) + 0.04 * rng.standard_normal((h, w))
    course = rng.uniform(0.25, 0.5)
    shift = (np.floor(hm / course) % 2) * 0.45
    joints = ((hm % course) < 0.05) | (((z + shift) % 0.9) < 0.06)
    if rng.random() < 0.5:
        lum = lum - 0.25 * joints
    lum = np.where(hm > height - 0.15, lum * 1.15, lum)
    return (base * lum[..., None]).astype(np.float32)


def _fence_plane(
    cv: _Canvas, box: _Box, z: np.ndarray, hm: np.ndarray, height: float
) -> np.ndarray:
    """A lattice (chain link, bars or pickets) over the dimmed scene behind it."""
    rng = cv.rng
    bars = _pick(rng, [(0.35, 0.38, 0.35), (0.2, 0.3, 0.22), (0.45, 0.33, 0.22), (0.6, 0.6, 0.6)])
    style = int(rng.integers(3))
    pitch = rng.uniform(0.15, 0.35)
    if style == 0:  # chain link: diamonds
        lattice = (((z + hm) % pitch) < 0.3 * pitch) | (((z - hm) % pitch) < 0.3 * pitch)
    elif style == 1:  # vertical bars and two rails
        lattice = ((z % pitch) < 0.35 * pitch) | (np.abs(hm - 0.25) < 0.06)
    else:  # pickets
        lattice = (z % pitch) < 0.6 * pitch
    lattice = lattice | ((z % 2.5) < 0.12) | (hm > height - 0.08)
    behind = cv.img[box.slices] * rng.uniform(0.6, 0.85)
    return np.where(lattice[..., None], bars, behind).astype(np.float32)


def _hedge_plane(
    cv: _Canvas, box: _Box, z: np.ndarray, hm: np.ndarray, height: float
) -> np.ndarray:
    return _foliage(cv.rng, 0.03 * cv.h)(box.shape)


PLANE_TEXTURES = {
    "building": _building_plane,
    "wall": _wall_plane,
    "fence": _fence_plane,
    "hedge": _hedge_plane,
}
PLANE_LABELS = {"building": BUILDING, "wall": WALL, "fence": FENCE, "hedge": VEGETATION}


def _draw_near_tree(cv: _Canvas, st: _Street, side: int) -> None:
    """A big tree close to the camera on a park side; its crown covers an upper corner."""
    rng = cv.rng
    t = rng.uniform(0.45, 0.9)
    x = st.x_at(st.walk_l if side < 0 else st.walk_r, t)
    _draw_tree(cv, x, st.row(t), st.metre(t))


def _draw_tree(cv: _Canvas, x: float, yb: float, metre: float) -> None:
    rng = cv.rng
    trunk_h = rng.uniform(2.0, 3.5) * metre
    trunk = _pick(rng, [(0.3, 0.22, 0.15), (0.4, 0.36, 0.3), (0.22, 0.2, 0.18)])
    cv.rect(yb - trunk_h, yb, x - 0.15 * metre, x + 0.15 * metre, VEGETATION, trunk)
    radius = rng.uniform(1.8, 3.5) * metre
    _draw_tree_crown(cv, x, yb - trunk_h - 0.7 * radius, radius)


# --------------------------------------------------------------------------- objects
_Draw = Callable[..., None]  # (canvas, x, ground row, pixels per metre)


@dataclass(frozen=True)
class _Kind:
    """How many objects of a kind a frame gets, how far away and where they stand."""

    draw: _Draw
    count: tuple[int, int]  # half-open range of the number per frame
    depth: tuple[float, float]  # range of perspective scale t (0 horizon, 1 bottom row)
    where: str = "walk"  # road | walk | kerb (road side of a sidewalk) | back (outer side)
    power: float = 1.5  # > 1 puts more objects far away, as in perspective


def _kinds(rare: frozenset[str]) -> list[_Kind]:
    kinds = [
        _Kind(_car, (2, 7), (0.07, 0.6), "road", 2.0),
        _Kind(_person, (2, 7), (0.12, 0.6)),
        _Kind(_person, (0, 2), (0.12, 0.6), "road"),
        _Kind(partial(_rider_on, motor=False), (1, 3), (0.15, 0.6), "road"),
        _Kind(partial(_rider_on, motor=False), (0, 2), (0.15, 0.6)),
        _Kind(partial(_parked_bike, motor=False), (0, 3), (0.15, 0.6), "kerb"),
        _Kind(partial(_pole, fitting="sign"), (1, 3), (0.15, 0.6), "kerb", 1.0),
        _Kind(partial(_pole, fitting="light"), (1, 3), (0.15, 0.6), "kerb", 1.0),
        _Kind(partial(_pole, fitting="none"), (0, 3), (0.15, 0.6), "kerb", 1.0),
        _Kind(_draw_tree, (0, 4), (0.15, 0.7), "back"),
        _Kind(_void_object, (0, 4), (0.1, 0.7), "back"),
    ]
    rare_kinds = {
        "truck": [_Kind(_truck, (1, 3), (0.1, 0.4), "road", 2.0)],
        "bus": [_Kind(_bus, (1, 2), (0.1, 0.4), "road", 2.0)],
        "train": [_Kind(_train, (1, 2), (0.1, 0.25), "road", 1.0)],
        "motorcycle": [
            _Kind(partial(_rider_on, motor=True), (1, 2), (0.15, 0.6), "road"),
            _Kind(partial(_parked_bike, motor=True), (0, 2), (0.15, 0.6), "kerb"),
        ],
    }
    return kinds + [k for name in sorted(rare) for k in rare_kinds[name]]


def _scene_objects(cv: _Canvas, st: _Street, rare: frozenset[str]) -> list[Callable[[], None]]:
    """Drawing calls of every object standing on the ground, far ones first."""
    rng = cv.rng
    items: list[tuple[float, Callable[[], None]]] = []
    for kind in _kinds(rare):
        for _ in range(int(rng.integers(*kind.count))):
            lo, hi = kind.depth
            t = lo + (hi - lo) * rng.random() ** kind.power
            x = _place(rng, st, kind.where, t)
            items.append((st.row(t), partial(kind.draw, cv, x, st.row(t), st.metre(t))))
    items.sort(key=lambda item: item[0])
    return [draw for _, draw in items]


def _place(rng: np.random.Generator, st: _Street, where: str, t: float) -> float:
    if where == "road":
        return st.on_road(rng, t)
    lo, hi = {"walk": (0.1, 0.9), "kerb": (0.05, 0.35), "back": (0.6, 0.95)}[where]
    return st.on_walk(rng, t, int(rng.choice([-1, 1])), lo, hi)


def _spoked_wheel(cv: _Canvas, cy: float, cx: float, r: float, label: int, tyre: np.ndarray):
    """A thin tyre with spokes; as in Cityscapes, the see-through inside belongs to the wheel."""
    box = cv.box(cy - r, cy + r, cx - r, cx + r)
    if box is not None:
        yy, xx = box.grid()
        inside = (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r
        cv.paint(box, label, cv.img[box.slices] * np.float32(0.8), inside)
    cv.ring(cy, cx, r, max(0.18 * r, 1.0), label, tyre)
    for a in cv.rng.uniform(0, np.pi, 2):
        dy, dx = r * np.sin(a), r * np.cos(a)
        cv.segment((cy - dy, cx - dx), (cy + dy, cx + dx), 0.03 * r, label, tyre * 2 + 0.3)


def _wheel(cv: _Canvas, cy: float, cx: float, r: float, label: int) -> None:
    cv.ellipse(cy, cx, r, r, label, _grey(cv.rng, 0.04, 0.12))
    cv.ellipse(cy, cx, 0.45 * r, 0.45 * r, label, _grey(cv.rng, 0.35, 0.6))


def _car(cv: _Canvas, x: float, yb: float, m: float) -> None:
    rng = cv.rng
    side = rng.random() < 0.5
    w = (rng.uniform(3.8, 4.8) if side else rng.uniform(1.7, 1.9)) * m
    h = rng.uniform(1.4, 1.6) * m
    body = _pick(rng, CAR_COLOURS, 0.06)
    glass = _grey(rng, 0.05, 0.25)
    x0 = x - w / 2
    cv.rect(yb - 0.62 * h, yb - 0.12 * h, x0, x0 + w, CAR, body)
    if side:
        cabin = (x0 + 0.22 * w, x0 + 0.75 * w)
        cv.trapezoid(yb - h, yb - 0.6 * h, (cabin[0] + 0.12 * w, cabin[1] - 0.05 * w),
                     (cabin[0] - 0.05 * w, cabin[1] + 0.08 * w), CAR, body)  # fmt: skip
        cv.trapezoid(yb - 0.93 * h, yb - 0.63 * h, (cabin[0] + 0.14 * w, cabin[1] - 0.08 * w),
                     (cabin[0], cabin[1] + 0.04 * w), CAR, glass)  # fmt: skip
        for wx in (x0 + 0.2 * w, x0 + 0.8 * w):
            _wheel(cv, yb - 0.18 * h, wx, 0.2 * h, CAR)
    else:
        cv.trapezoid(yb - h, yb - 0.6 * h, (x0 + 0.15 * w, x0 + 0.85 * w), (x0 + 0.04 * w,
                     x0 + 0.96 * w), CAR, body)  # fmt: skip
        cv.trapezoid(yb - 0.93 * h, yb - 0.64 * h, (x0 + 0.2 * w, x0 + 0.8 * w),
                     (x0 + 0.1 * w, x0 + 0.9 * w), CAR, glass)  # fmt: skip
        lamp = np.array([0.85, 0.1, 0.08], np.float32)
        for lx in (x0 + 0.03 * w, x0 + 0.82 * w):
            cv.rect(yb - 0.5 * h, yb - 0.4 * h, lx, lx + 0.15 * w, CAR, lamp)
        for wx in (x0, x0 + 0.86 * w):
            cv.rect(yb - 0.15 * h, yb, wx, wx + 0.14 * w, CAR, _grey(rng, 0.03, 0.1))


def _truck(cv: _Canvas, x: float, yb: float, m: float) -> None:
    rng = cv.rng
    h = rng.uniform(3.2, 3.9) * m
    box_colour = _pick(rng, [(0.9, 0.9, 0.88), (0.6, 0.6, 0.62), (0.2, 0.3, 0.55), (0.7, 0.2, 0.1)])
    cab_colour = _pick(rng, CAR_COLOURS, 0.05)
    glass = _grey(rng, 0.05, 0.25)
    if rng.random() < 0.6:  # side view: cab + cargo box
        length = rng.uniform(6, 9) * m
        cab = 2.2 * m
        x0 = x - length / 2
        d = int(rng.choice([-1, 1]))
        cab_x = x0 if d < 0 else x0 + length - cab
        cv.rect(yb - 0.8 * h, yb - 0.15 * h, cab_x, cab_x + cab, TRUCK, cab_colour)
        cv.rect(yb - 0.75 * h, yb - 0.5 * h, cab_x + 0.15 * cab, cab_x + 0.85 * cab, TRUCK, glass)
        bx = x0 + cab if d < 0 else x0
        cv.rect(yb - h, yb - 0.2 * h, bx, bx + length - cab, TRUCK, box_colour)
        cv.rect(yb - 0.22 * h, yb - 0.15 * h, x0, x0 + length, TRUCK, _grey(rng, 0.1, 0.2))
        for f in (0.12, 0.35, 0.8, 0.92):
            _wheel(cv, yb - 0.13 * h, x0 + f * length, 0.13 * h, TRUCK)
    else:  # rear view: tall box with doors
        w = rng.uniform(2.4, 2.6) * m
        x0 = x - w / 2
        cv.rect(yb - h, yb - 0.18 * h, x0, x0 + w, TRUCK, box_colour)
        cv.rect(yb - 0.95 * h, yb - 0.25 * h, x + -0.02 * w, x + 0.02 * w, TRUCK, box_colour * 0.6)
        cv.rect(yb - 0.2 * h, yb - 0.14 * h, x0, x0 + w, TRUCK, _grey(rng, 0.1, 0.2))
        for wx in (x0 + 0.05 * w, x0 + 0.75 * w):
            cv.rect(yb - 0.14 * h, yb, wx, wx + 0.2 * w, TRUCK, _grey(rng, 0.03, 0.1))


def _bus(cv: _Canvas, x: float, yb: float, m: float) -> None:
    rng = cv.rng
    h = rng.uniform(3.0, 3.3) * m
    body = _pick(rng, BUS_COLOURS, 0.05)
    glass = _grey(rng, 0.05, 0.22)
    if rng.random() < 0.65:  # side view: long, a band of windows, doors
        length = rng.uniform(10, 13) * m
        x0 = x - length / 2
        cv.rect(yb - h, yb - 0.08 * h, x0, x0 + length, BUS, body)
        cv.rect(yb - 0.85 * h, yb - 0.5 * h, x0 + 0.03 * length, x0 + 0.97 * length, BUS, glass)
        for f in np.arange(0.03, 0.97, 0.09):
            cv.rect(yb - 0.85 * h, yb - 0.5 * h, x0 + f * length, x0 + (f + 0.008) * length, BUS,
                    body)  # fmt: skip
        for f in (0.1, 0.5):
            cv.rect(yb - 0.85 * h, yb - 0.1 * h, x0 + f * length, x0 + (f + 0.08) * length, BUS,
                    glass * 1.3)  # fmt: skip
        for f in (0.2, 0.78):
            _wheel(cv, yb - 0.14 * h, x0 + f * length, 0.15 * h, BUS)
    else:  # front or rear view: big windscreen
        w = rng.uniform(2.5, 2.6) * m
        x0 = x - w / 2
        cv.rect(yb - h, yb - 0.05 * h, x0, x0 + w, BUS, body)
        cv.rect(yb - 0.88 * h, yb - 0.4 * h, x0 + 0.06 * w, x0 + 0.94 * w, BUS, glass)
        cv.rect(yb - 0.97 * h, yb - 0.9 * h, x0 + 0.2 * w, x0 + 0.8 * w, BUS, _grey(rng, 0.1, 0.2))
        for wx in (x0 + 0.05 * w, x0 + 0.75 * w):
            cv.rect(yb - 0.1 * h, yb, wx, wx + 0.2 * w, BUS, _grey(rng, 0.03, 0.1))


def _train(cv: _Canvas, x: float, yb: float, m: float) -> None:
    """A tram in side view: long articulated cars, window band, skirt and pantograph."""
    rng = cv.rng
    h = rng.uniform(3.3, 3.7) * m
    length = rng.uniform(20, 35) * m
    body = _pick(rng, [(0.75, 0.15, 0.12), (0.85, 0.85, 0.85), (0.85, 0.75, 0.2), (0.2, 0.3, 0.6)])
    glass = _grey(rng, 0.05, 0.22)
    x0 = x - length / 2
    cv.rect(yb - h, yb, x0, x0 + length, TRAIN, body)
    cv.rect(yb - 0.2 * h, yb, x0, x0 + length, TRAIN, _grey(rng, 0.1, 0.3))
    cv.rect(yb - 0.82 * h, yb - 0.45 * h, x0 + 0.02 * length, x0 + 0.98 * length, TRAIN, glass)
    for jx in np.arange(x0 + 2 * m, x0 + length, rng.uniform(1.2, 1.8) * m):
        cv.rect(yb - 0.82 * h, yb - 0.45 * h, jx, jx + 0.25 * m, TRAIN, body)
    for jx in np.arange(x0 + 8 * m, x0 + length - 2 * m, 8 * m):
        cv.rect(yb - h, yb - 0.05 * h, jx, jx + 0.5 * m, TRAIN, _grey(rng, 0.05, 0.2))
    px = x0 + rng.uniform(0.3, 0.6) * length
    top = yb - h
    cv.segment((top, px - 0.8 * m), (top - 0.7 * m, px), 0.06 * m, TRAIN, _grey(rng, 0.1, 0.3))
    cv.segment((top - 0.7 * m, px - 0.6 * m), (top - 0.7 * m, px + 0.6 * m), 0.06 * m, TRAIN,
               _grey(rng, 0.1, 0.3))  # fmt: skip


def _person(cv: _Canvas, x: float, yb: float, m: float) -> None:
    rng = cv.rng
    h = rng.uniform(1.55, 1.95) * m
    shirt, pants, skin = _pick(rng, CLOTHES), _pick(rng, CLOTHES[:5], 0.04), _pick(rng, SKINS)
    stride = rng.uniform(-0.12, 0.12) * h
    leg = 0.065 * h
    hip = yb - 0.48 * h
    cv.segment((hip, x - 0.04 * h), (yb - leg, x - 0.04 * h - stride), leg, PERSON, pants)
    cv.segment((hip, x + 0.04 * h), (yb - leg, x + 0.04 * h + stride), leg, PERSON, pants)
    cv.trapezoid(yb - 0.82 * h, hip + 0.02 * h, (x - 0.13 * h, x + 0.13 * h),
                 (x - 0.115 * h, x + 0.115 * h), PERSON, shirt)  # fmt: skip
    for sx in (-1, 1):
        cv.segment((yb - 0.8 * h, x + sx * 0.12 * h), (yb - 0.5 * h, x + sx * 0.15 * h),
                   0.04 * h, PERSON, shirt)  # fmt: skip
    cv.ellipse(yb - 0.9 * h, x, 0.07 * h, 0.055 * h, PERSON, skin)
    if rng.random() < 0.5:  # hair or hat
        cv.ellipse(yb - 0.93 * h, x, 0.045 * h, 0.058 * h, PERSON, _pick(rng, CLOTHES[:5]))
    if rng.random() < 0.3:  # bag
        cv.rect(yb - 0.6 * h, yb - 0.42 * h, x + 0.1 * h, x + 0.22 * h, PERSON, _pick(rng, CLOTHES))


def _bicycle(cv: _Canvas, x: float, yb: float, m: float, d: int) -> tuple[float, float]:
    """Side-view bicycle facing ``d`` (±1); returns the (y, x) of its saddle."""
    rng = cv.rng
    r = 0.34 * m
    frame = _pick(rng, CLOTHES + CAR_COLOURS, 0.05)
    tyre = _grey(rng, 0.03, 0.12)
    rear, front = (yb - r, x - d * 0.52 * m), (yb - r, x + d * 0.52 * m)
    for cy, cx in (rear, front):
        _spoked_wheel(cv, cy, cx, r, BICYCLE, tyre)
    tube = max(0.04 * m, 0.5)
    saddle = (yb - 0.95 * m, x - d * 0.2 * m)
    crank = (yb - 0.3 * m, x)
    head = (yb - 0.9 * m, x + d * 0.4 * m)
    for a, b in ((rear, crank), (rear, saddle), (saddle, crank), (crank, head), (saddle, head),
                 (head, front)):  # fmt: skip
        cv.segment(a, b, tube, BICYCLE, frame)
    cv.segment(head, (head[0] - 0.1 * m, head[1] - d * 0.1 * m), tube * 1.2, BICYCLE, tyre)
    return saddle


def _motorcycle(cv: _Canvas, x: float, yb: float, m: float, d: int) -> tuple[float, float]:
    """Side-view motorcycle facing ``d`` (±1); returns the (y, x) of its seat."""
    rng = cv.rng
    r = 0.31 * m
    body = _pick(rng, CAR_COLOURS + BUS_COLOURS, 0.05)
    for cx in (x - d * 0.7 * m, x + d * 0.7 * m):
        _wheel(cv, yb - r, cx, r, MOTORCYCLE)
    cv.ellipse(yb - 0.62 * m, x + d * 0.05 * m, 0.3 * m, 0.65 * m, MOTORCYCLE, body)
    cv.ellipse(yb - 0.45 * m, x - d * 0.05 * m, 0.18 * m, 0.3 * m, MOTORCYCLE, _grey(rng, 0.1, 0.3))
    cv.ellipse(yb - 0.82 * m, x + d * 0.2 * m, 0.14 * m, 0.3 * m, MOTORCYCLE, body * 0.8)
    cv.segment((yb - r, x + d * 0.7 * m), (yb - 1.05 * m, x + d * 0.5 * m), 0.05 * m, MOTORCYCLE,
               _grey(rng, 0.3, 0.6))  # fmt: skip
    cv.rect(yb - 0.93 * m, yb - 0.83 * m, x - d * 0.45 * m, x - d * 0.05 * m, MOTORCYCLE,
            _grey(rng, 0.02, 0.1))  # fmt: skip
    return yb - 0.9 * m, x - d * 0.25 * m


def _rider_on(cv: _Canvas, x: float, yb: float, m: float, motor: bool) -> None:
    """A rider sitting on a bicycle or motorcycle, leaning towards the handlebar."""
    rng = cv.rng
    d = int(rng.choice([-1, 1]))
    seat = (_motorcycle if motor else _bicycle)(cv, x, yb, m, d)
    shirt, pants, skin = _pick(rng, CLOTHES), _pick(rng, CLOTHES[:5], 0.04), _pick(rng, SKINS)
    hip = (seat[0] - 0.05 * m, seat[1])
    lean = rng.uniform(0.1, 0.35) if not motor else rng.uniform(0.2, 0.4)
    shoulder = (hip[0] - 0.6 * m, hip[1] + d * lean * m)
    knee = (hip[0] + 0.15 * m, hip[1] + d * 0.35 * m)
    foot = (yb - 0.25 * m, x + d * 0.15 * m)
    cv.segment(hip, knee, 0.09 * m, RIDER, pants)
    cv.segment(knee, foot, 0.07 * m, RIDER, pants)
    cv.segment(hip, shoulder, 0.18 * m, RIDER, shirt)
    cv.segment(shoulder, (yb - 0.95 * m, x + d * 0.45 * m), 0.06 * m, RIDER, shirt)
    head = (shoulder[0] - 0.22 * m, shoulder[1] + d * 0.05 * m)
    helmet = motor or rng.random() < 0.4
    colour = _pick(rng, CAR_COLOURS + BUS_COLOURS) if helmet else skin
    cv.ellipse(head[0], head[1], 0.13 * m, 0.12 * m, RIDER, colour)


def _parked_bike(cv: _Canvas, x: float, yb: float, m: float, motor: bool) -> None:
    d = int(cv.rng.choice([-1, 1]))
    (_motorcycle if motor else _bicycle)(cv, x, yb, m, d)


def _pole(cv: _Canvas, x: float, yb: float, m: float, fitting: str) -> None:
    """A pole carrying a traffic sign, a traffic light (maybe on an arm) or nothing."""
    rng = cv.rng
    metal = _grey(rng, 0.25, 0.65) if rng.random() < 0.8 else _pick(rng, [(0.2, 0.3, 0.25)])
    height = rng.uniform(3.5, 8)
    half = max(0.075 * m, 0.5)
    cv.rect(yb - height * m, yb, x - half, x + half, POLE, _pole_shade(metal))
    if fitting == "sign":
        _sign(cv, yb - rng.uniform(2.2, min(4.0, height - 0.4)) * m, x, m)
    elif fitting == "light" and rng.random() < 0.3:  # on an arm over the road
        arm_y = yb - (min(height, 6.0) - 0.3) * m
        lx = x + int(rng.choice([-1, 1])) * rng.uniform(2, 5) * m
        cv.rect(arm_y, arm_y + 2 * half, min(x, lx), max(x, lx), POLE, metal)
        _traffic_light(cv, arm_y, lx, m)
    elif fitting == "light":
        _traffic_light(cv, yb - rng.uniform(2.8, min(4.5, height - 0.2)) * m, x, m)


def _pole_shade(metal: np.ndarray) -> Callable[[tuple[int, int]], np.ndarray]:
    def texture(shape: tuple[int, int]) -> np.ndarray:
        u = np.linspace(-1, 1, shape[1], dtype=np.float32) if shape[1] > 1 else np.zeros(1)
        return np.broadcast_to(metal * (1.15 - 0.3 * u**2)[None, :, None], (*shape, 3))

    return texture


SIGN_STYLES: list[tuple[str, RGB, RGB]] = [
    ("circle", (0.8, 0.1, 0.1), (0.95, 0.95, 0.95)),  # prohibition
    ("circle", (0.1, 0.25, 0.7), (0.1, 0.25, 0.7)),  # mandatory
    ("triangle", (0.8, 0.1, 0.1), (0.95, 0.95, 0.95)),  # warning
    ("square", (0.1, 0.25, 0.7), (0.95, 0.95, 0.95)),  # information
    ("diamond", (0.95, 0.95, 0.95), (0.95, 0.8, 0.1)),  # priority road
    ("square", (0.55, 0.55, 0.55), (0.55, 0.55, 0.55)),  # back of a sign
]


def _sign(cv: _Canvas, cy: float, cx: float, m: float) -> None:
    rng = cv.rng
    shape, rim, face = SIGN_STYLES[int(rng.integers(len(SIGN_STYLES)))]
    rim_c, face_c = np.asarray(rim, np.float32), np.asarray(face, np.float32)
    r = rng.uniform(0.35, 0.5) * m
    inner = 0.7 * r
    if shape == "circle":
        cv.ellipse(cy, cx, r, r, SIGN, rim_c)
        cv.ellipse(cy, cx, inner, inner, SIGN, face_c)
    elif shape == "triangle":
        cv.trapezoid(cy - r, cy + 0.7 * r, (cx - 0.5, cx + 0.5), (cx - r, cx + r), SIGN, rim_c)
        cv.trapezoid(cy - 0.5 * r, cy + 0.45 * r, (cx - 0.5, cx + 0.5), (cx - 0.6 * r,
                     cx + 0.6 * r), SIGN, face_c)  # fmt: skip
    elif shape == "diamond":
        point, wide = (cx - 0.5, cx + 0.5), (cx - r, cx + r)
        cv.trapezoid(cy - r, cy, point, wide, SIGN, rim_c)
        cv.trapezoid(cy, cy + r, wide, point, SIGN, rim_c)
        cv.ellipse(cy, cx, 0.45 * r, 0.45 * r, SIGN, face_c)
    else:
        cv.rect(cy - r, cy + r, cx - 1.2 * r, cx + 1.2 * r, SIGN, rim_c)
        cv.rect(cy - inner, cy + inner, cx - 1.2 * inner, cx + 1.2 * inner, SIGN, face_c)


LAMPS: list[RGB] = [(1.0, 0.15, 0.1), (1.0, 0.7, 0.1), (0.2, 1.0, 0.55)]


def _traffic_light(cv: _Canvas, top: float, cx: float, m: float) -> None:
    """A dark housing with three lamps, one of them lit."""
    rng = cv.rng
    w, h = 0.42 * m, 1.05 * m
    housing = _grey(rng, 0.05, 0.2) if rng.random() < 0.8 else _pick(rng, [(0.6, 0.5, 0.1)])
    cv.rect(top, top + h, cx - w / 2, cx + w / 2, LIGHT, housing)
    lit = int(rng.integers(3))
    for i, lamp in enumerate(LAMPS):
        colour = np.asarray(lamp, np.float32) * (1.0 if i == lit else 0.2)
        cv.ellipse(top + (0.18 + 0.32 * i) * h, cx, 0.12 * m, 0.12 * m, LIGHT, colour)


def _void_object(cv: _Canvas, x: float, yb: float, m: float) -> None:
    """Void clutter on the sidewalk: static (bins, boxes) or dynamic (carts) objects."""
    rng = cv.rng
    colour = _pick(rng, CLOTHES + CAR_COLOURS, 0.08)
    w, h = rng.uniform(0.5, 1.2) * m, rng.uniform(0.6, 1.3) * m
    if rng.random() < 0.6:
        cv.rect(yb - h, yb, x - w / 2, x + w / 2, STATIC, colour)
        cv.rect(yb - h, yb - 0.9 * h, x - 0.55 * w, x + 0.55 * w, STATIC, colour * 0.7)
    else:
        cv.rect(yb - h, yb - 0.2 * h, x - w / 2, x + w / 2, DYNAMIC, colour)
        for wx in (x - 0.35 * w, x + 0.35 * w):
            cv.ellipse(yb - 0.1 * h, wx, 0.1 * h, 0.1 * h, DYNAMIC, _grey(rng, 0.02, 0.1))


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
