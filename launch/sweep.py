"""Sweeps: one base chain run under many settings, every distinct job trained once.

``configs/sweeps/*.yaml`` is merged onto :class:`SweepConfig`. A *setting* is a set of train
overrides (``teacher.temperature: 2``, ``cil_stage3/optim.lr: 1e-3``, ``seed: 1``): the
product of ``grid`` or each entry of ``settings``. Each setting is the base chain with its
overrides; its jobs are named by a digest of what determines their output — the resolved
train config without the keys that do not alter a run
(:data:`cil_dist.training.checkpoint.FREE_KEYS`), the content of the data manifest and the
teacher job's digest — so settings whose stage 1 resolve alike share one stage-1 job, and a
3 × 3 grid over stage-2/3 keys trains stage 1 once.

Sweep folder layout::

    DIR/sweep.yaml              the resolved sweep config
    DIR/sweep.json              the settings: overrides and the job of each stage/evaluation
    DIR/chain.json              the jobs' states (``cil-launch status`` / ``cancel`` read it)
    DIR/stages/STAGE-DIGEST/    a job's run folder, shared by the settings that resolve to it
    DIR/evals/EVAL-DIGEST/
    DIR/settings/NN/            one setting as a chain run folder: its chain.yaml, links to its
                                jobs' folders, results.md (``cil-launch report DIR/settings/NN``)
    DIR/sweep.md, sweep.csv, sweep.png   the selection (:mod:`launch.sweep_report`)
"""

from __future__ import annotations

import copy
import functools
import hashlib
import itertools
import json
import logging
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from cil_dist import storage, urls
from cil_dist.config import ConfigError, TrainConfig, merge
from cil_dist.training import config_diff
from launch import state as st
from launch.chain import (
    ChainConfig,
    EvalSpec,
    JobSpec,
    chain_to_yaml,
    expand,
    load_chain,
    stage_train_config,
)
from launch.plan import in_dependency_order
from launch.submit import run_jobs
from launch.validate import ChainError, validate_chain

log = logging.getLogger(__name__)

SWEEP_FILE = "sweep.json"
METRICS = ("miou",)  # what a selection can score (of metrics.json, per task set)


@dataclass
class SelectSpec:
    """How the best setting is chosen: a chain evaluation's stage scored on the held-out split
    (the paper chose T and λ on erfurt), never on the split it reports."""

    evaluation: str = ""  # a chain evaluation; its stage is also scored on ``split``
    task_set: str = ""  # default: the largest task set that evaluation scores
    metric: str = "miou"
    split: str = "heldout"


@dataclass
class SweepConfig:
    name: str = "sweep"
    chain: str = ""  # the base chain: a shipped name or a YAML file
    set: list[str] = field(default_factory=list)  # key=value onto the chain (as --set)
    grid: dict[str, list[Any]] = field(default_factory=dict)  # KEY or STAGE/KEY -> values
    settings: list[dict[str, Any]] = field(default_factory=list)  # or: explicit settings
    apply_to: list[str] = field(default_factory=list)  # stages of a plain KEY (default: all)
    select: SelectSpec = field(default_factory=SelectSpec)


@dataclass
class Setting:
    """One setting of the sweep: its overrides, its chain and the jobs it consists of."""

    index: int
    overrides: dict[str, Any]
    chain: ChainConfig
    job_names: dict[str, str] = field(default_factory=dict)  # stage/evaluation -> job

    @property
    def label(self) -> str:
        return f"{self.index:02d}"

    @property
    def without_seed(self) -> dict[str, Any]:
        """The overrides but the seed: settings that differ only by it are averaged."""
        return {k: v for k, v in self.overrides.items() if k.split("/")[-1] != "seed"}

    @property
    def group(self) -> str:
        """The name of :attr:`without_seed`."""
        shown = [f"{k}={json.dumps(v)}" for k, v in self.without_seed.items()]
        return ", ".join(shown) or "(base chain)"


