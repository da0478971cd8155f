"""submitit executors for a job's resources: ``slurm``, ``local`` (no cluster) or ``debug``.

* ``slurm``: one sbatch job per stage, ``nodes × tasks_per_node`` tasks (one rank each),
  ``--gpus-per-node``, ``--signal=USR2@signal_delay_s`` (submitit), ``afterok`` dependencies
  and ``--kill-on-invalid-dep=yes`` so a failed stage takes its dependents with it; ``srun
  --kill-on-bad-exit=1`` ends a job's other ranks as soon as one of them exits with an error
  (instead of leaving them to wait for it until ``dist.timeout_s``).
* ``local``: submitit's local executor starts ``tasks_per_node`` processes on this machine
  (gloo on CPU); the chain driver in :mod:`launch.local_driver` respects the dependencies and
  ends a job's other ranks once one failed (:mod:`launch.rank_watch`).
* ``debug``: submitit's debug executor runs the job in the calling process (world size 1),
  for stepping through a stage with a debugger.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import submitit

from launch.chain import Resources

EXECUTORS = ("slurm", "local", "debug")


def sbatch_options(res: Resources) -> dict[str, Any]:
    """The sbatch options a job with ``res`` asks for (also used for ``--test-only``)."""
    options: dict[str, Any] = {
        "nodes": res.nodes,
        "ntasks_per_node": res.tasks_per_node,
        "cpus_per_task": res.cpus_per_task,
        "time": res.timeout_min,
    }
    if res.gpus_per_node:
        options["gpus_per_node"] = res.gpus_per_node
    if res.mem_gb:
        options["mem"] = f"{int(res.mem_gb * 1024)}M"
    for key in ("partition", "account", "qos", "constraint"):
        if getattr(res, key):
            options[key] = getattr(res, key)
    options.update(res.sbatch)
    return options


def submitit_folder(run_dir: Path) -> Path:
    return run_dir / "submitit"


def make_executor(
    kind: str, res: Resources, run_dir: Path, job_name: str, after: list[str] | None = None
) -> submitit.Executor:
    """An executor that submits one job with ``res`` (after the SLURM jobs ``after``)."""
    folder = submitit_folder(run_dir)
    if kind == "slurm":
        executor = submitit.SlurmExecutor(folder=folder, max_num_timeout=res.max_requeues)
        options = sbatch_options(res)
        extra = {"kill_on_invalid_dep": "yes"}
        named = {"nodes", "ntasks_per_node", "cpus_per_task", "time", "gpus_per_node", "mem"}
        named |= {"partition", "account", "qos", "constraint"}
        extra.update({k: v for k, v in options.items() if k not in named})
        executor.update_parameters(
            job_name=job_name,
            signal_delay_s=res.signal_delay_s,
            setup=list(res.setup),
            stderr_to_stdout=True,
            srun_args=["--kill-on-bad-exit=1"],
            additional_parameters=extra,
            **{k: v for k, v in options.items() if k in named},
            **({"dependency": "afterok:" + ":".join(after)} if after else {}),
        )
        return executor
    if kind == "local":
        executor = submitit.LocalExecutor(folder=folder, max_num_timeout=res.max_requeues)
        executor.update_parameters(
            tasks_per_node=res.tasks_per_node,
            gpus_per_node=res.gpus_per_node,
            timeout_min=res.timeout_min,
            signal_delay_s=res.signal_delay_s,
            stderr_to_stdout=True,
            setup=list(res.setup),
        )
        return executor
    if kind == "debug":
        return submitit.DebugExecutor(folder=folder)
    raise ValueError(f"--executor: expected one of {EXECUTORS}, got {kind!r}")


def log_path(job: submitit.Job) -> str:
    """Rank 0's log file (stdout and stderr) of a submitted job."""
    return str(job.paths.stdout)


def batch_log(run_dir: Path | str, job_id: str) -> Path:
    """A SLURM job's batch script output (srun's own messages), which is rank 0's log."""
    return submitit.core.utils.JobPaths(submitit_folder(Path(run_dir)), job_id, task_id=0).stdout
