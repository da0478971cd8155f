"""Status and cancel: merge what the jobs reported with what the scheduler (or the process
table) says, find the root cause of a failure, and stop a chain for sure — locally the driver and
every process of its jobs (controllers, ranks and their children, identified by pid and start
time) get SIGINT, then SIGTERM, then SIGKILL, until none is left; only then are the jobs recorded
as cancelled."""

from __future__ import annotations

import logging
import os
import subprocess
import time
from pathlib import Path

from launch import procs
from launch import state as st
from launch.executors import batch_log
from launch.slurm_states import slurm_states
from launch.srun_report import read_first_ended

log = logging.getLogger(__name__)


CANCEL_GRACE_S = 10.0  # cancel: seconds between SIGINT, SIGTERM and SIGKILL


class CancelIncomplete(RuntimeError):
    """Some process of the chain survived ``cil-launch cancel``."""


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


def blame_lost_ranks(chain_state: st.ChainState, record: st.JobRecord) -> None:
    """A failed SLURM job's ranks that srun saw end first and that recorded neither an error
    nor an end (killed from outside) get a ``RankLost`` error, so the root cause names them."""
    own = {r["rank"]: r for r in st.rank_records(chain_state.run_dir, record.name)}
    for ended in read_first_ended(batch_log(chain_state.run_dir, record.job_id)):
        rank = own.get(ended.rank, {})
        if not rank.get("error") and not rank.get("ended"):
            who = f"task {ended.rank} on {ended.host} (srun: {ended.reason})"
            st.rank_lost(chain_state.run_dir, record.name, ended.rank, who)


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
    return found + rank_processes(chain_state, record)


def rank_processes(chain_state: st.ChainState, record: st.JobRecord) -> list[tuple[int, str, str]]:
    """(pid, start time, label) of each rank of the job's current submission that recorded
    itself."""
    found = []
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
        slurm_states([r.job_id for r in chain_state.jobs.values() if r.job_id])
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
            # too (teardown still runs), so SLURM and the chain never disagree.
            ending = st.SLURM_STATES.get(raw) in (st.RUNNING, st.PENDING)
            record.state, record.error = (st.RUNNING if ending else st.COMPLETED), ""
            continue
        if chain_state.executor == "slurm":
            if record.job_id not in slurm:  # squeue/sacct did not answer: undecided
                continue
            merged = st.SLURM_STATES.get(raw, record.state)
            # SLURM's word while it still holds the job: a job requeued after its attempt
            # failed (a lost node: NODE_FAIL, then PENDING under the same id) runs again, so its
            # dependents stay queued; a failing attempt's teardown shows RUNNING until it ends
            held = raw in st.SLURM_STATES and merged in (st.PENDING, st.RUNNING)
            if status.get("state") == st.FAILED and not held:
                merged = st.FAILED
            newly_failed = merged == st.FAILED and record.state != st.FAILED
            record.state = merged
            if newly_failed:  # the job has ended: srun's report in its log is complete
                blame_lost_ranks(chain_state, record)
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