def load_sweep(path: str | Path, overrides: list[str] | None = None) -> SweepConfig:
    """Load a sweep YAML (shipped name or file) with ``key=value`` overrides."""
    import configs

    found = configs.find("sweeps", str(path))
    sweep = merge(SweepConfig, str(found), overrides=overrides, where=str(found), label="--set")
    if sweep.chain and urls.is_local(sweep.chain) and not Path(sweep.chain).is_absolute():
        beside = Path(found).parent / sweep.chain  # a chain file next to the sweep file
        if beside.is_file():
            sweep.chain = str(beside.resolve())
    return sweep


def setting_overrides(sweep: SweepConfig) -> tuple[list[dict[str, Any]], list[str]]:
    """The settings (key -> value), and the problems of the grid or list."""
    if sweep.grid and sweep.settings:
        return [], ["grid, settings: give one of them (a grid or a list of settings)"]
    if sweep.settings:
        empty = [f"settings[{i}]: an empty setting" for i, s in enumerate(sweep.settings) if not s]
        return [dict(s) for s in sweep.settings], empty
    if not sweep.grid:
        return [], ["grid: nothing to sweep (give grid or settings)"]
    problems = [f"grid.{key}: no values" for key, values in sweep.grid.items() if not values]
    if problems:
        return [], problems
    keys = list(sweep.grid)
    combos = itertools.product(*(sweep.grid[key] for key in keys))
    return [dict(zip(keys, combo, strict=True)) for combo in combos], []


def key_problems(sweep: SweepConfig, settings: list[dict[str, Any]], chain: ChainConfig):
    """Each swept key exists in the train config and each value has its type; STAGE/ prefixes
    and ``apply_to`` name stages of the chain."""
    where = "grid" if sweep.grid else "settings"
    problems = [
        f"apply_to: {name!r} is not a stage of the chain (stages: {', '.join(chain.stages)})"
        for name in sweep.apply_to
        if name not in chain.stages
    ]
    checked: set[str] = set()
    for setting in settings:
        for key, value in setting.items():
            stage, _, train_key = key.rpartition("/")
            if stage and stage not in chain.stages:
                problems.append(
                    f"{where}.{key}: {stage!r} is not a stage of the chain "
                    f"(stages: {', '.join(chain.stages)})"
                )
                continue
            override = f"{train_key}={json.dumps(value)}"
            if override in checked:
                continue
            checked.add(override)
            try:
                merge(TrainConfig, overrides=[override], label=f"{where}.{key}:")
            except ConfigError as exc:
                problems.append(str(exc))
    return problems


def setting_chain(sweep: SweepConfig, base: ChainConfig, overrides: dict[str, Any]):
    """The base chain with the setting's overrides on the stages they apply to."""
    chain = copy.deepcopy(base)
    for key, value in overrides.items():
        stage, _, train_key = key.rpartition("/")
        if stage:
            targets = [stage]
        elif train_key == "seed" or not sweep.apply_to:
            targets = list(chain.stages)  # a seed repeats the whole chain
        else:
            targets = list(sweep.apply_to)
        for name in targets:
            chain.stages[name].overrides.append(f"{train_key}={json.dumps(value)}")
    return chain


def selection_eval_name(select: SelectSpec) -> str:
    return f"{select.evaluation}_{select.split}"


def select_problems(sweep: SweepConfig, chain: ChainConfig) -> list[str]:
    select = sweep.select
    if not select.evaluation:
        return []
    if select.evaluation not in chain.evaluations:
        return [
            f"select.evaluation: {select.evaluation!r} is not an evaluation of the chain "
            f"(evaluations: {', '.join(chain.evaluations) or 'none'})"
        ]
    problems = []
    if select.metric not in METRICS:
        problems.append(f"select.metric: {select.metric!r} is not one of {', '.join(METRICS)}")
    scored = chain.evaluations[select.evaluation].task_sets
    if select.task_set and scored and select.task_set not in scored:
        problems.append(
            f"select.task_set: {select.task_set!r} is not scored by {select.evaluation} "
            f"(task sets: {', '.join(scored)})"
        )
    if selection_eval_name(select) in chain.evaluations:
        name = selection_eval_name(select)
        problems.append(f"select: the chain already has an evaluation {name}; rename it")
    return problems


