"""What lines the street: sky and distant buildings, the street-side planes (facades, walls,
fences, hedges) along both sidewalks, and trees."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from shards.synth.canvas import _Box, _Canvas, _foliage, _grey, _noise, _pick
from shards.synth.palette import BUILDING, FACADE_COLOURS, FENCE, SKY, VEGETATION, WALL
from shards.synth.street import METRE, NEAR_Z, _Street


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
