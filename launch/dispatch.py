"""Submitting jobs through submitit: one job (any executor), or every unfinished job of a chain
at once on SLURM, each ``afterok`` on its unfinished dependencies."""

from __future__ import annotations

import logging
import time
from pathlib import Path

from launch import procs
from launch import state as st
from launch.chain import JobSpec
from launch.executors import log_path, make_executor
from launch.jobs import job_for
from launch.monitor import refresh
from launch.plan import topological

log = logging.getLogger(__name__)


def submit_one(chain_state: st.ChainState, job: JobSpec, run_dir: Path, kind: str, after=None):
    record = chain_state.jobs[job.name]
    st.clear_ranks(run_dir, job.name)
    if st.read_status(run_dir, job.name).get("state") == st.FAILED:  # a resubmitted failure:
        st.write_status(run_dir, job.name, state=st.PENDING)  # not failed before it starts
    executor = make_executor(kind, job.resources, run_dir, f"{chain_state.name}.{job.name}", after)
    submitted = executor.submit(job_for(job, run_dir))
    record.job_id, record.state, record.error = str(submitted.job_id), st.PENDING, ""
    record.started = procs.start_time(int(submitted.job_id)) if kind == "local" else ""
    record.log = log_path(submitted)
    record.submissions.append(record.job_id)
    log.info("submitted %s %s as job %s", job.kind, job.name, record.job_id)
    return submitted


def submit_slurm(
    chain_state: st.ChainState,
    jobs: dict[str, JobSpec],
    run_dir: Path,
    max_jobs: int = 0,
    poll_s: float = 5.0,
) -> None:
    """Every unfinished job, each ``afterok`` on its unfinished dependencies: all at once, or
    (``max_jobs``) at most that many in the queue at a time — then this process stays and
    submits the next as jobs leave the queue."""
    while True:
        queued = sum(r.state in (st.PENDING, st.RUNNING) for r in chain_state.jobs.values())
        for name in topological(jobs):
            record = chain_state.jobs[name]
            if record.state != st.WAITING:
                continue
            deps = [chain_state.jobs[dep] for dep in jobs[name].depends_on]
            if any(dep.state in (st.FAILED, st.CANCELLED) for dep in deps):
                record.state, record.error = st.CANCELLED, "a job it depends on did not complete"
                continue
            if any(dep.state == st.WAITING for dep in deps) or (max_jobs and queued >= max_jobs):
                continue  # its dependency is not queued yet, or the queue is full
            after = [dep.job_id for dep in deps if dep.state not in (st.SKIPPED, st.COMPLETED)]
            submit_one(chain_state, jobs[name], run_dir, "slurm", after)
            queued += 1
            chain_state.save()
        chain_state.save()
        if not any(r.state == st.WAITING for r in chain_state.jobs.values()):
            return
        time.sleep(poll_s)
        refresh(chain_state)