def with_selection(sweep: SweepConfig, chain: ChainConfig) -> ChainConfig:
    """The chain plus the held-out evaluation the selection reads."""
    select = sweep.select
    if not select.evaluation:
        return chain
    spec = chain.evaluations[select.evaluation]
    task_sets = [select.task_set] if select.task_set else list(spec.task_sets)
    chain.evaluations[selection_eval_name(select)] = EvalSpec(
        stage=spec.stage, task_sets=task_sets, split=select.split, resources=spec.resources
    )
    return chain


def manifest_digest(url: str, options: storage.StorageOptions | None = None) -> str:
    """The manifest's content digest (its URL when it cannot be read: validation says why)."""
    try:
        return storage.sha256_of(url, options)[0]
    except (OSError, ValueError, ImportError):
        return url


def job_digest(train: TrainConfig, teacher_digest: str, data_digest: str) -> str:
    """What determines a stage's output: the config keys that alter a run, the data, the
    teacher (a stage without one ignores the ``teacher`` section)."""
    keys = {
        key: value
        for key, value in config_diff.flat_config(asdict(train)).items()
        if not config_diff.is_free(key)
        and key not in ("teacher.checkpoint", "data.manifest")
        and (teacher_digest or not key.startswith("teacher."))
    }
    payload = {"config": keys, "data": data_digest, "teacher": teacher_digest}
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()


def name_jobs(setting: Setting, run_dir: Path, digests: dict[str, str]) -> None:
    """Give every stage and evaluation of the setting its job name (NAME-DIGEST)."""
    chain, names = setting.chain, setting.job_names
    own: dict[str, str] = {}
    teachers = {name: [spec.teacher] if spec.teacher else [] for name, spec in chain.stages.items()}
    for name in in_dependency_order(teachers):
        spec = chain.stages[name]
        train = stage_train_config(chain, name, run_dir, names)
        options = storage.StorageOptions.from_data_config(train.data)  # what validation read
        digest = manifest_digest(train.data.manifest, options)
        data = digests.setdefault(train.data.manifest, digest)
        own[name] = job_digest(train, own.get(spec.teacher, ""), data)
        names[name] = f"{name}-{own[name][:10]}"
    for name, spec in chain.evaluations.items():
        what = [own[spec.stage], spec.split, spec.task_sets, spec.export_predictions]
        digest = hashlib.sha256(json.dumps(what).encode()).hexdigest()
        names[name] = f"{name}-{digest[:10]}"


def expand_sweep(
    sweep: SweepConfig, run_dir: Path, executor: str, source: str = "sweep"
) -> tuple[list[Setting], dict[str, JobSpec]]:
    """Every setting and the distinct jobs they consist of, or :class:`ChainError` listing
    every problem of the sweep and of every setting's chain."""
    try:
        base = load_chain(sweep.chain, sweep.set) if sweep.chain else None
    except (ConfigError, FileNotFoundError) as exc:
        raise ChainError(source, [f"chain: {exc}"]) from None
    if base is None:
        raise ChainError(source, ["chain: the sweep names no base chain"])
    overrides, problems = setting_overrides(sweep)
    problems += key_problems(sweep, overrides, base) + select_problems(sweep, base)
    if problems:
        raise ChainError(source, list(dict.fromkeys(problems)))
    settings = [
        Setting(i, o, with_selection(sweep, setting_chain(sweep, base, o)))
        for i, o in enumerate(overrides)
    ]
    found: dict[str, list[str]] = {}  # problem -> the settings that have it
    for setting in settings:
        try:
            validate_chain(setting.chain, run_dir, executor, f"setting {setting.label}")
        except ChainError as exc:
            for problem in exc.problems:
                found.setdefault(problem, []).append(f"{setting.label} ({setting.group})")
    if found:
        raise ChainError(source, [f"{where(labels, settings)}: {p}" for p, labels in found.items()])
    jobs: dict[str, JobSpec] = {}
    digests: dict[str, str] = {}
    for setting in settings:
        name_jobs(setting, run_dir, digests)
        for job in expand(setting.chain, run_dir, setting.job_names).values():
            jobs.setdefault(job.name, job)
    return settings, jobs


