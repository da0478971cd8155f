"""A chain is a config: stages wired teacher → student, evaluations, resources.

``configs/chains/*.yaml`` is merged onto :class:`ChainConfig` by OmegaConf (unknown keys and
wrong types are rejected with their dotted key). :func:`expand` turns it into the jobs of a
run folder: one :class:`JobSpec` per stage and per evaluation, each with its own
:class:`~cil_dist.config.TrainConfig`, resources and dependencies.

Run folder layout::

    RUN_DIR/chain.yaml            the resolved chain config
    RUN_DIR/chain.json            job ids, states, checkpoints, logs (see launch.state)
    RUN_DIR/stages/NAME/          a stage's run folder (config.yaml, checkpoints/, tensorboard/)
    RUN_DIR/evals/NAME/           an evaluation's metrics.json and table.md
    RUN_DIR/status/NAME.json      what the job itself reports (attempts, result, error)
    RUN_DIR/submitit/             submitit's pickles and logs (%j_%t_log.out / .err)
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from cil_dist import urls
from cil_dist.config import ConfigError, TrainConfig, load_train_config, merge
from cil_dist.training import run_folder


@dataclass
class Resources:
    """What one job asks SLURM for (the local executor uses ``tasks_per_node`` only)."""

    nodes: int = 1
    tasks_per_node: int = 1  # ranks per node: one per GPU on a GPU cluster
    gpus_per_node: int = 0  # 0 = CPU job (gloo); else must equal tasks_per_node (nccl)
    cpus_per_task: int = 1
    mem_gb: float = 0.0  # 0 = the partition's default
    timeout_min: int = 60
    partition: str = ""
    account: str = ""
    qos: str = ""
    constraint: str = ""
    max_requeues: int = 3  # preemptions/time-outs a job survives (submitit's max_num_timeout)
    signal_delay_s: int = 120  # SLURM sends USR2 this long before the time limit
    setup: list[str] = field(default_factory=list)  # shell lines before the job (module load …)
    sbatch: dict[str, Any] = field(default_factory=dict)  # any other sbatch option

    @property
    def world_size(self) -> int:
        return self.nodes * self.tasks_per_node


@dataclass
class StageSpec:
    """One training stage of the chain."""

    method: str = "cil"  # cil | finetune | joint
    stage: int = 1  # protocol stage (ignored by joint)
    teacher: str = ""  # stage whose final checkpoint teaches (cil) or initialises (finetune)
    epochs: int = 0  # 0: the train config's optim.epochs
    overrides: list[str] = field(default_factory=list)  # key=value onto the train config
    resources: dict[str, Any] = field(default_factory=dict)  # onto the chain's resources


@dataclass
class EvalSpec:
    """An evaluation of a stage's final checkpoint, run after that stage."""

    stage: str = ""
    task_sets: list[str] = field(default_factory=list)  # default: every set the model covers
    split: str = "val"
    export_predictions: bool = False
    resources: dict[str, Any] = field(default_factory=dict)  # onto eval_resources


@dataclass
class SummarySpec:
    """Report rows (labels of ``report``) compared below the table; unset rows are left out."""

    method: str = ""  # the method under test, e.g. "CIL (this method)"
    joint: str = ""  # its upper bound: all classes at once
    lower: str = ""  # its lower bound: fine-tuning
    first_stage: str = ""  # stage 1 alone: what task 1 was worth when it was learnt


@dataclass
class ChainConfig:
    name: str = "chain"
    train_config: str = "paper_stage1"  # base train config of every stage (name or YAML)
    tasks: str = "cityscapes_cil"  # task protocol (name or YAML)
    manifest: str = ""  # shards manifest (path or URL); overrides the train config's
    overrides: list[str] = field(default_factory=list)  # key=value for every stage
    resources: Resources = field(default_factory=Resources)
    eval_resources: dict[str, Any] = field(default_factory=dict)  # onto resources, for evals
    stages: dict[str, StageSpec] = field(default_factory=dict)
    evaluations: dict[str, EvalSpec] = field(default_factory=dict)
    report: dict[str, str] = field(default_factory=dict)  # table row label -> evaluation
    summary: SummarySpec = field(default_factory=SummarySpec)


@dataclass
class JobSpec:
    """One submitit job of a chain: a training stage or an evaluation."""

    name: str
    kind: str  # "train" | "eval"
    train: TrainConfig
    resources: Resources
    depends_on: list[str]
    checkpoint: str  # train: the final checkpoint it writes; eval: the one it reads
    out_dir: str  # stage run folder, or evaluation folder
    task_sets: list[str] = field(default_factory=list)
    split: str = "val"
    export_predictions: bool = False


