"""Check a whole chain before anything is queued, and report every problem at once.

Checked: the train config of every stage builds; the teacher wiring (exists, no cycles, one
stage back, class counts agree); the shards (manifest readable, the splits each job reads are
in it, shard files present); every stage's ``model.encoder_init`` (the file loads as an
encoder initialisation); the evaluations' task sets; the report rows; the resources (and on
SLURM, ``sbatch --test-only`` asks the controller whether each job could ever run); and that
the run folder is writable.
"""

from __future__ import annotations

import logging
import shutil
import subprocess
import tempfile
from pathlib import Path

from cil_dist import storage, urls
from cil_dist.config import (
    ConfigError,
    method_problem,
    teacher_classes_problem,
    teacher_problem,
)
from cil_dist.data.manifest import Manifest, ManifestError
from cil_dist.protocol import ProtocolError, TaskProtocol
from cil_dist.training.stage import StagePlan, plan_stage
from launch.chain import (
    ChainConfig,
    JobSpec,
    Resources,
    expand,
    resources_of,
    stage_train_config,
)

log = logging.getLogger(__name__)


class ChainError(ValueError):
    """The chain cannot run; ``problems`` lists every reason."""

    def __init__(self, source: str, problems: list[str]):
        self.problems = [urls.redact_url(p) for p in problems]  # URLs without credentials
        lines = "\n".join(f"  - {p}" for p in self.problems)
        super().__init__(f"{source}: {len(problems)} problem(s), nothing submitted:\n{lines}")


def teacher_problems(chain: ChainConfig) -> list[str]:
    """Methods and teacher wiring, by the trainer's own rules (:mod:`cil_dist.config`), and no
    teacher loops."""
    problems = []
    for name, spec in chain.stages.items():
        where = f"stages.{name}"
        if problem := method_problem(spec.method):
            problems.append(f"{where}.method: {problem}")
        if spec.teacher and spec.teacher not in chain.stages:
            problems.append(f"{where}.teacher: {spec.teacher!r} is not a stage of the chain")
        elif problem := teacher_problem(spec.method, spec.stage, bool(spec.teacher)):
            problems.append(f"{where}.teacher: {problem}")
        seen, current = {name}, spec.teacher
        while current in chain.stages:
            if current in seen:
                problems.append(f"{where}.teacher: the teacher chain loops back to {current!r}")
                break
            seen.add(current)
            current = chain.stages[current].teacher
    return problems


def plans_of(chain: ChainConfig, run_dir: Path, problems: list[str]) -> dict[str, StagePlan]:
    """Each stage's plan; stages whose wiring is already reported are left out."""
    plans = {}
    reported = {p.split(".")[1].split(":")[0] for p in problems if p.startswith("stages.")}
    try:
        protocol = TaskProtocol.load(chain.tasks)
    except (ProtocolError, FileNotFoundError) as exc:
        problems.append(f"tasks: {exc}")
        return plans
    for name in chain.stages:
        if name in reported:
            continue
        try:
            cfg = stage_train_config(chain, name, run_dir)
            cfg.validate()
            plans[name] = plan_stage(cfg, protocol)
        except (ConfigError, FileNotFoundError) as exc:
            prefix = f"stages.{name}: "  # stage_train_config's errors name the stage already
            problems.append(str(exc) if str(exc).startswith(prefix) else prefix + str(exc))
    for name, spec in chain.stages.items():
        teacher = spec.teacher
        if name in plans and teacher in plans and plans[name].uses_previous:
            prior, plan = plans[teacher], plans[name]
            problem = teacher_classes_problem(
                prior.num_classes, plan.num_old_classes, plan.stage, prior.method
            )
            if problem:
                problems.append(
                    f"stages.{name}.teacher: {teacher!r} ({prior.method}, stage {prior.stage}) "
                    + problem
                )
    return plans


