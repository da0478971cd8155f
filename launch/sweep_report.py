"""The report of a sweep: the setting chosen on the held-out split, mean ± std over seeds.

``DIR/sweep.md`` holds one row per setting (its overrides without the seed; the seeds averaged):
the selection metric on the held-out split and the val columns of the same evaluation, each as
mean ± std (sample standard deviation over the seeds, shown when there are two or more); then
the setting chosen on the held-out metric — never on val — with its whole val table. The same
rows in ``DIR/sweep.csv``; ``DIR/sweep.png`` plots the held-out metric over the swept values
(matplotlib). Every setting's own chain report is written to ``DIR/settings/NN/results.md``.
"""

from __future__ import annotations

import csv
import json
import math
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cil_dist.evaluation.tables import format_paper_table, task_set_title
from cil_dist.protocol import TaskProtocol
from launch.chain import ChainConfig
from launch.report import write_report
from launch.sweep import Setting, SweepConfig, load_settings, selection_eval_name


@dataclass
class Group:
    """The settings that differ only by their seed."""

    label: str
    overrides: dict[str, Any]
    settings: list[Setting] = field(default_factory=list)


def groups_of(settings: list[Setting]) -> list[Group]:
    found: dict[str, Group] = {}
    for setting in settings:
        group = found.setdefault(setting.group, Group(setting.group, setting.without_seed))
        group.settings.append(setting)
    return list(found.values())


def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation of the values that exist (NaN when too few)."""
    known = [v for v in values if not math.isnan(v)]
    mean = statistics.fmean(known) if known else math.nan
    return mean, statistics.stdev(known) if len(known) > 1 else math.nan


def cell(values: list[float] | None) -> str:
    """Mean ± std (%) of one table cell over seeds."""
    mean, std = mean_std(values or [])
    if math.isnan(mean):
        return "–"
    return f"{100 * mean:.1f}" + (f" ± {100 * std:.1f}" if not math.isnan(std) else "")


def eval_metrics(run_dir: Path, setting: Setting, evaluation: str) -> dict[str, Any]:
    job = setting.job_names.get(evaluation, "")
    path = run_dir / "evals" / job / "metrics.json"
    return json.loads(path.read_text()) if job and path.is_file() else {}


def value(metrics: dict[str, Any], task_set: str, metric: str = "miou") -> float:
    found = metrics.get(task_set, {}).get(metric)
    return math.nan if found is None else float(found)


def primary_evaluation(sweep: SweepConfig, chain: ChainConfig) -> str:
    """The evaluation whose val columns the sweep compares: the selection's, else the row of
    the method under test, else the first report row."""
    if sweep.select.evaluation:
        return sweep.select.evaluation
    if chain.summary.method in chain.report:
        return chain.report[chain.summary.method]
    return next(iter(chain.report.values()), next(iter(chain.evaluations), ""))


def selection_set(sweep: SweepConfig, chain: ChainConfig, protocol: TaskProtocol) -> str:
    if sweep.select.task_set:
        return sweep.select.task_set
    sets = chain.evaluations[sweep.select.evaluation].task_sets or list(protocol.eval_task_sets)
    return max(sets, key=lambda name: len(protocol.eval_task_sets.get(name, ())))


@dataclass
class Row:
    """One group's figures: held-out values and val values per task set, one per seed."""

    group: Group
    heldout: list[float]
    val: dict[str, list[float]]


def collect_rows(
    run_dir: Path, sweep: SweepConfig, groups: list[Group], task_sets: list[str], set_name: str
) -> list[Row]:
    primary = primary_evaluation(sweep, groups[0].settings[0].chain)
    rows = []
    for group in groups:
        heldout, val = [], {name: [] for name in task_sets}
        for setting in group.settings:
            if sweep.select.evaluation:
                scored = eval_metrics(run_dir, setting, selection_eval_name(sweep.select))
                heldout.append(value(scored, set_name, sweep.select.metric))
            metrics = eval_metrics(run_dir, setting, primary)
            for name in task_sets:
                val[name].append(value(metrics, name))
        rows.append(Row(group, heldout, val))
    return rows


def best_row(rows: list[Row]) -> Row | None:
    scored = [r for r in rows if not math.isnan(mean_std(r.heldout)[0])]
    return max(scored, key=lambda r: mean_std(r.heldout)[0]) if scored else None


def mean_table(settings: list[Setting], run_dir: Path, task_sets: list[str]) -> str:
    """The chain's report table with mean ± std over ``settings`` in every cell."""
    rows = {}
    for label, evaluation in settings[0].chain.report.items():
        found = [eval_metrics(run_dir, s, evaluation) for s in settings]
        rows[label] = {name: [value(m, name) for m in found] for name in task_sets}
    return format_paper_table(rows, task_sets, cell)


