"""Label ids of the Cityscapes classes, their official palette and the colour palettes that
objects and surfaces are painted from."""

from __future__ import annotations

import numpy as np
from cityscapesscripts.helpers.labels import labels as cs_labels

from cil_dist import labels


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


RGB = tuple[float, float, float]

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
