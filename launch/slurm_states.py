"""What SLURM says about a chain's jobs: the controller's word while it holds a job, else the
accounting database's.

``slurmctld`` (``squeue``) changes a job's state atomically; the accounting database
(``sacct``) lags behind it: a job requeued after losing a node shows ``NODE_FAIL`` there for a
moment before ``PENDING``. Read alone, that moment looks like a final failure, and the chain would
cancel the dependents of a job that is about to run again. ``sacct`` answers for jobs the
controller has forgotten (``MinJobAge`` after they ended).
"""

from __future__ import annotations

import logging
import subprocess

log = logging.getLogger(__name__)

QUERY_TIMEOUT_S = 60
NOT_KNOWN = "UNKNOWN"  # both answered, neither knows the job


class SlurmUnreachable(RuntimeError):
    """``squeue`` or ``sacct`` did not answer (controller or database down, time-out)."""


def query(command: list[str]) -> subprocess.CompletedProcess:
    try:
        return subprocess.run(command, capture_output=True, text=True, timeout=QUERY_TIMEOUT_S)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise SlurmUnreachable(f"{command[0]}: {exc}") from exc


def parse_states(stdout: str) -> dict[str, str]:
    """``JOBID|STATE`` lines to {job id: first word of the state} ("CANCELLED by 0")."""
    states = {}
    for line in stdout.splitlines():
        job_id, _, slurm_state = line.partition("|")
        if job_id.strip():
            states[job_id.strip()] = slurm_state.split()[0] if slurm_state.split() else NOT_KNOWN
    return states


def squeue_states(job_ids: list[str]) -> dict[str, str]:
    """The jobs slurmctld holds now (queued, running, or ended less than MinJobAge ago)."""
    done = query(["squeue", "-h", "-t", "all", "-o", "%i|%T", "-j", ",".join(job_ids)])
    if done.returncode:
        if "Invalid job id" in done.stderr:  # it answered: it holds none of them
            return {}
        raise SlurmUnreachable(f"squeue: {first_line(done.stderr)}")
    return parse_states(done.stdout)


def sacct_states(job_ids: list[str]) -> dict[str, str]:
    """The jobs' latest state in the accounting database (fresh from sacct, no caching)."""
    if not job_ids:
        return {}
    done = query(["sacct", "-n", "-X", "-P", "-o", "JobID,State", "-j", ",".join(job_ids)])
    if done.returncode:
        raise SlurmUnreachable(f"sacct: {first_line(done.stderr)}")
    return parse_states(done.stdout)


def first_line(text: str) -> str:
    return next((line.strip() for line in text.splitlines() if line.strip()), "no message")


def slurm_states(job_ids: list[str]) -> dict[str, str]:
    """Each job's SLURM state: squeue's while the controller holds the job, else sacct's;
    ``UNKNOWN`` when both answered and neither knows it. A job is left out when the one that
    could tell did not answer: its state is undecided, not failed."""
    if not job_ids:
        return {}
    try:
        held: dict[str, str] | None = squeue_states(job_ids)
    except SlurmUnreachable as exc:
        log.warning("%s; using the accounting database alone", exc)
        held = None
    rest = [job_id for job_id in job_ids if held is None or job_id not in held]
    try:
        accounted: dict[str, str] | None = sacct_states(rest)
    except SlurmUnreachable as exc:
        log.warning("%s; jobs %s stay as they were", exc, ", ".join(rest))
        accounted = None
    states = dict(held or {})
    for job_id in rest:
        if accounted is not None and job_id in accounted:
            states[job_id] = accounted[job_id]
        elif accounted is not None and held is not None:
            states[job_id] = NOT_KNOWN
    return states
