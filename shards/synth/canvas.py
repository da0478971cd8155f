"""Drawing primitives: the canvas that paints colour, label and object id together, shapes,
smooth noise, colour picking and the textures shared by several surfaces (foliage, grass)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from shards.synth.palette import GREENS, GROUNDS, RGB

#: Relative luminance noise of drawn objects (large textured regions bring their own).
OBJECT_GRAIN = 0.03

Colour = np.ndarray | Callable[[tuple[int, int]], np.ndarray]
Span = tuple[float, float]  # (x left, x right)
Point = tuple[float, float]  # (y, x)


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
