"""Validation curves of one or more runs as one PNG (matplotlib), from their ``metrics.csv``.

One column per run: the top panel shows the mIoU of every task set the run covers on one split
(``heldout`` by default) over the epochs (dotted: the teacher's final values), the bottom panel
the training losses and, for an incremental stage, the distillation diagnostic (argmax
agreement with the teacher and the old-class probability mass at unlabelled pixels; see
:mod:`cil_dist.training.validation`).
"""

from __future__ import annotations

import csv
from collections import defaultdict
from pathlib import Path

from cil_dist.training.run_folder import METRICS_CSV

Series = dict[str, list[tuple[int, float]]]


def read_series(run_dir: Path, split: str) -> tuple[Series, Series]:
    """``(task-set mIoU series of split, training series)`` of a run folder, by name."""
    curves: Series = defaultdict(list)
    train: Series = defaultdict(list)
    path = Path(run_dir) / METRICS_CSV
    if not path.is_file():
        return {}, {}
    with path.open(newline="") as stream:
        for row in csv.DictReader(stream):
            point = (int(row["epoch"]), float(row["value"]))
            if row["split"] == split and row["name"].endswith("/mIoU"):
                curves[row["name"].removesuffix("/mIoU")].append(point)
            elif row["split"] == "train" and row["name"] in TRAIN_SERIES:
                train[row["name"]].append(point)
    return dict(curves), dict(train)


TRAIN_SERIES = ("ce", "kd", "distill/agreement", "distill/old_mass")


def plot_runs(
    runs: dict[str, Path],
    out: Path,
    split: str = "heldout",
    title: str = "",
    teachers: dict[str, Path] | None = None,
) -> Path:
    """Write the curves of ``runs`` (label → run folder) to ``out`` (PNG) and return it.

    ``teachers`` (label → the teacher's run folder) adds, dotted, the teacher's last value of
    each task set both cover: what an incremental stage has to keep."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series = {label: read_series(path, split) for label, path in runs.items()}
    series = {label: s for label, s in series.items() if s[0] or s[1]}
    if not series:
        raise ValueError(f"no {METRICS_CSV} with curves in {', '.join(map(str, runs.values()))}")
    columns = len(series)
    figure, axes = plt.subplots(
        2, columns, figsize=(3.6 * columns, 6.0), squeeze=False, sharex="col"
    )
    for column, (label, (curves, train)) in enumerate(series.items()):
        top, bottom = axes[0][column], axes[1][column]
        teacher = (
            read_series((teachers or {})[label], split)[0] if label in (teachers or {}) else {}
        )
        for task_set, points in sorted(curves.items(), key=lambda kv: (len(kv[0]), kv[0])):
            epochs, values = zip(*points, strict=True)
            (line,) = top.plot(
                epochs, [100 * v for v in values], marker=".", label=f"task {task_set}"
            )
            if teacher.get(task_set):
                top.axhline(100 * teacher[task_set][-1][1], color=line.get_color(), ls=":")
        top.set_title(label, fontsize=10)
        top.set_ylim(0, 100)
        top.grid(alpha=0.3)
        if curves:
            top.legend(fontsize=7, loc="lower right")
        if column == 0:
            top.set_ylabel(f"{split} mIoU (%)")
            bottom.set_ylabel("loss / fraction")
        for name in TRAIN_SERIES:
            if name in train and any(value for _, value in train[name]):  # kd is 0 without KD
                epochs, values = zip(*train[name], strict=True)
                style = "--" if name.startswith("distill/") else "-"
                bottom.plot(epochs, values, style, label=name.removeprefix("distill/"))
        bottom.set_xlabel("epoch")
        bottom.grid(alpha=0.3)
        if any(name in train for name in TRAIN_SERIES):
            bottom.legend(fontsize=7, loc="upper right")
    if title:
        figure.suptitle(title, fontsize=11)
    figure.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(out, dpi=110)
    plt.close(figure)
    return out