def data_problems(jobs: dict[str, JobSpec], plans: dict[str, StagePlan]) -> list[str]:
    """Manifests readable, the splits each job needs present, local shard files in place."""
    problems, manifests = [], {}
    for name, job in jobs.items():
        url = job.train.data.manifest
        if not url:
            continue  # shard URLs without a manifest: nothing to check up front
        options = storage.StorageOptions.from_data_config(job.train.data)  # its S3 endpoint
        if url not in manifests:
            unreadable = storage.check_readable(url, options)
            if unreadable:
                manifests[url] = None
                problems.append(f"{name}: data.manifest: {unreadable}")
                continue
            try:
                manifests[url] = Manifest.load(url, options)
            except (ManifestError, OSError) as exc:
                manifests[url] = None
                problems.append(f"{name}: data.manifest: {urls.redact_url(str(exc))}")
                continue
            problems += shard_file_problems(url, manifests[url], options)
        manifest = manifests[url]
        if manifest is None:
            continue
        plan = plans.get(job.name if job.kind == "train" else job.depends_on[0])
        needed = list(plan.splits) if plan and job.kind == "train" else []
        needed += [job.split] if job.kind == "eval" else []
        curves = list(job.train.eval.splits) if job.train.eval.every_epochs else []
        for split in needed + [s for s in curves if s not in needed]:
            if split not in manifest.splits:
                key = "eval.splits: " if split in curves and split not in needed else ""
                problems.append(
                    f"{name}: {key}split {split!r} is not in {urls.redact_url(url)} "
                    f"(it has {', '.join(manifest.splits)})"
                )
        if job.kind == "train" and needed and all(s in manifest.splits for s in needed):
            problems += batch_problems(name, job, sum(manifest.splits[s].samples for s in needed))
    return problems


def batch_problems(name: str, job: JobSpec, samples: int) -> list[str]:
    """The job's ranks must split the global batch and find a full step in its samples (the
    trainer's rule, :meth:`~cil_dist.config.DataConfig.batches_per_epoch`)."""
    try:
        job.train.data.batches_per_epoch(samples, job.resources.world_size)
    except ConfigError as exc:
        return [f"{name}: {exc}"]
    return []


def shard_file_problems(
    url: str, manifest: Manifest, options: storage.StorageOptions | None = None
) -> list[str]:
    """Local shards must all exist; of remote ones the first of each split must be readable
    (checking thousands of objects one by one would take longer than the check is worth)."""
    missing = []
    for split in manifest.splits.values():
        for index, shard in enumerate(split.shards):
            target = urls.join(urls.parent(url), shard.file)
            if urls.is_local(target):
                if not Path(urls.local_path(target)).is_file():
                    missing.append(shard.file)
            elif index == 0 and storage.check_readable(target, options):
                missing.append(shard.file)
    if not missing:
        return []
    shown = urls.redact_url(url)
    return [
        f"data.manifest: {shown} lists {len(missing)} missing or unreadable shard(s): "
        + ", ".join(missing[:5])
    ]


def encoder_init_problems(chain: ChainConfig, run_dir: Path) -> list[str]:
    """Every stage's ``model.encoder_init`` exists and loads; each distinct file is read once.

    Stages whose train config does not build are left out (:func:`plans_of` reports them).
    """
    problems: list[str] = []
    verdicts: dict[str, str] = {}
    for name in chain.stages:
        try:
            path = stage_train_config(chain, name, run_dir).model.encoder_init
        except (ConfigError, FileNotFoundError):
            continue
        if not path:
            continue
        if path not in verdicts:
            verdicts[path] = encoder_init_verdict(path)
        if verdicts[path]:
            problems.append(f"stages.{name}: {verdicts[path]}")
    return problems


def encoder_init_verdict(path: str) -> str:
    """'' when ``path`` loads into a fresh ERFNet's encoder, else the loader's one-line error."""
    from cil_dist.model import EncoderInitError, check_encoder_init

    try:
        check_encoder_init(path)
    except EncoderInitError as exc:
        return str(exc)
    log.info("model.encoder_init: %s loads as an encoder initialisation", path)
    return ""


def eval_problems(chain: ChainConfig, plans: dict[str, StagePlan]) -> list[str]:
    problems = []
    for name, spec in chain.evaluations.items():
        plan = plans.get(spec.stage)
        if plan is None:
            if spec.stage not in chain.stages:
                problems.append(f"evaluations.{name}.stage: {spec.stage!r} is not a stage")
            continue
        for task_set in map(str, spec.task_sets):
            if task_set not in plan.protocol.eval_task_sets:
                known = ", ".join(plan.protocol.eval_task_sets)
                problems.append(
                    f"evaluations.{name}.task_sets: {task_set!r} is not a task set ({known})"
                )
            elif task_set not in plan.task_sets:
                problems.append(
                    f"evaluations.{name}.task_sets: {task_set!r} needs classes that stage "
                    f"{spec.stage!r} ({plan.num_classes} classes) does not have"
                )
    for label, evaluation in chain.report.items():
        if evaluation not in chain.evaluations:
            problems.append(f"report.{label}: {evaluation!r} is not an evaluation")
    for key, label in vars(chain.summary).items():
        if label and label not in chain.report:
            problems.append(f"summary.{key}: {label!r} is not a row of report")
    return problems


