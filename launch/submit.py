"""Submit a chain, watch it, cancel it.

``submit_chain`` validates the whole chain, records it in ``RUN_DIR/chain.json`` and then

* on **SLURM** submits every job at once, each ``afterok`` on its teacher stage (evaluations on
  their stage), and returns — the cluster runs the chain;
* **locally** drives the chain in this process: starts each job once its dependencies have
  completed (at most ``max_parallel`` at a time), and cancels the dependents of a failed job.

Re-submitting into an existing RUN_DIR resumes the chain: jobs whose output is complete and
verifies are skipped, jobs still queued or running on SLURM are kept, the rest are submitted
again (a stage resumes from its latest checkpoint).
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import time
from pathlib import Path

import submitit

from cil_dist import checkpoint as ckpt
from launch import state as st
from launch.chain import ChainConfig, JobSpec, chain_to_yaml
from launch.executors import log_path, make_executor
from launch.jobs import job_for
from launch.validate import validate_chain

log = logging.getLogger(__name__)

POLL_S = 1.0


def topological(jobs: dict[str, JobSpec]) -> list[str]:
    """Job names with every job after the jobs it depends on (config order otherwise)."""
    order: list[str] = []

    def visit(name: str) -> None:
        if name not in order:
            for dep in jobs[name].depends_on:
                visit(dep)
            order.append(name)

    for name in jobs:
        visit(name)
    return order


def output_verifies(job: JobSpec) -> str:
    """Why ``job``'s output is not complete yet ('' when it is)."""
    if job.kind == "eval":
        metrics = Path(job.out_dir) / "metrics.json"
        return "" if metrics.is_file() else f"{metrics} missing"
    try:
        payload = ckpt.load_checkpoint(job.checkpoint)
    except ckpt.CheckpointError as exc:
        return str(exc)
    mine = (job.train.stage.method, job.train.optim.epochs)
    theirs = (payload.get("method"), payload.get("state", {}).get("epoch"))
    return "" if mine == theirs else f"{job.checkpoint}: (method, epochs) {theirs} != {mine}"


def new_state(chain: ChainConfig, run_dir: Path, executor: str, jobs: dict[str, JobSpec]):
    records = {
        name: st.JobRecord(name, job.kind, list(job.depends_on), job.checkpoint, job.out_dir)
        for name, job in jobs.items()
    }
    stamp = st.now()
    return st.ChainState(chain.name, executor, str(run_dir), stamp, stamp, records)


def prepare_state(chain: ChainConfig, run_dir: Path, executor: str, jobs: dict[str, JobSpec]):
    """A fresh chain state, or the existing one with finished jobs marked as skipped."""
    if (run_dir / st.CHAIN_FILE).is_file():
        old = st.ChainState.load(run_dir)
        if set(old.jobs) != set(jobs):
            raise ValueError(
                f"{run_dir / st.CHAIN_FILE}: holds jobs {sorted(old.jobs)}, the chain has "
                f"{sorted(jobs)}; use a new --out folder for a different chain"
            )
        if old.executor != executor:
            raise ValueError(
                f"{run_dir}: submitted with --executor {old.executor}; resume it with the same"
            )
        refresh(old)
        chain_state = old
    else:
        chain_state = new_state(chain, run_dir, executor, jobs)
    for name, job in jobs.items():
        record = chain_state.jobs[name]
        if record.state in (st.PENDING, st.RUNNING):
            continue  # still queued or running on SLURM: keep it
        problem = output_verifies(job)
        record.state, record.error = (st.SKIPPED, "") if not problem else (st.WAITING, "")
    for name in topological(jobs):  # a stage that trains again gets evaluated again
        if chain_state.jobs[name].state != st.WAITING:
            continue
        for dependent in chain_state.dependents(name):
            record = chain_state.jobs[dependent]
            if record.state == st.SKIPPED and record.kind == "eval":
                record.state = st.WAITING
            elif record.state == st.SKIPPED:
                log.warning(
                    "%s is finished but %s, which it builds on, runs again: delete %s to "
                    "retrain it from the new checkpoint",
                    dependent,
                    name,
                    record.out_dir,
                )
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "chain.yaml").write_text(chain_to_yaml(chain))
    chain_state.save()
    return chain_state


