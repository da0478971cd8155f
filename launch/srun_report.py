"""Which ranks srun saw end badly, read from a SLURM job's log.

A rank killed from outside (the out-of-memory killer, ``kill -9``, a crash) records no error of
its own. srun does report it: under ``--kill-on-bad-exit=1`` it prints, to the batch script's
output (rank 0's log under submitit),

    srun: error: node7: task 1: Killed            (or "Out Of Memory", "Segmentation fault"…)
    srun: launch/slurm: _step_signal: Terminating StepId=42.0

and then the same kind of line for each task it ended itself. The tasks named before the step
is terminated are the ones that ended first; a task's number is its rank.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

TASK_ENDED = re.compile(
    r"^srun: error: (?P<host>\S+): tasks? (?P<tasks>\d[\d,\-]*): (?P<reason>.+)$"
)
STEP_ENDING = re.compile(r"Terminating StepId|\*\*\* STEP \S+ ON \S+ CANCELLED")
ATTEMPT_STARTED = "Starting with JobEnvironment"  # submitit's first line, in each attempt
TAIL_BYTES = 1 << 20  # srun reports at the end of the log: a long run's training lines are skipped


@dataclass(frozen=True)
class TaskEnded:
    """srun's word on one task that ended badly."""

    rank: int
    host: str
    reason: str


def task_numbers(spec: str) -> list[int]:
    """srun's task list ("1", "0-3", "0,2-3") to task numbers."""
    numbers = []
    for part in spec.split(","):
        first, _, last = part.partition("-")
        numbers += range(int(first), int(last or first) + 1)
    return numbers


def first_ended(log_text: str) -> list[TaskEnded]:
    """The tasks srun reported ending badly in the log's last attempt, before it began ending
    the others (an empty list when it reported none)."""
    lines = log_text.splitlines()
    starts = [i for i, line in enumerate(lines) if ATTEMPT_STARTED in line]
    ended = []
    for line in lines[starts[-1] if starts else 0 :]:
        if STEP_ENDING.search(line):
            break
        match = TASK_ENDED.match(line.strip())
        if match:
            host, reason = match["host"], match["reason"].strip()
            ended += [TaskEnded(rank, host, reason) for rank in task_numbers(match["tasks"])]
    return ended


def read_first_ended(log: Path) -> list[TaskEnded]:
    """:func:`first_ended` of the log file's last ``TAIL_BYTES`` (none when it cannot be read)."""
    try:
        with log.open("rb") as stream:
            stream.seek(max(0, stream.seek(0, 2) - TAIL_BYTES))
            return first_ended(stream.read().decode(errors="replace"))
    except OSError:
        return []
