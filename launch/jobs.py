"""The callables submitit runs: one per task (rank) of a stage or evaluation job.

Each sets up torch.distributed from submitit's job environment (rank, world size, local rank
and master address from SLURM or the local executor), then calls the trainer or the evaluator.
They are :class:`submitit.helpers.Checkpointable`: on preemption or time-out, rank 0 requeues
the same call, and the trainer resumes from the run folder's latest checkpoint (written every
``checkpoint.every_epochs``), so no finished epoch is redone.

submitit pickles these by reference: this module must be importable inside the job (it is,
once the project is installed — ``make setup`` / ``pip install``).
"""

from __future__ import annotations

import hashlib
import logging
import os
from pathlib import Path

import submitit

from cil_dist.logs import setup_logging
from launch import procs, state
from launch.chain import JobSpec

log = logging.getLogger(__name__)


# The rendezvous port of a multi-rank job, below Linux's ephemeral ports (32768-60999 by
# default). submitit's own pick (20000-60000) falls among them most of the time: ports the kernel
# hands out to outgoing connections and to gloo's listeners, so rank 0 could find its port taken
# (EADDRINUSE) and the other ranks then waited for it until dist.timeout_s.
RENDEZVOUS_PORTS = range(20000, 32768)


def rendezvous_port(job_id: str) -> int:
    """The job's MASTER_PORT, derived from its id: the same on every rank and node, another for
    a job running beside it (a local job's id is its process id, a SLURM job's its job id)."""
    digest = hashlib.sha256(job_id.encode()).digest()
    return RENDEZVOUS_PORTS[int.from_bytes(digest[:4], "big") % len(RENDEZVOUS_PORTS)]


def export_distributed_env() -> tuple[int, int, str, str]:
    """Export RANK/WORLD_SIZE/LOCAL_RANK/MASTER_* from submitit's job (MASTER_PORT:
    :func:`rendezvous_port`, also over one inherited from the submitting shell).

    Returns (rank, world size, job id, this rank's log file).
    """
    logging.getLogger("submitit").propagate = False  # it has its own handler
    job = submitit.JobEnvironment()
    if job.num_tasks > 1:
        os.environ["MASTER_PORT"] = str(rendezvous_port(str(job.job_id)))
        # Keep every GPU visible: DistEnv picks cuda:LOCAL_RANK itself.
        submitit.helpers.TorchDistributedEnvironment().export(
            set_cuda_visible_devices=False, overwrite=True
        )
    return job.global_rank, job.num_tasks, str(job.job_id), rank_log(job)


def rank_log(job: submitit.JobEnvironment) -> str:
    """This rank's log file ('' under the debug executor, which logs to the caller)."""
    if "SUBMITIT_FOLDER" not in os.environ:
        return ""
    return str(job.paths.stdout)


class ChainJob(submitit.helpers.Checkpointable):
    """A job of a chain: records its attempts and outcome in ``RUN_DIR/status/NAME.json``."""

    def __init__(self, spec: JobSpec, run_dir: str):
        self.spec = spec
        self.run_dir = run_dir
        self._preempted = False  # set in this process when submitit calls checkpoint()

    def __call__(self) -> str:
        self._preempted = False  # the requeued copy of this object was pickled with True
        # each rank's intra-op threads on CPU: the job's cpus_per_task, on every executor
        os.environ["OMP_NUM_THREADS"] = str(self.spec.resources.cpus_per_task)
        rank, world_size, job_id, rank_log = export_distributed_env()
        setup_logging(rank)  # the attempt line below reaches the rank's log
        pid = os.getpid()
        state.rank_started(
            self.run_dir,
            self.spec.name,
            rank,
            world_size,
            job_id=job_id,
            pid=pid,
            started=procs.start_time(pid),
            log=rank_log,
        )
        if rank == 0:
            attempt = state.job_started(self.run_dir, self.spec.name, job_id, world_size)
            where = ""
            if world_size > 1:  # where the ranks met (a port clash shows here)
                where = f", rendezvous {os.environ['MASTER_ADDR']}:{os.environ['MASTER_PORT']}"
            log.info(
                "%s %s: attempt %d (job %s, %d rank(s)%s)",
                self.spec.kind,
                self.spec.name,
                attempt,
                job_id,
                world_size,
                where,
            )
        try:
            result = self.run()
        except Exception as exc:
            # submitit ends a preempted task by raising SystemExit wherever it is; code in
            # between (a file writer's cleanup) may turn that into another error. The job is
            # requeued all the same: record it as pending, not failed. The other ranks then
            # lose their peer: part of the requeue too, not an error of theirs.
            requeued = self._preempted or state.requeue_pending(self.run_dir, self.spec.name)
            if not requeued:  # every rank its own error: the cause may be on any
                state.rank_failed(self.run_dir, self.spec.name, rank, exc)
            if rank == 0 and not self._preempted:
                state.job_failed(self.run_dir, self.spec.name, exc)
            raise
        finally:  # also on SystemExit (submitit's requeue) or KeyboardInterrupt
            state.rank_ended(self.run_dir, self.spec.name, rank)
        if rank == 0:
            state.job_finished(self.run_dir, self.spec.name, result)
        return result

    def run(self) -> str:
        raise NotImplementedError

    def checkpoint(self, *args, **kwargs) -> submitit.helpers.DelayedSubmission:
        """Called by submitit on rank 0 when SLURM signals preemption or the time limit."""
        self._preempted = True
        state.write_status(
            self.run_dir, self.spec.name, state=state.PENDING, preempted=True, requeue_pending=True
        )
        log.warning("%s: preempted; requeueing (resumes from its last checkpoint)", self.spec.name)
        return super().checkpoint(*args, **kwargs)


class TrainJob(ChainJob):
    def run(self) -> str:
        from cil_dist.training.train import run_training

        return str(run_training(self.spec.train))


class EvalJob(ChainJob):
    def run(self) -> str:
        from cil_dist.evaluation.evaluate import run_evaluation

        spec = self.spec
        out = Path(spec.out_dir)
        run_evaluation(
            spec.checkpoint,
            spec.train,
            spec.task_sets or None,
            spec.split,
            out,
            out / "predictions" if spec.export_predictions else None,
        )
        return str(out / "metrics.json")


def job_for(spec: JobSpec, run_dir: Path) -> ChainJob:
    return (TrainJob if spec.kind == "train" else EvalJob)(spec, str(run_dir))
