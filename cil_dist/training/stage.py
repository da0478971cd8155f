"""What a training run learns, derived from its config and the task protocol.

``plan_stage`` turns (protocol, stage, method) into the classes, shard splits and label look-up
table of the run, and checks the teacher wiring before anything is built.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from cil_dist.config import ConfigError, TrainConfig
from cil_dist.protocol import TaskProtocol

METHODS = ("cil", "finetune", "joint")


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
        return self.method in ("cil", "finetune") and self.num_old_classes > 0

    @property
    def task_sets(self) -> list[str]:
        """Evaluation task sets the model's channels cover."""
        return self.protocol.covered_task_sets(self.num_classes)


def plan_stage(cfg: TrainConfig, protocol: TaskProtocol) -> StagePlan:
    method, tasks = cfg.stage.method, len(protocol.tasks)
    if method not in METHODS:
        raise ConfigError(f"stage.method: expected one of {METHODS}, got {method!r}")
    if method == "joint":
        if cfg.teacher.checkpoint:
            raise ConfigError("teacher.checkpoint: the joint baseline trains without a teacher")
        splits = tuple(f"task{k}" for k in range(1, tasks + 1))
        return StagePlan(
            protocol, method, tasks, protocol.num_classes, 0, splits, protocol.joint_lut()
        )
    stage = cfg.stage.stage
    if not 1 <= stage <= tasks:
        raise ConfigError(
            f"stage.stage: protocol {protocol.name!r} has stages 1..{tasks}, not {stage}"
        )
    old = protocol.classes_up_to(stage - 1)
    if stage > 1 and not cfg.teacher.checkpoint:
        raise ConfigError(
            f"teacher.checkpoint: stage {stage} ({method}) needs the final checkpoint "
            f"of stage {stage - 1}"
        )
    if stage == 1 and cfg.teacher.checkpoint:
        raise ConfigError("teacher.checkpoint: stage 1 has no previous stage; leave it empty")
    return StagePlan(
        protocol,
        method,
        stage,
        protocol.classes_up_to(stage),
        old,
        (f"task{stage}",),
        protocol.stage_lut(stage),
    )
