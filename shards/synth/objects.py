"""Objects standing on the ground, and how many of each a frame gets and where: vehicles,
persons, riders on bicycles and motorcycles, poles with traffic signs and lights, void clutter."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import numpy as np

from shards.synth.canvas import _Canvas, _grey, _pick
from shards.synth.palette import (
    BICYCLE,
    BUS,
    BUS_COLOURS,
    CAR,
    CAR_COLOURS,
    CLOTHES,
    DYNAMIC,
    LIGHT,
    MOTORCYCLE,
    PERSON,
    POLE,
    RGB,
    RIDER,
    SIGN,
    SKINS,
    STATIC,
    TRAIN,
    TRUCK,
)
from shards.synth.scenery import _draw_tree
from shards.synth.street import _Street

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
