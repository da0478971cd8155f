"""What a training run learns, derived from its config and the task protocol.

``plan_stage`` turns (protocol, stage, method) into the classes, shard splits and label look-up
table of the run, and checks the teacher wiring before anything is built.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from cil_dist.config import (
    METHODS,
    ConfigError,
    TrainConfig,
    method_problem,
    needs_previous,
    teacher_problem,
)
from cil_dist.protocol import TaskProtocol

__all__ = ["METHODS", "StagePlan", "plan_run", "plan_stage"]


@dataclass(frozen=True)
class StagePlan:
    protocol: TaskProtocol
    method: str
    stage: int  # number of tasks the model covers after this run
    num_classes: int  # output channels of the student
    num_old_classes: int  # channels of the previous stage (0 for stage 1 and joint)
    splits: tuple[str, ...]  # manifest splits to train on
    lut: np.ndarray  # labelId -> training target

    @property
    def uses_teacher(self) -> bool:
        return self.method == "cil" and self.num_old_classes > 0

    @property
    def uses_previous(self) -> bool:
        return needs_previous(self.method, self.stage) and self.num_old_classes > 0

    @property
    def task_sets(self) -> list[str]:
        """Evaluation task sets the model's channels cover."""
        return self.protocol.covered_task_sets(self.num_classes)


def plan_run(cfg: TrainConfig) -> StagePlan:
    """Every check of a run that needs neither torch nor a file (its settings, its stage's
    wiring against its protocol) and its plan: ``cil train`` calls it before importing torch,
    the trainer again before it builds."""
    cfg.validate()
    return plan_stage(cfg, TaskProtocol.load(cfg.stage.tasks))


def plan_stage(cfg: TrainConfig, protocol: TaskProtocol) -> StagePlan:
    """The stage's plan; a wiring mistake is a :class:`ConfigError` worded by the rules of
    :mod:`cil_dist.config` (the chain validation reports the same words)."""
    method, tasks = cfg.stage.method, len(protocol.tasks)
    if problem := method_problem(method):
        raise ConfigError(f"stage.method: {problem}")
    stage = tasks if method == "joint" else cfg.stage.stage
    if method != "joint" and not 1 <= stage <= tasks:
        raise ConfigError(
            f"stage.stage: protocol {protocol.name!r} has stages 1..{tasks}, not {stage}"
        )
    if problem := teacher_problem(method, stage, bool(cfg.teacher.checkpoint)):
        raise ConfigError(f"teacher.checkpoint: {problem}")
    if method == "joint":
        splits = tuple(f"task{k}" for k in range(1, tasks + 1))
        return StagePlan(
            protocol, method, tasks, protocol.num_classes, 0, splits, protocol.joint_lut()
        )
    return StagePlan(
        protocol,
        method,
        stage,
        protocol.classes_up_to(stage),
        protocol.classes_up_to(stage - 1),
        (f"task{stage}",),
        protocol.stage_lut(stage),
    )
