"""The paper-shaped table of a chain: one row per reported evaluation, mIoU per task set.

Written to ``RUN_DIR/results.md``: the table, the summary the chain asks for (``summary``: the
method against its joint upper bound on all classes, what it keeps of task 1, the fine-tuning
lower bound), the continual-learning metrics of every lineage of stages (:mod:`launch.continual`:
old / new / all mIoU and each class's IoU after each step, forgetting per task; also
``RUN_DIR/continual.csv``), then the per-class IoU of every row. ``RUN_DIR/curves.png`` shows
the validation curves of every stage (:mod:`cil_dist.evaluation.curves`).
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

from cil_dist.evaluation.curves import plot_runs
from cil_dist.evaluation.tables import format_class_table, format_paper_table, task_set_title
from cil_dist.protocol import TaskProtocol
from launch.chain import ChainConfig, eval_dir, stage_dir
from launch.continual import write_continual

log = logging.getLogger(__name__)

# Cityscapes val, mIoU (%) of Klingner et al. (ITSC 2020), for the summary's comparison
PAPER = {"method": {"1": 84.5, "123": 62.2}, "joint": {"1": 88.1, "123": 64.4}}


def chain_results(chain: ChainConfig, run_dir: Path) -> dict[str, dict]:
    """``{row label: metrics.json content}`` for the report rows that have results."""
    results = {}
    for label, evaluation in chain.report.items():
        metrics = eval_dir(run_dir, evaluation) / "metrics.json"
        if metrics.is_file():
            results[label] = json.loads(metrics.read_text())
    return results


def _miou(rows: dict[str, dict[str, float]], label: str, task_set: str) -> float:
    value = rows.get(label, {}).get(task_set)
    return math.nan if value is None else value


def summary_figures(
    chain: ChainConfig, rows: dict[str, dict[str, float]], protocol: TaskProtocol
) -> dict[str, float]:
    """Ratios of the summary (NaN where a row is missing): the method over joint on the set of
    all tasks, task 1 kept from stage 1, fine-tuning over the method on task 1 and 1∪2."""
    spec, sets = chain.summary, protocol.eval_task_sets
    last = max(sets, key=lambda name: len(sets[name]))
    method = {name: _miou(rows, spec.method, name) for name in ("1", "12", last)}
    return {
        f"method/joint {last}": _ratio(method[last], _miou(rows, spec.joint, last)),
        "task 1 kept": _ratio(method["1"], _miou(rows, spec.first_stage, "1")),
        "lower/method 1": _ratio(_miou(rows, spec.lower, "1"), method["1"]),
        "lower/method 12": _ratio(_miou(rows, spec.lower, "12"), method["12"]),
    }


def _ratio(a: float, b: float) -> float:
    return a / b if b and not math.isnan(b) else math.nan


def format_summary(chain: ChainConfig, figures: dict[str, float]) -> str:
    """The summary lines under the table (only those whose rows exist)."""
    spec, lines = chain.summary, []
    for key, value in figures.items():
        if math.isnan(value):
            continue
        if key.startswith("method/joint"):
            task_set = key.split()[-1]
            paper = PAPER["method"]["123"] / PAPER["joint"]["123"]
            lines.append(
                f"- {spec.method} / {spec.joint} on {task_set_title(task_set)}: **{value:.3f}** "
                f"(the paper on Cityscapes: {PAPER['method']['123']} / "
                f"{PAPER['joint']['123']} = {paper:.3f})"
            )
        elif key == "task 1 kept":
            lines.append(
                f"- task 1 kept by {spec.method} after the last stage: **{value:.3f}** of "
                f"{spec.first_stage}'s mIoU"
            )
        else:
            task_set = key.split()[-1]
            lines.append(
                f"- {spec.lower} / {spec.method} on {task_set_title(task_set)}: **{value:.3f}**"
            )
    return "\n".join(lines)


def write_curves(chain: ChainConfig, run_dir: Path) -> Path | None:
    """``RUN_DIR/curves.png``: the held-out curves of every stage that recorded some."""
    runs = {name: stage_dir(run_dir, name) for name in chain.stages}
    teachers = {
        name: stage_dir(run_dir, spec.teacher)
        for name, spec in chain.stages.items()
        if spec.teacher
    }
    title = f"{chain.name}: held-out mIoU (dotted: the teacher's final)"
    try:
        return plot_runs(runs, run_dir / "curves.png", "heldout", title, teachers)
    except ValueError as exc:  # no stage recorded curves (eval.every_epochs: 0)
        log.info("no curves: %s", exc)
        return None


def write_report(chain: ChainConfig, run_dir: Path) -> str:
    """Write ``results.md`` (and ``curves.png``); return the table and summary (rows without
    results show dashes)."""
    results = chain_results(chain, run_dir)
    protocol = TaskProtocol.load(chain.tasks)
    task_sets = list(protocol.eval_task_sets)
    rows = {
        label: {name: r["miou"] for name, r in results.get(label, {}).items()}
        for label in chain.report
    }
    table = format_paper_table(rows, task_sets)
    summary = format_summary(chain, summary_figures(chain, rows, protocol)) if results else ""
    head = f"{table}\n\n{summary}" if summary else table
    sections = [f"# {chain.name}: mIoU (%) per task set\n", head]
    curves = write_curves(chain, run_dir)
    if curves:
        sections.append(f"\nValidation curves of every stage: `{curves.name}`")
    continual = write_continual(chain, run_dir, protocol)
    if continual:
        sections += [
            "\n## Continual-learning metrics: IoU (%) after each step "
            "(old / new / all classes seen so far; step × class also in `continual.csv`)\n",
            continual,
        ]
    for label, result in results.items():
        classes = format_class_table(result, protocol.class_names)
        sections += [f"\n## {label}: IoU (%) per class\n", classes]
    (run_dir / "results.md").write_text("\n".join(sections) + "\n")
    return head
