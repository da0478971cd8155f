"""Submit a chain, watch it, cancel it.

``submit_chain`` validates the whole chain, records it in ``RUN_DIR/chain.json`` and then

* on **SLURM** submits every job at once, each ``afterok`` on its teacher stage (evaluations on
  their stage), and returns — the cluster runs the chain;
* **locally** drives the chain in this process: starts each job once its dependencies have
  completed (at most ``max_parallel`` at a time), and cancels the dependents of a failed job.

Re-submitting into an existing RUN_DIR resumes the chain: jobs whose output is complete and
verifies are skipped, jobs still queued or running on SLURM are kept, the rest are submitted
again (a stage resumes from its latest checkpoint). Locally, a job left running by a driver
that died (kill -9, out of memory) is adopted — waited for, then the chain goes on — and one
whose processes are gone runs again; a chain whose driver still runs is refused.

``cancel_chain`` stops a local chain for sure: the driver and every process of its jobs
(controllers, ranks and their children, identified by pid and start time) get SIGINT, then
SIGTERM, then SIGKILL, until none is left; only then are the jobs recorded as cancelled.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import submitit

from cil_dist import checkpoint as ckpt
from launch import procs
from launch import state as st
from launch.chain import ChainConfig, JobSpec, chain_to_yaml
from launch.executors import log_path, make_executor
from launch.jobs import job_for
from launch.validate import validate_chain

log = logging.getLogger(__name__)

POLL_S = 1.0
CANCEL_GRACE_S = 10.0  # cancel: seconds between SIGINT, SIGTERM and SIGKILL


class CancelIncomplete(RuntimeError):
    """Some process of the chain survived ``cil-launch cancel``."""


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
    refuse_live_driver(run_dir)
    st.cancel_marker(run_dir).unlink(missing_ok=True)
    chain_state = prepare_state(chain, run_dir, executor, jobs)
    if executor == "slurm":
        submit_slurm(chain_state, jobs, run_dir)
    else:
        run_locally(chain_state, jobs, run_dir, executor, max_parallel)
    return chain_state


def refuse_live_driver(run_dir: Path) -> None:
    """A local chain is driven by one process at a time."""
    if not (run_dir / st.CHAIN_FILE).is_file():
        return
    old = st.ChainState.load(run_dir)
    if old.driver_pid and procs.alive(old.driver_pid, old.driver_started):
        raise ValueError(
            f"{run_dir}: this chain is still running (driver pid {old.driver_pid}); wait for it "
            "or stop it with cil-launch cancel"
        )


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
                finish_local(chain_state, name)
            ready = [
                name
                for name in topological(jobs)
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


def record_failure(chain_state: st.ChainState, record: st.JobRecord, status: dict, why: str):
    """The failed job's error and log: its root-cause rank's (see :func:`state.root_cause`),
    else rank 0's status, else ``why``."""
    cause = st.root_cause(chain_state.run_dir, record.name)
    if cause is None:
        record.error = status.get("error") or why
        return
    several = int(cause.get("world_size", 1)) > 1
    record.error = f"rank {cause['rank']}: {cause['error']}" if several else cause["error"]
    record.log = cause.get("log") or record.log


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


def job_processes(chain_state: st.ChainState, record: st.JobRecord) -> list[tuple[int, str, str]]:
    """(pid, start time, label) of a local job's controller and of each of its ranks."""
    found = []
    if record.job_id.isdigit():
        found.append((int(record.job_id), record.started, f"{record.name} (job {record.job_id})"))
    for rank in st.rank_records(chain_state.run_dir, record.name):
        if str(rank.get("job_id", "")) == record.job_id and rank.get("pid"):
            label = f"{record.name} rank {rank['rank']}"
            found.append((int(rank["pid"]), rank.get("started", ""), label))
    return found


def job_alive(chain_state: st.ChainState, record: st.JobRecord) -> bool:
    """Whether a process of the local job (its controller or a rank) still runs."""
    table = procs.snapshot()
    return any(procs.alive(p, t, table) for p, t, _ in job_processes(chain_state, record))


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
                record_failure(chain_state, record, status, f"SLURM state {raw} (see its log)")
            elif merged == st.CANCELLED and not record.error:
                record.error = f"SLURM state {raw}"
        elif record.state in (st.RUNNING, st.PENDING) and not job_alive(chain_state, record):
            record.state = st.FAILED
            record_failure(chain_state, record, status, "its process is gone without reporting")
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


def cancel_chain(run_dir: Path, grace_s: float = CANCEL_GRACE_S) -> st.ChainState:
    """Cancel every queued or running job of the chain (locally: stop all its processes)."""
    chain_state = st.ChainState.load(run_dir)
    if chain_state.executor == "slurm":
        return cancel_slurm(refresh(chain_state))
    st.cancel_marker(run_dir).write_text(st.now() + "\n")  # the driver stops at its next poll
    survivors = stop_local(chain_state, grace_s)
    chain_state = st.ChainState.load(run_dir)  # what the driver recorded before it ended
    survivors |= stop_local(chain_state, grace_s)  # a job it started while interrupted
    holding = {label.split()[0] for label in survivors.values()}
    for record in chain_state.jobs.values():
        if record.state in st.FINAL_STATES - {st.CANCELLED} or record.name in holding:
            continue
        if st.read_status(run_dir, record.name).get("state") == st.COMPLETED:
            record.state, record.error = st.COMPLETED, ""
        elif record.state != st.CANCELLED:
            record.state, record.error = st.CANCELLED, "cancelled by cil-launch cancel"
    chain_state.driver_pid = 0 if "driver" not in holding else chain_state.driver_pid
    chain_state.save()
    if survivors:
        named = ", ".join(f"pid {pid} ({label})" for pid, label in survivors.items())
        raise CancelIncomplete(f"{run_dir}: still running after SIGKILL: {named}")
    return chain_state


def stop_local(chain_state: st.ChainState, grace_s: float) -> dict[int, str]:
    """Stop the driver and every process of the chain's jobs; returns survivors' labels."""
    table = procs.snapshot()
    targets = procs.Targets()
    targets.add(chain_state.driver_pid, chain_state.driver_started, "driver", table)
    controllers = []
    for record in chain_state.jobs.values():
        for pid, started, label in job_processes(chain_state, record):
            targets.add(pid, started, label, table)
            if label.endswith(f"(job {record.job_id})") and pid in targets.known:
                controllers.append(pid)
    driver = [pid for pid in targets.known if targets.label(pid) == "driver"]
    targets.live(table)  # their children (data loader workers, ...) too
    if not targets.known:
        return {}
    # the driver interrupts its jobs itself; without one, each controller stops its tasks
    survivors = procs.stop(targets, driver or controllers, grace_s)
    return {pid: targets.label(pid) for pid in survivors}


def cancel_slurm(chain_state: st.ChainState) -> st.ChainState:
    """scancel every queued or running job of a SLURM chain."""
    for record in chain_state.jobs.values():
        if record.state not in (st.PENDING, st.RUNNING, st.WAITING):
            continue
        if record.job_id:
            subprocess.run(["scancel", record.job_id], capture_output=True, check=False)
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
