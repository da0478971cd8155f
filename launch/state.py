"""``chain.json`` and the jobs' own status files.

Two sources of truth, merged by :func:`refresh`:

* the **status file** ``RUN_DIR/status/NAME.json``, written by rank 0 of the job itself
  (``RUNNING`` with the attempt number, then ``COMPLETED`` with its result or ``FAILED`` with
  the error) — the only record a local job leaves once its process is gone;
* the **rank records** ``RUN_DIR/status/NAME.ranks/RANK.json``, one per rank (its pid, start
  time, log and, if it failed, its own error): :func:`root_cause` names the rank whose error
  started a failure, not the ranks that only lost their peer;
* the **scheduler** (SLURM through submitit/sacct): ``PENDING``, ``REQUEUED``, ``CANCELLED``,
  ``TIMEOUT``, ``NODE_FAIL`` … — the only record of a job that never started.

``chain.json`` is rewritten atomically by the submitting/inspecting process only.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import re
import shutil
import socket
import time
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from cil_dist import storage

CHAIN_FILE = "chain.json"

# Chain-level job states (a superset of what a status file says).
WAITING, PENDING, RUNNING, COMPLETED = "WAITING", "PENDING", "RUNNING", "COMPLETED"
FAILED, CANCELLED, SKIPPED = "FAILED", "CANCELLED", "SKIPPED"
FINAL_STATES = {COMPLETED, FAILED, CANCELLED, SKIPPED}

# SLURM states (sacct) mapped onto chain states.
SLURM_STATES = {
    "PENDING": PENDING,
    "REQUEUED": PENDING,
    "REQUEUE_HOLD": PENDING,
    "REQUEUE_FED": PENDING,
    "CONFIGURING": PENDING,
    "RUNNING": RUNNING,
    "COMPLETING": RUNNING,
    "SUSPENDED": RUNNING,
    "STOPPED": RUNNING,
    "PREEMPTED": PENDING,
    "COMPLETED": COMPLETED,
    "CANCELLED": CANCELLED,
    "FAILED": FAILED,
    "TIMEOUT": FAILED,
    "NODE_FAIL": FAILED,
    "OUT_OF_MEMORY": FAILED,
    "BOOT_FAIL": FAILED,
    "DEADLINE": FAILED,
}


def now() -> str:
    return _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds")


@dataclass
class JobRecord:
    """One job of the chain as ``chain.json`` records it."""

    name: str
    kind: str
    depends_on: list[str]
    checkpoint: str
    out_dir: str
    state: str = WAITING
    job_id: str = ""
    log: str = ""  # rank 0's log (stdout+stderr) of the current/last attempt
    error: str = ""
    attempts: int = 0
    submissions: list[str] = field(default_factory=list)  # every job id it was submitted as
    started: str = ""  # local: when its controller process (pid = job id) started


@dataclass
class ChainState:
    name: str
    executor: str
    run_dir: str
    created: str
    updated: str
    jobs: dict[str, JobRecord]
    driver_pid: int = 0  # local/debug: the process driving the chain (cancel interrupts it)
    driver_started: str = ""  # when that process started (a reused pid is not the driver)

    @classmethod
    def load(cls, run_dir: Path) -> ChainState:
        path = run_dir / CHAIN_FILE
        try:
            raw = json.loads(path.read_text())
            jobs = {name: JobRecord(**job) for name, job in raw.pop("jobs").items()}
            return cls(**raw, jobs=jobs)
        except FileNotFoundError:
            raise FileNotFoundError(f"{path}: no chain here (submit one first)") from None
        except (ValueError, TypeError, KeyError) as exc:
            raise ValueError(f"{path}: not a chain.json of cil-launch: {exc}") from exc

    def save(self) -> None:
        self.updated = now()
        data = asdict(self)
        with storage.open_for_write(str(Path(self.run_dir) / CHAIN_FILE), "w") as stream:
            json.dump(data, stream, indent=1)

    def dependents(self, name: str) -> list[str]:
        """Every job that (transitively) depends on ``name``."""
        found: list[str] = []
        frontier = [name]
        while frontier:
            current = frontier.pop()
            for job in self.jobs.values():
                if current in job.depends_on and job.name not in found:
                    found.append(job.name)
                    frontier.append(job.name)
        return found


# ---- status files, written by the job (rank 0) -------------------------------------------


def status_path(run_dir: Path | str, name: str) -> Path:
    return Path(run_dir) / "status" / f"{name}.json"


def read_status(run_dir: Path | str, name: str) -> dict[str, Any]:
    path = status_path(run_dir, name)
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return {}
    except ValueError:
        return {"state": FAILED, "error": f"{path}: unreadable status file"}


def write_status(run_dir: Path | str, name: str, **fields: Any) -> dict[str, Any]:
    """Update the job's status file (atomic replace); returns the new content."""
    status = read_status(run_dir, name)
    status.update(fields, updated=now())
    with storage.open_for_write(str(status_path(run_dir, name)), "w") as stream:
        json.dump(status, stream, indent=1)
    return status


