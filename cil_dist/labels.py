"""The Cityscapes label table, taken from the maintained `cityscapesscripts` package.

Label ids 0..33 appear in ``gtFine/*_labelIds.png``; -1 (license plate) never does.
"""

from __future__ import annotations

from functools import cache

import numpy as np
from cityscapesscripts.helpers.labels import Label, labels, name2label

__all__ = [
    "IGNORE",
    "MAX_LABEL_ID",
    "Label",
    "by_id",
    "by_name",
    "checked_label_ids",
    "palette",
    "valid_label_ids",
]

MAX_LABEL_ID = max(label.id for label in labels)
IGNORE = 255  # target of pixels without a label: void, other tasks' classes, crop padding


def by_name(name: str) -> Label:
    """The Cityscapes label called ``name`` (e.g. ``"traffic light"``)."""
    try:
        return name2label[name]
    except KeyError:
        known = ", ".join(sorted(label.name for label in labels if label.trainId not in (-1, 255)))
        raise KeyError(
            f"unknown Cityscapes class {name!r}; evaluated classes are: {known}"
        ) from None


def by_id(label_id: int) -> Label:
    """The Cityscapes label with id ``label_id``."""
    for label in labels:
        if label.id == label_id:
            return label
    raise KeyError(f"unknown Cityscapes label id {label_id}")


@cache
def valid_label_ids() -> np.ndarray:
    """Boolean table over 0..255: True where the value is a Cityscapes label id."""
    valid = np.zeros(256, dtype=bool)
    for label in labels:
        if label.id >= 0:
            valid[label.id] = True
    return valid


def checked_label_ids(ids: np.ndarray, mode: str = "") -> np.ndarray:
    """``ids`` as a uint8 (H, W) array of Cityscapes label ids; ValueError saying what is wrong
    (not single-channel, or the values that are no label id). ``mode``: the PNG's, for the
    message."""
    if ids.ndim != 2:
        raise ValueError(f"label must be single-channel label ids, got mode {mode or ids.shape}")
    if ids.dtype != np.uint8:
        if ids.min() < 0 or ids.max() > 255:
            bad = sorted({int(v) for v in np.unique(ids) if not 0 <= v <= 255})
            raise ValueError(f"label ids {bad} are not Cityscapes label ids")
        ids = ids.astype(np.uint8)
    valid = valid_label_ids()
    if not valid[ids].all():
        bad = sorted(int(v) for v in np.unique(ids[~valid[ids]]))
        raise ValueError(f"label ids {bad} are not Cityscapes label ids")
    return ids


def palette(label_ids: list[int]) -> np.ndarray:
    """RGB colours (uint8, shape ``(len(label_ids), 3)``) of the given label ids."""
    return np.array([by_id(i).color for i in label_ids], dtype=np.uint8)