def where(labels: list[str], settings: list[Setting]) -> str:
    """Which settings a problem concerns ("every setting" when all of them)."""
    if len(labels) == len(settings) > 1:
        return "every setting"
    return ("setting " if len(labels) == 1 else "settings ") + ", ".join(labels)


def write_settings(sweep: SweepConfig, settings: list[Setting], run_dir: Path) -> None:
    """``sweep.yaml``, ``sweep.json`` and one chain run folder per setting (links to its
    jobs' folders, so that the chain report reads it as any chain run)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "sweep.yaml").write_text(
        urls.redact_url(OmegaConf.to_yaml(OmegaConf.structured(sweep)))
    )
    record = {
        "name": sweep.name,
        "settings": [
            {"label": s.label, "overrides": s.overrides, "group": s.group, "jobs": s.job_names}
            for s in settings
        ],
    }
    (run_dir / SWEEP_FILE).write_text(json.dumps(record, indent=1))
    for setting in settings:
        folder = run_dir / "settings" / setting.label
        (folder / "chain.yaml").parent.mkdir(parents=True, exist_ok=True)
        (folder / "chain.yaml").write_text(chain_to_yaml(setting.chain))
        for kind, names in (("stages", setting.chain.stages), ("evals", setting.chain.evaluations)):
            (folder / kind).mkdir(exist_ok=True)
            for name in names:
                link = folder / kind / name
                target = os.path.relpath(run_dir / kind / setting.job_names[name], link.parent)
                if link.is_symlink() and os.readlink(link) == target:
                    continue
                link.unlink(missing_ok=True)
                link.symlink_to(target, target_is_directory=True)


def submit_sweep(
    sweep: SweepConfig,
    run_dir: Path,
    executor: str,
    source: str = "sweep",
    max_parallel: int = 1,
    max_jobs: int = 0,
) -> tuple[list[Setting], st.ChainState]:
    """Validate every setting, then submit (SLURM) or run (local/debug) every distinct job
    that has not finished; re-running it resumes the sweep."""
    run_dir = run_dir.resolve()
    settings, jobs = expand_sweep(sweep, run_dir, executor, source)
    trained = sum(1 for job in jobs.values() if job.kind == "train")
    log.info(
        "sweep %s: %d settings, %d distinct jobs (%d training)",
        sweep.name,
        len(settings),
        len(jobs),
        trained,
    )
    record = functools.partial(write_settings, sweep, settings, run_dir)
    chain_state = run_jobs(sweep.name, jobs, run_dir, executor, record, max_parallel, max_jobs)
    return settings, chain_state


def load_settings(run_dir: Path) -> tuple[SweepConfig, list[Setting]]:
    """The sweep config and settings a sweep folder records (for its report)."""
    path = run_dir / SWEEP_FILE
    try:
        record = json.loads(path.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: no sweep here (run cil-launch sweep first)") from None
    sweep = merge(SweepConfig, str(run_dir / "sweep.yaml"), where=str(run_dir / "sweep.yaml"))
    settings = []
    for i, entry in enumerate(record["settings"]):
        chain = load_chain(run_dir / "settings" / entry["label"] / "chain.yaml")
        settings.append(Setting(i, entry["overrides"], chain, entry["jobs"]))
    return sweep, settings
