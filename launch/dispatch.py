"""Submitting jobs through submitit: one job (any executor), or every unfinished job of a chain
at once on SLURM, each ``afterok`` on its unfinished dependencies."""

from __future__ import annotations

import logging
from pathlib import Path

from launch import procs
from launch import state as st
from launch.chain import JobSpec
from launch.executors import log_path, make_executor
from launch.jobs import job_for
from launch.plan import topological

log = logging.getLogger(__name__)


def submit_one(chain_state: st.ChainState, job: JobSpec, run_dir: Path, kind: str, after=None):
    record = chain_state.jobs[job.name]
    st.clear_ranks(run_dir, job.name)
    executor = make_executor(kind, job.resources, run_dir, f"{chain_state.name}.{job.name}", after)
    submitted = executor.submit(job_for(job, run_dir))
    record.job_id, record.state, record.error = str(submitted.job_id), st.PENDING, ""
    record.started = procs.start_time(int(submitted.job_id)) if kind == "local" else ""
    record.log = log_path(submitted)
    record.submissions.append(record.job_id)
    log.info("submitted %s %s as job %s", job.kind, job.name, record.job_id)
    return submitted


def submit_slurm(chain_state: st.ChainState, jobs: dict[str, JobSpec], run_dir: Path) -> None:
    """Every unfinished job at once, each ``afterok`` on its unfinished dependencies."""
    for name in topological(jobs):
        record = chain_state.jobs[name]
        if record.state in st.FINAL_STATES or record.state in (st.PENDING, st.RUNNING):
            continue
        after = [
            chain_state.jobs[dep].job_id
            for dep in jobs[name].depends_on
            if chain_state.jobs[dep].state not in (st.SKIPPED, st.COMPLETED)
        ]
        submit_one(chain_state, jobs[name], run_dir, "slurm", after)
        chain_state.save()