def format_rows(rows: list[Row], sweep: SweepConfig, task_sets: list[str], set_name: str) -> str:
    selecting = bool(sweep.select.evaluation)
    head = ["setting", "seeds"]
    if selecting:
        head.append(f"{sweep.select.split} {sweep.select.metric} {task_set_title(set_name)}")
    head += [f"val {task_set_title(name)}" for name in task_sets]
    lines = ["| " + " | ".join(head) + " |", "|---" * len(head) + "|"]
    for row in rows:
        cells = [row.group.label, str(len(row.group.settings))]
        if selecting:
            cells.append(cell(row.heldout))
        cells += [cell(row.val[name]) for name in task_sets]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_csv(path: Path, rows: list[Row], sweep: SweepConfig, task_sets: list[str]) -> None:
    keys = list(dict.fromkeys(k for row in rows for k in row.group.overrides))
    columns = [*keys, "seeds"]
    if sweep.select.evaluation:
        columns += [f"{sweep.select.split}_mean", f"{sweep.select.split}_std"]
    for name in task_sets:
        columns += [f"val_{name}_mean", f"val_{name}_std"]
    with path.open("w", newline="") as stream:
        writer = csv.DictWriter(stream, fieldnames=columns)
        writer.writeheader()
        for row in rows:
            line: dict[str, Any] = {k: json.dumps(row.group.overrides.get(k)) for k in keys}
            line["seeds"] = len(row.group.settings)
            figures = {"val_" + name: row.val[name] for name in task_sets}
            if sweep.select.evaluation:
                figures = {sweep.select.split: row.heldout, **figures}
            for name, values in figures.items():
                mean, std = mean_std(values)
                line[f"{name}_mean"] = "" if math.isnan(mean) else f"{100 * mean:.4f}"
                line[f"{name}_std"] = "" if math.isnan(std) else f"{100 * std:.4f}"
            writer.writerow(line)


def write_plot(path: Path, rows: list[Row], sweep: SweepConfig, set_name: str) -> Path | None:
    """The held-out metric over the swept values: one line per value of the second swept key
    (bars per setting when more keys vary)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not sweep.select.evaluation or len(rows) < 2:
        return None
    keys = [  # the keys that vary between the settings
        key
        for key in rows[0].group.overrides
        if len({json.dumps(r.group.overrides.get(key)) for r in rows}) > 1
    ]
    fig, ax = plt.subplots(figsize=(6, 4))
    stats = [mean_std(r.heldout) for r in rows]
    if 1 <= len(keys) <= 2:
        x_key = keys[0]
        x_values = list(dict.fromkeys(json.dumps(r.group.overrides[x_key]) for r in rows))
        series: dict[str, list[tuple[int, float, float]]] = {}
        for row, (mean, std) in zip(rows, stats, strict=True):
            name = f"{keys[1]}={json.dumps(row.group.overrides[keys[1]])}" if len(keys) == 2 else ""
            position = x_values.index(json.dumps(row.group.overrides[x_key]))
            series.setdefault(name, []).append((position, 100 * mean, 100 * std))
        for name, points in series.items():
            xs, ys, es = zip(*sorted(points), strict=True)
            errors = [0.0 if math.isnan(e) else e for e in es]
            ax.errorbar(xs, ys, yerr=errors, marker="o", capsize=3, label=name or None)
        ax.set_xticks(range(len(x_values)), x_values)
        ax.set_xlabel(x_key)
        if len(keys) == 2:
            ax.legend()
    else:
        means = [100 * m for m, _ in stats]
        errors = [0.0 if math.isnan(s) else 100 * s for _, s in stats]
        ax.bar(range(len(rows)), means, yerr=errors, capsize=3)
        ax.set_xticks(range(len(rows)), [r.group.label for r in rows], rotation=60, ha="right")
    ax.set_ylabel(f"{sweep.select.split} {sweep.select.metric} {task_set_title(set_name)} (%)")
    ax.set_title(f"{sweep.name}: {sweep.select.evaluation} on {sweep.select.split}")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def write_sweep_report(run_dir: Path) -> str:
    """Write ``sweep.md``, ``sweep.csv``, ``sweep.png`` and every setting's chain report;
    return the selection table and the choice (settings without results show dashes)."""
    sweep, settings = load_settings(run_dir)
    for setting in settings:
        write_report(setting.chain, run_dir / "settings" / setting.label)
    chain = settings[0].chain
    protocol = TaskProtocol.load(chain.tasks)
    task_sets = list(protocol.eval_task_sets)
    set_name = selection_set(sweep, chain, protocol) if sweep.select.evaluation else ""
    groups = groups_of(settings)
    rows = collect_rows(run_dir, sweep, groups, task_sets, set_name)
    primary = primary_evaluation(sweep, chain)
    sections = [
        f"# sweep {sweep.name}: {len(settings)} runs of chain {chain.name}, "
        f"{len(groups)} setting(s)\n",
        f"mIoU (%) of `{primary}`; mean ± std over seeds.\n",
        format_rows(rows, sweep, task_sets, set_name),
    ]
    best = best_row(rows)
    if best is not None:
        mean = 100 * mean_std(best.heldout)[0]
        sections += [
            f"\n**Chosen on {sweep.select.split}** ({sweep.select.metric} of "
            f"{task_set_title(set_name)}, {mean:.1f}): {best.group.label}\n",
            f"Its val table ({len(best.group.settings)} seed(s)):\n",
            mean_table(best.group.settings, run_dir, task_sets),
        ]
    elif not sweep.select.evaluation:
        for group in groups:
            sections += [f"\n## {group.label}\n", mean_table(group.settings, run_dir, task_sets)]
    text = "\n".join(sections)
    write_csv(run_dir / "sweep.csv", rows, sweep, task_sets)
    plot = write_plot(run_dir / "sweep.png", rows, sweep, set_name)
    tail = f"\nHeld-out metric over the swept values: `{plot.name}`\n" if plot else "\n"
    (run_dir / "sweep.md").write_text(text + "\n" + tail)
    return text