def load_chain(path: str | Path, overrides: list[str] | None = None) -> ChainConfig:
    """Load a chain YAML (shipped name or file) with ``key=value`` overrides."""
    import configs

    found = configs.find("chains", str(path))
    return merge(ChainConfig, str(found), overrides=overrides, where=str(found), label="--set")


def chain_to_yaml(chain: ChainConfig) -> str:
    """The resolved chain, with pre-signed URLs and user info stripped (never saved)."""
    return urls.redact_url(OmegaConf.to_yaml(OmegaConf.structured(chain)))


def resources_of(base: Resources, *layers: dict[str, Any], where: str) -> Resources:
    """``base`` with the keys of ``layers`` on top (unknown keys name ``where``)."""
    return merge(Resources, OmegaConf.structured(base), *layers, where=where)


def stage_dir(run_dir: Path, name: str) -> Path:
    return run_dir / "stages" / name


def eval_dir(run_dir: Path, name: str) -> Path:
    return run_dir / "evals" / name


def stage_train_config(
    chain: ChainConfig, name: str, run_dir: Path, job_names: Mapping[str, str] | None = None
) -> TrainConfig:
    """The train config of stage ``name``: base config + chain wiring + overrides.

    ``job_names`` maps stage names to the names of their jobs' run folders (a sweep's jobs are
    named by their digest); by default each stage's job is named as the stage."""
    names = job_names or {}
    spec = chain.stages[name]
    teacher_dir = stage_dir(run_dir, names.get(spec.teacher, spec.teacher))
    wiring: dict[str, Any] = {
        "name": names.get(name, name),
        "out_dir": str(run_dir / "stages"),
        "stage": {"tasks": chain.tasks, "method": spec.method, "stage": spec.stage},
        "teacher": {"checkpoint": str(run_folder.final_path(teacher_dir)) if spec.teacher else ""},
        "checkpoint": {"resume": "auto"},
        "eval": {"after_training": False},
    }
    if chain.manifest:
        manifest = chain.manifest
        if urls.is_local(manifest):  # jobs may start in another folder
            manifest = str(Path(urls.local_path(manifest)).resolve())
        wiring["data"] = {"manifest": manifest}
    if spec.epochs:
        wiring["optim"] = {"epochs": spec.epochs}
    try:
        cfg = load_train_config(
            chain.train_config, [*chain.overrides, *spec.overrides], layers=[wiring]
        )
    except ConfigError as exc:
        raise ConfigError(f"stages.{name}: {exc}") from exc
    init = cfg.model.encoder_init
    if init and urls.is_local(init):  # relative to where the chain is submitted
        cfg.model.encoder_init = str(Path(urls.local_path(init)).resolve())
    return cfg


def expand(
    chain: ChainConfig, run_dir: Path, job_names: Mapping[str, str] | None = None
) -> dict[str, JobSpec]:
    """Every job of the chain, stages first, in the order of the config, keyed by stage or
    evaluation name (``job_names``: the jobs' own names, see :func:`stage_train_config`)."""
    names = dict(job_names or {})
    jobs: dict[str, JobSpec] = {}
    for name, spec in chain.stages.items():
        train = stage_train_config(chain, name, run_dir, names)
        job = names.get(name, name)
        jobs[name] = JobSpec(
            name=job,
            kind="train",
            train=train,
            resources=resources_of(chain.resources, spec.resources, where=f"stages.{name}"),
            depends_on=[names.get(spec.teacher, spec.teacher)] if spec.teacher else [],
            checkpoint=str(run_folder.final_path(stage_dir(run_dir, job))),
            out_dir=str(stage_dir(run_dir, job)),
        )
    for name, spec in chain.evaluations.items():
        if name in jobs:
            raise ConfigError(f"evaluations.{name}: a stage has the same name; rename one")
        if spec.stage not in chain.stages:
            raise ConfigError(
                f"evaluations.{name}.stage: {spec.stage!r} is not a stage "
                f"(stages: {', '.join(chain.stages)})"
            )
        job = names.get(name, name)
        jobs[name] = JobSpec(
            name=job,
            kind="eval",
            train=jobs[spec.stage].train,
            resources=resources_of(
                chain.resources,
                chain.eval_resources,
                spec.resources,
                where=f"evaluations.{name}",
            ),
            depends_on=[jobs[spec.stage].name],
            checkpoint=jobs[spec.stage].checkpoint,
            out_dir=str(eval_dir(run_dir, job)),
            task_sets=[str(t) for t in spec.task_sets],
            split=spec.split,
            export_predictions=spec.export_predictions,
        )
    return jobs
