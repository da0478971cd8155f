"""The paper-shaped table of a chain: one row per reported evaluation, mIoU per task set.

Written to ``RUN_DIR/results.md`` with the per-class IoU of every row below it.
"""

from __future__ import annotations

import json
from pathlib import Path

from cil_dist.metrics import format_class_table, format_paper_table
from cil_dist.protocol import TaskProtocol
from launch.chain import ChainConfig, eval_dir


def chain_results(chain: ChainConfig, run_dir: Path) -> dict[str, dict]:
    """``{row label: metrics.json content}`` for the report rows that have results."""
    results = {}
    for label, evaluation in chain.report.items():
        metrics = eval_dir(run_dir, evaluation) / "metrics.json"
        if metrics.is_file():
            results[label] = json.loads(metrics.read_text())
    return results


def write_report(chain: ChainConfig, run_dir: Path) -> str:
    """Write ``results.md`` and return the paper table (rows without results show dashes)."""
    results = chain_results(chain, run_dir)
    protocol = TaskProtocol.load(chain.tasks)
    task_sets = list(protocol.eval_task_sets)
    rows = {
        label: {name: r["miou"] for name, r in results.get(label, {}).items()}
        for label in chain.report
    }
    table = format_paper_table(rows, task_sets)
    sections = [f"# {chain.name}: mIoU (%) per task set\n", table]
    for label, result in results.items():
        sections += [f"\n## {label}: IoU (%) per class\n", format_class_table(result, protocol)]
    (run_dir / "results.md").write_text("\n".join(sections) + "\n")
    return table