def job_started(run_dir: Path | str, name: str, job_id: str, world_size: int = 1) -> int:
    """Record a (re)start; returns the attempt number (1 for the first)."""
    attempt = int(read_status(run_dir, name).get("attempts", 0)) + 1
    write_status(
        run_dir,
        name,
        state=RUNNING,
        attempts=attempt,
        job_id=job_id,
        world_size=world_size,
        host=socket.gethostname(),
        pid=os.getpid(),
        started=now(),
        error="",
        traceback="",  # a failed attempt's, not this one's
        finished="",
        requeue_pending=False,  # this is the requeued attempt
    )
    return attempt


def requeue_pending(run_dir: Path | str, name: str) -> bool:
    """Whether rank 0 checkpointed the job for a requeue that has not started yet."""
    return bool(read_status(run_dir, name).get("requeue_pending"))


def job_finished(run_dir: Path | str, name: str, result: str) -> None:
    write_status(run_dir, name, state=COMPLETED, result=result, finished=now())


def job_failed(run_dir: Path | str, name: str, exc: BaseException) -> None:
    write_status(
        run_dir,
        name,
        state=FAILED,
        error=f"{type(exc).__name__}: {exc}",
        traceback="".join(traceback.format_exception(exc))[-4000:],
        finished=now(),
    )


def cancel_marker(run_dir: Path | str) -> Path:
    """Written by ``cil-launch cancel``: the local driver stops at its next poll."""
    return Path(run_dir) / "cancel.requested"


# ---- rank records, written by every rank of a job -----------------------------------------

# Errors a rank gets because another rank went away first (gloo/NCCL lose their peer).
CONSEQUENCE = re.compile(
    r"Connection closed by peer|Connection reset by peer|Broken pipe|DistBackendError|"
    r"gloo|NCCL|ProcessGroup|Socket Timeout|failed to recv|Connection refused",
    re.IGNORECASE,
)


def ranks_dir(run_dir: Path | str, name: str) -> Path:
    return Path(run_dir) / "status" / f"{name}.ranks"


def clear_ranks(run_dir: Path | str, name: str) -> None:
    """Forget the rank records of a previous submission of the job."""
    shutil.rmtree(ranks_dir(run_dir, name), ignore_errors=True)


def write_rank(
    run_dir: Path | str, name: str, rank: int, fresh: bool = False, **fields: Any
) -> None:
    """Update (``fresh``: replace) rank ``rank``'s record, atomically."""
    path = ranks_dir(run_dir, name) / f"{rank}.json"
    record = {} if fresh else read_json(path)
    record.update(fields, rank=rank)
    with storage.open_for_write(str(path), "w") as stream:
        json.dump(record, stream, indent=1)


def read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, ValueError):
        return {}


def rank_records(run_dir: Path | str, name: str) -> list[dict[str, Any]]:
    """Every rank's record of the job's current submission, by rank."""
    folder = ranks_dir(run_dir, name)
    records = [read_json(path) for path in sorted(folder.glob("*.json"))]
    return sorted((r for r in records if "rank" in r), key=lambda r: r["rank"])


def rank_started(run_dir: Path | str, name: str, rank: int, world_size: int, **fields) -> None:
    """A rank (re)starts: its pid, start time and log, no error."""
    host = socket.gethostname()
    write_rank(run_dir, name, rank, fresh=True, world_size=world_size, host=host, **fields)


def rank_failed(run_dir: Path | str, name: str, rank: int, exc: BaseException) -> None:
    write_rank(
        run_dir,
        name,
        rank,
        error=f"{type(exc).__name__}: {exc}",
        failed_at=time.time(),
        traceback="".join(traceback.format_exception(exc))[-4000:],
    )


def rank_ended(run_dir: Path | str, name: str, rank: int) -> None:
    """The rank's Python code is done (a result, an error or a requeue): a rank process that is
    gone without this mark died from outside (SIGKILL, out of memory, a crash)."""
    write_rank(run_dir, name, rank, ended=time.time())


def rank_lost(run_dir: Path | str, name: str, rank: int, who: str) -> str:
    """Recorded for a rank that ended without a word (``who``: "process 1234" locally, what srun
    said on SLURM), by the local driver or the monitor; returns the error it recorded."""
    why = f"RankLost: {who} ended without a result or an error (killed: out of memory?)"
    write_rank(run_dir, name, rank, error=why, failed_at=time.time())
    return why


def is_consequence(record: dict[str, Any]) -> bool:
    """Whether a rank's error is a lost peer (gloo/NCCL) rather than a failure of its own."""
    return bool(CONSEQUENCE.search(record.get("error", "") + record.get("traceback", "")))


def root_cause(run_dir: Path | str, name: str) -> dict[str, Any] | None:
    """The rank record whose error started the job's failure: the earliest error that is not
    a lost peer, or the earliest error when every rank only lost its peer (None: no error)."""
    failed = sorted(
        (r for r in rank_records(run_dir, name) if r.get("error")),
        key=lambda r: r.get("failed_at", 0.0),
    )
    causes = [r for r in failed if not is_consequence(r)]
    return (causes or failed or [None])[0]
