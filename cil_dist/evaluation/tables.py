"""The paper-shaped markdown tables of mIoU per task set and of per-class IoU (text only, no
torch: chain and sweep reports use them)."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any


def task_set_title(name: str) -> str:
    """``"12"`` → ``"Task 1∪2"``."""
    return "Task " + "∪".join(name) if name.isdigit() else name


def percent(value: float | None) -> str:
    """An mIoU in [0, 1] as the tables show it ("–" when missing)."""
    return "–" if value is None or math.isnan(value) else f"{100 * value:.1f}"


def format_paper_table(
    rows: dict[str, dict[str, Any]],
    task_sets=("1", "2", "12", "3", "123"),
    cell: Callable[[Any], str] = percent,
) -> str:
    """Markdown table of mIoU (%) per task set, one row per method, like the paper's
    (``cell`` formats each row's value of a task set, None where it has none)."""
    header = "| model | " + " | ".join(task_set_title(s) for s in task_sets) + " |"
    lines = [header, "|---" * (len(task_sets) + 1) + "|"]
    for method, values in rows.items():
        cells = [cell(values.get(name)) for name in task_sets]
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def format_class_table(results: dict[str, dict[str, Any]], class_names: list[str]) -> str:
    """Markdown table of per-class IoU (%) per evaluated task set."""
    sets = list(results)
    lines = ["| class | " + " | ".join(task_set_title(s) for s in sets) + " |"]
    lines.append("|---" * (len(sets) + 1) + "|")
    for name in class_names:
        cells = []
        for task_set in sets:
            ious = results[task_set]["iou"]
            value = ious.get(name)
            if name not in ious:
                cells.append("")
            elif value is None or math.isnan(value):  # null in metrics.json: NaN
                cells.append("–")
            else:
                cells.append(f"{100 * value:.1f}")
        if any(cells):
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
