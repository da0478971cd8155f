"""Pictures: Cityscapes colours for predictions and labels, overlays, side-by-side grids."""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw

from cil_dist import labels


def _channel_table(class_names: list[str], values) -> np.ndarray:
    table = np.zeros((256, *np.shape(values(class_names[0]))), dtype=np.uint8)
    for channel, name in enumerate(class_names):
        table[channel] = values(name)
    return table


def colorize(channel_map: np.ndarray, class_names: list[str]) -> np.ndarray:
    """(H, W) channel ids (255 = none) → (H, W, 3) Cityscapes colours; unknown is black."""
    table = _channel_table(class_names, lambda n: labels.by_name(n).color)
    return table[channel_map.astype(np.uint8)]


def channels_to_label_ids(channel_map: np.ndarray, class_names: list[str]) -> np.ndarray:
    """(H, W) channel ids → Cityscapes label ids (255 → 0, 'unlabeled')."""
    table = np.zeros(256, dtype=np.uint8)
    for channel, name in enumerate(class_names):
        table[channel] = labels.by_name(name).id
    return table[channel_map.astype(np.uint8)]


def label_ids_to_color(label_ids: np.ndarray) -> np.ndarray:
    """(H, W) Cityscapes label ids → (H, W, 3) colours of the official label table."""
    table = np.zeros((256, 3), dtype=np.uint8)
    for label in labels.labels:
        if 0 <= label.id < 256:
            table[label.id] = label.color
    return table[label_ids.astype(np.uint8)]


def overlay(image: np.ndarray, color: np.ndarray, alpha: float = 0.5) -> np.ndarray:
    """Blend a colour map onto an RGB image."""
    if image.shape[:2] != color.shape[:2]:
        image = np.asarray(Image.fromarray(image).resize(color.shape[1::-1], Image.BILINEAR))
    return (image.astype(np.float32) * (1 - alpha) + color * alpha).astype(np.uint8)


def side_by_side(rows: list[list[np.ndarray]], titles: list[str] | None = None) -> np.ndarray:
    """A grid of equally sized RGB tiles, one row per frame, captions above the columns."""
    height, width = rows[0][0].shape[:2]
    caption = 14 if titles else 0
    columns = max(len(row) for row in rows)
    canvas = Image.new("RGB", (columns * width, caption + len(rows) * height), "white")
    draw = ImageDraw.Draw(canvas)
    for c, title in enumerate(titles or []):
        draw.text((c * width + 3, 1), title, fill="black")
    for r, row in enumerate(rows):
        for c, tile in enumerate(row):
            tile_image = Image.fromarray(tile).resize((width, height), Image.NEAREST)
            canvas.paste(tile_image, (c * width, caption + r * height))
    return np.asarray(canvas)