def resource_problems(name: str, res: Resources, executor: str) -> list[str]:
    where, problems = f"{name}.resources", []
    if res.nodes < 1 or res.tasks_per_node < 1 or res.cpus_per_task < 1:
        problems.append(f"{where}: nodes, tasks_per_node and cpus_per_task must be >= 1")
    if res.gpus_per_node not in (0, res.tasks_per_node):
        problems.append(
            f"{where}.gpus_per_node: {res.gpus_per_node} GPUs for {res.tasks_per_node} tasks "
            "per node; the trainer runs one rank per GPU (set them equal, or 0 for CPU)"
        )
    if res.timeout_min < 1 or res.max_requeues < 0:
        problems.append(f"{where}: timeout_min must be >= 1 and max_requeues >= 0")
    if executor == "local" and res.nodes != 1:
        problems.append(f"{where}.nodes: the local executor runs on one node, not {res.nodes}")
    if executor == "local" and res.gpus_per_node:
        import torch

        if res.gpus_per_node > torch.cuda.device_count():
            problems.append(
                f"{where}.gpus_per_node: {res.gpus_per_node} GPUs asked, "
                f"{torch.cuda.device_count()} here"
            )
    return problems


def sbatch_test_only(name: str, res: Resources) -> list[str]:
    """Ask the SLURM controller whether this job could ever start (nothing is queued)."""
    from launch.executors import sbatch_options

    if not shutil.which("sbatch"):
        return ["executor slurm: `sbatch` is not on PATH (run on a cluster login node)"]
    args = ["sbatch", "--test-only", "--wrap", "true"]
    for key, value in sbatch_options(res).items():
        args.append(f"--{key.replace('_', '-')}" + ("" if value is True else f"={value}"))
    done = subprocess.run(args, capture_output=True, text=True, timeout=60)
    if done.returncode != 0:
        reason = (done.stderr or done.stdout).strip().splitlines()
        return [f"{name}.resources: SLURM refuses the job: {reason[-1] if reason else '?'}"]
    return []


def writable_problems(run_dir: Path) -> list[str]:
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=run_dir, prefix=".write-test"):
            pass
    except OSError as exc:
        return [f"--out {run_dir}: not writable ({exc})"]
    return []


def job_resources(chain: ChainConfig, problems: list[str]) -> dict[str, Resources]:
    """Every job's resources (chain defaults, eval defaults, its own keys on top)."""
    found = {}
    for kind, specs, layers in (
        ("stages", chain.stages, []),
        ("evaluations", chain.evaluations, [chain.eval_resources]),
    ):
        for name, spec in specs.items():
            try:
                found[f"{kind}.{name}"] = resources_of(
                    chain.resources, *layers, spec.resources, where=f"{kind}.{name}.resources"
                )
            except ConfigError as exc:
                problems.append(str(exc))
    return found


def validate_chain(
    chain: ChainConfig, run_dir: Path, executor: str, source: str = "chain"
) -> dict[str, JobSpec]:
    """The chain's jobs, or :class:`ChainError` listing every problem found."""
    problems = [] if chain.stages else ["stages: the chain has no stages"]
    problems += teacher_problems(chain)
    plans = plans_of(chain, run_dir, problems)
    jobs: dict[str, JobSpec] = {}
    if not problems:
        try:
            jobs = expand(chain, run_dir)
        except ConfigError as exc:
            problems.append(str(exc))
    problems += encoder_init_problems(chain, run_dir)
    problems += eval_problems(chain, plans)
    problems += data_problems(jobs, plans)
    checked: set[str] = set()
    for name, resources in job_resources(chain, problems).items():
        problems += resource_problems(name, resources, executor)
        key = repr(resources)
        if executor == "slurm" and key not in checked:
            checked.add(key)
            problems += sbatch_test_only(name, resources)
    problems += writable_problems(run_dir)
    if problems:  # a reason shared by several jobs (no sbatch on PATH) is listed once
        raise ChainError(source, list(dict.fromkeys(problems)))
    return jobs