def submit_chain(
    chain: ChainConfig,
    run_dir: Path,
    executor: str,
    source: str = "chain",
    max_parallel: int = 1,
) -> st.ChainState:
    """Validate, then submit (SLURM) or run (local/debug) every unfinished job of the chain."""
    run_dir = run_dir.resolve()
    jobs = validate_chain(chain, run_dir, executor, source)
    chain_state = prepare_state(chain, run_dir, executor, jobs)
    if executor == "slurm":
        submit_slurm(chain_state, jobs, run_dir)
    else:
        run_locally(chain_state, jobs, run_dir, executor, max_parallel)
    return chain_state


def submit_one(chain_state: st.ChainState, job: JobSpec, run_dir: Path, kind: str, after=None):
    record = chain_state.jobs[job.name]
    executor = make_executor(kind, job.resources, run_dir, f"{chain_state.name}.{job.name}", after)
    submitted = executor.submit(job_for(job, run_dir))
    record.job_id, record.state, record.error = str(submitted.job_id), st.PENDING, ""
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


def run_locally(
    chain_state: st.ChainState,
    jobs: dict[str, JobSpec],
    run_dir: Path,
    kind: str,
    max_parallel: int,
) -> None:
    """Run the chain on this machine, each job once its dependencies completed."""
    running: dict[str, submitit.Job] = {}
    done_ok = (st.COMPLETED, st.SKIPPED)
    chain_state.driver_pid = os.getpid()
    try:
        while True:
            for name, job in list(running.items()):
                if kind == "local" and not job.done():
                    continue
                del running[name]
                finish_local(chain_state, name, job)
            ready = [
                name
                for name in topological(jobs)
                if chain_state.jobs[name].state == st.WAITING
                and all(chain_state.jobs[dep].state in done_ok for dep in jobs[name].depends_on)
            ]
            for name in ready[: max(0, max_parallel - len(running))]:
                running[name] = submit_one(chain_state, jobs[name], run_dir, kind)
                chain_state.jobs[name].state = st.RUNNING
                if kind == "debug":
                    with_result(running[name])
            chain_state.save()
            if not running:
                break
            time.sleep(POLL_S)
    except KeyboardInterrupt:
        for name, job in running.items():
            job.cancel(check=False)
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


def finish_local(chain_state: st.ChainState, name: str, job: submitit.Job) -> None:
    """Record a local job's outcome from its status file; cancel dependents on failure."""
    record = chain_state.jobs[name]
    status = st.read_status(chain_state.run_dir, name)
    record.attempts = int(status.get("attempts", 0))
    if status.get("state") == st.COMPLETED:
        record.state = st.COMPLETED
        log.info("%s completed", name)
        return
    record.state = st.FAILED
    record.error = status.get("error") or "the job ended without reporting (see its log)"
    log.error("%s failed: %s (log: %s)", name, record.error, record.log)
    for dependent in chain_state.dependents(name):
        dep = chain_state.jobs[dependent]
        if dep.state == st.WAITING:
            dep.state, dep.error = st.CANCELLED, f"{name} failed"


# ---- status and cancel ---------------------------------------------------------------------


