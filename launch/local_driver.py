"""The local driver: runs a chain on this machine, each job once its dependencies completed (at
most ``max_parallel`` at a time), adopting jobs a previous driver left running, stopping a job's
other ranks once one failed (:mod:`launch.rank_watch`), cancelling the dependents of a failed
job, and stopping when ``cil-launch cancel`` asks."""

from __future__ import annotations

import logging
import os
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import submitit

from launch import procs
from launch import state as st
from launch.chain import JobSpec
from launch.dispatch import submit_one
from launch.monitor import job_alive, record_failure
from launch.plan import launch_order
from launch.rank_watch import RankWatch

log = logging.getLogger(__name__)


POLL_S = 1.0


@dataclass
class Running:
    """A job the local driver waits for: one it started, or one it adopted."""

    done: Callable[[], bool]
    cancel: Callable[[], None]


def started_job(job: submitit.Job, kind: str) -> Running:
    done = job.done if kind == "local" else (lambda: True)
    return Running(done, lambda: job.cancel(check=False))


def adopted_job(chain_state: st.ChainState, name: str) -> Running:
    """A job a previous driver started whose processes still run: wait for them to end."""
    record = chain_state.jobs[name]
    log.warning("%s (job %s) runs from a previous driver: waiting for it", name, record.job_id)

    def cancel() -> None:
        if procs.alive(int(record.job_id), record.started):
            os.kill(int(record.job_id), signal.SIGINT)  # the controller stops its tasks

    return Running(lambda: not job_alive(chain_state, record), cancel)


def run_locally(
    chain_state: st.ChainState,
    jobs: dict[str, JobSpec],
    run_dir: Path,
    kind: str,
    max_parallel: int,
) -> None:
    """Run the chain on this machine, each job once its dependencies completed."""
    running = {
        name: adopted_job(chain_state, name)
        for name, record in chain_state.jobs.items()
        if record.state in (st.PENDING, st.RUNNING)  # refresh found its processes alive
    }
    done_ok = (st.COMPLETED, st.SKIPPED)
    watch = RankWatch(chain_state)
    chain_state.driver_pid = os.getpid()
    chain_state.driver_started = procs.start_time(chain_state.driver_pid)
    try:
        while True:
            if st.cancel_marker(run_dir).exists():  # cil-launch cancel, even if SIGINT is ignored
                raise KeyboardInterrupt
            for name, job in list(running.items()):
                if not job.done():
                    continue
                del running[name]
                watch.forget(name)
                finish_local(chain_state, name)
            if kind == "local":
                watch.check(list(running))
            ready = [
                name
                for name in launch_order(jobs)
                if chain_state.jobs[name].state == st.WAITING
                and all(chain_state.jobs[dep].state in done_ok for dep in jobs[name].depends_on)
            ]
            for name in ready[: max(0, max_parallel - len(running))]:
                submitted = submit_one(chain_state, jobs[name], run_dir, kind)
                running[name] = started_job(submitted, kind)
                chain_state.jobs[name].state = st.RUNNING
                if kind == "debug":
                    with_result(submitted)
            chain_state.save()
            if not running:
                break
            time.sleep(POLL_S)
    except KeyboardInterrupt:
        for name, job in running.items():
            job.cancel()
            chain_state.jobs[name].state = st.CANCELLED
            chain_state.jobs[name].error = "cancelled (interrupted)"
        for record in chain_state.jobs.values():
            if record.state == st.WAITING:
                record.state, record.error = st.CANCELLED, "cancelled (interrupted)"
        chain_state.driver_pid = 0
        chain_state.save()
        raise
    for record in chain_state.jobs.values():
        if record.state == st.WAITING:  # a dependency failed
            record.state, record.error = st.CANCELLED, "a job it depends on did not complete"
    chain_state.driver_pid = 0
    chain_state.save()


def with_result(job: submitit.Job) -> None:
    """Run a debug job now (in this process); failures are read from its status file."""
    try:
        job.result()
    except Exception as exc:  # the status file has the details
        log.debug("debug job failed: %s", exc)


def finish_local(chain_state: st.ChainState, name: str) -> None:
    """Record a local job's outcome from its status file; cancel dependents on failure."""
    record = chain_state.jobs[name]
    status = st.read_status(chain_state.run_dir, name)
    record.attempts = int(status.get("attempts", 0))
    if status.get("state") == st.COMPLETED:
        record.state = st.COMPLETED
        log.info("%s completed", name)
        return
    record.state = st.FAILED
    record_failure(chain_state, record, status, "the job ended without reporting (see its log)")
    log.error("%s failed: %s (log: %s)", name, record.error, record.log)
    for dependent in chain_state.dependents(name):
        dep = chain_state.jobs[dependent]
        if dep.state == st.WAITING:
            dep.state, dep.error = st.CANCELLED, f"{name} failed"
