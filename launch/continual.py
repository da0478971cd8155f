"""Continual-learning metrics of a chain, read from its evaluations' ``metrics.json``.

A *lineage* is a path of incremental stages, from stage 1 through each stage's teacher to a
stage that nothing learns from (``stage1 → cil_stage2 → cil_stage3``; the fine-tuning stages
form another). For every step t of a lineage, on the classes of tasks 1..t (the evaluation's
task set covering them, e.g. ``12`` after step 2):

* the IoU of every class: the "step × class" table continual-segmentation papers compare;
* the mIoU of the old classes (tasks 1..t-1), of the new ones (task t) and of all;
* per task, its forgetting: its mIoU on its own task set right after it was learnt minus its
  mIoU on that set after the lineage's last step.

Evaluations on the ``val`` split are preferred, then any other split the chain scored.
"""

from __future__ import annotations

import csv
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

from cil_dist.protocol import TaskProtocol
from launch.chain import ChainConfig, eval_dir


@dataclass
class Step:
    """One stage of a lineage and what its evaluations measured."""

    stage: str  # the chain's stage name
    task: int  # the protocol stage it learnt
    iou: dict[str, float] = field(default_factory=dict)  # class -> IoU on tasks 1..task
    task_miou: dict[int, float] = field(default_factory=dict)  # task -> mIoU on its own set


def lineages(chain: ChainConfig) -> dict[str, list[str]]:
    """``{last stage: [stage 1, …, last stage]}`` for every incremental path of the chain."""
    incremental = {n: s for n, s in chain.stages.items() if s.method != "joint"}
    taught = {s.teacher for s in incremental.values() if s.teacher}
    paths = {}
    for name in incremental:
        if name in taught:
            continue
        path = [name]
        while incremental[path[0]].teacher in incremental:
            path.insert(0, incremental[path[0]].teacher)
        if len(path) > 1 and incremental[path[0]].stage == 1:
            paths[name] = path
    return paths


def stage_metrics(chain: ChainConfig, run_dir: Path, stage: str) -> dict[str, dict]:
    """Every task set's metrics of ``stage`` (val first, then other splits)."""
    found: dict[str, dict] = {}
    evals = [(n, e.split) for n, e in chain.evaluations.items() if e.stage == stage]
    for name, _split in sorted(evals, key=lambda item: item[1] != "val"):
        path = eval_dir(run_dir, name) / "metrics.json"
        if path.is_file():
            for task_set, result in json.loads(path.read_text()).items():
                found.setdefault(task_set, result)
    return found


def _value(x) -> float:
    return math.nan if x is None else float(x)


def collect(chain: ChainConfig, run_dir: Path, protocol: TaskProtocol) -> dict[str, list[Step]]:
    """The steps of every lineage that has evaluations."""
    set_name = {tasks: name for name, tasks in protocol.eval_task_sets.items()}
    out = {}
    for last, path in lineages(chain).items():
        steps = []
        for stage in path:
            task = chain.stages[stage].stage
            metrics = stage_metrics(chain, run_dir, stage)
            step = Step(stage, task)
            seen = metrics.get(set_name.get(tuple(range(1, task + 1)), ""), {})
            step.iou = {k: _value(v) for k, v in seen.get("iou", {}).items()}
            for t in range(1, task + 1):
                own = metrics.get(set_name.get((t,), ""))
                if own is not None:
                    step.task_miou[t] = _value(own["miou"])
            steps.append(step)
        if any(step.iou or step.task_miou for step in steps):
            out[last] = steps
    return out


def _mean(values: list[float]) -> float:
    values = [v for v in values if not math.isnan(v)]
    return sum(values) / len(values) if values else math.nan


def old_new_all(step: Step, protocol: TaskProtocol) -> tuple[float, float, float]:
    """mIoU of the old classes (tasks before the step's), the new ones and all seen."""
    new = set(protocol.task(step.task).classes)
    old = [v for c, v in step.iou.items() if c not in new]
    fresh = [v for c, v in step.iou.items() if c in new]
    if not step.iou:
        return math.nan, math.nan, math.nan
    return _mean(old), _mean(fresh), _mean(list(step.iou.values()))


def forgetting(steps: list[Step]) -> dict[int, tuple[str, float, float]]:
    """``{task: (stage that learnt it, mIoU then, mIoU after the last step)}``."""
    last, out = steps[-1], {}
    for step in steps[:-1]:
        then, now = step.task_miou.get(step.task), last.task_miou.get(step.task)
        if then is not None and now is not None:
            out[step.task] = (step.stage, then, now)
    return out


def _pct(value: float) -> str:
    return "–" if value is None or math.isnan(value) else f"{100 * value:.1f}"


def write_csv(path: Path, found: dict[str, list[Step]], protocol: TaskProtocol) -> None:
    """Tidy rows ``lineage,step,stage,class,task,iou`` (IoU in [0, 1], empty when undefined)."""
    task_of = {c: t.id for t in protocol.tasks for c in t.classes}
    with path.open("w", newline="") as stream:
        writer = csv.writer(stream)
        writer.writerow(["lineage", "step", "stage", "class", "task", "iou"])
        for lineage, steps in found.items():
            for step in steps:
                for name in protocol.class_names:
                    if name in step.iou:
                        value = step.iou[name]
                        cell = "" if math.isnan(value) else f"{value:.6f}"
                        writer.writerow([lineage, step.task, step.stage, name, task_of[name], cell])


def format_markdown(found: dict[str, list[Step]], protocol: TaskProtocol) -> str:
    """Per lineage: old / new / all mIoU and every class's IoU after each step; forgetting."""
    sections = []
    classes = protocol.class_names
    for steps in found.values():
        head = "| step | stage | old | new | all | " + " | ".join(classes) + " |"
        lines = [f"### {' → '.join(s.stage for s in steps)}\n", head]
        lines.append("|---" * (len(classes) + 5) + "|")
        for step in steps:
            cells = [_pct(v) for v in old_new_all(step, protocol)]
            cells += [_pct(step.iou[c]) if c in step.iou else "" for c in classes]
            lines.append(f"| {step.task} | {step.stage} | " + " | ".join(cells) + " |")
        lost = forgetting(steps)
        if lost:
            lines += ["", "| task | learnt in | mIoU then | after the last step | forgetting |"]
            lines.append("|---|---|---|---|---|")
            for task, (stage, then, now) in lost.items():
                lines.append(
                    f"| {task} | {stage} | {_pct(then)} | {_pct(now)} | {_pct(then - now)} |"
                )
        sections.append("\n".join(lines))
    return "\n\n".join(sections)


def write_continual(chain: ChainConfig, run_dir: Path, protocol: TaskProtocol) -> str:
    """Write ``RUN_DIR/continual.csv``; return the markdown section ("" without lineages)."""
    found = collect(chain, run_dir, protocol)
    if not found:
        return ""
    write_csv(run_dir / "continual.csv", found, protocol)
    return format_markdown(found, protocol)