def sacct_states(job_ids: list[str]) -> dict[str, str]:
    """Current SLURM state of each job id (fresh from sacct, no caching)."""
    if not job_ids:
        return {}
    done = subprocess.run(
        ["sacct", "-n", "-X", "-P", "-o", "JobID,State", "-j", ",".join(job_ids)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    states = {}
    for line in done.stdout.splitlines():
        job_id, _, slurm_state = line.partition("|")
        states[job_id.strip()] = slurm_state.split()[0] if slurm_state else "UNKNOWN"
    return states


def pid_alive(pid: str) -> bool:
    try:
        os.kill(int(pid), 0)
    except (ValueError, ProcessLookupError):
        return False
    except PermissionError:
        return True
    return True


def refresh(chain_state: st.ChainState) -> st.ChainState:
    """Merge what the jobs reported with what the scheduler says; save and return it."""
    slurm = (
        sacct_states([r.job_id for r in chain_state.jobs.values() if r.job_id])
        if chain_state.executor == "slurm"
        else {}
    )
    for record in chain_state.jobs.values():
        if record.state in (st.SKIPPED,) or not record.job_id:
            continue
        status = st.read_status(chain_state.run_dir, record.name)
        record.attempts = int(status.get("attempts", record.attempts))
        raw = slurm.get(record.job_id, "UNKNOWN")
        if status.get("state") == st.COMPLETED:
            # The job reported its outputs; on SLURM it is final once the allocation has ended
            # too (teardown still runs), so `sacct` and the chain never disagree.
            ending = st.SLURM_STATES.get(raw) in (st.RUNNING, st.PENDING)
            record.state, record.error = (st.RUNNING if ending else st.COMPLETED), ""
            continue
        if chain_state.executor == "slurm":
            merged = st.SLURM_STATES.get(raw, record.state)
            if status.get("state") == st.FAILED:
                merged = st.FAILED
            record.state = merged
            if merged == st.FAILED:
                record.error = status.get("error") or f"SLURM state {raw} (see its log)"
            elif merged == st.CANCELLED and not record.error:
                record.error = f"SLURM state {raw}"
        elif record.state in (st.RUNNING, st.PENDING) and not pid_alive(record.job_id):
            record.state = st.FAILED if status.get("state") != st.COMPLETED else st.COMPLETED
            record.error = status.get("error") or "its process is gone without reporting"
    cancel_orphans(chain_state)
    chain_state.save()
    return chain_state


def cancel_orphans(chain_state: st.ChainState) -> None:
    """Dependents of a failed/cancelled job can never run: cancel them (belt and braces)."""
    for record in list(chain_state.jobs.values()):
        if record.state not in (st.FAILED, st.CANCELLED):
            continue
        for name in chain_state.dependents(record.name):
            dep = chain_state.jobs[name]
            if dep.state in (st.WAITING, st.PENDING):
                if chain_state.executor == "slurm" and dep.job_id:
                    subprocess.run(["scancel", dep.job_id], capture_output=True, check=False)
                dep.state, dep.error = st.CANCELLED, f"{record.name} did not complete"


def cancel_chain(run_dir: Path) -> st.ChainState:
    """Cancel every queued or running job of the chain."""
    chain_state = st.ChainState.load(run_dir)
    driver = str(chain_state.driver_pid)
    if chain_state.executor != "slurm" and chain_state.driver_pid and pid_alive(driver):
        os.kill(chain_state.driver_pid, signal.SIGINT)  # it cancels its jobs and records it
        deadline = time.monotonic() + 30
        while pid_alive(driver) and time.monotonic() < deadline:
            time.sleep(0.2)
    chain_state = refresh(st.ChainState.load(run_dir))
    for record in chain_state.jobs.values():
        if record.state not in (st.PENDING, st.RUNNING, st.WAITING):
            continue
        if record.job_id and chain_state.executor == "slurm":
            subprocess.run(["scancel", record.job_id], capture_output=True, check=False)
        elif record.job_id and pid_alive(record.job_id):
            os.kill(int(record.job_id), signal.SIGINT)  # the local controller stops its tasks
        record.state, record.error = st.CANCELLED, "cancelled by cil-launch cancel"
    chain_state.save()
    return chain_state


def wait_for_chain(run_dir: Path, poll_s: float = 5.0, timeout_s: float | None = None):
    """Block until every job of a SLURM chain is final; returns the final state."""
    start = time.monotonic()
    while True:
        chain_state = refresh(st.ChainState.load(run_dir))
        if all(r.state in st.FINAL_STATES for r in chain_state.jobs.values()):
            return chain_state
        if timeout_s is not None and time.monotonic() - start > timeout_s:
            raise TimeoutError(f"{run_dir}: chain not finished after {timeout_s:.0f} s")
        time.sleep(poll_s)
