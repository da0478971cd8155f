"""The street in perspective (horizon, vanishing column, road and sidewalk edges) and the
ground it lies on: road with lane markings, sidewalks with kerbs, terrain and grass verges."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from shards.synth.canvas import _Box, _Canvas, _crop, _grass, _grey, _noise, _pick
from shards.synth.palette import PAVINGS, ROAD, SIDEWALK, TERRAIN

#: Pixels per metre at the bottom image row, as a fraction of the image height.
METRE = 0.42
#: Distance (metres) of the sidewalk's outer edge point at the bottom image row.
NEAR_Z = 4.0


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
