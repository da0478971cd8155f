"""Ending a local job's other ranks once one of them failed, as torchrun's agent does.

submitit's local controller waits for every task of a job, and a rank whose peer died before or
during the rendezvous (or which waits in a collective the dead peer never joins) gives up only
after ``dist.timeout_s`` (600 s by default). The local driver therefore reads the rank records of
each running job at every poll: a rank that recorded an error, or whose process is gone without
having marked its end (SIGKILL, the out-of-memory killer, a crash), has failed (a rank that
loses its peer to a requeue records no error: :class:`launch.jobs.ChainJob`). The job's other
ranks get ``GRACE_S`` to end by themselves — a rank that lost its peer records that error itself
— and are then interrupted (SIGINT; with every process the job's controller started, in case a
rank has not recorded itself yet) and killed ``KILL_AFTER_S`` later if they still run; the
controller then ends by itself. On SLURM, ``srun --kill-on-bad-exit=1`` does the same
(:mod:`launch.executors`).
"""

from __future__ import annotations

import logging
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from launch import procs
from launch import state as st
from launch.monitor import rank_processes

log = logging.getLogger(__name__)

GRACE_S = 5.0  # after a rank failed, the others' time to end by themselves
KILL_AFTER_S = 5.0  # after SIGINT, the time before SIGKILL


def failed_rank(
    run_dir: Path, name: str, job_id: str, table: dict[int, procs.Proc]
) -> dict[str, Any] | None:
    """The first rank of the job's submission ``job_id`` that failed, else None.

    A rank whose process is gone without an end mark gets a ``RankLost`` error in its record.
    ``table`` must be taken before this call: a rank gone from it wrote its end mark (if it
    did) before the records are read here.
    """
    records = [r for r in st.rank_records(run_dir, name) if str(r.get("job_id")) == job_id]
    for record in records:
        if record.get("error"):
            return record
    for record in records:
        pid = int(record.get("pid") or 0)
        gone = pid and not procs.alive(pid, record.get("started", ""), table)
        if gone and not record.get("ended"):
            error = st.rank_lost(run_dir, name, record["rank"], f"process {pid}")
            return {**record, "error": error}
    return None


@dataclass
class Stopping:
    """A job with a failed rank, on its way to being stopped."""

    seen: float  # time.monotonic() when the failure was found
    interrupted: float = 0.0  # when SIGINT went to the surviving ranks (0: not yet)
    targets: procs.Targets = field(default_factory=procs.Targets)


class RankWatch:
    """Checks the running local jobs of a chain at each driver poll; never blocks."""

    def __init__(
        self,
        chain_state: st.ChainState,
        grace_s: float = GRACE_S,
        kill_after_s: float = KILL_AFTER_S,
    ) -> None:
        self.chain_state = chain_state
        self.grace_s = grace_s
        self.kill_after_s = kill_after_s
        self.stopping: dict[str, Stopping] = {}

    def check(self, names: list[str]) -> None:
        """Look at the running jobs ``names``: find failed ranks, stop the rest in time."""
        if not names:
            return
        table = procs.snapshot()
        now = time.monotonic()
        for name in names:
            job = self.stopping.get(name)
            if job is None:
                self.watch(name, table, now)
            else:
                self.advance(name, job, table, now)

    def forget(self, name: str) -> None:
        """The job ended (the driver recorded its outcome)."""
        self.stopping.pop(name, None)

    def watch(self, name: str, table: dict[int, procs.Proc], now: float) -> None:
        job_id = self.chain_state.jobs[name].job_id
        failed = failed_rank(self.chain_state.run_dir, name, job_id, table)
        if failed is None:
            return
        self.stopping[name] = Stopping(seen=now)
        log.warning(
            "%s: rank %s failed (%s); its other ranks get %.0f s to end, then are stopped",
            name,
            failed["rank"],
            str(failed["error"]).splitlines()[0][:200],
            self.grace_s,
        )

    def advance(self, name: str, job: Stopping, table: dict[int, procs.Proc], now: float) -> None:
        if not job.interrupted:
            if now - job.seen < self.grace_s:
                return
            for pid, started, label in self.processes(name, table):
                job.targets.add(pid, started, label, table)
            running = job.targets.live(table)  # with their children (data loader workers)
            if running:
                log.warning("%s: stopping %s", name, describe(job.targets, running))
            procs.send(running, signal.SIGINT)
            job.interrupted = now
            return
        if now - job.interrupted >= self.kill_after_s:
            running = job.targets.live(table)
            if running:
                log.warning("%s: killing %s", name, describe(job.targets, running))
                procs.send(running, signal.SIGKILL)
            job.interrupted = now  # again after kill_after_s if one is still there

    def processes(self, name: str, table: dict[int, procs.Proc]) -> list[tuple[int, str, str]]:
        """(pid, start time, label) of the job's ranks: those recorded, and every process its
        controller started (a rank that has not recorded itself yet). Not the controller: it
        ends by itself once its tasks have."""
        record = self.chain_state.jobs[name]
        ranks = rank_processes(self.chain_state, record)
        tasks = []
        if record.job_id.isdigit() and procs.alive(int(record.job_id), record.started, table):
            below = procs.descendants({int(record.job_id)}, table)
            tasks = [(pid, table[pid].started, f"{name} task") for pid in sorted(below)]
        return ranks + tasks  # first: a recorded rank keeps its label


def describe(targets: procs.Targets, pids: list[int]) -> str:
    return ", ".join(f"{targets.label(pid)} (pid {pid})" for pid in pids)
